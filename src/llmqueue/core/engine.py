"""One engine: a scheduler plus an executor of batches (arXiv 2504.07347 §3.1, Eqs. 8–9).

The engine admits requests, asks its scheduler for a plan at each batch boundary, times
the batch with the batch-time model, applies it through :func:`~llmqueue.model.request.apply_batch`
and checks work conservation (Eqs. 8–9): a batch must hold ``min(b_max, demand)`` tokens,
with ``demand = Σ p_i + #{decoding}``.  Under a request cap k_max the bound is the most
tokens any k_max requests could take, ``min(b_max, sum of the k_max largest shares)``.

With KV memory (``kv``, :mod:`llmqueue.model.kv`) the engine also holds blocks: it applies the
plan's preemptions, takes the blocks of each scheduled token and frees a finished request's;
a batch that memory kept smaller is counted in ``memory_limited``, not as a violation.

With prefix caching (``kv.prefix_caching``, docs/prefix_caching.md) the blocks live in a
:class:`~llmqueue.model.kv.PrefixPool` that the plan changes as it is made (vLLM's scheduler
allocates while it schedules); tokens found in the cache leave the demand before the batch's
work-conserving bound is taken.  ``contents`` (set by :func:`~llmqueue.core.simulator.simulate`) gives
each request's content description by request id.

A request may arrive with *computed context*: the first ``computed`` tokens of its prompt already
have their KV on this engine (prefill/decode disaggregation: moved over from a prefill replica,
docs/cluster.md).  It waits in :attr:`Engine.awaiting` (vLLM: WAITING) until blocks for its whole
sequence are free, then takes the blocks of its computed tokens and joins the running requests
(:meth:`Engine._admit_context`).  A preempted one recomputes its whole sequence here, prompt
included, as vLLM's decode instance does (the connector loads a request's KV once).
"""

from __future__ import annotations

import heapq
import os
import warnings
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass
from operator import attrgetter

from llmqueue.model.batch import BatchPlan
from llmqueue.model.batch_time import AssumptionWarning, BatchTime
from llmqueue.checks import integer
from llmqueue.errors import InternalError
from llmqueue.model.kv import KVCache, PrefixPool
from llmqueue.model.request import Request, apply_batch
from llmqueue.schedulers import EngineState, Scheduler
from llmqueue.schedulers.plan import seq_len, started_kv

_RID = attrgetter("rid")
_STAMP = attrgetter("stamp")
#: LLMQUEUE_CHECKS=1: check the engine's invariants after every batch (tests; slower)
CHECKS = os.environ.get("LLMQUEUE_CHECKS", "") not in ("", "0")


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
                 max_batch_requests: int | None = None, kv: KVCache | None = None, checks: bool | None = None) -> None:
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
        if kv is not None and not isinstance(kv, KVCache):
            raise InternalError(f"engine kv must be a KVCache, not {kv!r}")
        self.kv = kv
        self.pool = PrefixPool(kv) if kv is not None and kv.prefix_caching else None
        self.state.kv = kv if self.pool is None else self.pool
        self.contents = None     # prefix caching: request id -> content spans (or None)
        self.checks = CHECKS if checks is None else checks
        self._key = _RID if kv is None else _STAMP   # the decoding list's order: arrival, or admission
        self._stamps = 0
        self.memory_limited = 0      # batches memory kept below the work-conserving bound
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.kv_starts: list[float] = []  # with kv, each batch's start,
        self.kv_series: list[int] = []   # its blocks in use (after its allocation)
        self.kv_waste: list[int] = []     # and its tokens computed again after a preemption
        self.awaiting: deque[Request] = deque()   # computed context, waiting for blocks (FCFS)
        #: every request arrives with its prompt's KV but for its last token (a decode replica of
        #: prefill/decode disaggregation: ``admit`` takes computed = prompt − 1)
        self.transferred_prompts = False

    @property
    def has_work(self) -> bool:
        return self.num_in_engine > 0

    def admit(self, request: Request, computed: int = 0) -> bool:
        """Queue ``request``; a prompt the scheduler can never serve is rejected (False).  ``computed``:
        tokens of its prompt whose KV is already here (module note; needs KV memory)."""
        if self.transferred_prompts and not computed:
            computed = request.num_prompt_tokens - 1
        if computed and (self.kv is None or self.pool is not None or not 0 < computed < request.num_prompt_tokens):
            raise InternalError(f"request {request.rid}: {computed} computed tokens of {request.num_prompt_tokens} "
                                "need KV memory without prefix caching and at least one prompt token to compute")
        if request.num_prompt_tokens - computed > self.token_budget and not self.scheduler.splits_prompts:
            self.rejected.append(request)
            return False
        if self.kv is not None and not self.kv.fits(request.num_prompt_tokens, request.num_output_tokens):
            self.rejected.append(request)   # larger than the whole cache: it could never finish
            return False
        if computed:
            request.prefill_left = request.num_prompt_tokens - computed
            self.awaiting.append(request)
            self.num_in_engine += 1
            return True
        if self.pool is not None:
            request.blocks = []
            contents = self.contents
            if contents is not None and request.content is None:
                request.content = contents[request.rid]
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
        awaiting = self.awaiting
        if awaiting:
            self._admit_context()
        demand = self.demand()
        bound = self.bound(demand)
        plan = self.scheduler.plan(state)
        if self.kv is not None:
            for _ in range(3):   # preempting everyone running leaves an empty plan: plan again
                if plan.num_tokens or not plan.preempted:
                    break
                self._preempt(plan.preempted)
                demand = self.demand()
                bound = self.bound(demand)
                plan = self.scheduler.plan(state)
        if self.pool is not None:   # tokens found in the cache are no longer demand
            demand = self.demand()
            bound = self.bound(demand)
        tokens = plan.num_tokens
        if tokens < 1 or tokens > self.token_budget:
            raise InternalError(f"{self.scheduler!r} planned {tokens} tokens with demand {demand}")
        if plan.memory_limited or awaiting:   # (awaiting: memory keeps a request out)
            self.memory_limited += 1
        elif tokens != bound:
            self.violations += 1
        end = now + (self.durations[tokens] if self._tokens_only else self.batch_time.plan_seconds(plan))
        if self.kv is not None:
            if plan.preempted:
                self._preempt(plan.preempted)
            self._allocate(plan)
            self.kv_starts.append(now)
        finished = apply_batch(plan.prefill, plan.decode, end)
        state.total_prefill_left -= plan.num_prefill_tokens
        self._requeue(plan, finished)
        self.num_in_engine -= len(finished)
        if self.kv is not None:
            kv = self.kv
            pool = self.pool
            if pool is None:
                state.kv_used -= sum(kv.blocks_for(r.num_prompt_tokens + r.num_output_tokens) for r in finished)
            else:   # freed in vLLM's order: the batch's scheduling order (admission order)
                for r in sorted(finished, key=_STAMP) if len(finished) > 1 else finished:
                    pool.free_request(r)
                state.kv_used = pool.in_use
            if self.checks:
                self.check()
        return Step(plan, now, end, demand, bound, finished)

    # ---- KV memory (model/kv.py) ---------------------------------------------------------

    def _preempt(self, victims) -> None:
        """Apply a plan's preemptions, in order: free each victim's blocks and put it at the front of
        the waiting prompts, to recompute its whole sequence (vLLM's ``_preempt_request``)."""
        state = self.state
        kv = self.kv
        pool = self.pool
        for victim in victims:
            held = seq_len(victim) - victim.prefill_left
            if pool is None:
                state.kv_used -= kv.blocks_for(held)   # (with prefix caching the plan freed them)
            victim.preemptions += 1
            if held > victim.peak:
                victim.peak = held
            self.preemptions += 1
            if victim.prefill_left == 0:   # a decoder: remove it, its next decode token joins the recompute
                decoding = state.decoding
                i = bisect_left(decoding, victim.stamp, key=_STAMP)
                if i == len(decoding) or decoding[i] is not victim:
                    raise InternalError(f"preempted request {victim.rid} was not decoding")
                del decoding[i]
                victim.decode_left -= 1
            else:
                state.prefilling.remove(victim)
            left = seq_len(victim)
            state.total_prefill_left += left - victim.prefill_left
            victim.prefill_left = left
            prefilling = state.prefilling
            at = 0   # the front of the waiting prompts: behind those holding blocks
            while at < len(prefilling) and prefilling[at].prefill_left != seq_len(prefilling[at]):
                at += 1
            prefilling.insert(at, victim)

    def _admit_context(self) -> None:
        """Before a batch is planned, start waiting requests with computed context, first come first
        served, while blocks for the whole sequence are free once every running request has grown by
        its next chunk (``reserve``: blocks for prompt + output, nothing to grow).  Each takes the
        blocks of its computed tokens (``reserve``: all) and joins the running requests last.  vLLM
        ``Scheduler.schedule``: the waiting phase after the running one, ``allocate_slots`` with
        ``num_external_computed_tokens`` and ``full_sequence_must_fit``; the first refusal ends it."""
        kv = self.kv
        state = self.state
        awaiting = self.awaiting
        reserve = kv.policy == "reserve"
        free = kv.usable - state.kv_used
        started = started_kv(state)
        if not reserve and state.kv_used:   # blocks the running requests take in this batch, at most
            size, budget = kv.block_size, self.token_budget
            free -= sum(1 for r in state.decoding if seq_len(r) % size == 0)
            for j in range(started):
                r = state.prefilling[j]
                done = seq_len(r) - r.prefill_left
                free -= kv.blocks_for(done + min(r.prefill_left, budget)) - kv.blocks_for(done)
        at = started   # behind the prompts that hold blocks, ahead of the waiting ones
        while awaiting:
            request = awaiting[0]
            need = kv.blocks_for(request.num_prompt_tokens + request.num_output_tokens if reserve else seq_len(request))
            if need > free:
                break
            awaiting.popleft()
            take = need if reserve else kv.blocks_for(seq_len(request) - request.prefill_left)
            free -= need   # (headroom for its own chunk in this batch)
            state.kv_used += take
            self._stamps += 1
            request.stamp = self._stamps
            state.prefilling.insert(at, request)
            at += 1
            state.total_prefill_left += request.prefill_left

    def _allocate(self, plan: BatchPlan) -> None:
        """Take the blocks of a planned batch (before it is applied); stamp newly admitted requests."""
        if self.pool is not None:
            self._allocate_prefix(plan)
            return
        state = self.state
        kv = self.kv
        reserve = kv.policy == "reserve"
        used = state.kv_used
        waste = 0
        for request, chunk in plan.prefill:
            done = seq_len(request) - request.prefill_left
            if done == 0:   # admitted now: it joins the running requests last
                self._stamps += 1
                request.stamp = self._stamps
                if reserve:
                    used += kv.blocks_for(request.num_prompt_tokens + request.num_output_tokens)
            if not reserve:
                used += kv.blocks_for(done + chunk) - kv.blocks_for(done)
                if done < request.peak:   # computed before its preemption: computed again
                    again = min(done + chunk, request.peak) - done
                    request.recomputed += again
                    waste += again
        if not reserve:
            size = kv.block_size
            for request in plan.decode:
                done = seq_len(request)   # a decoder has no prefill left
                if done % size == 0:
                    used += 1
        state.kv_used = used
        if used > kv.usable:
            raise InternalError(f"{used} KV blocks in use, more than the {kv.usable} usable")
        self.kv_series.append(used)
        self.kv_waste.append(waste)
        self.recomputed_tokens += waste

    def _allocate_prefix(self, plan: BatchPlan) -> None:
        """:meth:`_allocate` with prefix caching: the plan took the blocks; stamp the requests it
        admitted and count the tokens computed again (the cached ones are not)."""
        pool = self.pool
        admitted = pool.admitted
        waste = 0
        for request, chunk in plan.prefill:
            if id(request) in admitted:
                self._stamps += 1
                request.stamp = self._stamps
            done = seq_len(request) - request.prefill_left
            if done < request.peak:
                again = min(done + chunk, request.peak) - done
                request.recomputed += again
                waste += again
        admitted.clear()
        used = self.state.kv_used = pool.in_use
        self.kv_series.append(used)
        self.kv_waste.append(waste)
        self.recomputed_tokens += waste

    def check(self) -> None:
        """The invariants of the engine's state (with ``checks``): every request in its queue,
        tokens conserved, KV blocks in use = Σ blocks of the running requests <= kv_blocks − 1."""
        state = self.state
        kv = self.kv
        requests = list(state.prefilling) + state.decoding
        if len(requests) + len(self.awaiting) != self.num_in_engine or len({id(r) for r in requests}) != len(requests):
            raise InternalError(f"{len(requests)} requests queued, {self.num_in_engine} in the engine")
        if state.total_prefill_left != sum(r.prefill_left for r in state.prefilling):
            raise InternalError("total_prefill_left does not match the queued prefills")
        for r in requests:
            if not (0 <= r.decode_left <= r.num_output_tokens and 0 <= r.prefill_left <= seq_len(r)):
                raise InternalError(f"request {r.rid} lost tokens: {r!r}")
        for r in state.decoding:
            if r.prefill_left or not r.decode_left:
                raise InternalError(f"request {r.rid} is decoding with {r!r}")
        if kv is None:
            return
        if any(state.decoding[j].stamp >= state.decoding[j + 1].stamp for j in range(len(state.decoding) - 1)):
            raise InternalError("decoding is not in admission order")
        if self.pool is not None:   # shared blocks counted once; cached free ones are free
            holders = [r for r in requests if r.prefill_left != seq_len(r)]
            for r in requests:
                if len(r.blocks) != kv.blocks_for(seq_len(r) - r.prefill_left):
                    raise InternalError(f"request {r.rid} holds {len(r.blocks)} blocks for "
                                        f"{seq_len(r) - r.prefill_left} computed tokens")
            self.pool.check(holders)
            if state.kv_used != self.pool.in_use or self.pool.in_use + len(self.pool.lru) > kv.usable:
                raise InternalError(f"KV blocks in use {state.kv_used}, pool {self.pool.in_use}")
            return
        if kv.policy == "reserve":
            held = sum(kv.blocks_for(r.num_prompt_tokens + r.num_output_tokens) for r in requests
                       if r.prefill_left != seq_len(r))
        else:
            held = sum(kv.blocks_for(seq_len(r) - r.prefill_left) for r in requests)
        if held != state.kv_used or held > kv.usable:
            raise InternalError(f"KV blocks in use {state.kv_used}, held by requests {held}, usable {kv.usable}")

    def _requeue(self, plan: BatchPlan, finished: list[Request]) -> None:
        """Drop finished decoders; move requests whose prefill ended to ``decoding``.

        Invariant: ``decoding`` is sorted by arrival (rid), the FCFS order schedulers use.
        """
        state = self.state
        decoding = state.decoding
        key = self._key
        # with KV a recompute can finish at its prefill (its last token joined it on preemption)
        by_prefill = {id(r) for r, _ in plan.prefill if r.prefill_left == 0} if self.kv is not None else ()
        for request in finished:
            if request.num_output_tokens and id(request) not in by_prefill:
                # it finished by a decode token, so it was decoding
                # perf: bisect + del (a C memmove) instead of rebuilding the list per finish;
                # rebuilding made runs with thousands of decoders ~4x slower.
                i = bisect_left(decoding, key(request), key=key)
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
            if decoding and key(decoding[-1]) > key(request):
                insort(decoding, request, key=key)
            else:
                decoding.append(request)
