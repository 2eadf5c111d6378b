"""Benchmark: wall time of one simulated run per scheduler (the README's cost table).

Workload: the paper's Fig. 1 scenario (Poisson arrivals, Poisson lengths with means 129
and 112, staircase batch time, token budget 512) at load 0.9 of λ*, a fixed number of
arrivals.  Each scheduler runs in a fresh subprocess so peak memory is its own.

    python benchmarks/bench_simulate.py                 # 100,000 requests
    python benchmarks/bench_simulate.py --requests 20000 --schedulers sarathi,orca
    python benchmarks/bench_simulate.py --smoke         # tiny, for CI (no timing claims)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(scheduler: str, requests: int, load: float, seed: int) -> dict:
    from llmqueue.runner import compare
    from llmqueue.scenarios import scenario_data
    from llmqueue.config import parse_config

    data = scenario_data("fig1")
    data["workload"]["load"] = load
    data["run"] = {"requests": requests, "seed": seed}
    cfg = parse_config(data)
    t0 = time.perf_counter()
    (run,) = compare(cfg, [scheduler])
    wall = time.perf_counter() - t0
    s = run.summary
    return {"scheduler": scheduler, "requests": requests, "load": load, "wall_s": wall,
            "simulate_s": run.result.wall_s, "requests_per_s": requests / wall, "batches": s["batches"],
            "verdict": s["verdict"], "completed": s["completed"],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", default="fastertransformer,vllm,orca,sarathi,vllm-v1")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    p.add_argument("--smoke", action="store_true", help="2,000 requests, for CI")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.requests, args.load, args.seed)))
        return
    n = 2_000 if args.smoke else args.requests
    rows = []
    print(f"{'scheduler':<18} {'requests':>9} {'wall s':>8} {'req/s':>9} {'batches':>8} {'peak MB':>8}  verdict")
    for name in args.schedulers.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--requests", str(n), "--load",
                              str(args.load), "--seed", str(args.seed)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:<18} {n:>9} {row['wall_s']:>8.2f} {row['requests_per_s']:>9.0f} {row['batches']:>8} "
              f"{row['peak_mb']:>8.0f}  {row['verdict']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
