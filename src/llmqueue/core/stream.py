"""Runs without per-request records: memory that stays flat however many requests (issue 5).

:func:`simulate_stream` draws the requests in chunks, runs them through the engine (the
compiled core of :mod:`llmqueue.core.fastcore`, one call per chunk, or the reference loop of
:mod:`llmqueue.core.loop`) and folds each finished request and each batch into running totals
as it goes, so memory holds only one chunk of arrivals and the requests still in the system.
It returns counts, throughputs and latency means and maxima (no percentiles, no backlog
verdict: those need the per-request and per-batch arrays that :func:`~llmqueue.core.simulator.simulate`
keeps).

The chunks are the requests :meth:`Workload.generate` draws for the same seed: arrival times
restart their cumulative sum from the last time (the same sequential additions), and numpy's
samplers give the same values drawn in pieces as in one call (tests/test_core.py checks every
arrival process with Poisson, geometric, fixed, log-normal and uniform lengths); a replayed trace
is sliced.
"""

from __future__ import annotations

import math
import time as _time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.core.loop import run_reference
from llmqueue.model.request import Request
from llmqueue.model.workload import DeterministicArrivals, Trace, Workload

CHUNK = 1 << 16  # perf: arrivals per chunk; 64k keeps the chunk's lists at a few MB


def request_chunks(workload: Workload, seed: int, *, num_requests: int | None = None,
                   horizon_s: float | None = None, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, ...]]:
    """(arrival times, prompts, outputs) arrays of at most ``chunk`` requests, in arrival order:
    the stream :meth:`Workload.generate` draws for ``seed``, cut into pieces (see the module note)."""
    if num_requests is not None and horizon_s is not None:
        raise ConfigError("run.requests", num_requests, "omitted when run.horizon_s is given (choose one horizon)")
    if num_requests is None and horizon_s is None and not isinstance(workload.arrivals, Trace):
        raise ConfigError("run.requests", None, "given when run.horizon_s is not (a run needs a horizon)")
    arrival_rng, prompt_rng, output_rng = (np.random.default_rng(s)
                                           for s in np.random.SeedSequence(int(seed)).spawn(3))
    limit = num_requests if num_requests is not None else math.inf
    horizon = math.inf if horizon_s is None else float(horizon_s)
    arrivals = workload.arrivals
    done, last = 0, 0.0
    while done < limit:
        size = int(min(chunk, limit - done))
        if isinstance(arrivals, Trace):
            times = arrivals.requests.arrival_time[done:done + size]
            prompts = arrivals.requests.num_prompt_tokens[done:done + size]
            outputs = arrivals.requests.num_output_tokens[done:done + size]
        elif isinstance(arrivals, DeterministicArrivals):  # k / rate, as its sampler computes them
            times = np.arange(done + 1, done + size + 1) / arrivals.rate
            prompts = outputs = None
        else:  # the same sequential additions as the one-piece cumsum, restarted from the last time
            times = np.cumsum(np.concatenate(([last], arrivals._gaps(arrival_rng, size))))[1:]
            prompts = outputs = None
        if len(times) == 0:
            return
        cut = int(np.searchsorted(times, horizon, side="right"))
        times = times[:cut]
        if cut:
            n = len(times)
            yield (times,
                   prompts[:n] if workload.prompt is None else workload.prompt.sample(prompt_rng, n),
                   outputs[:n] if workload.output is None else workload.output.sample(output_rng, n))
        if cut < size:
            return
        done += size
        last = float(times[-1])


def simulate_stream(engine: Engine, chunks: Iterable[tuple[np.ndarray, ...]], *, horizon_s: float | None = None,
                    drain: bool = False, progress: Callable[[float, int], None] | None = None,
                    compiled: bool = True) -> dict:
    """Run the request chunks through ``engine`` keeping running totals only; a summary dict.

    Horizons as :func:`~llmqueue.core.simulator.simulate`: ``horizon_s``, ``drain``, or (neither)
    the last arrival.  Counts (arrived, completed, rejected, batches, violations) and token
    throughput equal those of :func:`~llmqueue.metrics.summarize` on the same run; the latency
    means agree up to the order of floating-point summation.
    ``engine.rejected`` is emptied as it is counted.  ``progress`` is called once per chunk with
    (the chunk's last arrival time, requests drawn so far).  The chunks run on the compiled core
    where it can run (:func:`llmqueue.core.fastcore.reason`; ``compiled=False``: the reference loop);
    both give the same totals.
    """
    if engine.num_in_engine or engine.rejected or engine.violations:
        raise ConfigError("engine", "an engine that already holds requests", "a fresh engine for a streamed run")
    started = _time.perf_counter()
    t = {"arrived": 0, "completed": 0, "rejected": 0, "batches": 0, "batch_tokens": 0, "processed": 0,
         "started": 0, "ttft_sum": 0.0, "ttft_max": 0.0, "e2e_sum": 0.0, "e2e_max": 0.0, "tbt_sum": 0.0,
         "tbt_count": 0}
    admitted: list[Request] = []
    ends: list[float] = []
    tokens: list[int] = []
    fixed = math.inf if drain or horizon_s is None else float(horizon_s)
    source = iter(chunks)
    ahead = next(source, None)
    if ahead is None:
        raise ConfigError("run.requests", 0, "at least one request")
    if compiled and fastcore.reason(engine, piecewise=True) is None:
        T = _stream_compiled(engine, ahead, source, t, fixed, drain, horizon_s, progress)
        return _summary(engine, t, T, started)
    last_arrival = 0.0

    def fold(bound: float, final: bool) -> None:
        """Fold requests finished by ``bound`` (<= T) and batches ending by it into the totals;
        at the end (``final``) also the first tokens of requests still in the system."""
        rejected = {id(r) for r in engine.rejected}
        t["rejected"] += len(rejected)
        engine.rejected.clear()
        # perf: split in one pass, then sum in numpy (a Python loop with max() per request cost 15 %).
        done = [r for r in admitted if r.finish_time is not None and r.finish_time <= bound and id(r) not in rejected]
        if final:
            still = []
            begun = [r for r in admitted if id(r) not in rejected and r.first_token_time is not None
                     and r.first_token_time <= bound]
        else:
            still = [r for r in admitted if (r.finish_time is None or r.finish_time > bound) and id(r) not in rejected]
            begun = done
        _fold_done(t, np.array([r.arrival_time for r in done]), np.array([r.first_token_time for r in done]),
                   np.array([r.finish_time for r in done]), np.array([r.num_output_tokens for r in done]))
        _fold_begun(t, np.array([r.arrival_time for r in begun]), np.array([r.first_token_time for r in begun]))
        admitted[:] = still
        k = len(ends) if final else bisect_right(ends, bound)  # batches folded now
        by_t = bisect_right(ends, bound)                        # of which ended by T
        t["batches"] += k
        t["batch_tokens"] += sum(tokens[:k])
        t["processed"] += sum(tokens[:by_t])
        del ends[:k], tokens[:k]

    def more():
        nonlocal ahead, last_arrival
        if ahead is None:
            return None
        times, prompts, outputs = ahead
        ahead = next(source, None)
        last_arrival = float(times[-1])
        # Anything finished by an arrival time is finished by T (T >= every arrival).
        fold(min(fixed, last_arrival), False)
        horizon = _admit_chunk(t, times, ahead is None, fixed, drain, horizon_s, progress)
        return times.tolist(), prompts.tolist(), outputs.tolist(), horizon

    now, _ = run_reference(engine, [], [], [], math.inf, admitted, ends, tokens, None, None, more)
    end_time = max(now, last_arrival) if drain else (fixed if horizon_s is not None else last_arrival)
    fold(end_time, True)
    return _summary(engine, t, end_time, started)


def _admit_chunk(t: dict, times: np.ndarray, last: bool, fixed: float, drain: bool, horizon_s: float | None,
                 progress: Callable[[float, int], None] | None) -> float:
    """Count a chunk's arrivals, report progress; the horizon for the run from here on."""
    t["arrived"] += len(times)
    if progress is not None:
        progress(float(times[-1]), t["arrived"])
    if not drain and horizon_s is None:  # T = the last arrival: known with the last chunk
        return float(times[-1]) if last else math.inf
    return fixed


def _add(t: dict, key: str, values: np.ndarray, count: str) -> None:
    """Add latencies to the running count ``count`` and to ``key``'s sum and maximum."""
    if len(values):
        t[count] += len(values)
        t[f"{key}_sum"] += float(values.sum())
        t[f"{key}_max"] = max(t[f"{key}_max"], float(values.max()))


def _fold_done(t: dict, arrival: np.ndarray, first: np.ndarray, finish: np.ndarray, outputs: np.ndarray) -> None:
    """Add finished requests (by T) to the running totals."""
    _add(t, "e2e", finish - arrival, "completed")
    some = outputs > 0
    t["tbt_sum"] += float(((finish[some] - first[some]) / outputs[some]).sum())
    t["tbt_count"] += int(some.sum())


def _fold_begun(t: dict, arrival: np.ndarray, first: np.ndarray) -> None:
    """Add requests whose first token came (by T) to the running totals."""
    _add(t, "ttft", first - arrival, "started")


def _stream_compiled(engine: Engine, ahead: tuple, source: Iterator, t: dict, fixed: float, drain: bool,
                     horizon_s: float | None, progress: Callable[[float, int], None] | None) -> float:
    """The chunks through the compiled core (llmqueue.core.fastcore), one call per chunk: each call
    starts with the requests still in the engine and stops where the next arrivals are needed,
    exactly where the reference loop asks for them.  Folds as the reference path does; returns T."""
    empty = np.empty(0)
    pending = (empty, empty, empty, np.empty(0, np.int64))  # finished, not yet folded: arrival, first, finish, out
    pend_ends, pend_tokens = empty, np.empty(0, np.int64)
    carried, last_arrival, base = None, 0.0, 0
    durations = np.asarray(engine.durations, dtype=np.float64)  # once, not once per chunk
    while True:
        times, prompts, outputs = ahead
        ahead = next(source, None)
        last_arrival = float(times[-1])
        bound = min(fixed, last_arrival)  # anything finished by an arrival time is finished by T
        now_done = pending[2] <= bound
        _fold_done(t, *(a[now_done] for a in pending))
        _fold_begun(t, pending[0][now_done], pending[1][now_done])
        pending = tuple(a[~now_done] for a in pending)
        k = int(np.searchsorted(pend_ends, bound, side="right"))
        t["batches"] += k
        t["batch_tokens"] += int(pend_tokens[:k].sum())
        t["processed"] += int(pend_tokens[:k].sum())
        pend_ends, pend_tokens = pend_ends[k:], pend_tokens[k:]
        horizon = _admit_chunk(t, times, ahead is None, fixed, drain, horizon_s, progress)
        c = fastcore.call(engine, times, prompts, outputs, horizon, rids=np.arange(base, base + len(times)),
                          carried=carried, stop=fastcore.UNTIL_ADMITTED if ahead is not None else 0,
                          durations=durations)
        base += len(times)
        engine.violations += c.violations
        t["rejected"] += len(c.rejected)
        done = np.flatnonzero(~np.isnan(c.finish_time))
        pending = tuple(np.concatenate((p, a[done])) for p, a in zip(
            pending, (c.arrival_time, c.first_token_time, c.finish_time, c.num_output_tokens), strict=True))
        pend_ends = np.concatenate((pend_ends, c.batch_end_time))
        pend_tokens = np.concatenate((pend_tokens, c.batch_tokens))
        if ahead is None or c.admitted < len(c.rid):  # the last chunk, or the horizon came first
            break
        carried = c.carried()
    T = max(c.now, last_arrival) if drain else (fixed if horizon_s is not None else last_arrival)
    now_done = pending[2] <= T
    _fold_done(t, *(a[now_done] for a in pending))
    inside = np.concatenate((c.pre, c.dec))
    begun_arrival = np.concatenate((pending[0], c.arrival_time[inside]))
    begun_first = np.concatenate((pending[1], c.first_token_time[inside]))
    by_t = begun_first <= T  # NaN (not yet) compares False
    _fold_begun(t, begun_arrival[by_t], begun_first[by_t])
    t["batches"] += len(pend_ends)
    t["batch_tokens"] += int(pend_tokens.sum())
    t["processed"] += int(pend_tokens[:int(np.searchsorted(pend_ends, T, side="right"))].sum())
    fastcore.leave_state(engine, c)
    return T


def _summary(engine: Engine, t: dict, T: float, started: float) -> dict:
    """The summary dict of a streamed run from its running totals (horizon T)."""
    served = t["arrived"] - t["rejected"]

    def mean(total: float, count: int) -> float | None:
        return total / count if count else None

    return {
        "scheduler": engine.scheduler.name,
        "token_budget": engine.token_budget,
        "horizon_s": T,
        "records": False,
        "arrived": t["arrived"],
        "completed": t["completed"],
        "first_tokens": t["started"],
        "rejected": t["rejected"],
        "throughput_rps": t["completed"] / T if T > 0 else 0.0,
        "token_throughput": t["processed"] / T if T > 0 else 0.0,
        "final_in_system": served - t["completed"],
        "work_conserving_violations": engine.violations,
        "batches": t["batches"],
        "mean_batch_tokens": t["batch_tokens"] / t["batches"] if t["batches"] else 0.0,
        "ttft_s": {"mean": mean(t["ttft_sum"], t["started"]), "max": t["ttft_max"] if t["started"] else None},
        "tbt_s": {"mean": mean(t["tbt_sum"], t["tbt_count"])},
        "e2e_s": {"mean": mean(t["e2e_sum"], t["completed"]), "max": t["e2e_max"] if t["completed"] else None},
        "wall_s": _time.perf_counter() - started,
    }
