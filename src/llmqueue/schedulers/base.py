"""The scheduler interface (PAPER.md §3, paper §4).

A scheduler has one job: given the engine's state at a batch boundary, return an
immutable :class:`~llmqueue.batch.BatchPlan`.  It never changes state itself.  A policy is
defined once, as a plan of steps (:mod:`llmqueue.schedulers.plan`), which the reference
interpreter and the compiled core both execute.  Each
declares whether it claims to be work-conserving (PAPER.md §2); the engine checks
every batch against that claim.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from llmqueue.batch import BatchBuilder, BatchPlan
from llmqueue.checks import integer
from llmqueue.errors import ConfigError, InternalError
from llmqueue.request import Request
from llmqueue.schedulers.plan import LoadRule, Plan, interpret


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


class Scheduler:
    """Base class: subclasses set ``name``, ``summary``, ``work_conserving``, ``options`` and define
    the policy in :meth:`compose` as a :class:`~llmqueue.schedulers.plan.Plan` (both the reference
    interpreter and the compiled core run it), or, for a policy the plan vocabulary cannot say,
    override :meth:`plan` itself (it then runs on the reference interpreter only)."""

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
        composed = type(self).compose is not Scheduler.compose
        if not composed and type(self).plan is Scheduler.plan:
            raise ConfigError(f"scheduler {getattr(self, 'name', type(self).__name__)!r}", type(self).__name__,
                              "a Scheduler subclass that defines compose() (a Plan) or plan(state)")
        #: The policy as data (None: the subclass plans in Python, on the reference interpreter only).
        self.program: Plan | None = None
        if composed:
            program = self.compose()
            if not isinstance(program, Plan):
                raise ConfigError(f"{type(self).__name__}.compose()", program, "a Plan (llmqueue.schedulers.plan)")
            self.program = program
        self.load: LoadRule | None = None   # the plan's load rule, bound by the engine (bind_batch_time)

    def compose(self) -> Plan:
        """The policy as a plan of steps (see :mod:`llmqueue.schedulers.plan`)."""
        raise NotImplementedError

    @property
    def splits_prompts(self) -> bool:
        """Whether a prompt larger than the token budget can ever be served (False for a plan
        whose prefill step does not split, e.g. ``split_prompts = false``)."""
        if self.program is not None:
            return self.program.splits_prompts
        return self.settings.get("split_prompts", True)

    def bind_batch_time(self, batch_time, token_budget: int) -> None:
        """Bind the plan's load rule to the engine's batch time (Engine calls this)."""
        if self.program is not None and self.program.load is not None:
            self.load = self.program.load(batch_time, token_budget)

    def plan(self, state: EngineState) -> BatchPlan:
        """The next batch for ``state`` (may be empty only if the engine is empty)."""
        if self.program.load is not None and self.load is None:
            raise InternalError(f"{self.name} plans by batch time and needs the engine's batch-time model "
                                "(Engine binds it at construction)")
        return interpret(self.program, state, self.load)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({opts})"


SPLIT_OPTION = Option(
    bool, False,
    "split a prompt larger than the room left in a prefill batch (default false: the prompt "
    "waits for the next batch, and a prompt larger than the whole budget is rejected)",
)
