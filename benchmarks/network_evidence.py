"""Evidence for docs/network.md (arXiv 2504.07347 §5): the tables, regenerated.

1. Rybko–Stolyar (two Sarathi engines, b_max = 768, t ≡ 1 s) at ρ = 0.9 and 0.95 under four
   per-engine policies: strict priority to the class leaving each engine, the reverse priority,
   FCFS (K-FCFS), and max-pressure; peak network backlog, its slope and the verdict per seed.
2. Topologies at 0.9 and 1.1 of the computed capacity (traffic equations), Sarathi and Orca at
   every engine: tandem, DAG, fork-join; the network verdict and which engines' backlogs grow.

    python benchmarks/network_evidence.py                  # both, 3 seeds (about 10 minutes on 2 cores)
    python benchmarks/network_evidence.py --only rs --seeds 5
    python benchmarks/network_evidence.py --quick          # short horizons, 1 seed (a smoke run)
    python benchmarks/network_evidence.py --only plot --plot docs/img/rybko_stolyar.png

Every finished run is appended to OUT/network_evidence.jsonl at once, so an interrupted run
keeps what it finished; the markdown tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmqueue.network import (
    load_network,
    network_timeseries,
    run_network,
    simulate_network,
)

RS_POLICIES = {  # name -> (scenario, --set overrides for both engines)
    "priority to the leaving class": ("rybko-stolyar", []),
    "reverse priority": ("rybko-stolyar-reverse", []),
    "fcfs (K-FCFS)": ("rybko-stolyar", ["policy=fcfs"]),
    "max-pressure": ("rybko-stolyar", ["policy=max-pressure"]),
}
TOPOLOGIES = ("tandem", "dag", "fork-join")


def engines_of(scenario: str) -> list[str]:
    return [e.name for e in load_network(scenario).engines]


def one(scenario: str, sets: list[str]) -> dict:
    t0 = time.perf_counter()
    s = run_network(load_network(scenario, sets))
    n = s["network"]
    return {"scenario": scenario, "set": sets, "verdict": n["verdict"], "peak_backlog_tokens": n["peak_backlog_tokens"],
            "slope_tokens_per_s": n["backlog_slope_tokens_per_s"], "peak_growth": n["peak_growth"],
            "bottleneck": n["bottleneck"], "max_rho": n["max_rho"], "predicted": n["predicted"],
            "violations": n["work_conserving_violations"],
            "engines": {e["engine"]: {"verdict": e["verdict"], "slope": e["backlog_slope_tokens_per_s"],
                                      "busy": e["busy_fraction"], "rho": e["rho"]} for e in s["engines"]},
            "completed": {c["class"]: c["completed"] for c in s["classes"]},
            "arrived": {c["class"]: c["arrived"] for c in s["classes"]}, "wall_s": time.perf_counter() - t0}


def run_all(args, out: Path, rows: list[dict]) -> None:
    log = out / "network_evidence.jsonl"
    log.write_text("")

    def record(row: dict) -> None:
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        print(f"  {row['experiment']:<10} {row['label']:<32} load {row['load']:<5} seed {row['seed']}: "
              f"{row['verdict']:<12} slope {row['slope_tokens_per_s']:9.1f}  ({row['wall_s']:.1f} s)", file=sys.stderr)

    seeds = range(args.seeds)
    if args.only in (None, "rs"):
        for load in (0.9, 0.95):
            for label, (scenario, per_engine) in RS_POLICIES.items():
                for seed in seeds:
                    sets = [f"network.load={load}", f"run.seed={seed}", f"run.horizon_s={args.rs_horizon}"]
                    sets += [f"engines.{e}.{x}" for e in ("S1", "S2") for x in per_engine]
                    record({"experiment": "rs", "label": label, "load": load, "seed": seed, **one(scenario, sets)})
    if args.only in (None, "topologies"):
        for scenario in TOPOLOGIES:
            for scheduler in ("sarathi", "orca"):
                for load in (0.9, 1.1):
                    for seed in seeds:
                        sets = [f"network.load={load}", f"run.seed={seed}", f"run.horizon_s={args.horizon}"]
                        sets += [f"engines.{e}.scheduler={scheduler}" for e in engines_of(scenario)]
                        record({"experiment": "topology", "label": f"{scenario} / {scheduler}", "load": load,
                                "seed": seed, **one(scenario, sets)})


def plot(args) -> None:
    """The network backlog of Rybko–Stolyar at ρ = 0.9, seed 0, one line per policy."""
    from llmqueue.plots import plot_network_backlog

    series = {}
    for label, (scenario, per_engine) in RS_POLICIES.items():
        sets = [f"run.horizon_s={args.rs_horizon}"] + [f"engines.{e}.{x}" for e in ("S1", "S2") for x in per_engine]
        series[label] = network_timeseries(simulate_network(load_network(scenario, sets)))
    path = plot_network_backlog(series, args.plot, "Rybko–Stolyar, two Sarathi engines at ρ = 0.9 (seed 0): "
                                "network backlog by per-engine policy", detail=next(iter(RS_POLICIES)))
    print(f"wrote {path}", file=sys.stderr)


def _joined(rows: list[dict], key: str, spec: str) -> str:
    return " / ".join(format(r[key], spec) for r in rows)


def _k(x: float) -> str:
    return f"{x / 1000:.0f}k" if abs(x) >= 10_000 else f"{x:.0f}"


def tables(rows: list[dict], args) -> str:
    out = []
    rs = [r for r in rows if r["experiment"] == "rs"]
    if rs:
        out.append(f"Rybko–Stolyar, two Sarathi engines (b_max = 768, t ≡ 1 s), horizon {args.rs_horizon:g} s, "
                   f"seeds 0–{args.seeds - 1}; per seed: network verdict, peak backlog (tokens), backlog slope "
                   "(tokens/s, after the warm-up), peak growth (largest backlog in the last quarter / second quarter)\n")
        out.append("| ρ | policy | verdicts | peak backlog | slope tokens/s | peak growth |")
        out.append("|---|---|---|---|---|---|")
        for load in sorted({r["load"] for r in rs}):
            for label in RS_POLICIES:
                g = [r for r in rs if r["load"] == load and r["label"] == label]
                if g:
                    out.append(f"| {load} | {label} | {', '.join(r['verdict'] for r in g)} | "
                               f"{' / '.join(_k(r['peak_backlog_tokens']) for r in g)} | "
                               f"{_joined(g, 'slope_tokens_per_s', '.1f')} | "
                               f"{_joined(g, 'peak_growth', '.2f')} |")
    top = [r for r in rows if r["experiment"] == "topology"]
    if top:
        out.append(f"\nTopologies at a fraction of the traffic equations' capacity (max ρ), horizon "
                   f"{args.horizon:g} s, seeds 0–{args.seeds - 1}; engine verdicts of seed 0, bottleneck marked *\n")
        out.append("| scenario / scheduler | max ρ | network verdicts | slope tokens/s | engines (seed 0) |")
        out.append("|---|---|---|---|---|")
        for label in dict.fromkeys(r["label"] for r in top):
            for load in (0.9, 1.1):
                g = [r for r in top if r["label"] == label and r["load"] == load]
                if not g:
                    continue
                eng = ", ".join(f"{name}{'*' if name == g[0]['bottleneck'] else ''} {e['verdict']}"
                                for name, e in g[0]["engines"].items())
                out.append(f"| {label} | {load} | {', '.join(r['verdict'] for r in g)} | "
                           f"{_joined(g, 'slope_tokens_per_s', '.1f')} | {eng} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rs-horizon", type=float, default=6000.0, help="Rybko–Stolyar horizon (batches of 1 s)")
    p.add_argument("--horizon", type=float, default=3600.0, help="topologies' horizon in seconds")
    p.add_argument("--only", choices=("rs", "topologies", "plot"))
    p.add_argument("--plot", help="also draw the Rybko–Stolyar backlogs to this PNG")
    p.add_argument("--quick", action="store_true", help="horizons of 1500 / 600 s and one seed")
    p.add_argument("--out", default="llmqueue_output/network_evidence")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.rs_horizon, args.horizon = 1, 1500.0, 600.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.plot:
        plot(args)
    if args.only == "plot":
        return 0
    try:
        run_all(args, out, rows)
    except KeyboardInterrupt:
        print("interrupted: the tables show the runs that finished", file=sys.stderr)
    print(tables(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
