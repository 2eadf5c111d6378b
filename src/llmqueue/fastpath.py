"""The simulator's event-level fast path (PAPER.md §1–3, paper §3.1; docs/performance.md).

It runs the same batches as :meth:`~llmqueue.engine.Engine.step` driven by the reference loop
of :func:`~llmqueue.simulator.simulate`, bit for bit, at a cost set by *events* (arrivals,
prefill completions, request completions) rather than by tokens.  Three exact tricks:

1. **Lazy decode counts.**  A batch gives one decode token to a prefix of the decoding list
   (every built-in policy adds decoders FCFS).  The leading "head" decoders store the round at
   which they finish (``decode_left`` holds ``rounds + tokens left`` while the fast path runs),
   so a batch that decodes exactly them adds one to ``rounds`` instead of touching each; a
   calendar (round -> requests, plus a heap of rounds) says who finishes next.  When the prefix
   differs from the head only the decoders in between move (or the rest of the head has its
   round shifted one later, by one integer add each: calendar entries are lazy, re-filed at the
   true round when their round comes up), so a batch costs O(change), not O(decoders).
2. **Plans as counts.**  A policy's batch is (how many leading decoders get a token, the
   prefill chunks of the leading prefilling requests), computed by the policy's own rules from
   the queues without building a decode list.  Only the exact scheduler classes in
   :data:`FAST_POLICIES` take this path; any other scheduler (a subclass, a new policy, one that
   plans by batch time), a batch-time model that is not ``tokens_only``, or an engine that
   already holds work uses the reference loop instead.
3. **Quiet stretches.**  While no request finishes its prefill or decode and no arrival or the
   horizon is reached, consecutive batches are identical (same decoders, same chunk sizes), so
   they are applied in one go: rounds ``G += m``, chunks ``prefill_left -= m·c``.  Their end
   times are still added one at a time, in the same order as the reference (``end = now + t``),
   by a short loop or, for long stretches, ``np.cumsum`` (a sequential accumulation), so every
   time matches to the last bit.  Stretches are not merged when per-batch records are kept.
"""

from __future__ import annotations

import gc
import heapq
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from itertools import islice
from operator import attrgetter

import numpy as np

from llmqueue.engine import Engine
from llmqueue.errors import InternalError
from llmqueue.request import Request
from llmqueue.schedulers.fastertransformer import FasterTransformer
from llmqueue.schedulers.orca import Orca
from llmqueue.schedulers.sarathi import Sarathi
from llmqueue.schedulers.vllm import VanillaVLLM
from llmqueue.schedulers.vllm_v1 import VLLMv1

_RID = attrgetter("rid")
Chunks = Callable[[], "tuple[list[float], list[int], list[int], float] | None"]
SARATHI, ORCA, VLLM, FASTERTRANSFORMER, VLLM_V1 = range(5)

#: The scheduler classes whose batches this module reproduces (exact class, not subclasses).
FAST_POLICIES: dict[type, int] = {
    Sarathi: SARATHI, Orca: ORCA, VanillaVLLM: VLLM, FasterTransformer: FASTERTRANSFORMER, VLLMv1: VLLM_V1,
}

# perf: stretches longer than this take the numpy path.  Measured (timeit, shared 2-core VM, noisy):
# the Python loop of adds and appends ~0.1 µs per batch up to ~200 batches, ~0.5 µs at 10,000;
# _stretch ~60 µs per call plus ~0.3 µs per batch (tolist, extend); equal near a few hundred.
_NUMPY_STRETCH = 256
_INF = float("inf")
_NO_CAP = 1 << 62


def fallback_reason(engine: Engine) -> str | None:
    """Why ``engine`` cannot take the fast path (None: it can)."""
    if type(engine.scheduler) not in FAST_POLICIES:
        return f"scheduler {engine.scheduler.name!r} has no fast path"
    if not engine.batch_time.tokens_only:
        return f"batch time {engine.batch_time.name!r} depends on more than the token load"
    if engine.num_in_engine or engine.rejected or engine.violations:
        return "the engine already holds requests"
    return None


# ---- batch composition: each policy's plan as (decoders, prefill chunks) ------------------

def _fcfs_prefills(pre: deque, room: int, slots: int, split: bool, chunks: list) -> int:
    """BatchBuilder.add_prefills as counts: append (request, chunk) pairs; return the room left."""
    for r in pre:
        if room == 0 or slots == 0:
            break
        left = r.prefill_left
        c = left if left <= room else room  # noqa: FURB136  perf: no call in the per-chunk loop
        if c < left and not split:
            break
        chunks.append((r, c))
        room -= c
        slots -= 1
        if c < left:
            break
    return room


def _vllm_v1(pre: deque, dec: list, budget: int, cap: int, max_chunk: int, limit: int,
             chunks: list) -> int:
    """VLLMv1.plan as counts (see schedulers/vllm_v1.py): return (leading decoders, prefill tokens)."""
    num_dec = len(dec)
    if not pre or (num_dec >= limit and pre[0].prefill_left == pre[0].num_prompt_tokens):
        # perf: the usual batch with outputs long: no prompt started and none may start, decodes only
        n = num_dec if num_dec < budget else budget  # noqa: FURB136
        return (n if n < cap else cap), 0  # noqa: FURB136
    room, slots, n, prev = budget, cap, 0, 0
    started = 0
    # perf: comparisons instead of min() calls throughout (this runs once per batch)
    for r in pre:
        left = r.prefill_left
        if left == r.num_prompt_tokens:
            break
        started += 1
        pos = bisect_left(dec, r.rid, lo=prev, key=_RID)
        k = pos - prev
        if k > room:  # noqa: PLR1730  perf
            k = room
        if k > slots:  # noqa: PLR1730  perf
            k = slots
        if k > 0:
            n += k
            room -= k
            slots -= k
        if room and slots:
            c = left if left < max_chunk else max_chunk  # noqa: FURB136
            if c > room:  # noqa: PLR1730  perf
                c = room
            chunks.append((r, c))
            room -= c
            slots -= 1
        prev = pos
    k = num_dec - prev
    if k > room:  # noqa: PLR1730  perf
        k = room
    if k > slots:  # noqa: PLR1730  perf
        k = slots
    if k > 0:
        n += k
        room -= k
        slots -= k
    running = started + num_dec
    if room and slots and running < limit:
        for r in islice(pre, started, None):
            if room == 0 or slots == 0 or running >= limit:
                break
            c = r.prefill_left
            if c > max_chunk:  # noqa: PLR1730  perf
                c = max_chunk
            if c > room:  # noqa: PLR1730  perf
                c = room
            chunks.append((r, c))
            room -= c
            slots -= 1
            running += 1
    return n, budget - room - n


def run_fast(engine: Engine, arrivals: list[float], prompts: list[int], outputs: list[int], horizon: float,
             admitted: list[Request], ends, tokens, detail: list | None,
             progress: Callable[[float, int], None] | None, more: Chunks | None = None) -> tuple[float, int]:
    """The reference loop of :func:`~llmqueue.simulator.simulate` on the fast path.

    Appends to ``admitted``, ``ends`` and ``tokens`` (and ``detail``) exactly what the reference
    loop would; returns (final time, arrivals admitted).  At the end the engine's state, counters
    and rejected list are what reference stepping would have left.  ``more`` (streaming runs)
    is called when the arrivals run out and returns the next (arrivals, prompts, outputs) lists and
    the horizon (which may become known only with the last chunk), or None; it may consume and
    clear ``admitted``, ``ends`` and ``tokens`` in place.
    """
    # perf: the loop creates no reference cycles, but its allocations (requests, chunk tuples,
    # calendar lists) would trigger the cyclic collector thousands of times (~10 % of the run).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_fast(engine, arrivals, prompts, outputs, horizon, admitted, ends, tokens, detail, progress, more)
    finally:
        if enabled:
            gc.enable()


def _run_fast(engine: Engine, arrivals: list[float], prompts: list[int], outputs: list[int], horizon: float,
              admitted: list[Request], ends, tokens, detail: list | None,
              progress: Callable[[float, int], None] | None, more: Chunks | None = None) -> tuple[float, int]:
    """The loop of :func:`run_fast` (with the cyclic garbage collector paused)."""
    policy = FAST_POLICIES[type(engine.scheduler)]
    settings = engine.scheduler.settings
    split = settings.get("split_prompts", True)
    max_chunk = settings.get("long_prefill_token_threshold", 0) or _NO_CAP
    limit = settings.get("max_num_seqs", _NO_CAP)
    budget = engine.token_budget
    kmax = engine.max_batch_requests
    cap = kmax if kmax is not None else _NO_CAP
    most = min(budget, cap)  # decode tokens a decode-first batch can hold
    durations = engine.durations
    splits_prompts = engine.scheduler.splits_prompts
    rejected = engine.rejected

    state = engine.state
    pre: deque[Request] = state.prefilling
    dec: list[Request] = state.decoding
    total_prefill = state.total_prefill_left
    in_engine = engine.num_in_engine
    violations = engine.violations
    # Lazy decode counts.  dec[:head] are "head" decoders: decode_left holds the round at which
    # each finishes (> rounds).  dec[head:] are "tail" decoders: decode_left holds -(tokens left).
    # A batch that decodes dec[:n] with n >= head first moves the boundary up to n, then advances
    # ``rounds`` by one; with n < head either the n leading decoders move one round earlier or
    # the other head decoders one round later, whichever are fewer.
    rounds = 0
    head = 0
    for r in dec:
        r.decode_left = -r.decode_left
    calendar: dict[int, list[Request]] = {}  # finishing round -> head decoders (stale ones skipped)
    pending: list[int] = []                  # heap of the calendar's rounds
    heappush, heappop = heapq.heappush, heapq.heappop
    delayed = False  # whether some head decoder has missed a round (its calendar entry may be early)
    ends_append, tokens_append = ends.append, tokens.append

    n_arr = len(arrivals)
    now, i, base = 0.0, 0, 0
    next_report = 0
    while True:
        # Admit every arrival up to this batch boundary (Engine.admit).
        while True:
            while i < n_arr and arrivals[i] <= now:
                r = Request(base + i, arrivals[i], prompts[i], outputs[i])
                admitted.append(r)
                i += 1
                if r.num_prompt_tokens > budget and not splits_prompts:
                    rejected.append(r)
                    continue
                pre.append(r)
                total_prefill += r.num_prompt_tokens
                in_engine += 1
            if i < n_arr or more is None:
                break
            chunk = more()  # streaming: the next arrivals
            if chunk is None:
                more = None
                break
            base += n_arr
            arrivals, prompts, outputs, horizon = chunk
            n_arr, i = len(arrivals), 0
        if not in_engine:
            if i >= n_arr or arrivals[i] > horizon:
                break
            now = arrivals[i]
            continue
        if now >= horizon:
            break

        # The plan, as counts: the n leading decoders get a token, plus prefill chunks.
        num_dec = len(dec)
        chunks: list[tuple[Request, int]] = []
        prefill_tokens = 0
        if policy == SARATHI:
            n = num_dec if num_dec < most else most  # noqa: FURB136  perf: no call per batch
            if pre:
                if len(pre) == 1 and n < budget and n < cap:
                    # perf: the usual case, one prompt waiting: _fcfs_prefills inlined
                    r = pre[0]
                    c = r.prefill_left
                    if c > budget - n:  # noqa: PLR1730  perf
                        c = budget - n
                    chunks.append((r, c))
                    prefill_tokens = c
                else:
                    prefill_tokens = budget - n - _fcfs_prefills(pre, budget - n, cap - n, True, chunks)
        elif policy == ORCA:
            if not pre:
                room = budget
            elif len(pre) == 1:  # perf: the usual case, one prompt waiting: _fcfs_prefills inlined
                r = pre[0]
                c = r.prefill_left
                if c > budget:  # noqa: PLR1730  perf
                    c = budget
                chunks.append((r, c))
                room = budget - c
            else:
                room = _fcfs_prefills(pre, budget, cap, True, chunks)
            prefill_tokens = budget - room
            n = num_dec if num_dec < room else room  # noqa: FURB136  perf
            if n > cap - len(chunks):  # noqa: PLR1730  perf
                n = cap - len(chunks)
        elif policy == VLLM:
            if pre:
                n = 0
                prefill_tokens = budget - _fcfs_prefills(pre, budget, cap, split, chunks)
            else:
                n = num_dec if num_dec < most else most  # noqa: FURB136  perf: no call per batch
        elif policy == FASTERTRANSFORMER:
            if num_dec:
                n = num_dec if num_dec < most else most  # noqa: FURB136  perf: no call per batch
            else:
                n = 0
                prefill_tokens = budget - _fcfs_prefills(pre, budget, cap, split, chunks)
        else:
            n, prefill_tokens = _vllm_v1(pre, dec, budget, cap, max_chunk, limit, chunks)
        num_tokens = n + prefill_tokens
        demand = total_prefill + num_dec
        if num_tokens < 1 or num_tokens > budget:
            raise InternalError(f"{engine.scheduler!r} planned {num_tokens} tokens with demand {demand}")
        cap_active = in_engine > cap  # (cap is _NO_CAP without k_max)
        if cap_active:
            shares = heapq.nlargest(kmax, (r.prefill_left for r in pre))
            bound = min(budget, sum(shares) + min(kmax - len(shares), num_dec))
        else:
            bound = budget if demand > budget else demand  # noqa: FURB136  perf: once per batch
        duration = durations[num_tokens]

        # Decoders joining the head (dec[:n] must be head before a round).
        if n > head:
            for r in dec[head:n]:
                key = rounds - r.decode_left
                r.decode_left = key
                bucket = calendar.get(key)
                if bucket is None:
                    calendar[key] = [r]
                    heappush(pending, key)
                else:
                    bucket.append(r)
            head = n

        # A quiet stretch: how many batches from this one on are identical and finish nothing.
        # perf: first the cheap test that a second batch would start before the next arrival.
        lim = arrivals[i] if i < n_arr else _INF
        if horizon < lim:  # noqa: PLR1730
            lim = horizon
        if now + duration < lim and detail is None and (not cap_active or not pre):
            quiet = _NO_CAP
            for r, c in chunks:
                q = (r.prefill_left - 1) // c
                if q < quiet:  # perf: the usual case (a chunk completes) stops at once
                    quiet = q
                    if q < 2:
                        break
            if quiet >= 2 and n:
                if n < head:
                    for r in dec[n:head]:
                        r.decode_left = rounds - r.decode_left
                    head = n
                # The next round at which a head decoder finishes.  Calendar entries are lazy (a
                # delayed decoder keeps its old, earlier entry): a round none of whose entries is
                # due has its entries re-filed at their true rounds, so it does not cut the stretch.
                while True:
                    key = pending[0]
                    if key <= rounds:
                        calendar.pop(heappop(pending), None)
                        continue
                    if not delayed:
                        break
                    bucket = calendar[key]
                    for r in bucket:
                        if r.decode_left == key:
                            break
                    else:
                        del calendar[key]
                        heappop(pending)
                        for r in bucket:
                            late = r.decode_left
                            if late > key:
                                later = calendar.get(late)
                                if later is None:
                                    calendar[late] = [r]
                                    heappush(pending, late)
                                elif r not in later:
                                    later.append(r)
                        continue
                    break
                q = key - rounds - 1
                quiet = min(quiet, q)
            if quiet >= 2:
                if quiet <= _NUMPY_STRETCH:
                    m, s = 0, now
                    while m < quiet and s < lim:
                        s += duration
                        ends_append(s)
                        m += 1
                    tokens.extend([num_tokens] * m)
                else:
                    m, s = _stretch(now, duration, quiet, lim, ends)
                    tokens.extend(np.full(m, num_tokens, dtype=np.int64).tolist())
                # Violations: the bound falls with demand (prefill tokens served); decoders stay.
                if prefill_tokens and not cap_active:
                    violations += m - _bound_hits(num_tokens, budget, demand, prefill_tokens, m)
                elif num_tokens != bound:
                    violations += m
                if n:
                    rounds += m
                for r, c in chunks:
                    r.prefill_left -= m * c
                total_prefill -= m * prefill_tokens
                now = s
                if progress is not None and len(ends) >= next_report:
                    progress(now, base + i)
                    next_report = len(ends) + 2000
                if chunks or m < quiet or now >= lim:
                    continue
                # perf: a decode-only stretch that ended at a finishing round, before any arrival:
                # the next batch is the same batch, so run it now (one loop turn less per finish).

        # One batch.
        if num_tokens != bound:
            violations += 1
        end = now + duration
        if detail is not None:
            detail.append((now, end, prefill_tokens, n, len(chunks) + n, demand, bound))
        if n:
            if n < head and 4 * n <= head - n:
                # perf: a short prefix gets its token by moving each one's round one earlier,
                # instead of moving the longer rest of the head one round later.
                finished = []
                for r in dec[:n]:
                    key = r.decode_left - 1
                    r.decode_left = key
                    if key == rounds:
                        finished.append(r)
                        continue
                    bucket = calendar.get(key)
                    if bucket is None:
                        calendar[key] = [r]
                        heappush(pending, key)
                    else:
                        bucket.append(r)
            else:
                # perf: the rest of the head misses this round: its rounds move one later (they stay
                # head, so a policy that shrinks n for one batch, like Orca, pays once, not twice).
                # Only decode_left moves; their calendar entries stay where they were (lazy: an
                # entry is re-filed at the request's true round when its round comes up).
                if n < head:
                    delayed = True
                    for r in dec[n:head]:
                        r.decode_left += 1
                rounds += 1
                finished = calendar.pop(rounds, ())
                while pending and pending[0] <= rounds:
                    calendar.pop(heappop(pending), None)
            for r in finished:
                key = r.decode_left
                if key != rounds:
                    if key > rounds:  # delayed since it was filed: re-file it at its true round
                        later = calendar.get(key)
                        if later is None:
                            calendar[key] = [r]
                            heappush(pending, key)
                        elif r not in later:
                            later.append(r)
                    continue  # a stale calendar entry (finished or moved to the tail)
                r.decode_left = 0
                r.finish_time = end
                j = bisect_left(dec, r.rid, hi=head, key=_RID)
                if j == head or dec[j] is not r:
                    raise InternalError(f"finished request {r.rid} was not decoding")
                del dec[j]
                head -= 1
                in_engine -= 1
        if chunks:
            total_prefill -= prefill_tokens
            done = 0
            for r, c in chunks:
                left = r.prefill_left - c
                r.prefill_left = left
                if left == 0:
                    done += 1
                    r.first_token_time = end
                    left = r.decode_left
                    if left == 0:
                        r.finish_time = end
                        in_engine -= 1
                        continue
                    if dec and dec[-1].rid > r.rid:
                        j = bisect_left(dec, r.rid, key=_RID)
                        dec.insert(j, r)
                    else:
                        j = len(dec)
                        dec.append(r)
                    if j <= head:  # joins the head: it finishes `left` rounds from now
                        head += 1
                        key = rounds + left
                        r.decode_left = key
                        bucket = calendar.get(key)
                        if bucket is None:
                            calendar[key] = [r]
                            heappush(pending, key)
                        else:
                            bucket.append(r)
                    else:
                        r.decode_left = -left
            if done:
                popped = 0
                while pre and pre[0].prefill_left == 0:
                    pre.popleft()
                    popped += 1
                if popped != done:
                    pre = deque(r for r in pre if r.prefill_left)
        now = end
        ends_append(end)
        tokens_append(num_tokens)
        if progress is not None and len(ends) >= next_report:
            progress(now, base + i)
            next_report = len(ends) + 2000

    # Leave the engine as reference stepping would: true decode counts, same queues and counters.
    for j, r in enumerate(dec):
        r.decode_left = r.decode_left - rounds if j < head else -r.decode_left
    state.prefilling = pre
    state.total_prefill_left = total_prefill
    engine.num_in_engine = in_engine
    engine.violations = violations
    return now, base + i


def _stretch(now: float, duration: float, quiet: int, lim: float, ends) -> tuple[int, float]:
    """Up to ``quiet`` batches of ``duration`` from ``now``, each starting before ``lim``: append
    their end times (sequential float additions, as the reference) and return (count, last end)."""
    m, s = 0, now
    while m < quiet and s < lim:
        want = quiet - m
        if lim != _INF:  # perf: only compute the ends that can start before lim (plus a margin)
            want = min(want, int((lim - s) / duration) + 2)
        seq = np.cumsum(np.concatenate(([s], np.full(want, duration))))
        run = int(np.searchsorted(seq[:want], lim, side="left"))  # starts seq[0..want-1] before lim
        ends.extend(seq[1:run + 1].tolist())
        m += run
        s = float(seq[run])
        if run < want:
            break
    return m, s


def _bound_hits(num_tokens: int, budget: int, demand: int, served: int, m: int) -> int:
    """How many j in [0, m) have num_tokens == min(budget, demand - j * served) (served > 0)."""
    if num_tokens == budget:  # demand - j * served >= budget
        return min(m, (demand - budget) // served + 1) if demand >= budget else 0
    gap = demand - num_tokens
    return int(gap >= 0 and gap % served == 0 and gap // served < m)
