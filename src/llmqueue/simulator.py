"""The discrete-event loop for one engine (PAPER.md §1, paper §3.1).

Batches run back to back; arrivals during a batch wait for the next batch boundary; an
idle engine starts a batch at the next arrival.  The run is deterministic: the request
stream is generated up front (common random numbers across schedulers) and the loop
itself draws no random numbers.

Horizon: a run stops at the first batch boundary at or after ``horizon_s`` (requests still
inside are counted as in system), or with ``drain`` once every request has finished.

Two loops give identical results (docs/performance.md): the reference, one
:meth:`Engine.step` per batch, and the default event-level fast path (:mod:`llmqueue.fastpath`).
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmqueue.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.fastpath import fallback_reason, run_fast
from llmqueue.request import Request
from llmqueue.workload import Requests

BATCH_COLUMNS = ("start_time", "end_time", "num_prefill_tokens", "num_decode_tokens",
                 "num_requests", "demand", "bound")  # plus "duration" (end - start) in Result.batches


@dataclass
class Result:
    """Everything a run recorded; per-request arrays are indexed by request id (arrival order)."""

    scheduler: str
    token_budget: int
    end_time: float                      # the run's horizon T (seconds)
    arrival_time: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    first_token_time: np.ndarray         # NaN: not yet (or rejected)
    finish_time: np.ndarray              # NaN: not yet (or rejected)
    rejected: np.ndarray                 # bool: prompt larger than a non-splitting scheduler can ever serve
    batch_end_time: np.ndarray           # every batch, always recorded (for the backlog)
    batch_tokens: np.ndarray
    violations: int
    batches: dict[str, np.ndarray] | None = None   # full per-batch detail when record_batches
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def num_batches(self) -> int:
        return len(self.batch_end_time)


METHODS = ("fast", "reference")


def simulate(engine: Engine, requests: Requests, *, horizon_s: float | None = None, drain: bool = False,
             record_batches: bool = False,
             progress: Callable[[float, int], None] | None = None, method: str = "fast") -> Result:
    """Run ``requests`` through ``engine``; return a :class:`Result`.

    Without ``horizon_s`` and ``drain`` the run ends at the last arrival.  ``progress``
    is called now and then with (simulated time, requests admitted).  ``method`` picks the
    loop: ``"fast"`` (the event-level fast path of :mod:`llmqueue.fastpath`, used when the
    engine's scheduler and batch-time model support it, else the reference) or
    ``"reference"`` (one :meth:`Engine.step` per batch); both give identical results.
    ``Result.meta["method"]`` says which one ran.
    """
    if method not in METHODS:
        raise ConfigError("run.method", method, f"one of {', '.join(METHODS)}")
    started = _time.perf_counter()
    arrivals = requests.arrival_time.tolist()
    prompts = requests.num_prompt_tokens.tolist()
    outputs = requests.num_output_tokens.tolist()
    n = len(arrivals)
    if drain:
        horizon = float("inf")
    elif horizon_s is not None:
        horizon = float(horizon_s)
    else:
        horizon = arrivals[-1] if n else 0.0

    admitted: list[Request] = []
    ends: list[float] = []
    tokens: list[int] = []
    detail: list[tuple] | None = [] if record_batches else None
    reason = fallback_reason(engine) if method == "fast" else "selected"
    if reason is None:
        now, i = run_fast(engine, arrivals, prompts, outputs, horizon, admitted, ends, tokens, detail, progress)
    else:
        now, i = _run_reference(engine, arrivals, prompts, outputs, horizon, admitted, ends, tokens, detail,
                                progress)
    end_time = max(now, arrivals[-1] if n else 0.0) if drain else horizon
    result = _collect(engine, requests, admitted, end_time, ends, tokens, detail)
    result.wall_s = _time.perf_counter() - started
    result.meta["method"] = "fast" if reason is None else f"reference ({reason})"
    if progress is not None:
        progress(now, i)
    return result


def _run_reference(engine: Engine, arrivals: list[float], prompts: list[int], outputs: list[int], horizon: float,
                   admitted: list[Request], ends: list[float], tokens: list[int], detail: list | None,
                   progress: Callable[[float, int], None] | None) -> tuple[float, int]:
    """The straightforward loop: one :meth:`Engine.step` per batch (the reference for the fast path)."""
    n = len(arrivals)
    now, i = 0.0, 0
    step = engine.step
    next_report = 0
    while True:
        # Admit every arrival up to this batch boundary.
        while i < n and arrivals[i] <= now:
            request = Request(i, arrivals[i], prompts[i], outputs[i])
            admitted.append(request)
            engine.admit(request)
            i += 1
        if not engine.has_work:
            if i >= n or arrivals[i] > horizon:
                break
            now = arrivals[i]
            continue
        if now >= horizon:
            break
        s = step(now)
        now = s.end_time
        ends.append(now)
        tokens.append(s.plan.num_tokens)
        if detail is not None:
            plan = s.plan
            detail.append((s.start_time, now, plan.num_prefill_tokens, len(plan.decode),
                           plan.num_requests, s.demand, s.bound))
        if progress is not None and len(ends) >= next_report:
            progress(now, i)
            next_report = len(ends) + 2000
    return now, i


def request_times(admitted: Sequence[Request], n: int) -> tuple[np.ndarray, np.ndarray]:
    """First-token and finish times of ``n`` requests by id (NaN where not reached)."""
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    for r in admitted:
        if r.first_token_time is not None:
            first[r.rid] = r.first_token_time
        if r.finish_time is not None:
            finish[r.rid] = r.finish_time
    return first, finish


def _collect(engine: Engine, requests: Requests, admitted: list[Request], end_time: float,
             ends: list[float], tokens: list[int], detail: list[tuple] | None) -> Result:
    n = len(requests)
    first, finish = request_times(admitted, n)
    rejected = np.zeros(n, dtype=bool)
    rejected[[r.rid for r in engine.rejected]] = True
    batches = None
    if detail is not None:
        cols = np.array(detail, dtype=float).reshape(-1, len(BATCH_COLUMNS))
        batches = {name: cols[:, j] if j < 2 else cols[:, j].astype(np.int64)
                   for j, name in enumerate(BATCH_COLUMNS)}
        batches["duration"] = batches["end_time"] - batches["start_time"]
    return Result(
        scheduler=engine.scheduler.name,
        token_budget=engine.token_budget,
        end_time=end_time,
        arrival_time=requests.arrival_time,
        num_prompt_tokens=requests.num_prompt_tokens,
        num_output_tokens=requests.num_output_tokens,
        first_token_time=first,
        finish_time=finish,
        rejected=rejected,
        batch_end_time=np.asarray(ends, dtype=float),
        batch_tokens=np.asarray(tokens, dtype=np.int64),
        violations=engine.violations,
        batches=batches,
    )
