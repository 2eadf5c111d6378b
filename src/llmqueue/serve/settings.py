"""The ``[serve]`` table of an engine config and the config file of ``llmqueue serve`` (docs/serving.md).

A serve config is an engine config (the simulator's ``[engine]``, ``[workload]``, ``[run]`` and the
real engine's ``[real]``, docs/real_engine.md) plus an optional ``[serve]`` table; ``--set``
overrides reach every table.  Needs neither torch nor the web stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmqueue.checks import integer, number
from llmqueue.config import Config, parse_config
from llmqueue.errors import ConfigError

#: the most output tokens any request may ask for (the model's context bounds it further)
MAX_TOKENS_CAP = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """Limits and names of the server; every field is a ``[serve]`` key."""

    model_name: str = "llmqueue"       # the id clients put in "model"
    tokenizer: str = "byte"            # "byte" (shipped) or a folder with a tokenizer.json
    max_waiting: int = 256             # requests without their first token yet; beyond: 429
    max_body_bytes: int = 1 << 20      # request bodies larger: 413
    body_timeout_s: float = 10.0       # a body not read whole by then: 408
    request_timeout_s: float = 600.0   # a request not finished by then is cancelled: 504
    default_max_tokens: int = 16       # completions without max_tokens (OpenAI's default)
    max_tokens: int = 4096             # most output tokens one request may ask for
    shutdown_timeout_s: float = 10.0   # on SIGINT/SIGTERM, requests in flight get this long to finish
    engine_loop: str = "process"       # "process": the engine in its own process; "thread": in the server's


_INT_KEYS = {"max_waiting": 1, "max_body_bytes": 64, "default_max_tokens": 1, "max_tokens": 1}
_FLOAT_KEYS = ("body_timeout_s", "request_timeout_s", "shutdown_timeout_s")
ENGINE_LOOPS = ("process", "thread")


def serve_settings(spec: Mapping | None, field: str = "serve") -> ServeSettings:
    """Validate a ``[serve]`` table; every error names the field, the value and what is allowed."""
    spec = dict(spec or {})
    known = ServeSettings.__dataclass_fields__
    values = {}
    for key, value in spec.items():
        if key not in known:
            raise ConfigError(f"{field}.{key}", value, f"a key of [serve]: {', '.join(known)}")
        if key in _INT_KEYS:
            value = integer(value, f"{field}.{key}", _INT_KEYS[key])
        elif key in _FLOAT_KEYS:
            value = number(value, f"{field}.{key}", above=0)
        elif key == "engine_loop":
            if value not in ENGINE_LOOPS:
                raise ConfigError(f"{field}.{key}", value, f"one of {', '.join(ENGINE_LOOPS)}")
        elif not isinstance(value, str) or not value or len(value) > 256:
            raise ConfigError(f"{field}.{key}", value, "a non-empty string of at most 256 characters")
        values[key] = value
    settings = ServeSettings(**values)
    if settings.max_tokens > MAX_TOKENS_CAP:
        raise ConfigError(f"{field}.max_tokens", settings.max_tokens, f"at most {MAX_TOKENS_CAP}")
    if settings.default_max_tokens > settings.max_tokens:
        raise ConfigError(f"{field}.default_max_tokens", settings.default_max_tokens,
                          f"at most serve.max_tokens = {settings.max_tokens}")
    return settings


def load_serve_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, dict, ServeSettings]:
    """The simulator's config, the raw ``[real]`` table and the ``[serve]`` settings of a file."""
    from llmqueue.real import read_engine_data

    p = Path(path)
    data, real = read_engine_data(p, overrides)
    serve = data.pop("serve", {})
    if not isinstance(serve, dict):
        raise ConfigError("serve", serve, "a table")
    return parse_config(data, p.resolve().parent), real, serve_settings(serve)
