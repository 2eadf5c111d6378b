"""``llmqueue serve`` end to end (docs/serving.md): a server on a free port driven by the ``openai``
client and by serve-bench's load driver; tokens, usage, metrics, errors, disconnects, shutdown.

Marked ``real`` (run in CI by ``make test-extras``); skipped without torch or the serve extra.
No test asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from llmqueue.config import parse_config
from llmqueue.real.model import Transformer, model_config
from llmqueue.real.serve import real_settings
from llmqueue.serve.bench import ServerProcess, drive
from llmqueue.serve.loop import ABORT, LENGTH, EngineLoop, Generation, QueueFull, Unavailable, build_engine

pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")]

CONFIG = """
[engine]
scheduler = "{scheduler}"
token_budget = 64
{kv}
[engine.batch_time]
model = "constant"
duration_ms = 5.0

[real]
model = {{preset = "tiny"}}
kv_capacity_tokens = 4096
warmup_batches = 1

[serve]
model_name = "tiny"
max_waiting = 64
max_body_bytes = 4096
"""


def _config(tmp_path, scheduler="sarathi", kv=""):
    path = tmp_path / "serve.toml"
    path.write_text(CONFIG.format(scheduler=scheduler, kv=kv))
    return path


def _post(url: str, path: str, body: bytes, method: str = "POST", headers=None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def _metric(text: str, name: str, **labels) -> float:
    want = {"model_name": "tiny", "engine": "0", **labels}
    total = 0.0
    found = False
    for line in text.splitlines():
        m = re.match(r"^([^{\s]+)(?:\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in want.items()):
            total += float(m.group(3))
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


async def _openai_calls(url: str) -> list[tuple[int, int, int, int | None, str]]:
    """Concurrent streamed completions and chats: (prompt tokens, max_tokens, chunks, usage, finish)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    async def completion(prompt, max_tokens):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        chunks, usage, finish = 0, None, None
        async for c in stream:
            if c.choices:
                chunks += 1
                finish = c.choices[0].finish_reason or finish
            if c.usage is not None:
                usage = (c.usage.prompt_tokens, c.usage.completion_tokens)
        return len(prompt), max_tokens, chunks, usage, finish

    async def chat(text, max_tokens):
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                      max_tokens=max_tokens, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True})
        chunks, usage, finish = 0, None, None
        async for c in stream:
            if c.choices:
                chunks += 1
                finish = c.choices[0].finish_reason or finish
            if c.usage is not None:
                usage = (c.usage.prompt_tokens, c.usage.completion_tokens)
        return usage[0], max_tokens, chunks, usage, finish

    try:
        jobs = [completion(list(range(10, 10 + 3 * i + 5)), 4 + 3 * i) for i in range(8)]
        jobs += [chat("hello " * (i + 1), 6 + i) for i in range(4)]
        return await asyncio.gather(*jobs)
    finally:
        await client.close()


def _children(pid: int) -> list[int]:
    """The engine processes of the server ``pid`` (Linux /proc): its children started by
    multiprocessing's spawn (not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("engine_loop", ["process", "thread"])
def test_the_server_streams_counts_refuses_bad_input_and_shuts_down_cleanly(tmp_path, engine_loop):
    server = ServerProcess(_config(tmp_path), [f"serve.engine_loop={engine_loop}"])
    engines = _children(server.proc.pid) if Path("/proc/self/task").is_dir() else []
    assert len(engines) == (engine_loop == "process") or not Path("/proc/self/task").is_dir()
    try:
        url = server.url
        # concurrent streaming requests with the openai client: one chunk per token, usage counted
        results = asyncio.run(_openai_calls(url))
        for prompt, max_tokens, chunks, usage, finish in results:
            assert chunks == max_tokens and usage == (prompt, max_tokens) and finish == "length"
        # the load tool of serve-bench (the openai client at given arrival times)
        samples = asyncio.run(drive(url + "/v1", "tiny", [0.0, 0.01, 0.02, 0.05, 0.3, 0.31],
                                    [[5] * (4 + i) for i in range(6)], [3, 5, 7, 9, 2, 1]))
        assert [len(s.token_times) for s in samples] == [3, 5, 7, 9, 2, 1]
        assert all(s.error is None and s.usage["completion_tokens"] == s.max_tokens for s in samples)
        assert all(s.ttft > 0 for s in samples)
        # a whole (non-streamed) completion
        status, body = _post(url, "/v1/completions", json.dumps({"model": "tiny", "prompt": "Hi there",
                                                                  "max_tokens": 3, "ignore_eos": True}).encode())
        assert status == 200 and body["usage"] == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
        assert body["choices"][0]["finish_reason"] == "length" and isinstance(body["choices"][0]["text"], str)
        # malformed requests: OpenAI-style 4xx, and the server goes on serving
        bad = [(b"{not json", 400), (b"[1, 2]", 400), (b'{"prompt": "x"}', 400),
               (b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}', 400),
               (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000000}', 400),
               (b'{"model": "tiny", "prompt": [1, 99999]}', 400),
               (b'{"model": "tiny", "messages": "hi"}', 400), (b"[" * 100_000, 413), (b"\xff\xfe", 400),
               (b'{"model": "gpt-4", "prompt": "x"}', 404), (b"[" * 1500 + b"]" * 1500, 400)]
        for body_bytes, want in bad:
            path = "/v1/chat/completions" if b"messages" in body_bytes else "/v1/completions"
            status, body = _post(url, path, body_bytes)
            assert status == want, (body_bytes[:40], body)
            assert body["error"]["message"]
        assert _post(url, "/v1/completions", b"", method="GET")[0] == 405
        assert _post(url, "/no/such/route", b"{}")[0] == 404
        status, body = _post(url, "/v1/completions", b'{"model": "tiny", "prompt": [7, 8], "max_tokens": 2}')
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
        assert _post(url, "/v1/models", b"", method="GET")[1]["data"][0]["id"] == "tiny"
        # a client that disconnects mid-stream cancels its request in the engine
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": [5] * 8, "max_tokens": 1000,
                                                                  "ignore_eos": True, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 30
        while True:
            text = server.metrics()
            if (_metric(text, "vllm:request_success_total", finished_reason="abort") == 1
                    and _metric(text, "vllm:num_requests_running") == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert _metric(text, "vllm:request_success_total", finished_reason="abort") == 1
        assert _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:num_requests_waiting") == 0
        # metrics count what was served (the aborted request's prompt and tokens included)
        served = [(p, m) for p, m, *_ in results] + [(s.num_prompt_tokens, s.max_tokens) for s in samples] + [(8, 3)]
        finished = _metric(text, "vllm:request_success_total", finished_reason="length") \
            + _metric(text, "vllm:request_success_total", finished_reason="stop")
        assert finished == len(served) + 1   # + the [7, 8] request (length or stop)
        assert _metric(text, "vllm:time_to_first_token_seconds_count") == len(served) + 2
        prompt_total = _metric(text, "vllm:prompt_tokens_total")
        assert prompt_total == sum(p for p, _ in served) + 2 + 8
        assert _metric(text, "vllm:generation_tokens_total") >= sum(m for _, m in served) + 1
        assert _metric(text, "vllm:kv_cache_usage_perc") == 0
        assert _metric(text, "vllm:num_preemptions_total") == 0
        assert _metric(text, "vllm:inter_token_latency_seconds_count") >= sum(m - 1 for _, m in served)
    finally:
        status, rest = server.stop()
    assert status == 0, rest
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest
    assert all(_gone(pid) for pid in engines)   # the engine process ended with the server


def test_an_engine_process_that_dies_is_a_503_and_the_server_stays_up(tmp_path):
    import os
    import signal

    server = ServerProcess(_config(tmp_path))
    try:
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2}).encode()
        assert _post(server.url, "/v1/completions", body)[0] == 200
        (engine,) = _children(server.proc.pid)
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _post(server.url, "/health", b"", method="GET")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, err = _post(server.url, "/v1/completions", body)
        assert status == 503 and "the engine process exited" in err["error"]["message"], err
        assert "vllm:num_requests_running" in server.metrics()   # the HTTP side still answers
    finally:
        status, rest = server.stop()
    lines = [line for line in rest.splitlines() if line.startswith("llmqueue: error:")]
    assert status == 2 and len(lines) == 1 and "the engine process exited" in lines[0] and "Traceback" not in rest


def test_an_api_key_is_required_when_given_and_health_and_metrics_stay_open(tmp_path):
    server = ServerProcess(_config(tmp_path, scheduler="vllm"), extra=["--api-key", "s3cret"])
    try:
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2}).encode()
        status, err = _post(server.url, "/v1/completions", body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert _post(server.url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, ok = _post(server.url, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and ok["usage"]["prompt_tokens"] == 1
        # the vllm scheduler cannot split prompts: one longer than the token budget is a 400
        long = json.dumps({"model": "tiny", "prompt": [5] * 65}).encode()
        status, err = _post(server.url, "/v1/completions", long, headers={"Authorization": "Bearer s3cret"})
        assert status == 400 and "64" in err["error"]["message"]
        assert "vllm:num_requests_running" in server.metrics()
    finally:
        status, rest = server.stop()
    assert status == 0 and "Traceback" not in rest


class _Direct:
    """Stands for the asyncio loop: events are handled on the engine thread at once."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def _loop(scheduler: str, kv: dict, max_waiting: int = 64) -> EngineLoop:
    cfg = parse_config({"engine": {"scheduler": scheduler, "token_budget": 32, **kv,
                                   "batch_time": {"model": "constant", "duration_ms": 5.0}}})
    settings = real_settings({"model": {"preset": "tiny"}, "kv_capacity_tokens": 600, "warmup_batches": 0})
    engine, executor = build_engine(cfg, settings, Transformer.random(model_config({"preset": "tiny"})))
    engine.checks = True   # the engine's invariants after every batch (KV blocks held = counted)
    return EngineLoop(engine, executor, eos_id=2, max_waiting=max_waiting)


@pytest.mark.parametrize("scheduler,kv", [("sarathi", {}), ("vllm-v1", {"kv_blocks": 24, "block_size": 8}),
                                          ("orca", {})])
def test_cancelled_and_stopped_requests_leave_the_engine_and_its_memory_clean(scheduler, kv):
    loop = _loop(scheduler, kv)
    done = threading.Event()
    ends: dict[int, str] = {}
    gens: list[Generation] = []

    def on_event(i):
        def handle(tokens, reason):
            if reason is not None:
                ends[i] = reason
                if len(ends) == len(gens):
                    done.set()
            elif i % 3 == 0 and len(gens[i].tokens) >= 2:
                loop.cancel(gens[i])   # every third leaves after two tokens
        return handle

    for i in range(24):
        gens.append(Generation([5 + i % 7] * (3 + 5 * i % 40), 2 + (7 * i) % 30, i % 4 == 1, on_event(i)))
    for g in gens:   # all queued before the loop starts: the same batches every run
        loop.submit(g)
    loop.start(_Direct())
    assert done.wait(120), f"{len(ends)} of {len(gens)} finished"
    loop.stop()
    engine, executor = loop.engine, loop.executor
    assert engine.num_in_engine == 0 and not engine.state.decoding and not engine.state.prefilling
    assert engine.state.kv_used == 0 and loop.pending == 0 and loop.error is None
    if kv:
        assert executor.pool.used == 0 and engine.preemptions > 0   # withdrawn among preemptions too
    else:
        assert executor.pool.reserved_tokens == 0
    assert not executor.outputs and not executor.prompt
    for i, g in enumerate(gens):
        if ends[i] == LENGTH:
            assert len(g.tokens) == g.max_tokens
        elif ends[i] == "stop":
            assert g.tokens[-1] == 2 and len(g.tokens) <= g.max_tokens
        else:
            assert ends[i] == ABORT and i % 3 == 0
    assert any(r == ABORT for r in ends.values()) and any(r == LENGTH for r in ends.values())


def test_a_full_waiting_queue_is_refused_and_a_stopped_loop_is_unavailable():
    loop = _loop("sarathi", {}, max_waiting=2)   # not started: nothing leaves the queue
    loop.submit(Generation([5], 2, False, lambda *_: None))
    loop.submit(Generation([5], 2, False, lambda *_: None))
    with pytest.raises(QueueFull, match="max_waiting = 2"):
        loop.submit(Generation([5], 2, False, lambda *_: None))
    loop.stop()
    with pytest.raises(Unavailable):
        loop.submit(Generation([5], 2, False, lambda *_: None))


def test_bad_configs_and_a_taken_port_are_one_line_errors(tmp_path, capsys):
    import socket

    from llmqueue.cli import main

    good = _config(tmp_path)
    paged = tmp_path / "paged.toml"
    paged.write_text(CONFIG.format(scheduler="vllm-v1", kv="kv_blocks = 64"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve]\nmax_waiting = -1\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for argv, words in [(["serve", str(bad)], "serve.max_waiting = -1"),
                            (["serve", str(tmp_path / "none.toml")], "readable UTF-8 TOML"),
                            (["serve", str(good), "--set", "engine.scheduler=nope"], "engine.scheduler"),
                            # found in the engine process, raised in the server's
                            (["serve", str(paged), "--set", "engine.prefix_caching=true"], "engine.prefix_caching"),
                            (["serve", str(good), "--port", str(taken.getsockname()[1])], "cannot listen on"),
                            (["serve-bench", str(good), "--loads", "0.5,-1"], "--rates/--loads")]:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("llmqueue: error:") and words in err[0], err
    finally:
        taken.close()


async def _asgi_post(app, path: str, body: bytes) -> tuple[int, dict]:
    """One POST straight into the ASGI app (no socket, no lifespan: the engine loop is not started)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_full_queue_is_a_429_and_a_stopped_engine_a_503_over_http():
    from llmqueue.serve.app import Service, create_app
    from llmqueue.serve.exporter import Metrics
    from llmqueue.serve.protocol import Limits
    from llmqueue.serve.settings import serve_settings
    from llmqueue.serve.tokenizer import ByteTokenizer

    loop = _loop("sarathi", {}, max_waiting=1)
    loop.submit(Generation([5], 2, False, lambda *_: None))   # the queue is full: nothing drains it
    metrics = Metrics("tiny", 1024)
    app = create_app(Service(loop, ByteTokenizer(512), Limits("tiny", 512, 1024, 1024, 64, 16), serve_settings({}),
                             metrics))
    body = b'{"model": "tiny", "prompt": "x", "stream": true}'
    status, err = asyncio.run(_asgi_post(app, "/v1/completions", body))
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded" and "max_waiting = 1" in err["error"]["message"]
    loop.stop()
    status, err = asyncio.run(_asgi_post(app, "/v1/chat/completions",
                                         b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}'))
    assert status == 503 and err["error"]["code"] == "service_unavailable"
    text = metrics.render().decode()
    assert 'llmqueue:requests_refused_total{status="429"} 1.0' in text
    assert 'llmqueue:requests_refused_total{status="503"} 1.0' in text
