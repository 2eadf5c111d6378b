"""Network commands (arXiv 2504.07347 §5): ``llmqueue network simulate|capacity|advise|compare CONFIG``.

``llmqueue simulate`` and ``llmqueue capacity`` hand a network config (one with
``[[engines]]``) to these commands, so either spelling works.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmqueue.cli.common import (
    Progress,
    add_overrides,
    fmt,
    interrupted,
    kept_files,
    rejected_cell,
    write_columns_csv,
    write_json,
)
from llmqueue.errors import ConfigError
from llmqueue.network import (
    POLICIES,
    analyze_network,
    engine_memory,
    engine_prefix,
    prefix_scaling,
    compare_policies,
    is_network_source,
    load_network,
    network_timeseries,
    simulate_network,
    summarize_network,
)

__all__ = ["cmd_advise", "cmd_capacity", "cmd_compare", "cmd_simulate", "is_network_source", "register"]


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def capacity_table(a) -> str:
    rows = [(name, fmt(c, 1), fmt(o, 1), fmt(r, 4)) for name, c, o, r in
            zip(a.engines, a.capacity_tokens_per_s, a.offered_tokens_per_s, a.rho)]
    return _table(("engine", "capacity tok/s", "offered tok/s", "ρ"), rows)


def analysis_lines(net, a, st=None) -> list[str]:
    """The traffic equations and the prediction under the configured policies (``st``: a
    :class:`~llmqueue.network.stability.Stability`; computed here, without the scaling, when not given)."""
    from llmqueue.network.stability import stability

    st = stability(net, a, scaling=False) if st is None else st
    rates = ", ".join(f"{c.name} {r:.4g}" for c, r in zip(net.classes, a.rates))
    lines = [f"classes (jobs/s): {rates}" + (f"  (scaled so max ρ = {net.load:g})" if net.load else ""),
             (f"bottleneck {a.bottleneck} at ρ = {a.max_rho:.4f}; traffic equations bound the scaling of all rates "
              f"by {a.max_scaling:.4f} (necessary)"),
             (f"routing {'cyclic (a job returns to an engine it left)' if a.cyclic else 'acyclic between engines'}; "
              f"prediction: {st.predicted}")]
    for v in st.virtual_stations:
        lines.append(f"virtual station {{{v['visits'][0]} at {v['engines'][0]}, {v['visits'][1]} at "
                     f"{v['engines'][1]}}}: load {v['terms'][0]:.4f} + {v['terms'][1]:.4f} = {v['load']:.4f}")
    fl = st.fluid
    if fl is not None:
        worst = (f"grows from the backlog at {fl['start']}" + (f", ×{fl['growth_factor']:.4g} per half-cycle "
                 f"(peak to next peak)" if fl["growth_factor"] else "") if fl["outcome"] == "grows" else
                 f"drains from each of {len(fl['starts'])} standard initial backlogs (slowest: {fl['start']}, "
                 f"{fl['drain_time_per_token_s']:.4g} s per token of initial backlog)" if fl["outcome"] == "drains"
                 else f"undecided after {fl['events']} events ({fl['start']})")
        lines.append(f"fluid model (exact, event by event): {worst}")
    if st.max_scaling is not None and st.scaling_source:
        lines.append(f"largest stable scaling of all rates under the configured policies α* = {st.max_scaling:.4f} "
                     f"({st.scaling_source})")
    return lines


def pool_lines(a) -> list[str]:
    """``network capacity``'s pools: each replica's Theorem 2 capacity and, under a static router, its share of
    the pool's visits and ρ there (docs/network.md, "Pools as engines"; docs/cluster.md)."""
    lines = []
    for p in a.pools:
        if p is None:
            continue
        rows = [(f"{p.engine}.{name}", fmt(c, 1), "-" if p.shares is None else f"{p.shares[r]:.1%}",
                 "-" if p.replica_rho is None else fmt(p.replica_rho[r], 4))
                for r, (name, c) in enumerate(zip(p.replicas, p.capacity_tokens_per_s))]
        lines += ["", f"pool {p.engine}: {len(p.replicas)} replicas, router {p.router} ({p.kind}); pooled capacity "
                      f"{p.pooled_capacity_tokens_per_s:,.1f} tokens/s",
                  _table(("replica", "capacity tok/s", "share", "ρ"), rows), p.reason]
    return lines


def memory_lines(net, a, memory: list) -> list[str]:
    """``network capacity``'s KV-cache section: per engine with kv_blocks, the memory bounds of its
    visits (docs/network.md, "KV-cache memory"), each number with where it comes from."""
    rows, notes = [], []
    for m in memory:
        if m is None:
            continue
        wb = f"{m['work_blocks']:.1f}" + (" exact" if m["work_blocks_exact"] else
                                           f" ±{m['work_blocks_se']:.2g} est." if m["work_blocks_se"] is not None
                                           else " (tail)")
        rows.append((m["engine"], f"{m['kv_blocks']}x{m['block_size']} {m['kv_policy']}", fmt(m["visit_rate"], 3),
                     fmt(m["mean_visit_tokens"], 1), f"{m['work_tokens']:.0f} exact", wb,
                     fmt(m["memory_necessary_blocks_visits_per_s"], 3), fmt(m["memory_rho"], 3),
                     fmt(m["memory_scaling"], 4), fmt(m["token_scaling"], 4), m["binding"]))
        suff = m["memory_sufficient_isolated_visits_per_s"]
        notes.append(f"{m['engine']}: sufficient (isolated engine, Nie, Si & Zhou arXiv 2605.04595): "
                     + (f"{suff:.4f} visits/s (δ_B = {m['delta_blocks']:.4g}); no guarantee inside a network"
                        if suff is not None else m["sufficient_reason"]))
        notes.extend(f"{m['engine']}: {n}" for n in m["notes"])
    lines = ["", "KV-cache memory per engine (per visit; docs/network.md, \"KV-cache memory\")",
             _table(("engine", "cache", "visits/s", "E[l+o]", "E[w] tok-it", "E[w_B] blk-it", "λ_mem visits/s",
                     "memory ρ", "α_mem", "α tokens", "binding"), rows)]
    scale = [m["memory_scaling"] for m in memory if m is not None]
    if scale:
        lines.append(f"memory allows scaling all rates by at most α_mem = {min(scale):.4f} (necessary; tokens: α* = "
                     f"{a.max_scaling:.4f})")
    lines += [
        "visits/s, E[l+o]: traffic equations; E[w] = E[l]·E[o] + (E[o]+E[o²])/2 token-iterations per visit, exact "
        "(reserve: E[l]·E[o] + E[o²]);",
        "E[w_B] = E[Σ_j ceil((l+j)/B)] block-iterations: exact from the length laws where prompts do not grow, "
        "estimated (± standard error) where they do;",
        "λ_mem: Dong & Cao's necessary bound (arXiv 2604.11001) λ·E[w_B]·t̄ ≤ kv_blocks − 1 with t̄ at throughput "
        "balance (docs/memory.md); memory ρ = λ·E[w_B]·t̄/(kv_blocks − 1) at the configured rates (> 1: unstable);",
        "α_mem = λ_mem / visits/s, α tokens = Theorem 2's per-engine bound (arXiv 2504.07347 §3.2) / visits/s",
    ]
    lines.extend(f"note: {n}" for n in notes)
    return lines


def prefix_lines(net, a, prefix: list) -> list[str]:
    """``network capacity``'s prefix-caching section: per engine with prefix_caching, the token load
    without caching and with every context block cached (a necessary bound), with the sources."""
    rows = [(p["engine"], fmt(p["capacity_tokens_per_s"], 1), fmt(p["offered_tokens_per_s"], 1),
             fmt(p["context_tokens_per_s"], 1), fmt(p["min_offered_tokens_per_s"], 1), fmt(p["rho"], 4),
             fmt(p["rho_min"], 4), fmt(p["token_scaling"], 4), fmt(p["prefix_scaling"], 4))
            for p in prefix if p is not None]
    lines = ["", "Prefix caching per engine (docs/network.md, \"Prefix caching in networks\")",
             _table(("engine", "capacity tok/s", "offered tok/s", "context tok/s", "all cached tok/s", "ρ",
                     "ρ all cached", "α tokens", "α all cached"), rows),
             (f"with every context block cached all rates scale by at most {prefix_scaling(a, prefix):.4f} "
              f"(necessary: above it unstable; without caching α* = {a.max_scaling:.4f}); below it the simulator "
              "decides (the context must still be cached when the next visit comes)"),
             "offered, context: traffic equations (exact); all cached = offered − context: a visit can hit at most "
             "its context (its own tokens are unique to it), so the engine computes at least this;",
             "capacity: Theorem 2 (arXiv 2504.07347 §3.2) b_max/t_{b_max}; α = capacity / load; only full blocks are "
             "cached, so a visit hits up to B − 1 tokens less than its context",
             "note: KV-memory bounds are left out at engines with prefix caching (a cached prefix needs no "
             "iterations and shared blocks are held once, so Dong & Cao's bound is not necessary there)"]
    return lines


def cmd_capacity(args: argparse.Namespace) -> int:
    from llmqueue.network.stability import stability

    net = load_network(args.config, args.set)
    a = analyze_network(net)
    st = stability(net, a)
    memory = engine_memory(net, a) if any(e.kv is not None for e in net.engines) else None
    prefix = engine_prefix(net, a) if any(e.prefix_caching for e in net.engines) else None
    if args.json:
        base = {**a.to_dict(), "predicted": st.predicted, "max_scaling": st.max_scaling,
                "traffic_max_scaling": st.traffic_max_scaling, "stability": st.to_dict()}
        out = base if memory is None else {**base, "memory": memory}
        if prefix is not None:
            out["prefix"] = prefix
            out["prefix_scaling"] = prefix_scaling(a, prefix)
        print(json.dumps(out))
        return 0
    print(capacity_table(a))
    for line in analysis_lines(net, a, st):
        print(line)
    for line in pool_lines(a):
        print(line)
    if memory is not None and any(m is not None for m in memory):
        for line in memory_lines(net, a, memory):
            print(line)
    if prefix is not None:
        for line in prefix_lines(net, a, prefix):
            print(line)
    return 0


def network_rejection_warnings(s: dict) -> list[str]:
    """One line per engine that rejected visits (their jobs are counted, never finish), with the
    causes and the options that fix them."""
    where = f"{s['policy']}: " if "policy" in s else ""
    return [f"warning: {where}engine {e['engine']}: {e['rejected']} of {e['arrived']} visits rejected: "
            + "; ".join(e.get("rejected_causes") or ["never servable"]) for e in s["engines"] if e.get("rejected")]


def summary_tables(s: dict) -> str:
    engines = [(e["engine"], e["policy"], e["scheduler"], fmt(e["rho"], 3), fmt(e["busy_fraction"], 3),
                fmt(e["token_throughput"], 0), fmt(e["backlog_slope_tokens_per_s"], 1), e["verdict"],
                str(e["peak_backlog_tokens"]), fmt(e["mean_prefill_tokens"], 1), fmt(e["mean_decode_tokens"], 1),
                fmt(e["ttft_s"]["p50"], 3), fmt(e["ttft_s"]["p99"], 3), str(e["work_conserving_violations"]),
                rejected_cell(e["rejected"], e["arrived"]))
               for e in s["engines"]]
    classes = [(c["class"], fmt(c["rate_jps"], 3), str(c["arrived"]), str(c["completed"]),
                rejected_cell(c["rejected"], c["arrived"]),
                fmt(c["throughput_jps"], 3), fmt(c["e2e_s"]["p50"], 2), fmt(c["e2e_s"]["p99"], 2),
                f"{fmt(c['tokens_per_job'], 1)} ({c['expected_tokens_per_job']:.1f})") for c in s["classes"]]
    hops = [(f"{c['class']}.{h['hop']}", h["engine"], str(h["visits"]), fmt(h["ttft_s"]["p50"], 3),
             fmt(h["ttft_s"]["p99"], 3), fmt(h["hop_latency_s"]["p50"], 2)) for c in s["classes"] for h in c["hops"]]
    tables = [
        _table(("engine", "policy", "scheduler", "ρ", "busy", "tok/s", "slope tok/s", "verdict", "peak backlog",
                "prefill/batch", "decode/batch", "TTFT p50 (s)", "TTFT p99 (s)", "violations", "rejected"), engines),
        _table(("class", "jobs/s", "arrived", "completed", "rejected", "done/s", "E2E p50 (s)", "E2E p99 (s)",
                "tokens/job (expected)"), classes),
        _table(("hop", "engine", "visits", "TTFT p50 (s)", "TTFT p99 (s)", "hop p50 (s)"), hops),
    ]
    pools = pool_table(s)
    if pools is not None:
        tables.append(pools)
    return "\n\n".join(tables)


def pool_table(s: dict) -> str | None:
    """Each replica of each pool node (docs/network.md, "Pools as engines"): its share of the pool's
    visits (and the static router's predicted share), ρ at the rate it received, its verdict and latencies."""
    rows = []
    for e in s["engines"]:
        for r in e.get("replicas", ()):
            x = r["summary"]
            rows.append((f"{e['engine']}.{r['replica']}", e["router"], x["scheduler"], f"{r['share']:.3f}",
                         "-" if r["predicted_share"] is None else f"{r['predicted_share']:.3f}", fmt(x["rho"], 3),
                         fmt(x["token_throughput"], 0), fmt(x["backlog_slope_tokens_per_s"], 1), x["verdict"],
                         fmt(x["ttft_s"]["p50"], 3), fmt(x["ttft_s"]["p99"], 3), fmt(x["e2e_s"]["p50"], 2),
                         rejected_cell(x["rejected"], x["arrived"])))
    if not rows:
        return None
    return _table(("replica", "router", "scheduler", "share", "predicted", "ρ", "tok/s", "slope tok/s", "verdict",
                   "TTFT p50 (s)", "TTFT p99 (s)", "visit p50 (s)", "rejected"), rows)


def kv_table(s: dict) -> str | None:
    """What KV memory did at each engine with kv_blocks (None: no engine has): the single-engine
    ``kv`` summary of its visits (docs/memory.md)."""
    rows = []
    for e in s["engines"]:
        kv = e.get("kv")
        if kv is None:
            continue
        rows.append((e["engine"], f"{kv['kv_blocks']}x{kv['block_size']} {kv['kv_policy']}",
                     f"{kv['mean_blocks']:.1f} / {kv['peak_blocks']}",
                     f"{kv['mean_utilisation']:.3f} / {kv['peak_utilisation']:.3f}",
                     f"{kv['preemptions']} ({kv['preempted_requests']})",
                     f"{kv['recomputed_tokens']} ({kv['recompute_share']:.3f})", str(kv["memory_limited_batches"]),
                     str(kv["rejected_larger_than_cache"])))
    if not rows:
        return None
    return _table(("engine", "KV cache", "blocks mean/peak", "use mean/peak", "preemptions (visits)",
                   "recomputed tok (share)", "memory-limited batches", "rejected > cache"), rows)


def prefix_table(s: dict) -> str | None:
    """What prefix caching did at each engine with prefix_caching (None: no engine has): the
    ``prefix_caching`` part of its ``kv`` summary (docs/prefix_caching.md)."""
    rows = []
    for e in s["engines"]:
        p = e.get("kv", {}).get("prefix_caching")
        if p is None:
            continue
        rows.append((e["engine"], str(p["queries"]), str(p["hits"]), f"{p['hit_rate']:.3f}",
                     f"{p['saved_prefill_tokens']} ({p['saved_share']:.3f})", f"{p['mean_hit_tokens']:.1f}",
                     str(p["evictions"]), f"{p['cached_blocks']} ({p['cached_free_blocks']} free)"))
    if not rows:
        return None
    return _table(("engine", "queried tok", "hit tok", "hit rate", "saved prefill tok (share)", "hit/visit",
                   "evictions", "cached blocks at end"), rows)


def cmd_simulate(args: argparse.Namespace) -> int:
    plot = _plot_target(args)
    net = load_network(args.config, args.set)
    progress = Progress(sys.stderr.isatty() and not args.json)
    try:
        result = simulate_network(net, progress=lambda now: progress("network", min(now / net.horizon_s, 1.0)))
    except KeyboardInterrupt as exc:
        progress.done()
        return interrupted(exc, "the run did not finish: nothing written")
    finally:
        progress.done()
    s = summarize_network(result)
    if plot:
        from llmqueue.plots import plot_network_fluid

        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_network_fluid(result, plot)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", net.data)
        write_json(out / "summary.json", s)
        write_columns_csv(out / "timeseries.csv", network_timeseries(result))
        blank = lambda a: ["" if np.isnan(x) else x for x in a.tolist()]
        names = np.array([e.name for e in net.engines])
        write_columns_csv(out / "requests.csv", {
            "rid": np.arange(len(result.arrival_time)), "job": result.sub_job,
            "class": [net.classes[k].name for k in result.sub_class.tolist()],
            "hop": [net.classes[k].hops[h].id for k, h in zip(result.sub_class.tolist(), result.sub_hop.tolist())],
            "engine": names[result.sub_engine] if len(names) else [], "arrival_time": result.arrival_time,
            "num_prompt_tokens": result.num_prompt_tokens, "num_output_tokens": result.num_output_tokens,
            "first_token_time": blank(result.first_token_time), "finish_time": blank(result.finish_time),
            "rejected": result.rejected.astype(int),
            **({} if result.replica_of is None else {"replica": _replica_names(net, result)})})
    if args.json:
        print(json.dumps(s, default=float))
        return 0
    n = s["network"]
    for line in analysis_lines(net, result.analysis):
        print(line)
    print(f"horizon {s['horizon_s']:g} s, seed {s['seed']}, {n['jobs_arrived']} jobs arrived, "
          f"{n['jobs_completed']} completed")
    print(f"network: {n['verdict']}  {n['verdict_reason']}; peak backlog {n['peak_backlog_tokens']} tokens\n")
    for line in network_rejection_warnings(s):
        print(line, file=sys.stderr)
    print(summary_tables(s))
    kv = kv_table(s)
    if kv is not None:
        print("\nKV-cache memory (reference loop; docs/network.md)\n" + kv)
    pre = prefix_table(s)
    if pre is not None:
        print("\nPrefix caching (first admissions; tokens found cached are no backlog; docs/prefix_caching.md)\n"
              + pre)
    if args.out:
        print(f"\nwrote {args.out}/config.json, summary.json, timeseries.csv, requests.csv")
    if plot:
        print(f"wrote {plot}")
    return 0


def _replica_names(net, result) -> list[str]:
    """Each visit's replica label (a pool's ``r0``, ``r1``, ...; empty at an engine that is no pool)."""
    label = {p: ("" if net.engines[j].pool is None else net.engines[j].pool.labels[r])
             for j, phys in enumerate(result.replica_of) for r, p in enumerate(phys)}
    return [label[p] for p in result.sub_phys.tolist()]


def _plot_target(args: argparse.Namespace) -> Path | None:
    """``--plot FILE.png``: checked before the run (its folder must exist or be creatable)."""
    plot = getattr(args, "plot", None)
    if not plot:
        return None
    path = Path(plot)
    if path.suffix.lower() != ".png":
        raise ConfigError("--plot", plot, "a file name ending in .png")
    if path.exists() and path.is_dir():
        raise ConfigError("--plot", plot, "a file name ending in .png, not a folder")
    return path


def cmd_advise(args: argparse.Namespace) -> int:
    from llmqueue.network.stability import advise, advised_overrides

    net = load_network(args.config, args.set)
    a = analyze_network(net)
    adv = advise(net, a)
    best = adv["recommended"]
    adv["recommended_set"] = advised_overrides(net, best) if best else None
    if args.json:
        print(json.dumps(adv, default=float))
        return 0
    print(f"max ρ = {a.max_rho:.4f} at {a.bottleneck}; traffic equations bound the scaling of all rates by "
          f"{a.max_scaling:.4f} (necessary, any policy)")
    print(f"{adv['searched_orders']} per-engine priority order combinations searched; {adv['note']}\n")
    rows = [(r["kind"], r["policies"], r["verdict"], "-" if r["max_scaling"] is None else f"{r['max_scaling']:.4f}",
             "-" if r["virtual_station_load"] is None else f"{r['virtual_station_load']:.4f}")
            for r in adv["candidates"]]
    print(_table(("candidate", "per-engine policy", "prediction", "α* (stable scaling)", "virtual station"), rows))
    mp = next(r for r in adv["candidates"] if r["kind"] == "max-pressure")
    print(f"\nmax-pressure: {mp['predicted']}")
    if best is None:
        print("\nno candidate is predicted stable at the configured rates")
        return 0
    print(f"\nrecommended: {best['policies']} (α* = {best['max_scaling']:.4f}; {best['predicted']})")
    print("apply with: " + " ".join(f"--set '{o}'" for o in adv["recommended_set"]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not policies:
        raise ConfigError("--policies", args.policies, f"a comma-separated list of at least one of config, {', '.join(POLICIES)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    progress = Progress(sys.stderr.isatty() and not args.json)

    def on_done(summary: dict) -> None:
        progress.done()
        done.append(summary)
        if out:  # rewritten as each policy finishes: an interrupted comparison keeps what finished
            write_json(out / "summary.json", {"runs": done})

    stop = None
    try:
        compare_policies(args.config, args.set, policies, on_done)
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: what finished is printed and kept
        stop = exc
        progress.done()
    if not done:
        return interrupted(stop or KeyboardInterrupt(), "no policy finished: nothing written")
    if stop is not None and out:
        write_json(out / "summary.json", {"runs": done})   # in case the signal came while it was being rewritten

    def end() -> int:
        if stop is None:
            return 0
        return interrupted(stop, f"{len(done)} of {len(policies)} policies finished "
                                 f"({', '.join(s['policy'] for s in done)}), shown in the table; {kept_files()}")

    if args.json:
        print(json.dumps({"runs": done}, default=float))
        return end()
    classes = [c["class"] for c in done[0]["classes"]]
    head = ("policy", "verdict", "slope tok/s", "peak backlog", "jobs done", "jobs rejected",
            *(f"{c} E2E p50/p99" for c in classes))
    for s in done:
        for line in network_rejection_warnings(s):
            print(line, file=sys.stderr)
    rows = [(s["policy"], s["network"]["verdict"], fmt(s["network"]["backlog_slope_tokens_per_s"], 1),
             str(s["network"]["peak_backlog_tokens"]), str(s["network"]["jobs_completed"]),
             rejected_cell(s["network"]["jobs_rejected"], s["network"]["jobs_arrived"]),
             *(f"{fmt(c['e2e_s']['p50'])} / {fmt(c['e2e_s']['p99'])}" for c in s["classes"])) for s in done]
    print(f"horizon {done[0]['horizon_s']:g} s, seed {done[0]['seed']}, {done[0]['network']['jobs_arrived']} jobs "
          "(the same for every policy)\n")
    print(_table(head, rows))
    return end()


def register(sub) -> None:
    p = sub.add_parser("network", help="networks of engines and delay stations (paper §5): simulate, capacity, compare")
    nsub = p.add_subparsers(dest="network_command", required=True)
    s = nsub.add_parser("simulate", help="simulate a network config (or scenario: rybko-stolyar, fork-join, ...)")
    s.add_argument("config")
    add_overrides(s)
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.add_argument("--out", help="write config.json, summary.json, timeseries.csv, requests.csv here")
    s.add_argument("--plot", help="draw the backlogs with the fluid model's path dashed into this .png")
    s.set_defaults(func=cmd_simulate)
    k = nsub.add_parser("capacity", help="traffic equations, virtual stations, fluid model: ρ, α*, the prediction")
    k.add_argument("config")
    add_overrides(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_capacity)
    v = nsub.add_parser("advise", help="search per-engine priority orders with the fluid model; recommend the "
                        "one with the largest stable scaling")
    v.add_argument("config")
    add_overrides(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_advise)
    c = nsub.add_parser("compare", help="the same jobs under each per-engine policy (every engine set to it)")
    c.add_argument("config")
    c.add_argument("--policies", default="config,fcfs,max-pressure",
                   help="comma-separated: config (as configured), fcfs, priority, max-pressure")
    add_overrides(c)
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", help="write summary.json here (updated as each policy finishes)")
    c.set_defaults(func=cmd_compare)
