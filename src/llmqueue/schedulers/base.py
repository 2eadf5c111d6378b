"""The scheduler interface (PAPER.md §3, paper §4).

A scheduler has one job: given the engine's state at a batch boundary, return an
immutable :class:`~llmqueue.batch.BatchPlan`.  It never changes state itself.  Each
declares whether it claims to be work-conserving (PAPER.md §2); the engine checks
every batch against that claim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from llmqueue.batch import BatchBuilder, BatchPlan
from llmqueue.checks import integer
from llmqueue.errors import ConfigError
from llmqueue.request import Request


@dataclass(frozen=True)
class Option:
    """A scheduler option: its type, default and one-line meaning."""

    type: type
    default: Any
    help: str
    minimum: int | None = None   # for int options: the smallest allowed value


class EngineState:
    """What a scheduler sees: the budget, the cap and the two queues in arrival order.

    ``prefilling`` holds requests with prefill left (partly prefilled ones first);
    ``decoding`` holds requests whose prefill is done and that still have decode tokens.
    """

    __slots__ = ("token_budget", "max_batch_requests", "prefilling", "decoding", "total_prefill_left")

    def __init__(self, token_budget: int, max_batch_requests: int | None) -> None:
        self.token_budget = token_budget
        self.max_batch_requests = max_batch_requests
        self.prefilling: deque[Request] = deque()
        self.decoding: list[Request] = []
        self.total_prefill_left = 0

    def builder(self) -> BatchBuilder:
        return BatchBuilder(self.token_budget, self.max_batch_requests)


class Scheduler(ABC):
    """Base class: subclasses set ``name``, ``summary``, ``work_conserving``, ``options``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    work_conserving: ClassVar[bool]
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, **options: Any) -> None:
        for key, value in options.items():
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise ConfigError(f"engine.{key}", value, f"an option of scheduler {self.name!r} ({allowed})")
            opt = self.options[key]
            ok = isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool))
            if not ok:
                raise ConfigError(f"engine.{key}", value, f"a {opt.type.__name__} ({opt.help})")
            if opt.minimum is not None:
                integer(value, f"engine.{key}", opt.minimum, what=opt.help)
        self.settings = {k: options.get(k, o.default) for k, o in self.options.items()}

    @property
    def splits_prompts(self) -> bool:
        """Whether a prompt larger than the token budget can ever be served (True unless
        the policy has a ``split_prompts`` option set to false)."""
        return self.settings.get("split_prompts", True)

    @abstractmethod
    def plan(self, state: EngineState) -> BatchPlan:
        """The next batch for ``state`` (may be empty only if the engine is empty)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({opts})"


SPLIT_OPTION = Option(
    bool, False,
    "split a prompt larger than the room left in a prefill batch (default false: the prompt "
    "waits for the next batch, and a prompt larger than the whole budget is rejected)",
)
