"""Benchmark: what KV memory costs on the compiled core (docs/performance.md, docs/memory.md).

The Fig. 1 workload (Poisson arrivals at ``--load`` of λ*, Poisson lengths with means 129 and
112, staircase batch time, budget 512), ``--requests`` arrivals, one scheduler at a time: the same
requests simulated without memory and with ``kv_blocks`` = each of ``--blocks`` (block size 16,
recompute, and reserve with ``--reserve``), interleaved, ``--repeat`` times, in one process (a
shared, noisy machine: compare ratios taken side by side, not absolute times).  Times are of
``simulate()`` alone (the requests are generated once).  Each row: the median wall time, the
median of the paired ratios KV on / KV off (of simulate(), and of the compiled loop alone:
``core×``, without rebuilding as objects the queue an overloaded run leaves), and what memory did
(preemptions, memory-limited batches, mean use, requests left unfinished: many = unstable).

    python benchmarks/bench_kv.py                                   # 1M requests, sarathi
    python benchmarks/bench_kv.py --schedulers sarathi,vllm-v1 --blocks 2000,2500,3000 --repeat 5
    python benchmarks/bench_kv.py --smoke                           # tiny, for CI (no timing claims)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--schedulers", default="sarathi")
    ap.add_argument("--blocks", default="2000,2500,3000")
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--reserve", action="store_true", help="also kv_policy = reserve")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.repeat, args.blocks = 2000, 1, "600"

    from llmqueue.config import load_config
    from llmqueue.core import fastcore
    from llmqueue.core.simulator import simulate
    from llmqueue.metrics import kv_summary
    from llmqueue.runner import build_engine, build_workload, generate

    if fastcore.unavailable() is not None:
        print(f"compiled core unavailable: {fastcore.unavailable()}")
        return 1
    blocks = [int(b) for b in args.blocks.split(",") if b]
    variants = [("off", [])] + [(f"{b} recompute", [f"engine.kv_blocks={b}"]) for b in blocks]
    if args.reserve:
        variants += [(f"{b} reserve", [f"engine.kv_blocks={b}", "engine.kv_policy=reserve"]) for b in blocks]
    print(f"fig1 at {args.load} of λ*, {args.requests:,} requests, median of {args.repeat} (paired ratios)")
    print(f"{'scheduler':10} {'kv_blocks':16} {'wall s':>7} {'× off':>6} {'core×':>6} {'batches':>9} "
          f"{'preempt':>9} {'limited':>8} {'mean use':>8} {'left':>8} {'method':>6}")
    for name in args.schedulers.split(","):
        base = [f"engine.scheduler={name}", f"run.requests={args.requests}", f"workload.load={args.load}"]
        configs = [(label, load_config(None, base + extra)) for label, extra in variants]
        requests = generate(configs[0][1], build_workload(configs[0][1]))
        times = {label: [] for label, _ in configs}
        core = {label: [] for label, _ in configs}
        last = {}
        horizon = float(requests.arrival_time[-1])
        for _ in range(args.repeat):
            for label, cfg in configs:
                engine = build_engine(cfg)
                t = time.perf_counter()
                result = simulate(engine, requests)
                times[label].append(time.perf_counter() - t)
                last[label] = result
                # the compiled loop alone, without rebuilding the queue left at the end as objects
                engine = build_engine(cfg)
                t = time.perf_counter()
                fastcore.call(engine, requests.arrival_time, requests.num_prompt_tokens, requests.num_output_tokens,
                              horizon, False, None)
                core[label].append(time.perf_counter() - t)
        for label, _ in configs:
            r = last[label]
            ratio = statistics.median(a / b for a, b in zip(times[label], times["off"]))
            core_ratio = statistics.median(a / b for a, b in zip(core[label], core["off"]))
            kv = kv_summary(r) if r.kv is not None else None
            left = int(np.count_nonzero(np.isnan(r.finish_time) & ~r.rejected))
            print(f"{name:10} {label:16} {statistics.median(times[label]):7.3f} {ratio:6.2f} {core_ratio:6.2f} "
                  f"{r.num_batches:9,} {kv['preemptions'] if kv else 0:9,} "
                  f"{kv['memory_limited_batches'] if kv else 0:8,} {kv['mean_utilisation'] if kv else 0:8.2f} "
                  f"{left:8,} {r.meta['method']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
