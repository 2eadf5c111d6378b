"""Simulator versus real engine on the same arrivals (docs/real_engine.md, Validation).

The simulator runs the config's batch-time model (the calibrated one); the real engine runs
the same generated requests with the same scheduler.  Errors are relative: (sim − real) / real.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmqueue.config import Config
from llmqueue.real.serve import RealEngine
from llmqueue.runner import Run, build_engine, build_workload, execute, generate

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


def validate(config: Config, engine: RealEngine, schedulers: Sequence[str],
             on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """For each scheduler: the simulated and the real run's summaries and the relative errors."""
    workload = build_workload(config)
    requests = generate(config, workload)
    rows = []
    for name in schedulers:
        sim: Run = execute(config, build_engine(config, name), workload, requests)
        real: Run = engine.run(config, name, requests)
        errors = {label: relative_error(get(sim.summary), get(real.summary)) for label, get in QUANTITIES}
        row = {"scheduler": name, "sim": sim.summary, "real": real.summary, "relative_error": errors,
               "sim_run": sim, "real_run": real}
        rows.append(row)
        if on_done is not None:
            on_done(row)
    return rows
