"""Exceptions of llmqueue.

Every error a user can cause (bad config, bad trace, impossible parameter) is an
``LlmqueueError``; the command line prints its message on one line and exits 2.
Impossible internal states raise ``InternalError`` (a bug, never the user's fault).
"""

from __future__ import annotations


class LlmqueueError(Exception):
    """Base class of the errors caused by user input."""


class ConfigError(LlmqueueError, ValueError):
    """A configuration value is wrong: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        if value is None:
            message = f"{field} is missing: {allowed}"
        else:
            shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
            message = f"{field} = {shown} is not allowed: {allowed}"
        super().__init__(message)


class TraceError(LlmqueueError):
    """A trace file is missing, unreadable or has malformed rows."""


class InternalError(RuntimeError):
    """An impossible internal state: a bug in llmqueue, not in the input."""
