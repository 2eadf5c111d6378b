"""The reference event loop of one engine (paper §3.1): one :meth:`Engine.step` per batch.

Batches run back to back; arrivals during a batch wait for the next batch boundary (one arriving
exactly at a boundary joins that batch's planning); an idle engine starts a batch at the next
arrival.  The loop stops at the first batch boundary at or after ``horizon``.  This is the
executable specification: the compiled core (:mod:`llmqueue.core.fastcore`) runs the same batches,
bit for bit, and is checked against it (tests/test_core.py); it is also the loop that runs where
the core cannot (no C compiler, a scheduler that plans in Python, a batch time that depends on
more than the token load).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from llmqueue.core.engine import Engine
from llmqueue.model.request import Request

#: ``more`` of a streamed run: the next (arrivals, prompts, outputs, horizon), or None at the end.
More = Callable[[], "tuple[list[float], list[int], list[int], float] | None"]


def run_reference(engine: Engine, arrivals: list[float], prompts: list[int], outputs: list[int], horizon: float,
                  admitted: list[Request], ends: list[float], tokens: list[int], detail: list | None,
                  progress: Callable[[float, int], None] | None, more: More | None = None) -> tuple[float, int]:
    """Run the arrivals (request ids 0, 1, ... in order) through ``engine`` until ``horizon``.

    Appends every admitted request to ``admitted``, every batch's end and tokens to ``ends`` and
    ``tokens`` (and its :data:`~llmqueue.core.simulator.BATCH_COLUMNS` row to ``detail``); returns (final
    time, requests admitted).  ``more`` (streamed runs) is called when the arrivals run out and
    returns the next chunk and the horizon from then on (known with the last chunk), or None; it
    may consume and clear ``admitted``, ``ends`` and ``tokens`` in place.
    """
    # perf: the loop creates no reference cycles, but its allocations (requests, plans, steps)
    # would trigger the cyclic collector thousands of times (~10 % of a run).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(engine, arrivals, prompts, outputs, horizon, admitted, ends, tokens, detail, progress, more)
    finally:
        if enabled:
            gc.enable()


def _run(engine: Engine, arrivals: list[float], prompts: list[int], outputs: list[int], horizon: float,
         admitted: list[Request], ends: list[float], tokens: list[int], detail: list | None,
         progress: Callable[[float, int], None] | None, more: More | None) -> tuple[float, int]:
    n = len(arrivals)
    now, i, base = 0.0, 0, 0
    step = engine.step
    next_report = 0
    while True:
        # Admit every arrival up to this batch boundary.
        while True:
            while i < n and arrivals[i] <= now:
                request = Request(base + i, arrivals[i], prompts[i], outputs[i])
                admitted.append(request)
                engine.admit(request)
                i += 1
            if i < n or more is None:
                break
            chunk = more()  # streaming: the next arrivals
            if chunk is None:
                more = None
                break
            base += n
            arrivals, prompts, outputs, horizon = chunk
            n, i = len(arrivals), 0
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
            progress(now, base + i)
            next_report = len(ends) + 2000
    return now, base + i
