"""The discrete-event loop for one engine (arXiv 2504.07347 §3.1).

Batches run back to back; arrivals during a batch wait for the next batch boundary; an
idle engine starts a batch at the next arrival.  The run is deterministic: the request
stream is generated up front (common random numbers across schedulers) and the loop
itself draws no random numbers.

Horizon: a run stops at the first batch boundary at or after ``horizon_s`` (requests still
inside are counted as in system), or with ``drain`` once every request has finished.

Two loops give identical results (docs/architecture.md): the compiled core (:mod:`llmqueue.core.fastcore`,
the default) and the reference loop (:mod:`llmqueue.core.loop`, one :meth:`Engine.step` per batch),
which runs where the core cannot.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.core.loop import run_reference
from llmqueue.model.request import Request
from llmqueue.model.workload import Requests

BATCH_COLUMNS = ("start_time", "end_time", "num_prefill_tokens", "num_decode_tokens",
                 "num_requests", "demand", "bound")  # plus "duration" (end - start) in Result.batches


@dataclass
class Result:
    """Everything a run recorded; per-request arrays are indexed by request id (arrival order)."""

    scheduler: str
    token_budget: int
    end_time: float                      # the run's horizon T (seconds)
    arrival_time: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    first_token_time: np.ndarray         # NaN: not yet (or rejected)
    finish_time: np.ndarray              # NaN: not yet (or rejected)
    rejected: np.ndarray                 # bool: prompt larger than a non-splitting scheduler can ever serve
    batch_end_time: np.ndarray           # every batch, always recorded (for the backlog)
    batch_tokens: np.ndarray
    violations: int
    batches: dict[str, np.ndarray] | None = None   # full per-batch detail when record_batches
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)
    kv: KVRecord | None = None           # with KV memory (model/kv.py): blocks, preemptions, recompute

    @property
    def num_batches(self) -> int:
        return len(self.batch_end_time)

    def to_pandas(self, points: int = 600):
        """The run as pandas DataFrames (the ``pandas`` extra): ``.requests`` (one row per request),
        ``.batches`` (one per batch; every recorded column with ``run.record_batches``) and
        ``.timeseries`` (requests in system and backlog at ``points`` even times), a
        :class:`llmqueue.tables.Frames`.  :mod:`llmqueue.tables` writes the same tables as CSV, JSON
        or Parquet."""
        from llmqueue.tables import result_frames   # pandas, and the time series of llmqueue.metrics

        return result_frames(self, points)


@dataclass
class KVRecord:
    """What KV memory did in a run: per batch the blocks in use and the tokens computed again
    (after preemptions), per request its preemptions and recomputed tokens."""

    blocks: int                          # kv_blocks (kv_blocks − 1 usable)
    block_size: int
    policy: str
    batch_start: np.ndarray              # float64, each batch's start (its end: Result.batch_end_time)
    batch_blocks: np.ndarray             # int64, blocks in use during each batch
    batch_recomputed: np.ndarray         # int64, tokens of each batch computed before a preemption
    preemptions: np.ndarray              # int64 per request
    recomputed: np.ndarray               # int64 per request
    memory_limited: int                  # batches memory kept below the work-conserving bound
    # prefix caching (docs/prefix_caching.md); None when it is off
    hit_tokens: np.ndarray | None = None  # int64 per request: tokens found in the cache (all admissions)
    first_hit_tokens: np.ndarray | None = None  # int64 per request: found at its first admission
    prefix: dict | None = None           # the pool's counters: vLLM's queries/hits, evictions, cached blocks


METHODS = ("fast", "reference")


def simulate(engine: Engine, requests: Requests, *, horizon_s: float | None = None, drain: bool = False,
             record_batches: bool = False,
             progress: Callable[[float, int], None] | None = None, method: str = "fast") -> Result:
    """Run ``requests`` through ``engine``; return a :class:`Result`.

    Without ``horizon_s`` and ``drain`` the run ends at the last arrival.  ``progress``
    is called now and then with (simulated time, requests admitted).  ``method`` picks the
    loop, both giving identical results: ``"fast"`` (the compiled core of :mod:`llmqueue.core.fastcore`
    where it can run: it is built, the scheduler is a composed plan and the batch time depends on
    the token load only; else the reference loop) or ``"reference"`` (one :meth:`Engine.step` per
    batch, :mod:`llmqueue.core.loop`).  ``Result.meta["method"]`` says which loop ran ("fast" or
    "reference (why)") and ``meta["core"]`` which interpreter ("compiled" or "reference").
    """
    if method not in METHODS:
        raise ConfigError("run.method", method, f"one of {', '.join(METHODS)}")
    started = _time.perf_counter()
    n = len(requests)
    last = float(requests.arrival_time[-1]) if n else 0.0
    if drain:
        horizon = float("inf")
    elif horizon_s is not None:
        horizon = float(horizon_s)
    else:
        horizon = last
    if getattr(engine, "pool", None) is not None:
        engine.contents = getattr(requests, "content", None)   # who shares which prefix
    reason = fastcore.reason(engine) if method != "reference" else "selected"  # None: the compiled core
    if reason is None:
        ran = fastcore.run(engine, requests, horizon, record_batches, progress)
        now, i = ran.now, ran.admitted
        rejected = np.zeros(n, dtype=bool)
        rejected[ran.rejected] = True
        result = _result(engine, requests, max(now, last) if drain else horizon, ran.first_token_time,
                         ran.finish_time, rejected, ran.batch_end_time, ran.batch_tokens, ran.detail)
        if ran.kv is not None:
            k, kv = ran.kv, engine.kv
            result.kv = KVRecord(kv.blocks, kv.block_size, kv.policy, k.batch_start, k.batch_blocks,
                                 k.batch_recomputed, k.preemptions.copy(), k.recomputed.copy(), k.memory_limited)
    else:
        admitted: list[Request] = []
        ends: list[float] = []
        tokens: list[int] = []
        detail: list[tuple] | None = [] if record_batches else None
        now, i = run_reference(engine, requests.arrival_time.tolist(), requests.num_prompt_tokens.tolist(),
                               requests.num_output_tokens.tolist(), horizon, admitted, ends, tokens, detail, progress)
        first, finish = request_times(admitted, n)
        rejected = np.zeros(n, dtype=bool)
        rejected[[r.rid for r in engine.rejected]] = True
        result = _result(engine, requests, max(now, last) if drain else horizon, first, finish, rejected,
                         np.asarray(ends, dtype=float), np.asarray(tokens, dtype=np.int64),
                         None if detail is None else np.array(detail, dtype=float).reshape(-1, len(BATCH_COLUMNS)))
        if engine.kv is not None:
            result.kv = kv_record(engine, admitted, n)
    result.wall_s = _time.perf_counter() - started
    result.meta["method"] = "fast" if reason is None else f"reference ({reason})"
    result.meta["core"] = "compiled" if reason is None else "reference"
    if progress is not None:
        progress(now, i)
    return result


def kv_record(engine: Engine, admitted: Sequence[Request], n: int) -> KVRecord:
    """The :class:`KVRecord` of a reference run on ``engine`` (fresh at its start)."""
    kv = engine.kv
    preemptions = np.zeros(n, dtype=np.int64)
    recomputed = np.zeros(n, dtype=np.int64)
    for r in admitted:
        if r.preemptions:
            preemptions[r.rid] = r.preemptions
            recomputed[r.rid] = r.recomputed
    record = KVRecord(kv.blocks, kv.block_size, kv.policy, np.asarray(engine.kv_starts, dtype=float),
                      np.asarray(engine.kv_series, dtype=np.int64),
                      np.asarray(engine.kv_waste, dtype=np.int64), preemptions, recomputed, engine.memory_limited)
    if getattr(engine, "pool", None) is not None:
        hits = np.zeros(n, dtype=np.int64)
        for r in admitted:
            if r.hit:
                hits[r.rid] = r.hit
        record.hit_tokens = hits
        first = np.zeros(n, dtype=np.int64)
        for rid, hit in engine.pool.first_hits.items():
            first[rid] = hit
        record.first_hit_tokens = first
        record.prefix = engine.pool.stats()
    return record


def request_times(admitted: Sequence[Request], n: int) -> tuple[np.ndarray, np.ndarray]:
    """First-token and finish times of ``n`` requests by id (NaN where not reached)."""
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    for r in admitted:
        if r.first_token_time is not None:
            first[r.rid] = r.first_token_time
        if r.finish_time is not None:
            finish[r.rid] = r.finish_time
    return first, finish


def _result(engine: Engine, requests: Requests, end_time: float, first: np.ndarray, finish: np.ndarray,
            rejected: np.ndarray, ends: np.ndarray, tokens: np.ndarray, detail: np.ndarray | None) -> Result:
    """The :class:`Result` of a run (``detail``: one row per batch, :data:`BATCH_COLUMNS`)."""
    batches = None
    if detail is not None:
        batches = {name: detail[:, j] if j < 2 else detail[:, j].astype(np.int64)
                   for j, name in enumerate(BATCH_COLUMNS)}
        batches["duration"] = batches["end_time"] - batches["start_time"]
    return Result(
        scheduler=engine.scheduler.name,
        token_budget=engine.token_budget,
        end_time=end_time,
        arrival_time=requests.arrival_time,
        num_prompt_tokens=requests.num_prompt_tokens,
        num_output_tokens=requests.num_output_tokens,
        first_token_time=first,
        finish_time=finish,
        rejected=rejected,
        batch_end_time=ends,
        batch_tokens=tokens,
        violations=engine.violations,
        batches=batches,
    )
