"""The scheduler interface (paper §4; a policy of one's own: docs/policies.md).

A scheduler has one job: given the engine's state at a batch boundary, return an
immutable :class:`~llmqueue.model.batch.BatchPlan`.  It never changes state itself.  A policy is
defined once, as a plan of steps (:mod:`llmqueue.schedulers.plan`), which the reference
interpreter and the compiled core both execute.  Each
declares whether it claims to be work-conserving (arXiv 2504.07347, Eqs. 8–9); the engine checks
every batch against that claim.
"""

from __future__ import annotations

import sys
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llmqueue.model.batch import BatchBuilder, BatchPlan
from llmqueue.checks import integer
from llmqueue.errors import ConfigError, InternalError, LlmqueueError
from llmqueue.model.request import Request
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
    With KV memory (``kv``, a :class:`~llmqueue.model.kv.KVCache`; None: unlimited) ``kv_used``
    blocks are held, ``decoding`` is sorted by admission (``stamp``) and preempted requests wait
    at the front of the not-yet-started prompts.
    """

    __slots__ = ("token_budget", "max_batch_requests", "prefilling", "decoding", "total_prefill_left", "kv",
                 "kv_used")

    def __init__(self, token_budget: int, max_batch_requests: int | None) -> None:
        self.token_budget = token_budget
        self.max_batch_requests = max_batch_requests
        self.prefilling: deque[Request] = deque()
        self.decoding: list[Request] = []
        self.total_prefill_left = 0
        self.kv = None
        self.kv_used = 0

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
                raise ConfigError(f"{type(self).__name__}.compose()", program, "a Plan (llmqueue.schedulers.plan), e.g. Plan((Decodes(), Prefills()))")
            self.program = program
        self.load: LoadRule | None = None   # the plan's load rule, bound by the engine (bind_batch_time)
        if type(self).plan is not Scheduler.plan and not type(self).__module__.startswith("llmqueue."):
            self.plan = CheckedPlan(self)   # a user's plan in Python: its failures become one clear error

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


class CheckedPlan:
    """A subclass's own ``plan(state)``, checked: an exception it raises, or a result that is not a
    BatchPlan within the budget and the request cap, is a ConfigError naming the class and where."""

    __slots__ = ("method", "label")

    def __init__(self, scheduler: Scheduler) -> None:
        self.method = type(scheduler).plan.__get__(scheduler)
        self.label = f"scheduler {getattr(scheduler, 'name', '?')!r}: {type(scheduler).__name__}.plan(state)"

    def __call__(self, state: EngineState) -> BatchPlan:
        try:
            batch = self.method(state)
        except (LlmqueueError, InternalError):
            raise
        except Exception as exc:  # the user's code failed: say where, no traceback
            at, error = where(exc, _file_of(type(self.method.__self__)))
            raise ConfigError(self.label, error, f"a plan(state) that returns a BatchPlan (raised at {at})") from None
        if not isinstance(batch, BatchPlan):
            raise ConfigError(self.label, f"returned {batch!r}"[:120], "a BatchPlan: build it with batch = state.builder(), "
                              "batch.add_decodes(...), batch.add_prefill(...), then return batch.build()")
        if batch.num_tokens > state.token_budget:
            raise ConfigError(self.label, f"{batch.num_tokens} tokens", f"at most the token budget "
                              f"{state.token_budget} (state.builder() keeps it)")
        cap = state.max_batch_requests
        if cap is not None and batch.num_requests > cap:
            raise ConfigError(self.label, f"{batch.num_requests} requests", f"at most the request cap {cap} "
                              "(state.builder() keeps it)")
        return batch


def where(exc: BaseException, path: Path | None = None) -> tuple[str, str]:
    """(``file:line``, ``Type: message``) of an exception, at its deepest frame in ``path`` (else its last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename) == path]
    frame = (mine or frames or [None])[-1]
    return (f"{frame.filename}:{frame.lineno}" if frame is not None else "?"), f"{type(exc).__name__}: {exc}"


def _file_of(cls: type) -> Path | None:
    """The file a class was defined in (None if unknown)."""
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return Path(file) if file else None


SPLIT_OPTION = Option(
    bool, False,
    "split a prompt larger than the room left in a prefill batch (default false: the prompt "
    "waits for the next batch, and a prompt larger than the whole budget is rejected)",
)
