"""The HTTP side of ``llmqueue serve``: FastAPI routes on uvicorn (docs/serving.md).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events, one
chunk per token, or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
Safe by default: it binds 127.0.0.1; with an API key every ``/v1`` route needs
``Authorization: Bearer KEY``; bodies are read with a size and a time limit, validated
(:mod:`llmqueue.serve.protocol`), and every error — bad JSON, a bad parameter, an unknown route,
a full queue, a bug — is answered with OpenAI's error object, never by stopping the server.
A client that disconnects cancels its request in the engine; SIGINT or SIGTERM stops the
server: requests in flight get ``serve.shutdown_timeout_s`` to finish, then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmqueue.errors import LlmqueueError
from llmqueue.serve import protocol
from llmqueue.serve.exporter import CONTENT_TYPE, Metrics
from llmqueue.serve.loop import ABORT, EngineLoop, Generation, QueueFull, Unavailable
from llmqueue.serve.protocol import APIError, Limits
from llmqueue.serve.settings import ServeSettings
from llmqueue.serve.tokenizer import Tokenizer

log = logging.getLogger("llmqueue.serve")
_POLL_S = 0.25   # how often a non-streamed request checks that its client is still there
SWITCH_INTERVAL_S = float(os.environ.get("LLMQUEUE_SWITCH_INTERVAL_S", "0.0002"))


@dataclass
class Service:
    """Everything a route needs."""

    loop: EngineLoop
    tokenizer: Tokenizer
    limits: Limits
    settings: ServeSettings
    metrics: Metrics
    api_key: str | None = None
    info: dict | None = None     # the engine's limits and names (llmqueue.serve.worker.engine_info)


def _error(exc: APIError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.refused(exc.status)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _read_json(request: Request, settings: ServeSettings):
    """The body as JSON, read whole within ``max_body_bytes`` and ``body_timeout_s``."""
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body has {length} bytes, more than the {limit} allowed "
                       "(serve.max_body_bytes)")
    body = bytearray()

    async def read() -> None:
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise APIError(413, f"the request body has more than the {limit} bytes allowed (serve.max_body_bytes)")

    try:
        await asyncio.wait_for(read(), settings.body_timeout_s)
    except TimeoutError:
        raise APIError(408, f"the request body was not received within {settings.body_timeout_s:g} s "
                       "(serve.body_timeout_s)") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({str(exc)[:80]})") from None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _aborted(loop: EngineLoop) -> APIError:
    why = "the server is shutting down" if loop.error is None else f"the engine failed: {loop.error}"
    return APIError(503, f"the request was stopped: {why}", type="server_error", code="service_unavailable")


def create_app(service: Service) -> FastAPI:
    """The routes over ``service``; the lifespan starts and stops its engine loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(service.loop.stop)

    options = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:   # newer FastAPI: no OpenTelemetry per request
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                                "auto_configure": False}
    app = FastAPI(title="llmqueue", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan, **options)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(APIError(exc.status_code, message, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", type="server_error"),
                      service.metrics)

    def authorized(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
            raise APIError(401, "a valid API key is needed: the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if service.loop.alive:
            return Response(status_code=200)
        return _error(_aborted(service.loop))

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorized(request)
        except APIError as exc:
            return _error(exc, service.metrics)
        return protocol.models(service.limits.model_name, service.limits.max_context)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(service, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(service, request, chat=True)

    app.state.authorized = authorized
    return app


async def _generate(service: Service, request: Request, chat: bool):
    try:
        request.app.state.authorized(request)
        body = await _read_json(request, service.settings)
        parse = protocol.parse_chat if chat else protocol.parse_completion
        call = parse(body, service.tokenizer, service.limits)
    except APIError as exc:
        return _error(exc, service.metrics)
    events: asyncio.Queue = asyncio.Queue()
    gen = Generation(call.prompt_ids, call.max_tokens, not call.ignore_eos,
                     lambda tokens, reason: events.put_nowait((tokens, reason)))
    try:
        service.loop.submit(gen)
    except QueueFull as exc:
        return _error(APIError(429, f"the server is at capacity: {exc}; retry later", type="server_error",
                               code="rate_limit_exceeded"), service.metrics)
    except Unavailable as exc:
        return _error(APIError(503, str(exc), type="server_error", code="service_unavailable"), service.metrics)
    rid, created = protocol.new_id(chat), int(time.time())
    deadline = time.monotonic() + service.settings.request_timeout_s
    if call.stream:
        return StreamingResponse(_stream(service, call, gen, events, rid, created, deadline),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(service, request, call, gen, events, rid, created, deadline)


def _timed_out(service: Service) -> APIError:
    return APIError(504, f"the request did not finish within {service.settings.request_timeout_s:g} s "
                    "(serve.request_timeout_s)", type="server_error", code="timeout")


async def _stream(service: Service, call, gen: Generation, events: asyncio.Queue, rid: str, created: int,
                  deadline: float) -> AsyncIterator[str]:
    detok = service.tokenizer.detokenizer()
    count = 0
    finished = False
    middle = None   # a middle chunk split around its text
    try:
        while True:
            try:
                tokens, reason = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                yield _sse(_timed_out(service).body())
                yield _sse("[DONE]")
                return
            if reason == ABORT:
                finished = True
                yield _sse(_aborted(service.loop).body())
                yield _sse("[DONE]")
                return
            for k, token in enumerate(tokens):
                text = detok.step(token)
                last = reason is not None and k == len(tokens) - 1
                if last:
                    text += detok.flush()
                count += 1
                if middle is None and count == 2:   # perf: later chunks only serialise their text
                    middle = _sse(protocol.chunk(call, rid, created, "\x00", None, False)).split('"\\u0000"')
                if last or count == 1 or len(middle) != 2:
                    yield _sse(protocol.chunk(call, rid, created, text, reason if last else None, count == 1))
                else:
                    yield json.dumps(text).join(middle)
            if reason is not None:
                finished = True
                if call.include_usage:
                    yield _sse(protocol.usage_chunk(call, rid, created, count))
                yield _sse("[DONE]")
                return
    finally:
        if not finished:   # the client left (the response was cancelled) or the deadline passed
            service.loop.cancel(gen)


async def _whole(service: Service, request: Request, call, gen: Generation, events: asyncio.Queue, rid: str,
                 created: int, deadline: float):
    tokens: list[int] = []
    getter = None
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
            if getter in done:
                new, reason = getter.result()
                getter = None
                tokens.extend(new)
                if reason == ABORT:
                    return _error(_aborted(service.loop))
                if reason is not None:
                    text = service.tokenizer.decode(tokens)
                    return protocol.response(call, rid, created, text, reason, len(tokens))
            elif time.monotonic() > deadline:
                service.loop.cancel(gen)
                return _error(_timed_out(service))
            elif await request.is_disconnected():
                service.loop.cancel(gen)
                return Response(status_code=499)   # nobody reads it
    except asyncio.CancelledError:
        service.loop.cancel(gen)
        raise
    finally:
        if getter is not None:
            getter.cancel()


# ---- the server process ----------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn's server, except that the SIGINT/SIGTERM it stopped on is not raised again after
    shutdown: a signal is this server's normal way to end, and the command exits 0."""

    signal: int | None = None

    def handle_exit(self, sig, frame) -> None:
        self.signal = sig
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port taken, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        raise LlmqueueError(f"--host {host!r}: cannot be resolved ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise LlmqueueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(service: Service, sock: socket.socket, log_level: str = "warning") -> int | None:
    """Serve on ``sock`` until SIGINT/SIGTERM; returns the signal that stopped it (or None)."""
    s = service.settings
    config = uvicorn.Config(create_app(service), log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=max(1, round(s.shutdown_timeout_s)), timeout_keep_alive=5,
                            limit_concurrency=2 * s.max_waiting + 256, h11_max_incomplete_event_size=64 * 1024,
                            server_header=False)
    server = _Server(config)
    if service.settings.engine_loop != "thread":   # the engine has its own process and GIL
        return _serve(server, sock)
    # perf: the engine thread gives the GIL up around every torch op and must get it back from the
    # HTTP thread; at the default 5 ms switch interval each such wait could last 5 ms (batches ran
    # 2-3x slower than calibrated while tokens streamed); 0.2 ms keeps the waits short.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        return _serve(server, sock)
    finally:
        sys.setswitchinterval(switch)


def _serve(server: _Server, sock: socket.socket) -> int | None:
    server.run(sockets=[sock])
    return server.signal


SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def build_service(config, real: dict, settings: ServeSettings, api_key: str | None = None,
                  batch_log: bool = False) -> Service:
    """The model, tokenizer, engine (the config's scheduler) and engine loop of a serve config:
    the engine in its own process (``serve.engine_loop = "process"``) or a thread of this one."""
    from llmqueue.serve.tokenizer import load_tokenizer

    if settings.engine_loop == "process":
        from llmqueue.serve.worker import EngineProcess

        loop = EngineProcess(config, real, settings.tokenizer, settings.max_waiting, None, batch_log)
        info = loop.info
        try:
            tokenizer = load_tokenizer(settings.tokenizer, info["vocab_size"], config.base_dir)
        except BaseException:
            loop.stop()
            raise
        metrics = loop.metrics = Metrics(settings.model_name, info["max_context"])   # (nothing ran yet)
    else:
        import torch

        from llmqueue.real.serve import load_model, real_settings
        from llmqueue.serve.loop import build_engine
        from llmqueue.serve.worker import engine_info

        rs = real_settings(real)
        torch.set_num_threads(rs.threads)
        model = load_model(rs, config.base_dir)
        tokenizer = load_tokenizer(settings.tokenizer, model.config.vocab_size, config.base_dir)
        engine, executor = build_engine(config, rs, model)
        info = engine_info(engine, executor)
        metrics = Metrics(settings.model_name, info["max_context"])
        loop = EngineLoop(engine, executor, tokenizer.eos_id, settings.max_waiting, metrics, batch_log)
    max_context = info["max_context"]
    limits = Limits(settings.model_name, info["vocab_size"], max_context, info["max_prompt"],
                    min(settings.max_tokens, max_context), min(settings.default_max_tokens, max_context))
    return Service(loop, tokenizer, limits, settings, metrics, api_key, info)
