"""The real engine: the project's schedulers driving a Llama-style transformer on the CPU.

Optional (``pip install 'llmqueue[cpu]'``, PyTorch); nothing in the core imports this package.
Modules: ``model`` (the transformer and its packed forward pass), ``kvcache`` (the KV pool),
``serve`` (the serving loop, two clocks), ``calibrate`` (timing grid on the model), ``fit``
(batch-time fits, numpy only), ``vidur`` (fits from Vidur's GPU profiles, numpy only).
See docs/real_engine.md.
"""

from __future__ import annotations

from llmqueue.errors import LlmqueueError

INSTALL_HINT = "install the cpu extra: pip install 'llmqueue[cpu]'"


def require_torch():
    """Import and return torch, or raise a one-line error naming the extra to install."""
    try:
        import torch
    except ImportError:
        raise LlmqueueError(INSTALL_HINT) from None
    return torch
