"""Scheduler registry (paper §4, Table 1): one file per policy, one line here per policy.

A policy of one's own is a :class:`Scheduler` subclass in one file: name it in a config as
``scheduler = "path/to/policy.py:ClassName"`` (:mod:`llmqueue.schedulers.custom`), or add it
here from Python with :func:`register` (docs/policies.md).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmqueue.errors import ConfigError
from llmqueue.schedulers import custom
from llmqueue.schedulers.base import EngineState, Option, Scheduler
from llmqueue.schedulers.fastertransformer import FasterTransformer
from llmqueue.schedulers.maxweight import MaxWeight
from llmqueue.schedulers.orca import Orca
from llmqueue.schedulers.sarathi import Sarathi
from llmqueue.schedulers.vllm import VanillaVLLM
from llmqueue.schedulers.vllm_v1 import VLLMv1

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (FasterTransformer, VanillaVLLM, Orca, Sarathi, VLLMv1, MaxWeight)
}
#: The built-in schedulers (SCHEDULERS also holds the ones added with :func:`register`).
BUILTIN: MappingProxyType[str, type[Scheduler]] = MappingProxyType(dict(SCHEDULERS))

PAPER_SCHEDULERS = ("fastertransformer", "vllm", "orca", "sarathi")


def allowed() -> str:
    """What ``engine.scheduler`` may be, for error messages."""
    return f"one of {', '.join(SCHEDULERS)}, or a policy file {custom.HOW}"


def scheduler_class(name: str, base_dir: str | Path | None = None, field: str = "engine.scheduler") -> type[Scheduler]:
    """The class a scheduler name stands for: a registered name, or ``file.py:Class`` (a relative
    file is relative to ``base_dir``, default the working folder)."""
    if not isinstance(name, str):
        raise ConfigError(field, name, allowed())
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if not custom.is_reference(name):
        raise ConfigError(field, name, allowed())
    cls = custom.load(name, base_dir, field)
    custom.check_name(cls, f"{field} {name!r}", BUILTIN)
    return cls


def make_scheduler(name: str, /, base_dir: str | Path | None = None, **options: Any) -> Scheduler:
    """Build a scheduler by name or file reference (see :func:`scheduler_class`); unknown names,
    malformed policy files and unknown options raise ConfigError."""
    return custom.build(scheduler_class(name, base_dir), options)


def register(cls: type[Scheduler]) -> type[Scheduler]:
    """Add a Scheduler subclass to :data:`SCHEDULERS` under ``cls.name`` (usable as a class
    decorator).  The class is checked like a policy file's; a built-in's name is refused, and
    registering another class under a name added before replaces it."""
    custom.check_class(cls, "register()")
    custom.check_name(cls, "register()", BUILTIN)
    SCHEDULERS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a scheduler added with :func:`register` (built-ins stay)."""
    if name in BUILTIN:
        raise ConfigError("unregister()", name, "a scheduler added with register(), not a built-in")
    SCHEDULERS.pop(name, None)


__all__ = ["BUILTIN", "SCHEDULERS", "PAPER_SCHEDULERS", "EngineState", "Option", "Scheduler", "allowed",
           "make_scheduler", "register", "scheduler_class", "unregister"]
