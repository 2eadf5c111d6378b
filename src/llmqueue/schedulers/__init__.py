"""Scheduler registry (PAPER.md §3): one file per policy, one line here per policy."""

from __future__ import annotations

from typing import Any

from llmqueue.errors import ConfigError
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

PAPER_SCHEDULERS = ("fastertransformer", "vllm", "orca", "sarathi")


def make_scheduler(name: str, **options: Any) -> Scheduler:
    """Build a registered scheduler; unknown names and options raise ConfigError."""
    if name not in SCHEDULERS:
        raise ConfigError("engine.scheduler", name, f"one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](**options)


__all__ = ["SCHEDULERS", "PAPER_SCHEDULERS", "EngineState", "Option", "Scheduler", "make_scheduler"]
