"""Simulator versus real engine on the same arrivals (docs/real_engine.md, Validation).

The real engine runs the config's generated requests with each scheduler; the simulator runs
the same requests with the config's batch-time model (normally a grid calibration) and, with
``refit``, also with a ``prefill_decode`` + context model fitted to the real run's own batches
(which separates the queueing model's error from the calibration's drift on a noisy
machine).  Errors are relative: (sim − real) / real.  With ``engine.kv_blocks`` both sides
have KV memory (the real engine a paged pool that mirrors the engine's memory model), and each
summary's ``kv`` block (preemptions, recomputed tokens, blocks in use) is compared too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from llmqueue.config import Config, parse_config
from llmqueue.real.fit import Fit, Samples, fit_prefill_decode, workload_mix
from llmqueue.real.serve import RealEngine
from llmqueue.runner import build_engine, build_workload, execute, generate
from llmqueue.core.simulator import Result

#: (label, getter on a summary) of the compared quantities
QUANTITIES: tuple[tuple[str, Callable[[dict], float | None]], ...] = (
    ("throughput_rps", lambda s: s["throughput_rps"]),
    ("token_throughput", lambda s: s["token_throughput"]),
    ("mean_in_system", lambda s: s["mean_in_system"]),
    ("ttft_p50_s", lambda s: s["ttft_s"]["p50"]),
    ("ttft_p90_s", lambda s: s["ttft_s"]["p90"]),
    ("e2e_p50_s", lambda s: s["e2e_s"]["p50"]),
    ("e2e_p90_s", lambda s: s["e2e_s"]["p90"]),
)


def relative_error(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real


def batch_samples(result: Result) -> Samples:
    """A real run's batches as calibration samples."""
    b = result.batches
    return Samples(b["num_prefill_tokens"].astype(float), b["num_decode_tokens"].astype(float),
                   0.0 * b["duration"], b["attention_pairs"].astype(float), b["duration"])


def refit_config(config: Config, result: Result) -> tuple[Config, Fit]:
    """``config`` with its batch time replaced by a prefill_decode + context fit to ``result``'s batches."""
    w = build_workload(config)
    fit = fit_prefill_decode(batch_samples(result), True, *workload_mix(w.mean_prompt_len, w.mean_output_len))
    data = copy.deepcopy(config.data)
    data["engine"]["batch_time"] = fit.batch_time.to_dict()
    return parse_config(data, config.base_dir), fit


def run_noise(fit: Fit, result: Result) -> dict:
    """The run's batch times around the fit as an ``[engine.batch_time] noise`` table: cv and lag-1
    correlation of ln(measured / fitted) over the batches in order (docs/real_engine.md, "Batch-time
    noise"); successive real batches are slow or fast together, which independent noise misses."""
    from llmqueue.real.machine import predicted_batch_seconds

    measured = result.batches["duration"]
    fitted = predicted_batch_seconds(fit.batch_time, result.batches)
    ok = (measured > 0) & (fitted > 0)
    x = np.log(measured[ok] / fitted[ok])
    if len(x) < 3 or not np.std(x) > 1e-9:   # none (rounding aside): the fit is exact
        return {}
    r = float(np.corrcoef(x[:-1], x[1:])[0, 1])
    cv = float(np.sqrt(np.expm1(np.var(x))))
    return {"cv": min(cv, 10.0), "correlation": min(max(r, 0.0), 0.999) if np.isfinite(r) else 0.0}


def scaled_config(config: Config, factor: float) -> Config:
    """``config`` with every batch time multiplied by ``factor`` (the drift's bounds)."""
    from llmqueue.real.machine import scaled

    data = copy.deepcopy(config.data)
    data["engine"]["batch_time"] = scaled(config.engine["batch_time"], factor)
    return parse_config(data, config.base_dir)


def prediction_range(config: Config, name: str, workload, requests, drift: dict) -> dict:
    """Per quantity (low, high) of the simulator with the batch times scaled by the drift's low
    and high factors (and 1): the prediction the measured drift allows."""
    values: dict[str, list[float]] = {label: [] for label, _ in QUANTITIES}
    for factor in sorted({drift["low"], 1.0, drift["high"]}):
        cfg = config if factor == 1.0 else scaled_config(config, factor)
        s = execute(cfg, build_engine(cfg, name), workload, requests).summary
        for label, get in QUANTITIES:
            v = get(s)
            if v is not None:
                values[label].append(v)
    return {label: (min(v), max(v)) if v else None for label, v in values.items()}


def validate(config: Config, engine: RealEngine, schedulers: Sequence[str], refit: bool = True,
             on_done: Callable[[dict], None] | None = None, label: str = "config", calibration=None) -> list[dict]:
    """Per scheduler: the real run's summary (with the speed probe before, during and after it),
    the simulations' summaries (``label``: the config's batch-time model; "speed": the same with
    its times scaled by the probe's speed during the run against the calibration's; "run_fit"
    with ``refit``, and "run_fit_noise": the same with the run's correlated scatter around it,
    :func:`run_noise`), their relative errors, and the range of the ``label`` simulation that the
    measured drift allows."""
    from llmqueue.real.machine import probed_run

    workload = build_workload(config)
    requests = generate(config, workload)
    rows = []
    for name in schedulers:
        real = probed_run(engine, config, name, requests, calibration=calibration)
        sims = {label: execute(config, build_engine(config, name), workload, requests)}
        drift = real.summary["real"].get("drift")
        if drift and drift.get("speed"):   # the machine's speed during the run divided out
            faster = scaled_config(config, drift["speed"])
            sims["speed"] = execute(faster, build_engine(faster, name), workload, requests)
        fit = None
        if refit:
            fitted, fit = refit_config(config, real.result)
            sims["run_fit"] = execute(fitted, build_engine(fitted, name), workload, requests)
            noise = run_noise(fit, real.result)
            if noise:   # the run fit with the run's own correlated scatter (reference interpreter)
                data = copy.deepcopy(fitted.data)
                data["engine"]["batch_time"] = {**fitted.engine["batch_time"], "noise": noise}
                noisy = parse_config(data, fitted.base_dir)
                sims["run_fit_noise"] = execute(noisy, build_engine(noisy, name), workload, requests)
        row = {"scheduler": name, "real": real.summary, "sim": {k: r.summary for k, r in sims.items()},
               "relative_error": {k: {q: relative_error(get(r.summary), get(real.summary))
                                      for q, get in QUANTITIES} for k, r in sims.items()},
               "batch_time": {label: config.engine["batch_time"],
                              **({"run_fit": {**fit.batch_time.to_dict(), "r2": fit.r2}} if fit else {}),
                              **({"run_fit_noise": noisy.engine["batch_time"]} if "run_fit_noise" in sims else {})},
               "range": {label: prediction_range(config, name, workload, requests, drift)} if drift else {},
               "drift": drift, "real_run": real, "sim_runs": sims}
        rows.append(row)
        if on_done is not None:
            on_done(row)
    return rows
