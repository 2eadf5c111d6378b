"""Cluster commands (docs/cluster.md): ``llmqueue cluster simulate|compare|capacity|scenarios CONFIG``.

A config is a single-engine config with a ``[cluster]`` table (replicas, router), or the name of
a built-in cluster scenario (``llmqueue cluster scenarios``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmqueue.cli.common import add_overrides, fmt, plot_path, rejected_cell, saved, write_json
from llmqueue.errors import ConfigError

DEFAULT_COMPARE = "round-robin,random,jsq,least-tokens,power-of-d"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def capacity_lines(cap) -> list[str]:
    rows = []
    for k, name in enumerate(cap.replicas):
        rows.append((name, fmt(cap.capacity_tokens_per_s[k], 1),
                     "-" if cap.shares is None else f"{cap.shares[k]:.1%}",
                     "-" if cap.replica_rho is None else f"{cap.replica_rho[k]:.4f}"))
    lines = [_table(("replica", "capacity tok/s", "share", "ρ"), rows), "",
             f"pooled capacity {cap.pooled_capacity_tokens_per_s:,.1f} tokens/s; λ = {cap.arrival_rate:.4g} req/s, "
             f"offered {cap.offered_tokens_per_s:,.1f} tokens/s, pooled ρ = {cap.rho:.4f}; pooled λ* = "
             f"{cap.max_stable_rate_rps:.4g} req/s"]
    if cap.binding is not None:
        lines.append(f"router {cap.router}: replica {cap.binding} binds; largest stable rate under this routing "
                     f"{cap.max_stable_rate_router_rps:.4g} req/s")
    lines.append(f"prediction ({cap.router}): {cap.predicted}: {cap.reason}")
    return lines


def pool_rows(runs) -> list[tuple[str, ...]]:
    rows = []
    for run in runs:
        p = run.summary["pool"]
        rows.append((run.summary["router"], p["verdict"], p["predicted"], fmt(p["backlog_slope_tokens_per_s"], 1),
                     fmt(p["ttft_s"]["mean"], 3), fmt(p["ttft_s"]["p99"], 3), fmt(p["e2e_s"]["mean"], 2),
                     fmt(p["e2e_s"]["p99"], 2), str(p["final_in_system"]), rejected_cell(p["rejected"], p["arrived"]),
                     fmt(p["wall_s"], 2)))
    return rows


POOL_HEAD = ("router", "verdict", "theory", "slope tok/s", "TTFT mean (s)", "TTFT p99 (s)", "E2E mean (s)",
             "E2E p99 (s)", "in-sys final", "rejected", "wall s")


def plot_pool(run, path: Path, points: int = 600) -> Path:
    """Two panels: each replica's backlog (unprocessed tokens) over time, and its requests in
    system, one line per replica (the figures' one look: plots.line_style, legends off the data)."""
    from llmqueue.metrics import backlog, in_system
    from llmqueue.plots import legend_outside, line_style, plt, save_figure

    pr = run.result
    t = np.linspace(0.0, pr.horizon_s, points)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), dpi=120, sharex=True)
    n = len(pr.results)
    for i, (rep, result) in enumerate(zip(run.summary["replicas"], pr.results)):
        label = f"{rep['replica']} ({rep['share']:.0%} of arrivals, {rep['summary']['verdict']})"
        top.plot(t, backlog(result, t), linewidth=1.2, label=label, **line_style(i, n, points))
        bottom.plot(t, in_system(result, t), linewidth=1.2, label=label, **line_style(i, n, points))
    top.set_ylabel("backlog (unprocessed tokens)")
    bottom.set_ylabel("requests in system")
    bottom.set_xlabel("simulated time (s)")
    top.set_title(f"{n} replicas, router {run.summary['router']}: pool {run.summary['pool']['verdict']}")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    legend_outside(top)
    return save_figure(fig, path)


def cmd_simulate(args: argparse.Namespace) -> int:
    from llmqueue.cluster import load_cluster, run_pool

    plot = plot_path(args.plot, "--plot", "pool.png") if args.plot else None
    cfg = load_cluster(args.config, args.set)
    run = run_pool(cfg)
    if plot is not None:
        saved(plot_pool(run, plot))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", run.summary)
    if args.json:
        print(json.dumps(run.summary, default=float))
        return 0
    print(f"{cfg.size} replicas, router {cfg.router}, horizon {run.summary['horizon_s']:g} s, seed {cfg.base.run.seed}"
          + (f", report delay {cfg.report_delay_s:g} s" if cfg.report_delay_s else "") + "\n")
    print(_table(POOL_HEAD, pool_rows([run])))
    print()
    rows = [(r["replica"], r["scheduler"], f"{r['share']:.1%}", r["summary"]["verdict"], r["summary"]["predicted"],
             fmt(r["summary"]["rho"], 4), fmt(r["summary"]["ttft_s"]["mean"], 3), fmt(r["summary"]["e2e_s"]["mean"], 2),
             str(r["summary"]["final_in_system"])) for r in run.summary["replicas"]]
    print(_table(("replica", "scheduler", "share", "verdict", "theory", "ρ", "TTFT mean (s)", "E2E mean (s)",
                  "in-sys final"), rows))
    print()
    print(f"pool verdict: {run.summary['pool']['verdict']}: {run.summary['pool']['verdict_reason']}")
    print(f"prediction: {run.capacity.predicted}: {run.capacity.reason}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from llmqueue.cluster import compare_routers, load_cluster

    routers = [x.strip() for x in args.routers.split(",") if x.strip()]
    if not routers:
        raise ConfigError("--routers", args.routers, "a comma-separated list of at least one router")
    cfg = load_cluster(args.config, args.set)
    runs = compare_routers(cfg, routers)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", {"runs": [r.summary for r in runs]})
    if args.json:
        print(json.dumps({"runs": [r.summary for r in runs]}, default=float))
        return 0
    print(f"{cfg.size} replicas, horizon {runs[0].summary['horizon_s']:g} s, seed {cfg.base.run.seed}, "
          f"{runs[0].summary['pool']['arrived']} arrivals (the same for every router)\n")
    print(_table(POOL_HEAD, pool_rows(runs)))
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from llmqueue.cluster import load_cluster, pool_capacity
    from llmqueue.runner import build_workload

    cfg = load_cluster(args.config, args.set)
    cap = pool_capacity(cfg, build_workload(cfg.base))
    if args.json:
        print(json.dumps(cap.to_dict(), default=float))
        return 0
    print("\n".join(capacity_lines(cap)))
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    from llmqueue.cluster.scenarios import CLUSTER_SCENARIOS, scenario_text

    if args.name:
        sys.stdout.write(scenario_text(args.name))
        return 0
    width = max(len(n) for n in CLUSTER_SCENARIOS)
    for name, (about, _) in CLUSTER_SCENARIOS.items():
        print(f"{name.ljust(width)}  {about}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("cluster", help="replica pools behind a router: simulate, compare routers, pool capacity")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    s = csub.add_parser("simulate", help="simulate a cluster config (or scenario: pool-jsq, pool-heterogeneous, ...)")
    s.add_argument("config")
    add_overrides(s)
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.add_argument("--out", help="write summary.json here")
    s.add_argument("--plot", help="draw each replica's backlog and requests in system into this .png (or folder)")
    s.set_defaults(func=cmd_simulate)
    c = csub.add_parser("compare", help="the same requests under each router (common random numbers)")
    c.add_argument("config")
    c.add_argument("--routers", default=DEFAULT_COMPARE, help=f"comma-separated (default {DEFAULT_COMPARE})")
    add_overrides(c)
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", help="write summary.json here")
    c.set_defaults(func=cmd_compare)
    k = csub.add_parser("capacity", help="pooled Theorem 2 capacity, the binding replica, the router's prediction")
    k.add_argument("config")
    add_overrides(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_capacity)
    n = csub.add_parser("scenarios", help="list the built-in cluster scenarios, or print one")
    n.add_argument("name", nargs="?")
    n.set_defaults(func=cmd_scenarios)


__all__ = ["register"]
