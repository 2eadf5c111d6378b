"""Shared helpers for the engine/scheduler tests (test_fig8.py, test_conformance.py).

Plain functions, imported with ``from conftest import ...`` (pytest puts tests/ on sys.path).
They drive :class:`~llmqueue.engine.Engine` directly (admit/step), without the simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from llmqueue.batch import BatchPlan
from llmqueue.batch_time import make_batch_time
from llmqueue.engine import Engine, Step
from llmqueue.request import Request
from llmqueue.schedulers import make_scheduler

ONE_SECOND = {"model": "constant", "duration_ms": 1000}


def make_engine(name: str, token_budget: int, *, cap: int | None = None,
                batch_time: Mapping | None = ONE_SECOND, **options) -> Engine:
    """An engine running scheduler ``name``; one second per batch unless told otherwise."""
    return Engine(make_scheduler(name, **options), token_budget, make_batch_time(batch_time), cap)


def put_decoding(engine: Engine, request: Request) -> None:
    """Place a request whose prefill is already done straight into the decoding list.

    ``Engine.admit`` only queues fresh requests: it appends them to ``state.prefilling``
    and adds their whole prompt to ``total_prefill_left``.  A request that is already
    decoding when a scenario starts (Fig. 8's A, B, C) is therefore put in place by hand,
    keeping the engine's one other counter (``num_in_engine``) consistent.
    """
    request.prefill_left = 0
    request.first_token_time = request.arrival_time
    engine.state.decoding.append(request)
    engine.num_in_engine += 1


def drive(engine: Engine, requests: Iterable[Request], *, max_steps: int = 10_000,
          on_admit: Callable[[Request, bool], None] | None = None,
          on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Run ``engine`` until it is empty and every request has arrived; return its steps.

    Requests are admitted (in arrival order) at the first batch boundary at or after
    their arrival time; an idle engine jumps to the next arrival.
    """
    pending = sorted(requests, key=lambda r: (r.arrival_time, r.rid))
    pending.reverse()
    steps: list[Step] = []
    now = 0.0
    while True:
        while pending and pending[-1].arrival_time <= now:
            request = pending.pop()
            accepted = engine.admit(request)
            if on_admit is not None:
                on_admit(request, accepted)
        if not engine.has_work:
            if not pending:
                return steps
            now = pending[-1].arrival_time
            continue
        assert len(steps) < max_steps, f"engine still busy after {max_steps} batches"
        step = engine.step(now)
        assert step.start_time == now
        steps.append(step)
        if on_step is not None:
            on_step(step)
        now = step.end_time


def label(plan: BatchPlan, names: Sequence[str]) -> list[str]:
    """Fig. 8 notation, sorted: ``"Ad"`` a decode token of A, ``"Dp"`` one prefill token
    of D, ``"Dp4"`` a prefill chunk of 4 tokens.  ``names[rid]`` names request ``rid``."""
    decode = [f"{names[r.rid]}d" for r in plan.decode]
    prefill = [f"{names[r.rid]}p" + ("" if n == 1 else str(n)) for r, n in plan.prefill]
    return sorted(decode + prefill)


def compositions(steps: Sequence[Step], names: Sequence[str]) -> list[list[str]]:
    """Every batch of a run in Fig. 8 notation (see :func:`label`)."""
    return [label(step.plan, names) for step in steps]
