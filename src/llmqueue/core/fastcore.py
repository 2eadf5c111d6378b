"""The simulator's compiled event loop: the Python side (docs/performance.md; paper §3.1).

``_fastcore.c`` runs the same batches as the reference loop, bit for bit, for every scheduler
defined as a plan (:mod:`llmqueue.schedulers.plan`: it interprets the plan's encoding) with a
tokens-only batch-time model, at tens of nanoseconds per batch.  It is built at install time when a C compiler is present (setup.py);
without it, or when the build is older than the source, :func:`unavailable` says why and the
simulator runs the reference loop instead (:mod:`llmqueue.core.loop`: identical results, slower).

This module turns a :class:`~llmqueue.model.workload.Requests` into the arrays the loop works on and
rebuilds the engine's state (queues, counters, rejected requests) from what it returns, so the
engine ends as reference stepping would leave it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmqueue.core.engine import Engine
from llmqueue.errors import InternalError
from llmqueue.schedulers import EngineState, Scheduler
from llmqueue.schedulers.plan import NO_LIMIT
from llmqueue.model.request import Request
from llmqueue.model.workload import Requests

#: The calendar ring's largest size (rounds ahead kept in O(1) lists; further ones go to a heap):
#: 8 MB at most.  Tests shrink it to exercise the heap.
RING = 1 << 20
_SOURCE = Path(__file__).with_name("_fastcore.c")


def _load() -> tuple[object | None, str | None]:
    try:
        from llmqueue.core import _fastcore  # noqa: PLC0415  optional: built only where a C compiler is
    except ImportError:
        return None, "the compiled core is not built (reinstall with a C compiler: pip install -e .)"
    if _SOURCE.exists():
        digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()
        if digest != _fastcore.SOURCE_SHA256:
            return None, "the compiled core is older than _fastcore.c (rebuild: pip install -e .)"
    return _fastcore, None


_core, _why_not = _load()
if _why_not is not None and "older" in _why_not:  # a developer edited the C source: say so once
    warnings.warn(f"llmqueue: {_why_not}; using the slower reference loop", RuntimeWarning, stacklevel=2)


def unavailable() -> str | None:
    """Why the compiled loop cannot be used in this installation (None: it can)."""
    return _why_not


def core():
    """The compiled module (InternalError where it is not available)."""
    if _core is None:
        raise InternalError(f"compiled core requested but {_why_not}")
    return _core


_said: set[str] = set()


def policy_reason(scheduler: Scheduler, batch_time) -> str | None:
    """Why this scheduler and batch time cannot run on the compiled core (None: they can), for one
    engine and for a network's engines alike.  A scheduler that plans in Python (it overrides
    ``plan()`` instead of composing a plan) is said once per scheduler name."""
    if scheduler.program is None or type(scheduler).plan is not Scheduler.plan:
        why = f"scheduler {scheduler.name!r} plans in Python (plan() instead of a composed Plan)"
        if scheduler.name not in _said and not getattr(scheduler, "quiet", False):
            _said.add(scheduler.name)
            warnings.warn(f"llmqueue: {why}: it runs on the reference interpreter, not the compiled core",
                          RuntimeWarning, stacklevel=4)
        return why
    if getattr(batch_time, "noise_cv", None) is not None:
        return "batch-time noise draws each batch's time at run time: the reference interpreter runs it"
    if not batch_time.tokens_only:
        return f"batch time {batch_time.name!r} depends on more than the token load"
    return None


def policy_arrays(scheduler: Scheduler) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """What the core reads of a composed policy: its plan's encoding and its load rule's candidate
    loads (useful loads, breaks; whether the useful loads are given: else every load is)."""
    load = scheduler.load
    useful = getattr(load, "useful", None)
    return (np.asarray(scheduler.program.encode(), dtype=np.int64), np.asarray(useful or [], dtype=np.int64),
            np.asarray(getattr(load, "breaks", None) or [], dtype=np.int64), useful is not None)


def engine_spec(engine: Engine, inner: Scheduler | None = None, groups: tuple | None = None) -> tuple:
    """The tuple ``_fastcore.run_network`` and ``run_pool`` read for one engine: the plan of
    ``inner`` (the policy inside a class-aware wrapper; default the engine's scheduler), batch
    times, load rule, and its queue groups (count, order, buffers, downstream starts, buffers and
    probabilities, 1 / mean tokens; default one group, network/fast.py builds the others)."""
    scheduler = engine.scheduler
    plan, useful, breaks, has_useful = policy_arrays(scheduler if inner is None else inner)
    if groups is None:
        i64, f64 = np.int64, np.float64
        groups = (1, 0, np.zeros(1, i64), np.zeros(2, i64), np.zeros(0, i64), np.zeros(0, f64), np.ones(1, f64))
    return (plan, np.asarray(engine.durations, np.float64), useful, breaks, engine.token_budget,
            engine.max_batch_requests or NO_LIMIT, bool(scheduler.splits_prompts), has_useful, *groups)


def reason(engine: Engine, piecewise: bool = False) -> str | None:
    """Why ``engine`` cannot run on the compiled core (None: it can); ``piecewise``: in several calls
    (streaming, stepping), which KV memory does not do yet."""
    why = policy_reason(engine.scheduler, engine.batch_time)
    if why is not None:
        return why
    if engine.kv is not None and engine.kv.prefix_caching:
        return "prefix caching runs on the reference interpreter"
    if getattr(engine, "transferred_prompts", False):
        return "requests with computed context (transferred prompts) run on the reference interpreter"
    if piecewise and engine.kv is not None:
        return "KV memory runs whole runs on the compiled core; streamed or stepped runs use the reference"
    if engine.num_in_engine or engine.rejected or engine.violations:
        return "the engine already holds requests"
    return _why_not


UNTIL_HORIZON, UNTIL_ADMITTED, UNTIL_FINISH = 0, 1, 2   # call(stop=...)


@dataclass
class KVCall:
    """What KV memory did in a call: per batch blocks in use, tokens recomputed and start time; per
    request preemptions, recomputed tokens and admission stamps; counters."""

    batch_blocks: np.ndarray
    batch_recomputed: np.ndarray
    batch_start: np.ndarray
    preemptions: np.ndarray
    recomputed: np.ndarray
    stamp: np.ndarray
    peak: np.ndarray
    memory_limited: int
    num_preemptions: int
    used: int


@dataclass
class Call:
    """One call of the compiled loop.  Per-request arrays are indexed locally (0..n-1); ``rid``
    maps them to request ids.  ``pre`` and ``dec`` are the queues left (local indices, in order)."""

    now: float
    admitted: int                 # local index of the first arrival not admitted
    rid: np.ndarray
    arrival_time: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    prefill_left: np.ndarray
    decode_left: np.ndarray
    first_token_time: np.ndarray
    finish_time: np.ndarray
    pre: np.ndarray
    dec: np.ndarray
    rejected: np.ndarray          # local indices, in admission order
    in_engine: int
    total_prefill: int
    violations: int
    batch_end_time: np.ndarray
    batch_tokens: np.ndarray
    detail: np.ndarray | None
    planned: int
    kv: KVCall | None = None      # with KV memory

    def carried(self) -> Call:
        """The requests still in the engine, re-indexed 0..k-1 in arrival order (the loop keeps
        its queues in index order): what the next call of a streaming run starts with."""
        keep = np.sort(np.concatenate((self.pre, self.dec)))
        return Call(self.now, 0, self.rid[keep], self.arrival_time[keep], self.num_prompt_tokens[keep],
                    self.num_output_tokens[keep], self.prefill_left[keep], self.decode_left[keep],
                    self.first_token_time[keep], self.finish_time[keep], np.searchsorted(keep, self.pre),
                    np.searchsorted(keep, self.dec), self.rejected[:0], self.in_engine, self.total_prefill,
                    0, self.batch_end_time[:0], self.batch_tokens[:0], None, 0)


def call(engine: Engine, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, horizon: float,
         record_batches: bool = False, progress: Callable[[float, int], None] | None = None, *,
         rids: np.ndarray | None = None, carried: Call | None = None, stop: int = 0,
         durations: np.ndarray | None = None) -> Call:
    """Run the compiled loop on these arrivals (after ``carried``'s requests, already in the
    engine at time ``carried.now``) until the first batch boundary at or after ``horizon``; with
    ``stop`` = :data:`UNTIL_ADMITTED`, return once every arrival is admitted (streaming), with
    :data:`UNTIL_FINISH` after the first batch that finishes a request (stepping).
    ``durations``: ``engine.durations`` as a float64 array, when the caller calls repeatedly."""
    if _core is None:
        raise InternalError(f"compiled core requested but {_why_not}")
    scheduler = engine.scheduler
    plan, useful, breaks, has_useful = policy_arrays(scheduler)
    budget = engine.token_budget
    kmax = engine.max_batch_requests
    k = 0 if carried is None else len(carried.rid)
    if carried is not None:  # the carried requests first, in the local order carried() gave them
        arrivals, prompts, outputs, rids = (np.concatenate((a, b)) for a, b in (
            (carried.arrival_time, arrivals), (carried.num_prompt_tokens, prompts),
            (carried.num_output_tokens, outputs), (carried.rid, rids)))
    arrivals = np.ascontiguousarray(arrivals, dtype=np.float64)
    prompts = np.ascontiguousarray(prompts, dtype=np.int64)
    outputs = np.ascontiguousarray(outputs, dtype=np.int64)
    n = len(arrivals)
    rids = np.arange(n) if rids is None else rids
    prefill_left, decode_left = np.empty(n, np.int64), np.empty(n, np.int64)
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    prefilling, rejected = np.empty(n, np.int64), np.empty(n, np.int64)
    decoding = np.empty(2 * n + 2, np.int64)  # the decoding list slides inside it (_fastcore.c)
    n_pre = n_dec = 0
    kv = engine.kv
    if kv is not None and (carried is not None or stop):
        raise InternalError("KV memory on the compiled core runs whole runs only (reason() says so)")
    kv_state = np.zeros(5 * n if kv is not None else 0, np.int64)
    kv_args = (0, 1, 0) if kv is None else kv.encode()
    if carried is not None:
        prefill_left[:k], decode_left[:k], first[:k] = (carried.prefill_left, carried.decode_left,
                                                       carried.first_token_time)
        n_pre, n_dec = len(carried.pre), len(carried.dec)
        prefilling[:n_pre], decoding[:n_dec] = carried.pre, carried.dec
    try:
        (now, admitted, ps, pe, ds, nd, nrej, in_engine, violations, total_prefill, ends, tokens,
         detail, planned, kv_out) = _core.run(
            arrivals, prompts, outputs,
            np.asarray(engine.durations, dtype=np.float64) if durations is None else durations,
            prefill_left, decode_left, first, finish, prefilling, decoding, rejected,
            plan, useful, breaks, budget, kmax if kmax is not None else NO_LIMIT,
            has_useful, bool(scheduler.splits_prompts), float(horizon),
            bool(record_batches), progress, RING, 0.0 if carried is None else carried.now, k, n_pre, n_dec,
            int(stop), kv_state, *kv_args)
    except RuntimeError as exc:  # an impossible plan: a bug, as in Engine.step
        raise InternalError(f"{scheduler!r} {exc}") from exc
    c = Call(now, admitted, rids, arrivals, prompts, outputs, prefill_left, decode_left, first, finish,
             prefilling[ps:pe], decoding[ds:ds + nd], rejected[:nrej], in_engine, total_prefill, violations,
             np.frombuffer(ends, dtype=np.float64), np.frombuffer(tokens, dtype=np.int64),
             None if detail is None else np.frombuffer(detail, dtype=np.float64).reshape(-1, 7), planned)
    if engine.kv is not None:
        blocks, waste, starts, limited, preemptions, used = kv_out
        c.kv = KVCall(np.frombuffer(blocks, dtype=np.int64), np.frombuffer(waste, dtype=np.int64),
                      np.frombuffer(starts, dtype=np.float64), kv_state[n:2 * n], kv_state[3 * n:4 * n],
                      kv_state[:n], kv_state[2 * n:3 * n], limited, preemptions, used)
    return c


def _requests(c: Call, local: np.ndarray) -> list[Request]:
    """``Request`` objects for these requests of a call, in their state at its end."""
    return _build(_slice(c, local))


def _slice(c: Call, local: np.ndarray) -> tuple:
    """What :func:`_build` needs of these requests of a call, as arrays of their own (the call's
    arrays can then go)."""
    k = c.kv
    kv = None if k is None else tuple(a[local] for a in (k.stamp, k.preemptions, k.peak, k.recomputed))
    return (c.rid[local], c.arrival_time[local], c.num_prompt_tokens[local], c.num_output_tokens[local],
            c.prefill_left[local], c.decode_left[local], c.first_token_time[local], kv)


def _build(sliced: tuple) -> list[Request]:
    rid, arrival, p, o, pl, dl, f, kv = sliced
    # perf: an unstable run can end with most requests still queued; build them with map()
    # and set state only on those that moved (started prefill or decode).
    out = list(map(Request, rid.tolist(), arrival.tolist(), p.tolist(), o.tolist()))
    for j in np.flatnonzero((pl != p) | (dl != o)).tolist():
        out[j].prefill_left = int(pl[j])
        out[j].decode_left = int(dl[j])
    for j in np.flatnonzero(~np.isnan(f)).tolist():  # prefill done: it has its first token
        out[j].first_token_time = float(f[j])
    if kv is not None:   # KV memory: admission order, preemptions, peak, recomputed tokens
        stamp, preemptions, peak, recomputed = kv
        # perf: only requests ever admitted have any (an overloaded run leaves a long queue)
        for j in np.flatnonzero(stamp != 0).tolist():
            out[j].stamp, out[j].preemptions = int(stamp[j]), int(preemptions[j])
            out[j].peak, out[j].recomputed = int(peak[j]), int(recomputed[j])
    return out


class LazyQueues(EngineState):
    """The engine state a compiled run leaves: its queues become ``Request`` objects only when
    first read (an overloaded run can leave 100,000 requests queued, and most callers only want
    the result).  After that it is an ordinary :class:`EngineState`: ``__getattr__`` runs only for
    the two queues, and only until they exist."""

    __slots__ = ("_pending",)

    def __getattr__(self, name: str):
        if name not in ("prefilling", "decoding"):
            raise AttributeError(name)
        pre, dec = self._pending
        self.prefilling = deque(_build(pre))
        self.decoding = _build(dec)
        self._pending = None
        return getattr(self, name)


def leave_state(engine: Engine, c: Call) -> None:
    """Leave ``engine`` as reference stepping would after ``c``: the same queues and counters
    (its violations and rejected requests are added by each call, see :func:`count`)."""
    old = engine.state
    state = LazyQueues.__new__(LazyQueues)
    state.token_budget, state.max_batch_requests, state.kv = old.token_budget, old.max_batch_requests, old.kv
    state.kv_used = old.kv_used
    state._pending = (_slice(c, c.pre), _slice(c, c.dec))
    state.total_prefill_left = c.total_prefill
    engine.state = state
    engine.num_in_engine = c.in_engine
    if c.kv is not None:
        state.kv_used = c.kv.used
        engine._stamps = int(c.kv.stamp.max()) if len(c.kv.stamp) else 0
        engine.memory_limited += c.kv.memory_limited
        engine.preemptions += c.kv.num_preemptions
        engine.recomputed_tokens += int(c.kv.batch_recomputed.sum())


def count(engine: Engine, c: Call) -> None:
    """Add a call's violations and rejected requests to the engine's counters."""
    engine.violations += c.violations
    engine.rejected.extend(_requests(c, c.rejected))


def run(engine: Engine, requests: Requests, horizon: float, record_batches: bool,
        progress: Callable[[float, int], None] | None) -> Call:
    """The reference loop of :func:`~llmqueue.core.simulator.simulate` on the compiled core; the
    engine is left as reference stepping leaves it.

    ``engine`` must be able to run on the core (:func:`reason` is None).
    """
    c = call(engine, requests.arrival_time, requests.num_prompt_tokens, requests.num_output_tokens, horizon,
             record_batches, progress)
    leave_state(engine, c)
    count(engine, c)
    return c
