"""Capacity on the real engine: the largest stable rate by short real runs, next to Theorem 2's
λ* (docs/real_engine.md, "Capacity on the real engine").

Bisection on the load (a fraction of the predicted λ*): each trial is a short real run of the
config at that load, between two drift probes.  A trial's verdict is the run's own when it has
one; an ``inconclusive`` run (too short to call) counts as unstable when it arrives at more than
``1 + PLATEAU_MARGIN`` times the most that a trial the verdict called unstable served (an
overloaded work-conserving engine serves at its capacity: the served-rate plateau) and itself
served less than ``1 - PLATEAU_MARGIN`` of its arrivals; otherwise as stable when it ends with at
most ``GROWTH`` times its mean number in system, else as unstable, and says why.  The result is an interval:
the real saturation rate lies between the highest load called stable and the lowest called
unstable.  Work-conserving schedulers serve at capacity when overloaded, so the token rate of
the overloaded trials is a second, direct estimate of the real capacity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from llmqueue.config import Config, parse_config
from llmqueue.errors import LlmqueueError
from llmqueue.real.machine import probed_run
from llmqueue.runner import analysis_of, build_workload, generate

#: an inconclusive trial ending with at most this multiple of its mean number in system counts as stable
GROWTH = 1.5
#: an inconclusive trial arriving this much above the plateau, and short of its arrivals by as much, is unstable
PLATEAU_MARGIN = 0.05


def at_load(config: Config, load: float, horizon_s: float) -> Config:
    data = copy.deepcopy(config.data)
    data["workload"].pop("rate", None)
    data["workload"]["load"] = load
    data.setdefault("run", {})["horizon_s"] = horizon_s
    data["run"].pop("drain", None)
    return parse_config(data, config.base_dir)


def classify(summary: dict, arrival_rate: float, plateau: float | None = None) -> tuple[str, str]:
    """("stable" | "unstable", why) of one trial: the run's verdict; else (too short to call)
    unstable when it arrives above the served-rate ``plateau`` (the most a trial the verdict called
    unstable served) and falls short of its arrivals, both by ``PLATEAU_MARGIN``; else whether
    the number in system at the end is within ``GROWTH`` of its mean (a queue growing linearly
    from empty ends at twice its mean; a stable one near it)."""
    verdict = summary["verdict"]
    if verdict in ("stable", "unstable"):
        return verdict, f"verdict {verdict}"
    served = summary["throughput_rps"]
    if plateau is not None and arrival_rate > (1 + PLATEAU_MARGIN) * plateau \
            and served < (1 - PLATEAU_MARGIN) * arrival_rate:
        return "unstable", (f"{verdict}; served {served:.2f} of {arrival_rate:.2f} req/s, above the {plateau:.2f} "
                            "an overloaded trial served")
    final, mean = summary["final_in_system"], summary["mean_in_system"]
    side = "stable" if final <= GROWTH * mean + 1 else "unstable"
    return side, f"{verdict}; {final} in system at the end, {mean:.1f} on average"


def real_capacity(config: Config, engine, scheduler: str | None = None, low: float = 0.5, high: float = 1.2,
                  steps: int = 4, horizon_s: float = 20.0, calibration=None,
                  on_trial: Callable[[dict], None] | None = None) -> dict:
    """Bisect the load between ``low`` and ``high`` (fractions of the predicted λ*) with
    ``steps`` short real runs after checking ``high``; returns the trials and the interval."""
    if not 0 < low < high:
        raise LlmqueueError(f"--low/--high: {low}, {high} are not allowed: 0 < low < high (fractions of λ*)")
    name = scheduler or config.engine["scheduler"]
    trials: list[dict] = []

    def trial(load: float) -> str:
        cfg = at_load(config, load, horizon_s)
        workload = build_workload(cfg)
        run = probed_run(engine, cfg, name, generate(cfg, workload), calibration=calibration)
        s = run.summary
        overloaded = [t["throughput_rps"] for t in trials if t["verdict"] == "unstable"]
        side, why = classify(s, run.analysis.arrival_rate, max(overloaded) if overloaded else None)
        t = {"load": load, "arrival_rate_rps": run.analysis.arrival_rate, "side": side, "why": why,
             "verdict": s["verdict"], "throughput_rps": s["throughput_rps"], "token_throughput": s["token_throughput"],
             "final_in_system": s["final_in_system"], "drift": s["real"].get("drift"), "wall_s": s["wall_s"]}
        trials.append(t)
        if on_trial is not None:
            on_trial(t)
        return side

    lo, hi = None, None
    if trial(high) == "stable":
        lo = high
    else:
        hi = high
        a, b = low, high
        for _ in range(steps):
            mid = (a + b) / 2
            if trial(mid) == "stable":
                a = lo = mid
            else:
                b = hi = mid
    analysis = analysis_of(config, build_workload(config))
    lam = analysis.max_stable_rate_rps
    over = [t["token_throughput"] for t in trials if t["side"] == "unstable"]
    return {"scheduler": name, "predicted_lambda_star_rps": lam,
            "predicted_capacity_tokens_per_s": analysis.capacity_tokens_per_s,
            "stable_up_to_load": lo, "unstable_from_load": hi,
            "stable_up_to_rps": None if lo is None else lo * lam, "unstable_from_rps": None if hi is None else hi * lam,
            "overloaded_tokens_per_s": max(over) if over else None,
            "most_served_rps": max(t["throughput_rps"] for t in trials), "horizon_s": horizon_s, "trials": trials}
