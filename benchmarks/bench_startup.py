"""Benchmark: how long a command takes to start, against a bare ``import numpy`` (docs/performance.md).

Each round runs, in fresh interpreters and in turn, ``python -c "import numpy"`` (the floor: every
command needs numpy) and each command (default ``llmqueue capacity fig1``, the cheapest one, which
does no simulation), ``--repeat`` rounds.  It prints each one's median wall time and the ratio of
medians command / numpy, measured side by side in one run (a shared, noisy machine: compare ratios,
not absolute times), and exits 1 when a ratio is above ``--max-ratio`` (issue 17: at most 4).

    python benchmarks/bench_startup.py                         # capacity fig1, median of 3
    python benchmarks/bench_startup.py --repeat 7 --command "policies" --command "scenarios"
    python benchmarks/bench_startup.py --json startup.json     # the raw times too
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time

FLOOR = ("import numpy", [sys.executable, "-c", "import numpy"])


def wall_time(cmd: list[str]) -> float:
    """Seconds from spawning ``cmd`` to its exit; a failing command is an error, not a time."""
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_startup: {shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return elapsed


def measure(commands: list[str], repeat: int) -> dict[str, list[float]]:
    """Wall times per label, the floor and the commands interleaved round by round (the same load on each)."""
    runs = [FLOOR] + [(f"llmqueue {c}", [sys.executable, "-m", "llmqueue", *shlex.split(c)]) for c in commands]
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    for label, cmd in runs:  # a warm-up round: disk caches, .pyc files
        wall_time(cmd)
    for _ in range(repeat):
        for label, cmd in runs:
            times[label].append(wall_time(cmd))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--command", action="append", help="an llmqueue command line (default: capacity fig1); repeatable")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each time is the median over them (default 3)")
    ap.add_argument("--max-ratio", type=float, default=4.0, help="fail above this ratio to import numpy (default 4)")
    ap.add_argument("--json", help="also write the times and ratios to this JSON file")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    times = measure(args.command or ["capacity fig1"], args.repeat)
    floor = statistics.median(times[FLOOR[0]])
    print(f"median of {args.repeat} in fresh interpreters; ratio = median / median of `{FLOOR[0]}`")
    print(f"{'command':32} {'median s':>9} {'ratio':>6}")
    ratios, failed = {}, False
    for label, values in times.items():
        ratios[label] = statistics.median(values) / floor
        over = label != FLOOR[0] and ratios[label] > args.max_ratio
        failed |= over
        print(f"{label:32} {statistics.median(values):9.3f} {ratios[label]:6.2f}" + ("  over the limit" if over else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeat": args.repeat, "times_s": times, "ratios": ratios, "max_ratio": args.max_ratio}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
