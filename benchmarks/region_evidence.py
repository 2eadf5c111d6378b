"""Evidence for the max-weight scheduler under a request cap (paper §6; docs/region.md).

Points of the stability region for the paper's staircase with k_max = 100 and b_max = 1024,
given as a workload shape (Poisson prompt and output lengths with means m_p, m_d) and a load ρ
along its ray (ρ = 1 on the boundary of the b_max = 1024 region).  At each point, for several
seeds (Poisson arrivals, common random numbers across schedulers), run maxweight-1024,
Sarathi-128 and Sarathi-1024 and tabulate the verdicts, the mean number in system and the
token throughput.

    python benchmarks/region_evidence.py                      # the docs/region.md table (~3 min on 2 cores)
    python benchmarks/region_evidence.py --seeds 0 --horizon 600 --jobs 1   # a quick look

Writes the table (markdown) to stdout and every finished run to --out (JSON lines, appended as
runs finish, so an interrupted run keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from llmqueue.config import parse_config
from llmqueue.analysis.region import stability_region
from llmqueue.runner import compare

CAP = 100
POINTS = [  # (m_p, m_d, ρ along the ray of the b_max = 1024 region)
    (290, 990, 0.90), (290, 990, 0.95), (50, 400, 0.90), (100, 1500, 0.90), (400, 2000, 0.90),
    (1000, 300, 0.90), (2000, 100, 0.90), (2000, 100, 0.95), (600, 600, 0.90),
]
POLICIES = [("maxweight", 1024), ("sarathi", 128), ("sarathi", 1024)]


def one_point(mp: int, md: int, rho: float, seed: int, horizon: float) -> list[dict]:
    """Every policy on the same arrivals at one point and seed."""
    rate = rho / stability_region(None, 1024, CAP).gauge(mp, md)
    rows = []
    for name, budget in POLICIES:
        cfg = parse_config({
            "engine": {"scheduler": name, "token_budget": budget, "max_batch_requests": CAP},
            "workload": {"arrival": "poisson", "rate": rate, "prompt": {"dist": "poisson", "mean": mp},
                         "output": {"dist": "poisson", "mean": md}},
            "run": {"horizon_s": horizon, "seed": seed}})
        s = compare(cfg, [name])[0].summary
        rows.append({"m_p": mp, "m_d": md, "rho": rho, "seed": seed, "policy": f"{name}-{budget}",
                     "rate_rps": rate, "verdict": s["verdict"], "mean_in_system": s["mean_in_system"],
                     "final_in_system": s["final_in_system"], "token_throughput": s["token_throughput"],
                     "offered_tokens_per_s": s["offered_tokens_per_s"], "e2e_p50_s": s["e2e_s"]["p50"]})
    return rows


def table(rows: list[dict]) -> str:
    small = stability_region(None, 128, CAP)
    by_point: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_point[(r["m_p"], r["m_d"], r["rho"])][r["policy"]].append(r)
    names = [f"{n}-{b}" for n, b in POLICIES]
    head = ("| m_p | m_d | λ req/s | ρ (b=1024) | ρ (b=128) | offered tok/s | "
            + " | ".join(f"{n}: verdicts · in-sys · tok/s" for n in names) + " |")
    lines = [head, "|" + "---|" * (6 + len(names))]
    for (mp, md, rho), runs in sorted(by_point.items(), key=lambda kv: (kv[0][0] / (kv[0][0] + kv[0][1]), kv[0][2])):
        first = next(iter(runs.values()))[0]
        rate = first["rate_rps"]
        cells = []
        for n in names:
            rs = runs.get(n, [])
            if not rs:
                cells.append("-")
                continue
            count = defaultdict(int)
            for r in rs:
                count[r["verdict"]] += 1
            verdicts = ", ".join(f"{c} {v}" for v, c in sorted(count.items()))
            insys = sum(r["mean_in_system"] for r in rs) / len(rs)
            tput = sum(r["token_throughput"] for r in rs) / len(rs)
            cells.append(f"{verdicts} · {insys:.0f} · {tput:.0f}")
        lines.append(f"| {mp} | {md} | {rate:.3f} | {rho:.2f} | {small.gauge(rate * mp, rate * md):.2f} | "
                     f"{first['offered_tokens_per_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--horizon", type=float, default=1800.0, help="simulated seconds per run (default 1800)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", default="llmqueue_output/region_evidence.jsonl", help="JSON lines of every run")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    jobs = [(mp, md, rho, seed, args.horizon) for mp, md, rho in POINTS for seed in seeds]
    rows: list[dict] = []
    tty = sys.stderr.isatty()
    try:
        with ProcessPoolExecutor(args.jobs) as ex:
            futures = [ex.submit(one_point, *job) for job in jobs]
            for i, f in enumerate(as_completed(futures), 1):
                done = f.result()
                rows.extend(done)
                with out.open("a") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in done)
                if tty:
                    sys.stderr.write(f"\r  {i}/{len(jobs)} points x seeds done")
                    sys.stderr.flush()
    except KeyboardInterrupt:
        print("\ninterrupted: the table shows the runs that finished", file=sys.stderr)
    if tty:
        sys.stderr.write("\n")
    print(f"k_max = {CAP}, paper staircase, Poisson arrivals and lengths, horizon {args.horizon:.0f} s, "
          f"seeds {args.seeds}; cells: verdicts over seeds · mean in system · token throughput (tokens/s)\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
