"""Metrics of a network run: per engine, per class, and the network verdict (arXiv 2504.07347 §5).

* per engine: the single-engine summary (:func:`llmqueue.metrics.summarize`) of its
  sub-requests and batches — utilisation, backlog trend and verdict, batch mix, TTFT,
  work-conservation violations — against the load the traffic equations offer it; with
  ``kv_blocks`` also its ``kv`` summary (:func:`llmqueue.metrics.kv_summary`: blocks in use,
  preemptions, recomputed tokens, memory-limited batches, visits larger than the cache), and
  the backlogs count recomputed tokens as no progress; with ``prefix_caching`` the ``kv`` summary
  holds ``prefix_caching`` (:func:`llmqueue.metrics.prefix_summary`: hit rate, saved prefill tokens,
  evictions), and tokens a visit finds cached at its first admission are no backlog;
* per class: jobs arrived, completed and rejected, throughput, job end-to-end latency (entry
  to final exit, joins and tool delays included), per-hop visits and TTFT, tokens per job
  (realised against the traffic equations' expectation);
* the network verdict: the network's backlog (unprocessed tokens of every job in it, later
  hops included: :meth:`~llmqueue.network.sim.NetworkResult.total_result`) judged by the same statistical test as one engine (:func:`llmqueue.metrics.backlog_trend`),
  with the tolerance a fraction of the bottleneck's capacity; peak backlog and how the peaks
  grow (the largest backlog in the last quarter of the run over that in the second quarter).
"""

from __future__ import annotations

import numpy as np

from llmqueue.analysis import analyze
from llmqueue.metrics import (
    MIN_BLOCKS,
    REJECTS,
    UNSTABLE,
    backlog,
    backlog_trend,
    growth_rate,
    in_system,
    latency_stats,
    passage_time,
    relaxation_time,
    summarize,
    verdict,
)
from llmqueue.network.sim import NetworkResult

_GRID = 600


def engine_summaries(result: NetworkResult) -> list[dict]:
    net, a = result.network, result.analysis
    out = []
    for j, spec in enumerate(net.engines):
        load = result.analysis.classes
        visit_rate = sum(rate * a.visits_per_job[k, j] for k, rate in enumerate(a.rates))
        prompt_rate = sum(rate * load[k].prompt_tokens[h.index] for k, rate in enumerate(a.rates)
                          for h in net.classes[k].hops if h.engine == j)
        offered = float(a.offered_tokens_per_s[j])
        if visit_rate > 0:
            m_p, m_d = prompt_rate / visit_rate, (offered - prompt_rate) / visit_rate
        else:
            m_p, m_d = 1.0, 0.0
        if spec.pool is not None and len(spec.pool.replicas) > 1:   # the pooled capacity (docs/cluster.md)
            single = _pooled_analysis(a, j, visit_rate, m_p, m_d)
        else:
            single = analyze(spec.batch_time, spec.token_budget, visit_rate, m_p, m_d, spec.max_batch_requests)
        engine = result.engines[j]
        r = result.engine_result(j)
        s = summarize(r, single, work_conserving=engine.scheduler.work_conserving,
                      tolerance=net.verdict_tolerance, reject_tolerance=net.reject_tolerance,
                      splits_prompts=engine.scheduler.splits_prompts, engine=spec.name)
        s["passage_s"] = passage_time(r)
        del s["wall_s"]   # the engines run in one loop: only the network's wall time (its summary's) means anything
        b = r.batches
        started = b["start_time"] < result.end_time
        busy = float((np.minimum(b["end_time"][started], result.end_time) - b["start_time"][started]).sum())
        s.update({
            "engine": spec.name, "policy": spec.policy, "predicted": a.prediction(),
            "busy_fraction": busy / len(spec.replicas) / result.end_time if result.end_time > 0 else 0.0,
            "token_utilisation": s["token_throughput"] / single.capacity_tokens_per_s,
            "mean_prefill_tokens": float(b["num_prefill_tokens"].mean()) if len(b["end_time"]) else 0.0,
            "mean_decode_tokens": float(b["num_decode_tokens"].mean()) if len(b["end_time"]) else 0.0,
            "peak_backlog_tokens": int(backlog(r, np.linspace(0, result.end_time, _GRID)).max()),
        })
        if spec.pool is not None:
            s.update(pool_summary(result, j, visit_rate, m_p, m_d))
        out.append(s)
    return out


def _pooled_analysis(a, j: int, visit_rate: float, m_p: float, m_d: float):
    """The pool as one server of the pooled capacity (llmqueue.cluster.capacity.pooled_analysis)."""
    from llmqueue.cluster.capacity import PoolCapacity, pooled_analysis

    p = a.pools[j]
    pooled = p.pooled_capacity_tokens_per_s
    offered = float(a.offered_tokens_per_s[j])
    per = m_p + m_d
    cap = PoolCapacity(p.router, list(p.replicas), list(p.capacity_tokens_per_s), pooled, visit_rate, m_p, m_d,
                       offered, offered / pooled, pooled / per if per > 0 else float("inf"),
                       None if p.shares is None else list(p.shares), None if p.replica_rho is None
                       else list(p.replica_rho), p.binding, None, "", p.reason)
    return pooled_analysis(cap)


def pool_summary(result: NetworkResult, j: int, visit_rate: float, m_p: float, m_d: float) -> dict:
    """A pool node's router and each replica's summary (docs/network.md, "Pools as engines"): the
    single-engine summary of its visits and batches against Theorem 2 at the rate it received."""
    net, a = result.network, result.analysis
    spec = net.engines[j]
    pool, load = spec.pool, a.pools[j]
    mine = result.sub_engine == j
    arrived = result.arrival_time <= result.end_time
    n = max(int((mine & arrived).sum()), 1)
    replicas = []
    for r, rep in enumerate(pool.replicas):
        res = result.replica_result(j, r)
        share = float((res.arrival_time <= result.end_time).sum()) / n
        engine = result.replica_engines[result.replica_of[j][r]]
        single = analyze(rep.batch_time, rep.token_budget, visit_rate * share, m_p, m_d, rep.max_batch_requests)
        s = summarize(res, single, work_conserving=engine.scheduler.work_conserving,
                      tolerance=net.verdict_tolerance, reject_tolerance=net.reject_tolerance,
                      splits_prompts=engine.scheduler.splits_prompts, engine=rep.name)
        del s["wall_s"]
        replicas.append({"replica": pool.labels[r], "scheduler": rep.scheduler, "token_budget": rep.token_budget,
                         "capacity_tokens_per_s": load.capacity_tokens_per_s[r], "share": share,
                         "predicted_share": None if load.shares is None else load.shares[r],
                         "predicted_rho": None if load.replica_rho is None else load.replica_rho[r],
                         "summary": s})
    return {"router": pool.router, "router_kind": load.kind, "report_delay_s": pool.report_delay_s,
            "replicas_count": len(pool.replicas), "pooled_capacity_tokens_per_s": load.pooled_capacity_tokens_per_s,
            "pool_reason": load.reason,
            "replicas_unstable": [r["replica"] for r in replicas if r["summary"]["verdict"] == UNSTABLE],
            "replicas": replicas}


def class_summaries(result: NetworkResult) -> list[dict]:
    net, a = result.network, result.analysis
    T = result.end_time
    out = []
    for k, cls in enumerate(net.classes):
        mine = result.job_class == k
        entry, exit_ = result.job_entry_time[mine], result.job_exit_time[mine]
        done = exit_ <= T
        hops = []
        for h in cls.hops:
            if not h.is_engine:
                continue
            m = (result.sub_class == k) & (result.sub_hop == h.index)
            arrived = m & (result.arrival_time <= T)
            started = m & (result.first_token_time <= T)
            finished = m & (result.finish_time <= T)
            hops.append({
                "hop": h.id, "engine": net.engines[h.engine].name, "visits": int(arrived.sum()),
                "expected_visits_per_job": float(a.classes[k].visits[h.index]),
                "ttft_s": latency_stats(result.first_token_time[started] - result.arrival_time[started]),
                "hop_latency_s": latency_stats(result.finish_time[finished] - result.arrival_time[finished]),
            })
        n_done = int(done.sum())
        out.append({
            "class": cls.name, "rate_jps": a.rates[k], "arrived": int((entry <= T).sum()), "completed": n_done,
            "rejected": int(result.job_rejected[mine].sum()),
            "throughput_jps": n_done / T if T > 0 else 0.0,
            "e2e_s": latency_stats(exit_[done] - entry[done]),
            "tokens_per_job": float(result.job_tokens[mine].mean()) if mine.any() else None,
            "expected_tokens_per_job": float(a.tokens_per_job[k].sum()),
            "expected_delay_s_per_job": a.classes[k].delay_s,
            "hops": hops,
        })
    return out


def network_timeseries(result: NetworkResult, points: int = _GRID) -> dict[str, np.ndarray]:
    """Backlog (tokens) per engine and of the whole network, and jobs in it, on an even grid over [0, T]."""
    t = np.linspace(0.0, result.end_time, points)
    series = {"time_s": t}
    for j, spec in enumerate(result.network.engines):
        series[f"{spec.name}_backlog_tokens"] = backlog(result.engine_result(j), t)
        if spec.pool is not None and len(spec.pool.replicas) > 1:   # and each replica's
            for r, label in enumerate(spec.pool.labels):
                series[f"{spec.name}.{label}_backlog_tokens"] = backlog(result.replica_result(j, r), t)
    series["total_backlog_tokens"] = backlog(result.total_result(), t)
    series["jobs_in_network"] = in_system(result.total_result(), t)
    return series


def summarize_network(result: NetworkResult) -> dict:
    """The run's summary as a JSON-able dict (keys in docs/network.md)."""
    net, a = result.network, result.analysis
    T = result.end_time
    total = result.total_result()
    bottleneck = a.engines.index(a.bottleneck)
    tol = net.verdict_tolerance * float(a.capacity_tokens_per_s[bottleneck])
    arrived = int((result.job_entry_time <= T).sum())
    engines = engine_summaries(result)
    distance = float(np.min(np.abs(a.capacity_tokens_per_s - a.offered_tokens_per_s)))
    relax = relaxation_time(total, max(distance, tol, growth_rate(total)), passage_s=job_passage(result, engines))
    trend = backlog_trend(total, relaxation_s=relax.seconds)
    name, reason, need = verdict(trend, tol, arrived, relax)
    rejected = int(result.job_rejected.sum())
    if rejected > net.reject_tolerance * max(arrived, 1):
        causes = "; ".join(c for e in engines for c in e["rejected_causes"])   # each names its engine
        turned_away = (f"{rejected} of {arrived} jobs ({rejected / max(arrived, 1):.1%}) rejected, above the allowed "
                       f"{net.reject_tolerance:.1%}: {causes}")
        if name == UNSTABLE:
            reason = f"{reason}; and {turned_away}"
        else:
            served = f"; the backlog of the jobs served: {name}" if rejected < arrived else ""
            name, reason, need = REJECTS, turned_away + served, None
    grid = np.linspace(0.0, T, _GRID)
    b = backlog(total, grid)
    q = _GRID // 4
    second, last = b[q:2 * q].max(initial=0), b[3 * q:].max(initial=0)
    out = {
        "horizon_s": T,
        "seed": result.seed,
        "network": {
            "verdict": name, "verdict_reason": reason, "predicted": a.prediction(),
            "verdict_needs_arrivals_s": need, "warmup_s": trend.window[0] if trend else None,
            "relaxation_s": relax.seconds, "jobs_rejected": rejected,
            "jobs_rejected_share": rejected / arrived if arrived else 0.0,
            "backlog_slope_tokens_per_s": trend.slope if trend and trend.blocks >= MIN_BLOCKS else None,
            "backlog_slope_ci": [trend.ci_low, trend.ci_high] if trend and trend.blocks >= MIN_BLOCKS else None,
            "peak_backlog_tokens": int(b.max(initial=0)), "final_backlog_tokens": int(b[-1]) if len(b) else 0,
            "peak_growth": float(last / second) if second > 0 else None,
            "jobs_arrived": arrived, "jobs_completed": int((result.job_exit_time <= T).sum()),
            "max_rho": a.max_rho, "max_scaling": a.max_scaling, "bottleneck": a.bottleneck, "cyclic": a.cyclic,
            "work_conserving_violations": result.violations,
        },
        "engines": engines,
        "classes": class_summaries(result),
        "analysis": a.to_dict(),
        "wall_s": result.wall_s,
    }
    if result.kv or result.replica_kv:
        out["network"]["kv"] = kv_totals(engines)
    return out


def job_passage(result: NetworkResult, engines: list[dict]) -> float:
    """A job's time through the network at the run's pace: over the classes, the most of the
    expected visits to each engine times that engine's passage time, plus the delay stations."""
    a = result.analysis
    longest = 0.0
    for k, cls in enumerate(result.network.classes):
        t = a.classes[k].delay_s
        for h in cls.hops:
            if h.is_engine:
                t += float(a.classes[k].visits[h.index]) * engines[h.engine]["passage_s"]
        longest = max(longest, t)
    return longest


def kv_totals(engines: list[dict]) -> dict:
    """The network's KV memory in one place: the engines with ``kv_blocks`` and the sums over them of
    their ``kv`` summaries (each engine's own is :func:`llmqueue.metrics.kv_summary` of its visits)."""
    kv = [e for e in engines if "kv" in e]
    kv += [{**r["summary"], "engine": f"{e['engine']}.{r['replica']}"} for e in engines if "kv" not in e
           for r in e.get("replicas", ()) if "kv" in r["summary"]]   # a pool's replicas
    total = lambda key: int(sum(e["kv"][key] for e in kv))
    return {"engines": [e["engine"] for e in kv], "preemptions": total("preemptions"),
            "preempted_visits": total("preempted_requests"), "recomputed_tokens": total("recomputed_tokens"),
            "memory_limited_batches": total("memory_limited_batches"),
            "rejected_larger_than_cache": total("rejected_larger_than_cache"),
            **prefix_totals(kv)}


def prefix_totals(kv: list[dict]) -> dict:
    """Prefix caching over the engines that have it (empty when none has): vLLM's counters summed."""
    pre = [e["kv"]["prefix_caching"] for e in kv if "prefix_caching" in e["kv"]]
    if not pre:
        return {}
    total = lambda key: int(sum(p[key] for p in pre))
    queries, hits = total("queries"), total("hits")
    return {"prefix_caching": {"engines": [e["engine"] for e in kv if "prefix_caching" in e["kv"]],
                               "queries": queries, "hits": hits, "hit_rate": hits / queries if queries else 0.0,
                               "saved_prefill_tokens": total("saved_prefill_tokens"), "evictions": total("evictions")}}
