"""Metrics and the stability verdict of a run (Theorem 2, arXiv 2504.07347 §3.2; latency and the verdict go beyond the paper).

Latency: TTFT = first token − arrival (the batch finishing the prompt emits the first
token), TBT = (finish − first token) / v_d (mean time between a request's output tokens,
vLLM's TPOT), E2E = finish − arrival; statistics over the requests that got there by T.

Verdict (docs/model.md, "The stability verdict"): the backlog B(t) (unprocessed tokens of
requests in the system) is sampled on an even grid over the arrival period [0, t₁].
1. Warm-up: every run starts empty, and a stable system's backlog first rises to its steady
   level.  MSER-5 (White 1997; White, Cobb & Spratt 2000) drops the initial stretch that
   minimises the standard error of the rest, searched over the first half; at least one
   relaxation time is dropped.
2. Relaxation time τ: a request's passage through the engine plus the time in which the
   backlog's drift beats its random fluctuation, 2σ²/μ² (reflected Brownian motion, Abate &
   Whitt 1987; σ² the variance rate of the arriving work, μ the distance of the offered load
   from capacity, or the backlog's growth over the second half if larger, at least the tolerance).
3. Long enough: the slope is fitted over blocks of at least τ; fewer than MIN_BLOCKS of them
   cannot tell a backlog still settling from growth: ``inconclusive``, with the horizon that
   would decide.
4. Trend: the block means are regressed on time, with an AR(1) inflation of the standard error
   and a 98 % Student-t interval.
5. ``unstable`` if the interval lies above the tolerance (a fraction of what the engine can
   serve, default 1 %), ``stable`` if it lies below, else ``inconclusive``.
6. ``rejects`` where more than a small share of the arrivals was rejected (and the backlog does
   not grow): a run that turns requests away does not keep up with its load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmqueue.analysis import Analysis
from llmqueue.core.simulator import Result

STABLE, UNSTABLE, INCONCLUSIVE, REJECTS = "stable", "unstable", "inconclusive", "rejects"
DEFAULT_TOLERANCE = 0.01
DEFAULT_REJECT_TOLERANCE = 0.001   # share of arrivals a run may reject and still be called stable
DEFAULT_BLOCKS = 20                # blocks of the slope's regression, at most
MIN_ARRIVALS = 100
CONFIDENCE = 0.98                  # of the slope's interval (each verdict errs at most 1 % one-sided)
MIN_BLOCKS = 4                     # blocks the window after the warm-up must hold, each at least
BLOCK_RELAXATIONS = 1.0            # this many relaxation times long
_GRID = 1000                       # backlog samples over the arrival period: 200 MSER-5 batches
_MSER_BATCH = 5
_VARIANCE_BINS = 20                # bins of the arriving work for its long-run variance rate


@dataclass(frozen=True)
class Trend:
    slope: float          # tokens/s over the window
    ci_low: float
    ci_high: float
    window: tuple[float, float]   # (end of the warm-up MSER-5 dropped, end of the arrival period)
    settled: bool = True  # MSER-5's minimum lies inside the first half (a steady stretch was found)
    blocks: int = DEFAULT_BLOCKS  # below MIN_BLOCKS: too short a window for a slope (NaN)


@dataclass(frozen=True)
class Relaxation:
    """The time scale a verdict must outlast (docs/model.md): passage through the engine plus the
    backlog's relaxation 2σ²/μ²."""
    seconds: float
    passage_s: float             # a request's time through the engine at the run's batch pace
    queueing_s: float            # 2σ²/μ² (reflected Brownian motion, Abate & Whitt 1987)
    variance_rate: float         # σ², tokens²/s, of the arriving work


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
        self.work = work
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


def arrival_period(result: Result) -> float:
    """t₁: the last arrival (or T if earlier); the verdict looks at [0, t₁] only, since a drained
    run's emptying tail says nothing about whether the engine kept up while requests arrived."""
    last_arrival = float(result.arrival_time[-1]) if len(result.arrival_time) else 0.0
    return min(result.end_time, last_arrival)


def mser5(y: np.ndarray) -> tuple[int, bool]:
    """MSER-5 truncation (White 1997; White, Cobb & Spratt 2000) of an evenly sampled series:
    the number of leading samples to drop, a multiple of 5 chosen among the first half's to
    minimise Σ (z_j − z̄)² / (k − d)² over the batch means z of 5 samples left, and whether the
    minimum lies inside that half (False: no steady stretch, the series still trends)."""
    k = len(y) // _MSER_BATCH
    if k < 4:
        return 0, False
    z = y[:k * _MSER_BATCH].reshape(k, _MSER_BATCH).mean(axis=1)
    z = z - z.mean()                                    # numerics: the sums below on centred values
    s1, s2 = np.cumsum(z[::-1])[::-1], np.cumsum((z * z)[::-1])[::-1]   # suffix sums from d
    last = k // 2
    n = k - np.arange(last + 1)
    mser = (s2[:last + 1] - s1[:last + 1] ** 2 / n) / n ** 2
    d = int(np.argmin(mser))
    return d * _MSER_BATCH, d < last


def backlog_trend(result: Result, blocks: int = DEFAULT_BLOCKS, curve: _Backlog | None = None,
                  relaxation_s: float = 0.0) -> Trend | None:
    """Slope of the backlog after its warm-up (MSER-5) up to the end of the arrival period, with a
    98 % interval (module note).  At least ``relaxation_s`` is dropped, and the blocks are no
    shorter than BLOCK_RELAXATIONS of it (fewer than ``blocks`` if need be; below MIN_BLOCKS the
    slope is NaN)."""
    t1 = arrival_period(result)
    if not t1 > 0:
        return None
    grid = np.linspace(0.0, t1, _GRID)
    series = (curve or _Backlog(result)).at(grid).astype(float)
    cut, settled = mser5(series)
    cut = min(max(cut, int(np.searchsorted(grid, relaxation_s))), _GRID - 1)   # a warm-up lasts that long
    grid, series = grid[cut:], series[cut:]
    if relaxation_s > 0:
        blocks = min(blocks, int((t1 - grid[0]) / (BLOCK_RELAXATIONS * relaxation_s)))
    if blocks < MIN_BLOCKS:
        return Trend(np.nan, np.nan, np.nan, (float(grid[0]), float(t1)), settled, blocks)
    y = np.array([part.mean() for part in np.array_split(series, blocks)])
    x = np.array([part.mean() for part in np.array_split(grid, blocks)])
    from scipy import stats  # here, not at the top: it takes most of a second (docs/performance.md)

    fit = stats.linregress(x, y)
    # Near the boundary even block means stay correlated, which would make the interval
    # too narrow (a run at ρ = 1.01 was called stable): inflate the standard error by the
    # AR(1) factor sqrt((1+r)/(1-r)) of the residuals' lag-1 autocorrelation r.
    residuals = y - (fit.intercept + fit.slope * x)
    r = 0.0
    if residuals.std() > 0:
        r = float(np.clip(np.corrcoef(residuals[:-1], residuals[1:])[0, 1], 0.0, 0.95))
    stderr = fit.stderr if np.ptp(y) > 0 else 0.0          # a constant backlog (nothing served): exact
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, blocks - 2) * stderr * np.sqrt((1 + r) / (1 - r))
    return Trend(float(fit.slope), float(fit.slope - half), float(fit.slope + half),
                 (float(grid[0]), float(t1)), settled, blocks)


def growth_rate(result: Result, curve: _Backlog | None = None) -> float:
    """The backlog's least-squares slope (tokens/s) over the second half of the arrival period, no
    interval: the drift a growing run shows, for its relaxation time."""
    t1 = arrival_period(result)
    if not t1 > 0:
        return 0.0
    grid = np.linspace(t1 / 2, t1, _GRID // 2)
    return float(np.polyfit(grid, (curve or _Backlog(result)).at(grid).astype(float), 1)[0])


def passage_time(result: Result) -> float:
    """A request's time through the engine at the run's pace: its mean number of batches (output
    tokens, plus prompt chunks of one budget each) times the median time between batch ends."""
    keep = _served(result)
    if len(result.batch_end_time) < 2 or not keep.any():
        return 0.0
    gap = float(np.median(np.diff(result.batch_end_time)))
    chunks = np.ceil(result.num_prompt_tokens[keep] / max(result.token_budget, 1))
    return float((result.num_output_tokens[keep] + chunks).mean()) * gap


def relaxation_time(result: Result, distance_tokens_per_s: float, *, passage_s: float | None = None,
                    curve: _Backlog | None = None, gap_cv2: float | None = None) -> Relaxation:
    """The relaxation time of a run (module note, step 2): ``passage_s`` (default
    :func:`passage_time`) plus 2σ²/μ² with μ = ``distance_tokens_per_s`` (> 0).  σ² is the
    variance rate of the work that arrived in [0, t₁]: for renewal arrivals whose gaps have
    squared coefficient of variation ``gap_cv2`` (1 Poisson, cv² gamma, 0 deterministic)
    λ(Var w + c² E[w]²) from the run's requests, else from 20 equal bins of the arriving work."""
    curve = curve or _Backlog(result)
    t1 = arrival_period(result)
    sigma2 = 0.0
    inside = curve.arrivals <= t1
    if t1 > 0 and np.count_nonzero(inside) > 1:
        work = curve.work[inside].astype(float)
        if gap_cv2 is not None:
            sigma2 = len(work) / t1 * (work.var() + gap_cv2 * work.mean() ** 2)
        else:
            binned, _ = np.histogram(curve.arrivals[inside], bins=_VARIANCE_BINS, range=(0.0, t1), weights=work)
            sigma2 = float(binned.var(ddof=1)) / (t1 / _VARIANCE_BINS)
    mu2 = distance_tokens_per_s ** 2   # 0 when it underflows (an engine of ~1e-300 tokens/s): no relaxation
    queueing = 2.0 * sigma2 / mu2 if mu2 > 0 else (math.inf if sigma2 > 0 else 0.0)
    passage = passage_time(result) if passage_s is None else float(passage_s)
    return Relaxation(passage + queueing, passage, queueing, sigma2)


def _duration(x: float) -> str:
    """A duration for a reason: three significant figures, thousands grouped."""
    return f"{x:,.0f} s" if abs(x) >= 1000 else f"{x:.3g} s"


def _seconds(x: float) -> str:
    """A duration rounded up to two significant figures, for "run at least ..." advice."""
    if not np.isfinite(x) or x <= 0:
        return f"{x:g} s"
    step = 10.0 ** (np.floor(np.log10(x)) - 1)
    return f"{np.ceil(x / step) * step:,.0f} s" if x >= 10 else f"{np.ceil(x / step) * step:.2g} s"


def verdict(trend: Trend | None, tolerance_tokens_per_s: float, num_arrived: int,
            relaxation: Relaxation | None = None) -> tuple[str, str, float | None]:
    """``stable`` / ``unstable`` / ``inconclusive``, the reason, and for ``inconclusive`` the period
    of arrivals (s) that would likely decide (None if unknown), from the backlog trend (module
    note); without ``relaxation`` the run is taken to be long enough."""
    if trend is None or num_arrived < MIN_ARRIVALS:
        need = None
        if trend is not None and num_arrived > 0:
            need = trend.window[1] * MIN_ARRIVALS / num_arrived
        return INCONCLUSIVE, f"run too short for a verdict (fewer than {MIN_ARRIVALS} arrivals)", need
    t0, t1 = trend.window
    warm = ("" if t0 <= 0 else f"warm-up {_duration(t0)} dropped (MSER-5)" if trend.settled else
            f"no steady level in the first half (MSER-5): its {_duration(t0)} dropped")
    if trend.blocks < MIN_BLOCKS:
        tau = relaxation.seconds if relaxation is not None else float("nan")
        span = MIN_BLOCKS * BLOCK_RELAXATIONS * tau        # the window the slope needs
        need = t0 + span if trend.settled else max(2 * span, span + tau)
        parts = (f": {_duration(relaxation.passage_s)} through the engine + {_duration(relaxation.queueing_s)} for the "
                 "backlog's drift to beat its noise") if relaxation is not None else ""
        return INCONCLUSIVE, (
            f"after the warm-up the arrivals span {_duration(t1 - t0)}, under {MIN_BLOCKS * BLOCK_RELAXATIONS:g} "
            f"relaxation times of this system ({_duration(tau)}{parts}), so a backlog still settling cannot be told from growth "
            f"({warm or 'no warm-up dropped'}); run at least {_seconds(need)} to decide"), need
    detail = (f"{warm + '; ' if warm else ''}backlog slope {trend.slope:.1f} tokens/s, "
              f"{CONFIDENCE:.0%} CI [{trend.ci_low:.1f}, {trend.ci_high:.1f}], tolerance {tolerance_tokens_per_s:.1f}")
    if trend.ci_low > tolerance_tokens_per_s:
        return UNSTABLE, detail + ": the backlog grows", None
    if trend.ci_high < tolerance_tokens_per_s:
        return STABLE, detail + ": no growth beyond the tolerance", None
    need = _longer(trend, tolerance_tokens_per_s)
    advice = (f"about {_seconds(need)} of arrivals if the slope held" if need is not None else
              "the slope sits at the tolerance: near the stability boundary no horizon may decide")
    return INCONCLUSIVE, detail + f": run longer to decide ({advice})", need


def _longer(trend: Trend, tolerance: float) -> float | None:
    """The arrival period that would narrow the interval enough to decide if the slope held (the
    interval of a trend narrows as (window length)^-3/2); None where the slope sits at the tolerance."""
    t0, t1 = trend.window
    half = (trend.ci_high - trend.ci_low) / 2
    margin = abs(trend.slope - tolerance)
    if half <= 0 or margin <= half / 30:
        return None
    return t0 + (t1 - t0) * (half / margin) ** (2 / 3)


def rejection_causes(result: Result, splits_prompts: bool | None = None, engine: str = "engine") -> list[str]:
    """Why a run's rejected requests were turned away, each cause with the option that fixes it
    (``engine``: where the options live, ``engine`` or a network engine's name)."""
    where = "engine." if engine == "engine" else f"engine {engine}'s "
    rejected = result.rejected
    causes = []
    long_prompt = rejected & (result.num_prompt_tokens > result.token_budget)
    if splits_prompts is True:
        long_prompt[:] = False
    if long_prompt.any():
        largest = int(result.num_prompt_tokens[long_prompt].max())
        causes.append(f"{int(long_prompt.sum())} with a prompt longer than the token budget "
                      f"{result.token_budget} that {result.scheduler} does not split (largest {largest}): "
                      f"raise {where}token_budget to at least {largest} or use a scheduler that splits "
                      "prompts (sarathi, vllm-v1)")
    rest = rejected & ~long_prompt
    if rest.any() and result.kv is not None:
        need = int((-(-(result.num_prompt_tokens + result.num_output_tokens)[rest] // result.kv.block_size)).max())
        causes.append(f"{int(rest.sum())} larger than the KV cache ({result.kv.blocks - 1} usable blocks of "
                      f"{result.kv.block_size} tokens; the largest needs {need}): raise {where}kv_blocks to "
                      f"at least {need + 1}")
    elif rest.any():
        causes.append(f"{int(rest.sum())} the engine can never serve")
    return causes


def rejection_verdict(result: Result, num_arrived: int, share_allowed: float,
                      splits_prompts: bool | None = None, engine: str = "engine") -> str | None:
    """The reason a run is judged ``rejects`` (more than ``share_allowed`` of its arrivals turned
    away), naming the cause and the option that fixes it; None when it is within the allowance."""
    n = int(np.count_nonzero(result.rejected))
    if n == 0 or n <= share_allowed * max(num_arrived, 1):
        return None
    return (f"{n} of {num_arrived} arrivals ({n / max(num_arrived, 1):.1%}) rejected, above the allowed "
            f"{share_allowed:.1%}: " + "; ".join(rejection_causes(result, splits_prompts, engine)))


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
              tolerance: float = DEFAULT_TOLERANCE, servable_tokens_per_s: float | None = None,
              reject_tolerance: float = DEFAULT_REJECT_TOLERANCE, splits_prompts: bool | None = None,
              passage_s: float | None = None, gap_cv2: float | None = None, engine: str = "engine") -> dict:
    """The run's summary as a JSON-able dict (keys documented in docs/config.md).

    The verdict's tolerance is ``tolerance`` times what the engine can serve: its capacity, or
    ``servable_tokens_per_s`` where that is lower (with KV memory binding, the memory-bound
    throughput: docs/memory.md).  More than ``reject_tolerance`` of the arrivals rejected makes
    the verdict ``rejects`` unless the backlog grows.  ``gap_cv2``: the arrivals' gap variability
    for the relaxation time (None: estimated from the arrivals, e.g. for a trace); ``engine``: a
    network engine's name, for the options the rejection causes name."""
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
    serve = analysis.capacity_tokens_per_s
    by_memory = servable_tokens_per_s is not None and servable_tokens_per_s < serve
    basis = servable_tokens_per_s if by_memory else serve
    tol = tolerance * basis
    relax = relaxation_time(result, max(abs(basis - analysis.offered_tokens_per_s), tol, growth_rate(result, curve)),
                            passage_s=passage_s, curve=curve, gap_cv2=gap_cv2)
    trend = backlog_trend(result, curve=curve, relaxation_s=relax.seconds)
    verdict_name, reason, need = verdict(trend, tol, arrived, relax)
    if by_memory and trend is not None:
        reason += " (tolerance: a share of the memory-bound throughput)"
    rejected = int(np.count_nonzero(result.rejected))
    turned_away = rejection_verdict(result, arrived, reject_tolerance, splits_prompts, engine)
    if turned_away is not None and verdict_name == UNSTABLE:
        reason = f"{reason}; and {turned_away}"
    elif turned_away is not None:
        served = f"; the backlog of the requests served: {verdict_name}" if rejected < arrived else ""
        verdict_name, reason, need = REJECTS, turned_away + served, None
    with_output = done & (result.num_output_tokens > 0)
    tbt = (finish[with_output] - first[with_output]) / result.num_output_tokens[with_output]
    return {
        "scheduler": result.scheduler,
        "token_budget": result.token_budget,
        "horizon_s": T,
        "arrived": arrived,
        "completed": completed,
        "rejected": rejected,
        "rejected_share": rejected / arrived if arrived else 0.0,
        "rejected_causes": rejection_causes(result, splits_prompts, engine) if rejected else [],
        "throughput_rps": completed / T if T > 0 else 0.0,
        "token_throughput": processed / T if T > 0 else 0.0,
        "mean_in_system": float(sojourn[keep & (arrival <= T)].sum() / T) if T > 0 else 0.0,
        "final_in_system": int(in_system(result, np.asarray([T]))[0]),
        "final_backlog_tokens": int(curve.at(np.asarray([T]))[0]),
        "backlog_slope_tokens_per_s": trend.slope if trend and trend.blocks >= MIN_BLOCKS else None,
        "backlog_slope_ci": [trend.ci_low, trend.ci_high] if trend and trend.blocks >= MIN_BLOCKS else None,
        "verdict": verdict_name,
        "verdict_reason": reason,
        "verdict_needs_arrivals_s": need,
        "warmup_s": trend.window[0] if trend else None,
        "relaxation_s": relax.seconds,
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
