"""Single-engine commands: compare, simulate, capacity, policies, scenarios (arXiv 2504.07347 §3–§4)."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import warnings
from pathlib import Path

from llmqueue.cli.common import (
    Progress,
    add_overrides,
    analysis_line,
    config_from,
    interrupted,
    kept_files,
    memory_rows,
    rejection_warnings,
    saved,
    scheduler_names,
    table,
    timeseries_columns,
    trace_shortfall,
    write_columns_csv,
    write_json,
    write_requests_csv,
    write_text,
)
from llmqueue.config import dumps, read_toml
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.scenarios import DEFAULT_SCENARIO, SCENARIOS, SINGLE_SCENARIOS, scenario_text
from llmqueue.schedulers import SCHEDULERS
from llmqueue.tables import batch_columns, request_columns, stacked, write_table


#: compare's flags that replace each other (as their config keys do): given together, refused
COMPARE_EXCLUSIVE = (("requests", "horizon"), ("rate", "load"))


def cmd_compare(args: argparse.Namespace) -> int:
    from llmqueue.plots import plot_in_system, plot_kv_blocks
    from llmqueue.runner import compare

    for a, b in COMPARE_EXCLUSIVE:
        if getattr(args, a) is not None and getattr(args, b) is not None:
            raise ConfigError(f"--{a}", getattr(args, a), f"omitted when --{b} is given (choose one)")
    overrides = list(args.set)
    for flag, key in (("load", "workload.load"), ("rate", "workload.rate"), ("budget", "engine.token_budget"),
                      ("horizon", "run.horizon_s"), ("requests", "run.requests"), ("seed", "run.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.batches:
        overrides.append("run.record_batches=true")
    cfg = config_from(args.config or DEFAULT_SCENARIO, overrides)
    names = scheduler_names(args.schedulers, list(SCHEDULERS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(sys.stderr.isatty() and not args.json)
    finished: list = []

    def write_summary() -> None:
        write_json(out / "summary.json", {"config": cfg.portable(), "runs": [r.summary for r in finished]})

    def on_done(run) -> None:
        progress.done()
        finished.append(run)
        write_summary()   # rewritten as each scheduler finishes: an interrupted comparison keeps them

    stop = None
    try:
        compare(cfg, names, progress, on_done)
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: what finished is printed and kept
        stop = exc
        progress.done()
    if not finished:
        return interrupted(stop or KeyboardInterrupt(), "no scheduler finished: nothing written")
    if stop is not None:
        write_summary()   # in case the signal came while it was being rewritten
    shortfall = trace_shortfall(cfg, len(finished[0].result.arrival_time))
    if shortfall:
        warnings.warn(shortfall)
    summaries = [r.summary for r in finished]
    if args.json:
        print(json.dumps({"runs": summaries}, default=float))
    else:
        print(analysis_line(finished[0]))
        print(f"horizon {finished[0].result.end_time:.0f} s, seed {cfg.run.seed}, "
              f"{summaries[0]['arrived']} arrivals (same for every scheduler)\n")
        print(table(summaries))
        for line in rejection_warnings(summaries):
            print(line, file=sys.stderr)
    write_columns_csv(out / "timeseries.csv", timeseries_columns(finished))
    written = [out / "summary.json", out / "timeseries.csv"]
    if stop is None:   # the per-request tables of a whole comparison (an interrupted one keeps the two above)
        written.append(saved(write_table(stacked([(r.result.scheduler, request_columns(r.result)) for r in finished]),
                                         out / "requests.csv")))
        if args.batches:
            written.append(saved(write_table(stacked([(r.result.scheduler, batch_columns(r.result))
                                                      for r in finished]), out / "batches.csv")))
    if not args.no_plot:
        a = finished[0].analysis
        title = f"ρ = {a.rho:.2f} (λ = {a.arrival_rate:.2f} req/s), b_max = {a.token_budget}"
        pngs = [saved(plot_in_system(finished, out / "number_in_system.png", f"Requests in system: {title}"))]
        if finished[0].result.kv is not None:
            pngs.append(saved(plot_kv_blocks(finished, out / "kv_blocks.png", f"KV-cache use: {title}")))
        written = pngs + written
    if not args.json:
        print(f"\nwrote {', '.join(map(str, written))}")
    if stop is not None:
        done = ", ".join(r.result.scheduler for r in finished)
        return interrupted(stop, f"{len(finished)} of {len(names)} schedulers finished ({done}), shown in the table; "
                                 + kept_files())
    return 0


def _network_commands(source: str | None):
    """:mod:`llmqueue.cli.network` when ``source`` (a file or a scenario name) holds a network config
    ([[engines]]), else None.

    perf: importing the network package takes 50–75 ms (0.2 s while it imported scipy.sparse); a
    built-in single-engine scenario, or a file without ``engines``, is answered without it
    (docs/performance.md, "Start-up").
    """
    if source is None:
        return None
    path = Path(source)
    if not path.exists() and source in SINGLE_SCENARIOS:
        return None
    if path.exists():
        try:
            if "engines" not in read_toml(path):
                return None
        except (LlmqueueError, tomllib.TOMLDecodeError):
            return None
    from llmqueue.cli import network

    return network if network.is_network_source(source) else None


def cmd_simulate(args: argparse.Namespace) -> int:
    network = _network_commands(args.config)
    if network is not None:  # [[engines]]: a network config (arXiv 2504.07347 §5)
        return network.cmd_simulate(args)
    from llmqueue.runner import run_config

    cfg = config_from(args.config, args.set)
    progress = Progress(sys.stderr.isatty() and not args.json)
    try:
        run = run_config(cfg, progress)
    finally:
        progress.done()
    shortfall = trace_shortfall(cfg, len(run.result.arrival_time))
    if shortfall:
        warnings.warn(shortfall)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.toml", dumps(cfg.portable()))
        write_json(out / "summary.json", run.summary)
        write_requests_csv(out / "requests.csv", run.result)
        if run.result.batches is not None:
            write_columns_csv(out / "batches.csv", run.result.batches)
        write_columns_csv(out / "timeseries.csv", timeseries_columns([run]))
        if run.result.kv is not None:
            from llmqueue.plots import plot_kv_blocks
            saved(plot_kv_blocks([run], out / "kv_blocks.png", f"KV-cache use: {run.result.scheduler}"))
    if args.json:
        print(json.dumps(run.summary, default=float))
        return 0
    s = run.summary
    print(analysis_line(run))
    print(f"scheduler {s['scheduler']}: {s['verdict']} (theory: {s['predicted']})  {s['verdict_reason']}")
    print(table([s]))
    for line in rejection_warnings([s]):
        print(line, file=sys.stderr)
    if args.out:
        print(f"\nwrote {args.out}/config.toml, summary.json, requests.csv, timeseries.csv"
              + (", batches.csv" if run.result.batches is not None else "")
              + (", kv_blocks.png" if run.result.kv is not None else ""))
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    network = _network_commands(args.config)
    if network is not None:  # [[engines]]: traffic equations (arXiv 2504.07347 §5)
        return network.cmd_capacity(args)
    from llmqueue.runner import analysis_of, build_workload, memory_of, prefix_of

    cfg = config_from(args.config, args.set)
    workload = build_workload(cfg)
    a = analysis_of(cfg, workload)
    if cfg.engine.get("max_batch_requests") is not None:  # paper §6: the 2-D region, not Theorem 2's line
        from llmqueue.cli.region import capacity_report

        return capacity_report(cfg, a, args.json)
    prefix = prefix_of(cfg, workload) if cfg.engine.get("prefix_caching") else None      # docs/prefix_caching.md
    # the memory bounds count every request's blocks as its own: with shared blocks they bound nothing
    memory = memory_of(cfg, workload) if cfg.engine.get("kv_blocks") is not None and prefix is None else None
    if args.json:
        extra = {**({"memory": memory.to_dict()} if memory is not None else {}),
                 **({"prefix": prefix.to_dict()} if prefix is not None else {})}
        print(json.dumps({**a.to_dict(), **extra}))
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
    _print_rows(rows)
    for note in a.notes:
        print(f"note: {note}")
    if memory is not None:
        print("\nKV-cache memory (docs/memory.md)")
        rows = memory_rows(memory)
        _print_rows(rows)
        for note in memory.notes:
            print(f"note: {note}")
    if prefix is not None:
        print("\nPrefix caching (docs/prefix_caching.md)")
        shared = workload.shared_prefix
        rows = [("shared prefix", "none: only a preempted request's own blocks can be found again" if shared is None
                 else f"{shared.tokens} tokens, one of {shared.groups} per request"),
                ("found cached E[h]", f"{prefix.mean_hit:.2f} tokens per request (steady state, every group cached)"),
                ("computed per request", f"{prefix.computed_per_request:.2f} tokens (m_p + m_d − E[h])"),
                ("λ* with the cache", f"{prefix.max_stable_rate_prefix_rps:.4f} requests/s ({prefix.gain:.3f}x; "
                                      "necessary: above it no scheduler is stable)")]
        _print_rows(rows)
        print("note: no memory bounds: they count every request's blocks as its own, but shared blocks are held "
              "once (docs/memory.md)")
    return 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """``label  value`` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_policies(args: argparse.Namespace) -> int:
    from llmqueue.schedulers import scheduler_class

    classes = {ref: scheduler_class(ref, field="policies") for ref in args.files} if args.files else SCHEDULERS
    for name, cls in classes.items():
        claim = "work-conserving" if cls.work_conserving else "not work-conserving"
        print(f"{cls.name:<18} {claim:<20} {cls.summary}")
        if name != cls.name:
            print(f"{'':<18}   from {name}")
        program = cls().program
        how = f"plan {program.describe()}" if program is not None else "plans in Python (reference interpreter only)"
        print(f"{'':<18}   {how}")
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
    width = max(map(len, SCENARIOS))
    for name, (desc, _) in SCENARIOS.items():
        print(f"{name:<{width}}  {desc}")
    print("\nreplica pools behind a router (docs/cluster.md): llmqueue cluster scenarios")
    return 0


def register(sub) -> None:
    c = sub.add_parser("compare", help="run every scheduler on the same arrivals (default: the Fig. 1 scenario)")
    c.add_argument("--config", help=f"TOML config or scenario name (default {DEFAULT_SCENARIO})")
    c.add_argument("--load", type=float, help="arrival rate as a fraction of λ* (default 0.9)")
    c.add_argument("--rate", type=float, help="arrival rate in requests/s (instead of --load)")
    c.add_argument("--budget", type=int, help="token budget b_max (default 512)")
    c.add_argument("--horizon", type=float, help="simulated seconds (default 1200)")
    c.add_argument("--requests", type=int, help="number of arrivals (instead of --horizon)")
    c.add_argument("--seed", type=int, help="random seed (default 0)")
    c.add_argument("--schedulers", help=f"comma-separated names or policy files FILE.py:CLASS (default all: {','.join(SCHEDULERS)})")
    c.add_argument("--out", default="llmqueue_output/compare",
                   help="folder for the plots, summary.json, timeseries.csv and requests.csv (one row per request "
                        "and scheduler)")
    c.add_argument("--batches", action="store_true",
                   help="also record every batch and write batches.csv (one row per batch and scheduler)")
    c.add_argument("--json", action="store_true", help="print the summaries as JSON")
    c.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_overrides(c)
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("simulate", help="one run from a TOML config (or a scenario name)")
    s.add_argument("config")
    add_overrides(s)
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.add_argument("--out", help="write config.toml, summary.json, requests.csv (and batches.csv) here")
    s.set_defaults(func=cmd_simulate)

    k = sub.add_parser("capacity", help="closed-form capacity, λ*, ρ (Theorem 2)")
    k.add_argument("config")
    add_overrides(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_capacity)

    p = sub.add_parser("policies", help="list schedulers, their plans, options and work-conserving claim")
    p.add_argument("files", nargs="*", metavar="FILE.py:CLASS",
                   help="check and describe these policy files instead (docs/policies.md)")
    p.set_defaults(func=cmd_policies)

    sc = sub.add_parser("scenarios", help="list built-in scenarios; 'scenarios show NAME' prints one as TOML")
    sc.add_argument("action", nargs="?", help="show")
    sc.add_argument("name", nargs="?")
    sc.set_defaults(func=cmd_scenarios)
