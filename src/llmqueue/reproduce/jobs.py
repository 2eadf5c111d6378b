"""The runs behind ``llmqueue reproduce``, as tasks for the sweep executors (docs/reproduce.md).

A job is a JSON-able dict: ``kind`` = ``single`` (a single-engine config, arXiv 2504.07347 §3, §4, §6),
``network`` (a network scenario with ``--set`` overrides, arXiv 2504.07347 §5) or ``cluster`` (a
pool or prefill/decode config, docs/cluster.md), plus what to keep of
the run beyond its summary (a time series, the served (prefill, decode) rates, the steady
batch shapes).  :func:`run_job` runs one in a worker; the driver stores its outcome in the
sweep store, keyed by the job's hash, so an interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue import __version__
from llmqueue.sweep.executors import OK, Task
from llmqueue.sweep.grid import config_hash

SERIES_POINTS = 300  # grid points of a stored time series


def job_task(job: dict[str, Any], seed: int) -> Task:
    """A sweep task for ``job`` (its hash covers the package version: a new version reruns)."""
    data = {**job, "version": __version__}
    return Task(config_hash(data), seed, data, "")


def run_job(task: Task) -> dict[str, Any]:
    """Run one job (in a worker) and return the sweep outcome; its ``summary`` is the job's result."""
    start = time.perf_counter()
    job = task.data
    kinds = {"network": _network, "cluster": _cluster}
    result = kinds.get(job["kind"], _single)(job, task.seed)
    return {"status": OK, "summary": result, "error": None, "wall_s": time.perf_counter() - start,
            "version": __version__}


def _single(job: dict, seed: int) -> dict:
    from llmqueue.config import parse_config
    from llmqueue.metrics import timeseries
    from llmqueue.analysis.region import served_rates
    from llmqueue.runner import run_config

    data = {**job["config"], "run": {**job["config"].get("run", {}), "seed": seed}}
    keep = job.get("keep", [])
    if "served" in keep or "shapes" in keep:
        data["run"]["record_batches"] = True
    run = run_config(parse_config(data, Path(".")))
    out = dict(run.summary)
    out.pop("wall_s", None)  # machine-dependent: the store keeps it apart
    if "series" in keep:
        ts = timeseries(run.result, SERIES_POINTS)
        out["series"] = {"time_s": _floats(ts["time_s"]), "in_system": ts["in_system"].tolist(),
                         "backlog_tokens": ts["backlog_tokens"].tolist()}
    if "served" in keep:
        p, d = served_rates(run.result)
        out["served"] = {"prefill_tokens_per_s": p, "decode_tokens_per_s": d}
    if "shapes" in keep:
        b = run.result.batches
        late = b["start_time"] >= run.result.end_time / 2
        shapes = Counter(zip(b["num_prefill_tokens"][late].tolist(), b["num_decode_tokens"][late].tolist()))
        total = sum(shapes.values())
        out["steady_shapes"] = [{"prefill": p, "decode": d, "share": n / total} for (p, d), n in shapes.most_common(3)]
    return out


def _network(job: dict, seed: int) -> dict:
    from llmqueue.network import (
        load_network,
        network_timeseries,
        simulate_network,
        summarize_network,
    )

    net = load_network(job["source"], [*job.get("sets", []), f"run.seed={seed}"])
    result = simulate_network(net)
    out = summarize_network(result)
    out.pop("wall_s", None)
    out.pop("analysis", None)
    if "series" in job.get("keep", []):
        ts = network_timeseries(result, SERIES_POINTS)
        out["series"] = {k: _floats(v) for k, v in ts.items()}
    if "fluid" in job.get("keep", []):   # the fluid path from the run's own state (docs/network.md)
        from llmqueue.network.overlay import fluid_from_run

        fl = fluid_from_run(result)
        if fl is not None:
            model, path, t0 = fl
            engines = path.engine_tokens(model)
            out["fluid"] = {"t0_s": t0, "time_s": _floats(t0 + path.times), "outcome": path.outcome,
                            "growth_factor": path.growth_factor,
                            "total_backlog_tokens": _floats(path.remaining_tokens(model)),
                            **{f"{e}_backlog_tokens": _floats(engines[:, j]) for j, e in enumerate(model.engines)}}
    return out


def _cluster(job: dict, seed: int) -> dict:
    """A pool (docs/cluster.md) or a prefill/decode pair: its summary without wall times."""
    from llmqueue.cluster import parse_cluster, run_pool
    from llmqueue.cluster.disagg import is_disaggregated, parse_disagg, run_disagg

    data = {**job["config"], "run": {**job["config"].get("run", {}), "seed": seed}}
    out = (run_disagg(parse_disagg(data, Path("."))) if is_disaggregated(data)
           else run_pool(parse_cluster(data, Path(".")))).summary
    return _without_wall(out)


def _without_wall(value):
    """``value`` without its ``wall_s`` entries, at any depth (machine-dependent: kept apart)."""
    if isinstance(value, dict):
        return {k: _without_wall(v) for k, v in value.items() if k != "wall_s"}
    if isinstance(value, list):
        return [_without_wall(v) for v in value]
    return value


def _floats(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, dtype=float)]


__all__ = ["job_task", "run_job"]
