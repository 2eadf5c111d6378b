"""An OpenAI-compatible HTTP server on the real CPU engine (docs/serving.md).

The project's schedulers (paper arXiv 2504.07347, §4) plan every batch of a real transformer
(:mod:`llmqueue.real`) while clients stream tokens over HTTP.  Optional: ``pip install
'llmqueue[serve]'`` (FastAPI, uvicorn, prometheus-client, and the ``openai`` client that
``serve-bench`` drives the server with); nothing else in llmqueue imports this package.

Modules, each one noun: ``tokenizer`` (text <-> token ids, no download), ``settings`` (the
``[serve]`` table), ``protocol`` (OpenAI request validation and response bodies, no web
framework), ``loop`` (the engine loop: one batch at a time, arrivals from the server), ``worker`` (that loop
in its own process, the default),
``exporter`` (Prometheus metrics under vLLM's names), ``app`` (the FastAPI routes and the
uvicorn server), ``bench`` (the load client, calibration and simulation of the same arrivals).
"""

from __future__ import annotations

from llmqueue.errors import LlmqueueError

INSTALL_HINT = "install the serve extra: pip install 'llmqueue[serve]'"


def require_serve() -> None:
    """Import the web stack, or raise a one-line error naming the extra to install."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LlmqueueError(INSTALL_HINT) from None
