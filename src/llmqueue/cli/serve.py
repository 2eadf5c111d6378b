"""``llmqueue serve`` and ``llmqueue serve-bench`` (docs/serving.md).

Registered by :mod:`llmqueue.cli.real` (the real-engine command group).  Nothing heavy is
imported until a command runs: the web stack, torch and the ``openai`` client are imported inside
the command functions, and a missing extra is one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from llmqueue.cli.common import add_overrides
from llmqueue.errors import LlmqueueError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: serve-bench's calibration ramp (llmqueue.serve.bench.CALIBRATION_LOADS; repeated here so that
#: registering the command imports neither numpy nor the bench)
CALIBRATION_LOADS = (0.15, 0.3, 0.5, 0.7)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: an integer from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: an integer from 0 to 65535")
    return port


def _requirements() -> None:
    from llmqueue.real import require_torch
    from llmqueue.serve import require_serve

    require_torch()
    require_serve()


def cmd_serve(args: argparse.Namespace) -> int:
    _requirements()
    from llmqueue.serve.app import SIGNAL_NAMES, bind, build_service, run
    from llmqueue.serve.settings import load_serve_config

    cfg, real, settings = load_serve_config(args.config, args.set)
    api_key = args.api_key or os.environ.get("LLMQUEUE_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None:
        print(f"llmqueue serve: warning: listening on {args.host} without an API key: anyone who can reach it "
              "can use it (--api-key or LLMQUEUE_API_KEY)", file=sys.stderr)
    sock = bind(args.host, args.port)   # first: a port in use is found before the model loads
    try:
        service = build_service(cfg, real, settings, api_key, batch_log=args.batch_log is not None)
        host, port = sock.getsockname()[:2]
        info = service.info
        print(f"llmqueue serve: model {settings.model_name!r} ({info['num_params'] / 1e6:.1f} M params, "
              f"{info['dtype']}), scheduler {info['scheduler']}, token budget {info['token_budget']}, context "
              f"{service.limits.max_context}, tokenizer {service.tokenizer.name}, engine in its own "
              f"{settings.engine_loop}; listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
        try:
            stopped_by = run(service, sock, args.log_level)
        finally:
            service.loop.stop()   # (the lifespan stopped it already unless a second signal forced the exit)
    finally:
        sock.close()
    loop = service.loop
    if args.batch_log is not None and loop.batch_log is not None:
        from llmqueue.cli.common import write_columns_csv
        from llmqueue.serve.loop import BATCH_LOG_COLUMNS

        rows = loop.batch_log
        write_columns_csv(args.batch_log, {name: [r[j] for r in rows] for j, name in enumerate(BATCH_LOG_COLUMNS)})
    how = f"stopped by {SIGNAL_NAMES.get(stopped_by, stopped_by)}" if stopped_by else "stopped"
    print(f"llmqueue serve: {how}: {loop.served} requests served"
          + (f", batches written to {args.batch_log}" if args.batch_log else ""), file=sys.stderr)
    if loop.error is not None:
        from llmqueue.serve.worker import EngineFailed

        why = str(loop.error) if isinstance(loop.error, EngineFailed) else f"{type(loop.error).__name__}: {loop.error}"
        raise LlmqueueError(f"the engine loop failed while serving: {why}")
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    _requirements()
    try:
        import openai  # noqa: F401
    except ImportError:
        raise LlmqueueError("serve-bench drives the server with the openai client: pip install "
                            "'llmqueue[serve]'") from None
    from llmqueue.serve.bench import main as bench_main

    return bench_main(args)


def register(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the real engine (docs/serving.md)")
    s.add_argument("config", help="engine config (TOML): [engine] scheduler and budget, [real] model, [serve] limits")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port, printed)")
    s.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes (or set LLMQUEUE_API_KEY)")
    s.add_argument("--batch-log", metavar="CSV", help="on shutdown, write every batch (tokens, measured seconds)")
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level; info adds an access log line per request (default warning)")
    add_overrides(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("serve-bench", help="load the server at Poisson rates and compare with the simulator")
    b.add_argument("config", help="serve config: the scheduler, model and the workload's prompt/output lengths")
    b.add_argument("--loads", default="0.3,0.6,0.8,1.3",
                   help="arrival rates as fractions of the predicted capacity λ* (served-batch fit), comma-separated")
    b.add_argument("--rates", help="arrival rates in requests/s instead of --loads, comma-separated")
    b.add_argument("--calibration-loads", default=",".join(str(x) for x in CALIBRATION_LOADS),
                   help="rates of the calibration load, as fractions of the grid calibration's λ* "
                        f"(default {','.join(str(x) for x in CALIBRATION_LOADS)})")
    b.add_argument("--requests", type=int, default=120, help="requests sent at each rate (default 120)")
    b.add_argument("--seed", type=int, default=0, help="seed of the arrivals and lengths (default 0)")
    b.add_argument("--repeats", type=int, default=3, help="timings per point of the calibration grid (default 3)")
    b.add_argument("--out", default="llmqueue_output/serve_bench", help="folder for bench.json, the table and plot")
    b.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_overrides(b)
    b.set_defaults(func=cmd_serve_bench)
