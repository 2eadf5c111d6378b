"""Cluster commands (docs/cluster.md): ``llmqueue cluster simulate|compare|capacity|plan|scenarios CONFIG``.

A config is a single-engine config with a ``[cluster]`` table (replicas, router), or the name of
a built-in cluster scenario (``llmqueue cluster scenarios``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmqueue.cli.common import Progress, add_overrides, fmt, plot_path, rejected_cell, saved, write_json
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


def _draw_pool(run, top, bottom, points: int, title: str) -> None:
    """A pool's replicas into two axes: backlog (unprocessed tokens) and requests in system over
    time, one line per replica (the figures' one look: plots.line_style, legends off the data)."""
    from llmqueue.metrics import backlog, in_system
    from llmqueue.plots import legend_outside, line_style

    pr = run.result
    t = np.linspace(0.0, pr.horizon_s, points)
    n = len(pr.results)
    for i, (rep, result) in enumerate(zip(run.summary["replicas"], pr.results)):
        label = f"{rep['replica']} ({rep['share']:.0%} of arrivals, {rep['summary']['verdict']})"
        top.plot(t, backlog(result, t), linewidth=1.2, label=label, **line_style(i, n, points))
        bottom.plot(t, in_system(result, t), linewidth=1.2, label=label, **line_style(i, n, points))
    top.set_ylabel("unprocessed tokens at the replica (tokens)")
    bottom.set_ylabel("requests in system")
    top.set_title(f"{title}{n} replicas, router {run.summary['router']}: pool {run.summary['pool']['verdict']}")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    legend_outside(top)


def plot_pool(run, path: Path, points: int = 600) -> Path:
    """Each replica's backlog and requests in system over time (two panels)."""
    from llmqueue.plots import plt, save_figure

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), dpi=120, sharex=True)
    _draw_pool(run, top, bottom, points, "")
    bottom.set_xlabel("simulated time (s)")
    return save_figure(fig, path)


def plot_disagg(run, path: Path, points: int = 600) -> Path:
    """A prefill/decode run: each pool's replicas as :func:`plot_pool` draws them, prefill above
    decode (a decode replica's backlog counts its decode tokens)."""
    from llmqueue.plots import plt, save_figure

    fig, axes = plt.subplots(4, 1, figsize=(10, 13), dpi=120, sharex=True)
    _draw_pool(run.extra["prefill"], axes[0], axes[1], points, "prefill pool: ")
    _draw_pool(run.extra["decode"], axes[2], axes[3], points, "decode pool: ")
    axes[3].set_xlabel("simulated time (s)")
    fig.suptitle(f"prefill/decode disaggregation at {run.summary['arrival_rate']:.4g} requests/s: "
                 f"{run.summary['verdict']} ({run.summary['binding_pool']} pool binds)", fontsize=11)
    return save_figure(fig, path)


def _disaggregated(args: argparse.Namespace):
    """The config's tables and folder, and whether it is a disaggregated one (prefill and decode pools)."""
    from llmqueue.cluster.config import read_cluster_data
    from llmqueue.cluster.disagg import is_disaggregated

    data, base_dir = read_cluster_data(args.config, args.set)
    return data, base_dir, is_disaggregated(data)


def print_disagg(s: dict) -> None:
    rows = []
    for which in ("prefill", "decode"):
        p = s[which]
        rows.append((which, str(p["replicas_count"]), p["router"], p["pool"]["verdict"], p["pool"]["predicted"],
                     fmt(p["capacity"]["rho"], 4), fmt(p["pool"]["backlog_slope_tokens_per_s"], 1),
                     str(p["pool"]["final_in_system"])))
    print(_table(("pool", "replicas", "router", "verdict", "theory", "ρ", "slope tok/s", "in-sys final"), rows))
    print()
    print(f"λ = {s['arrival_rate']:.4g} req/s; λ*_PD = {s['max_stable_rate_rps']:.4g} req/s ({s['binding_pool']} pool "
          f"binds); verdict {s['verdict']}")
    print(f"TTFT mean {fmt(s['ttft_s']['mean'], 3)} s (p99 {fmt(s['ttft_s']['p99'], 3)}), TPOT mean "
          f"{fmt(s['tpot_s']['mean'], 4)} s (p99 {fmt(s['tpot_s']['p99'], 4)}), E2E mean {fmt(s['e2e_s']['mean'], 2)} s "
          f"(p99 {fmt(s['e2e_s']['p99'], 2)}), KV transfer mean {fmt(s['transfer_s']['mean'], 4)} s; "
          f"{s['completed']} of {s['arrived']} requests completed")
    kv = s.get("decode_kv")
    if kv:   # decode replicas with KV memory (docs/cluster.md, "Decode replicas with KV memory")
        print(f"decode KV memory ({kv['replicas']} replicas): {kv['preemptions']} preemptions, "
              f"{kv['recomputed_tokens']} tokens recomputed, {kv['memory_limited_batches']} batches memory-limited; "
              f"block use peak {100 * kv['peak_utilisation']:.0f} %, mean {100 * kv['mean_utilisation']:.0f} %")


def cmd_simulate(args: argparse.Namespace) -> int:
    from llmqueue.cluster import parse_cluster, run_pool

    plot = plot_path(args.plot, "--plot", "pool.png") if args.plot else None
    data, base_dir, disagg = _disaggregated(args)
    if disagg:
        from llmqueue.cluster.disagg import parse_disagg, run_disagg

        run = run_disagg(parse_disagg(data, base_dir))
        s = run.summary
        if plot is not None:
            saved(plot_disagg(run, plot))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "summary.json", s)
        if args.json:
            print(json.dumps(s, default=float))
        else:
            print_disagg(s)
        return 0
    cfg = parse_cluster(data, base_dir)
    progress = Progress(sys.stderr.isatty() and not args.json)
    try:
        run = run_pool(cfg, progress)
    finally:
        progress.done()
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
    from llmqueue.cluster import compare_routers, parse_cluster

    routers = [x.strip() for x in args.routers.split(",") if x.strip()]
    if not routers:
        raise ConfigError("--routers", args.routers, "a comma-separated list of at least one router")
    data, base_dir, disagg = _disaggregated(args)
    if disagg:
        raise ConfigError("config", args.config, "a pool of replicas (compare routers one pool at a time; a "
                                                 "disaggregated config runs with simulate, capacity and plan)")
    from llmqueue.cluster.routers import router_class

    for name in routers:   # each named before any runs
        router_class(name, Path.cwd(), field="--routers")
    cfg = parse_cluster(data, base_dir)
    progress = Progress(sys.stderr.isatty() and not args.json)
    try:
        runs = compare_routers(cfg, routers, progress=progress)
    finally:
        progress.done()
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
    from llmqueue.cluster import parse_cluster, pool_capacity
    from llmqueue.runner import build_workload

    data, base_dir, disagg = _disaggregated(args)
    if disagg:
        return _disagg_capacity(args, data, base_dir)
    cfg = parse_cluster(data, base_dir)
    cap = pool_capacity(cfg, build_workload(cfg.base))
    if args.json:
        print(json.dumps(cap.to_dict(), default=float))
        return 0
    print("\n".join(capacity_lines(cap)))
    return 0


def _disagg_capacity(args, data, base_dir) -> int:
    from llmqueue.cluster.disagg import StageWorkload, parse_disagg
    from llmqueue.runner import build_workload

    cfg = parse_disagg(data, base_dir)
    w = build_workload(cfg.prefill.base)
    from llmqueue.cluster import pool_capacity

    caps = {"prefill": pool_capacity(cfg.prefill, StageWorkload(w.arrival_rate, w.mean_prompt_len, 0.0)),
            "decode": pool_capacity(cfg.decode, StageWorkload(w.arrival_rate, 0.0, w.mean_output_len))}
    rates = {k: c.pooled_capacity_tokens_per_s / (w.mean_prompt_len if k == "prefill" else w.mean_output_len)
             for k, c in caps.items()}
    best = min(rates, key=rates.get)
    if args.json:
        print(json.dumps({"prefill": caps["prefill"].to_dict(), "decode": caps["decode"].to_dict(),
                          "max_stable_rate_rps": rates[best], "binding_pool": best}, default=float))
        return 0
    for k, c in caps.items():
        print(f"{k} pool: {len(c.replicas)} replicas, capacity {c.pooled_capacity_tokens_per_s:,.1f} tokens/s, offered "
              f"{c.offered_tokens_per_s:,.1f} tokens/s (ρ = {c.rho:.4f}); alone it serves {rates[k]:.4g} req/s")
    print(f"λ*_PD = {rates[best]:.4g} req/s ({best} pool binds); λ = {w.arrival_rate:.4g} req/s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from llmqueue.cluster.disagg import parse_disagg, plan

    data, base_dir, disagg = _disaggregated(args)
    if not disagg:
        raise ConfigError("config", args.config, "a disaggregated cluster config ([cluster.prefill] and "
                                                 "[cluster.decode]; e.g. the scenario pd-4-4)")
    cfg = parse_disagg(data, base_dir)
    rows = plan(cfg, args.gpus)
    if args.bisect < 0:
        raise ConfigError("--bisect", args.bisect, "an integer >= 0 (the best splits to check by simulation)")
    for r in rows[:args.bisect]:
        from llmqueue.cluster.disagg import simulated_max_rate

        r["simulated"] = simulated_max_rate(cfg, r["prefill"], r["decode"], r["max_stable_rate_rps"])
    if args.json:
        print(json.dumps({"splits": rows}, default=float))
        return 0
    sim = [(f"{r['simulated']['passing_rps']:.2f}–{r['simulated']['failing_rps']:.2f}" if "simulated" in r else "-")
           for r in rows]
    print(_table(("P:D", "prefill req/s", "decode req/s", "λ*_PD req/s", "binds", "simulated: stable–not (req/s)"),
                 [(f"{r['prefill']}:{r['decode']}", fmt(r["prefill_rate_rps"]), fmt(r["decode_rate_rps"]),
                   fmt(r["max_stable_rate_rps"]), r["binding"], x) for r, x in zip(rows, sim)]))
    b = rows[0]
    print(f"\nbest split of {args.gpus} GPUs: {b['prefill']} prefill : {b['decode']} decode, λ*_PD = "
          f"{b['max_stable_rate_rps']:.4g} req/s (Theorem 2 per pool" + ("; simulated: stable at the first rate of "
          "the last column, not shown stable at the second" if args.bisect else "; --bisect K checks it by simulation")
          + ")")
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
    q = csub.add_parser("plan", help="prefill/decode: the best P:D split of --gpus GPUs (Theorem 2 per pool)")
    q.add_argument("config")
    q.add_argument("--gpus", type=int, required=True)
    q.add_argument("--bisect", type=int, default=0, metavar="K",
                   help="check the K best splits by simulation: bisect λ on the pools' verdict (run.horizon_s, seed)")
    add_overrides(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_plan)
    n = csub.add_parser("scenarios", help="list the built-in cluster scenarios, or print one")
    n.add_argument("name", nargs="?")
    n.set_defaults(func=cmd_scenarios)


__all__ = ["register"]
