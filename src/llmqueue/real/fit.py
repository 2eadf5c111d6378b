"""Fitting batch-time models to measured batches (docs/real_engine.md, Calibration).

Input: :class:`Samples`, one row per measured batch — prefill tokens P, decode tokens D,
attention pairs (see :func:`llmqueue.model.batch_time.attention_pairs`) and seconds.  Fitted:

* ``staircase``        t = c + a·⌈(P+D)/b0⌉, b0 the best divisor of the token budget;
* ``piecewise_linear`` t = c + a·max(0, P+D−b0), b0 the best knee on the token grid;
* ``table``            the median time at each measured token count, made non-decreasing
                       (isotonic), interpolated;
* ``prefill_decode``   t = c + p·P + d·D (the mix-aware model), and with ``+ x·pairs``.

Coefficients are non-negative least squares (the configs require them >= 0).  R² is over
every sample, token-only models predicting from P + D alone.  numpy/scipy only.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from llmqueue.files import atomic_path
from llmqueue.model.batch_time import (
    BatchTime,
    PiecewiseLinear,
    PrefillDecode,
    Staircase,
    Table,
)
from llmqueue.errors import LlmqueueError

SAMPLE_COLUMNS = ("prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs", "seconds")
#: a real run's batches.csv (``llmqueue engine run``) can be fitted too
BATCHES_COLUMNS = ("num_prefill_tokens", "num_decode_tokens", "attention_pairs", "duration")
#: Largest samples CSV read (bytes): a calibration grid is a few thousand rows (docs/config.md).
MAX_SAMPLES_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Samples:
    """Measured batches; ``context_tokens`` is the decode requests' context (for the record)."""

    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    context_tokens: np.ndarray
    attention_pairs: np.ndarray
    seconds: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.prefill_tokens + self.decode_tokens

    def __len__(self) -> int:
        return len(self.seconds)

    @classmethod
    def from_rows(cls, rows) -> Samples:
        arr = np.asarray(rows, dtype=float).reshape(-1, len(SAMPLE_COLUMNS))
        return cls(*(arr[:, j] for j in range(len(SAMPLE_COLUMNS))))

    def write_csv(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(SAMPLE_COLUMNS)
            for row in zip(*(getattr(self, c) for c in SAMPLE_COLUMNS)):
                w.writerow([int(x) if i < 4 else float(x) for i, x in enumerate(row)])

    @classmethod
    def read_csv(cls, path: str | Path) -> Samples:
        """A samples CSV (or a real run's batches.csv); anything else, e.g. a binary file, a
        device or a row that is not numbers, is one LlmqueueError naming the file."""
        from llmqueue.checks import check_input_file

        p = Path(path)
        need = (f"a samples CSV needs the columns {', '.join(SAMPLE_COLUMNS)} "
                f"(or a real run's batches.csv: {', '.join(BATCHES_COLUMNS)})")
        check_input_file(p, "--samples", "CSV file", MAX_SAMPLES_BYTES)
        try:
            with p.open("rb") as f:
                raw = f.read(MAX_SAMPLES_BYTES + 1)
        except OSError as exc:
            raise LlmqueueError(f"--samples {path}: cannot be read ({exc.strerror or exc})") from None
        if len(raw) > MAX_SAMPLES_BYTES:
            raise LlmqueueError(f"--samples {path}: larger than {MAX_SAMPLES_BYTES // 2**20} MB: {need}")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LlmqueueError(f"--samples {path}: not a UTF-8 text file (byte {exc.start} is "
                                f"{raw[exc.start]:#04x}): {need}") from None
        if "\0" in text:
            raise LlmqueueError(f"--samples {path}: not a text file (it holds NUL bytes): {need}")
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise LlmqueueError(f"--samples {path}: not a readable CSV ({exc}): {need}") from None
        if rows and all(c in rows[0] for c in BATCHES_COLUMNS):   # a real run's batches.csv
            rows = [{"prefill_tokens": r["num_prefill_tokens"], "decode_tokens": r["num_decode_tokens"],
                     "context_tokens": 0, "attention_pairs": r["attention_pairs"], "seconds": r["duration"]}
                    for r in rows]
        missing = [c for c in SAMPLE_COLUMNS if rows and c not in rows[0]]
        if not rows or missing:
            raise LlmqueueError(f"{path}: {need}")
        values = []
        for line, r in enumerate(rows, start=2):
            try:
                row = [float(r[c]) for c in SAMPLE_COLUMNS]
            except (TypeError, ValueError):
                bad = next(c for c in SAMPLE_COLUMNS if not _is_number(r[c]))
                raise LlmqueueError(f"--samples {path}: line {line}: {bad} = {r[bad]!r} is not allowed: a finite "
                                    "number >= 0") from None
            if not all(math.isfinite(x) and x >= 0 for x in row):
                bad = next(c for c, x in zip(SAMPLE_COLUMNS, row) if not (math.isfinite(x) and x >= 0))
                raise LlmqueueError(f"--samples {path}: line {line}: {bad} = {r[bad]!r} is not allowed: a finite "
                                    "number >= 0")
            values.append(row)
        return cls.from_rows(values)


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Fit:
    """One fitted model: its batch time, R² over the samples, residuals (seconds, measured − fit)."""

    name: str
    batch_time: BatchTime
    r2: float
    residuals: np.ndarray
    heldout_rmse: float | None = None   # seconds, k-fold (:func:`heldout_rmse`); None when not computed

    def to_dict(self) -> dict:
        return {"name": self.name, "r2": self.r2, "rmse_ms": float(np.sqrt(np.mean(self.residuals ** 2)) * 1e3),
                "heldout_rmse_ms": None if self.heldout_rmse is None else self.heldout_rmse * 1e3,
                "batch_time": self.batch_time.to_dict()}


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 0.0


def _nnls(columns: list[np.ndarray], y: np.ndarray) -> list[float]:
    a = np.column_stack(columns).astype(float)
    scale = np.where(a.max(axis=0) > 0, a.max(axis=0), 1.0)   # conditioning: columns of similar size
    coef, _ = nnls(a / scale, y)
    return [float(x) for x in coef / scale]   # plain floats: they go into TOML and JSON


def _fit(name: str, model: BatchTime, y: np.ndarray, predicted: np.ndarray) -> Fit:
    return Fit(name, model, r_squared(y, predicted), y - predicted)


def fit_staircase(s: Samples, token_budget: int) -> Fit:
    b, y = s.tokens, s.seconds
    best = None
    for b0 in (d for d in range(1, token_budget + 1) if token_budget % d == 0):
        steps = np.ceil(b / b0)
        c, a = _nnls([np.ones_like(b), steps], y)
        if a <= 0:
            continue
        pred = c + a * steps
        fit = _fit("staircase", Staircase(c, a, b0), y, pred)
        if best is None or fit.r2 > best.r2:
            best = fit
    if best is None:
        raise LlmqueueError("staircase fit: batch time does not grow with the token count in these samples")
    return best


def fit_piecewise_linear(s: Samples) -> Fit:
    b, y = s.tokens, s.seconds
    best = None
    for b0 in np.unique(np.concatenate(([0.0], b[b < b.max()]))):
        over = np.maximum(0.0, b - b0)
        c, a = _nnls([np.ones_like(b), over], y)
        if c <= 0:
            continue
        fit = _fit("piecewise_linear", PiecewiseLinear(c, a, int(b0)), y, c + a * over)
        if best is None or fit.r2 > best.r2:
            best = fit
    if best is None:
        raise LlmqueueError("piecewise-linear fit: no knee gives a positive intercept")
    return best


def fit_table(s: Samples) -> Fit:
    b, y = s.tokens, s.seconds
    points = np.unique(b)
    if len(points) < 2:
        raise LlmqueueError("table fit: the samples need at least 2 distinct token counts")
    medians = np.array([np.median(y[b == p]) for p in points])
    counts = np.array([np.count_nonzero(b == p) for p in points], dtype=float)
    # More tokens never take less time: noise on a shared CPU can make the medians dip, and
    # linear extrapolation from a falling last segment goes negative at large budgets.
    times = _isotonic(medians, counts)
    if points[0] > 1 and times[1] > times[0]:
        slope = (times[1] - times[0]) / (points[1] - points[0])
        if times[0] - slope * (points[0] - 1) <= 0:   # the first segment would cross zero
            points, times = np.concatenate([[1], points]), np.concatenate([[times[0]], times])
    model = Table(points.astype(int), times, "linear")
    return _fit("table", model, y, model.seconds(b))


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []            # [mean, weight, length]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, _, n in blocks])


def fit_prefill_decode(s: Samples, context: bool, prefill_fraction: float = 0.5, mean_context: float = 0.0) -> Fit:
    y = s.seconds
    cols = [np.ones_like(y), s.prefill_tokens, s.decode_tokens] + ([s.attention_pairs] if context else [])
    coef = _nnls(cols, y)
    x = coef[3] if context else 0.0
    model = PrefillDecode(coef[0], coef[1], coef[2], x, prefill_fraction, mean_context)
    pred = coef[0] + coef[1] * s.prefill_tokens + coef[2] * s.decode_tokens + x * s.attention_pairs
    return _fit("prefill_decode+context" if context else "prefill_decode", model, y, pred)


def fitters(token_budget: int, prefill_fraction: float = 0.5, mean_context: float = 0.0):
    """Every model's fitting function (samples -> Fit), in the order staircase, piecewise_linear,
    table, prefill_decode (±context)."""
    return [lambda s: fit_staircase(s, token_budget), fit_piecewise_linear, fit_table,
            lambda s: fit_prefill_decode(s, False, prefill_fraction, mean_context),
            lambda s: fit_prefill_decode(s, True, prefill_fraction, mean_context)]


def predict(batch_time: BatchTime, s: Samples) -> np.ndarray:
    """Each sample's seconds by ``batch_time``: by its mix for prefill_decode, else by its token count."""
    if isinstance(batch_time, PrefillDecode):
        return (batch_time.c + batch_time.prefill * s.prefill_tokens + batch_time.decode * s.decode_tokens
                + batch_time.context * s.attention_pairs)
    return np.asarray(batch_time.seconds(s.tokens.astype(np.int64)), dtype=float)


def subset(s: Samples, mask: np.ndarray) -> Samples:
    return Samples(*(getattr(s, c)[mask] for c in SAMPLE_COLUMNS))


def joined(*parts: Samples) -> Samples:
    """The samples of ``parts``, one after another."""
    return Samples(*(np.concatenate([getattr(s, c) for s in parts]) for c in SAMPLE_COLUMNS))


def heldout_rmse(s: Samples, fitter, folds: int = 5, seed: int = 0) -> float | None:
    """Root mean square error (seconds) of ``fitter``'s model on samples it was not fitted to:
    ``folds``-fold cross-validation over a seeded shuffle; None with too few samples or a fold
    the model cannot be fitted to."""
    n = len(s)
    if n < 2 * folds:
        return None
    order = np.random.default_rng(seed).permutation(n)
    errors = np.empty(n)
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[order[k::folds]] = True
        try:
            fit = fitter(subset(s, ~test))
        except LlmqueueError:
            return None
        errors[test] = s.seconds[test] - predict(fit.batch_time, subset(s, test))
    return float(np.sqrt(np.mean(errors ** 2)))


def fit_all(s: Samples, token_budget: int, prefill_fraction: float = 0.5, mean_context: float = 0.0,
            skipped: list[str] | None = None) -> list[Fit]:
    """Every model, in the order staircase, piecewise_linear, table, prefill_decode (±context),
    each with its held-out (5-fold) RMSE.  A token-only model that cannot be fitted (noisy
    timings that do not grow with the token count) is left out, its reason appended to
    ``skipped``; the prefill_decode fits always exist (non-negative least squares)."""
    if len(s) < 4:
        raise LlmqueueError(f"calibration needs at least 4 measured batches, got {len(s)}")
    fits = []
    for fitter in fitters(token_budget, prefill_fraction, mean_context):
        try:
            fit = fitter(s)
        except LlmqueueError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            continue
        fits.append(replace(fit, heldout_rmse=heldout_rmse(s, fitter)))
    return fits


def best_fit(fits: list[Fit]) -> Fit:
    """The model with the lowest held-out error (the highest R² where none was computed)."""
    scored = [f for f in fits if f.heldout_rmse is not None]
    return min(scored, key=lambda f: f.heldout_rmse) if scored else max(fits, key=lambda f: f.r2)


def workload_mix(mean_prompt_len: float, mean_output_len: float) -> tuple[float, float]:
    """(prefill_fraction, mean attention pairs per token) of a workload in steady state, from the
    means: prompts attend m_p(m_p+1)/2 pairs, decode tokens m_p + m_d/2 + 1 each (approximate)."""
    total = mean_prompt_len + mean_output_len
    pairs = mean_prompt_len * (mean_prompt_len + 1) / 2 + mean_output_len * (mean_prompt_len + mean_output_len / 2 + 1)
    return mean_prompt_len / total, pairs / total


def batch_time_toml(fit: Fit, header: list[str]) -> str:
    """A config fragment ``[engine.batch_time]`` that ``simulate`` and ``engine run`` accept."""
    from llmqueue.config import dumps

    lines = [f"# {h}" for h in header] + [f"# {fit.name}: R² = {fit.r2:.4f}"]
    return "\n".join(lines) + "\n" + dumps({"engine": {"batch_time": fit.batch_time.to_dict()}})
