"""The real engine against the simulator on this machine (docs/real_engine.md, "Calibration that
transfers" and "Capacity on the real engine"): the issue's table, measured again.

For each load, ``llmqueue engine validate CONFIG --calibrate`` (a fresh machine calibration, grid
and replayed batches, then a real run and the simulator on the same requests); then, with
``--capacity``, ``llmqueue engine capacity`` (bisection by short real runs).  Each command runs in
its own process, one after another (never beside another benchmark: the machine's speed is what is
measured).  Prints a Markdown table of real / simulated / error with the run's drift, the targets
(throughput within 2 %, mean in system and median TTFT and E2E within 10 %) marked, and the real
saturation interval against λ*.  Needs the ``cpu`` extra (PyTorch).

    python benchmarks/bench_real_engine.py                       # 0.5, 0.75, 0.9; 60 s each; ~5 min
    python benchmarks/bench_real_engine.py --loads 0.75 --horizon 20 --capacity
    python benchmarks/bench_real_engine.py --json real.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docs" / "real_engine" / "small.toml"
LOADS = (0.5, 0.75, 0.9)
#: quantity, its label, the target (relative error)
QUANTITIES = (("throughput_rps", "throughput (req/s)", 0.02), ("mean_in_system", "mean in system", 0.10),
              ("ttft_p50_s", "TTFT p50 (s)", 0.10), ("e2e_p50_s", "E2E p50 (s)", 0.10))


def llmqueue(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "llmqueue", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llmqueue {' '.join(args)} failed ({done.returncode}): "
                         f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")


def validate(config: Path, load: float, horizon: float, out: Path) -> dict:
    llmqueue("engine", "validate", str(config), "--calibrate", "--set", f"workload.load={load}",
             "--set", f"run.horizon_s={horizon}", "--out", str(out))
    row = json.loads((out / "validation.json").read_text())["rows"][0]
    return {"load": load, "rate_rps": load * row["real"]["max_stable_rate_rps"],
            "lambda_star_rps": row["real"]["max_stable_rate_rps"], "real": _values(row["real"]),
            "sim": {k: _values(v) for k, v in row["sim"].items()}, "error": row["relative_error"],
            "drift": row["drift"]}


def _values(summary: dict) -> dict:
    """The table's quantities of a run summary (``ttft_p50_s`` is ``ttft_s.p50`` there)."""
    out = {}
    for q, _, _ in QUANTITIES:
        head, _, tail = q.rpartition("_p50")
        out[q] = summary[head + tail]["p50"] if head else summary[q]
    return out


def capacity(config: Path, horizon: float, out: Path) -> dict:
    llmqueue("engine", "capacity", str(config), "--horizon", f"{horizon:g}", "--steps", "4", "--out", str(out))
    return json.loads((out / "capacity.json").read_text())


#: the simulator columns: key in validation.json, heading
SIMS = (("fresh", "sim, fresh calibration"), ("speed", "sim, speed-corrected"), ("run_fit", "sim, run fit"),
        ("run_fit_noise", "sim, run fit + noise"))


def table(rows: list[dict]) -> list[str]:
    sims = [(k, h) for k, h in SIMS if all(k in r["sim"] for r in rows)]
    lines = ["| load (λ, req/s) | quantity | real | " + " | ".join(f"{h} | error" for _, h in sims) + " |",
             "|---|---|---|" + "---|---|" * len(sims)]
    for r in rows:
        for i, (q, label, target) in enumerate(QUANTITIES):
            mark = lambda x: f"**{x * 100:+.1f} %**" if abs(x) > target else f"{x * 100:+.1f} %"
            head = f"{r['load']:g} ({r['rate_rps']:.2f})" if i == 0 else ""
            cells = " | ".join(f"{r['sim'][k][q]:.4g} | {mark(r['error'][k][q])}" for k, _ in sims)
            lines.append(f"| {head} | {label} | {r['real'][q]:.4g} | {cells} |")
    lines.append("")
    nan = float("nan")
    for r in rows:
        d = r["drift"]
        lines.append(f"* {r['load']:g}: λ* {r['lambda_star_rps']:.2f} req/s; probe {d.get('probe_before', nan):.2f}x"
                     f" / {d.get('probe_during', nan):.2f}x / {d.get('probe_after', nan):.2f}x (before / during / "
                     f"after), run batches {d.get('run_batches', nan):.2f}x the calibration, ρ "
                     f"{d['rho_low']:.3f}–{d['rho_high']:.3f}"
                     + ("; MACHINE CHANGED: " + "; ".join(d["reasons"]) if d["changed"] else ""))
    lines.append("")
    lines.append("Bold: outside the target (throughput 2 %, the others 10 %).")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--loads", default=",".join(map(str, LOADS)), help="fractions of λ*, comma-separated")
    p.add_argument("--horizon", type=float, default=60.0, help="seconds of measured time per load (default 60)")
    p.add_argument("--capacity", action="store_true", help="also bisect the real saturation rate (20 s trials)")
    p.add_argument("--json", help="also write every number here")
    a = p.parse_args(argv)
    try:
        loads = [float(x) for x in a.loads.split(",") if x.strip()]
    except ValueError:
        loads = []
    if not loads or min(loads) <= 0 or not 1 <= a.horizon <= 3600:
        p.error("--loads: comma-separated fractions > 0; --horizon: 1 to 3600 s")
    began = time.perf_counter()
    rows, cap = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for load in loads:
            print(f"load {load:g} ...", file=sys.stderr, flush=True)
            rows.append(validate(Path(a.config), load, a.horizon, Path(tmp) / f"v{load:g}"))
        if a.capacity:
            print("capacity ...", file=sys.stderr, flush=True)
            cap = capacity(Path(a.config), 20.0, Path(tmp) / "cap")
    lines = table(rows)
    if cap is not None:
        lam, lo, hi = cap["predicted_lambda_star_rps"], cap["stable_up_to_rps"], cap["unstable_from_rps"]
        span = (f"between {lo:.2f} and {hi:.2f} req/s ({(lo / lam - 1) * 100:+.1f} to {(hi / lam - 1) * 100:+.1f} %)"
                if lo is not None and hi is not None else f"stable up to {lo} / unstable from {hi} req/s")
        lines.append(f"Real saturation rate {span} against the predicted λ* {lam:.2f} req/s; most served in one "
                     f"trial {cap['most_served_rps']:.2f} req/s.")
    lines.append(f"({time.perf_counter() - began:.0f} s)")
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "capacity": cap}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
