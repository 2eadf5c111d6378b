"""Metrics and the stability verdict of a run (PAPER.md §4 and §7).

Latency: TTFT = first token − arrival (the batch finishing the prompt emits the first
token), TBT = (finish − first token) / v_d (mean time between a request's output tokens,
vLLM's TPOT), E2E = finish − arrival; statistics over the requests that got there by T.

Verdict: the backlog B(t) (unprocessed tokens of requests in the system) is sampled on a
grid over the second half of the arrival period, cut into ``blocks`` consecutive blocks whose means
are regressed on time; block means tame the strong autocorrelation of a queue, the rest is
absorbed by an AR(1) inflation of the standard error, and the slope's 95 % confidence
interval uses Student's t with blocks − 2 degrees of freedom.
``unstable`` if the interval lies above 0 and the slope exceeds the tolerance (a fraction
of the engine's capacity, default 1 %); ``stable`` if the interval lies below the
tolerance; otherwise ``inconclusive`` (too close to the boundary for this horizon).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from llmqueue.analysis import Analysis
from llmqueue.core.simulator import Result

STABLE, UNSTABLE, INCONCLUSIVE = "stable", "unstable", "inconclusive"
DEFAULT_TOLERANCE = 0.01
DEFAULT_BLOCKS = 20
_GRID = 400


@dataclass(frozen=True)
class Trend:
    slope: float          # tokens/s over the window
    ci_low: float
    ci_high: float
    window: tuple[float, float]


def latency_stats(values: np.ndarray) -> dict:
    """mean, p50, p90, p99 (None when there are no values)."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _served(result: Result) -> np.ndarray:
    return ~result.rejected


class _Backlog:
    """Cumulative tokens arrived (served requests) and processed (batches), built once per run."""

    def __init__(self, result: Result) -> None:
        keep = _served(result)
        self.arrivals = result.arrival_time[keep]
        work = result.num_prompt_tokens[keep] + result.num_output_tokens[keep]
        if result.kv is not None and result.kv.first_hit_tokens is not None:   # found cached: never processed
            work = work - result.kv.first_hit_tokens[keep]
        self.arrived = np.concatenate(([0], np.cumsum(work)))
        self.ends = result.batch_end_time
        useful = result.batch_tokens if result.kv is None else result.batch_tokens - result.kv.batch_recomputed
        self.processed = np.concatenate(([0], np.cumsum(useful)))   # recomputed tokens are no progress

    def processed_by(self, times: np.ndarray) -> np.ndarray:
        return self.processed[np.searchsorted(self.ends, times, side="right")]

    def at(self, times: np.ndarray) -> np.ndarray:
        return self.arrived[np.searchsorted(self.arrivals, times, side="right")] - self.processed_by(times)


def backlog(result: Result, times: np.ndarray) -> np.ndarray:
    """Unprocessed tokens in the system at ``times`` (arrived minus processed)."""
    return _Backlog(result).at(times)


def in_system(result: Result, times: np.ndarray) -> np.ndarray:
    """Requests in the system (arrived, not finished, not rejected) at ``times``."""
    keep = _served(result)
    finish = np.sort(np.where(np.isnan(result.finish_time[keep]), np.inf, result.finish_time[keep]))
    return (np.searchsorted(result.arrival_time[keep], times, side="right")
            - np.searchsorted(finish, times, side="right"))


def timeseries(result: Result, points: int = 600) -> dict[str, np.ndarray]:
    """Number in system and backlog (tokens) on an even grid over [0, T]; with KV memory also the
    blocks in use (those of the batch running at each time, 0 while the engine is idle)."""
    t = np.linspace(0.0, result.end_time, points)
    series = {"time_s": t, "in_system": in_system(result, t), "backlog_tokens": backlog(result, t)}
    if result.kv is not None:
        series["kv_blocks_in_use"] = kv_blocks_at(result, t)
    return series


def kv_blocks_at(result: Result, times: np.ndarray) -> np.ndarray:
    """KV blocks in use at ``times``: the blocks of the batch running then (batch start <= t < end),
    0 where no batch runs."""
    kv = result.kv
    i = np.searchsorted(kv.batch_start, times, side="right") - 1
    safe = np.clip(i, 0, max(len(kv.batch_start) - 1, 0))
    if not len(kv.batch_start):
        return np.zeros(len(times), dtype=np.int64)
    running = (i >= 0) & (times < result.batch_end_time[safe])
    return np.where(running, kv.batch_blocks[safe], 0).astype(np.int64)


def backlog_trend(result: Result, blocks: int = DEFAULT_BLOCKS, curve: _Backlog | None = None) -> Trend | None:
    """Slope of the backlog over the second half of the arrival period, with a 95 % interval.

    The window ends at the last arrival (or T if earlier): a drained run's emptying tail
    says nothing about whether the engine kept up while requests were arriving.
    """
    last_arrival = float(result.arrival_time[-1]) if len(result.arrival_time) else 0.0
    t1 = min(result.end_time, last_arrival)
    t0 = t1 / 2
    if not t1 > t0:
        return None
    grid = np.linspace(t0, t1, _GRID)
    y = (curve or _Backlog(result)).at(grid).astype(float).reshape(blocks, -1).mean(axis=1)
    x = grid.reshape(blocks, -1).mean(axis=1)
    fit = stats.linregress(x, y)
    # Near the boundary even block means stay correlated, which would make the interval
    # too narrow (a run at ρ = 1.01 was called stable): inflate the standard error by the
    # AR(1) factor sqrt((1+r)/(1-r)) of the residuals' lag-1 autocorrelation r.
    residuals = y - (fit.intercept + fit.slope * x)
    r = 0.0
    if residuals.std() > 0:
        r = float(np.clip(np.corrcoef(residuals[:-1], residuals[1:])[0, 1], 0.0, 0.95))
    half = stats.t.ppf(0.975, blocks - 2) * fit.stderr * np.sqrt((1 + r) / (1 - r))
    return Trend(float(fit.slope), float(fit.slope - half), float(fit.slope + half), (float(t0), float(t1)))


def verdict(trend: Trend | None, tolerance_tokens_per_s: float, num_arrived: int) -> tuple[str, str]:
    """``stable`` / ``unstable`` / ``inconclusive`` and the reason, from the backlog trend."""
    if trend is None or num_arrived < 100:
        return INCONCLUSIVE, "run too short for a verdict (fewer than 100 arrivals)"
    detail = (f"backlog slope {trend.slope:.1f} tokens/s, 95% CI [{trend.ci_low:.1f}, {trend.ci_high:.1f}], "
              f"tolerance {tolerance_tokens_per_s:.1f}")
    if trend.ci_low > 0 and trend.slope > tolerance_tokens_per_s:
        return UNSTABLE, detail + ": the backlog grows"
    if trend.ci_high < tolerance_tokens_per_s:
        return STABLE, detail + ": no growth beyond the tolerance"
    return INCONCLUSIVE, detail + ": run longer to decide"


def prediction(analysis: Analysis, work_conserving: bool) -> str:
    """What Theorem 2 predicts for this scheduler and load."""
    if analysis.offered_tokens_per_s > analysis.peak_tokens_per_s:
        return UNSTABLE
    if analysis.rho < 1 and work_conserving:
        return STABLE
    if analysis.rho > 1 and work_conserving:
        return UNSTABLE
    return "not predicted (not work-conserving)" if analysis.rho < 1 else "boundary"


def summarize(result: Result, analysis: Analysis, *, work_conserving: bool,
              tolerance: float = DEFAULT_TOLERANCE, servable_tokens_per_s: float | None = None) -> dict:
    """The run's summary as a JSON-able dict (keys documented in docs/config.md).

    The verdict's tolerance is ``tolerance`` times what the engine can serve: its capacity, or
    ``servable_tokens_per_s`` where that is lower (with KV memory binding, the memory-bound
    throughput: docs/memory.md)."""
    T = result.end_time
    keep = _served(result)
    arrival = result.arrival_time
    first, finish = result.first_token_time, result.finish_time
    done = keep & (finish <= T)
    started = keep & (first <= T)
    sojourn = np.clip(np.where(np.isnan(finish), T, np.minimum(finish, T)) - arrival, 0, None)
    arrived = int(np.count_nonzero(arrival <= T))
    completed = int(np.count_nonzero(done))
    curve = _Backlog(result)  # perf: the cumulative sums once, not once per use (millions of batches)
    processed = int(curve.processed_by(np.asarray([T]))[0])
    trend = backlog_trend(result, curve=curve)
    serve = analysis.capacity_tokens_per_s
    by_memory = servable_tokens_per_s is not None and servable_tokens_per_s < serve
    verdict_name, reason = verdict(trend, tolerance * (servable_tokens_per_s if by_memory else serve), arrived)
    if by_memory and trend is not None:
        reason += " (tolerance: a share of the memory-bound throughput)"
    with_output = done & (result.num_output_tokens > 0)
    tbt = (finish[with_output] - first[with_output]) / result.num_output_tokens[with_output]
    return {
        "scheduler": result.scheduler,
        "token_budget": result.token_budget,
        "horizon_s": T,
        "arrived": arrived,
        "completed": completed,
        "rejected": int(np.count_nonzero(result.rejected)),
        "throughput_rps": completed / T if T > 0 else 0.0,
        "token_throughput": processed / T if T > 0 else 0.0,
        "mean_in_system": float(sojourn[keep & (arrival <= T)].sum() / T) if T > 0 else 0.0,
        "final_in_system": int(in_system(result, np.asarray([T]))[0]),
        "final_backlog_tokens": int(curve.at(np.asarray([T]))[0]),
        "backlog_slope_tokens_per_s": trend.slope if trend else None,
        "backlog_slope_ci": [trend.ci_low, trend.ci_high] if trend else None,
        "verdict": verdict_name,
        "verdict_reason": reason,
        "predicted": prediction(analysis, work_conserving),
        "capacity_tokens_per_s": analysis.capacity_tokens_per_s,
        "offered_tokens_per_s": analysis.offered_tokens_per_s,
        "rho": analysis.rho,
        "max_stable_rate_rps": analysis.max_stable_rate_rps,
        "fluid_growth_tokens_per_s": analysis.fluid_growth_tokens_per_s,
        "work_conserving_claimed": work_conserving,
        "work_conserving_violations": result.violations,
        "batches": result.num_batches,
        "mean_batch_tokens": float(result.batch_tokens.mean()) if result.num_batches else 0.0,
        "ttft_s": latency_stats(first[started] - arrival[started]),
        "tbt_s": latency_stats(tbt),
        "e2e_s": latency_stats(finish[done] - arrival[done]),
        "wall_s": result.wall_s,
        **({"kv": kv_summary(result)} if result.kv is not None else {}),
    }


def kv_summary(result: Result) -> dict:
    """What KV memory did (docs/memory.md): blocks in use (time-weighted over the batches),
    preemptions, tokens computed again and the share of the engine's work they took."""
    kv = result.kv
    usable = kv.blocks - 1
    weight = result.batch_end_time - kv.batch_start      # blocks are held for each batch's duration
    used = kv.batch_blocks.astype(float)
    total = float(weight.sum())
    mean_used = float((used * weight).sum() / total) if total > 0 else 0.0
    work = int(result.batch_tokens.sum())
    recomputed = int(kv.batch_recomputed.sum())
    too_large = int(np.count_nonzero(result.rejected & (
        -(-(result.num_prompt_tokens + result.num_output_tokens) // kv.block_size) > usable)))
    return {
        "kv_blocks": kv.blocks,
        "block_size": kv.block_size,
        "kv_policy": kv.policy,
        "usable_tokens": usable * kv.block_size,
        "peak_blocks": int(kv.batch_blocks.max()) if len(kv.batch_blocks) else 0,
        "mean_blocks": mean_used,
        "peak_utilisation": (float(kv.batch_blocks.max()) / usable) if len(kv.batch_blocks) else 0.0,
        "mean_utilisation": mean_used / usable,
        "preemptions": int(kv.preemptions.sum()),
        "preempted_requests": int(np.count_nonzero(kv.preemptions)),
        "max_preemptions_per_request": int(kv.preemptions.max()) if len(kv.preemptions) else 0,
        "recomputed_tokens": recomputed,
        "recompute_share": recomputed / work if work else 0.0,
        "memory_limited_batches": kv.memory_limited,
        "rejected_larger_than_cache": too_large,
        **prefix_summary(result),
    }


def prefix_summary(result: Result) -> dict:
    """What prefix caching did (docs/prefix_caching.md), empty when it is off: vLLM's prefix-cache
    counters (``PrefixCacheStats``: tokens queried = each admitted request's num_tokens, tokens hit;
    admissions of preempted requests apart), the hit rate, the prefill tokens saved (every hit, the
    re-admissions of preempted requests included) and their share of the work the engine would
    have done without them, evictions and the cached blocks at the end."""
    kv = result.kv
    counters = getattr(kv, "prefix", None)
    if counters is None:
        return {}
    saved = int(kv.hit_tokens.sum())
    work = int(result.batch_tokens.sum())
    queries, hits = counters["queries"], counters["hits"]
    all_queries = queries + counters["preempted_queries"]
    all_hits = hits + counters["preempted_hits"]
    return {"prefix_caching": {
        "queries": queries,
        "hits": hits,
        "hit_rate": hits / queries if queries else 0.0,
        "preempted_queries": counters["preempted_queries"],
        "preempted_hits": counters["preempted_hits"],
        "hit_rate_all": all_hits / all_queries if all_queries else 0.0,
        "saved_prefill_tokens": saved,
        "saved_share": saved / (work + saved) if work + saved else 0.0,
        "mean_hit_tokens": hits / counters["requests"] if counters["requests"] else 0.0,
        "evictions": counters["evictions"],
        "cached_blocks": counters["cached_blocks"],
        "cached_free_blocks": counters["cached_free_blocks"],
    }}
