"""Workload: arrival processes, request-length distributions and trace replay (arXiv 2504.07347 §3.1).

A request brings ``v_p`` prefill (prompt) and ``v_d`` decode (output) tokens, drawn i.i.d. with
means ``m_p`` (:attr:`Workload.mean_prompt_len`) and ``m_d`` (:attr:`Workload.mean_output_len`);
requests arrive at rate ``λ`` (:attr:`Workload.arrival_rate`): Poisson, deterministic or gamma
renewal arrivals, or the replay of a recorded trace (Azure LLM inference 2023, Vidur).

One seed gives three independent streams (arrival times, prompt lengths, output lengths), so the
same seed gives the same requests to every scheduler (common random numbers).  A shared system
prompt (``shared_prefix``, docs/prefix_caching.md) draws each request's group from a fourth stream,
so the other three are unchanged.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmqueue.checks import BIG as _BIG
from llmqueue.checks import integer as _integer
from llmqueue.checks import number as _number
from llmqueue.errors import ConfigError, TraceError

_MAX_MEAN = 1e12  # largest accepted mean parameter (numpy's Poisson sampler fails near 1e19)


@dataclass(frozen=True, slots=True)
class Requests:
    """A request stream sorted by arrival time (seconds; the first may be > 0)."""

    arrival_time: np.ndarray       # float64, non-decreasing
    num_prompt_tokens: np.ndarray  # int64, >= 1
    num_output_tokens: np.ndarray  # int64, >= 0
    # per request (by position) its content description for prefix caching: a tuple of spans
    # ((key, length), ...) its prompt starts with (model/kv.py block_key); None: nothing shared
    content: Any = None

    def __len__(self) -> int:
        return len(self.arrival_time)


# ---- parameter checks ------------------------------------------------------------------

def _mean(value: Any, field: str, *, at_least: float | None = None) -> float:
    return _number(value, field, above=None if at_least else 0.0, at_least=at_least, at_most=_MAX_MEAN)


# ---- length distributions -------------------------------------------------------------

def _stats():
    """scipy.stats, imported where a law needs it: it takes most of a second, and no command should pay
    that at start-up (docs/performance.md, "Start-up")."""
    from scipy import stats

    return stats


class LengthDist(ABC):
    """Law of a token count, clipped to ``[minimum, maximum]`` (``maximum`` None: no upper clip).

    Subclasses give the unclipped law ``Y`` (support >= 0) through ``_draw``, ``_cdf(k) = P(Y <= k)``,
    ``_partial_mean(t) = E[Y; Y <= t]`` and ``_partial_square(t) = E[Y²; Y <= t]``; :attr:`mean` and
    :attr:`second_moment` are then exact for the clipped law.
    """

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]  # spec keys besides ``dist`` and ``max``

    def __init__(self, *, minimum: int, maximum: int | None, field: str) -> None:
        self.minimum = minimum
        self.maximum = None if maximum is None else _integer(maximum, f"{field}.max", minimum)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` i.i.d. draws, int64, clipped to ``[minimum, maximum]``."""
        return np.clip(self._draw(rng, n), self.minimum,
                       _BIG if self.maximum is None else self.maximum).astype(np.int64)

    @cached_property
    def mean(self) -> float:
        """Exact mean of what :meth:`sample` draws: E[clip(Y, a, b)]
        = a·P(Y <= a) + E[Y; a < Y <= b-1] + b·P(Y >= b)."""
        a, b = self.minimum, self.maximum
        low = a * self._cdf(a) - self._partial_mean(a)
        if b is None:
            return float(low + self._partial_mean(math.inf))
        return float(low + self._partial_mean(b - 1) + b * (1.0 - self._cdf(b - 1)))

    @cached_property
    def second_moment(self) -> float:
        """Exact E[X²] of what :meth:`sample` draws, as :attr:`mean` (the KV memory of a request grows
        with the square of its output: docs/memory.md): a²·P(Y <= a) + E[Y²; a < Y <= b-1] + b²·P(Y >= b)."""
        a, b = self.minimum, self.maximum
        low = a * a * self._cdf(a) - self._partial_square(a)
        if b is None:
            return float(low + self._partial_square(math.inf))
        return float(low + self._partial_square(b - 1) + float(b) * b * (1.0 - self._cdf(b - 1)))

    def to_dict(self) -> dict:
        """The spec that :func:`make_length` accepts back."""
        return {"dist": self.name, **self._params(), **({} if self.maximum is None else {"max": self.maximum})}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()}, minimum={self.minimum})"

    @abstractmethod
    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray: ...

    @abstractmethod
    def _cdf(self, k: int) -> float: ...

    @abstractmethod
    def _partial_mean(self, t: float) -> float: ...

    @abstractmethod
    def _partial_square(self, t: float) -> float: ...

    @abstractmethod
    def _params(self) -> dict: ...


class Fixed(LengthDist):
    """Every request has ``value`` tokens."""

    name, keys = "fixed", ("value",)

    def __init__(self, value: int, *, minimum: int = 0, maximum: int | None = None, field: str = "fixed") -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        self.value = _integer(value, f"{field}.value", minimum)

    def _draw(self, rng, n):
        return np.full(n, self.value, dtype=np.int64)

    def _cdf(self, k):
        return float(k >= self.value)

    def _partial_mean(self, t):
        return float(self.value) if t >= self.value else 0.0

    def _partial_square(self, t):
        return float(self.value) ** 2 if t >= self.value else 0.0

    def _params(self):
        return {"value": self.value}


class Poisson(LengthDist):
    """Poisson with mean ``mean`` (before clipping)."""

    name, keys = "poisson", ("mean",)

    def __init__(self, mean: float, *, minimum: int = 0, maximum: int | None = None, field: str = "poisson") -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        self.mean_param = _mean(mean, f"{field}.mean")

    def _draw(self, rng, n):
        return rng.poisson(self.mean_param, n)

    def _cdf(self, k):
        return float(_stats().poisson.cdf(k, self.mean_param))

    def _partial_mean(self, t):  # k·pmf(k) = m·pmf(k-1)
        return self.mean_param * float(_stats().poisson.cdf(t - 1, self.mean_param))

    def _partial_square(self, t):  # k² = k(k-1) + k, k(k-1)·pmf(k) = m²·pmf(k-2)
        m = self.mean_param
        stats = _stats()
        return m * m * float(stats.poisson.cdf(t - 2, m)) + m * float(stats.poisson.cdf(t - 1, m))

    @cached_property
    def mean(self) -> float:
        # perf: `llmqueue capacity fig1` imported scipy.stats (0.8 s) only for this.  With no upper clip,
        # E[clip(Y, a)] = m + (a·P(Y <= a) - m·P(Y <= a-1)), and when the Chernoff bound on the
        # bracket, (a + m)·exp(-m)(e·m/a)^a, is under a quarter ulp of m, the sum rounds to m exactly:
        # the float the general formula gives, without computing the two tail terms.
        m, a = self.mean_param, self.minimum
        if self.maximum is None and a < m:
            log_tail = -m + (a * (1.0 + math.log(m / a)) if a > 0 else 0.0)
            if math.log(a + m) + log_tail < math.log(math.ulp(m) / 4):
                return float(m)
        return super().mean

    def _params(self):
        return {"mean": self.mean_param}


class Geometric(LengthDist):
    """Geometric on {1, 2, ...}: P(k) = p(1-p)^(k-1), p = 1/mean."""

    name, keys = "geometric", ("mean",)

    def __init__(self, mean: float, *, minimum: int = 0, maximum: int | None = None, field: str = "geometric") -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        self.mean_param = _mean(mean, f"{field}.mean", at_least=1.0)
        self._q = 1.0 - 1.0 / self.mean_param

    def _draw(self, rng, n):
        return rng.geometric(1.0 / self.mean_param, n)

    def _cdf(self, k):
        return 1.0 - self._q ** max(k, 0)

    def _partial_mean(self, t):  # E[Y; Y > t] = q^t (t + mean)
        if t < 1:
            return 0.0
        return self.mean_param if math.isinf(t) else self.mean_param - self._q ** t * (t + self.mean_param)

    def _partial_square(self, t):  # Y | Y > t is t + Y (memoryless): E[Y²; Y > t] = q^t E[(t + Y)²]
        if t < 1:
            return 0.0
        m = self.mean_param
        square = m * (2 * m - 1)  # E[Y²] = (2 - p) / p²
        return square if math.isinf(t) else square - self._q ** t * (t * t + 2 * t * m + square)

    def _params(self):
        return {"mean": self.mean_param}


class Uniform(LengthDist):
    """Uniform on the integers ``low..high`` (inclusive)."""

    name, keys = "uniform", ("low", "high")

    def __init__(self, low: int, high: int, *, minimum: int = 0, maximum: int | None = None,
                 field: str = "uniform") -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        self.low = _integer(low, f"{field}.low", minimum)
        self.high = _integer(high, f"{field}.high", self.low)

    def _draw(self, rng, n):
        return rng.integers(self.low, self.high, size=n, endpoint=True)

    def _cdf(self, k):
        size = self.high - self.low + 1
        return min(max(k - self.low + 1, 0), size) / size

    def _partial_mean(self, t):
        top = min(t, self.high)
        if top < self.low:
            return 0.0
        return (self.low + top) * (top - self.low + 1) / 2 / (self.high - self.low + 1)

    def _partial_square(self, t):
        top = min(t, self.high)
        if top < self.low:
            return 0.0
        squares = lambda n: n * (n + 1) * (2 * n + 1) // 6  # 1² + ... + n², exact in Python ints
        return (squares(int(top)) - squares(self.low - 1)) / (self.high - self.low + 1)

    def _params(self):
        return {"low": self.low, "high": self.high}


class LogNormal(LengthDist):
    """exp(N(mu, sigma²)) with mu = ln(mean) - sigma²/2, rounded to the nearest integer."""

    name, keys = "lognormal", ("mean", "sigma")
    _MAX_TERMS = 2**20  # exact pmf sum up to here; beyond, round(X) ~ X (midpoint rule, error ~ density/24)

    def __init__(self, mean: float, sigma: float, *, minimum: int = 0, maximum: int | None = None,
                 field: str = "lognormal") -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        self.mean_param = _mean(mean, f"{field}.mean")
        self.sigma = _number(sigma, f"{field}.sigma", above=0.0, at_most=100.0)
        self._mu = math.log(self.mean_param) - self.sigma**2 / 2

    @cached_property
    def _law(self):
        return _stats().lognorm(s=self.sigma, scale=math.exp(self._mu))

    def _draw(self, rng, n):
        return np.rint(rng.lognormal(self._mu, self.sigma, n))

    def _cdf(self, k):  # round(X) <= k  <=>  X < k + 1/2
        return float(self._law.cdf(k + 0.5))

    def _partial_mean(self, t):
        cut = min(t, self._MAX_TERMS, float(self._law.isf(1e-16)))
        k = np.arange(1, math.floor(cut) + 1, dtype=np.float64)
        total = float(k @ (self._law.sf(k - 0.5) - self._law.sf(k + 0.5)))
        if t > cut:  # E[X; cut + 1/2 <= X < t + 1/2] in closed form
            z = [(math.log(x) - self._mu - self.sigma**2) / self.sigma for x in (math.floor(cut) + 0.5, t + 0.5)]
            total += self.mean_param * float(_stats().norm.sf(z[0]) - _stats().norm.sf(z[1]))
        return total

    def _partial_square(self, t):  # as _partial_mean; beyond the cut round(X)² ~ X² - 1/12
        cut = min(t, self._MAX_TERMS, float(self._law.isf(1e-16)))
        k = np.arange(1, math.floor(cut) + 1, dtype=np.float64)
        total = float((k * k) @ (self._law.sf(k - 0.5) - self._law.sf(k + 0.5)))
        if t > cut:  # E[X²; x0 <= X < x1] = exp(2 mu + 2 sigma²) (Φ(z1 - 2 sigma) - Φ(z0 - 2 sigma)) in log space
            x = [math.floor(cut) + 0.5, t + 0.5]
            z = [(math.log(v) - self._mu - 2 * self.sigma**2) / self.sigma for v in x]
            mass = float(self._law.sf(x[0]) - (0.0 if math.isinf(t) else self._law.sf(x[1])))
            total += math.exp(2 * self._mu + 2 * self.sigma**2) * float(_stats().norm.sf(z[0]) - _stats().norm.sf(z[1]))
            total -= mass / 12
        return total

    def _params(self):
        return {"mean": self.mean_param, "sigma": self.sigma}


class Empirical(LengthDist):
    """Uniform resampling (with replacement) of a CSV column; ``column`` may be a column name or
    ``"prompt"``/``"output"`` for the prompt/output column of an Azure or Vidur trace."""

    name, keys = "empirical", ("trace", "column")

    def __init__(self, trace: str, column: str, *, minimum: int = 0, maximum: int | None = None,
                 field: str = "empirical", base_dir: str | Path | None = None) -> None:
        super().__init__(minimum=minimum, maximum=maximum, field=field)
        for key, value in (("trace", trace), ("column", column)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{field}.{key}", value, "a non-empty string")
        self.trace, self.column = trace, column
        path = Path(trace) if base_dir is None else Path(base_dir) / trace
        table = _read_csv(path, "auto")
        name = _FORMATS[table.format][1 if column == "prompt" else 2] if (
            table.format and column in ("prompt", "output")) else column
        if name not in table.header:
            raise ConfigError(f"{field}.column", column, f"a column of {path} ({', '.join(table.header)}), or "
                              '"prompt"/"output" for an Azure or Vidur trace')
        rows, _ = _parse_rows(table, [(name, _count_parser(0))], "error", hint=False)
        if not rows:
            raise TraceError(f"{path}: no data rows to resample")
        self.values = np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    def _draw(self, rng, n):
        return self.values[rng.integers(0, len(self.values), n)]

    def _cdf(self, k):
        return np.searchsorted(self.values, k, side="right") / len(self.values)

    def _partial_mean(self, t):
        return float(self.values[: np.searchsorted(self.values, t, side="right")].sum()) / len(self.values)

    def _partial_square(self, t):
        kept = self.values[: np.searchsorted(self.values, t, side="right")].astype(np.float64)
        return float(kept @ kept) / len(self.values)

    def _params(self):
        return {"trace": self.trace, "column": self.column}


_DISTS: dict[str, type[LengthDist]] = {c.name: c for c in (Fixed, Poisson, Geometric, Uniform, LogNormal, Empirical)}


def make_length(spec: Mapping[str, Any], *, field: str, minimum: int,
                base_dir: str | Path | None = None) -> LengthDist:
    """A length law from a TOML table such as ``{"dist": "poisson", "mean": 129}``.

    ``field`` names the table in errors; ``minimum`` is the lower clip (1 for prompts, 0 for
    outputs); ``base_dir`` resolves a relative empirical ``trace`` path.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(field, spec, "a table with dist and its parameters")
    name = spec.get("dist")
    cls = _DISTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"{field}.dist", name, f"one of {', '.join(_DISTS)}")
    allowed = ("dist", *cls.keys, "max")
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{field}.{key}", spec[key], f"a key of dist = {name!r}: {', '.join(allowed)}")
    for key in cls.keys:
        if key not in spec:
            raise ConfigError(f"{field}.{key}", None, f"required with dist = {name!r}")
    extra = {"base_dir": base_dir} if cls is Empirical else {}
    return cls(*(spec[k] for k in cls.keys), minimum=minimum, maximum=spec.get("max"), field=field, **extra)


# ---- arrival processes ---------------------------------------------------------------

class ArrivalProcess(ABC):
    """A renewal arrival process with ``rate`` requests/s; the first arrival is the first gap."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ("rate",)

    def __init__(self, rate: float, *, field: str = "workload") -> None:
        self.rate = _number(rate, f"{field}.rate", above=0.0)

    def sample(self, rng: np.random.Generator, *, horizon_s: float | None = None,
               num_requests: int | None = None) -> np.ndarray:
        """Arrival times: all in (0, horizon_s], or exactly ``num_requests`` (give one of the two).

        The horizon stream is a prefix of the ``num_requests`` stream drawn from the same state.
        """
        if (horizon_s is None) == (num_requests is None):
            raise ConfigError("horizon_s", horizon_s, "exactly one of horizon_s and num_requests")
        if num_requests is not None:
            return self._first(rng, _integer(num_requests, "num_requests", 0))
        return self._until(rng, _number(horizon_s, "horizon_s", above=0.0))

    def to_dict(self) -> dict:
        return {"arrival": self.name, **{k: getattr(self, k) for k in self.keys}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    @abstractmethod
    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray: ...

    def _first(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.cumsum(self._gaps(rng, n))

    def _until(self, rng: np.random.Generator, horizon: float) -> np.ndarray:
        # perf: vectorised chunks sized for the expected count plus 5 standard deviations (at most
        # 16M), so one chunk almost always suffices (10M Poisson arrivals in ~0.25 s).  The cumsum restarts from the
        # last arrival with the same sequential additions, so times equal those of _first.
        chunks, start = [], 0.0
        while True:
            expected = self.rate * (horizon - start)
            gaps = self._gaps(rng, min(int(expected + 5 * math.sqrt(expected) + 64), 1 << 24))
            times = np.cumsum(np.concatenate(([start], gaps)))[1:]
            end = int(np.searchsorted(times, horizon, side="right"))
            chunks.append(times[:end])
            if end < len(times):
                return np.concatenate(chunks)
            start = times[-1]


class PoissonArrivals(ArrivalProcess):
    """Exponential gaps with mean 1/rate."""

    name = "poisson"
    gap_cv2 = 1.0   # squared coefficient of variation of the gaps (the verdict's relaxation time uses it)

    def _gaps(self, rng, n):
        return rng.exponential(1.0 / self.rate, n)


class DeterministicArrivals(ArrivalProcess):
    """Arrivals at 1/rate, 2/rate, ... (computed as k/rate, no accumulated rounding)."""

    name = "deterministic"
    gap_cv2 = 0.0

    def _gaps(self, rng, n):
        return np.full(n, 1.0 / self.rate)

    def _first(self, rng, n):
        return np.arange(1, n + 1) / self.rate

    def _until(self, rng, horizon):
        n = math.floor(horizon * self.rate)
        if (n + 1) / self.rate <= horizon:  # horizon * rate may round either way
            n += 1
        elif n > 0 and n / self.rate > horizon:
            n -= 1
        return self._first(rng, n)


class GammaArrivals(ArrivalProcess):
    """Gamma gaps with mean 1/rate and coefficient of variation ``cv``: shape 1/cv², scale 1/(rate·shape)."""

    name, keys = "gamma", ("rate", "cv")

    def __init__(self, rate: float, cv: float, *, field: str = "workload") -> None:
        super().__init__(rate, field=field)
        self.cv = _number(cv, f"{field}.cv", above=0.0)
        self.gap_cv2 = self.cv ** 2

    def _gaps(self, rng, n):
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (self.rate * shape), n)


_ARRIVALS: dict[str, type[ArrivalProcess]] = {c.name: c for c in (PoissonArrivals, DeterministicArrivals,
                                                                   GammaArrivals)}


def make_arrivals(spec: Mapping[str, Any], *, field: str = "workload") -> ArrivalProcess:
    """An arrival process from ``arrival``, ``rate`` and (gamma) ``cv``; other keys are ignored."""
    if not isinstance(spec, Mapping):
        raise ConfigError(field, spec, "a table with arrival and rate")
    name = spec.get("arrival")
    cls = _ARRIVALS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"{field}.arrival", name, f"one of {', '.join(_ARRIVALS)}")
    if "cv" in spec and "cv" not in cls.keys:
        raise ConfigError(f"{field}.cv", spec["cv"], 'only allowed with arrival = "gamma"')
    for key in cls.keys:
        if key not in spec:
            raise ConfigError(f"{field}.{key}", None, f"required with arrival = {name!r}")
    return cls(*(spec[k] for k in cls.keys), field=field)


# ---- traces ----------------------------------------------------------------------------

# format -> (arrival time, prompt, output) columns
_FORMATS = {"azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
            "vidur": ("arrived_at", "num_prefill_tokens", "num_decode_tokens")}


@dataclass(frozen=True, slots=True)
class _Table:
    path: str
    format: str | None              # None: not a recognised trace (still readable as plain CSV)
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (1-based line number, fields); blank lines left out


class _BadField(Exception):
    """A field that does not parse; the message is the reason shown to the user."""


def _read_csv(path: str | Path, format: str) -> _Table:
    """Read a whole CSV trace; detect (format "auto") or check its format from the header."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TraceError(f"{name}: no such trace file") from None
    except IsADirectoryError:
        raise TraceError(f"{name}: is a directory, not a trace file") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text (byte {exc.start}); a trace is a CSV file") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read the trace file ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        rows = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as exc:
        raise TraceError(f"{name}: line {reader.line_num}: not valid CSV ({exc})") from None
    if not header:
        raise TraceError(f"{name}: empty file, expected a CSV header line")
    header = [h.strip() for h in header]
    found = next((f for f, cols in _FORMATS.items() if set(cols[1:]) <= set(header)), None)
    if format != "auto" and found != format:
        cols = ",".join(_FORMATS[format])
        raise TraceError(f"{name}: header {','.join(header)!r} is not a {format} trace (expected {cols})")
    return _Table(name, found, header, rows)


def _parse_rows(table: _Table, columns: list[tuple[str, Callable[[str, str], Any]]], on_bad_row: str,
                *, hint: bool = True) -> tuple[list[tuple], int]:
    """Parse the named columns of every row: (parsed rows, number of malformed rows skipped)."""
    index = [table.header.index(name) for name, _ in columns]
    width = len(table.header)
    good, bad = [], []
    for line, fields in table.rows:
        try:
            if len(fields) != width:
                raise _BadField(f"expected {width} fields, got {len(fields)}")
            good.append(tuple(parse(fields[i], name) for i, (name, parse) in zip(index, columns, strict=True)))
        except _BadField as exc:
            bad.append((line, str(exc)))
    if bad and on_bad_row == "error":
        shown = "; ".join(f"line {line}: {reason}" for line, reason in bad[:5])
        more = "; ..." if len(bad) > 5 else ""
        tip = ' (use on_bad_row = "skip" to skip them)' if hint else ""
        raise TraceError(f"{table.path}: {len(bad)} malformed row{'s' * (len(bad) > 1)}{tip}: {shown}{more}")
    return good, len(bad)


def _count_parser(minimum: int) -> Callable[[str, str], int]:
    """Parser of a token count >= minimum ("12" and "12.0" are 12; "12.5" is malformed)."""
    def parse(text: str, name: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not number.is_integer():
                raise _BadField(f"{name} {text!r} is not an integer") from None
            value = int(number)
        if value < minimum:
            raise _BadField(f"{name} {text!r} is not an integer >= {minimum}")
        return value
    return parse


_EPOCH = datetime(1970, 1, 1)


def _parse_timestamp(text: str, name: str) -> int:
    """Azure TIMESTAMP -> integer microseconds (exact; 7-digit fractions are truncated to 6)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _BadField(f"{name} {text!r} is not a date-time like 2023-11-16 18:17:03.9799600") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _parse_seconds(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise _BadField(f"{name} {text!r} is not a finite number >= 0")
    return value


@dataclass(frozen=True)
class Trace:
    """A loaded trace: its requests (sorted by arrival) and what loading did to its rows."""

    requests: Requests
    path: str
    format: str             # "azure" or "vidur"
    rows_read: int          # data rows in the file (blank lines not counted)
    rows_skipped_bad: int   # malformed rows skipped (on_bad_row = "skip")
    rows_clipped: int       # rows shortened to max_tokens (cap_mode = "clip")
    rows_dropped_long: int  # rows longer than max_tokens dropped (cap_mode = "drop")
    rows_reordered: int     # rows earlier than the row before them (the trace is then stably sorted)
    loops: int = 1          # copies replayed back to back (load_trace's loop); requests holds them all

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival of ONE copy of the trace."""
        times = self.requests.arrival_time
        return float(times[len(times) // self.loops - 1] - times[0])

    def summary(self) -> dict:
        return {"path": self.path, "format": self.format, "num_requests": len(self.requests),
                "loops": self.loops, "rows_read": self.rows_read, "rows_skipped_bad": self.rows_skipped_bad,
                "rows_clipped": self.rows_clipped, "rows_dropped_long": self.rows_dropped_long,
                "rows_reordered": self.rows_reordered}


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(field, value, f"one of {', '.join(allowed)}")
    return value


_MAX_LOOP_REQUESTS = 100_000_000  # most requests a looped trace may replay


def load_trace(path: str | Path, *, format: str = "auto", time_scale: float = 1.0, max_tokens: int | None = None,
               cap_mode: str = "clip", on_bad_row: str = "error", loop: int = 1) -> Trace:
    """Load an Azure 2023 or Vidur trace as requests.

    Azure arrival times are seconds since the earliest timestamp (the first row in a sorted file);
    Vidur's ``arrived_at`` is taken as is.  Both are multiplied by ``time_scale``.  ``max_tokens``
    caps prompt + output as Vidur does: "clip" shortens the prompt (and, if the output alone
    reaches the cap, the output to max_tokens - 1 with a 1-token prompt); "drop" drops the row.

    ``loop = k`` replays the (scaled, capped, sorted) requests k times back to back, lengths
    repeated: copy j's arrivals are shifted by j·P, P = span + mean gap between arrivals (so the
    seam gap is a typical one); with one row, or all rows at one instant, P = time_scale seconds.
    """
    _choice(format, "format", ("auto", *_FORMATS))
    time_scale = _number(time_scale, "time_scale", above=0.0)
    loop = _integer(loop, "loop", 1, what="the number of times the trace is replayed")
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, "max_tokens", 2)
    _choice(cap_mode, "cap_mode", ("clip", "drop"))
    _choice(on_bad_row, "on_bad_row", ("error", "skip"))

    table = _read_csv(path, format)
    if table.format is None:
        raise TraceError(f"{table.path}: unrecognised header {','.join(table.header)!r}: expected an Azure trace "
                         f"({','.join(_FORMATS['azure'])}) or a Vidur trace ({','.join(_FORMATS['vidur'])})")
    time_col, prompt_col, output_col = _FORMATS[table.format]
    if time_col not in table.header:
        raise TraceError(f"{table.path}: no arrival column {time_col!r} (a length-only file: use it as an "
                         "empirical length distribution instead)")
    parse_time = _parse_timestamp if table.format == "azure" else _parse_seconds
    rows, skipped = _parse_rows(table, [(time_col, parse_time), (prompt_col, _count_parser(1)),
                                        (output_col, _count_parser(0))], on_bad_row)
    if not rows:
        raise TraceError(f"{table.path}: no valid data rows")
    times, prompt, output = (np.array(col) for col in zip(*rows, strict=True))
    if table.format == "azure":
        times = (times - times.min()) / 1e6
    reordered = int(np.count_nonzero(np.diff(times) < 0))

    clipped = dropped = 0
    if max_tokens is not None:
        over = prompt + output > max_tokens
        if cap_mode == "clip":
            clipped = int(over.sum())
            output = np.where(over & (output >= max_tokens), max_tokens - 1, output)
            prompt = np.where(over, max_tokens - output, prompt)
        else:
            dropped = int(over.sum())
            times, prompt, output = times[~over], prompt[~over], output[~over]
            if not len(times):
                raise TraceError(f"{table.path}: every row is longer than max_tokens = {max_tokens}")
    order = np.argsort(times, kind="stable")
    arrays = [times[order] * time_scale, prompt[order].astype(np.int64), output[order].astype(np.int64)]
    if loop > 1:
        n = len(arrays[0])
        if n * loop > _MAX_LOOP_REQUESTS:
            raise ConfigError("loop", loop, f"at most {_MAX_LOOP_REQUESTS // n} for this trace ({n} requests a "
                              f"copy; a loop may replay at most {_MAX_LOOP_REQUESTS:,} requests)")
        span = float(arrays[0][-1] - arrays[0][0])
        period = span * n / (n - 1) if span > 0 else time_scale  # span + span / (n - 1): span + mean gap
        shifts = np.arange(loop, dtype=np.float64) * period
        arrays = [(arrays[0][None, :] + shifts[:, None]).ravel(), np.tile(arrays[1], loop), np.tile(arrays[2], loop)]
    for a in arrays:
        a.flags.writeable = False  # shared by every replay of this trace
    return Trace(Requests(*arrays), table.path, table.format, len(table.rows), skipped, clipped, dropped,
                 reordered, loop)


# ---- shared prefixes (prefix caching, docs/prefix_caching.md) ----------------------------------

@dataclass(frozen=True)
class SharedPrefix:
    """Each request's first ``min(tokens, prompt)`` tokens are one of ``groups`` system prompts, drawn
    uniformly from the seed's fourth stream; the rest of its prompt is its own."""

    tokens: int
    groups: int

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "groups": self.groups}


class SharedPrefixContent:
    """The content descriptions of a shared-prefix stream: request i's prompt starts with the span
    ``(("system", group[i]), min(tokens, prompt[i]))`` (a tuple of spans, model/kv.py block_key)."""

    __slots__ = ("tokens", "group", "prompt")

    def __init__(self, tokens: int, group: np.ndarray, prompt: np.ndarray) -> None:
        self.tokens = tokens
        self.group = group
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, i: int) -> tuple:
        return ((("system", int(self.group[i])), min(self.tokens, int(self.prompt[i]))),)


def make_shared_prefix(spec: Any, field: str = "workload.shared_prefix") -> SharedPrefix | None:
    """``{tokens = N, groups = G}`` as a :class:`SharedPrefix` (None: no shared prefix)."""
    if spec is None:
        return None
    if isinstance(spec, SharedPrefix):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(field, spec, "a table {tokens = N, groups = G}")
    extra = sorted(set(spec) - {"tokens", "groups"})
    if extra:
        raise ConfigError(f"{field}.{extra[0]}", spec[extra[0]], "not a key (keys: tokens, groups)")
    for key in ("tokens", "groups"):
        if key not in spec:
            raise ConfigError(f"{field}.{key}", None, "an integer >= 1 (required)")
    return SharedPrefix(_integer(spec["tokens"], f"{field}.tokens", 1),
                        _integer(spec["groups"], f"{field}.groups", 1))


def shared_prefix_content(shared: SharedPrefix, seed: int, prompt: np.ndarray) -> SharedPrefixContent:
    """The groups of ``len(prompt)`` requests from the fourth stream of ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(4)[3])
    return SharedPrefixContent(shared.tokens, rng.integers(0, shared.groups, len(prompt)), prompt)


# ---- composition -----------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Arrivals (a process or a trace) and length laws (None: the trace's own lengths)."""

    arrivals: ArrivalProcess | Trace
    prompt: LengthDist | None = None
    output: LengthDist | None = None
    shared_prefix: SharedPrefix | None = None

    def __post_init__(self) -> None:
        if self.shared_prefix is not None:
            object.__setattr__(self, "shared_prefix", make_shared_prefix(self.shared_prefix))
        if isinstance(self.arrivals, ArrivalProcess):
            for key in ("prompt", "output"):
                if getattr(self, key) is None:
                    raise ConfigError(f"workload.{key}", None, "a length distribution (required without a trace)")

    def generate(self, seed: int, *, horizon_s: float | None = None, num_requests: int | None = None) -> Requests:
        """The request stream of ``seed``: independent streams for arrival times, prompt and output
        lengths (common random numbers).  A trace is replayed up to ``horizon_s`` or its first
        ``num_requests`` rows (all rows if neither); given length laws replace its lengths."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError("seed", seed, "an integer >= 0")
        arrival_rng, prompt_rng, output_rng = (np.random.default_rng(s)
                                               for s in np.random.SeedSequence(int(seed)).spawn(3))
        if isinstance(self.arrivals, Trace):
            if horizon_s is not None and num_requests is not None:
                raise ConfigError("num_requests", num_requests, "omitted when horizon_s is given (choose one)")
            replay = self.arrivals.requests
            n = len(replay)
            if horizon_s is not None:
                n = int(np.searchsorted(replay.arrival_time, _number(horizon_s, "horizon_s", above=0.0), "right"))
            elif num_requests is not None:
                n = min(n, _integer(num_requests, "num_requests", 0))
            times, prompt, output = replay.arrival_time[:n], replay.num_prompt_tokens[:n], replay.num_output_tokens[:n]
        else:
            times = self.arrivals.sample(arrival_rng, horizon_s=horizon_s, num_requests=num_requests)
            prompt = output = None
        n = len(times)
        prompt = prompt if self.prompt is None else self.prompt.sample(prompt_rng, n)
        content = None if self.shared_prefix is None else shared_prefix_content(self.shared_prefix, seed, prompt)
        return Requests(times, prompt, output if self.output is None else self.output.sample(output_rng, n),
                        content)

    @property
    def arrival_rate(self) -> float:
        """λ in requests/s; for a trace, rows / (last arrival - first arrival)."""
        if isinstance(self.arrivals, ArrivalProcess):
            return self.arrivals.rate
        times = self.arrivals.requests.arrival_time
        span = float(times[-1] - times[0])
        if span <= 0:
            raise TraceError(f"{self.arrivals.path}: cannot compute an arrival rate from {len(times)} "
                             f"request(s) arriving within {span:g} s")
        return len(times) / span

    @property
    def mean_prompt_len(self) -> float:
        """m_p: the prompt law's mean, or the trace's mean prompt length."""
        return self.prompt.mean if self.prompt is not None else float(self.arrivals.requests.num_prompt_tokens.mean())

    @property
    def mean_output_len(self) -> float:
        """m_d: the output law's mean, or the trace's mean output length."""
        return self.output.mean if self.output is not None else float(self.arrivals.requests.num_output_tokens.mean())
