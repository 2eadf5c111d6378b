"""The one home of parameter checks: numbers, integers, booleans from configs and callers.

Each raises :class:`~llmqueue.errors.ConfigError` naming the field, the value and what is
allowed.  Integers accept a float with no fractional part (TOML ``512.0``) and return int.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from llmqueue.errors import ConfigError

BIG = 2**62  # upper bound on token counts and integer parameters (keeps int64 and numpy safe)


def number(value: Any, field: str, *, above: float | None = None, at_least: float | None = None,
           at_most: float = math.inf) -> float:
    """A finite real (not bool, not str) within the bounds, as float."""
    bound = f" > {above:g}" if above is not None else (f" >= {at_least:g}" if at_least is not None else "")
    allowed = f"a finite number{bound}" + (f" and <= {at_most:g}" if at_most < math.inf else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(field, value, allowed)
    try:
        x = float(value)
    except OverflowError:
        raise ConfigError(field, value, allowed) from None
    if (not math.isfinite(x) or x > at_most or (above is not None and x <= above)
            or (at_least is not None and x < at_least)):
        raise ConfigError(field, value, allowed)
    return x


def integer(value: Any, field: str, minimum: int, *, what: str = "") -> int:
    """An integer >= ``minimum`` (and <= 2**62); ``what`` adds a reason to the message."""
    allowed = f"an integer >= {minimum}" + (f" ({what})" if what else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(field, value, allowed)
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ConfigError(field, value, allowed)
        value = int(value)
    if not minimum <= value <= BIG:
        raise ConfigError(field, value, allowed + (" and <= 2**62" if value > BIG else ""))
    return int(value)


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, value, "true or false")
    return value
