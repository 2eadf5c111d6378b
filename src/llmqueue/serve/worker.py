"""The engine in its own process (``serve.engine_loop = "process"``, the default; docs/serving.md).

The server process does HTTP, tokenizing, streaming and metrics; a child process (started with
``multiprocessing``'s *spawn*, so it shares no interpreter state and no GIL with the server) owns
the model, the engine and its KV pool and runs :class:`~llmqueue.serve.loop.EngineLoop`'s batch
loop, one batch at a time.  Two one-way pipes join them:

* server → engine: ``(SUBMIT, rid, prompt_ids, max_tokens, stop_on_eos)``, ``(CANCEL, rid)``,
  ``(STOP,)`` — written by a sender thread, so the asyncio loop never blocks on a full pipe;
* engine → server: one ``("events", [(rid, new token ids, finish reason or None), ...], batch,
  state)`` message per batch (``batch``: prefill and decode tokens, preemptions and the measured
  seconds of the batch; ``state``: requests running and waiting and KV use, when they changed),
  then ``("stopped", error or None, batch log or None)``.

A reader thread of the server turns each message into the tokens of its requests, times them
(the server's clock, as a client would see them), updates the metrics and hands the batch's
events to the asyncio loop in one ``call_soon_threadsafe``.  The bounded waiting queue (429) is
counted on the server's side.  Why: with the engine as a thread of the server the forward pass
waits for the GIL after every torch operation while the HTTP thread streams tokens, so a batch
cost more the more streams were open (docs/serving.md, "The engine process").
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
import warnings

from llmqueue.errors import LlmqueueError
from llmqueue.serve.loop import ABORT, EngineLoop, Generation, build_engine, claim, dispatch

log = logging.getLogger("llmqueue.serve")

_SUBMIT, _CANCEL, _STOP = 0, 1, 2


class EngineFailed(RuntimeError):
    """The engine process failed (its error, as text) or exited unexpectedly."""


def engine_info(engine, executor) -> dict:
    """What the server needs to know of an engine: its limits and what to print at startup."""
    m = executor.model.config
    max_context = executor.max_request_tokens()
    if engine.kv is not None:
        max_context = min(max_context, engine.kv.usable * engine.kv.block_size)
    max_prompt = max_context if engine.scheduler.splits_prompts else min(max_context, engine.token_budget)
    return {"vocab_size": m.vocab_size, "max_context": max_context, "max_prompt": max_prompt,
            "num_params": m.num_params, "dtype": str(m.dtype), "scheduler": engine.scheduler.name,
            "token_budget": engine.token_budget}


# ---- the engine process ------------------------------------------------------------------

class _Recorder:
    """The metrics interface of :class:`EngineLoop` in the engine process: keeps the last batch's
    numbers and the gauges for the next message; token timings are the server's."""

    def __init__(self) -> None:
        self._batch = None
        self._state = None
        self._sent_state = None

    def batch(self, prefill_tokens, decode_tokens, preemptions, duration_s) -> None:
        self._batch = (prefill_tokens, decode_tokens, preemptions, duration_s)

    def state(self, running, waiting, kv_usage) -> None:
        self._state = (running, waiting, kv_usage)

    def tokens(self, count) -> None:
        pass

    def first_token(self, ttft_s) -> None:
        pass

    def inter_token(self, gap_s, tokens) -> None:
        pass

    def finished(self, gen) -> None:
        pass

    def take(self):
        batch, self._batch = self._batch, None
        state = self._state if self._state != self._sent_state else None
        self._sent_state = self._state
        return batch, state


class _ChildLoop(EngineLoop):
    """:class:`EngineLoop` reading its commands from a pipe and writing its events to another,
    run on the engine process's main thread."""

    def __init__(self, commands, events, engine, executor, eos_id, batch_log: bool) -> None:
        self._recorder = _Recorder()
        super().__init__(engine, executor, eos_id, max_waiting=1 << 62, metrics=self._recorder, batch_log=batch_log)
        self.commands, self.events = commands, events
        self._gens: dict[int, Generation] = {}

    def run(self) -> None:
        self._t0 = time.perf_counter()
        self._run()
        error = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        self._post(("stopped", error, self.batch_log))

    def _post(self, message) -> None:
        try:
            self.events.send(message)
        except OSError:   # the server process is gone
            self._stopping = True

    def _take(self, block: bool) -> bool:
        batch, state = self._recorder.take()   # gauges that changed while idle
        if batch is not None or state is not None:
            self._post(("events", [], batch, state))
        commands = self.commands
        try:
            if not commands.poll(0.05 if block else 0):
                return not self._stopping
            while True:
                message = commands.recv()
                kind = message[0]
                if kind == _SUBMIT:
                    _, rid, prompt_ids, max_tokens, stop_on_eos = message
                    gen = Generation(prompt_ids, max_tokens, stop_on_eos, None, rid=rid)
                    self._gens[rid] = gen
                    self._arrive(gen)
                elif kind == _CANCEL:
                    gen = self._gens.get(message[1])
                    if gen is not None:
                        self._cancel(gen)
                else:
                    self._stopping = True
                if not commands.poll(0):
                    return not self._stopping
        except (EOFError, OSError):   # the server process is gone: stop
            self._stopping = True
            return False

    def _send(self, events: list) -> None:
        batch, state = self._recorder.take()
        if not events and batch is None and state is None:
            return
        out = []
        for gen, tokens, reason in events:
            out.append((gen.rid, tokens, reason))
            if reason is not None:
                self._gens.pop(gen.rid, None)
        self._post(("events", out, batch, state))


def _engine_main(commands, events, data, base_dir, real, tokenizer_spec, batch_log) -> None:
    """The engine process: build the model and engine, say "ready" (or why not), run the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C reaches the whole group: the server stops us
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:   # said again by the server (the CLI prints them)
            warnings.simplefilter("always")
            loop, info = _build(commands, events, data, base_dir, real, tokenizer_spec, batch_log)
    except BaseException as exc:   # reported to the server, which raises it there
        events.send(("error", isinstance(exc, LlmqueueError), str(exc) or type(exc).__name__))
        return
    said = list(dict.fromkeys((str(w.message), w.category) for w in caught))
    events.send(("ready", info, said))
    loop.run()


def _build(commands, events, data, base_dir, real, tokenizer_spec, batch_log):
    import torch

    from llmqueue.config import parse_config
    from llmqueue.real.serve import load_model, real_settings
    from llmqueue.serve.tokenizer import load_tokenizer

    config = parse_config(data, base_dir)
    rs = real_settings(real)
    torch.set_num_threads(rs.threads)
    model = load_model(rs, config.base_dir)
    tokenizer = load_tokenizer(tokenizer_spec, model.config.vocab_size, config.base_dir)
    engine, executor = build_engine(config, rs, model)
    loop = _ChildLoop(commands, events, engine, executor, tokenizer.eos_id, batch_log)
    return loop, engine_info(engine, executor)


# ---- the server's side ---------------------------------------------------------------------

class EngineProcess:
    """The engine process seen from the server: the interface of :class:`EngineLoop` that the
    routes use (``start``, ``submit``, ``cancel``, ``stop``, ``alive``, ``error``, ``served``,
    ``batch_log``), plus ``info`` (:func:`engine_info`).  Starting it loads the model in the
    child and waits until it is ready; a config error there is raised here."""

    def __init__(self, config, real: dict, tokenizer_spec: str, max_waiting: int, metrics=None,
                 batch_log: bool = False, startup_timeout_s: float = 600.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._events, events_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_engine_main, name="llmqueue-engine", daemon=True,
                                   args=(commands_in, events_out, config.data, config.base_dir, dict(real or {}),
                                         tokenizer_spec, batch_log))
        self.process.start()
        commands_in.close()
        events_out.close()
        self.max_waiting, self.metrics = max_waiting, metrics
        self.error: BaseException | None = None
        self.batch_log: list[tuple] | None = None
        self.served = 0
        self.pending = 0
        self.closed = False
        self.aio_loop = None
        self._lock = threading.Lock()     # guards pending, closed, _next_rid, _gens
        self._next_rid = 0
        self._gens: dict[int, Generation] = {}
        self._stopped = False
        try:
            self.info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._kill()
            raise
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._write, name="llmqueue-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read, name="llmqueue-engine-read", daemon=True)
        self._sender.start()
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self._events.poll(0.2):
            if not self.process.is_alive():
                raise LlmqueueError(f"the engine process exited (code {self.process.exitcode}) before it was ready")
            if time.monotonic() > deadline:
                raise LlmqueueError(f"the engine process was not ready within {timeout_s:g} s")
        try:
            message = self._events.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise LlmqueueError(f"the engine process exited (code {self.process.exitcode}) before it was "
                                "ready") from None
        if message[0] == "error":
            _, user_error, text = message
            self.process.join(10)
            raise LlmqueueError(text if user_error else f"the engine process failed to start: {text}")
        _, info, said = message
        for text, category in said:
            warnings.warn(text, category, stacklevel=2)
        return info

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    # ---- the asyncio thread -----------------------------------------------------------------

    def start(self, aio_loop) -> None:
        self.aio_loop = aio_loop

    def submit(self, gen: Generation) -> None:
        """Queue ``gen``; raises :class:`QueueFull` or :class:`Unavailable`."""
        with self._lock:
            claim(self, gen)
            self._gens[gen.rid] = gen
        self._outbox.put((_SUBMIT, gen.rid, gen.prompt_ids, gen.max_tokens, gen.stop_on_eos))

    def cancel(self, gen: Generation) -> None:
        """Stop ``gen`` (its client left or its deadline passed); harmless once it finished."""
        if gen.finish_reason is None:
            self._outbox.put((_CANCEL, gen.rid))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process: requests still in flight end with finish reason ``abort``."""
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            self.closed = True
        self._outbox.put((_STOP,))
        self._outbox.put(None)
        self._reader.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the engine process did not stop within %g s; killed", timeout)
            self._kill()
        self._sender.join(1.0)
        self._abort_all()

    @property
    def alive(self) -> bool:
        return not self.closed and self.process.is_alive()

    # ---- the sender and reader threads ------------------------------------------------------

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._commands.send(message)
            except OSError:   # the engine process is gone; the reader says why
                return

    def _read(self) -> None:
        try:
            while True:
                message = self._events.recv()
                if message[0] == "events":
                    self._on_events(*message[1:])
                elif message[0] == "stopped":
                    _, error, self.batch_log = message
                    if error is not None:
                        self.error = EngineFailed(error)
                        log.error("the engine loop failed; new requests get 503: %s", error)
                    return
        except (EOFError, OSError):
            if not self._stopped:
                self.process.join(1.0)
                self.error = EngineFailed(f"the engine process exited (code {self.process.exitcode})")
                log.error("%s; new requests get 503", self.error)
        except Exception as exc:   # a bug here: the server stays up and answers 503
            self.error = exc
            log.exception("reading the engine process failed; new requests get 503")
        finally:
            with self._lock:
                self.closed = True
            self._abort_all()

    def _abort_all(self) -> None:
        with self._lock:
            gens = list(self._gens.values())
        self._dispatch([(g.rid, [], ABORT) for g in gens], time.perf_counter())

    def _on_events(self, out, batch, state) -> None:
        now = time.perf_counter()
        m = self.metrics
        if m is not None:
            if batch is not None:
                m.batch(*batch)
            if state is not None:
                m.state(*state)
        if out:
            self._dispatch(out, now)

    def _dispatch(self, out, now: float) -> None:
        m = self.metrics
        events = []
        for rid, tokens, reason in out:
            with self._lock:
                gen = self._gens.get(rid)
                if gen is None or gen.finish_reason is not None:
                    continue
                if gen.first_token_time is None and (tokens or reason is not None):
                    self.pending -= 1
                if reason is not None:
                    del self._gens[rid]
            if tokens:
                if m is not None:
                    m.tokens(len(tokens))
                if gen.first_token_time is None:
                    gen.first_token_time = now
                    if m is not None:
                        m.first_token(now - gen.arrival_time)
                elif m is not None:
                    m.inter_token(now - gen.last_token_time, len(tokens))
                gen.last_token_time = now
                gen.tokens.extend(tokens)
            if reason is not None:
                gen.finish_reason = reason
                if m is not None:
                    m.finished(gen)
                if reason != ABORT:
                    self.served += 1
            events.append((gen, tokens, reason))
        if events and self.aio_loop is not None:
            try:
                self.aio_loop.call_soon_threadsafe(dispatch, events)
            except RuntimeError:   # the event loop is closed: nobody is listening any more
                pass


__all__ = ["EngineFailed", "EngineProcess", "engine_info"]
