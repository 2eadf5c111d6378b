"""The stability verdict's error rates over seeds (docs/model.md, "The stability verdict").

For each load (a fraction of Theorem 2's λ*) and horizon, runs the Fig. 1 workload with one
scheduler over seeds 0..n-1 and counts the verdicts.  Below ρ = 1 Theorem 2 says stable, so an
``unstable`` there is a false positive; above it a ``stable`` is a false negative.  Prints a
Markdown table (the one in docs/model.md).

    python benchmarks/bench_verdict.py                                # the docs' table: 20 seeds
    python benchmarks/bench_verdict.py --seeds 5 --loads 0.9,1.05 --horizons 30,1200
    python benchmarks/bench_verdict.py --scheduler orca --json counts.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from llmqueue.config import parse_config, set_dotted
from llmqueue.runner import run_config
from llmqueue.scenarios import scenario_data

LOADS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.01, 1.05, 1.3)
HORIZONS = (30.0, 120.0, 300.0, 1200.0)
VERDICTS = ("stable", "unstable", "inconclusive", "rejects")


def counts(scheduler: str, load: float, horizon: float, seeds: int) -> collections.Counter:
    out = collections.Counter()
    for seed in range(seeds):
        d = scenario_data("fig1")
        for key, value in (("engine.scheduler", scheduler), ("workload.load", load),
                           ("run.horizon_s", horizon), ("run.seed", seed)):
            set_dotted(d, key, value)
        out[run_config(parse_config(d)).summary["verdict"]] += 1
    return out


def cell(c: collections.Counter, seeds: int, load: float) -> str:
    wrong = "unstable" if load < 1 else "stable"
    parts = [f"{c[v] / seeds:.0%}" for v in ("stable", "unstable", "inconclusive")]
    text = " / ".join(parts)
    return f"**{text}**" if c[wrong] else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheduler", default="sarathi")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--loads", default=",".join(map(str, LOADS)), help="fractions of λ*, comma-separated")
    p.add_argument("--horizons", default=",".join(f"{h:g}" for h in HORIZONS), help="seconds, comma-separated")
    p.add_argument("--json", help="also write the counts here")
    a = p.parse_args(argv)
    try:
        loads = [float(x) for x in a.loads.split(",")]
        horizons = [float(x) for x in a.horizons.split(",")]
    except ValueError:
        p.error("--loads and --horizons take comma-separated numbers")
    if a.seeds < 1 or any(x <= 0 for x in (*loads, *horizons)):
        p.error("--seeds, loads and horizons must be positive")
    started = time.perf_counter()
    table = {}
    for load in loads:
        for h in horizons:
            table[(load, h)] = counts(a.scheduler, load, h, a.seeds)
            print(f"  load {load:g}, {h:g} s: {dict(table[(load, h)])}", file=sys.stderr, flush=True)
    print(f"Fig. 1 workload, {a.scheduler}, seeds 0–{a.seeds - 1}: stable / unstable / inconclusive "
          f"(bold: a wrong answer occurred)\n")
    print("| load (ρ) | " + " | ".join(f"{h:g} s" for h in horizons) + " |")
    print("|---|" + "---|" * len(horizons))
    for load in loads:
        print(f"| {load:g} | " + " | ".join(cell(table[(load, h)], a.seeds, load) for h in horizons) + " |")
    print(f"\n{len(loads) * len(horizons) * a.seeds} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if a.json:
        rows = [{"load": load, "horizon_s": h, **{v: table[(load, h)][v] for v in VERDICTS}} for load, h in table]
        Path(a.json).write_text(json.dumps({"scheduler": a.scheduler, "seeds": a.seeds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
