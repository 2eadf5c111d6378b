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

from llmqueue.checks import check_input_file
from llmqueue.config import MAX_CONFIG_BYTES, Config, parse_config, parse_override, parse_toml, set_dotted
from llmqueue.errors import ConfigError, LlmqueueError

INSTALL_HINT = "install the cpu extra: pip install 'llmqueue[cpu]'"


def require_torch():
    """Import and return torch, or raise a one-line error naming the extra to install."""
    try:
        import torch
    except ImportError:
        raise LlmqueueError(INSTALL_HINT) from None
    return torch


#: ``engine.batch_time`` keys that name a source instead of a model: a calibration file, or
#: ``calibration = "machine"`` (this machine's cached calibration; llmqueue.real.machine)
SOURCE_KEYS = ("file", "calibration")


def read_engine_data(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, dict]:
    """An engine config's raw tables (with ``--set`` overrides) and its ``[real]`` table; a file that
    is not a regular one of at most MAX_CONFIG_BYTES is refused before it is read."""
    p = Path(path)
    check_input_file(p, "config", "TOML file", MAX_CONFIG_BYTES)
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
    return data, real


def batch_time_source(data: dict) -> dict | None:
    """``engine.batch_time`` when it names a source (``{file = ...}`` or ``{calibration =
    "machine"}``), else None; anything else in such a table is refused."""
    engine = data.get("engine")
    spec = engine.get("batch_time") if isinstance(engine, dict) else None
    if not isinstance(spec, dict) or not set(spec) & set(SOURCE_KEYS):
        return None
    if len(spec) != 1:
        raise ConfigError("engine.batch_time", spec, "either a model table, {file = \"cal.json\"} or "
                          "{calibration = \"machine\"}, not both")
    if "calibration" in spec and spec["calibration"] != "machine":
        raise ConfigError("engine.batch_time.calibration", spec["calibration"], "\"machine\"")
    if "file" in spec and not (isinstance(spec["file"], str) and spec["file"]):
        raise ConfigError("engine.batch_time.file", spec["file"], "a file path (string)")
    return spec


def split_engine_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, dict]:
    """An engine config: the simulator's tables (validated) and the raw ``[real]`` table;
    ``--set`` overrides reach both.  Needs no torch.  An ``engine.batch_time`` naming a source
    is resolved by the engine commands (llmqueue.real.machine); here the paper's staircase
    stands in, for what needs only the workload's lengths and the budget."""
    data, real = read_engine_data(path, overrides)
    if batch_time_source(data) is not None:
        from llmqueue.model.batch_time import PAPER_STAIRCASE

        data["engine"]["batch_time"] = dict(PAPER_STAIRCASE)
    return parse_config(data, Path(path).resolve().parent), real
