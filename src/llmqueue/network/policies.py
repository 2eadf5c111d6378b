"""Per-engine policies across classes (PAPER.md §6, paper §5).

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
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from operator import attrgetter

from llmqueue.model.batch import BatchPlan
from llmqueue.errors import InternalError
from llmqueue.model.request import Request
from llmqueue.schedulers import EngineState, Scheduler

_RID = attrgetter("rid")


class GroupedScheduler(Scheduler):
    """Wraps a scheduler: plans each batch group by group in :meth:`order`.

    Keeps, per group, the engine's requests in its order (prefilling queue, decoding list
    sorted by id) up to date through :meth:`admitted` and :meth:`applied`, which the network
    calls after :meth:`Engine.admit <llmqueue.core.engine.Engine.admit>` and after each step.
    """

    policy = "grouped"
    summary = "plans each batch group by group"
    work_conserving = False

    def __init__(self, inner: Scheduler, group_of: dict[tuple[int, int], int], num_groups: int) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{self.policy}({inner.name})"
        self.work_conserving = inner.work_conserving
        self.settings = inner.settings
        self.group_of = group_of                  # (class, hop) -> group
        self.prefilling: list[deque[Request]] = [deque() for _ in range(num_groups)]
        self.decoding: list[list[Request]] = [[] for _ in range(num_groups)]
        self.prefill_left = [0] * num_groups

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
        for request in finished:
            if request.num_output_tokens:  # finished by a decode token
                decoding = self.decoding[request.group]
                i = bisect_left(decoding, request.rid, key=_RID)
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
                    if decoding and decoding[-1].rid > request.rid:
                        insort(decoding, request, key=_RID)
                    else:
                        decoding.append(request)

    def plan(self, state: EngineState) -> BatchPlan:
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
            if batch.add_decodes(part.decode) != len(part.decode):
                raise InternalError(f"{self.name}: a group's decodes did not fit the room it was given")
            for request, chunk in part.prefill:
                if batch.add_prefill(request, split=True, max_chunk=chunk) != chunk:
                    raise InternalError(f"{self.name}: a group's prefill chunk did not fit the room it was given")
        return batch.build()


class ClassPriority(GroupedScheduler):
    """Strict priority by class: the listed classes first, in order; the others last, FCFS."""

    policy = "priority"

    def __init__(self, inner: Scheduler, group_of: dict[tuple[int, int], int], num_groups: int) -> None:
        super().__init__(inner, group_of, num_groups)
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
                 downstream: list[list[tuple[int, float]]], mean_tokens: list[float], counts: list[int]) -> None:
        super().__init__(inner, group_of, len(buffers))
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
