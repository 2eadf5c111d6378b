"""The simulator's compiled event loop: the Python side (docs/performance.md; paper §3.1).

``_fastcore.c`` is a C port of the pure-Python fast path (:mod:`llmqueue.fastpath`): the same
batches as the reference loop, bit for bit, for the scheduler classes of
:data:`~llmqueue.fastpath.FAST_POLICIES` with a tokens-only batch-time model, at tens of
nanoseconds per batch.  It is built at install time when a C compiler is present (setup.py);
without it, or when the build is older than the source, :func:`unavailable` says why and the
simulator takes the pure-Python fast path instead (identical results, slower).

This module turns a :class:`~llmqueue.workload.Requests` into the arrays the loop works on and
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

from llmqueue.engine import Engine
from llmqueue.errors import InternalError
from llmqueue.fastpath import FAST_POLICIES
from llmqueue.request import Request
from llmqueue.workload import Requests

_NO_CAP = 1 << 62
#: The calendar ring's largest size (rounds ahead kept in O(1) lists; further ones go to a heap):
#: 8 MB at most.  Tests shrink it to exercise the heap.
RING = 1 << 20
_SOURCE = Path(__file__).with_name("_fastcore.c")


def _load() -> tuple[object | None, str | None]:
    try:
        from llmqueue import _fastcore  # noqa: PLC0415  optional: built only where a C compiler is
    except ImportError:
        return None, "the compiled core is not built (reinstall with a C compiler: pip install -e .)"
    if _SOURCE.exists():
        digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()
        if digest != _fastcore.SOURCE_SHA256:
            return None, "the compiled core is older than _fastcore.c (rebuild: pip install -e .)"
    return _fastcore, None


_core, _why_not = _load()
if _why_not is not None and "older" in _why_not:  # a developer edited the C source: say so once
    warnings.warn(f"llmqueue: {_why_not}; using the slower Python fast path", RuntimeWarning, stacklevel=2)


def unavailable() -> str | None:
    """Why the compiled loop cannot be used in this installation (None: it can)."""
    return _why_not


@dataclass
class Ran:
    """What one compiled run produced (per-request arrays indexed by rid, per-batch arrays)."""

    now: float
    admitted: int
    first_token_time: np.ndarray
    finish_time: np.ndarray
    rejected: np.ndarray          # bool mask
    batch_end_time: np.ndarray
    batch_tokens: np.ndarray
    detail: np.ndarray | None     # (batches, 7) float64 in simulator.BATCH_COLUMNS order
    planned: int                  # batches planned in full; the rest ran as decode-only rounds


def run(engine: Engine, requests: Requests, horizon: float, record_batches: bool,
        progress: Callable[[float, int], None] | None) -> Ran:
    """The reference loop of :func:`~llmqueue.simulator.simulate` on the compiled core.

    ``engine`` must be able to take the fast path (:func:`llmqueue.fastpath.fallback_reason`
    is None) and this installation must have the core (:func:`unavailable` is None).
    """
    if _core is None:
        raise InternalError(f"compiled core requested but {_why_not}")
    scheduler = engine.scheduler
    settings = scheduler.settings
    budget = engine.token_budget
    kmax = engine.max_batch_requests
    arrivals = np.ascontiguousarray(requests.arrival_time, dtype=np.float64)
    prompts = np.ascontiguousarray(requests.num_prompt_tokens, dtype=np.int64)
    outputs = np.ascontiguousarray(requests.num_output_tokens, dtype=np.int64)
    durations = np.asarray(engine.batch_time.table(budget), dtype=np.float64)
    n = len(arrivals)
    prefill_left, decode_left = np.empty(n, np.int64), np.empty(n, np.int64)
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    prefilling, rejected = np.empty(n, np.int64), np.empty(n, np.int64)
    decoding = np.empty(2 * n + 2, np.int64)  # the decoding list slides inside it (_fastcore.c)
    try:
        (now, admitted, ps, pe, ds, nd, nrej, in_engine, violations, total_prefill, ends, tokens,
         detail, planned) = _core.run(
            arrivals, prompts, outputs, durations, prefill_left, decode_left, first, finish,
            prefilling, decoding, rejected, FAST_POLICIES[type(scheduler)], budget,
            kmax if kmax is not None else _NO_CAP, int(bool(settings.get("split_prompts", True))),
            settings.get("long_prefill_token_threshold", 0) or _NO_CAP,
            settings.get("max_num_seqs", _NO_CAP), bool(scheduler.splits_prompts), float(horizon),
            bool(record_batches), progress, RING)
    except RuntimeError as exc:  # an impossible plan: a bug, as in Engine.step
        raise InternalError(f"{scheduler!r} {exc}") from exc

    def requests_of(rids: np.ndarray) -> list[Request]:
        # perf: an unstable run can end with most requests still queued; build them with map()
        # and set state only on those that moved (started prefill or decode).
        p, o = prompts[rids], outputs[rids]
        out = list(map(Request, rids.tolist(), arrivals[rids].tolist(), p.tolist(), o.tolist()))
        pl, dl, f = prefill_left[rids], decode_left[rids], first[rids]
        for k in np.flatnonzero((pl != p) | (dl != o)).tolist():
            out[k].prefill_left = int(pl[k])
            out[k].decode_left = int(dl[k])
        for k in np.flatnonzero(~np.isnan(f)).tolist():  # prefill done: it has its first token
            out[k].first_token_time = float(f[k])
        return out

    # Leave the engine as reference stepping would: the same queues, counters and rejections.
    state = engine.state
    state.prefilling = deque(requests_of(prefilling[ps:pe]))
    state.decoding = requests_of(decoding[ds:ds + nd])
    state.total_prefill_left = total_prefill
    engine.num_in_engine = in_engine
    engine.violations += violations
    engine.rejected.extend(requests_of(rejected[:nrej]))
    mask = np.zeros(n, dtype=bool)
    mask[rejected[:nrej]] = True
    return Ran(now=now, admitted=admitted, first_token_time=first, finish_time=finish, rejected=mask,
               batch_end_time=np.frombuffer(ends, dtype=np.float64),
               batch_tokens=np.frombuffer(tokens, dtype=np.int64),
               detail=None if detail is None else np.frombuffer(detail, dtype=np.float64).reshape(-1, 7),
               planned=planned)
