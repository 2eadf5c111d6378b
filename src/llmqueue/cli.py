"""Command line: thin wrappers that parse, load a config, call the library, write.

``llmqueue compare | simulate | capacity | policies | scenarios``; see ``--help`` of each.
User errors print one line ``llmqueue: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmqueue import __version__
from llmqueue.config import Config, dumps, load_config, parse_config, parse_override, set_dotted
from llmqueue.errors import LlmqueueError
from llmqueue.metrics import timeseries
from llmqueue.schedulers import SCHEDULERS
from llmqueue.scenarios import DEFAULT_SCENARIO, SCENARIOS, scenario_data, scenario_text

EXIT_USAGE = 2


# ---- shared helpers ----------------------------------------------------------------------

def _config_from(source: str | None, overrides: Sequence[str]) -> Config:
    """A TOML path, or a built-in scenario name when no such file exists."""
    if source is not None and not Path(source).exists() and source in SCENARIOS:
        data = scenario_data(source)
        for item in overrides:
            set_dotted(data, *parse_override(item))
        return parse_config(data)
    return load_config(source, list(overrides))


class _Progress:
    """A one-line progress display on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = -1

    def __call__(self, name: str, fraction: float) -> None:
        pct = int(fraction * 100)
        if self.enabled and pct != self.last:
            self.last = pct
            sys.stderr.write(f"\r  simulating {name:<18} {pct:3d}%")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last >= 0:
            sys.stderr.write("\r" + " " * 40 + "\r")
            sys.stderr.flush()
        self.last = -1


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(summaries: Sequence[dict]) -> str:
    head = ("scheduler", "verdict", "theory", "req/s", "tok/s", "slope tok/s", "in-sys mean",
            "in-sys final", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "violations")
    rows = [head]
    for s in summaries:
        theory = s["predicted"] if s["predicted"] in ("stable", "unstable") else "-"
        rows.append((s["scheduler"], s["verdict"], theory, _fmt(s["throughput_rps"]), _fmt(s["token_throughput"], 0),
                     _fmt(s["backlog_slope_tokens_per_s"], 1), _fmt(s["mean_in_system"], 1),
                     str(s["final_in_system"]), _fmt(s["ttft_s"]["p50"], 3), _fmt(s["ttft_s"]["p99"], 3),
                     _fmt(s["e2e_s"]["p50"], 2), _fmt(s["e2e_s"]["p99"], 2), str(s["work_conserving_violations"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _analysis_line(run) -> str:
    a = run.analysis
    return (f"capacity {a.capacity_tokens_per_s:.1f} tokens/s (b_max={a.token_budget}, t_b={a.batch_time_s * 1e3:.2f} ms); "
            f"offered {a.offered_tokens_per_s:.1f} tokens/s at λ={a.arrival_rate:.3f} req/s; ρ={a.rho:.3f}; "
            f"λ*={a.max_stable_rate_rps:.3f} req/s")


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _write_requests_csv(path: Path, result) -> None:
    blank = lambda a: ["" if np.isnan(x) else x for x in a.tolist()]  # noqa: E731 - "not yet" is empty
    _write_columns_csv(path, {
        "rid": np.arange(len(result.arrival_time)), "arrival_time": result.arrival_time,
        "num_prompt_tokens": result.num_prompt_tokens, "num_output_tokens": result.num_output_tokens,
        "first_token_time": blank(result.first_token_time), "finish_time": blank(result.finish_time),
        "rejected": result.rejected.astype(int)})


def _write_columns_csv(path: Path, columns: dict) -> None:
    names = list(columns)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(zip(*(c.tolist() if isinstance(c, np.ndarray) else c for c in columns.values())))


def _timeseries_columns(runs) -> dict:
    """time_s plus, per run, in_system and backlog_tokens columns (prefixed when several)."""
    columns = {}
    for run in runs:
        series = timeseries(run.result)
        columns.setdefault("time_s", series.pop("time_s"))
        prefix = f"{run.result.scheduler}_" if len(runs) > 1 else ""
        columns.update({prefix + k: v for k, v in series.items()})
    return columns


# ---- commands ----------------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from llmqueue.plots import plot_in_system
    from llmqueue.runner import compare

    overrides = list(args.set)
    for flag, key in (("load", "workload.load"), ("rate", "workload.rate"), ("budget", "engine.token_budget"),
                      ("horizon", "run.horizon_s"), ("requests", "run.requests"), ("seed", "run.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = _config_from(args.config or DEFAULT_SCENARIO, overrides)
    names = [n.strip() for n in args.schedulers.split(",") if n.strip()] if args.schedulers else list(SCHEDULERS)
    for n in names:
        if n not in SCHEDULERS:
            raise LlmqueueError(f"--schedulers: {n!r} is not a scheduler; allowed: {', '.join(SCHEDULERS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(sys.stderr.isatty() and not args.json)
    finished: list = []

    def on_done(run) -> None:
        progress.done()
        finished.append(run)
        _write_json(out / "summary.json", {"config": cfg.portable(), "runs": [r.summary for r in finished]})

    interrupted = False
    try:
        compare(cfg, names, progress, on_done)
    except KeyboardInterrupt:
        interrupted = True
        progress.done()
    if not finished:
        print("interrupted before any scheduler finished", file=sys.stderr)
        return 130
    summaries = [r.summary for r in finished]
    if args.json:
        print(json.dumps({"runs": summaries}, default=float))
    else:
        print(_analysis_line(finished[0]))
        print(f"horizon {finished[0].result.end_time:.0f} s, seed {cfg.run.seed}, "
              f"{summaries[0]['arrived']} arrivals (same for every scheduler)\n")
        print(_table(summaries))
    _write_columns_csv(out / "timeseries.csv", _timeseries_columns(finished))
    if not args.no_plot:
        a = finished[0].analysis
        png = plot_in_system(finished, out / "number_in_system.png",
                             f"Requests in system: ρ = {a.rho:.2f} (λ = {a.arrival_rate:.2f} req/s), b_max = {a.token_budget}")
        if not args.json:
            print(f"\nwrote {png}, {out / 'summary.json'} and {out / 'timeseries.csv'}")
    if interrupted:
        print("interrupted: the table shows the schedulers that finished", file=sys.stderr)
        return 130
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from llmqueue.runner import run_config

    cfg = _config_from(args.config, args.set)
    progress = _Progress(sys.stderr.isatty() and not args.json)
    try:
        run = run_config(cfg, progress)
    finally:
        progress.done()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(dumps(cfg.portable()))
        _write_json(out / "summary.json", run.summary)
        _write_requests_csv(out / "requests.csv", run.result)
        if run.result.batches is not None:
            _write_columns_csv(out / "batches.csv", run.result.batches)
        _write_columns_csv(out / "timeseries.csv", _timeseries_columns([run]))
    if args.json:
        print(json.dumps(run.summary, default=float))
        return 0
    s = run.summary
    print(_analysis_line(run))
    print(f"scheduler {s['scheduler']}: {s['verdict']} (theory: {s['predicted']})  {s['verdict_reason']}")
    print(_table([s]))
    if args.out:
        print(f"\nwrote {args.out}/config.toml, summary.json, requests.csv, timeseries.csv"
              + (", batches.csv" if run.result.batches is not None else ""))
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from llmqueue.runner import analysis_of, build_workload

    cfg = _config_from(args.config, args.set)
    a = analysis_of(cfg, build_workload(cfg))
    if args.json:
        print(json.dumps(a.to_dict()))
        return 0
    rows = [("token budget b_max", f"{a.token_budget}"),
            ("batch time t(b_max)", f"{a.batch_time_s * 1e3:.3f} ms"),
            ("capacity b_max/t(b_max)", f"{a.capacity_tokens_per_s:.2f} tokens/s"),
            ("mean prompt / output", f"{a.mean_prompt_len:.2f} / {a.mean_output_len:.2f} tokens"),
            ("largest stable rate λ*", f"{a.max_stable_rate_rps:.4f} requests/s"),
            ("arrival rate λ", f"{a.arrival_rate:.4f} requests/s"),
            ("offered load λ(m_p+m_d)", f"{a.offered_tokens_per_s:.2f} tokens/s"),
            ("utilisation ρ", f"{a.rho:.4f}"),
            ("fluid backlog growth", f"{a.fluid_growth_tokens_per_s:.2f} tokens/s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for note in a.notes:
        print(f"note: {note}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    for name, cls in SCHEDULERS.items():
        claim = "work-conserving" if cls.work_conserving else "not work-conserving"
        print(f"{name:<18} {claim:<20} {cls.summary}")
        for opt, o in cls.options.items():
            print(f"{'':<18}   option {opt} ({o.type.__name__}, default {json.dumps(o.default)}): {o.help}")
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.name:
            raise LlmqueueError("scenarios show: give a scenario name; allowed: " + ", ".join(SCENARIOS))
        sys.stdout.write(scenario_text(args.name))
        return 0
    if args.action is not None:
        raise LlmqueueError(f"scenarios: unknown action {args.action!r}; allowed: show")
    for name, (desc, _) in SCENARIOS.items():
        print(f"{name:<10} {desc}")
    return 0


# ---- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmqueue", description="Stability and latency of LLM inference schedulers "
                                "(Dai, Deng, Li, Peng, arXiv 2504.07347).")
    p.add_argument("--version", action="version", version=f"llmqueue {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set engine.token_budget=1024 (repeatable)")

    c = sub.add_parser("compare", help="run every scheduler on the same arrivals (default: the Fig. 1 scenario)")
    c.add_argument("--config", help=f"TOML config or scenario name (default {DEFAULT_SCENARIO})")
    c.add_argument("--load", type=float, help="arrival rate as a fraction of λ* (default 0.9)")
    c.add_argument("--rate", type=float, help="arrival rate in requests/s (instead of --load)")
    c.add_argument("--budget", type=int, help="token budget b_max (default 512)")
    c.add_argument("--horizon", type=float, help="simulated seconds (default 1200)")
    c.add_argument("--requests", type=int, help="number of arrivals (instead of --horizon)")
    c.add_argument("--seed", type=int, help="random seed (default 0)")
    c.add_argument("--schedulers", help=f"comma-separated (default all: {','.join(SCHEDULERS)})")
    c.add_argument("--out", default="llmqueue_output/compare", help="folder for the plot and summary.json")
    c.add_argument("--json", action="store_true", help="print the summaries as JSON")
    c.add_argument("--no-plot", action="store_true", help="skip the PNG")
    overrides(c)
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("simulate", help="one run from a TOML config (or a scenario name)")
    s.add_argument("config")
    overrides(s)
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.add_argument("--out", help="write config.toml, summary.json, requests.csv (and batches.csv) here")
    s.set_defaults(func=cmd_simulate)

    k = sub.add_parser("capacity", help="closed-form capacity, λ*, ρ (Theorem 2)")
    k.add_argument("config")
    overrides(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_capacity)

    sub.add_parser("policies", help="list schedulers, their options and work-conserving claim").set_defaults(
        func=cmd_policies)

    sc = sub.add_parser("scenarios", help="list built-in scenarios; 'scenarios show NAME' prints one as TOML")
    sc.add_argument("action", nargs="?", help="show")
    sc.add_argument("name", nargs="?")
    sc.set_defaults(func=cmd_scenarios)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except LlmqueueError as exc:
            print(f"llmqueue: error: {exc}", file=sys.stderr)
            code = EXIT_USAGE
        except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 1
        except OSError as exc:  # e.g. an --out folder that cannot be written
            print(f"llmqueue: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            code = EXIT_USAGE
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"llmqueue: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
