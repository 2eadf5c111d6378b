"""The plan vocabulary: every policy is defined once, as data (paper §4, Table 1; docs/architecture.md;
a policy of one's own: docs/policies.md).

A scheduling policy is a :class:`Plan`: an ordered tuple of *steps* over the engine's two
queues (requests with prefill left, oldest first; requests decoding, oldest first), each with
its rules, and optionally a *load rule* that chooses the batch's token load first.  One batch is
planned by running the steps in order on one :class:`~llmqueue.model.batch.BatchBuilder`, which keeps
all budget (6d) and request-cap (§6) arithmetic:

* :class:`Decodes` -- one decode token for each decoding request, oldest first, while room and
  request slots last (6c).
* :class:`Prefills` -- prefill chunks, oldest prompt first: the whole remaining prompt while it
  fits; the first that does not fit is cut to the room left (``split``) or waits, and everyone
  behind it too.  ``max_chunk`` caps any one chunk.
* :class:`Running` / :class:`Waiting` -- vLLM v1's loop: the *running* requests (prompts already
  started and decoders) in admission order, each its next decode token or prefill chunk; then
  *waiting* prompts FCFS while fewer than ``max_running`` requests run.  Their ``max_chunk``
  (vLLM's ``long_prefill_token_threshold``) does not cap a request that is alone, i.e. when the
  queues hold one request at the batch's start (vLLM >= 0.32, its PR #57951), unless
  ``cap_alone`` is set (the rule before).

``exclusive`` on a step: when its queue is not empty, the batch holds only that step (the
non-mixed policies: FasterTransformer's decodes, vanilla vLLM's prefills).  Prefill before
decode (6a) holds because a request is in one queue only; every step serves a *prefix* of the
decoding list, which is what lets the compiled core count decode tokens lazily.

Two interpreters execute the same plan: :func:`interpret` here (the reference: readable, on
:class:`~llmqueue.model.request.Request` objects) and the compiled core (``_fastcore.c``), which reads
:meth:`Plan.encode`.  tests/test_core.py checks them batch for batch on generated workloads.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import TYPE_CHECKING, ClassVar

from llmqueue.model.batch import BatchBuilder, BatchPlan
from llmqueue.errors import ConfigError, InternalError

if TYPE_CHECKING:
    from llmqueue.schedulers.base import EngineState

#: Step codes of the compiled core (``_fastcore.c`` has the same enum).
DECODES, PREFILLS, RUNNING, WAITING = 1, 2, 3, 4
#: Load-rule codes of the compiled core.
NO_LOAD_RULE, MAX_WEIGHT_LOAD = 0, 1
_RID = attrgetter("rid")
NO_LIMIT = 1 << 62  # "no limit" in the encoding: a large int keeps the core's checks plain comparisons


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a plan (subclasses below)."""

    code: ClassVar[int]

    def encode(self) -> tuple[int, int, int, int, int, int]:
        """(code, exclusive, split, max_chunk, max_running, alone_chunk) for the compiled core;
        ``alone_chunk``: the chunk cap when the queues hold a single request."""
        max_chunk = getattr(self, "max_chunk", None)
        return (self.code, int(getattr(self, "exclusive", False)), int(getattr(self, "split", True)),
                _limit(max_chunk), _limit(getattr(self, "max_running", None)), _limit(self.chunk_cap(True)))

    def chunk_cap(self, alone: bool) -> int | None:
        """The cap on one prefill chunk (None: none); ``alone``: the queues hold a single request."""
        max_chunk = getattr(self, "max_chunk", None)
        return None if alone and not getattr(self, "cap_alone", True) else max_chunk


@dataclass(frozen=True, slots=True)
class Decodes(Step):
    """One decode token for each decoding request, oldest first, while room and slots last."""

    exclusive: bool = False
    code: ClassVar[int] = DECODES


@dataclass(frozen=True, slots=True)
class Prefills(Step):
    """Prefill chunks, oldest prompt first (FCFS), until the room, the slots or a prompt that
    does not fit (``split=False``) stop it."""

    split: bool = True
    exclusive: bool = False
    max_chunk: int | None = None
    code: ClassVar[int] = PREFILLS


@dataclass(frozen=True, slots=True)
class Running(Step):
    """vLLM v1's running requests (started prompts and decoders) in admission order.

    ``max_chunk`` caps a prefill chunk while two or more requests are in the queues; ``cap_alone``:
    also when one is alone (vLLM < 0.32, module docstring)."""

    max_chunk: int | None = None
    cap_alone: bool = False
    code: ClassVar[int] = RUNNING


@dataclass(frozen=True, slots=True)
class Waiting(Step):
    """vLLM v1's waiting prompts, FCFS, while fewer than ``max_running`` requests run
    (``max_chunk``, ``cap_alone``: as :class:`Running`)."""

    max_chunk: int | None = None
    max_running: int | None = None
    cap_alone: bool = False
    code: ClassVar[int] = WAITING


class LoadRule:
    """Chooses each batch's token load and most decode tokens before the steps run (a policy
    that plans by batch time: :class:`~llmqueue.schedulers.maxweight.MaxWeightLoad`).

    The compiled core has its own copy of each rule, by ``code``: the first class that sets a
    code owns it, and a plan may name only such an owner (a rule of one's own, or a subclass
    that changes ``choose``, would run differently on the two interpreters).
    """

    code: ClassVar[int] = NO_LOAD_RULE

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__ and cls.code != NO_LOAD_RULE:
            _CORE_RULES.setdefault(cls.code, cls)

    def choose(self, state: EngineState) -> tuple[int, int]:
        """(token load, most decode tokens) of the next batch."""
        raise NotImplementedError


_CORE_RULES: dict[int, type[LoadRule]] = {}   # code -> the rule the compiled core implements


def _limit(value: int | None) -> int:
    return NO_LIMIT if value is None else int(value)


@dataclass(frozen=True)
class Plan:
    """A policy: steps in order, and optionally a load rule (see the module docstring)."""

    steps: tuple[Step, ...]
    load: type[LoadRule] | None = None   # a LoadRule class; the engine binds it to its batch time

    def __post_init__(self) -> None:
        if isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(self.steps))
        validate(self)

    @property
    def splits_prompts(self) -> bool:
        """Whether a prompt larger than the whole budget can ever run (else it is rejected)."""
        return all(getattr(s, "split", True) for s in self.steps)

    def encode(self) -> tuple[int, ...]:
        """The flat integer form the compiled core reads: load code, step count, 6 ints a step."""
        code = 0 if self.load is None else self.load.code
        return (code, len(self.steps), *(x for s in self.steps for x in s.encode()))

    def describe(self) -> str:
        """``Decodes(), Prefills(split=False)``: each step with the rules it sets (defaults left out)."""
        load = getattr(self.load, "__name__", self.load)
        return ", ".join(map(_show, self.steps)) + (f"; load {load}" if self.load is not None else "")


def _show(step: object) -> str:
    if not isinstance(step, Step):
        return repr(step)
    kind = type(step)
    rules = [f"{f.name}={getattr(step, f.name)!r}" for f in fields(step) if getattr(step, f.name) != f.default]
    return f"{kind.__name__}({', '.join(rules)})"


def validate(plan: Plan) -> None:
    """Raise ConfigError naming what is wrong with a plan and what is allowed.

    Besides each step's own rules, a plan must serve both queues for ever: a decode token for
    decoders (a Decodes or Running step), a first chunk for new prompts (Prefills or Waiting) and
    the next chunk for started ones (Prefills or Running); so the plans are Decodes and Prefills
    in either order, or Running then Waiting.
    """
    steps = plan.steps
    if not isinstance(steps, tuple) or not steps:
        raise ConfigError("plan.steps", steps, "a non-empty tuple of Decodes, Prefills, Running, Waiting steps")
    for s in steps:
        if not isinstance(s, Step) or type(s) is Step:
            raise ConfigError("plan.steps", s, "a Decodes, Prefills, Running or Waiting step")
        for key in ("exclusive", "split", "cap_alone"):
            value = getattr(s, key, False)
            if not isinstance(value, bool):
                raise ConfigError(f"plan.{type(s).__name__}.{key}", value, "true or false")
        for key in ("max_chunk", "max_running"):
            value = getattr(s, key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"plan.{type(s).__name__}.{key}", value, "an integer >= 1, or None for no limit")
        if isinstance(s, Prefills) and s.max_chunk is not None and not s.split:
            raise ConfigError("plan.Prefills.max_chunk", s.max_chunk,
                              "None when split=False (a prompt that is not split runs whole)")
    kinds = [type(s) for s in steps]
    shown = plan.describe()
    for kind in (Decodes, Prefills, Running, Waiting):
        if kinds.count(kind) > 1:
            raise ConfigError("plan.steps", shown, f"at most one {kind.__name__} step (each queue is served once)")
    if Running in kinds and (Decodes in kinds or Prefills in kinds):
        raise ConfigError("plan.steps", shown,
                          "Running (started prompts and decoders) without Decodes or Prefills steps")
    if Waiting in kinds and Prefills in kinds:
        raise ConfigError("plan.steps", shown, "Waiting or Prefills, not both (both serve new prompts)")
    if Waiting in kinds and Running in kinds and kinds.index(Waiting) < kinds.index(Running):
        raise ConfigError("plan.steps", shown, "Waiting after Running (vLLM v1 serves running requests first)")
    if Decodes not in kinds and Running not in kinds:
        raise ConfigError("plan.steps", shown, "a Decodes or Running step (without one, decoding requests never "
                          "get a token)")
    if Prefills not in kinds and Waiting not in kinds:
        raise ConfigError("plan.steps", shown, "a Prefills or Waiting step (without one, new prompts never start: "
                          "Running serves only started prompts and decoders)")
    if Waiting in kinds and Running not in kinds:
        raise ConfigError("plan.steps", shown, "a Running step before Waiting (Waiting starts prompts; only "
                          "Running serves their next chunks and decode tokens)")
    if plan.load is not None:
        if not (isinstance(plan.load, type) and issubclass(plan.load, LoadRule)) or plan.load is LoadRule:
            raise ConfigError("plan.load", plan.load, "a LoadRule class (e.g. MaxWeightLoad) or None")
        if steps != (Decodes(), Prefills()):
            raise ConfigError("plan.steps", shown,
                              "(Decodes(), Prefills()) with a load rule (it chooses decodes first, then chunks)")
        if _CORE_RULES.get(plan.load.code) is not plan.load:
            known = ", ".join(c.__name__ for c in _CORE_RULES.values())
            raise ConfigError("plan.load", plan.load.__name__, f"a load rule the compiled core implements ({known}); "
                              "another rule is a policy that plans in Python: override plan(state)")


def _budget(state: EngineState, load: LoadRule | None) -> tuple[int, int | None]:
    """The batch's token budget and the most decodes it may hold: the load rule's choice, or the
    engine's budget and no limit."""
    if load is not None:
        return load.choose(state)
    return state.token_budget, None


def interpret(plan: Plan, state: EngineState, load: LoadRule | None = None) -> BatchPlan:
    """The reference interpreter: the batch ``plan`` makes from ``state`` (``load``: the plan's
    load rule, bound to the engine's batch time)."""
    if state.kv is not None:
        return interpret_kv(plan, state, load)
    prefilling, decoding = state.prefilling, state.decoding
    budget, most_decodes = _budget(state, load)
    batch = BatchBuilder(budget, state.max_batch_requests)
    alone = len(prefilling) + len(decoding) <= 1   # at the batch's start (Running, Waiting: cap_alone)
    for step in plan.steps:
        if batch.full:
            break
        kind = type(step)
        if kind is Decodes:
            if step.exclusive and decoding:
                batch.add_decodes(decoding)
                break
            batch.add_decodes(decoding, limit=most_decodes)
        elif kind is Prefills:
            if step.exclusive and prefilling:
                _prefills(batch, prefilling, step.split, step.max_chunk)
                break
            _prefills(batch, prefilling, step.split, step.max_chunk)
        elif kind is Running:
            _running(batch, state, step.chunk_cap(alone))
        else:
            _waiting(batch, state, step.chunk_cap(alone), step.max_running)
    return batch.build()


def _prefills(batch: BatchBuilder, prefilling, split: bool, max_chunk: int | None) -> None:
    if max_chunk is None:
        batch.add_prefills(prefilling, split)
        return
    for request in prefilling:  # split is True here (validate): every chunk is taken
        if batch.full:
            return
        batch.add_prefill(request, True, max_chunk)


def _started(state: EngineState) -> int:
    """How many prompts at the front of the prefilling queue are partly prefilled."""
    n = 0
    for request in state.prefilling:  # partly prefilled requests sit at the front
        if request.prefill_left == request.num_prompt_tokens:
            break
        n += 1
    return n


def _running(batch: BatchBuilder, state: EngineState, max_chunk: int | None) -> None:
    """Decoders and started prompts interleaved in admission order (ids)."""
    decoding = state.decoding  # sorted by rid, i.e. admission order
    prev = 0
    prefilling = state.prefilling
    for j in range(_started(state)):
        request = prefilling[j]
        # perf: bisect + slices instead of a Python-level merge over every decoder
        # (the merge made vllm-v1 ~3.5x slower than sarathi on the Fig. 1 workload).
        pos = bisect_left(decoding, request.rid, lo=prev, key=_RID)
        batch.add_decodes(decoding[prev:pos])
        batch.add_prefill(request, split=True, max_chunk=max_chunk)
        prev = pos
    batch.add_decodes(decoding[prev:] if prev else decoding)


def _waiting(batch: BatchBuilder, state: EngineState, max_chunk: int | None, max_running: int | None) -> None:
    started = _started(state)
    running = started + len(state.decoding)
    limit = NO_LIMIT if max_running is None else max_running
    prefilling = state.prefilling
    for i in range(started, len(prefilling)):
        if batch.full or running >= limit:
            break
        batch.add_prefill(prefilling[i], split=True, max_chunk=max_chunk)
        running += 1


# ---- with KV memory (model/kv.py; docs/memory.md) ------------------------------------------

_STAMP = attrgetter("stamp")


class Memory:
    """The KV cache while one batch is planned: vLLM v1's ``Scheduler.schedule`` with
    ``KVCacheManager.allocate_slots`` (vllm/v1/core/sched/scheduler.py, kv_cache_manager.py).

    ``running`` holds the requests that hold blocks (decoders and started prompts) in admission
    order.  :meth:`grow` finds blocks for a running request's next tokens, preempting the running
    tail (the most recently admitted request not yet served in this batch) until they fit; when
    the tail is the request itself it is preempted and planning stops (vLLM's running loop ends,
    and its waiting loop is skipped in a step with a preemption).  :meth:`admit` starts a waiting
    request: under ``recompute`` only if blocks for its whole current sequence are free (vLLM's
    ``full_sequence_must_fit``), though only its first chunk's are taken; under ``reserve`` it
    takes blocks for its whole prompt + output.
    """

    __slots__ = ("kv", "free", "running", "served", "gone", "preempted", "stopped", "limited", "reserve")
    prefix = False    # PrefixMemory: prefix caching

    def __init__(self, state: EngineState) -> None:
        kv = state.kv
        self.kv = kv
        self.reserve = kv.policy == "reserve"
        self.free = kv.usable - state.kv_used
        self.running = running_list(state)
        self.served: set[int] = set()
        self.gone: set[int] = set()
        self.preempted: list = []
        self.stopped = False
        self.limited = False

    def grow(self, request, n: int) -> bool:
        """Blocks for ``n`` more tokens of a running request (False: it was preempted itself)."""
        if self.reserve:
            self.served.add(id(request))
            return True
        kv = self.kv
        done = seq_len(request) - request.prefill_left
        need = kv.blocks_for(done + n) - kv.blocks_for(done)
        while need > self.free:
            self.limited = True
            victim = self._tail()
            self.running.remove(victim)
            self.gone.add(id(victim))
            self.preempted.append(victim)
            self.free += kv.blocks_for(seq_len(victim) - victim.prefill_left)
            if victim is request:
                self.stopped = True
                return False
        self.free -= need
        self.served.add(id(request))
        return True

    def _tail(self):
        """The most recently admitted running request not served in this batch (in FCFS walks the
        running tail, vLLM's ``self.running.pop()``; the request asking is one of them)."""
        served = self.served
        for request in reversed(self.running):
            if id(request) not in served:
                return request
        raise InternalError("no running request to preempt")

    def admit(self, request, chunk: int, hits=None) -> bool:
        """Start a waiting request with a first chunk of ``chunk`` tokens, if memory allows."""
        if self.preempted:
            return False
        kv = self.kv
        whole = kv.blocks_for(request.num_prompt_tokens + request.num_output_tokens if self.reserve
                              else seq_len(request))
        if whole > self.free:
            self.limited = True
            return False
        self.free -= whole if self.reserve else kv.blocks_for(chunk)
        self.served.add(id(request))
        self.running.append(request)
        return True


class PrefixMemory(Memory):
    """:class:`Memory` with automatic prefix caching (``state.kv`` is a
    :class:`~llmqueue.model.kv.PrefixPool`; docs/prefix_caching.md).  It changes the pool as it plans,
    as vLLM's ``Scheduler.schedule`` does through ``KVCacheManager.allocate_slots``: a grown request
    takes new blocks (fresh ones first, then cached free ones, evicted) and caches its blocks that
    become full; a preempted one frees its blocks at once (its full ones stay cached); a waiting
    request first looks up its longest cached prefix (:meth:`lookup`), and admitted takes those blocks
    (counted against the free ones when they are free), and their tokens count as computed."""

    __slots__ = ("pool", "state")
    prefix = True

    def __init__(self, state: EngineState) -> None:
        super().__init__(state)
        self.pool = state.kv
        self.state = state

    def grow(self, request, n: int) -> bool:
        pool = self.pool
        size = pool.block_size
        end = seq_len(request) - request.prefill_left + n
        need = -(-end // size) - len(request.blocks)
        if need > 0:
            while need > pool.fresh + len(pool.lru):
                self.limited = True
                victim = self._tail()
                self.running.remove(victim)
                self.gone.add(id(victim))
                self.preempted.append(victim)
                pool.free_request(victim)     # vLLM's _preempt_request frees at once
                if victim is request:
                    self.stopped = True
                    return False
            pool.allocate(request, need)
        if end // size > request.ncached:   # a block became full: cache it
            pool.cache_blocks(request, end)
        self.served.add(id(request))
        return True

    def lookup(self, request) -> list:
        """The cached blocks a waiting request would start with (``get_computed_blocks``)."""
        return self.pool.lookup(request, seq_len(request))

    def admit(self, request, chunk: int, hits=None) -> bool:
        """Admit a waiting request whose first ``len(hits)`` blocks are cached, with a first chunk of
        ``chunk`` tokens after them: only if blocks for its whole sequence are free, the free hit
        blocks counted as taken (``get_num_blocks_to_allocate``: new blocks + evictable hit blocks)."""
        if self.preempted:
            return False
        pool = self.pool
        hits = hits or []
        tokens = seq_len(request)
        found = len(hits)
        taken = sum(1 for b in hits if b.ref == 0)
        if pool.blocks_for(tokens) - found + taken > pool.free:
            self.limited = True
            return False
        hit = found * pool.block_size
        pool.touch(request, hits)
        pool.allocate(request, pool.blocks_for(hit + chunk) - found)
        pool.cache_blocks(request, hit + chunk)
        pool.record(request, tokens, hit)
        pool.admitted.add(id(request))
        if hit:
            request.prefill_left -= hit      # found in the cache: computed without being in a batch
            request.hit += hit
            if not request.preemptions:
                pool.first_hits[request.rid] = hit
            self.state.total_prefill_left -= hit
        self.served.add(id(request))
        self.running.append(request)
        return True


def seq_len(request) -> int:
    """Tokens of a request's sequence so far: prompt + tokens generated (a preempted decoder's
    recompute includes its next decode token, model/kv.py)."""
    return request.num_prompt_tokens + request.num_output_tokens - request.decode_left


def started_kv(state: EngineState) -> int:
    """How many prompts at the front of the prefilling queue hold blocks (started, or recomputing)."""
    n = 0
    for request in state.prefilling:
        if request.prefill_left == seq_len(request):
            break
        n += 1
    return n


def running_list(state: EngineState) -> list:
    """The requests holding blocks in admission order: decoders and started prompts (vLLM's
    ``Scheduler.running``)."""
    prefilling = state.prefilling
    started = [prefilling[j] for j in range(started_kv(state))]
    if not started:
        return list(state.decoding)
    return sorted(state.decoding + started, key=_STAMP)


def interpret_kv(plan: Plan, state: EngineState, load: LoadRule | None = None) -> BatchPlan:
    """:func:`interpret` with KV memory: the same steps, each token's blocks found by :class:`Memory`."""
    prefilling, decoding = state.prefilling, state.decoding
    budget, most_decodes = _budget(state, load)
    batch = BatchBuilder(budget, state.max_batch_requests)
    mem = PrefixMemory(state) if getattr(state.kv, "prefix_caching", False) else Memory(state)
    alone = len(prefilling) + len(decoding) <= 1   # at the batch's start, preempted requests included
    for step in plan.steps:
        if batch.full or mem.stopped:
            break
        kind = type(step)
        before = batch.room
        # exclusive: a step that serves anything has the batch to itself (without memory the
        # same as "its queue is not empty": a non-empty queue is always served something)
        if kind is Decodes:
            _decodes_kv(batch, mem, decoding, None if step.exclusive else most_decodes)
            if step.exclusive and batch.room < before:
                break
        elif kind is Prefills:
            _prefills_kv(batch, mem, prefilling, step.split, step.max_chunk, state.token_budget)
            if step.exclusive and batch.room < before:
                break
        elif kind is Running:
            _running_kv(batch, mem, step.chunk_cap(alone))
        else:
            _waiting_kv(batch, mem, state, step.chunk_cap(alone), step.max_running)
    return batch.build(tuple(mem.preempted), mem.limited)


def _decodes_kv(batch: BatchBuilder, mem: Memory, decoding, limit: int | None) -> None:
    n = 0
    for request in decoding:
        if batch.full or (limit is not None and n >= limit) or mem.stopped:
            return
        if id(request) in mem.gone:
            continue
        if not mem.grow(request, 1):
            return
        batch.add_decode(request)
        n += 1


def _prefills_kv(batch: BatchBuilder, mem: Memory, prefilling, split: bool, max_chunk: int | None,
                 token_budget: int) -> None:
    """Prefills in queue order: running prompts grow, waiting ones are admitted (FCFS: the first
    that does not fit, by room or memory, waits and everyone behind it).  A recompute longer than
    the whole budget is split even when prompts are not (it could never run otherwise)."""
    for request in prefilling:
        if batch.full or mem.stopped:
            return
        if id(request) in mem.gone:
            return    # preempted in this batch: it waits, and so does everyone behind it
        left = request.prefill_left
        hits = None
        if mem.prefix and left == seq_len(request):   # waiting: its cached prefix is not computed
            hits = mem.lookup(request)
            left -= len(hits) * mem.pool.block_size
        want = left if max_chunk is None or max_chunk >= left else max_chunk
        chunk = want if want <= batch.room else batch.room
        if chunk < want and not split and not (want > token_budget and batch.room == token_budget):
            return
        if request.prefill_left != seq_len(request):   # holds blocks: a started prompt
            if not mem.grow(request, chunk):
                return
        elif not mem.admit(request, chunk, hits):
            return
        batch.add_chunk(request, chunk)
        if chunk < want:
            return


def _running_kv(batch: BatchBuilder, mem: Memory, max_chunk: int | None) -> None:
    """vLLM's running loop: each running request in admission order, its decode token or next chunk."""
    for request in list(mem.running):
        if batch.full or mem.stopped:
            return
        if id(request) in mem.gone:
            continue
        left = request.prefill_left
        if left == 0:
            if mem.grow(request, 1):
                batch.add_decode(request)
            continue
        want = left if max_chunk is None or max_chunk >= left else max_chunk
        chunk = want if want <= batch.room else batch.room
        if mem.grow(request, chunk):
            batch.add_chunk(request, chunk)


def _waiting_kv(batch: BatchBuilder, mem: Memory, state: EngineState, max_chunk: int | None,
                max_running: int | None) -> None:
    """vLLM's waiting loop: none in a step with a preemption; else FCFS while fewer than
    ``max_running`` run and the head fits (head-of-line blocking)."""
    limit = NO_LIMIT if max_running is None else max_running
    prefilling = state.prefilling
    for i in range(started_kv(state), len(prefilling)):
        if batch.full or mem.stopped or mem.preempted or len(mem.running) >= limit:
            return
        request = prefilling[i]
        left = request.prefill_left
        hits = None
        if mem.prefix:   # vLLM's get_computed_blocks: the cached prefix is not computed
            hits = mem.lookup(request)
            left -= len(hits) * mem.pool.block_size
        want = left if max_chunk is None or max_chunk >= left else max_chunk
        chunk = want if want <= batch.room else batch.room
        if not mem.admit(request, chunk, hits):
            return
        batch.add_chunk(request, chunk)


__all__ = ["DECODES", "MAX_WEIGHT_LOAD", "NO_LIMIT", "PREFILLS", "RUNNING", "WAITING", "Decodes", "LoadRule", "Plan",
           "Memory", "PrefixMemory", "Prefills", "Running", "Step", "Waiting", "interpret", "interpret_kv", "running_list", "seq_len",
           "started_kv", "validate"]
