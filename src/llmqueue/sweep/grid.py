"""Grids of runs: ``--grid KEY=VALUES`` axes, their cartesian product, validated configs.

An axis is a dotted config key (docs/config.md) and its values: a comma-separated list
(each item read as TOML, a bare word is a string) or a range ``start:stop:step`` that
*includes* ``stop`` when a whole number of steps reaches it (``2:20:1`` is 2, 3, ..., 20;
``0.5:1:0.2`` is 0.5, 0.7, 0.9). Every point of the grid, for every seed, is validated by
:func:`llmqueue.config.parse_config` before anything runs (docs/sweeps.md).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
import warnings
from dataclasses import dataclass
from typing import Any

from llmqueue.config import Config, parse_config, set_dotted, trace_shortfall
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.limits import check_run
from llmqueue.model.kv import make_kv
from llmqueue.model.workload import Trace
from llmqueue.runner import build_workload, check_cache

MAX_RANGE_POINTS = 100_000
#: Most runs (grid points x seeds) one sweep expands unless --max-points raises it (docs/config.md):
#: each is validated before anything runs, so a larger grid would take minutes and gigabytes first.
MAX_GRID_POINTS = 100_000
RESERVED = {"run.seed": "use --seeds to choose the seeds"}


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Point:
    """One run to do: the grid's overrides, a seed and the validated config."""

    overrides: tuple[tuple[str, Any], ...]
    seed: int
    config: Config

    @property
    def data(self) -> dict[str, Any]:
        """The resolved config (absolute paths), seed included: what a worker runs."""
        return self.config.portable()

    @property
    def config_hash(self) -> str:
        return config_hash(self.data)


def _scalar(raw: str) -> Any:
    raw = raw.strip()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _range(key: str, text: str) -> tuple[Any, ...]:
    parts = [_scalar(p) for p in text.split(":")]
    allowed = "start:stop:step with numbers, step > 0 and start <= stop (stop included)"
    if len(parts) != 3 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
        raise ConfigError(f"--grid {key}", text, allowed)
    start, stop, step = parts
    if not all(math.isfinite(p) for p in parts) or step <= 0 or start > stop:
        raise ConfigError(f"--grid {key}", text, allowed + "; this range is empty")
    count = math.floor((stop - start) / step * (1 + 1e-12) + 1e-9) + 1
    if count > MAX_RANGE_POINTS:
        raise ConfigError(f"--grid {key}", text, f"a range of at most {MAX_RANGE_POINTS} values (this one has {count})")
    if all(isinstance(p, int) for p in parts):
        return tuple(start + i * step for i in range(count))
    # 12 significant digits: 0.1 + 2 * 0.2 is written 0.5, not 0.5000000000000001.
    return tuple(float(f"{start + i * step:.12g}") for i in range(count))


def parse_axis(item: str) -> Axis:
    """``engine.token_budget=128,256`` or ``workload.rate=2:20:1`` -> an :class:`Axis`."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--grid", item, "KEY=V1,V2,... or KEY=start:stop:step with a dotted config key")
    if key in RESERVED:
        raise ConfigError("--grid", item, RESERVED[key])
    raw = raw.strip()
    if not raw:
        raise ConfigError(f"--grid {key}", raw, "at least one value")
    if raw.startswith("["):  # a TOML array: values that contain commas, e.g. inline tables
        try:
            parsed = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--grid {key}", raw, f"a TOML array of values ({exc})") from None
        if not parsed:
            raise ConfigError(f"--grid {key}", raw, "at least one value")
        return Axis(key, tuple(parsed))
    if ":" in raw and "," not in raw and not raw.startswith(('"', "'")):
        return Axis(key, _range(key, raw))
    values = [v for v in raw.split(",")]
    if any(not v.strip() for v in values):
        raise ConfigError(f"--grid {key}", raw, "a comma-separated list without empty items")
    parsed = tuple(_scalar(v) for v in values)
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--grid {key}", raw, "distinct values")
    return Axis(key, parsed)


def parse_grid(items: list[str]) -> list[Axis]:
    axes = [parse_axis(item) for item in items]
    keys = [a.key for a in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError("--grid", key, "each key once (put all its values in one --grid)")
    return axes


def grid_size(axes: list[Axis], seeds: int = 1) -> int:
    """Runs of the grid: the product of the axes' lengths times the seeds (nothing built)."""
    return math.prod(len(a.values) for a in axes) * seeds


def check_grid_size(axes: list[Axis], seeds: int, max_points: int = MAX_GRID_POINTS) -> int:
    """The grid's size, or a LlmqueueError naming it and the cap when it is larger than ``max_points``."""
    size = grid_size(axes, seeds)
    if size > max_points:
        shape = " x ".join(f"{len(a.values)} {a.key}" for a in axes) or "1 point"
        raise LlmqueueError(f"grid size = {size:,} runs ({shape} x {seeds} seed{'s' if seeds != 1 else ''}) is not "
                            f"allowed: at most {max_points:,} runs (narrow the grid, or raise the cap with "
                            f"--max-points {size})")
    return size


def expand(base: Config, axes: list[Axis], seeds: list[int], max_points: int = MAX_GRID_POINTS) -> list[Point]:
    """Every grid point for every seed, each validated; the first axis varies slowest.

    Raises a ConfigError naming the point and the bad field before anything runs, and a
    LlmqueueError when the grid has more than ``max_points`` runs (counted before any is built).
    """
    if not seeds:
        raise ConfigError("--seeds", 0, "at least one seed")
    check_grid_size(axes, len(seeds), max_points)
    data = base.portable()
    points = []
    workloads: dict[str, Any] = {}
    for combo in itertools.product(*(a.values for a in axes)):
        overrides = tuple(zip((a.key for a in axes), combo))
        for seed in seeds:
            d = copy.deepcopy(data)
            try:
                for key, value in overrides:
                    set_dotted(d, key, copy.deepcopy(value))  # a table value is never shared
                set_dotted(d, "run.seed", seed)
                config = parse_config(d, base.base_dir)
                _check_workload(config, workloads)
            except LlmqueueError as exc:
                where = ", ".join(f"{k}={_show(v)}" for k, v in overrides) or "the base config"
                raise LlmqueueError(f"grid point {where}: {exc}") from None
            points.append(Point(overrides, seed, config))
    return points


def _check_workload(config: Config, seen: dict[str, Any]) -> None:
    """Length laws and traces are checked when the workload is built, a KV cache against the
    workload's mean request, a run's size against the limits (:func:`llmqueue.limits.check_run`):
    check each distinct case once here, so that a bad one fails before any run, not in a worker.
    A ``run.requests`` larger than a trace holds is warned about."""
    kv = {k: config.engine.get(k) for k in ("kv_blocks", "block_size", "kv_policy")}
    key = json.dumps([config.workload, config.engine["token_budget"], config.engine["batch_time"], kv],
                     sort_keys=True, default=str)
    if key not in seen:
        workload = build_workload(config)
        check_cache(make_kv(config.engine), workload)
        seen[key] = (workload, len(workload.arrivals.requests) if isinstance(workload.arrivals, Trace) else None)
    workload, rows = seen[key]
    size_key = json.dumps([key, repr(config.run), config.engine], sort_keys=True, default=str)
    if size_key not in seen:
        check_run(config, workload)
        seen[size_key] = None
    if rows is not None and config.run.requests is not None and config.run.requests > rows:
        warnings.warn(trace_shortfall(config, rows))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _canonical(value: Any) -> Any:
    """Whole floats as ints, so ``rate = 2`` and ``rate = 2.0`` are the same run."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_hash(data: dict[str, Any]) -> str:
    """SHA-256 of the resolved config without its seed (the seed is a column of its own)."""
    d = copy.deepcopy(data)
    d.get("run", {}).pop("seed", None)
    text = json.dumps(_canonical(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_list(count: int, base_seed: int) -> list[int]:
    """``--seeds N``: N consecutive seeds from the config's run.seed."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError("--seeds", count, "an integer >= 1")
    return list(range(base_seed, base_seed + count))
