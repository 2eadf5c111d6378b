"""Many-run commands: sweep, max-rate, results, plot (docs/sweeps.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path

from llmqueue.cli.common import (
    Bar,
    add_overrides,
    clock,
    config_from,
    fmt,
    interrupted,
    plot_path,
    saved,
)
from llmqueue.errors import LlmqueueError
from llmqueue.sweep import (
    DEFAULT_MAX_RATE_STORE,
    DEFAULT_STORE,
    Store,
    expand,
    make_executor,
    parse_grid,
    parse_slo,
    seed_list,
)
from llmqueue.sweep.driver import SweepStats, sweep
from llmqueue.sweep.grid import MAX_GRID_POINTS, check_grid_size
from llmqueue.sweep.results import (
    by_workload,
    flatten,
    one_workload,
    tidy,
    varying,
    workload_columns,
    workload_name,
    where,
    write_csv,
    write_json,
    write_parquet,
)

EXIT_INTERRUPTED = 130   # SIGINT; SIGTERM gives 143
PLOT_KINDS = ("stability-map", "latency-vs-load", "max-rate-vs-budget")


def _executor(args):
    if args.jobs is not None and args.jobs < 1:
        raise LlmqueueError(f"--jobs = {args.jobs} is not allowed: an integer >= 1")
    return make_executor(args.jobs, args.ray)


def _stored(store: Store) -> str:
    try:
        n = len(store.statuses())
    except sqlite3.Error:
        return f"the runs stored before are in {store.path}"
    return f"{n} run{'s' if n != 1 else ''} {'are' if n != 1 else 'is'} in {store.path}"


def _interrupted(store: Store, exc: BaseException) -> int:
    return interrupted(exc, f"{_stored(store)}; run the same command again to resume")


def _store_failed(store: Store, exc: sqlite3.Error) -> LlmqueueError:
    """A store that cannot be written mid-sweep (a full disk, a locked or read-only file): one line
    naming it; every run committed before stays."""
    return LlmqueueError(f"store {store.path}: {exc}; {_stored(store)}; free the disk or the file and run the "
                         "same command again to resume")


def _max_points(args) -> int:
    if args.max_points < 1:
        raise LlmqueueError(f"--max-points = {args.max_points} is not allowed: an integer >= 1")
    return args.max_points


def cmd_sweep(args: argparse.Namespace) -> int:
    base = config_from(args.config, args.set)
    axes = parse_grid(args.grid)
    seeds = seed_list(args.seeds, base.run.seed)
    points = expand(base, axes, seeds, _max_points(args))  # counts the grid, then validates every point
    configs = len(points) // args.seeds
    if args.dry_run:
        print(f"{len(points)} runs ({configs} configs x {args.seeds} seeds); every point is valid")
        return 0
    executor = _executor(args)
    bar = Bar(sys.stderr.isatty())
    start = time.monotonic()
    executor.connect()  # a bad --ray address fails before the store is created
    with contextlib.closing(executor), Store(args.store) as store:
        try:
            stats = sweep(points, store, executor, retry_failed=args.retry_failed, on_start=bar.begin,
                          on_result=bar.step, on_wait=_waiting)
        except KeyboardInterrupt as exc:
            bar.close()
            return _interrupted(store, exc)
        except sqlite3.Error as exc:
            bar.close()
            raise _store_failed(store, exc) from None
        bar.close()
        print(_report(stats, configs, args.seeds, executor.describe(), time.monotonic() - start, store.path))
        keys = {(p.config_hash, p.seed) for p in points}
        mine = [r for r in store.runs() if (r["config_hash"], r["seed"]) in keys]
        failed = [r for r in mine if r["status"] != "ok"]
    rejecting = [r for r in mine if r["status"] == "ok" and (r["summary"] or {}).get("rejected")]
    if rejecting:
        print(f"warning: {len(rejecting)} of {len(mine)} runs rejected requests (`llmqueue results {args.store}` "
              "shows the rejected column; runs above run.reject_tolerance have the verdict rejects)", file=sys.stderr)
    for run in failed[:5]:
        print(f"  failed: seed {run['seed']} config {run['config_hash']}: {run['error']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} point(s) failed; `llmqueue results {args.store} --where status=failed` lists them, "
              "--retry-failed runs them again", file=sys.stderr)
        return 1
    return 0


def _waiting(leases) -> None:
    """Another process holds points of this sweep (docs/sweeps.md, "Several sweeps on one store")."""
    if not leases:
        return
    owners = sorted({f"pid {lease.pid} on {lease.host}" for lease in leases})
    print(f"waiting for {len(leases)} point(s) that another process is running ({', '.join(owners)})",
          file=sys.stderr)


def _report(stats: SweepStats, configs: int, seeds: int, where: str, seconds: float, path: Path) -> str:
    ran = stats.ok + stats.failed
    elsewhere = f" ({stats.elsewhere} by another process meanwhile)" if stats.elsewhere else ""
    reclaimed = f" ({stats.reclaimed} taken over from a process that died)" if stats.reclaimed else ""
    return (f"sweep: {stats.points} runs ({configs} configs x {seeds} seeds): {stats.skipped} already stored"
            f"{elsewhere}, {stats.ok} ran ok, {stats.failed} failed{reclaimed}, in {clock(seconds)} on "
            f"{where if ran else 'nothing'}; store {path}")


def cmd_max_rate(args: argparse.Namespace) -> int:
    from llmqueue.sweep.maxrate import max_rate

    base = config_from(args.config, args.set)
    axes = parse_grid(args.grid)
    for axis in axes:
        if axis.key in ("workload.rate", "workload.load"):
            raise LlmqueueError(f"--grid {axis.key}: max-rate searches over the arrival rate itself; "
                                "grid over other keys (e.g. engine.scheduler, engine.token_budget)")
    slos = [parse_slo(s) for s in args.slo]
    seeds = seed_list(args.seeds, base.run.seed)
    check_grid_size(axes, len(seeds), _max_points(args))   # searches x seeds: the runs of one probe each
    bases = [(p.overrides, p.config) for p in expand(base, axes, [base.run.seed], _max_points(args))]
    executor = _executor(args)
    bar = Bar(sys.stderr.isatty() and not args.json)
    executor.connect()
    with contextlib.closing(executor), Store(args.store) as store:
        try:
            results = max_rate(bases, seeds, store, executor, slos=slos, rel_tol=args.rel_tol,
                               on_start=bar.begin, on_result=bar.step)
        except KeyboardInterrupt as exc:
            bar.close()
            return _interrupted(store, exc)
        except sqlite3.Error as exc:
            bar.close()
            raise _store_failed(store, exc) from None
        bar.close()
    if args.json:
        print(json.dumps([{"point": dict(r.overrides), "max_rate_rps": r.max_rate_rps,
                           "failed_rate_rps": r.failed_rate_rps, "lambda_star_rps": r.lambda_star_rps,
                           "ratio_to_lambda_star": r.max_rate_rps / r.lambda_star_rps if r.max_rate_rps else None,
                           "memory_bound_rps": r.memory_bound_rps, "bound_rps": r.bound_rps,
                           "ratio_to_bound": r.max_rate_rps / r.bound_rps if r.max_rate_rps else None,
                           "confidence": r.confidence, "notes": list(r.notes),
                           "probes": [p.__dict__ for p in r.probes]} for r in results]))
        return 0
    print(_max_rate_table(results))
    print(f"\nconfidence: {results[0].confidence}")
    for note in dict.fromkeys(n for r in results for n in r.notes):
        print(f"note: {note}")
    print(f"probes stored in {args.store}")
    return 0


def _max_rate_table(results) -> str:
    """One row per search; with KV memory also λ_mem and the ratio to the binding bound."""
    keys = [k for k, _ in results[0].overrides] if results else []
    memory = any(r.memory_bound_rps is not None for r in results)
    head = (*keys, "max stable req/s", "fails at", "λ* (Thm 2)", *(("λ_mem (memory)",) if memory else ()), "ratio",
            "probes", "why it fails there")
    rows = [head]
    for r in results:
        best = "none found" if r.max_rate_rps is None else f"{r.max_rate_rps:.3f}"
        failed = "none found" if r.failed_rate_rps is None else f"{r.failed_rate_rps:.3f}"
        ratio = "-" if r.max_rate_rps is None else f"{r.max_rate_rps / r.bound_rps:.3f}"
        mem = (("-" if r.memory_bound_rps is None else f"{r.memory_bound_rps:.3f}",) if memory else ())
        why = next((p.reason.split("; ")[0] for p in r.probes if p.rate_rps == r.failed_rate_rps), "-")
        rows.append((*(str(v) for _, v in r.overrides), best, failed, f"{r.lambda_star_rps:.3f}", *mem, ratio,
                     str(len(r.probes)), why))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < len(keys) or i == len(head) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if memory:
        lines.append("ratio: max stable rate / min(λ*, λ_mem), the closed form's binding bound (both necessary)")
    return "\n".join(lines)


@contextlib.contextmanager
def _reading(path: str):
    """A store that fails while being read (e.g. locked by a writer for too long): one line naming it."""
    try:
        yield
    except sqlite3.Error as exc:
        raise LlmqueueError(f"store {path}: {exc}") from None


def _rows(args) -> list[dict]:
    with _reading(args.store), Store(args.store, readonly=True) as store:
        return where(tidy(store.runs()), args.where)


def cmd_results(args: argparse.Namespace) -> int:
    if args.max_rate:
        with _reading(args.store), Store(args.store, readonly=True) as store:
            rows = store.max_rates()
        flat = [{**_flat_config(r["config"]), "seeds": json.dumps(r["seeds"]),
                 "slos": json.dumps(r["slos"]), "rel_tol": r["rel_tol"], "max_rate_rps": r["max_rate_rps"],
                 "failed_rate_rps": r["failed_rate_rps"], "lambda_star_rps": r["lambda_star_rps"],
                 "version": r["version"], "finished_at": r["finished_at"]} for r in rows]
        rows = where(flat, args.where)
    else:
        rows = _rows(args)
    if args.csv:
        write_csv(rows, args.csv)
    elif args.json_out:
        write_json(rows, args.json_out)
    elif args.parquet:
        write_parquet(rows, args.parquet)
    else:
        groups = by_workload(rows)
        if len(groups) <= 1:
            print(_results_table(rows, args.max_rate))
        else:   # one table per workload, each headed by what sets it apart
            print(f"{len(rows)} rows of {len(groups)} workloads (they differ in {', '.join(workload_columns(rows))}); "
                  "--where picks one")
            for i, (key, part) in enumerate(groups.items(), 1):
                print(f"\nworkload {i} of {len(groups)}: {workload_name(key)}")
                print(_results_table(part, args.max_rate))
        return 0
    target = args.csv or args.json_out or args.parquet
    if target != "-":
        print(f"wrote {len(rows)} rows to {target}", file=sys.stderr)
    return 0


def _flat_config(config: dict) -> dict:
    flat = flatten(config)
    flat.pop("run.seed", None)
    return flat


def _results_table(rows: list[dict], max_rate: bool) -> str:
    if not rows:
        return "no rows"
    keys = varying(rows)
    rows = sorted(rows, key=lambda r: [_order(r.get(k)) for k in (*keys, "seed")])
    tail = (("max_rate_rps", "failed_rate_rps", "lambda_star_rps") if max_rate else
            ("seed", "status", "verdict", "rho", "throughput_rps", "rejected", "rejected_share", "ttft_s.p99",
             "e2e_s.p99"))
    cols = [*keys, *tail]
    cells = [cols] + [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n{len(rows)} rows"


def _order(v) -> tuple:
    """Numbers by value, then text: rows of a grid in grid order whatever the types."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    return (1, 0, "" if v is None else str(v))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt(v, 3)
    return str(v)


def cmd_plot(args: argparse.Namespace) -> int:
    from llmqueue import plots

    out = plot_path(args.out, "--out", f"{args.kind}.png", f"llmqueue_output/{args.kind}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in _rows(args) if r["status"] == "ok"]
    if args.kind == "max-rate-vs-budget":
        with _reading(args.store), Store(args.store, readonly=True) as store:
            searches = store.max_rates()
        if searches:   # the searches' own configs, filtered and checked as the runs are
            flat = where([{**_flat_config(s["config"]), "_search": s} for s in searches], args.where)
            one_workload(flat, args.store, "max-rate-vs-budget plot")
            searches = [r["_search"] for r in flat]
        else:
            one_workload(rows, args.store, "max-rate-vs-budget plot")
        if not searches and not rows:
            raise LlmqueueError(f"store {args.store}: no max-rate searches and no successful runs to plot")
        path = plots.plot_max_rate_vs_budget(searches, rows, out)
    elif not rows:
        raise LlmqueueError(f"store {args.store}: no successful runs to plot" + (" (after --where)" if args.where else ""))
    else:
        one_workload(rows, args.store, f"{args.kind} plot")
        draw = plots.plot_stability_map if args.kind == "stability-map" else plots.plot_latency_vs_load
        path = draw(rows, out)
    print(f"wrote {saved(path)}")
    return 0


def _add_executor(p, store: str = DEFAULT_STORE) -> None:
    p.add_argument("--jobs", type=int, help="local worker processes (default: one per core); with --ray local, "
                   "the CPUs of the private Ray instance")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray: auto (the cluster on this machine), local "
                   "(start a private instance), or HOST:PORT / ray://HOST:10001; needs the extra llmqueue[ray]")
    p.add_argument("--store", default=store, help=f"SQLite results store (default {store})")


def _add_max_points(p) -> None:
    p.add_argument("--max-points", type=int, default=MAX_GRID_POINTS, metavar="N",
                   help=f"refuse grids of more than N runs, points x seeds (default {MAX_GRID_POINTS:,}); "
                        "counted before any point is built")


def register(sub) -> None:
    s = sub.add_parser("sweep", help="run a grid of configs x seeds into a resumable SQLite store")
    s.add_argument("config", help="TOML config or scenario name: the base of every point")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                   help="an axis: KEY=v1,v2,... or KEY=start:stop:step (stop included); repeatable")
    s.add_argument("--seeds", type=int, default=1, help="seeds per point, from the config's run.seed (default 1)")
    _add_executor(s)
    s.add_argument("--retry-failed", action="store_true", help="run stored failed points again")
    s.add_argument("--dry-run", action="store_true", help="validate the grid and print its size, run nothing")
    _add_max_points(s)
    add_overrides(s)
    s.set_defaults(func=cmd_sweep)

    m = sub.add_parser("max-rate", help="largest stable arrival rate by bisection, next to Theorem 2's λ*")
    m.add_argument("config", help="TOML config or scenario name")
    m.add_argument("--slo", action="append", default=[], metavar="NAME=SECONDS",
                   help="also require e.g. ttft_p99=2.0 or tbt_p99=0.2 in every seed (repeatable)")
    m.add_argument("--seeds", type=int, default=3, help="seeds per probed rate (default 3)")
    m.add_argument("--rel-tol", type=float, default=0.01, help="stop when the bracket is this narrow (default 0.01)")
    m.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                   help="one search per point, e.g. engine.scheduler=orca,sarathi (repeatable)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_max_points(m)
    _add_executor(m, DEFAULT_MAX_RATE_STORE)
    add_overrides(m)
    m.set_defaults(func=cmd_max_rate)

    r = sub.add_parser("results", help="tidy table of a store: one row per run")
    r.add_argument("store", help="the SQLite store written by sweep or max-rate")
    r.add_argument("--where", action="append", default=[], metavar="COLUMN OP VALUE",
                   help="keep rows with e.g. engine.scheduler=orca, workload.rate>=10, status=failed (repeatable)")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="OUT", help="write every column as CSV (- for standard output)")
    out.add_argument("--json", dest="json_out", metavar="OUT",
                     help="write every row as a JSON list of objects (- for standard output)")
    out.add_argument("--parquet", metavar="OUT", help="write every column as Parquet (the parquet extra: pyarrow)")
    r.add_argument("--max-rate", action="store_true", help="the max-rate searches instead of the runs")
    r.set_defaults(func=cmd_results)

    p = sub.add_parser("plot", help="standard plots of a store")
    p.add_argument("store", help="the SQLite store written by sweep or max-rate")
    p.add_argument("--kind", required=True, choices=PLOT_KINDS)
    p.add_argument("--out", help="a .png, .pdf or .svg file, or a folder for KIND.png (default "
                   "llmqueue_output/KIND.png)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN OP VALUE", help="filter runs first")
    p.set_defaults(func=cmd_plot)
