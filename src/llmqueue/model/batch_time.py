"""Batch-time models t_b: seconds for a batch of b tokens (arXiv 2504.07347 §3.1, Eq. 4).

* ``staircase``        t_b = c + a * ceil(b / b0)        (v3, Assumption 1; the default)
* ``piecewise_linear`` t_b = c + a * max(0, b - b0)      (v1/v2)
* ``constant``         t_b = duration                    (the §5.4 network uses t = 1)
* ``table``            interpolated from measured (tokens, seconds) points
* ``prefill_decode``   t = c + p·prefill + d·decode (+ x·attention pairs): timed by the plan's mix

Any model takes an optional ``noise`` table: each batch's time is the model's times an independent
factor of mean 1 (lognormal with a given ``cv``, or drawn from measured ``factors``), seeded per run
and per engine (:class:`Noisy`).  Capacity and λ* are the mean's.

Parameters are given in milliseconds in configs (``c_ms``...) and held in seconds here.
The default is the paper's CodeLlama-34B / A100 fit: c = 11.28 ms, a = 35.47 ms, b0 = 128.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from llmqueue.checks import integer, number
from llmqueue.errors import ConfigError

PAPER_STAIRCASE = {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}


class AssumptionWarning(UserWarning):
    """A configuration breaks one of the paper's assumptions (the run still proceeds)."""


class BatchTime(ABC):
    """t_b as a function of the batch's token load b >= 1."""

    name: str
    #: True when t_b depends on the token load alone (the paper's Assumption 1). A model that
    #: also looks at the batch's mix (prefill vs decode tokens, context length) sets False and
    #: overrides :meth:`plan_seconds`; the engine then times each batch by its plan.
    tokens_only: bool = True

    @abstractmethod
    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        """Vectorised batch time in seconds for integer token loads >= 1."""

    @abstractmethod
    def to_dict(self) -> dict:
        """The config table (ms units) that :func:`make_batch_time` accepts back."""

    def __call__(self, tokens: int) -> float:
        return float(self.seconds(np.asarray([tokens]))[0])

    def plan_seconds(self, plan) -> float:
        """Batch time of a :class:`~llmqueue.model.batch.BatchPlan` (before it is applied)."""
        return self(plan.num_tokens)

    def table(self, token_budget: int) -> list[float]:
        """t_b for b = 0..token_budget as a list (index 0 unused), checked positive."""
        b = np.arange(1, token_budget + 1)
        t = self.seconds(b)
        bad = np.flatnonzero(~(np.isfinite(t) & (t > 0)))
        if bad.size:
            raise ConfigError(
                "engine.batch_time", self.to_dict(),
                f"batch time must be finite and > 0 for every load 1..{token_budget}; "
                f"got {t[bad[0]]!r} s at {int(b[bad[0]])} tokens",
            )
        # perf: the engine looks batch times up by index instead of recomputing them.
        return [0.0, *t.tolist()]

    def assumption_warnings(self, token_budget: int) -> list[str]:
        """Messages for broken paper assumptions at this budget (none by default)."""
        return []

    def fresh(self, seed: int, stream: int = 0) -> BatchTime:
        """This model for one engine's run (run seed ``seed``, engine ``stream``): itself, unless it
        draws random numbers (:class:`Noisy`), which then start a stream of their own."""
        return self


class Staircase(BatchTime):
    name = "staircase"

    def __init__(self, c: float, a: float, b0: int) -> None:
        self.c, self.a, self.b0 = c, a, b0

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return self.c + self.a * np.ceil(np.asarray(tokens) / self.b0)

    def to_dict(self) -> dict:
        return {"model": self.name, "c_ms": self.c * 1e3, "a_ms": self.a * 1e3, "b0": self.b0}

    def assumption_warnings(self, token_budget: int) -> list[str]:
        whole = token_budget // self.b0 * self.b0  # the largest multiple of b0 within the budget
        if token_budget % self.b0 and whole and whole / float(self.seconds(whole)) > token_budget / float(
                self.seconds(token_budget)):
            return [
                f"batch_time.b0 = {self.b0} does not divide engine.token_budget = {token_budget} "
                f"(paper Assumption 1): batches of {whole} tokens serve "
                f"more tokens per second than full batches, so Theorem 2's capacity is only a bound"
            ]
        return []


class PiecewiseLinear(BatchTime):
    name = "piecewise_linear"

    def __init__(self, c: float, a: float, b0: int) -> None:
        self.c, self.a, self.b0 = c, a, b0

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return self.c + self.a * np.maximum(0, np.asarray(tokens) - self.b0)

    def to_dict(self) -> dict:
        return {"model": self.name, "c_ms": self.c * 1e3, "a_ms_per_token": self.a * 1e3, "b0": self.b0}


class Constant(BatchTime):
    name = "constant"

    def __init__(self, duration: float) -> None:
        self.duration = duration

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return np.full(np.shape(tokens), self.duration, dtype=float)

    def to_dict(self) -> dict:
        return {"model": self.name, "duration_ms": self.duration * 1e3}


EXTRAPOLATIONS = ("linear", "clamp", "error")


class Table(BatchTime):
    """Linear interpolation between measured points; outside them ``extrapolate`` decides:
    ``linear`` extends the first/last segment, ``clamp`` holds the end values, ``error``
    refuses loads outside [first, last] tokens."""

    name = "table"

    def __init__(self, tokens: np.ndarray, seconds: np.ndarray, extrapolate: str = "linear") -> None:
        self.tokens = np.asarray(tokens, dtype=float)
        self.secs = np.asarray(seconds, dtype=float)
        self.extrapolate = extrapolate

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        b = np.asarray(tokens, dtype=float)
        x, y = self.tokens, self.secs
        t = np.interp(b, x, y)
        if self.extrapolate == "linear" and len(x) >= 2:
            lo, hi = b < x[0], b > x[-1]
            t = np.where(lo, y[0] + (b - x[0]) * (y[1] - y[0]) / (x[1] - x[0]), t)
            t = np.where(hi, y[-1] + (b - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2]), t)
        elif self.extrapolate == "error" and (b.min(initial=x[0]) < x[0] or b.max(initial=x[-1]) > x[-1]):
            raise ConfigError(
                "engine.batch_time.extrapolate", "error",
                f"loads {int(b.min())}..{int(b.max())} tokens fall outside the table's "
                f"{int(x[0])}..{int(x[-1])} tokens; add points or use 'linear' or 'clamp'",
            )
        return t

    def to_dict(self) -> dict:
        return {
            "model": self.name,
            "points_ms": [[float(b), float(s * 1e3)] for b, s in zip(self.tokens, self.secs)],
            "extrapolate": self.extrapolate,
        }


def attention_pairs(plan) -> int:
    """(query token, context token) pairs a batch's attention computes, its own positions included:
    a decode token of a request holding k tokens of KV attends k + 1; a prefill chunk of n tokens
    after c computed ones attends n·c + n(n+1)/2.  Read before the plan is applied."""
    pairs = 0
    for r, n in plan.prefill:
        pairs += n * (r.num_prompt_tokens - r.prefill_left) + n * (n + 1) // 2
    for r in plan.decode:
        pairs += r.num_prompt_tokens + r.num_output_tokens - r.decode_left + 1
    return pairs


class PrefillDecode(BatchTime):
    """t = c + p·(prefill tokens) + d·(decode tokens) + x·(attention pairs), timed by the batch's plan.

    Not the paper's Assumption 1 (``tokens_only`` is False): on a CPU a decode token costs several
    prefill tokens (docs/real_engine.md).  The token-only view :meth:`seconds` (Theorem 2's capacity,
    the engine's table) assumes a stated mix: a fraction ``prefill_fraction`` of the tokens are prefill
    and every token attends ``mean_context_tokens`` tokens.  In steady state a stable engine serves
    prefill tokens at the fraction m_p / (m_p + m_d) of the workload, so set it to that.
    """

    name = "prefill_decode"
    tokens_only = False

    def __init__(self, c: float, prefill: float, decode: float, context: float = 0.0,
                 prefill_fraction: float = 0.5, mean_context: float = 0.0) -> None:
        self.c, self.prefill, self.decode, self.context = c, prefill, decode, context
        self.prefill_fraction, self.mean_context = prefill_fraction, mean_context

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        f = self.prefill_fraction
        per_token = f * self.prefill + (1 - f) * self.decode + self.context * self.mean_context
        return self.c + per_token * np.asarray(tokens, dtype=float)

    def plan_seconds(self, plan) -> float:
        t = self.c + self.prefill * plan.num_prefill_tokens + self.decode * len(plan.decode)
        # perf: the pairs loop is O(batch); skip it when the model has no context term.
        return t + self.context * attention_pairs(plan) if self.context else t

    def to_dict(self) -> dict:
        return {"model": self.name, "c_ms": self.c * 1e3, "prefill_ms_per_token": self.prefill * 1e3,
                "decode_ms_per_token": self.decode * 1e3, "context_ms_per_token": self.context * 1e3,
                "prefill_fraction": self.prefill_fraction, "mean_context_tokens": self.mean_context}

    def assumption_warnings(self, token_budget: int) -> list[str]:
        return [f"batch_time.model = prefill_decode times each batch by its mix (not Assumption 1); "
                f"capacity and λ* assume prefill_fraction = {self.prefill_fraction:g}"
                + (f" and mean_context_tokens = {self.mean_context:g}" if self.context else "")]


#: the noise stream's first seed word (arrivals and lengths draw from other streams of the seed)
NOISE_STREAM = 0x6E6F6973
#: noise factors drawn at a time
_BLOCK = 4096
NOISE_MAX_CV = 10.0


class Noisy(BatchTime):
    """A model's batch time times an independent factor ε of mean 1 per batch: t = t_model · ε.

    Real batch times scatter around any fit (docs/real_engine.md); with deterministic times a
    simulated queue's excursions are too short.  ε is lognormal with coefficient of variation
    ``cv`` (σ² = ln(1 + cv²), mean 1), or resampled from measured ``factors`` (ratios of measured to
    fitted times, rescaled to mean 1).  With ``correlation`` r (lognormal only) the factors of
    successive batches are correlated, as a real engine's slow and fast phases are: ln ε is an
    AR(1) series, ln ε_t − μ = r (ln ε_{t−1} − μ) + √(1 − r²) σ z_t, stationary from the first
    batch, so each ε keeps the same lognormal law (mean 1, the given cv) and batch t and t + k
    correlate by r^k in the log.  The mean batch time, hence Theorem 2's capacity and λ*,
    is the model's.  Draws come from their own stream of (``seed``, ``stream``): the run's seed
    unless the table sets one, and the engine's index in a pool; the arrivals are unchanged.
    Times depend on the draw, so such runs use the reference interpreter.
    """

    tokens_only = False

    def __init__(self, base: BatchTime, cv: float | None = None, factors: np.ndarray | None = None,
                 seed: int | None = None, stream: int = 0, run_seed: int = 0, correlation: float = 0.0) -> None:
        self.base, self.cv, self.seed, self.stream, self.correlation = base, cv, seed, stream, float(correlation)
        self.factors = None if factors is None else np.asarray(factors, dtype=float) / float(np.mean(factors))
        self.name = base.name
        self._rng = np.random.default_rng([NOISE_STREAM, run_seed if seed is None else seed, stream])
        self._draws: list[float] = []
        self._last: float | None = None     # the AR(1) state: the last draw's standardized ln ε

    def fresh(self, seed: int, stream: int = 0) -> Noisy:
        return Noisy(self.base, self.cv, self.factors, self.seed, stream, seed, self.correlation)

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        return self.base.seconds(tokens)

    def _next(self) -> float:
        if not self._draws:
            if self.factors is not None:
                block = self._rng.choice(self.factors, size=_BLOCK)
            elif self.correlation:
                s2 = np.log1p(self.cv * self.cv)
                z = self._rng.standard_normal(_BLOCK)
                r, scale, x = self.correlation, np.sqrt(1 - self.correlation ** 2), self._last
                for i in range(_BLOCK):   # stationary from the first draw: x_0 ~ N(0, 1)
                    x = z[i] if x is None else r * x + scale * z[i]
                    z[i] = x
                self._last = x
                block = np.exp(-s2 / 2 + np.sqrt(s2) * z)
            else:
                s2 = np.log1p(self.cv * self.cv)
                block = self._rng.lognormal(-s2 / 2, np.sqrt(s2), size=_BLOCK)
            self._draws = block[::-1].tolist()   # popped from the end: drawn order
        return self._draws.pop()

    def plan_seconds(self, plan) -> float:
        return self.base.plan_seconds(plan) * self._next()

    def noise_dict(self) -> dict:
        out: dict = {"cv": self.cv} if self.factors is None else {"factors": self.factors.tolist()}
        if self.correlation:
            out["correlation"] = self.correlation
        return out if self.seed is None else {**out, "seed": self.seed}

    @property
    def noise_cv(self) -> float:
        """The factor's coefficient of variation (of the rescaled factors where measured)."""
        return float(self.cv) if self.factors is None else float(np.std(self.factors))

    def to_dict(self) -> dict:
        return {**self.base.to_dict(), "noise": self.noise_dict()}

    def assumption_warnings(self, token_budget: int) -> list[str]:
        return self.base.assumption_warnings(token_budget)


def _make_noise(base: BatchTime, noise, field: str) -> Noisy:
    allowed = ("a table {cv = C} (lognormal factor of mean 1, 0 < C <= 10; optional correlation = r, "
               "0 <= r <= 0.999, of successive batches) or {factors = [f, ...]} (at least 2 measured ratios > 0, "
               "resampled), with an optional integer seed")
    if not isinstance(noise, Mapping) or not noise or set(noise) - {"cv", "factors", "seed", "correlation"} \
            or ("cv" in noise) == ("factors" in noise):
        raise ConfigError(field, noise, allowed)
    seed = None if noise.get("seed") is None else integer(noise["seed"], f"{field}.seed", 0)
    if "correlation" in noise and "cv" not in noise:
        raise ConfigError(f"{field}.correlation", noise["correlation"], "with cv only (measured factors are "
                          "resampled independently)")
    if "cv" in noise:
        r = number(noise.get("correlation", 0.0), f"{field}.correlation", at_least=0, at_most=0.999)
        return Noisy(base, cv=number(noise["cv"], f"{field}.cv", above=0, at_most=NOISE_MAX_CV), seed=seed,
                     correlation=r)
    try:
        factors = np.asarray(noise["factors"], dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}.factors", noise["factors"], allowed) from None
    if factors.ndim != 1 or factors.size < 2 or not np.isfinite(factors).all() or (factors <= 0).any():
        raise ConfigError(f"{field}.factors", noise["factors"], "at least 2 finite ratios > 0")
    return Noisy(base, factors=factors, seed=seed)


# ---- construction from a config table --------------------------------------------------

_KEYS = {
    "staircase": ("c_ms", "a_ms", "b0"),
    "piecewise_linear": ("c_ms", "a_ms_per_token", "b0"),
    "constant": ("duration_ms",),
    "table": ("points_ms", "extrapolate"),
    "prefill_decode": ("c_ms", "prefill_ms_per_token", "decode_ms_per_token", "context_ms_per_token",
                       "prefill_fraction", "mean_context_tokens"),
}
_OPTIONAL = {"extrapolate", "context_ms_per_token", "prefill_fraction", "mean_context_tokens"}


def make_batch_time(spec: Mapping | None, field: str = "engine.batch_time", noise: bool = True) -> BatchTime:
    """Build a model from a config table such as ``{"model": "staircase", "c_ms": 11.28, ...}``.

    Missing parameters of the staircase default to the paper's fit; other models need all.  A
    ``noise`` key wraps the model in :class:`Noisy` (refused where ``noise`` is False).
    """
    spec = dict(PAPER_STAIRCASE if spec is None else spec)
    if "noise" in spec:
        table = spec.pop("noise")
        if not noise:
            raise ConfigError(f"{field}.noise", table, "omitted here: batch-time noise is for one engine "
                              "([engine.batch_time]) and the replicas of a cluster, not yet for network engines")
        return _make_noise(make_batch_time(spec, field), table, f"{field}.noise")
    model = spec.pop("model", "staircase")
    if not isinstance(model, str) or model not in _KEYS:
        raise ConfigError(f"{field}.model", model, f"one of {', '.join(_KEYS)}")
    unknown = sorted(set(spec) - set(_KEYS[model]))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", spec[unknown[0]],
                          f"a key of the {model} model: {', '.join(_KEYS[model])}")
    if model == "staircase":
        spec = {**{k: PAPER_STAIRCASE[k] for k in _KEYS[model]}, **spec}
    missing = [k for k in _KEYS[model] if k not in spec and k not in _OPTIONAL]
    if missing:
        raise ConfigError(f"{field}.{missing[0]}", None, f"required by the {model} model")
    def ms(key: str, **bound: float) -> float:
        return number(spec[key], f"{field}.{key}", **bound) / 1e3

    if model == "staircase":
        return Staircase(ms("c_ms", at_least=0), ms("a_ms", above=0), integer(spec["b0"], f"{field}.b0", 1))
    if model == "piecewise_linear":
        return PiecewiseLinear(ms("c_ms", above=0), ms("a_ms_per_token", at_least=0),
                               integer(spec["b0"], f"{field}.b0", 0))
    if model == "constant":
        return Constant(ms("duration_ms", above=0))
    if model == "prefill_decode":
        return PrefillDecode(
            ms("c_ms", at_least=0), ms("prefill_ms_per_token", at_least=0), ms("decode_ms_per_token", at_least=0),
            number(spec.get("context_ms_per_token", 0.0), f"{field}.context_ms_per_token", at_least=0) / 1e3,
            number(spec.get("prefill_fraction", 0.5), f"{field}.prefill_fraction", at_least=0, at_most=1),
            number(spec.get("mean_context_tokens", 0.0), f"{field}.mean_context_tokens", at_least=0))
    return _make_table(spec, field)


def _make_table(spec: Mapping, field: str) -> Table:
    points, extrapolate = spec["points_ms"], spec.get("extrapolate", "linear")
    if extrapolate not in EXTRAPOLATIONS:
        raise ConfigError(f"{field}.extrapolate", extrapolate, f"one of {', '.join(EXTRAPOLATIONS)}")
    shape = "a list of at least 2 [tokens, milliseconds] pairs with tokens >= 1 strictly increasing and ms > 0"
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}.points_ms", points, shape) from None
    if (arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2 or not np.isfinite(arr).all()
            or arr[0, 0] < 1 or np.any(np.diff(arr[:, 0]) <= 0) or np.any(arr[:, 1] <= 0)):
        raise ConfigError(f"{field}.points_ms", points, shape)
    return Table(arr[:, 0], arr[:, 1] / 1e3, extrapolate)
