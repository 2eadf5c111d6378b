"""The serving loop of the real engine (docs/real_engine.md; paper §3.1 on a real model).

The project's :class:`~llmqueue.core.engine.Engine` plans every batch with the configured
scheduler; :class:`MeasuredBatchTime` is the engine's batch-time model and, when the engine
asks it for the batch's time (``plan_seconds``, called before the batch is applied), runs
the plan on the transformer and returns the measured duration.  Two clocks:

* ``measured`` — the clock advances by each batch's measured duration and arrivals are
  injected by that clock: batch compositions do not depend on pauses between steps, and
  with ``timer = "thread_cpu"`` (CPU time of the one torch thread) hardly on other load
  on the machine either;
* ``wall`` — arrivals in real time (the loop sleeps while idle), for demos.

Memory: a request enters the engine only once the KV pool has reserved ``v_p + v_d``
slots for it; until then it waits, in arrival order.  A request that can never fit (longer
than the pool or than the model's positions) is rejected.
"""

from __future__ import annotations

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
from llmqueue.real import split_engine_config
from llmqueue.real.kvcache import KVPool
from llmqueue.real.model import Chunk, ModelConfig, Transformer, model_config
from llmqueue.model.request import Request
from llmqueue.runner import Run, analysis_of, batch_time_of, build_workload, generate
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import BATCH_COLUMNS, Result, request_times
from llmqueue.model.workload import Requests

CLOCKS = ("measured", "wall")
TIMERS = {"thread_cpu": time.thread_time, "wall": time.perf_counter}
REAL_KEYS = ("model", "hf_path", "kv_capacity_tokens", "threads", "clock", "timer", "warmup_batches")
EXTRA_BATCH_COLUMNS = ("attention_pairs", "kv_reserved_tokens", "waiting_for_memory")


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
    timer = spec.get("timer", "thread_cpu" if clock == "measured" else "wall")
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

    def run(self, plan) -> float:
        """Run ``plan`` (read before the engine applies it); return the measured seconds."""
        chunks = []
        for r, n in plan.prefill:
            done = r.num_prompt_tokens - r.prefill_left
            chunks.append(Chunk(self.start[r.rid], done, self.prompt[r.rid][done: done + n]))
        for r in plan.decode:
            context = r.num_prompt_tokens + r.num_output_tokens - r.decode_left
            chunks.append(Chunk(self.start[r.rid], context, self.outputs[r.rid][-1:]))
        self.last_pairs = sum(len(t) * c + len(t) * (len(t) + 1) // 2 for _, c, t in chunks)
        began = self.timer()
        next_ids = self.model.forward(chunks, self.pool.k, self.pool.v).argmax(-1).tolist()
        duration = self.timer() - began
        # The batch that ends a prompt emits the first output token; a decode token emits the next.
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


class MeasuredBatchTime(BatchTime):
    """The engine's batch-time model on the real engine: ``plan_seconds`` executes the plan.

    Token-only questions (the engine's table, Theorem 2's capacity) go to ``reference``, the
    config's batch-time model (normally the calibrated one).
    """

    name = "measured"
    tokens_only = False

    def __init__(self, executor: Executor, reference: BatchTime) -> None:
        self.executor, self.reference = executor, reference

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return self.reference.seconds(tokens)

    def to_dict(self) -> dict:
        return self.reference.to_dict()

    def plan_seconds(self, plan) -> float:
        return self.executor.run(plan)

    def assumption_warnings(self, token_budget: int) -> list[str]:
        return self.reference.assumption_warnings(token_budget)


def serve(engine: Engine, executor: Executor, requests: Requests, *, clock: str = "measured",
          horizon_s: float | None = None, drain: bool = False,
          progress: Callable[[float, int], None] | None = None) -> Result:
    """Run ``requests`` through ``engine`` on the real model; the simulator's :class:`Result`
    with per-batch records (plus KV use) always kept.  Same horizon rules as
    :func:`llmqueue.core.simulator.simulate`."""
    started = time.perf_counter()
    arrivals = requests.arrival_time.tolist()
    prompts, outputs = requests.num_prompt_tokens.tolist(), requests.num_output_tokens.tolist()
    n = len(arrivals)
    horizon = float("inf") if drain else float(horizon_s) if horizon_s is not None else (arrivals[-1] if n else 0.0)
    wall = clock == "wall"
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
        for request in step.finished:
            executor.release(request)
        plan = step.plan
        ends.append(now)
        tokens.append(plan.num_tokens)
        detail.append((step.start_time, now, plan.num_prefill_tokens, len(plan.decode), plan.num_requests,
                       step.demand, step.bound, executor.last_pairs, executor.pool.reserved_tokens, len(waiting)))
        if progress is not None and len(ends) % 50 == 0:
            progress(now, i)
    end_time = max(now, arrivals[-1] if n else 0.0) if drain else horizon
    result = _result(engine, requests, admitted, rejected, end_time, ends, tokens, detail)
    result.wall_s = time.perf_counter() - started
    return result


def _result(engine: Engine, requests: Requests, admitted: Sequence[Request], rejected: Sequence[int],
            end_time: float, ends: list[float], tokens: list[int], detail: list[tuple]) -> Result:
    n = len(requests)
    first, finish = request_times(admitted, n)
    reject = np.zeros(n, dtype=bool)
    reject[[*rejected, *(r.rid for r in engine.rejected)]] = True
    names = (*BATCH_COLUMNS, *EXTRA_BATCH_COLUMNS)
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
            progress: Callable[[float, int], None] | None = None) -> Run:
        """One scheduler on ``requests`` (default: the config's generated workload), summarised
        with :func:`llmqueue.metrics.summarize` against the config's batch-time model."""
        workload = build_workload(config)
        if requests is None:
            requests = generate(config, workload)
        name = scheduler or config.engine["scheduler"]
        options = config.scheduler_options if name == config.engine["scheduler"] else {}
        pool = self.pool = KVPool(self.model.config, self.settings.kv_capacity_tokens)  # empty pool per run
        executor = Executor(self.model, pool, TIMERS[self.settings.timer], seed=config.run.seed)
        executor.warm_up(self.settings.warmup_batches, config.engine["token_budget"])
        engine = Engine(make_scheduler(name, **options), config.engine["token_budget"],
                        MeasuredBatchTime(executor, batch_time_of(config)), config.engine.get("max_batch_requests"))
        rc = config.run
        result = serve(engine, executor, requests, clock=self.settings.clock, horizon_s=rc.horizon_s,
                       drain=rc.drain, progress=progress)
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
        }
        result.meta["outputs"] = executor.outputs
        return Run(result, summary, analysis)
