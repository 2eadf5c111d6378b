"""The serving loop of the real engine (docs/real_engine.md; paper §3.1 on a real model).

The project's :class:`~llmqueue.core.engine.Engine` plans every batch with the configured
scheduler; :class:`MeasuredBatchTime` is the engine's batch-time model and, when the engine
asks it for the batch's time (``plan_seconds``, called before the batch is applied), runs
the plan on the transformer and returns the measured duration.  Two clocks:

* ``measured`` — the clock advances by each batch's measured duration and arrivals are
  injected by that clock: batch compositions do not depend on pauses between steps, and
  with ``timer = "thread_cpu"`` (CPU time of the one torch thread) hardly on other load
  on the machine either;
* ``wall`` — arrivals in real time (the loop sleeps while idle), for demos;
* ``model`` — every batch still runs on the model, but the clock advances by the config's
  batch-time model (the simulator's), so the engine's decisions — batches, admissions,
  preemptions — are the simulator's on the same requests.

Memory, without ``engine.kv_blocks``: a request enters the engine only once the contiguous
KV pool has reserved ``v_p + v_d`` slots for it; until then it waits, in arrival order.  A
request that can never fit (longer than the pool or than the model's positions) is rejected.

With ``engine.kv_blocks`` the pool is paged (:class:`~llmqueue.real.kvcache.PagedKVPool`) and
the engine's own memory model decides: every request is admitted to the engine at once, the
engine's :class:`~llmqueue.model.kv.KVCache` starts, grows and preempts requests, and
:class:`PagedExecutor` mirrors each decision on the pool (blocks for every scheduled chunk,
all blocks of a preempted request freed, the recompute of its prompt and generated tokens
really run), checking after every batch that it holds as many blocks as the engine counts.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmqueue.model.batch_time import BatchTime
from llmqueue.checks import integer
from llmqueue.config import Config
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError, InternalError
from llmqueue.metrics import summarize
from llmqueue.model.kv import make_kv
from llmqueue.real import split_engine_config
from llmqueue.real.kvcache import KVPool, PagedKVPool, consecutive
from llmqueue.real.model import Chunk, ModelConfig, Transformer, model_config
from llmqueue.model.request import Request
from llmqueue.runner import Run, analysis_of, batch_time_of, build_workload, check_cache, generate
from llmqueue.schedulers import make_scheduler
from llmqueue.schedulers.plan import seq_len
from llmqueue.core.simulator import BATCH_COLUMNS, Result, kv_record, request_times
from llmqueue.model.workload import Requests

CLOCKS = ("measured", "wall", "model")
TIMERS = {"thread_cpu": time.thread_time, "wall": time.perf_counter}
REAL_KEYS = ("model", "hf_path", "kv_capacity_tokens", "threads", "clock", "timer", "warmup_batches")
EXTRA_BATCH_COLUMNS = ("attention_pairs", "kv_reserved_tokens", "waiting_for_memory")
#: with a paged pool also: blocks in use during the batch and requests preempted at its start
PAGED_BATCH_COLUMNS = (*EXTRA_BATCH_COLUMNS, "kv_blocks_in_use", "preempted")


@dataclass(frozen=True)
class RealSettings:
    """The ``[real]`` table of an engine config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    hf_path: str | None = None
    kv_capacity_tokens: int = 32768
    threads: int = 1
    clock: str = "measured"
    timer: str = "thread_cpu"
    warmup_batches: int = 3

    def describe(self) -> dict:
        return {"hf_path": self.hf_path, "kv_capacity_tokens": self.kv_capacity_tokens, "threads": self.threads,
                "clock": self.clock, "timer": self.timer, "warmup_batches": self.warmup_batches}

    def to_table(self) -> dict:
        """A ``[real]`` table that :func:`real_settings` reads back to these settings."""
        table = {k: v for k, v in self.describe().items() if v is not None}
        return {**table, "model": asdict(self.model)}


def real_settings(spec: Mapping | None, field: str = "real") -> RealSettings:
    """Validate a ``[real]`` table; every error names the field, the value and what is allowed."""
    spec = dict(spec or {})
    for key in spec:
        if key not in REAL_KEYS:
            raise ConfigError(f"{field}.{key}", spec[key], f"a key of [real]: {', '.join(REAL_KEYS)}")
    model = spec.get("model", {})
    if not isinstance(model, Mapping):
        raise ConfigError(f"{field}.model", model, "a table such as {preset = \"default\"}")
    clock = spec.get("clock", "measured")
    if clock not in CLOCKS:
        raise ConfigError(f"{field}.clock", clock, f"one of {', '.join(CLOCKS)}")
    timer = spec.get("timer", "wall" if clock == "wall" else "thread_cpu")
    if timer not in TIMERS:
        raise ConfigError(f"{field}.timer", timer, f"one of {', '.join(TIMERS)}")
    threads = integer(spec.get("threads", 1), f"{field}.threads", 1)
    if timer == "thread_cpu" and threads != 1:
        raise ConfigError(f"{field}.threads", threads, "1 with timer = \"thread_cpu\" (CPU time of one thread "
                          "misses the others); use timer = \"wall\" for more threads")
    if clock == "wall" and timer != "wall":
        raise ConfigError(f"{field}.timer", timer, "\"wall\" with clock = \"wall\"")
    hf_path = spec.get("hf_path")
    if hf_path is not None and not isinstance(hf_path, str):
        raise ConfigError(f"{field}.hf_path", hf_path, "a folder path (string)")
    return RealSettings(
        model=model_config(model, f"{field}.model"), hf_path=hf_path,
        kv_capacity_tokens=integer(spec.get("kv_capacity_tokens", 32768), f"{field}.kv_capacity_tokens", 1),
        threads=threads, clock=clock, timer=timer,
        warmup_batches=integer(spec.get("warmup_batches", 3), f"{field}.warmup_batches", 0))


def load_engine_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, RealSettings]:
    """An engine config: the simulator's tables plus ``[real]``; ``--set`` overrides reach both."""
    config, real = split_engine_config(path, overrides)
    return config, real_settings(real)


def load_model(settings: RealSettings, base_dir=None) -> Transformer:
    """Seeded random weights, or the Hugging Face folder ``hf_path`` (relative to the config)."""
    if settings.hf_path is None:
        return Transformer.random(settings.model)
    path = Path(settings.hf_path)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Transformer.from_hf(path, dtype=settings.model.dtype)


class Executor:
    """Executes batch plans on the model: KV runs, prompt tokens and greedy outputs per request."""

    def __init__(self, model: Transformer, pool: KVPool, timer: Callable[[], float], seed: int = 0) -> None:
        self.model, self.pool, self.timer, self.seed = model, pool, timer, seed
        self.start: dict[int, int] = {}
        self.prompt: dict[int, list[int]] = {}
        self.outputs: dict[int, list[int]] = {}
        self.num_batches = 0
        self.last_pairs = 0      # attention pairs of the last batch (llmqueue.model.batch_time.attention_pairs)
        self.measured_s = 0.0    # measured seconds of all batches (with clock = "model" not the engine's clock)

    def max_request_tokens(self) -> int:
        return min(self.pool.capacity_tokens, self.model.config.max_position)

    def reserve(self, request: Request) -> bool:
        """Reserve the request's KV run; False when no run is free now."""
        start = self.pool.reserve(request.num_prompt_tokens + request.num_output_tokens)
        if start is None:
            return False
        rng = np.random.default_rng([self.seed, request.rid])
        self.start[request.rid] = start
        self.prompt[request.rid] = rng.integers(1, self.model.config.vocab_size, request.num_prompt_tokens).tolist()
        self.outputs[request.rid] = []
        return True

    def release(self, request: Request) -> None:
        self.pool.release(self.start.pop(request.rid), request.num_prompt_tokens + request.num_output_tokens)
        del self.prompt[request.rid]

    def _chunks(self, plan) -> list[Chunk]:
        chunks = []
        for r, n in plan.prefill:
            done = r.num_prompt_tokens - r.prefill_left
            chunks.append(Chunk(self.start[r.rid], done, self.prompt[r.rid][done: done + n]))
        for r in plan.decode:
            context = r.num_prompt_tokens + r.num_output_tokens - r.decode_left
            chunks.append(Chunk(self.start[r.rid], context, self.outputs[r.rid][-1:]))
        return chunks

    def run(self, plan) -> float:
        """Run ``plan`` (read before the engine applies it); return the measured seconds."""
        chunks = self._chunks(plan)
        self.last_pairs = sum(len(t) * c + len(t) * (len(t) + 1) // 2 for _, c, t in chunks)
        began = self.timer()
        next_ids = self.model.forward(chunks, self.pool.k, self.pool.v).argmax(-1).tolist()
        duration = self.timer() - began
        self.measured_s += duration
        # The batch that ends a prompt emits the first output token; a decode token emits the next
        # (and the last chunk of a recompute after a preemption the request's next token).
        for (r, n), token in zip(plan.prefill, next_ids):
            if n == r.prefill_left:
                self.outputs[r.rid].append(token)
        for r, token in zip(plan.decode, next_ids[len(plan.prefill):]):
            self.outputs[r.rid].append(token)
        self.num_batches += 1
        return duration

    def warm_up(self, batches: int, token_budget: int) -> None:
        """A few throwaway batches (a full prefill, then decodes) so first-call costs stay out of the run."""
        if batches == 0:
            return
        n = max(1, min(token_budget, self.max_request_tokens() - 1, self.pool.capacity_tokens // 2))
        start = self.pool.reserve(n + 1)
        if start is None:
            return
        try:
            for i in range(batches):
                ids = [1] * n if i == 0 else [1]
                self.model.forward([Chunk(start, 0 if i == 0 else n, ids)], self.pool.k, self.pool.v)
        finally:
            self.pool.release(start, n + 1)


class PagedExecutor(Executor):
    """Executes plans on a :class:`~llmqueue.real.kvcache.PagedKVPool`, mirroring the engine's
    KV memory model (``engine.kv``) block for block.

    Each request gets a block table when the engine first schedules it; every chunk of ``n``
    tokens after ``computed`` ones extends it to ceil((computed + n) / block_size) blocks
    (``reserve``: ceil((v_p + v_d) / block_size) at once).  A preempted request (``plan.preempted``,
    or found by its ``preemptions`` count when the engine preempted before planning again) frees
    all its blocks; the engine then schedules it as a prompt of its whole sequence so far, which
    is fed again (prompt + generated tokens) and whose last chunk emits the next token.
    """

    def __init__(self, model: Transformer, pool: PagedKVPool, timer: Callable[[], float], seed: int = 0) -> None:
        super().__init__(model, pool, timer, seed)
        self.tables: dict[int, list[int]] = {}
        self.holders: dict[int, Request] = {}
        self.computed: dict[int, int] = {}    # tokens whose K/V the request holds
        self.index: dict[int, torch.Tensor | int] = {}   # slots of its blocks (an int: one run from there)
        self._index_blocks: dict[int, int] = {}           # blocks the index covers
        self.seen: dict[int, int] = {}        # its preemptions count when it got its blocks
        self.peak: dict[int, int] = {}        # most tokens it held before a preemption
        self.preemption_log: list[tuple[int, int]] = []   # (batch index, request id), in order
        self.preempted_last = 0               # requests preempted at the start of the last batch
        self.recomputed_tokens = 0            # tokens fed again after a preemption
        self.blocks_in_batch = 0              # blocks in use during the last batch (after allocation)
        self.peak_blocks = 0

    def max_request_tokens(self) -> int:
        return self.model.config.max_position   # the engine rejects requests larger than the cache

    def register(self, request: Request) -> None:
        """The request's prompt tokens (seeded by its id, as in the contiguous pool) and outputs."""
        rng = np.random.default_rng([self.seed, request.rid])
        self.prompt[request.rid] = rng.integers(1, self.model.config.vocab_size, request.num_prompt_tokens).tolist()
        self.outputs[request.rid] = []

    def release(self, request: Request) -> None:
        """A finished (or rejected) request: its blocks back to the pool."""
        rid = request.rid
        table = self.tables.pop(rid, None)
        if table is not None:
            self.pool.release(table)
            del self.holders[rid], self.computed[rid], self.seen[rid]
            self.index.pop(rid, None)
            self._index_blocks.pop(rid, None)
        self.prompt.pop(rid, None)
        self.peak.pop(rid, None)

    def _preempt(self, rid: int) -> None:
        self.pool.release(self.tables.pop(rid))
        del self.holders[rid], self.seen[rid]
        self.index.pop(rid, None)
        self._index_blocks.pop(rid, None)
        held = self.computed.pop(rid)
        if held > self.peak.get(rid, 0):
            self.peak[rid] = held
        self.preemption_log.append((self.num_batches, rid))
        self.preempted_last += 1

    def _chunks(self, plan) -> list[Chunk]:
        pool = self.pool
        self.preempted_last = 0
        # Preempted before this plan: the engine preempted everyone it could and planned again.
        for rid in [rid for rid, r in self.holders.items() if r.preemptions != self.seen[rid]]:
            self._preempt(rid)
        for victim in plan.preempted:
            if self.computed.get(victim.rid) != seq_len(victim) - victim.prefill_left:
                raise InternalError(f"preempted request {victim.rid} holds {self.computed.get(victim.rid)} tokens "
                                    f"here, {seq_len(victim) - victim.prefill_left} in the engine")
            self._preempt(victim.rid)
        whole = pool.kv.policy == "reserve"
        chunks = []
        for r, n in plan.prefill:
            rid = r.rid
            done = seq_len(r) - r.prefill_left
            table = self.tables.get(rid)
            if table is None:   # started now: a new prompt, or a recompute after a preemption
                if done:
                    raise InternalError(f"request {rid} resumes at token {done} without KV blocks")
                table = self.tables[rid] = []
                self.holders[rid], self.seen[rid] = r, r.preemptions
                if whole:
                    pool.grow(table, r.num_prompt_tokens + r.num_output_tokens)
            elif self.computed[rid] != done:
                raise InternalError(f"request {rid} holds {self.computed[rid]} tokens here, {done} in the engine")
            pool.grow(table, done + n)
            peak = self.peak.get(rid, 0)
            if done < peak:
                self.recomputed_tokens += min(done + n, peak) - done
            prompt = self.prompt[rid]
            ids = prompt[done: done + n] if done + n <= len(prompt) else (prompt + self.outputs[rid])[done: done + n]
            chunks.append(Chunk(self._slots(rid, table, done + n), done, ids))
            self.computed[rid] = done + n
        for r in plan.decode:
            rid = r.rid
            done = seq_len(r)
            if self.computed.get(rid) != done:
                raise InternalError(f"decoding request {rid} holds {self.computed.get(rid)} tokens here, {done} "
                                    "in the engine")
            table = self.tables[rid]
            pool.grow(table, done + 1)
            chunks.append(Chunk(self._slots(rid, table, done + 1), done, self.outputs[rid][-1:]))
            self.computed[rid] = done + 1
        self.blocks_in_batch = pool.used
        self.peak_blocks = max(self.peak_blocks, pool.used)
        return chunks

    def _slots(self, rid: int, table: list[int], tokens: int) -> torch.Tensor | int:
        """The slots of the request's first ``tokens`` positions (see PagedKVPool.slots); the
        index is rebuilt only when the table got a block (perf: once per block_size tokens)."""
        index = self.index.get(rid)
        if index is None or self._index_blocks[rid] != len(table):
            index = self.index[rid] = table[0] * self.pool.block_size if consecutive(table) else self.pool.index(table)
            self._index_blocks[rid] = len(table)
        return index if isinstance(index, int) else index[:tokens]

    def sync(self, engine: Engine, finished: Sequence[Request]) -> None:
        """After the engine applied a batch: free the finished requests' blocks, and check that
        the pool holds exactly the blocks the engine's memory model counts."""
        if self.blocks_in_batch != engine.kv_series[-1]:
            raise InternalError(f"batch {self.num_batches - 1}: {self.blocks_in_batch} KV blocks in use in the "
                                f"pool, {engine.kv_series[-1]} in the engine's memory model")
        for request in finished:
            self.release(request)
        if self.pool.used != engine.state.kv_used:
            raise InternalError(f"after batch {self.num_batches - 1}: {self.pool.used} KV blocks in use in the "
                                f"pool, {engine.state.kv_used} in the engine's memory model")

    def warm_up(self, batches: int, token_budget: int) -> None:
        if batches == 0:
            return
        pool = self.pool
        n = max(1, min(token_budget, self.max_request_tokens() - 1, pool.capacity_tokens // 2))
        if -(-(n + 1) // pool.block_size) > pool.free:
            return
        table: list[int] = []
        pool.grow(table, n + 1)
        try:
            for i in range(batches):
                chunk = Chunk(pool.slots(table, n), 0, [1] * n) if i == 0 else Chunk(pool.slots(table, n + 1), n, [1])
                self.model.forward([chunk], pool.k, pool.v)
        finally:
            pool.release(table)


class MeasuredBatchTime(BatchTime):
    """The engine's batch-time model on the real engine: ``plan_seconds`` executes the plan.

    Token-only questions (the engine's table, Theorem 2's capacity) go to ``reference``, the
    config's batch-time model (normally the calibrated one).  With ``clock = "model"`` the plan
    still runs, but the batch takes the time ``reference`` gives it, exactly as in the simulator
    (its table entry for a token-only model, else its ``plan_seconds``).
    """

    name = "measured"
    tokens_only = False

    def __init__(self, executor: Executor, reference: BatchTime, clock: str = "measured") -> None:
        self.executor, self.reference = executor, reference
        self.model_clock = clock == "model"
        self._durations: list[float] | None = None
        self.last_measured = 0.0

    def table(self, token_budget: int) -> list[float]:
        self._durations = self.reference.table(token_budget)   # what the simulator's engine times with
        return self._durations

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return self.reference.seconds(tokens)

    def to_dict(self) -> dict:
        return self.reference.to_dict()

    def plan_seconds(self, plan) -> float:
        measured = self.last_measured = self.executor.run(plan)
        if not self.model_clock:
            return measured
        if self.reference.tokens_only:
            if self._durations is None:
                raise InternalError("the model clock needs the engine's duration table")
            return self._durations[plan.num_tokens]
        return self.reference.plan_seconds(plan)

    def assumption_warnings(self, token_budget: int) -> list[str]:
        return self.reference.assumption_warnings(token_budget)


def serve(engine: Engine, executor: Executor, requests: Requests, *, clock: str = "measured",
          horizon_s: float | None = None, drain: bool = False,
          progress: Callable[[float, int], None] | None = None,
          between: Callable[[float], None] | None = None) -> Result:
    """Run ``requests`` through ``engine`` on the real model; the simulator's :class:`Result`
    with per-batch records (plus KV use) always kept.  Same horizon rules as
    :func:`llmqueue.core.simulator.simulate`.  ``between(now)`` (the speed probe,
    :class:`llmqueue.real.machine.Probe`) is called every
    :data:`~llmqueue.real.calibrate.PROBE_EVERY` batches, after the batch's time is taken."""
    from llmqueue.real.calibrate import PROBE_EVERY

    started = time.perf_counter()
    arrivals = requests.arrival_time.tolist()
    prompts, outputs = requests.num_prompt_tokens.tolist(), requests.num_output_tokens.tolist()
    n = len(arrivals)
    horizon = float("inf") if drain else float(horizon_s) if horizon_s is not None else (arrivals[-1] if n else 0.0)
    wall = clock == "wall"
    paged = isinstance(executor, PagedExecutor)
    if paged and engine.kv is None:
        raise InternalError("a paged KV pool needs an engine with KV memory (engine.kv_blocks)")
    admitted: list[Request] = []
    rejected: list[int] = []
    waiting: deque[Request] = deque()
    ends: list[float] = []
    tokens: list[int] = []
    detail: list[tuple] = []
    limit = executor.max_request_tokens()
    now, i = 0.0, 0
    while True:
        if wall:
            now = max(now, time.perf_counter() - started)
        while i < n and arrivals[i] <= now:
            request = Request(i, arrivals[i], prompts[i], outputs[i])
            admitted.append(request)
            if prompts[i] + outputs[i] > limit:
                rejected.append(i)
            elif paged:   # the engine's memory model decides when it starts (and rejects one too large)
                executor.register(request)
                if not engine.admit(request):
                    executor.release(request)
            else:
                waiting.append(request)
            i += 1
        # FCFS admission into the engine as KV runs become free (head-of-line waits).
        while waiting and executor.reserve(waiting[0]):
            request = waiting.popleft()
            if not engine.admit(request):
                executor.release(request)
        if not engine.has_work:
            if waiting:  # cannot happen: an empty pool fits every request that is not rejected
                raise InternalError(f"request {waiting[0].rid} waits for memory while the engine is empty")
            if i >= n or arrivals[i] > horizon:
                break
            if wall:
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - started)))
            now = arrivals[i]
            continue
        if now >= horizon:
            break
        step = engine.step(now)
        now = step.end_time
        plan = step.plan
        ends.append(now)
        tokens.append(plan.num_tokens)
        if paged:
            executor.sync(engine, step.finished)
            blocks = executor.blocks_in_batch
            detail.append((step.start_time, now, plan.num_prefill_tokens, len(plan.decode), plan.num_requests,
                           step.demand, step.bound, executor.last_pairs, blocks * executor.pool.block_size, 0,
                           blocks, executor.preempted_last))
        else:
            for request in step.finished:
                executor.release(request)
            detail.append((step.start_time, now, plan.num_prefill_tokens, len(plan.decode), plan.num_requests,
                           step.demand, step.bound, executor.last_pairs, executor.pool.reserved_tokens,
                           len(waiting)))
        if progress is not None and len(ends) % 50 == 0:
            progress(now, i)
        if between is not None and len(ends) % PROBE_EVERY == 0:
            between(now)
    end_time = max(now, arrivals[-1] if n else 0.0) if drain else horizon
    result = _result(engine, requests, admitted, rejected, end_time, ends, tokens, detail,
                     PAGED_BATCH_COLUMNS if paged else EXTRA_BATCH_COLUMNS)
    if engine.kv is not None:
        result.kv = kv_record(engine, admitted, n)
    if paged:
        result.meta["preemption_log"] = list(executor.preemption_log)
    result.wall_s = time.perf_counter() - started
    return result


def _result(engine: Engine, requests: Requests, admitted: Sequence[Request], rejected: Sequence[int],
            end_time: float, ends: list[float], tokens: list[int], detail: list[tuple],
            extra: Sequence[str] = EXTRA_BATCH_COLUMNS) -> Result:
    n = len(requests)
    first, finish = request_times(admitted, n)
    reject = np.zeros(n, dtype=bool)
    reject[[*rejected, *(r.rid for r in engine.rejected)]] = True
    names = (*BATCH_COLUMNS, *extra)
    cols = np.array(detail, dtype=float).reshape(-1, len(names))
    batches = {name: cols[:, j] if j < 2 else cols[:, j].astype(np.int64) for j, name in enumerate(names)}
    batches["duration"] = batches["end_time"] - batches["start_time"]
    return Result(scheduler=engine.scheduler.name, token_budget=engine.token_budget, end_time=end_time,
                  arrival_time=requests.arrival_time, num_prompt_tokens=requests.num_prompt_tokens,
                  num_output_tokens=requests.num_output_tokens, first_token_time=first, finish_time=finish,
                  rejected=reject, batch_end_time=np.asarray(ends, dtype=float),
                  batch_tokens=np.asarray(tokens, dtype=np.int64), violations=engine.violations, batches=batches)


class RealEngine:
    """A model, its KV pool and settings: runs configs' workloads with any scheduler."""

    def __init__(self, settings: RealSettings, base_dir=None, model: Transformer | None = None) -> None:
        torch.set_num_threads(settings.threads)
        self.settings = settings
        self.model = model or load_model(settings, base_dir)
        self.pool = KVPool(self.model.config, settings.kv_capacity_tokens)

    def run(self, config: Config, scheduler: str | None = None, requests: Requests | None = None,
            progress: Callable[[float, int], None] | None = None,
            between: Callable[[float], None] | None = None) -> Run:
        """One scheduler on ``requests`` (default: the config's generated workload), summarised
        with :func:`llmqueue.metrics.summarize` against the config's batch-time model
        (``between``: see :func:`serve`)."""
        workload = build_workload(config)
        if requests is None:
            requests = generate(config, workload)
        name = scheduler or config.engine["scheduler"]
        options = config.scheduler_options if name == config.engine["scheduler"] else {}
        kv = make_kv(config.engine)
        if kv is not None and getattr(kv, "prefix_caching", False):
            raise ConfigError("engine.prefix_caching", True, "false on the real engine (its paged pool gives every "
                              "request its own blocks: no shared, cached prefix blocks); the simulator models it")
        timer = TIMERS[self.settings.timer]
        if kv is None:
            pool = self.pool = KVPool(self.model.config, self.settings.kv_capacity_tokens)  # empty pool per run
            executor = Executor(self.model, pool, timer, seed=config.run.seed)
        else:   # engine.kv_blocks: a paged pool of exactly those blocks, driven by the engine's memory model
            pool = self.pool = PagedKVPool(self.model.config, kv)
            executor = PagedExecutor(self.model, pool, timer, seed=config.run.seed)
        engine = Engine(make_scheduler(name, **options), config.engine["token_budget"],
                        MeasuredBatchTime(executor, batch_time_of(config), self.settings.clock),
                        config.engine.get("max_batch_requests"), kv)
        check_cache(engine.kv, workload)   # the simulator's refusal of a cache too small for a mean request
        executor.warm_up(self.settings.warmup_batches, config.engine["token_budget"])
        rc = config.run
        # The heap as it is now (a long-lived process, e.g. a test suite, holds millions of objects)
        # is left out of the run's garbage collections, so that one does not land inside a timed
        # batch, as vLLM freezes its heap after its warm-up (freeze_gc_heap: gc.freeze).
        gc.collect()
        gc.freeze()
        try:
            result = serve(engine, executor, requests, clock=self.settings.clock, horizon_s=rc.horizon_s,
                           drain=rc.drain, progress=progress, between=between)
        finally:
            gc.unfreeze()
        analysis = analysis_of(config, workload)
        summary = summarize(result, analysis, work_conserving=engine.scheduler.work_conserving,
                            tolerance=rc.verdict_tolerance)
        batches = result.batches
        summary["real"] = {
            **self.settings.describe(), "model": self.model.describe(), "torch_threads": torch.get_num_threads(),
            "kv_pool_bytes": pool.bytes,
            "kv_peak_reserved_tokens": int(batches["kv_reserved_tokens"].max()) if len(batches["duration"]) else 0,
            "peak_waiting_for_memory": int(batches["waiting_for_memory"].max()) if len(batches["duration"]) else 0,
            "mean_batch_ms": float(batches["duration"].mean() * 1e3) if len(batches["duration"]) else 0.0,
            "output_tokens": int(sum(len(v) for v in executor.outputs.values())),
            "measured_s": executor.measured_s,
            "kv_pool": ({"kind": "contiguous", "tokens": pool.capacity_tokens} if kv is None else
                        {"kind": "paged", "kv_blocks": kv.blocks, "block_size": kv.block_size, "kv_policy": kv.policy,
                         "usable_tokens": kv.tokens,
                         # the executor's own counts (equal to the engine's "kv" block by construction)
                         "executor_preemptions": len(executor.preemption_log),
                         "executor_recomputed_tokens": executor.recomputed_tokens,
                         "executor_peak_blocks": executor.peak_blocks}),
        }
        result.meta["outputs"] = executor.outputs
        return Run(result, summary, analysis)
