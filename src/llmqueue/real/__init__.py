"""The real engine: the project's schedulers driving a Llama-style transformer on the CPU.

Optional (``pip install 'llmqueue[cpu]'``, PyTorch); nothing in the core imports this package.
Modules: ``model`` (the transformer and its packed forward pass), ``kvcache`` (the KV pool),
``serve`` (the serving loop, two clocks), ``calibrate`` (timing grid on the model), ``fit``
(batch-time fits, numpy only), ``vidur`` (fits from Vidur's GPU profiles, numpy only).
See docs/real_engine.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmqueue.config import Config, parse_config, parse_override, parse_toml, set_dotted
from llmqueue.errors import ConfigError, LlmqueueError

INSTALL_HINT = "install the cpu extra: pip install 'llmqueue[cpu]'"


def require_torch():
    """Import and return torch, or raise a one-line error naming the extra to install."""
    try:
        import torch
    except ImportError:
        raise LlmqueueError(INSTALL_HINT) from None
    return torch


def split_engine_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, dict]:
    """An engine config: the simulator's tables (validated) and the raw ``[real]`` table;
    ``--set`` overrides reach both.  Needs no torch."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError("config", str(p), "an existing, readable UTF-8 TOML file") from None
    data = parse_toml(text, str(p))
    for item in overrides:
        set_dotted(data, *parse_override(item))
    real = data.pop("real", {})
    if not isinstance(real, dict):
        raise ConfigError("real", real, "a table")
    return parse_config(data, p.resolve().parent), real
