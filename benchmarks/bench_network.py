"""Benchmark: network simulation speed, side by side with one engine, in one invocation.

Each run is one child process (so its peak memory is its own).  Two kinds of rows:

* ``network``: a built-in network scenario (``dag`` by default; ``--scenarios all`` for every
  one: dag, tandem, fork-join, agent-loop, rybko-stolyar, rybko-stolyar-reverse) simulated for
  ``--horizon`` simulated seconds (default 10,000) under each of ``--policies``:

  - ``config``        every engine's policy as the scenario configures it (fcfs in all but the
                      rybko-stolyar pair, which are configured ``priority``);
  - ``fcfs``          every engine set to ``fcfs``;
  - ``priority``      every engine set to strict class priority; ``class_priority`` is the
                      engine's own list where the scenario gives one, else the classes in the
                      order the scenario lists them (one group per engine in a one-class network:
                      what is measured there is the grouped planner's overhead);
  - ``max-pressure``  every engine set to ``max-pressure``.

  Columns: hop-req (sub-requests admitted to engines, ``len(result.sub_engine)``), jobs,
  batches (summed over engines), sim s (the ``simulate_network`` call: the jobs' sampling, by the
  compiled sampler on the default path, and the simulation), child s (the whole child process:
  interpreter start, imports, config, sampling, simulation), hop-req/s (hop-requests per second
  of a whole run: sampling, simulating and summarising, as the engine row's) and peak MB.
* ``engine``: the reference, one engine on the paper's Fig. 1 workload at 0.9 of λ* with
  ``--schedulers`` (default sarathi and maxweight), ``--requests`` arrivals (default 1,000,000),
  ``fast`` method (the compiled core where it can run), via bench_simulate.py's ``one()``;
  hop-req is the number of requests, req/s is per second of the whole run (generating the
  requests, simulating, summarising: bench_simulate.py's wall s).

Then the ratios the project tracks, each both from the fastest run of each row ("best") and as
the median over repeats of the ratio within one repeat ("paired"; the runs of every row
alternate, forward in even repeats and backward in odd ones, so the shared machine's drift
stays out of the paired ratio, as in bench_simulate.py --ratio):

* ``engine/network``  (one engine sarathi req/s) / (network hop-req/s), per network row;
* ``P/config``        wall time per hop-request of policy P over that of the as-configured run
                      (or of the ``fcfs`` run where one was made), per scenario;
* ``maxweight/sarathi`` wall time per request of the one-engine rows.

    python benchmarks/bench_network.py                          # dag, 3 policies, 1,000,000-request engine rows
    python benchmarks/bench_network.py --scenarios all --repeat 3
    python benchmarks/bench_network.py --scenarios dag,tandem --policies config,max-pressure --horizon 2000
    python benchmarks/bench_network.py --smoke                  # tiny, for CI (no timing claims)
    python benchmarks/bench_network.py --json runs.json         # also write every run and the ratios

Ctrl-C stops the runs: the rows and ratios of the runs finished so far are printed (and written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("config", "fcfs", "priority", "max-pressure")
DEFAULT_POLICIES = "config,priority,max-pressure"
ENGINE_SCENARIO, ENGINE_LOAD = "fig1", 0.9
SMOKE_HORIZON, SMOKE_REQUESTS = 200.0, 2_000


def bench_simulate():
    """benchmarks/bench_simulate.py as a module (its one() runs the single-engine row)."""
    spec = importlib.util.spec_from_file_location("bench_simulate", Path(__file__).with_name("bench_simulate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def network_scenarios() -> list[str]:
    from llmqueue.network import is_network_data
    from llmqueue.scenarios import SCENARIOS, scenario_data

    return [name for name in SCENARIOS if is_network_data(scenario_data(name))]


def policy_sets(scenario: str, policy: str) -> list[str]:
    """``--set`` overrides switching every engine of ``scenario`` to ``policy`` (none for ``config``)."""
    from llmqueue.network.model import read_network_data

    if policy == "config":
        return []
    data, _ = read_network_data(scenario)
    classes = [c["name"] for c in data["classes"]]
    sets = []
    for engine in data["engines"]:
        sets.append(f"engines.{engine['name']}.policy={policy}")
        if policy == "priority" and not engine.get("class_priority"):
            sets.append(f"engines.{engine['name']}.class_priority={json.dumps(classes)}")
    return sets


def network_one(scenario: str, policy: str, horizon: float, seed: int) -> dict:
    """One network run in this process; the row of the table."""
    from llmqueue.network import load_network, simulate_network

    sets = policy_sets(scenario, policy)
    net = load_network(scenario, sets)
    policies = sorted({e.policy for e in net.engines})
    from llmqueue.network import summarize_network

    # A whole run, as the engine row's: sampling the jobs (inside simulate_network: the compiled
    # sampler on the default path), simulating, summarising.
    t0, c0 = time.perf_counter(), time.process_time()
    result = simulate_network(net, seed=seed, horizon_s=horizon)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summarize_network(result)
    whole = time.perf_counter() - t0
    hops = len(result.sub_engine)
    return {"kind": "network", "scenario": scenario, "policy": policy, "engine_policies": policies, "set": sets,
            "horizon_s": horizon, "seed": seed, "hop_requests": hops, "rejected": int(result.rejected.sum()),
            "jobs": len(result.job_entry_time), "batches": sum(len(b["end_time"]) for b in result.batches),
            "generate_s": None, "jobs_sampled_first": False, "method": result.meta["method"],
            "simulate_s": wall, "simulate_cpu_s": cpu, "whole_s": whole,
            "per_s": hops / whole if whole > 0 else float("inf"),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def engine_one(scheduler: str, requests: int, seed: int) -> dict:
    """One single-engine run (bench_simulate.one, fig1 at 0.9 of λ*, fast method) in this process."""
    row = bench_simulate().one(ENGINE_SCENARIO, scheduler, requests, ENGINE_LOAD, seed, "fast")
    wall = row["simulate_s"]
    return {"kind": "engine", "scenario": ENGINE_SCENARIO, "policy": scheduler, "method": row["method"],
            "seed": seed, "hop_requests": requests, "rejected": None, "jobs": None, "batches": row["batches"],
            "generate_s": row["wall_s"] - wall, "simulate_s": wall, "simulate_cpu_s": None, "whole_s": row["wall_s"],
            "per_s": requests / row["wall_s"] if row["wall_s"] > 0 else float("inf"), "completed": row["completed"],
            "verdict": row["verdict"], "peak_mb": row["peak_mb"]}


# ---- the parent: children, table, ratios ------------------------------------------------------

def label(row: dict) -> str:
    if row["kind"] == "engine":
        return row["policy"]
    if row["policy"] == "config":
        return f"config({'/'.join(row['engine_policies'])})"
    return row["policy"]


HEADER = (f"{'kind':<8} {'scenario':<22} {'policy':<18} {'rep':>3} {'hop-req':>9} {'jobs':>8} {'batches':>9} "
          f"{'gen s':>7} {'sim s':>8} {'child s':>8} {'hop-req/s':>10} {'peak MB':>8}")


def line(row: dict) -> str:
    jobs = "-" if row["jobs"] is None else str(row["jobs"])
    gen = "-" if row["generate_s"] is None else f"{row['generate_s']:.2f}"
    return (f"{row['kind']:<8} {row['scenario']:<22} {label(row):<18} {row['repeat']:>3} {row['hop_requests']:>9} "
            f"{jobs:>8} {row['batches']:>9} {gen:>7} {row['simulate_s']:>8.2f} {row['child_s']:>8.2f} "
            f"{row['per_s']:>10.0f} {row['peak_mb']:>8.0f}")


def child(spec: tuple[str, ...], args: argparse.Namespace, horizon: float, requests: int) -> dict:
    """One run in a fresh process; child_s is its whole wall time, measured here."""
    cmd = [sys.executable, __file__, "--child", *spec, "--horizon", repr(horizon), "--requests", str(requests),
           "--seed", str(args.seed)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode:
        if out.returncode < 0 or "KeyboardInterrupt" in out.stderr:
            raise KeyboardInterrupt
        sys.exit(f"{'/'.join(spec)} failed:\n{out.stderr.strip()}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["child_s"] = elapsed
    return row


def fail(flag: str, value: object, allowed: str) -> None:
    print(f"{flag}: {value!r} is not allowed: {allowed}", file=sys.stderr)
    sys.exit(2)


def ratios(rows: list[dict], repeats: int) -> list[dict]:
    """The tracked ratios: from each row's fastest run, and the median of the within-repeat ratios."""
    runs: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        runs.setdefault((row["kind"], row["scenario"], row["policy"]), {})[row["repeat"]] = row

    def per_hop(row: dict) -> float:
        return row["simulate_s"] / max(row["hop_requests"], 1)

    def both(top: tuple, bottom: tuple, f) -> tuple[float, float] | None:
        """f(top run, bottom run): best runs, and the median over the repeats that have both."""
        a, b = runs.get(top), runs.get(bottom)
        if not a or not b:
            return None
        best = f(min(a.values(), key=per_hop), min(b.values(), key=per_hop))
        paired = [f(a[r], b[r]) for r in range(repeats) if r in a and r in b]
        return best, statistics.median(paired) if paired else float("nan")

    out = []
    sarathi = ("engine", ENGINE_SCENARIO, "sarathi")
    networks = [key for key in runs if key[0] == "network"]
    for key in networks:  # (engine req/s) / (network hop-req/s)
        r = both(sarathi, key, lambda e, n: e["per_s"] / n["per_s"])
        if r:
            out.append({"ratio": "engine/network", "of": f"{key[1]}:{label(next(iter(runs[key].values())))}",
                        "meaning": "sarathi req/s over hop-req/s", "best": r[0], "paired": r[1]})
    for scenario in dict.fromkeys(key[1] for key in networks):
        base = next((("network", scenario, p) for p in ("fcfs", "config") if ("network", scenario, p) in runs), None)
        if base is None:
            continue
        base_label = label(next(iter(runs[base].values())))
        for policy in ("priority", "max-pressure"):
            r = both(("network", scenario, policy), base, lambda p, c: per_hop(p) / per_hop(c))
            if r:
                out.append({"ratio": f"{policy}/{base_label}", "of": scenario,
                            "meaning": "wall time per hop-request", "best": r[0], "paired": r[1]})
    r = both(("engine", ENGINE_SCENARIO, "maxweight"), sarathi, lambda m, s: per_hop(m) / per_hop(s))
    if r:
        out.append({"ratio": "maxweight/sarathi", "of": ENGINE_SCENARIO, "meaning": "wall time per request",
                    "best": r[0], "paired": r[1]})
    return out


def report(rows: list[dict], repeats: int) -> list[dict]:
    if repeats > 1 and rows:
        print(f"\nfastest of {repeats} runs per row:")
        print(HEADER)
        best: dict[tuple, dict] = {}
        for row in rows:
            key = (row["kind"], row["scenario"], row["policy"])
            if key not in best or row["simulate_s"] < best[key]["simulate_s"]:
                best[key] = row
        for row in best.values():
            print(line(row))
    found = ratios(rows, repeats)
    if found:
        print(f"\n{'ratio':<30} {'of':<40} {'best':>8} {'paired':>8}  meaning")
        for r in found:
            print(f"{r['ratio']:<30} {r['of']:<40} {r['best']:>8.3f} {r['paired']:>8.3f}  {r['meaning']}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="dag", help="network scenarios, comma-separated, or all (default dag)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated, of {', '.join(POLICIES)} (default {DEFAULT_POLICIES})")
    p.add_argument("--horizon", type=float, default=10_000.0, help="simulated seconds per network run (default 10000)")
    p.add_argument("--schedulers", default="sarathi,maxweight",
                   help="one-engine reference rows (default sarathi,maxweight; none: no engine rows)")
    p.add_argument("--requests", type=int, default=1_000_000, help="arrivals of each one-engine row (default 1000000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per row, alternating order; tables show the fastest")
    p.add_argument("--json", default=None, help="write every run and the ratios here as JSON")
    p.add_argument("--smoke", action="store_true",
                   help=f"horizon {SMOKE_HORIZON:g} s and {SMOKE_REQUESTS:,} requests, for CI (no timing claims)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child[0] == "network":
            row = network_one(args.child[1], args.child[2], args.horizon, args.seed)
        else:
            row = engine_one(args.child[1], args.requests, args.seed)
        print(json.dumps(row))
        return

    from llmqueue.schedulers import SCHEDULERS as REGISTERED

    known = network_scenarios()
    scenarios = known if args.scenarios == "all" else args.scenarios.split(",")
    for value in scenarios:
        if value not in known:
            fail("--scenarios", value, f"one of {', '.join(known)}, or all")
    policies = args.policies.split(",")
    for value in policies:
        if value not in POLICIES:
            fail("--policies", value, f"one of {', '.join(POLICIES)}")
    schedulers = [] if args.schedulers == "none" else args.schedulers.split(",")
    for value in schedulers:
        if value not in REGISTERED:
            fail("--schedulers", value, f"one of {', '.join(REGISTERED)}, or none")
    if args.repeat < 1:
        fail("--repeat", args.repeat, "an integer >= 1")
    if not args.horizon > 0 or args.horizon == float("inf"):
        fail("--horizon", args.horizon, "a finite number of simulated seconds > 0")
    if args.requests < 1:
        fail("--requests", args.requests, "an integer >= 1")
    horizon = SMOKE_HORIZON if args.smoke else args.horizon
    requests = SMOKE_REQUESTS if args.smoke else args.requests

    specs = ([("engine", s) for s in dict.fromkeys(schedulers)]
             + [("network", s, pol) for s in dict.fromkeys(scenarios) for pol in dict.fromkeys(policies)])
    print(f"horizon {horizon:g} s, one-engine rows {requests:,} requests ({ENGINE_SCENARIO} at {ENGINE_LOAD} of λ*), "
          f"seed {args.seed}, {args.repeat} repeat(s), order alternating", flush=True)
    print(HEADER, flush=True)
    rows: list[dict] = []
    try:
        for rep in range(args.repeat):
            for spec in (specs if rep % 2 == 0 else specs[::-1]):
                row = child(spec, args, horizon, requests)
                row["repeat"] = rep
                rows.append(row)
                print(line(row), flush=True)
    except KeyboardInterrupt:
        print("interrupted: keeping the runs finished so far", file=sys.stderr)
    found = report(rows, args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"horizon_s": horizon, "requests": requests, "repeat": args.repeat, "runs": rows,
                       "ratios": found}, f, indent=2)


if __name__ == "__main__":
    main()
