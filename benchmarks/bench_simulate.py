"""Benchmark: wall time and peak memory of simulated runs (docs/performance.md).

Each row is one run in a fresh subprocess (so its peak memory is its own): a scenario, a
scheduler, a number of arrivals and a simulator method.  Scenarios:

* ``fig1``        the paper's Fig. 1 workload (Poisson arrivals, Poisson lengths with means 129
                  and 112, staircase batch time, budget 512) at ``--load`` of λ*;
* ``fig1-out10``  the same with every output 10x longer (mean 1120) and the arrival rate scaled
                  down to keep the load (docs/performance.md: the compiled core's wall time per
                  request grows about 1.2-1.4x here, the reference's 4-11x);
* any other built-in single-engine scenario name (``theorem2``, ``bursty``, ``point-c``), and
  NAME-out10 for any of them.

Columns: wall s (generate + simulate + summarise), cpu s (the same span in process CPU time:
steadier than wall time on a shared machine), requests/s and events/s (arrivals + first tokens
+ completions) per wall second, batches, peak MB (the child's maximum resident set).
Methods: ``fast`` (the default: the compiled core, shown ``fast-c``, or the reference loop,
shown ``fallback``, where the core cannot run), ``reference``, and ``stream`` (no per-request
records, llmqueue.core.stream: the compiled core where it can run).

    python benchmarks/bench_simulate.py                       # fig1, 100,000 requests, every scheduler
    python benchmarks/bench_simulate.py --requests 1000000 --schedulers sarathi
    python benchmarks/bench_simulate.py --scenarios fig1,fig1-out10 --method fast,reference
    python benchmarks/bench_simulate.py --ratio --requests 1000000 --schedulers sarathi,orca --repeat 5
    python benchmarks/bench_simulate.py --smoke               # tiny, for CI (no timing claims)
    python benchmarks/bench_simulate.py --json rows.json      # also write the rows
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SCHEDULERS = "fastertransformer,vllm,orca,sarathi,vllm-v1,maxweight"


def config_for(scenario: str, scheduler: str, requests: int, load: float | None, seed: int, method: str):
    from llmqueue.config import parse_config
    from llmqueue.scenarios import scenario_data

    data = scenario_data(scenario.removesuffix("-out10"))
    scale = 10 if scenario.endswith("-out10") else 1
    if scale != 1:
        out = data["workload"]["output"]
        key = "mean" if "mean" in out else "value"
        out[key] = out[key] * scale
    if load is not None:
        data["workload"].pop("rate", None)
        data["workload"]["load"] = load
    data["engine"]["scheduler"] = scheduler
    data["run"] = {"requests": requests, "seed": seed, "method": method}
    return parse_config(data)


def one(scenario: str, scheduler: str, requests: int, load: float | None, seed: int, method: str) -> dict:
    """One run in this process; the row of the table (method "stream": no records, fast path)."""
    import numpy as np

    from llmqueue.runner import build_engine, build_workload, run_config
    from llmqueue.core.stream import request_chunks, simulate_stream

    cfg = config_for(scenario, scheduler, requests, load, seed, "fast" if method == "stream" else method)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "stream":
        s = simulate_stream(build_engine(cfg), request_chunks(build_workload(cfg), seed, num_requests=requests))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        events = s["arrived"] + s["first_tokens"] + s["completed"]
        ran = "stream"
    else:
        run = run_config(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r, s = run.result, run.summary
        events = (s["arrived"] + int(np.count_nonzero(r.first_token_time <= r.end_time))
                  + int(np.count_nonzero(r.finish_time <= r.end_time)))
        ran = r.meta.get("method", method)
        if ran == "fast":  # the compiled core ran (else "reference (why)")
            ran = "fast-c"
    return {"scenario": scenario, "scheduler": scheduler, "method": ran,
            "requests": requests, "load": cfg.workload.get("load"), "wall_s": wall, "cpu_s": cpu, "simulate_s": s["wall_s"],
            "requests_per_s": requests / wall, "events": events, "events_per_s": events / wall,
            "batches": s["batches"], "verdict": s.get("verdict", "-"), "completed": s["completed"],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


HEADER = (f"{'scenario':<14} {'scheduler':<18} {'method':<9} {'requests':>9} {'wall s':>8} {'cpu s':>7} "
          f"{'req/s':>9} {'events/s':>9} {'batches':>9} {'peak MB':>8}  verdict")


def line(row: dict) -> str:
    method = row["method"].removesuffix(" (selected)")
    method = method if method in ("fast-c", "reference", "stream") else "fallback"
    return (f"{row['scenario']:<14} {row['scheduler']:<18} {method:<9} {row['requests']:>9} "
            f"{row['wall_s']:>8.2f} {row['cpu_s']:>7.2f} {row['requests_per_s']:>9.0f} {row['events_per_s']:>9.0f} {row['batches']:>9} {row['peak_mb']:>8.0f}  "
            f"{row['verdict']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="fig1", help="comma-separated (default fig1)")
    p.add_argument("--schedulers", default=SCHEDULERS)
    p.add_argument("--method", default="fast",
                   help="fast (the compiled core where it can run), reference or stream (no per-request "
                        "records), comma-separated")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--load", type=float, default=None, help="fraction of λ* (default: 0.9, or the scenario's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per row; the table shows the fastest")
    p.add_argument("--json", default=None, help="write every run's row here as JSON")
    p.add_argument("--smoke", action="store_true", help="2,000 requests, for CI (no timing claims)")
    p.add_argument("--ratio", action="store_true",
                   help="issue 5's target 2: per scheduler, alternate SCENARIO and SCENARIO-out10 runs --repeat "
                        "times and print wall time per request, x10 over x1 (best of each, and the median "
                        "of the paired runs' ratios; alternating keeps the machine's drift out of the ratio)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        scenario, scheduler, method, load = args.child
        print(json.dumps(one(scenario, scheduler, args.requests, None if load == "-" else float(load),
                             args.seed, method)))
        return
    n = 2_000 if args.smoke else args.requests
    from llmqueue.scenarios import SCENARIOS, scenario_data
    from llmqueue.schedulers import SCHEDULERS as REGISTERED

    single = [name for name in SCENARIOS if set(scenario_data(name)) <= {"engine", "workload", "run"}]
    allowed = {"--scenarios": (args.scenarios, [*single, *(f"{s}-out10" for s in single)]),
               "--schedulers": (args.schedulers, list(REGISTERED)),
               "--method": (args.method, ["fast", "reference", "stream"])}
    for flag, (given, choices) in allowed.items():
        for value in given.split(","):
            if value not in choices:
                print(f"{flag}: {value!r} is not allowed: one of {', '.join(choices)}", file=sys.stderr)
                sys.exit(2)
    if args.ratio:
        ratios(args, n)
        return
    rows: list[dict] = []
    print(HEADER, flush=True)
    try:
        for scenario in args.scenarios.split(","):
            load = args.load if args.load is not None else (0.9 if scenario.startswith("fig1") else None)
            for name in args.schedulers.split(","):
                for method in args.method.split(","):
                    best = None
                    for _ in range(args.repeat):
                        row = child(scenario, name, method, load, n, args.seed)
                        rows.append(row)
                        best = row if best is None or row["wall_s"] < best["wall_s"] else best
                    print(line(best), flush=True)
    except KeyboardInterrupt:
        print("interrupted: keeping the rows finished so far", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def child(scenario: str, name: str, method: str, load: float | None, n: int, seed: int) -> dict:
    """One row, run in a fresh process (so that its peak memory is its own)."""
    out = subprocess.run([sys.executable, __file__, "--child", scenario, name, method,
                          "-" if load is None else str(load), "--requests", str(n), "--seed", str(seed)],
                         check=False, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{scenario}/{name}/{method} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(args: argparse.Namespace, n: int) -> None:
    """Wall time per request with outputs x10 over x1, runs alternating (target 2 of issue 5)."""
    import statistics

    rows = []
    print(f"{'scenario':<14} {'scheduler':<18} {'method':<9} {'requests':>9} {'x1 s':>7} {'x10 s':>7} "
          f"{'ratio':>6} {'paired':>7}", flush=True)
    try:
        for scenario in args.scenarios.split(","):
            scenario = scenario.removesuffix("-out10")
            load = args.load if args.load is not None else (0.9 if scenario.startswith("fig1") else None)
            for name in args.schedulers.split(","):
                for method in args.method.split(","):
                    pairs = []
                    for _ in range(args.repeat):
                        one_x = child(scenario, name, method, load, n, args.seed)
                        ten_x = child(f"{scenario}-out10", name, method, load, n, args.seed)
                        rows += [one_x, ten_x]
                        pairs.append((one_x["wall_s"], ten_x["wall_s"]))
                    best1, best10 = min(p[0] for p in pairs), min(p[1] for p in pairs)
                    paired = statistics.median(b / a for a, b in pairs)
                    print(f"{scenario:<14} {name:<18} {line(one_x).split()[2]:<9} {n:>9} {best1:>7.2f} {best10:>7.2f} "
                          f"{best10 / best1:>6.2f} {paired:>7.2f}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: keeping the rows finished so far", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
