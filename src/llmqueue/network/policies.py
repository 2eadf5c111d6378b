"""Per-engine policies across classes (paper §5).

* ``fcfs`` (default): the engine's scheduler sees one queue in order of arrival at the engine
  (sub-requests get increasing ids as they are admitted), so Sarathi-Serve is the paper's K-FCFS.
* ``priority``: strict class priority (``class_priority = [...]``, highest first; unlisted
  classes last, FCFS among them) wrapping any scheduler.
* ``max-pressure``: a network-aware back-pressure policy (below).

The two class-aware policies are :class:`GroupedScheduler` s: the engine's requests are kept
in groups (a class, or a class's hop), each group in the engine's arrival order, and each
batch is planned group by group in an order chosen for that batch.  The wrapped scheduler
plans each group on a view of the engine (:class:`~llmqueue.schedulers.EngineState`) whose
budget and request cap are what the earlier groups left; the pieces are added to one
:class:`~llmqueue.model.batch.BatchBuilder`, which keeps all budget and cap arithmetic.  A
work-conserving wrapped scheduler fills min(room, the group's demand) for each group, so the
whole batch holds min(b_max, demand) tokens and the engine's work-conservation check (Eqs. 8–9)
still applies unchanged (with a request cap k_max this is no longer guaranteed).

**Max-pressure adapted to token budgets.**  Treat each (class, hop) served at an engine as a
buffer b with Z_b requests in it.  Serving one token of b completes 1/m_b requests on average
(m_b: mean tokens of a visit to b, prompt growth included), each of which moves to the engine
hops l that follow b with expected multiplicity P_bl (branch probabilities, forks, loops,
looking through delay stations; from the traffic equations).  The pressure of b is

    pressure_b = (Z_b − Σ_l P_bl Z_l) / m_b,

the drop in Σ Z² per token served (Tassiulas & Ephremides 1992; Dai & Lin 2005, "Maximum
pressure policies in stochastic processing networks", where the policy that serves the
buffers of largest pressure is proved throughput-optimal for multiclass queueing networks,
cyclic ones included).  Here each batch gives its token budget to the buffers in decreasing
pressure (ties: the oldest request first), so a buffer whose downstream queues are long
yields to one whose work leaves the network or feeds an idle engine; unlike textbook
max-pressure it never idles a budget that some buffer could use, so it stays
work-conserving.  The stability proof is for the unbatched model; for token-budget engines we
show it by simulation (docs/network.md: bounded on Rybko–Stolyar at ρ = 0.9 and 0.95 where
the wrong static priority diverges).

**KV memory** (an engine with ``kv_blocks``; docs/network.md, "KV-cache memory").  The wrapped
scheduler's plan of each group is vLLM's memory rules (:class:`~llmqueue.schedulers.plan.Memory`)
on that group, with the blocks the earlier groups of the batch left: the group's running
requests grow, preempting the *group's own* running tail when blocks run out; its waiting
prompts start when their whole sequence fits.  Blocks held by another group are never taken
(the reference :class:`Memory` chooses victims among the requests of the state it plans, and a
group is planned on a view holding only its own requests).  As in vLLM, no waiting prompt
starts in a batch after a preemption: once a group has preempted, the later groups serve only
their running requests (a group planned before it may have started some).  The groups mirror
the engine's preemptions (:meth:`GroupedScheduler._sync`) and, with memory, keep their
decoders in admission order (``stamp``), as the engine does.

**Prefix caching** (``prefix_caching``; docs/prefix_caching.md).  The view holds the engine's
:class:`~llmqueue.model.kv.PrefixPool`, so each group is planned with
:class:`~llmqueue.schedulers.plan.PrefixMemory`: its waiting visits look up their cached prefix
in the one pool that every group shares, take new blocks from it (evicting cached free blocks
when no fresh one is left) and cache their full blocks as they are scheduled, so a later group
of the same batch can already hit them, as in vLLM.  The tokens a group's visits find cached
leave the group's and the engine's prefill left (PrefixMemory subtracts them from the view).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from itertools import islice
from operator import attrgetter

from llmqueue.model.batch import BatchPlan
from llmqueue.errors import InternalError
from llmqueue.model.kv import RESERVE, KVCache
from llmqueue.model.request import Request
from llmqueue.schedulers import EngineState, Scheduler
from llmqueue.schedulers.plan import seq_len

_RID = attrgetter("rid")
_STAMP = attrgetter("stamp")


class GroupedScheduler(Scheduler):
    """Wraps a scheduler: plans each batch group by group in :meth:`order`.

    Keeps, per group, the engine's requests in its order (prefilling queue, decoding list
    sorted by id) up to date through :meth:`admitted` and :meth:`applied`, which the network
    calls after :meth:`Engine.admit <llmqueue.core.engine.Engine.admit>` and after each step.
    """

    policy = "grouped"
    summary = "plans each batch group by group"
    work_conserving = False

    def __init__(self, inner: Scheduler, group_of: dict[tuple[int, int], int], num_groups: int,
                 kv: KVCache | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{self.policy}({inner.name})"
        self.work_conserving = inner.work_conserving
        self.settings = inner.settings
        self.group_of = group_of                  # (class, hop) -> group
        self.prefilling: list[deque[Request]] = [deque() for _ in range(num_groups)]
        self.decoding: list[list[Request]] = [[] for _ in range(num_groups)]
        self.prefill_left = [0] * num_groups
        self.kv = kv                              # the engine's cache (None: unlimited memory)
        self._key = _RID if kv is None else _STAMP   # the decoders' order: arrival, or admission (as the engine)
        # with kv: the last plan's preemptions, [(victim, its prefill_left then, it was decoding)], which the
        # engine applies after the plan is returned; mirrored in the groups by _sync before anything else
        self._pending: list[tuple[Request, int, bool]] = []

    @property
    def splits_prompts(self) -> bool:
        return self.inner.splits_prompts

    def bind_batch_time(self, batch_time, token_budget: int) -> None:
        """Pass the engine's batch time on to a wrapped policy that plans by it (Engine calls this)."""
        bind = getattr(self.inner, "bind_batch_time", None)
        if bind is not None:
            bind(batch_time, token_budget)

    def order(self) -> list[int]:
        """Groups in the order this batch serves them."""
        raise NotImplementedError

    def admitted(self, request: Request) -> None:
        g = request.group
        self.prefilling[g].append(request)
        self.prefill_left[g] += request.num_prompt_tokens

    def applied(self, plan: BatchPlan, finished: list[Request]) -> None:
        """Mirror the engine's own requeueing for the groups (after ``Engine.step``)."""
        key = self._key
        by_prefill = ()
        if self.kv is not None:
            self._sync()   # the batch's preemptions, applied by the engine before the batch ran
            # a recompute can finish at its prefill (its last token joined it on preemption)
            by_prefill = {id(r) for r, _ in plan.prefill if r.prefill_left == 0}
        for request in finished:
            if request.num_output_tokens and id(request) not in by_prefill:  # finished by a decode token
                decoding = self.decoding[request.group]
                i = bisect_left(decoding, key(request), key=key)
                if i == len(decoding) or decoding[i] is not request:
                    raise InternalError(f"finished request {request.rid} was not decoding in its group")
                del decoding[i]
        for request, chunk in plan.prefill:
            g = request.group
            self.prefill_left[g] -= chunk
            if request.prefill_left == 0:
                queue = self.prefilling[g]
                if queue[0] is request:
                    queue.popleft()
                else:
                    queue.remove(request)
                if request.decode_left:
                    decoding = self.decoding[g]
                    if decoding and key(decoding[-1]) > key(request):
                        insort(decoding, request, key=key)
                    else:
                        decoding.append(request)

    def _sync(self) -> None:
        """Mirror the preemptions of the last plan, which the engine has applied since
        (``Engine._preempt``): each victim leaves its group's decoders (or started prompts) and
        waits at the front of the group's prompts that hold no blocks, to recompute its sequence."""
        pending, self._pending = self._pending, []
        for victim, before, was_decoding in pending:
            g = victim.group
            queue = self.prefilling[g]
            if was_decoding:
                decoding = self.decoding[g]
                i = bisect_left(decoding, victim.stamp, key=_STAMP)
                if i == len(decoding) or decoding[i] is not victim:
                    raise InternalError(f"preempted request {victim.rid} was not decoding in its group")
                del decoding[i]
            else:
                queue.remove(victim)
            self.prefill_left[g] += victim.prefill_left - before
            at = 0   # behind the group's prompts holding blocks, as the engine places it in its queue
            while at < len(queue) and queue[at].prefill_left != seq_len(queue[at]):
                at += 1
            queue.insert(at, victim)

    def check(self, state: EngineState) -> None:
        """The groups mirror the engine (with the engine's checks): the same requests, prefill left
        per group, decoders in the engine's order, and with memory the prompts holding blocks first."""
        key = self._key
        grouped = [r for q in self.prefilling for r in q]
        if {id(r) for r in grouped} != {id(r) for r in state.prefilling} or len(grouped) != len(state.prefilling):
            raise InternalError(f"{self.name}: the groups' prompts differ from the engine's")
        decoders = [r for d in self.decoding for r in d]
        if {id(r) for r in decoders} != {id(r) for r in state.decoding} or len(decoders) != len(state.decoding):
            raise InternalError(f"{self.name}: the groups' decoders differ from the engine's")
        for g, (queue, decoding) in enumerate(zip(self.prefilling, self.decoding, strict=True)):
            if self.prefill_left[g] != sum(r.prefill_left for r in queue):
                raise InternalError(f"{self.name}: group {g}'s prefill left does not match its prompts")
            if any(key(decoding[i]) >= key(decoding[i + 1]) for i in range(len(decoding) - 1)):
                raise InternalError(f"{self.name}: group {g}'s decoders are out of order")
            if self.kv is not None:
                holding = [r.prefill_left != seq_len(r) for r in queue]
                if any(holding[i + 1] and not holding[i] for i in range(len(holding) - 1)):
                    raise InternalError(f"{self.name}: group {g} has a prompt holding blocks behind a waiting one")

    def plan(self, state: EngineState) -> BatchPlan:
        if state.kv is not None:
            return self._plan_kv(state)
        batch = state.builder()
        view = EngineState(state.token_budget, state.max_batch_requests)
        capped = state.max_batch_requests is not None
        for g in self.order():
            if batch.full:
                break
            if not self.prefilling[g] and not self.decoding[g]:
                continue
            view.token_budget = batch.room
            view.max_batch_requests = batch.slots if capped else None
            view.prefilling, view.decoding, view.total_prefill_left = (self.prefilling[g], self.decoding[g],
                                                                       self.prefill_left[g])
            part = self.inner.plan(view)
            self._add(batch, part)
        return batch.build()

    def _add(self, batch, part: BatchPlan) -> None:
        """A group's plan into the engine's batch; it was planned within the room left, so it fits."""
        if batch.add_decodes(part.decode) != len(part.decode):
            raise InternalError(f"{self.name}: a group's decodes did not fit the room it was given")
        for request, chunk in part.prefill:
            if batch.add_prefill(request, split=True, max_chunk=chunk) != chunk:
                raise InternalError(f"{self.name}: a group's prefill chunk did not fit the room it was given")

    def _plan_kv(self, state: EngineState) -> BatchPlan:
        """:meth:`plan` with KV memory (module docstring): each group planned with the memory rules
        on the blocks the earlier groups left; no new prompt starts after a preemption."""
        pool = state.kv if getattr(state.kv, "prefix_caching", False) else None   # a PrefixPool
        if (state.kv if pool is None else pool.cache) != self.kv:
            raise InternalError(f"{self.name}: built for cache {self.kv!r}, planning for {state.kv!r}")
        self._sync()
        kv = state.kv
        batch = state.builder()
        view = EngineState(state.token_budget, state.max_batch_requests)
        view.kv = kv
        capped = state.max_batch_requests is not None
        used = state.kv_used
        preempted: list[Request] = []
        limited = False
        for g in self.order():
            if batch.full:
                break
            prefilling, decoding, left = self.prefilling[g], self.decoding[g], self.prefill_left[g]
            if not prefilling and not decoding:
                continue
            if preempted:   # vLLM starts no waiting request in a step with a preemption
                started = 0
                for r in prefilling:
                    if r.prefill_left == seq_len(r):
                        break
                    started += 1
                if started < len(prefilling):
                    limited = True   # memory's rule keeps these prompts out of this batch
                    prefilling = deque(islice(prefilling, started))
                    left = sum(r.prefill_left for r in prefilling)
                    if not prefilling and not decoding:
                        continue
            view.token_budget = batch.room
            view.max_batch_requests = batch.slots if capped else None
            view.prefilling, view.decoding, view.total_prefill_left = prefilling, decoding, left
            view.kv_used = used
            part = self.inner.plan(view)
            self._add(batch, part)
            if pool is not None:
                # PrefixMemory took the blocks from the shared pool as it planned (and freed the victims'),
                # and the tokens its admitted requests found cached left the view's prefill: mirror them
                used = pool.in_use
                hit = left - view.total_prefill_left
                if hit:
                    state.total_prefill_left -= hit
                    self.prefill_left[g] -= hit
            else:
                used += _blocks_taken(kv, part)
                for victim in part.preempted:
                    used -= kv.blocks_for(seq_len(victim) - victim.prefill_left)
            if used > kv.usable:
                raise InternalError(f"{self.name}: {used} KV blocks planned, {kv.usable} usable")
            preempted.extend(part.preempted)
            limited = limited or part.memory_limited
        self._pending = [(v, v.prefill_left, v.prefill_left == 0) for v in preempted]
        return batch.build(tuple(preempted), limited)


def _blocks_taken(kv: KVCache, part: BatchPlan) -> int:
    """Blocks a group's planned part takes when the engine allocates it (``Engine._allocate``):
    each chunk's new blocks (under ``reserve`` a starting request's whole prompt + output), and a
    block for each decode token that starts one."""
    n = 0
    if kv.policy == RESERVE:
        for request, _ in part.prefill:
            if request.prefill_left == seq_len(request):   # starts now: reserves its whole request
                n += kv.blocks_for(request.num_prompt_tokens + request.num_output_tokens)
        return n
    size = kv.block_size
    for request, chunk in part.prefill:
        done = seq_len(request) - request.prefill_left
        n += kv.blocks_for(done + chunk) - kv.blocks_for(done)
    for request in part.decode:
        if seq_len(request) % size == 0:
            n += 1
    return n


class ClassPriority(GroupedScheduler):
    """Strict priority by class: the listed classes first, in order; the others last, FCFS."""

    policy = "priority"

    def __init__(self, inner: Scheduler, group_of: dict[tuple[int, int], int], num_groups: int,
                 kv: KVCache | None = None) -> None:
        super().__init__(inner, group_of, num_groups, kv)
        self._order = list(range(num_groups))

    def order(self) -> list[int]:
        return self._order


class MaxPressure(GroupedScheduler):
    """Buffers (class, hop) in decreasing pressure (Z_b − Σ_l P_bl Z_l) / m_b (module docstring).

    ``counts`` is the network's list of requests per buffer (shared, kept by the simulator);
    ``buffers[g]`` is group g's buffer id, ``downstream[g]`` its [(buffer id, P_bl)], and
    ``mean_tokens[g]`` its m_b.
    """

    policy = "max-pressure"

    def __init__(self, inner: Scheduler, group_of: dict[tuple[int, int], int], buffers: list[int],
                 downstream: list[list[tuple[int, float]]], mean_tokens: list[float], counts: list[int],
                 kv: KVCache | None = None) -> None:
        super().__init__(inner, group_of, len(buffers), kv)
        self.buffers = buffers
        self.downstream = downstream
        self.inv_tokens = [1.0 / max(m, 1e-12) for m in mean_tokens]
        self.counts = counts

    def pressure(self, g: int) -> float:
        counts = self.counts
        return (counts[self.buffers[g]] - sum(p * counts[l] for l, p in self.downstream[g])) * self.inv_tokens[g]

    def order(self) -> list[int]:
        keyed = []
        for g in range(len(self.buffers)):
            head = self.decoding[g][0].rid if self.decoding[g] else None
            if self.prefilling[g] and (head is None or self.prefilling[g][0].rid < head):
                head = self.prefilling[g][0].rid
            if head is not None:
                keyed.append((-self.pressure(g), head, g))
        keyed.sort()
        return [g for _, _, g in keyed]
