"""The one home of parameter checks: numbers, integers, booleans from configs and callers.

Each raises :class:`~llmqueue.errors.ConfigError` naming the field, the value and what is
allowed.  Integers accept a float with no fractional part (TOML ``512.0``) and return int.
"""

from __future__ import annotations

import math
import numbers
import stat
from pathlib import Path
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


def check_input_file(path: Path, field: str, what: str, limit: int) -> None:
    """Refuse, before reading it, an input that is not a regular file (a folder, ``/dev/zero``, a
    FIFO) or is larger than ``limit`` bytes; a missing or unstat-able file is left to the reader.
    ``what`` names the file's kind, e.g. ``"TOML file"``."""
    try:
        st = path.stat()
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise ConfigError(field, str(path), f"a regular {what}, not {kind}")
    if st.st_size > limit:
        raise ConfigError(field, str(path), f"a {what} of at most {file_size(limit)} (this one has {file_size(st.st_size)})")


def file_size(n: int) -> str:
    """A byte count as users read it: whole mebibytes as MB, else bytes."""
    return f"{n // 2**20} MB" if n % 2**20 == 0 else f"{n:,} bytes"
