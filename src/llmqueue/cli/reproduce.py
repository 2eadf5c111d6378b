"""``llmqueue reproduce``: every result of the paper in one report (docs/reproduce.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmqueue.cli.common import Bar, clock, interrupted
from llmqueue.errors import LlmqueueError

EXIT_INTERRUPTED = 130   # SIGINT; SIGTERM gives 143
DEFAULT_OUT = "llmqueue_output/reproduce"


def cmd_reproduce(args: argparse.Namespace) -> int:
    from llmqueue.reproduce import STORE_NAME, reproduce

    if args.jobs is not None and args.jobs < 1:
        raise LlmqueueError(f"--jobs = {args.jobs} is not allowed: an integer >= 1")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = Path(args.out)
    bar = Bar(sys.stderr.isatty())
    start = time.monotonic()

    def log(msg: str) -> None:
        if bar.enabled and bar.total:
            sys.stderr.write("\n")
        print(f"  {msg}", file=sys.stderr)

    try:   # main() turns SIGTERM into an interrupt like Ctrl-C
        doc = reproduce(out, mode=mode, jobs=args.jobs, fresh=args.fresh, on_start=bar.begin,
                        on_result=bar.step, log=log)
    except KeyboardInterrupt as exc:
        bar.close()
        return interrupted(exc, f"the finished runs are in {out / STORE_NAME}; run the same command again to resume")
    bar.close()
    width = max(len(s["title"]) for s in doc["sections"])
    for s in doc["sections"]:
        print(f"{s['title']:<{width}}  {s['verdict']}")
    print(f"\nwrote {out / 'report.html'}, {out / 'results.json'} and {out / 'plots'}/*.png "
          f"({mode}, {clock(time.monotonic() - start)} wall)")
    return 0


def register(sub) -> None:
    r = sub.add_parser("reproduce", help="run every result of the paper and write an HTML report",
                       description="Run every result of the paper (arXiv 2504.07347) and write DIR/report.html "
                                   "(self-contained), DIR/results.json and DIR/plots/*.png. Finished runs are "
                                   "stored in DIR/runs.db: an interrupted reproduction resumes.")
    r.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs, fewer seeds (under 2 minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny runs of every section, for tests (verdicts not meaningful)")
    r.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes (default: one per core)")
    r.add_argument("--fresh", action="store_true", help="ignore runs stored by an earlier reproduction in DIR")
    r.set_defaults(func=cmd_reproduce)


__all__ = ["register"]
