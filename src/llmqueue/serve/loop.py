"""The engine thread of the server: the project's engine, one batch at a time, arrivals fed by
the server (paper arXiv 2504.07347, §3.1: the scheduler decides at each batch boundary; §4 the
policies).

The HTTP side (:mod:`llmqueue.serve.app`) hands :class:`Generation` objects to
:meth:`EngineLoop.submit`; one thread owns the :class:`~llmqueue.core.engine.Engine`, its
scheduler, the transformer and its KV pool (the executors of :mod:`llmqueue.real.serve`) and
loops: take the arrivals and cancellations that came in, admit, run one batch, hand every new
token back to the asyncio loop (one ``call_soon_threadsafe`` per batch).  The engine's clock is
wall time since the loop started; each batch's duration is measured (``perf_counter``).

A request asking for ``max_tokens = N`` enters the engine as ``v_p`` prompt tokens and
``v_d = N − 1`` decode tokens: the batch that ends its prompt emits the first output token and
each decode one more (the project's timing convention, docs/model.md), so the simulator's
time between tokens is the client's inter-token latency.  A request that stops early (its
end-of-sequence token, its client gone, its deadline) is withdrawn from the engine between
batches with :func:`withdraw`.

Admission control: at most ``max_waiting`` requests may wait for their first token; beyond
that :meth:`EngineLoop.submit` raises :class:`QueueFull` (the server answers 429).

By default the server runs this loop in a process of its own (:mod:`llmqueue.serve.worker`,
``serve.engine_loop = "process"``); as a thread of the server (``"thread"``) it shares the GIL.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from llmqueue.config import Config
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError, InternalError
from llmqueue.model.kv import make_kv
from llmqueue.model.request import Request
from llmqueue.runner import batch_time_of
from llmqueue.schedulers import make_scheduler
from llmqueue.schedulers.plan import seq_len

if TYPE_CHECKING:   # torch is imported where an engine is built (llmqueue.real), not by importing this
    from llmqueue.real.model import Transformer
    from llmqueue.real.serve import Executor, RealSettings

log = logging.getLogger("llmqueue.serve")

_SUBMIT, _CANCEL, _STOP = 0, 1, 2
#: finish reasons (OpenAI's, plus "abort" for requests ended by the server or their client)
STOP, LENGTH, ABORT = "stop", "length", "abort"
#: columns of the batch log (``--batch-log``): wall seconds since start, tokens, the forward pass's
#: measured seconds, and the engine thread's busy seconds for the batch (plan, forward, tokens handed back)
BATCH_LOG_COLUMNS = ("start_time", "end_time", "prefill_tokens", "decode_tokens", "num_requests",
                     "attention_pairs", "duration", "busy_duration")


class QueueFull(Exception):
    """Too many requests wait for their first token (answered 429)."""


class Unavailable(Exception):
    """The engine loop is stopping or has stopped (answered 503)."""


@dataclass(eq=False, slots=True)
class Generation:
    """One request being served: what it asks for, and what it got so far."""

    prompt_ids: list[int]
    max_tokens: int
    stop_on_eos: bool
    #: called on the asyncio loop with (new token ids, finish reason or None)
    on_event: Callable[[list[int], str | None], None]
    arrival_time: float = field(default_factory=time.perf_counter)
    rid: int = -1
    tokens: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    request: Request | None = None      # the engine's request, once the loop took it
    emitted: int = 0                    # the executor's output tokens of it already handed back
    cancelled: bool = False


def claim(owner, gen: Generation) -> None:
    """Admit ``gen`` to ``owner``'s bounded waiting queue (an engine thread or process; the caller
    holds its lock): the next request id, one more waiting; raises :class:`Unavailable` when it is
    stopping or failed, :class:`QueueFull` when ``serve.max_waiting`` requests wait."""
    if owner.closed:
        raise Unavailable("the engine is stopping" if owner.error is None else f"the engine failed: {owner.error}")
    if owner.pending >= owner.max_waiting:
        raise QueueFull(f"{owner.pending} requests wait for their first token (serve.max_waiting = "
                        f"{owner.max_waiting})")
    owner.pending += 1
    gen.rid = owner._next_rid
    owner._next_rid += 1


def withdraw(engine: Engine, executor: Executor, request: Request) -> None:
    """Take ``request`` out of ``engine`` between batches, as if it had never been admitted:
    out of its queue, its prefill no longer demand, its KV blocks (engine's count) and KV slots
    (executor's pool) freed.  The inverse of :meth:`Engine.admit` plus the blocks it took."""
    state = engine.state
    held = seq_len(request) - request.prefill_left   # tokens whose KV it holds
    if request.prefill_left == 0 and request.decode_left > 0:
        state.decoding.remove(request)
    else:
        state.prefilling.remove(request)
        state.total_prefill_left -= request.prefill_left
    engine.num_in_engine -= 1
    kv = engine.kv
    if kv is not None:
        if kv.policy == "reserve":
            state.kv_used -= kv.blocks_for(request.num_prompt_tokens + request.num_output_tokens) if held else 0
        else:
            state.kv_used -= kv.blocks_for(held)
    executor.release(request)


def build_engine(config: Config, settings: RealSettings, model: Transformer) -> tuple[Engine, Executor]:
    """The configured scheduler on ``model``: an engine timed by measuring each batch, and the
    executor holding the KV pool (contiguous, or paged with ``engine.kv_blocks``)."""
    from llmqueue.real.kvcache import KVPool, PagedKVPool
    from llmqueue.real.serve import Executor, MeasuredBatchTime, PagedExecutor

    kv = make_kv(config.engine)
    if kv is not None and kv.prefix_caching:
        raise ConfigError("engine.prefix_caching", True, "false on the real engine (its paged pool shares no "
                          "blocks between requests); the simulator models it")
    if kv is None:
        executor = Executor(model, KVPool(model.config, settings.kv_capacity_tokens), time.perf_counter)
    else:
        executor = PagedExecutor(model, PagedKVPool(model.config, kv), time.perf_counter)
    name = config.engine["scheduler"]
    scheduler = make_scheduler(name, base_dir=config.base_dir, **config.scheduler_options)
    if kv is not None and scheduler.program is None:
        raise ConfigError("engine.kv_blocks", kv.blocks, f"unset with scheduler {name!r}: it plans in Python, "
                          "which the KV memory rules cannot follow (docs/memory.md)")
    engine = Engine(scheduler, config.engine["token_budget"], MeasuredBatchTime(executor, batch_time_of(config)),
                    config.engine.get("max_batch_requests"), kv)
    executor.warm_up(settings.warmup_batches, engine.token_budget)
    return engine, executor


class EngineLoop:
    """The engine thread (see the module note).  ``metrics``: an
    :class:`~llmqueue.serve.exporter.Metrics` or None; ``batch_log``: keep every batch's row."""

    def __init__(self, engine: Engine, executor: Executor, eos_id: int | None, max_waiting: int,
                 metrics=None, batch_log: bool = False) -> None:
        self.engine, self.executor, self.eos_id = engine, executor, eos_id
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.paged = hasattr(executor, "sync")   # a PagedExecutor mirrors the engine's KV blocks
        self.max_request_tokens = executor.max_request_tokens()
        self.batch_log: list[tuple] | None = [] if batch_log else None
        self.aio_loop = None                 # the asyncio loop events go to (set by start())
        self.error: BaseException | None = None
        self.served = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()        # guards pending, _next_rid, closed
        self.pending = 0                     # submitted requests without their first token
        self._next_rid = 0
        self.closed = False
        self._stopping = False
        self._waiting: deque[Generation] = deque()    # contiguous pool: no KV run reserved yet
        self._active: dict[int, Generation] = {}     # in the engine, by request id
        self._preemptions = 0
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="llmqueue-engine", daemon=True)

    # ---- the server's side (asyncio thread) ------------------------------------------------

    def start(self, aio_loop) -> None:
        self.aio_loop = aio_loop
        self._t0 = time.perf_counter()
        self._thread.start()

    def submit(self, gen: Generation) -> None:
        """Queue ``gen``; raises :class:`QueueFull` or :class:`Unavailable`."""
        with self._lock:
            claim(self, gen)
            self._inbox.put((_SUBMIT, gen))

    def cancel(self, gen: Generation) -> None:
        """Stop ``gen`` (its client left or its deadline passed); harmless once it finished."""
        if gen.finish_reason is None:
            self._inbox.put((_CANCEL, gen))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread: requests still in flight end with finish reason ``abort``."""
        with self._lock:
            self.closed = True
        self._inbox.put((_STOP, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.closed

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take(block=not (self.engine.has_work or self._waiting)):
                self._admit()
                if self.engine.has_work:
                    self._step()
                elif self.metrics is not None:
                    self._gauges()
        except Exception as exc:   # a bug: the server stays up, answers 503, and says why
            self.error = exc
            log.exception("the engine loop failed; new requests get 503")
        finally:
            with self._lock:
                self.closed = True
            events = [self._finish(g, ABORT) for g in [*self._waiting, *self._active.values()]]
            self._waiting.clear()
            self._active.clear()
            self._send(events)

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _take(self, block: bool) -> bool:
        """Handle the commands that came in (waiting a little for one when idle); False: stop."""
        try:
            command = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not self._stopping
        while True:
            kind, gen = command
            if kind == _SUBMIT:
                self._arrive(gen)
            elif kind == _CANCEL:
                self._cancel(gen)
            else:
                self._stopping = True
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return not self._stopping

    def _arrive(self, gen: Generation) -> None:
        request = gen.request = Request(gen.rid, self._now(), len(gen.prompt_ids), gen.max_tokens - 1)
        if not self.paged:
            self._waiting.append(gen)   # FCFS into the engine as KV runs free up (real/serve.py)
            return
        self.executor.register(request)
        self.executor.prompt[request.rid] = gen.prompt_ids
        self._enter(gen)

    def _enter(self, gen: Generation) -> None:
        if not self.engine.admit(gen.request):   # validated before: cannot happen
            self.executor.release(gen.request)
            raise InternalError(f"the engine rejected request {gen.rid} ({len(gen.prompt_ids)} prompt tokens, "
                                f"{gen.max_tokens} output tokens) that the server accepted")
        self._active[gen.rid] = gen

    def _admit(self) -> None:
        waiting, executor = self._waiting, self.executor
        while waiting and executor.reserve(waiting[0].request):
            gen = waiting.popleft()
            executor.prompt[gen.rid] = gen.prompt_ids
            self._enter(gen)

    def _cancel(self, gen: Generation) -> None:
        if gen.finish_reason is not None:   # (a cancel always comes after its submit)
            return
        if gen.rid in self._active:
            withdraw(self.engine, self.executor, gen.request)
            del self._active[gen.rid]
            self.executor.outputs.pop(gen.rid, None)
        elif gen in self._waiting:
            self._waiting.remove(gen)
        self._send([self._finish(gen, ABORT)])

    def _finish(self, gen: Generation, reason: str):
        gen.finish_reason = reason
        if gen.first_token_time is None:
            with self._lock:
                self.pending -= 1
        if self.metrics is not None:
            self.metrics.finished(gen)
        if reason != ABORT:
            self.served += 1
        return gen, [], reason

    def _step(self) -> None:
        engine, executor = self.engine, self.executor
        start = self._now()
        step = engine.step(start)
        end = self._now()
        if self.paged:
            executor.sync(engine, step.finished)
        else:
            for request in step.finished:
                executor.release(request)
        done = {r.rid for r in step.finished}
        wall = time.perf_counter()
        events = []
        plan = step.plan
        for request in [r for r, _ in plan.prefill] + list(plan.decode):
            gen = self._active.get(request.rid)
            outputs = executor.outputs[request.rid]
            if gen is None or len(outputs) <= gen.emitted:
                continue
            new = outputs[gen.emitted:]
            gen.emitted = len(outputs)
            reason = None
            if gen.stop_on_eos and self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
                reason = STOP
            room = gen.max_tokens - len(gen.tokens)
            if len(new) >= room:
                new, reason = new[:room], reason or LENGTH
            self._tokens(gen, new, wall)
            if reason is None and request.rid in done:
                reason = LENGTH     # the engine finished it: all v_d + 1 tokens were emitted
            if reason is not None:
                if request.rid not in done:
                    withdraw(engine, executor, request)
                del self._active[request.rid]
                events.append((gen, new, reason))
                self._finish(gen, reason)
            else:
                events.append((gen, new, None))
        for request in step.finished:   # finished without a token in this batch: cannot happen
            if request.rid in self._active:
                raise InternalError(f"request {request.rid} finished in the engine after {len(self._active[request.rid].tokens)} "
                                    "tokens without its last one")
        for gen, _, reason in events:   # the executor keeps outputs of requests still running only
            if reason is not None:
                executor.outputs.pop(gen.rid, None)
        if self.metrics is not None:
            self.metrics.batch(plan.num_prefill_tokens, len(plan.decode), engine.preemptions - self._preemptions,
                               end - start)
            self._preemptions = engine.preemptions
            self._gauges()
        self._send(events)
        if self.batch_log is not None:
            self.batch_log.append((start, end, plan.num_prefill_tokens, len(plan.decode), plan.num_requests,
                                   executor.last_pairs, engine.batch_time.last_measured, self._now() - start))

    def _tokens(self, gen: Generation, new: list[int], wall: float) -> None:
        if not new:
            return
        if self.metrics is not None:
            self.metrics.tokens(len(new))
        if gen.first_token_time is None:
            gen.first_token_time = wall
            with self._lock:
                self.pending -= 1
            if self.metrics is not None:
                self.metrics.first_token(wall - gen.arrival_time)
        elif self.metrics is not None:
            self.metrics.inter_token(wall - gen.last_token_time, len(new))
        gen.last_token_time = wall
        gen.tokens.extend(new)

    def _gauges(self) -> None:
        state, engine = self.engine.state, self.engine
        started = len(state.decoding)
        for r in state.prefilling:   # partly prefilled requests come first
            if r.prefill_left == seq_len(r):
                break
            started += 1
        waiting = len(self._waiting) + engine.num_in_engine - started
        if engine.kv is not None:
            usage = state.kv_used / engine.kv.usable
        else:
            usage = self.executor.pool.reserved_tokens / self.executor.pool.capacity_tokens
        self.metrics.state(started, waiting, usage)

    def _send(self, events: list) -> None:
        """Hand events to the asyncio loop in one call (the loop may be gone at shutdown)."""
        if not events or self.aio_loop is None:
            return
        try:
            self.aio_loop.call_soon_threadsafe(dispatch, events)
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass


def dispatch(events: list) -> None:
    """Hand each (generation, tokens, finish reason) to its stream, on the asyncio loop (the engine
    thread's and the engine process's events alike)."""
    for gen, tokens, reason in events:
        gen.on_event(tokens, reason)
