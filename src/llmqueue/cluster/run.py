"""From a cluster config to results: generate, route, simulate, summarise (docs/cluster.md).

Each replica's summary is what ``llmqueue simulate`` gives for one engine (metrics.summarize with
the replica's Theorem 2 analysis at the arrival rate it received, and the runner's memory and
request-cap predictions); the pool's summary is the same verdict on the pool's total backlog
against the pooled capacity, with the prediction of :func:`~llmqueue.cluster.capacity.pool_capacity`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from llmqueue.cluster.capacity import PoolCapacity, pool_capacity, pooled_analysis, replica_analysis
from llmqueue.cluster.config import ClusterConfig, parse_cluster
from llmqueue.cluster.sim import PoolResult, simulate_pool
from llmqueue.core.simulator import Result
from llmqueue.metrics import passage_time, summarize


@dataclass
class PoolRun:
    """One finished pool run: the raw result, the summary (pool and replicas) and the capacity."""

    result: PoolResult
    summary: dict
    capacity: PoolCapacity


def generate_pool(cfg: ClusterConfig):
    """The pool's workload and requests (sized by :mod:`llmqueue.limits` as one stream)."""
    from llmqueue.runner import build_workload, generate

    workload = build_workload(cfg.base)
    return workload, generate(cfg.base, workload)


def replica_summary(config, result: Result, workload, arrival_rate: float, exact_gaps: bool) -> dict:
    """A replica's summary, as :func:`llmqueue.runner.execute` makes one engine's (``exact_gaps``:
    the replica received the whole stream, so its gaps are the workload's)."""
    from llmqueue import runner

    rc = config.run
    engine = runner.build_engine(config)
    analysis = replica_analysis(config, arrival_rate, workload)
    e = config.engine
    memory = runner.memory_of(config, workload) if e.get("kv_blocks") is not None else None
    summary = summarize(result, analysis, work_conserving=engine.scheduler.work_conserving,
                        tolerance=rc.verdict_tolerance, reject_tolerance=rc.reject_tolerance,
                        splits_prompts=engine.scheduler.splits_prompts,
                        gap_cv2=getattr(workload.arrivals, "gap_cv2", None) if exact_gaps else None,
                        servable_tokens_per_s=None if memory is None else
                        memory.memory_necessary_blocks_rps * memory.mean_request_tokens)
    if analysis.notes:
        summary["notes"] = list(analysis.notes)
    runner._region_prediction(config, summary, analysis)
    if memory is not None:
        runner._memory_prediction(summary, memory, analysis)
    return summary


def merged_result(pr: PoolResult) -> Result:
    """The pool as one system: every request, every replica's batches in time order."""
    req, n = pr.requests, len(pr.requests)
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    rejected = np.zeros(n, dtype=bool)
    for idx, r in zip(pr.replica_requests, pr.results):
        first[idx], finish[idx], rejected[idx] = r.first_token_time, r.finish_time, r.rejected
    ends = np.concatenate([r.batch_end_time for r in pr.results])
    tokens = np.concatenate([r.batch_tokens for r in pr.results])
    useful = tokens.copy()
    for_kv = [r for r in pr.results if r.kv is not None]
    if for_kv:   # recomputed tokens are no progress (metrics._Backlog): subtract them here
        useful = np.concatenate([r.batch_tokens - (r.kv.batch_recomputed if r.kv is not None else 0)
                                 for r in pr.results])
    order = np.argsort(ends, kind="stable")
    return Result("pool", int(sum(r.token_budget for r in pr.results)), pr.horizon_s, req.arrival_time,
                  req.num_prompt_tokens, req.num_output_tokens, first, finish, rejected, ends[order], useful[order],
                  int(sum(r.violations for r in pr.results)))


def summarize_pool(cfg: ClusterConfig, pr: PoolResult, workload) -> PoolRun:
    cap = pool_capacity(cfg, workload)
    n = max(len(pr.requests), 1)
    lam = workload.arrival_rate
    replicas = []
    for rep, idx, result in zip(cfg.replicas, pr.replica_requests, pr.results):
        share = len(idx) / n
        s = replica_summary(rep.config, result, workload, lam * share, exact_gaps=cfg.size == 1)
        replicas.append({"replica": rep.name, "scheduler": rep.config.engine["scheduler"],
                         "token_budget": rep.config.engine["token_budget"], "share": share, "summary": s})
    passage = max((passage_time(r) for r in pr.results), default=0.0)
    merged = merged_result(pr)
    rc = cfg.base.run
    pool = summarize(merged, pooled_analysis(cap), work_conserving=all(r["summary"]["work_conserving_claimed"]
                                                                       for r in replicas),
                     tolerance=rc.verdict_tolerance, reject_tolerance=rc.reject_tolerance, passage_s=passage,
                     gap_cv2=getattr(workload.arrivals, "gap_cv2", None))
    pool["scheduler"] = "pool"
    pool["predicted"] = cap.predicted
    pool["predicted_reason"] = cap.reason
    pool["wall_s"] = pr.wall_s
    summary = {"router": cfg.router, "replicas_count": cfg.size, "report_delay_s": cfg.report_delay_s,
               "seed": rc.seed, "horizon_s": pr.horizon_s, "load": cfg.load, "pool": pool,
               "capacity": cap.to_dict(), "replicas": replicas, "method": pr.meta.get("method")}
    return PoolRun(pr, summary, cap)


def run_pool(cfg: ClusterConfig, progress: Callable[[str, float], None] | None = None) -> PoolRun:
    """One run of the configured pool and router (``progress(router, share done)`` now and then)."""
    workload, requests = generate_pool(cfg)
    hook = None if progress is None else (lambda f: progress(cfg.router, f))
    return summarize_pool(cfg, simulate_pool(cfg, requests, progress=hook), workload)


def with_router(cfg: ClusterConfig, router: str) -> ClusterConfig:
    """The same pool under another router (its options dropped unless they are that router's)."""
    data = dict(cfg.data)
    cluster = dict(data["cluster"])
    if router != cfg.router:
        cluster.pop("router_options", None)
    cluster["router"] = router
    data["cluster"] = cluster
    return replace(parse_cluster(data, cfg.base.base_dir), load=cfg.load)   # the rate stays as resolved


def compare_routers(cfg: ClusterConfig, routers: Iterable[str],
                    on_done: Callable[[PoolRun], None] | None = None,
                    progress: Callable[[str, float], None] | None = None) -> list[PoolRun]:
    """Each router on the same requests (common random numbers)."""
    workload, requests = generate_pool(cfg)
    runs = []
    for name in routers:
        c = with_router(cfg, name)
        hook = None if progress is None else (lambda f, name=name: progress(name, f))
        run = summarize_pool(c, simulate_pool(c, requests, progress=hook), workload)
        runs.append(run)
        if on_done is not None:
            on_done(run)
    return runs


__all__ = ["PoolRun", "compare_routers", "generate_pool", "merged_result", "run_pool", "summarize_pool",
           "with_router"]
