"""The paper's worked example (Fig. 8, arXiv 2504.07347 §4) and helpers that drive an engine by hand.

:func:`drive` runs an :class:`~llmqueue.core.engine.Engine` batch by batch without the simulator,
admitting each request at the first batch boundary at or after its arrival;
:func:`put_decoding` places a request that is already decoding when a scenario starts.
:func:`run_fig8` replays Fig. 8 — A, B, C decoding with 2, 4, 3 decode tokens left; D and E
(1 prefill + 1 decode token each) arriving during the first batch — for one scheduler.
The tests (tests/test_fig8.py) and ``llmqueue reproduce`` use these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from llmqueue.model.batch import BatchPlan
from llmqueue.model.batch_time import make_batch_time
from llmqueue.core.engine import Engine, Step
from llmqueue.model.request import Request
from llmqueue.schedulers import make_scheduler

ONE_SECOND = {"model": "constant", "duration_ms": 1000}
FIG8_NAMES = "ABCDE"

# The paper's published sequences (§4, a reconstruction of Fig. 8), with the token
# budget each is drawn for.  Typed in from the paper: the target, never a result.
FIG8_PUBLISHED: dict[str, tuple[int, str]] = {
    "vllm": (4, "[Ad Bd Cd] [Dp Ep] [Ad Bd Cd Dd] [Bd Cd Ed] [Bd]"),
    "orca": (5, "[Ad Bd Cd] [Ad Bd Cd Dp Ep] [Bd Cd Dd Ed] [Bd]"),
    "fastertransformer": (4, "[Ad Bd Cd] [Ad Bd Cd] [Bd Cd] [Bd] [Dp Ep] [Dd Ed]"),
    "sarathi": (4, "[Ad Bd Cd] [Ad Bd Cd Dp] [Bd Cd Dd Ep] [Bd Ed]"),
}


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
        if len(steps) >= max_steps:
            raise RuntimeError(f"engine still busy after {max_steps} batches")
        step = engine.step(now)
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


def parse_sequence(text: str) -> list[list[str]]:
    """``"[Ad Bd] [Dp]"`` -> ``[["Ad", "Bd"], ["Dp"]]`` (each batch sorted, as :func:`label` does)."""
    return [sorted(batch.split()) for batch in text.strip("[] ").split("] [")]


def show_sequence(batches: Sequence[Sequence[str]]) -> str:
    return " ".join("[" + " ".join(b) + "]" for b in batches)


def run_fig8(name: str, token_budget: int, **options) -> tuple[Engine, list[Step]]:
    """Fig. 8 for scheduler ``name``: one-second batches, D and E arriving at 0.5 s."""
    engine = make_engine(name, token_budget, **options)
    for rid, decode_left in enumerate((2, 4, 3)):        # A, B, C: decoding at t = 0
        put_decoding(engine, Request(rid, 0.0, 1, decode_left))
    late = [Request(rid, 0.5, 1, 1) for rid in (3, 4)]   # D, E: arrive during batch 1
    return engine, drive(engine, late)


__all__ = ["FIG8_NAMES", "FIG8_PUBLISHED", "compositions", "drive", "label", "make_engine", "parse_sequence",
           "put_decoding", "run_fig8", "show_sequence"]
