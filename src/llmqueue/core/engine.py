"""One engine: a scheduler plus an executor of batches (PAPER.md §1–2, paper §3.1).

The engine admits requests, asks its scheduler for a plan at each batch boundary, times
the batch with the batch-time model, applies it through :func:`~llmqueue.model.request.apply_batch`
and checks work conservation (Eqs. 8–9): a batch must hold ``min(b_max, demand)`` tokens,
with ``demand = Σ p_i + #{decoding}``.  Under a request cap k_max the bound is the most
tokens any k_max requests could take, ``min(b_max, sum of the k_max largest shares)``.
"""

from __future__ import annotations

import heapq
import warnings
from bisect import bisect_left, insort
from dataclasses import dataclass
from operator import attrgetter

from llmqueue.model.batch import BatchPlan
from llmqueue.model.batch_time import AssumptionWarning, BatchTime
from llmqueue.checks import integer
from llmqueue.errors import InternalError
from llmqueue.model.request import Request, apply_batch
from llmqueue.schedulers import EngineState, Scheduler

_RID = attrgetter("rid")


@dataclass(frozen=True, slots=True)
class Step:
    """What one executed batch did."""

    plan: BatchPlan
    start_time: float
    end_time: float
    demand: int              # Σ p_i + #decoding at the batch's start (Eq. 8)
    bound: int               # tokens a work-conserving batch holds: min(b_max, demand), cap-aware
    finished: list[Request]


class Engine:
    """A scheduler, a token budget, an optional request cap and a batch-time model."""

    def __init__(self, scheduler: Scheduler, token_budget: int, batch_time: BatchTime,
                 max_batch_requests: int | None = None) -> None:
        token_budget = integer(token_budget, "engine.token_budget", 1,
                               what="a batch must fit at least one decode token")
        if max_batch_requests is not None:
            max_batch_requests = integer(max_batch_requests, "engine.max_batch_requests", 1,
                                         what="or omitted for no cap")
        self.scheduler = scheduler
        self.token_budget = token_budget
        self.max_batch_requests = max_batch_requests
        self.batch_time = batch_time
        self.state = EngineState(token_budget, max_batch_requests)
        self.durations = batch_time.table(token_budget)  # t_b for 0..budget tokens (index 0 unused)
        self._tokens_only = batch_time.tokens_only
        bind = getattr(scheduler, "bind_batch_time", None)
        if bind is not None:  # a policy that plans by batch time (schedulers/maxweight.py, paper §6)
            bind(batch_time, token_budget)
        for message in batch_time.assumption_warnings(token_budget):
            warnings.warn(message, AssumptionWarning, stacklevel=2)
        self.num_in_engine = 0
        self.violations = 0
        self.rejected: list[Request] = []

    @property
    def has_work(self) -> bool:
        return self.num_in_engine > 0

    def admit(self, request: Request) -> bool:
        """Queue ``request``; a prompt the scheduler can never serve is rejected (False)."""
        if request.num_prompt_tokens > self.token_budget and not self.scheduler.splits_prompts:
            self.rejected.append(request)
            return False
        self.state.prefilling.append(request)
        self.state.total_prefill_left += request.num_prompt_tokens
        self.num_in_engine += 1
        return True

    def demand(self) -> int:
        """Σ p_i + number of decoding requests (Eq. 8)."""
        return self.state.total_prefill_left + len(self.state.decoding)

    def bound(self, demand: int) -> int:
        """Tokens a work-conserving batch must hold now (cap-aware under k_max)."""
        k = self.max_batch_requests
        state = self.state
        if k is None or self.num_in_engine <= k:
            return min(self.token_budget, demand)
        shares = heapq.nlargest(k, (r.prefill_left for r in state.prefilling))
        best = sum(shares) + min(k - len(shares), len(state.decoding))
        return min(self.token_budget, best)

    def step(self, now: float) -> Step:
        """Plan, time and apply one batch starting at ``now``."""
        state = self.state
        demand = self.demand()
        bound = self.bound(demand)
        plan = self.scheduler.plan(state)
        tokens = plan.num_tokens
        if tokens < 1 or tokens > self.token_budget:
            raise InternalError(f"{self.scheduler!r} planned {tokens} tokens with demand {demand}")
        if tokens != bound:
            self.violations += 1
        end = now + (self.durations[tokens] if self._tokens_only else self.batch_time.plan_seconds(plan))
        finished = apply_batch(plan.prefill, plan.decode, end)
        state.total_prefill_left -= plan.num_prefill_tokens
        self._requeue(plan, finished)
        self.num_in_engine -= len(finished)
        return Step(plan, now, end, demand, bound, finished)

    def _requeue(self, plan: BatchPlan, finished: list[Request]) -> None:
        """Drop finished decoders; move requests whose prefill ended to ``decoding``.

        Invariant: ``decoding`` is sorted by arrival (rid), the FCFS order schedulers use.
        """
        state = self.state
        decoding = state.decoding
        for request in finished:
            if request.num_output_tokens:  # it finished by a decode token, so it was decoding
                # perf: bisect + del (a C memmove) instead of rebuilding the list per finish;
                # rebuilding made runs with thousands of decoders ~4x slower.
                i = bisect_left(decoding, request.rid, key=_RID)
                if i == len(decoding) or decoding[i] is not request:
                    raise InternalError(f"finished request {request.rid} was not decoding")
                del decoding[i]
        if not plan.prefill:
            return
        prefilling = state.prefilling
        popped = set()
        # perf: FCFS policies finish prefills at the head of the queue: pop them in O(1).
        while prefilling and prefilling[0].prefill_left == 0:
            popped.add(id(prefilling.popleft()))
        done = [r for r, _ in plan.prefill if r.prefill_left == 0]
        for request in done:
            if id(request) not in popped:
                # perf: a class-priority policy finishes prefills deep in the queue; remove them
                # by identity (a C scan) instead of rebuilding the queue in Python, which cost
                # 85% of a Rybko–Stolyar run once a low-priority class piled up.
                prefilling.remove(request)
        for request in done:
            if not request.decode_left:
                continue
            if decoding and decoding[-1].rid > request.rid:
                insort(decoding, request, key=_RID)
            else:
                decoding.append(request)
