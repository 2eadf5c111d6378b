"""This machine's batch times: calibration files, the calibration cache and the speed probe
(docs/real_engine.md, "Machine-relative runs" and "Error bars").

A *calibration file* (JSON, ``kind = "llmqueue-calibration"``) holds a grid measurement of one
model on one machine: the machine (CPU, torch threads and version, timer), the model's shape,
the grid, every measured batch, and the *speed probe* timed through it.  A config uses it
through ``--batch-time FILE`` or ``engine.batch_time = {file = "cal.json"}``; the fit is redone
for the config's workload mix, so one file serves every workload of that model.  A file whose
model shape or grid does not match the run is refused with a one-line error.

``engine.batch_time = {calibration = "machine"}`` (the demo configs) asks for this machine's
calibration, cached under ``$XDG_CACHE_HOME/llmqueue`` (else ``~/.cache/llmqueue``) by machine,
model, timer and grid; a missing or stale entry is measured again (a note says why).

The probe (:class:`Probe`: three of the calibration's replayed batches) is timed through the
calibration, then before, during (every 25 batches, off the measured clock) and after each run;
its ratio to the calibration's, and the ratio of the run's own batch times to the calibration's
prediction of them, measure how far the machine drifted, split a run's batch-time error into
the machine's speed and the model's error, and bound the predictions (:func:`drift`).  numpy
only, except where a model is passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmqueue.errors import LlmqueueError
from llmqueue.files import atomic_path
from llmqueue.real.fit import Samples, fit_prefill_decode, joined, workload_mix

KIND = "llmqueue-calibration"
VERSION = 2       # 2: the probe is run-like batches (shapes), timed through the calibration
#: a cached calibration older than this is measured again
MAX_AGE_S = 24 * 3600.0
#: model fields that change batch times (not the seed, rope base or norm epsilon)
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
              "tie_embeddings", "dtype")
#: drift of the probe (after / before) or batches against calibration beyond which runs are flagged
DRIFT_LIMIT = 0.15
#: CPU time per wall second of the run below which the process was waiting for a core
CPU_WALL_LIMIT = 0.85
SAMPLE_FIELDS = ("prefill_tokens", "decode_tokens", "context_tokens", "attention_pairs", "seconds")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmqueue"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_of(threads: int, timer: str) -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "timer": timer}


def shape_of(model_config) -> dict:
    d = asdict(model_config)
    return {k: d[k] for k in SHAPE_KEYS}


def describe_shape(shape: dict) -> str:
    return (f"hidden {shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']}/"
            f"{shape['num_kv_heads']} heads, MLP {shape['intermediate_size']}, vocab {shape['vocab_size']}, "
            f"{shape['dtype']}")


# ---- the speed probe ----------------------------------------------------------------------

#: probe instances timed right before and right after a run
PROBE_REPEATS = 5
#: batches of a probe: from the calibration's replayed batches at these loads (the ones runs near
#: capacity form), at these quantiles of their token counts
PROBE_LOADS = (0.75, 0.9)
PROBE_QUANTILES = (0.3, 0.6, 0.9)


def point_shape(point) -> tuple:
    """A grid point (P, D, K[, C]) as a batch shape (:func:`llmqueue.real.calibrate.replay_shapes`)."""
    p, d, k = point[:3]
    c = point[3] if len(point) > 3 else 0
    return ((((p, c),) if p else ()), (k,) * d)


def probe_points(token_budget: int, max_position: int) -> list[tuple[int, int, int]]:
    """(P, D, K): a full-ish prefill, a decode batch, and a mix; all within the budget (the probe
    when there are no replayed batches: a trace's workload, a calibration from a grid or a run)."""
    p = max(1, min(token_budget // 2, max_position // 2))
    d = max(1, min(16, token_budget // 4))
    k = max(1, min(64, max_position // 4))
    return [(p, 0, 0), (0, d, k), (max(1, p // 4), max(1, d // 2), k)]


def probe_shapes(replayed: list, loads: list[float], batches: int) -> list[tuple]:
    """Run-like probe batches: of the replayed batches at :data:`PROBE_LOADS` (``batches`` per load, in
    ``loads``' order), those at :data:`PROBE_QUANTILES` of their token counts."""
    grouped = len(replayed) == len(loads) * batches
    pool = [s for i, load in enumerate(loads) if load in PROBE_LOADS for s in replayed[i * batches:(i + 1) * batches]]
    pool = pool if grouped and pool else list(replayed)
    ranked = sorted(pool, key=lambda s: (sum(n for n, _ in s[0]) + len(s[1]), s))
    return [ranked[min(len(ranked) - 1, int(q * len(ranked)))] for q in PROBE_QUANTILES]


def _shape_list(shapes) -> list:
    return [[[list(c) for c in pre], list(dec)] for pre, dec in shapes]


def _shape_tuples(shapes) -> list[tuple]:
    return [(tuple((int(n), int(c)) for n, c in pre), tuple(int(k) for k in dec)) for pre, dec in shapes]


class Probe:
    """A few run-like batches on their own KV pool, timed together now and again (each call is one
    instance) during a calibration and a run, off the measured clock: their times against the
    calibration's divide the machine's speed out of a comparison (docs/real_engine.md, "Error bars")."""

    def __init__(self, model, timer, shapes) -> None:
        from llmqueue.real.calibrate import batch_layout, check_positions
        from llmqueue.real.kvcache import KVPool

        self.model, self.timer, self.shapes = model, timer, _shape_tuples(shapes)
        check_positions(model, self.shapes)
        capacity, self.batches = batch_layout(self.shapes)
        self.pool = KVPool(model.config, capacity)
        self.times: list[list[float]] = []
        self.at: list[float] = []          # the caller's clock at each instance (a run's measured time)
        self.wall = self.cpu = 0.0
        self.model.forward(self.batches[0], self.pool.k, self.pool.v)   # warm-up

    def __call__(self, at: float | None = None) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        row = []
        for chunks in self.batches:
            began = self.timer()
            self.model.forward(chunks, self.pool.k, self.pool.v).argmax(-1)
            row.append(self.timer() - began)
        self.times.append(row)
        self.at.append(float(len(self.at) if at is None else at))
        self.wall += time.perf_counter() - wall
        self.cpu += time.thread_time() - cpu

    def repeat(self, n: int = PROBE_REPEATS) -> dict:
        for _ in range(n):
            self()
        return self.record()

    def record(self, since: int = 0) -> dict:
        """The instances from ``since`` on: shapes, seconds (median per shape), every instance."""
        times = self.times[since:]
        return {"shapes": _shape_list(self.shapes),
                "seconds": np.median(np.asarray(times), axis=0).tolist() if times else [],
                "times": [list(r) for r in times], "at": self.at[since:],
                "cpu_per_wall": self.cpu / self.wall if self.wall > 0 else 1.0}


def probe_ratio(now: dict, reference: dict) -> float:
    """The probe's batches now against the reference, their median seconds summed (> 1: the
    machine is slower now)."""
    return float(np.sum(now["seconds"]) / np.sum(reference["seconds"]))


def probe_series(during: dict, reference: dict) -> list[list[float]]:
    """[clock, ratio] of each probe instance of a run against the reference."""
    total = float(np.sum(reference["seconds"]))
    return [[t, float(np.sum(row)) / total] for t, row in zip(during["at"], during["times"])]


# ---- calibration files -------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """A grid measurement of one model on one machine."""

    machine: dict
    shape: dict
    grid: dict          # prefill, decode, context lists and max_tokens
    samples: Samples
    probe: dict
    created_unix: float
    source: str = ""    # the file it was read from, for messages

    def to_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "created_unix": self.created_unix, "machine": self.machine,
                "model": self.shape, "grid": self.grid, "probe": self.probe,
                "samples": {f: getattr(self.samples, f).tolist() for f in SAMPLE_FIELDS}}

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def batch_time(self, mean_prompt_len: float, mean_output_len: float) -> dict:
        """The prefill_decode + context fit for a workload's mix, as an ``[engine.batch_time]`` table."""
        fit = fit_prefill_decode(self.samples, True, *workload_mix(mean_prompt_len, mean_output_len))
        return fit.batch_time.to_dict()

    def check(self, shape: dict, token_budget: int, machine: dict | None = None) -> list[str]:
        """Raise when the file cannot time this run; return notes on a different machine."""
        name = self.source or "calibration"
        if shape != self.shape:
            raise LlmqueueError(f"{name}: calibrated for a different model ({describe_shape(self.shape)}); "
                                f"this run's model is {describe_shape(shape)}: calibrate this one "
                                f"(llmqueue calibrate --config CONFIG)")
        if token_budget > self.grid["max_tokens"]:
            raise LlmqueueError(f"{name}: its grid covers batches up to {self.grid['max_tokens']} tokens, the "
                                f"config's engine.token_budget is {token_budget}: calibrate with "
                                f"--max-tokens {token_budget}")
        notes = []
        if machine is not None:
            differ = [k for k in ("cpu", "threads", "torch", "timer") if self.machine.get(k) != machine[k]]
            if differ:
                notes.append(f"{name} was measured on another machine or setup ("
                             + ", ".join(f"{k} {self.machine.get(k)!r}, here {machine[k]!r}" for k in differ)
                             + "): its times may not hold here")
        return notes


def read_calibration(path: str | Path) -> Calibration:
    """A calibration file, or a one-line error naming what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise LlmqueueError(f"{p}: no such calibration file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LlmqueueError(f"{p}: not a calibration file (JSON from llmqueue calibrate): "
                            f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise LlmqueueError(f"{p}: not a calibration file (JSON with kind = {KIND!r}, from llmqueue calibrate)")
    if data.get("version") != VERSION:
        raise LlmqueueError(f"{p}: calibration file version {data.get('version')!r}, this llmqueue reads "
                            f"version {VERSION}: calibrate again")
    try:
        s = data["samples"]
        cols = [np.asarray(s[f], dtype=float) for f in SAMPLE_FIELDS]
        if len({len(c) for c in cols}) != 1 or len(cols[0]) < 4 or not all(np.all(np.isfinite(c)) for c in cols) \
                or np.any(cols[-1] <= 0):
            raise ValueError("samples")
        grid = data["grid"]
        int(grid["max_tokens"])
        shape = {k: data["model"][k] for k in SHAPE_KEYS}
        machine, probe_ = dict(data["machine"]), dict(data["probe"])
        if len(_shape_tuples(probe_["shapes"])) != len(probe_["seconds"]) or not all(
                np.isfinite(x) and x > 0 for x in probe_["seconds"]):
            raise ValueError("probe")
        created = float(data["created_unix"])
    except (KeyError, TypeError, ValueError):
        raise LlmqueueError(f"{p}: a damaged calibration file (samples, grid, model, machine or probe missing or "
                            f"invalid): calibrate again") from None
    return Calibration(machine, shape, grid, Samples(*cols), probe_, created, str(p))


def read_batch_time_file(path: str | Path) -> tuple[dict, Calibration | None]:
    """``--batch-time FILE``: a calibration file (JSON), or a TOML ``[engine.batch_time]`` table
    (as ``calibrate`` writes; unchecked: it names no model).  Returns (table or {}, calibration)."""
    p = Path(path)
    if not p.is_file():
        raise LlmqueueError(f"{p}: no such batch-time file (a calibration.json or a batch_time.toml "
                            f"from llmqueue calibrate)")
    if p.suffix.lower() != ".toml":
        return {}, read_calibration(p)
    from llmqueue.config import parse_toml

    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise LlmqueueError(f"{p}: not a readable UTF-8 TOML file") from None
    data = parse_toml(text, str(p))
    table = data.get("engine", {}).get("batch_time") if isinstance(data.get("engine"), dict) else None
    table = table if table is not None else (data if "model" in data else None)
    if not isinstance(table, dict):
        raise LlmqueueError(f"{p}: no [engine.batch_time] table (a batch_time.toml from llmqueue calibrate)")
    return dict(table), None


# ---- the cache -----------------------------------------------------------------------------

def cache_key(machine: dict, shape: dict, grid: dict) -> str:
    blob = json.dumps({"machine": machine, "model": shape, "grid": grid, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(machine: dict, shape: dict, grid: dict) -> Path:
    return cache_dir() / f"calibration-{shape['hidden_size']}x{shape['num_layers']}-{cache_key(machine, shape, grid)}.json"


def cached(machine: dict, shape: dict, grid: dict, now: float | None = None) -> tuple[Calibration | None, str]:
    """This machine's cached calibration for (model, grid), or None and why it is not usable."""
    path = cache_path(machine, shape, grid)
    if not path.exists():
        return None, f"no calibration of this machine for this model in {cache_dir()} yet"
    try:
        cal = read_calibration(path)
    except LlmqueueError as exc:
        return None, f"the cached calibration is unusable ({exc})"
    if cal.machine != machine or cal.shape != shape or cal.grid != grid:
        return None, f"the cached calibration {path} was measured on another machine or setup"
    age = (time.time() if now is None else now) - cal.created_unix
    if age > MAX_AGE_S:
        return None, f"the cached calibration is {age / 3600:.0f} h old (at most {MAX_AGE_S / 3600:.0f} h)"
    return cal, f"this machine's calibration from {age / 60:.0f} min ago ({path})"


# ---- drift ---------------------------------------------------------------------------------

def predicted_batch_seconds(batch_time, batches: dict) -> np.ndarray:
    """What ``batch_time`` gives each recorded batch (by its mix when the model has one)."""
    from llmqueue.model.batch_time import PrefillDecode

    p, d = batches["num_prefill_tokens"].astype(float), batches["num_decode_tokens"].astype(float)
    if isinstance(batch_time, PrefillDecode):
        return batch_time.c + batch_time.prefill * p + batch_time.decode * d \
            + batch_time.context * batches["attention_pairs"].astype(float)
    return np.asarray(batch_time.seconds((p + d).astype(np.int64)), dtype=float)


def drift(before: dict | None, after: dict | None, reference: dict | None, run_ratio: float | None,
          cpu_per_wall: float | None, rho: float, during: dict | None = None) -> dict:
    """How far the machine moved: the speed probe before, during and after the run against the
    calibration's probe, the run's batches against the calibration's prediction of them, CPU per
    wall second.  The range [low, high] of these factors scales the batch times; ρ scales with it.
    ``speed`` (the probe during the run, else the mean of before and after) is the factor that
    divides the machine's speed out (``engine validate``'s speed-corrected column)."""
    factors = {}
    series = None
    if reference is not None:
        if before is not None:
            factors["probe_before"] = probe_ratio(before, reference)
        if during is not None and during["times"]:
            factors["probe_during"] = probe_ratio(during, reference)
            series = probe_series(during, reference)
        if after is not None:
            factors["probe_after"] = probe_ratio(after, reference)
    instances = {k: [r for _, r in probe_series(v, reference)] for k, v in (("before", before), ("after", after))
                 if reference is not None and v is not None and v.get("times")}
    speed = factors.get("probe_during")
    if speed is None and "probe_before" in factors and "probe_after" in factors:
        speed = (factors["probe_before"] + factors["probe_after"]) / 2
    if run_ratio is not None and np.isfinite(run_ratio):
        factors["run_batches"] = float(run_ratio)
    values = list(factors.values()) or [1.0]
    low, high = min(1.0, *values), max(1.0, *values)
    reasons = []
    if before is not None and after is not None:
        change = probe_ratio(after, before) - 1
        if abs(change) > DRIFT_LIMIT:
            reasons.append(f"the probe changed by {change * 100:+.0f} % during the run")
    if "run_batches" in factors and abs(factors["run_batches"] - 1) > DRIFT_LIMIT:
        reasons.append(f"the run's batches took {factors['run_batches']:.2f}x the batch-time model's times")
    if cpu_per_wall is not None and cpu_per_wall < CPU_WALL_LIMIT:
        reasons.append(f"it got {cpu_per_wall:.2f} s of CPU per wall second (the machine was busy)")
    # the run's batches against the calibration, split: the machine's speed (the probe) times the
    # batch-time model's own error on the run's batches at the calibration's speed
    model = factors["run_batches"] / speed if speed and "run_batches" in factors else None
    return {**factors, "speed": speed, "model_error": model, "cpu_per_wall": cpu_per_wall, "low": low, "high": high,
            "rho_low": rho * low, "rho_high": rho * high, "changed": bool(reasons), "reasons": reasons,
            **({"probe_series": series} if series is not None else {}),
            **({"probe_instances": instances} if instances else {})}


def predicted_verdict(d: dict, work_conserving: bool) -> str:
    """Theorem 2's verdict over the drift's range of ρ: "stable", "unstable", or "near capacity"
    when the range straddles 1 (no confident answer)."""
    if not work_conserving:
        return "-"
    if d["rho_high"] < 1:
        return "stable"
    if d["rho_low"] > 1:
        return "unstable"
    return "near capacity"


def drift_line(name: str, d: dict, work_conserving: bool) -> str:
    parts = [f"{k.replace('_', ' ')} {d[k]:.2f}x" for k in ("probe_before", "probe_during", "probe_after",
                                                             "run_batches") if k in d]
    if d.get("model_error") is not None and parts:
        parts[-1] += f" (= machine speed {d['speed']:.2f}x × batch-time model {d['model_error']:.2f}x)"
    cpu = "" if d["cpu_per_wall"] is None else f"; CPU/wall {d['cpu_per_wall']:.2f}"
    verdict = predicted_verdict(d, work_conserving)
    line = (f"{name}: drift against the calibration: {', '.join(parts) or 'not measured'}{cpu}; ρ "
            f"{d['rho_low']:.3f}–{d['rho_high']:.3f}" + ("" if verdict == "-" else f", Theorem 2: {verdict}"))
    if d["changed"]:
        line += "; MACHINE CHANGED, compare with care: " + "; ".join(d["reasons"])
    return line


def scaled(table: dict, factor: float) -> dict:
    """An ``[engine.batch_time]`` table with every time multiplied by ``factor``."""
    out = dict(table)
    for k, v in table.items():
        if k.endswith("_ms") or "_ms_" in k:
            out[k] = [[t, ms * factor] for t, ms in v] if isinstance(v, list) else v * factor
    return out


# ---- resolving an engine config's batch time ----------------------------------------------

@dataclass(frozen=True)
class Resolved:
    """An engine config with its batch time settled, and where that came from."""

    config: object          # llmqueue.config.Config
    label: str              # "config", "file" or "machine": the simulator column's name
    notes: tuple[str, ...]
    calibration: Calibration | None


def resolve(data: dict, base_dir: Path, engine, batch_time_file: str | None = None,
            recalibrate: bool = False, progress=None) -> Resolved:
    """Settle ``engine.batch_time`` for a run on ``engine`` (a RealEngine): ``--batch-time FILE``
    first, then ``--recalibrate`` (measure now and refresh the cache), then the config's
    ``{file = ...}`` or ``{calibration = "machine"}``, else the config's own table."""
    import copy

    from llmqueue.config import parse_config
    from llmqueue.model.batch_time import PAPER_STAIRCASE
    from llmqueue.real import batch_time_source
    from llmqueue.runner import build_workload

    if batch_time_file is not None and recalibrate:
        raise LlmqueueError("--batch-time and --recalibrate: choose one (a file's batch times, or a fresh "
                            "measurement of this machine)")
    data = copy.deepcopy(data)
    spec = batch_time_source(data)
    if batch_time_file is not None:
        spec, where = {"file": batch_time_file}, Path.cwd()
    else:
        where = base_dir
    if recalibrate:
        spec = {"calibration": "machine"}
    if spec is None:
        return Resolved(parse_config(data, base_dir), "config", (), None)
    data["engine"]["batch_time"] = dict(PAPER_STAIRCASE)    # stands in until the lengths are known
    cfg = parse_config(data, base_dir)
    w = build_workload(cfg)
    budget = cfg.engine["token_budget"]
    settings = engine.settings
    machine = machine_of(settings.threads, settings.timer)
    shape = shape_of(engine.model.config)
    notes: list[str] = []
    if "file" in spec:
        path = Path(spec["file"])
        path = path if path.is_absolute() else where / path
        table, cal = read_batch_time_file(path)
        if cal is not None:
            notes += cal.check(shape, budget, machine)
            age = time.time() - cal.created_unix
            if age > MAX_AGE_S:
                raise LlmqueueError(f"{path}: a stale calibration, measured {age / 3600:.0f} h ago (at most "
                                    f"{MAX_AGE_S / 3600:.0f} h): measure again (engine run --recalibrate)")
            table = cal.batch_time(w.mean_prompt_len, w.mean_output_len)
        label = "file"
    else:
        from llmqueue.real.calibrate import replay_spec, run_grid

        grid = run_grid(w.mean_prompt_len, w.mean_output_len, budget)
        spec = replay_spec(cfg)
        if spec is not None:
            grid["replay"] = spec
        cal, why = (None, "--recalibrate") if recalibrate else cached(machine, shape, grid)
        if cal is None:
            notes.append(f"calibrating this machine ({why}): a grid of batches, then cached")
            cal = measure_calibration(engine, grid, machine, progress=progress)
            cal.write(cache_path(machine, shape, grid))
            notes.append(f"wrote {cache_path(machine, shape, grid)}")
        else:
            notes.append(f"batch times: {why}")
        table = cal.batch_time(w.mean_prompt_len, w.mean_output_len)
        label = "machine"
    data["engine"]["batch_time"] = table
    return Resolved(parse_config(data, base_dir), label, tuple(notes), cal)


def measure_calibration(engine, grid: dict, machine: dict, repeats: int = 3, progress=None) -> Calibration:
    """Time ``grid`` on ``engine``'s model now; with ``grid["replay"]``, also the batches its
    scheduler forms in simulated runs timed by the grid's fit (docs/real_engine.md, "Calibration
    that transfers"), whose samples join the grid's.  The speed probe (:class:`Probe`: a few of the
    replayed batches, else :func:`probe_points`) is timed through the replay (else the grid) and
    :data:`PROBE_REPEATS` times at the end: the calibration's reference speed."""
    from llmqueue.real.calibrate import grid_points, measure, measure_batches, replay_fit, replay_shapes
    from llmqueue.real.serve import TIMERS

    model, timer = engine.model, TIMERS[engine.settings.timer]
    points = grid_points(grid["prefill"], grid["decode"], grid["context"], grid["max_tokens"], grid.get("cached", ()))
    replay = grid.get("replay")
    extra = 0 if replay is None else len(replay["loads"]) * replay["batches"] * repeats   # at most
    on_grid = None if progress is None else (lambda done, total: progress(done, total + extra))
    if replay is None:
        speed = Probe(model, timer, [point_shape(p) for p in probe_points(grid["max_tokens"], model.config.max_position)])
        samples = measure(model, points, timer, repeats=repeats, seed=0, progress=on_grid, between=speed)
    else:
        samples = measure(model, points, timer, repeats=repeats, seed=0, progress=on_grid)
        first = len(points) * repeats
        on_batches = None if progress is None else (lambda done, total: progress(first + done, first + total))
        shapes = replay_shapes(replay, replay_fit(replay, samples).batch_time.to_dict())
        speed = Probe(model, timer, probe_shapes(shapes, replay["loads"], replay["batches"]))
        samples = joined(samples, measure_batches(model, shapes, timer, repeats=repeats, seed=1, progress=on_batches,
                                                  between=speed))
    speed.repeat()
    return Calibration(machine, shape_of(model.config), grid, samples, speed.record(), time.time())


def _probe_reference(calibration: Calibration | None, batch_time, shapes) -> dict:
    """The calibration's own probe, or (no calibration file) what the config's model predicts for it."""
    from llmqueue.real.calibrate import shape_pairs

    if calibration is not None and _shape_tuples(calibration.probe["shapes"]) == _shape_tuples(shapes):
        return calibration.probe
    batches = {"num_prefill_tokens": np.array([sum(n for n, _ in pre) for pre, _ in shapes], dtype=float),
               "num_decode_tokens": np.array([len(dec) for _, dec in shapes], dtype=float),
               "attention_pairs": np.array([shape_pairs(s) for s in shapes], dtype=float)}
    return {"shapes": _shape_list(shapes), "seconds": predicted_batch_seconds(batch_time, batches).tolist()}


def probed_run(engine, config, scheduler: str, requests, progress=None, calibration: Calibration | None = None):
    """``engine.run`` with the speed probe timed before, every :data:`~llmqueue.real.calibrate.PROBE_EVERY`
    batches during (off the measured clock; not with ``clock = "wall"``, whose arrivals it would
    delay) and after it; the summary's ``real.drift`` says how far the machine moved against the
    calibration (not with ``clock = "model"``, whose times are the model's)."""
    from llmqueue.real.serve import TIMERS
    from llmqueue.runner import batch_time_of

    if engine.settings.clock == "model":
        return engine.run(config, scheduler, requests, progress)
    model, timer = engine.model, TIMERS[engine.settings.timer]
    if calibration is not None:
        shapes = _shape_tuples(calibration.probe["shapes"])
    else:
        shapes = [point_shape(p) for p in probe_points(config.engine["token_budget"], model.config.max_position)]
    speed = Probe(model, timer, shapes)
    before = speed.repeat()
    start = len(speed.times)
    wall, cpu = time.perf_counter(), time.thread_time()
    run = engine.run(config, scheduler, requests, progress, between=None if engine.settings.clock == "wall" else speed)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    during = speed.record(start) if len(speed.times) > start else None
    start = len(speed.times)
    speed.repeat()
    after = speed.record(start)
    batch_time = batch_time_of(config)
    b = run.result.batches
    predicted = float(predicted_batch_seconds(batch_time, b).sum()) if len(b["duration"]) else 0.0
    ratio = float(b["duration"].sum()) / predicted if predicted > 0 else None
    reference = _probe_reference(calibration, batch_time, shapes)
    d = drift(before, after, reference, ratio, cpu / wall if wall > 0 else None, run.analysis.rho, during)
    run.summary["real"]["drift"] = d
    verdict = predicted_verdict(d, run.summary["work_conserving_claimed"])
    if verdict == "near capacity" and run.summary["predicted"] in ("stable", "unstable"):
        # Theorem 2 is not confident when the drift's range of ρ straddles 1
        run.summary["predicted"] = f"near capacity (ρ {d['rho_low']:.2f}–{d['rho_high']:.2f} with the drift)"
    return run
