"""The sections of ``llmqueue reproduce``: each the paper's claim, its runs, and a verdict.

A section lists the simulation jobs it needs (:meth:`Section.jobs`, run by the driver in
parallel and stored), and then :meth:`Section.assemble` turns their results into tables, plots
and a verdict computed from the numbers.  The paper's published values are kept in
``published`` dicts and labelled as such in the report; every other number comes from a run
or from the closed forms.  Section, equation and figure numbers are the paper's own (v3).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmqueue.analysis import analyze
from llmqueue.model.batch_time import PAPER_STAIRCASE, make_batch_time
from llmqueue.reproduce import figures
from llmqueue.scenarios import scenario_data, scenario_text

REPRODUCED, DIFFERS, BEYOND, NOT_RUN = "reproduced", "differs", "beyond the paper", "not run"
MAIN4 = ("fastertransformer", "vllm", "orca", "sarathi")
FIG1_MEANS = (129, 112)
FIG1_LOADS = (0.6, 0.75, 0.9, 0.95)   # the plotted loads (fractions of λ*); the full run adds more to its table


@dataclass(frozen=True)
class Scale:
    """How much to run: ``full`` (the report), ``quick`` (< 2 min), ``smoke`` (tests only)."""

    name: str
    fig1_loads: tuple[float, ...]
    fig1_seeds: int
    fig1_horizon: float
    thm2_loads: tuple[float, ...]
    thm2_seeds: int
    thm2_horizon: float
    maxrate_seeds: int
    maxrate_rel_tol: float
    maxrate_horizon: float
    sat_budgets: tuple[int, ...]
    sat_horizon: float
    pointc_horizon: float
    rs_seeds: int
    rs_horizon: float
    topo_seeds: int
    topo_horizon: float
    lat_budgets: tuple[int, ...]
    lat_loads: tuple[float, ...]
    lat_horizon: float
    mem_blocks: tuple[int, ...] = (1000, 2000, 3000)
    mem_dc_horizon: float = 300.0
    mem_seeds: int = 3
    cl_loads: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    cl_horizon: float = 600.0       # the unbatched pools (routing theory)
    cl_long: float = 3600.0         # Fig. 1 pools: random vs independent engines, the mixed pool
    cl_seeds: int = 3
    cl_pd_horizon: float | None = None   # the P:D scenarios (None: their own 300 s)


SCALES = {
    "full": Scale("full", fig1_loads=(0.3, 0.6, 0.75, 0.85, 0.9, 0.95), fig1_seeds=5, fig1_horizon=3600.0, thm2_loads=tuple(round(0.6 + 0.1 * i, 1) for i in range(9)),
                  thm2_seeds=10, thm2_horizon=3600.0, maxrate_seeds=3, maxrate_rel_tol=0.01, maxrate_horizon=3600.0,
                  sat_budgets=(128, 256, 384, 512, 768, 1024, 1536, 2048), sat_horizon=1200.0, pointc_horizon=3600.0,
                  rs_seeds=5, rs_horizon=6000.0, topo_seeds=3, topo_horizon=3600.0,
                  lat_budgets=(128, 256, 512, 1024, 2048), lat_loads=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9), lat_horizon=1800.0,
                  mem_blocks=(1000, 2000, 2500, 3000), mem_dc_horizon=600.0, mem_seeds=3,
                  cl_loads=(0.5, 0.7, 0.8, 0.9), cl_horizon=600.0, cl_long=3600.0, cl_seeds=5),
    "quick": Scale("quick", fig1_loads=FIG1_LOADS, fig1_seeds=2, fig1_horizon=1200.0, thm2_loads=(0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4),
                   thm2_seeds=3, thm2_horizon=1200.0, maxrate_seeds=2, maxrate_rel_tol=0.02, maxrate_horizon=3600.0,
                   sat_budgets=(128, 512, 1024, 2048), sat_horizon=600.0, pointc_horizon=1800.0,
                   rs_seeds=1, rs_horizon=6000.0, topo_seeds=1, topo_horizon=3600.0,
                   lat_budgets=(128, 512, 2048), lat_loads=(0.3, 0.6, 0.8, 0.9), lat_horizon=1200.0,
                   mem_blocks=(1000, 2000, 3000), mem_dc_horizon=200.0, mem_seeds=2,
                   cl_loads=(0.7, 0.9), cl_horizon=300.0, cl_long=1200.0, cl_seeds=3),
    "smoke": Scale("smoke", fig1_loads=FIG1_LOADS, fig1_seeds=1, fig1_horizon=60.0, thm2_loads=(0.6, 1.0, 1.4), thm2_seeds=1, thm2_horizon=60.0,
                   maxrate_seeds=1, maxrate_rel_tol=0.25, maxrate_horizon=60.0, sat_budgets=(128, 512), sat_horizon=30.0,
                   pointc_horizon=60.0, rs_seeds=1, rs_horizon=300.0, topo_seeds=1, topo_horizon=200.0,
                   lat_budgets=(128, 512), lat_loads=(0.5, 0.8), lat_horizon=60.0,
                   mem_blocks=(2000,), mem_dc_horizon=10.0, mem_seeds=1,
                   cl_loads=(0.9,), cl_horizon=20.0, cl_long=30.0, cl_seeds=1,
                   cl_pd_horizon=30.0),
}


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Result:
    """One section of the report, ready to render (HTML) and to dump (JSON)."""

    key: str
    title: str
    claim: str
    published: dict[str, Any]
    config: str
    verdict: str
    verdict_text: str
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)   # (file name, caption)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Got = Callable[[str, int], dict | None]     # (job name, seed) -> the job's result, None if it failed


class Section:
    key = ""
    title = ""
    claim = ""
    published: ClassVar[dict[str, Any]] = {}

    def jobs(self, s: Scale) -> list[tuple[str, dict, int]]:
        """(name, job, seed) for every run this section needs (see reproduce.jobs)."""
        return []

    def searches(self, s: Scale) -> list[tuple[str, dict]]:
        """(name, config dict) whose largest stable rate to find by bisection (sweep.maxrate)."""
        return []

    def assemble(self, s: Scale, got: Got, searched: dict[str, Any], plots: Path) -> Result:
        raise NotImplementedError

    def result(self, **kw) -> Result:
        return Result(self.key, self.title, self.claim, dict(self.published), **kw)


# ---- helpers ---------------------------------------------------------------------------

def single_job(config: dict, keep: tuple[str, ...] = ()) -> dict:
    return {"kind": "single", "config": config, "keep": list(keep)}


def scenario_config(name: str, *, scheduler: str | None = None, budget: int | None = None,
                    horizon: float | None = None, **workload) -> dict:
    data = scenario_data(name)
    if scheduler is not None:
        data["engine"]["scheduler"] = scheduler
    if budget is not None:
        data["engine"]["token_budget"] = budget
    if horizon is not None:
        data["run"]["horizon_s"] = horizon
    if "rate" in workload:
        data["workload"].pop("load", None)
    if "load" in workload:
        data["workload"].pop("rate", None)
    data["workload"].update(workload)
    return data


def lambda_star(budget: int, mp: float, md: float) -> float:
    return analyze(make_batch_time(PAPER_STAIRCASE), budget, 1.0, mp, md).max_stable_rate_rps


def verdict_counts(runs: list[dict | None]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in runs:
        out["error" if r is None else r["verdict"]] += 1
    return dict(out)


def show_counts(counts: dict[str, int]) -> str:
    n = sum(counts.values())
    return ", ".join(f"{v} {k}" if n > 1 else k for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def all_are(runs: list[dict | None], verdict: str) -> bool:
    return bool(runs) and all(r is not None and r["verdict"] == verdict for r in runs)


def none_are(runs: list[dict | None], verdict: str) -> bool:
    return bool(runs) and all(r is not None and r["verdict"] != verdict for r in runs)


# ---- 1. Fig. 8 -------------------------------------------------------------------------

class Fig8(Section):
    key, title = "fig8", "1. Batch compositions of the four schedulers (Fig. 8)"
    claim = ("A, B, C are decoding with 2, 4, 3 decode tokens left; D and E (1 prefill + 1 decode token "
             "each) arrive during the first batch. Each scheduler forms the batches shown in the paper's "
             "Fig. 8 (paper §4); only Orca and Sarathi-Serve are work-conserving.")

    def __init__(self) -> None:
        from llmqueue.worked_example import FIG8_PUBLISHED
        self.published = {k: {"token_budget": b, "batches": t} for k, (b, t) in FIG8_PUBLISHED.items()}

    def assemble(self, s, got, searched, plots):
        from llmqueue.worked_example import (
            FIG8_NAMES,
            FIG8_PUBLISHED,
            compositions,
            parse_sequence,
            run_fig8,
        )
        from llmqueue.worked_example import show_sequence as show
        rows, numbers = [], {}
        extra = {"vllm-v1": 4, "maxweight": 4}
        for name, budget in [*((k, b) for k, (b, _) in FIG8_PUBLISHED.items()), *extra.items()]:
            engine, steps = run_fig8(name, budget)
            ours = compositions(steps, FIG8_NAMES)
            paper = parse_sequence(FIG8_PUBLISHED[name][1]) if name in FIG8_PUBLISHED else None
            match = None if paper is None else ours == paper
            numbers[name] = {"token_budget": budget, "batches": show(ours), "num_batches": len(ours),
                             "violations": engine.violations, "matches_paper": match}
            rows.append([name, str(budget), show(paper) if paper else "– (not in the paper)", show(ours),
                         str(len(ours)), str(engine.violations),
                         "yes" if match else ("–" if match is None else "NO")])
        figures.fig8(numbers, plots / "fig8_batches.png")
        matched = [n for n in FIG8_PUBLISHED if numbers[n]["matches_paper"]]
        ok = len(matched) == len(FIG8_PUBLISHED)
        wc_ok = all(numbers[n]["violations"] == 0 for n in ("orca", "sarathi")) and all(
            numbers[n]["violations"] > 0 for n in ("vllm", "fastertransformer"))
        verdict = REPRODUCED if ok and wc_ok else DIFFERS
        text = (f"{len(matched)} of {len(FIG8_PUBLISHED)} schedulers form exactly the paper's batches; "
                f"work-conservation violations: " + ", ".join(f"{n} {numbers[n]['violations']}" for n in MAIN4)
                + " (only the non-work-conserving ones violate).")
        if not ok:
            text += " Differs for " + ", ".join(n for n in FIG8_PUBLISHED if n not in matched) + "."
        return self.result(
            config="Constant batch time 1 s; A, B, C decoding at t = 0 (2, 4, 3 decode tokens left); D, E "
                   "arrive at t = 0.5 s with 1 prefill + 1 decode token; b_max as in the table.",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Batches in Fig. 8 notation (Xd: a decode token of X, Xp: a prefill token). "
                          "'paper' is the published sequence; vllm-v1 and maxweight are this project's.",
                          ["scheduler", "b_max", "paper (published)", "ours (simulated)", "batches",
                           "violations", "same"], rows)],
            plots=[("fig8_batches.png", "The batches each scheduler forms, token by token.")])


# ---- 2. Fig. 1 -------------------------------------------------------------------------


class Fig1(Section):
    key, title = "fig1", "2. The four schedulers on the Fig. 1 workload"
    claim = ("On the Fig. 1 workload (prompt mean 129, output mean 112 tokens, the CodeLlama-34B staircase, "
             "b_max = 512, λ* = 13.87 requests/s) the non-work-conserving FasterTransformer and vanilla vLLM "
             "diverge at loads well below λ*, where Orca and Sarathi-Serve stay bounded (Theorem 2, paper §3.2).")
    published: ClassVar[dict[str, Any]] = {"lambda_star_rps (b_max = 512)": 13.87, "real A100 trace rate_rps": 14}

    def jobs(self, s):
        return [(f"{sched}@{load}", single_job(scenario_config("fig1", scheduler=sched, load=load,
                                                               horizon=s.fig1_horizon), ("series",)), seed)
                for load in s.fig1_loads for sched in MAIN4 for seed in range(s.fig1_seeds)]

    def assemble(self, s, got, searched, plots):
        lam = lambda_star(512, *FIG1_MEANS)
        rows, numbers, series = [], {}, {}
        runs_of = {(sched, ld): [got(f"{sched}@{ld}", seed) for seed in range(s.fig1_seeds)]
                   for sched in MAIN4 for ld in s.fig1_loads}
        for load in s.fig1_loads:
            row = [f"{load:.2f}", num(load * lam)]
            for sched in MAIN4:
                runs = runs_of[(sched, load)]
                ok = [r for r in runs if r]
                counts = verdict_counts(runs)
                numbers[f"{sched}@{load}"] = {
                    "verdicts": counts, "mean_in_system": mean([r["mean_in_system"] for r in ok]),
                    "final_in_system": mean([r["final_in_system"] for r in ok]),
                    "backlog_slope_tokens_per_s": mean([r["backlog_slope_tokens_per_s"] for r in ok]),
                    "violations": mean([r["work_conserving_violations"] for r in ok])}
                row.append(f"{show_counts(counts)} · {num(numbers[f'{sched}@{load}']['mean_in_system'], 0)}")
                if runs and runs[0]:
                    series[(load, sched)] = (runs[0]["series"], runs[0]["verdict"])
            rows.append(row)
        figures.fig1(series, FIG1_LOADS, MAIN4, lam, plots / "fig1_in_system.png")
        high = [ld for ld in s.fig1_loads if ld >= 0.9]
        wc_bounded = all(none_are(runs_of[(sc, ld)], "unstable") for sc in ("orca", "sarathi") for ld in high)
        nwc_diverge = all(all_are(runs_of[(sc, ld)], "unstable") for sc in ("fastertransformer", "vllm") for ld in high)
        first_div = {sc: next((ld for ld in s.fig1_loads if all_are(runs_of[(sc, ld)], "unstable")), None) for sc in MAIN4}
        numbers["lambda_star_rps"] = lam
        numbers["lowest_load_diverging"] = first_div
        verdict = REPRODUCED if wc_bounded and nwc_diverge else DIFFERS
        text = (f"λ* = {lam:.2f} requests/s (computed; the paper: 13.87). At {', '.join(f'{x:g}' for x in high)}·λ* "
                f"Orca and Sarathi are {'never unstable' if wc_bounded else 'NOT always bounded'} and "
                f"FasterTransformer and vanilla vLLM {'diverge in every seed' if nwc_diverge else 'do NOT always diverge'}. "
                "Lowest load (of those run) at which every seed diverges: "
                + ", ".join(f"{sc} {f'{first_div[sc]:g}·λ*' if first_div[sc] else 'none'}" for sc in MAIN4) + ".")
        return self.result(
            config=_config_block("fig1", [f"workload.load = {', '.join(map(str, s.fig1_loads))}",
                                          f"engine.scheduler = {', '.join(MAIN4)}",
                                          f"run.horizon_s = {s.fig1_horizon:g}", f"seeds 0..{s.fig1_seeds - 1}"]),
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table(f"Verdicts over {s.fig1_seeds} seed(s) · mean number in system (same arrivals for every "
                          "scheduler).", ["load (·λ*)", "λ req/s", *MAIN4], rows)],
            plots=[("fig1_in_system.png", "Requests in the system over time, seed 0, one panel per load.")])


# ---- 3. Theorem 2 ----------------------------------------------------------------------

THM2_SCHEDULERS = ("sarathi", "orca")


class Theorem2(Section):
    key, title = "theorem2", "3. Throughput and stability (Theorem 2)"
    claim = ("No scheduler serves more than b_max/t_{b_max} tokens/s; every work-conserving scheduler is "
             "stable when λ(m_p + m_d) < b_max/t_{b_max}; above it the unprocessed tokens grow at the fluid "
             "rate λ(m_p + m_d) − b_max/t_{b_max} (paper §3.2). Example: (v_p, v_d) = (100, 100), "
             "b_max = 512: λ* = 16.71 requests/s.")
    published: ClassVar[dict[str, Any]] = {"lambda_star_rps (100 + 100 tokens, b_max = 512)": 16.71}

    def jobs(self, s):
        return [(f"{sched}@{load}", single_job(scenario_config("theorem2", scheduler=sched, load=load,
                                                               horizon=s.thm2_horizon)), seed)
                for load in s.thm2_loads for sched in THM2_SCHEDULERS for seed in range(s.thm2_seeds)]

    def searches(self, s):
        return [(sched, scenario_config("fig1", scheduler=sched, load=0.9, horizon=s.maxrate_horizon))
                for sched in MAIN4]

    def assemble(self, s, got, searched, plots):
        lam = lambda_star(512, 100, 100)
        cap = lam * 200
        rows, numbers, points = [], {"lambda_star_rps": lam, "capacity_tokens_per_s": cap}, {}
        checks = []
        for load in s.thm2_loads:
            fluid = max(0.0, load * lam * 200 - cap)
            row = [f"{load:.1f}", num(fluid, 1)]
            for sched in THM2_SCHEDULERS:
                runs = [got(f"{sched}@{load}", seed) for seed in range(s.thm2_seeds)]
                slopes = [r["backlog_slope_tokens_per_s"] for r in runs if r and r["backlog_slope_tokens_per_s"] is not None]
                m = float(np.mean(slopes)) if slopes else None
                if len(slopes) > 1:
                    half = 1.96 * float(np.std(slopes, ddof=1)) / math.sqrt(len(slopes))
                elif slopes:
                    ci = next(r["backlog_slope_ci"] for r in runs if r and r["backlog_slope_ci"])
                    half = (ci[1] - ci[0]) / 2
                else:
                    half = None
                points[(sched, load)] = (m, half)
                numbers[f"{sched}@{load}"] = {"slope_mean": m, "slope_ci95_half": half, "fluid": fluid,
                                              "verdicts": verdict_counts(runs)}
                if m is not None and abs(load - 1.0) > 1e-9:
                    tol = max(half or 0.0, 0.02 * cap)
                    checks.append((sched, load, m, fluid, abs(m - fluid) <= tol))
                row.append(f"{num(m, 1)} ± {num(half, 1)} · {show_counts(verdict_counts(runs))}")
            rows.append(row)
        figures.theorem2(points, THM2_SCHEDULERS, s.thm2_loads, lam, cap, plots / "theorem2_slope.png")
        # the largest stable rate per scheduler (bisection, sweep.maxrate)
        lam1 = lambda_star(512, *FIG1_MEANS)
        mrows = []
        for sched in MAIN4:
            r = searched.get(sched)
            mr = None if r is None else r.max_rate_rps
            numbers[f"max_rate[{sched}]"] = {"max_rate_rps": mr, "failed_rate_rps": None if r is None else r.failed_rate_rps,
                                             "fraction_of_lambda_star": None if mr is None else mr / lam1,
                                             "probes": 0 if r is None else len(r.probes)}
            mrows.append([sched, num(lam1), num(mr), num(None if mr is None else mr / lam1, 3),
                          num(None if r is None else r.failed_rate_rps), str(0 if r is None else len(r.probes))])
        figures.max_rate(numbers, MAIN4, lam1, plots / "theorem2_max_rate.png")
        fit_ok = bool(checks) and all(c[4] for c in checks)
        frac = {sc: numbers[f"max_rate[{sc}]"]["fraction_of_lambda_star"] for sc in MAIN4}
        wc_near = all(frac[sc] is not None and frac[sc] >= 1 - max(0.03, s.maxrate_rel_tol * 2) for sc in ("orca", "sarathi"))
        wc_not_above = all(frac[sc] is not None and frac[sc] <= 1 + max(0.01, s.maxrate_rel_tol) for sc in ("orca", "sarathi"))
        nwc_below = all(frac[sc] is not None and frac[sc] < 0.95 for sc in ("fastertransformer", "vllm"))
        verdict = REPRODUCED if fit_ok and wc_near and wc_not_above and nwc_below else DIFFERS
        bad = [f"{sc} at {ld:g}·λ*: {m:.1f} vs fluid {f:.1f}" for sc, ld, m, f, good in checks if not good]
        text = (f"λ* = {lam:.2f} requests/s (computed; the paper: 16.71), capacity {cap:.1f} tokens/s. Measured backlog "
                f"growth matches the fluid line at {sum(c[4] for c in checks)} of {len(checks)} (scheduler, load) points "
                "(within the 95 % interval over seeds or 2 % of capacity; ρ = 1 itself is left out: there the fluid "
                "rate is 0 but the backlog grows like √t)"
                + (f"; off at {'; '.join(bad)}" if bad else "") + ". Largest stable rate by bisection on the Fig. 1 "
                f"workload (λ* = {lam1:.2f}): " + ", ".join(f"{sc} {num(frac[sc], 3)}·λ*" for sc in MAIN4) + ".")
        return self.result(
            config=_config_block("theorem2", [f"workload.load = {', '.join(f'{x:g}' for x in s.thm2_loads)}",
                                              f"engine.scheduler = {', '.join(THM2_SCHEDULERS)}",
                                              f"run.horizon_s = {s.thm2_horizon:g}", f"seeds 0..{s.thm2_seeds - 1}"])
            + f"\n\n# largest stable rate: the fig1 scenario, bisection with {s.maxrate_seeds} seed(s), "
              f"{s.maxrate_horizon:g} s runs, bracket {s.maxrate_rel_tol:.0%} (llmqueue max-rate)",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Backlog growth (tokens/s, after each run's warm-up): mean ± 95 % half-width over seeds · "
                          "verdicts. Fluid = max(0, λ(m_p + m_d) − b/t_b).",
                          ["load (·λ*)", "fluid tokens/s", *(f"{sc}: slope · verdicts" for sc in THM2_SCHEDULERS)], rows),
                    Table("Largest stable arrival rate found by simulation (a rate passes when every seed is judged "
                          "stable), Fig. 1 workload, b_max = 512.",
                          ["scheduler", "λ* req/s", "max stable req/s", "fraction of λ*", "smallest failing req/s",
                           "rates probed"], mrows)],
            plots=[("theorem2_slope.png", "Backlog growth against load, with the fluid line."),
                   ("theorem2_max_rate.png", "Largest stable rate per scheduler against λ*.")])


# ---- 4. Batch time ---------------------------------------------------------------------

class BatchTimeModels(Section):
    key, title = "batch_time", "4. Batch time and capacity against the token budget"
    claim = ("The batch time depends only on the token load b: v3's staircase t_b = c + a·⌈b/b0⌉ (CodeLlama-34B on "
             "one A100-80GB: c = 11.28 ms, a = 35.47 ms, b0 = 128), v1/v2's piecewise-linear c + a·max(0, b − b0). "
             "Capacity is b_max/t_{b_max} tokens/s (paper §3.1, §3.2).")
    published: ClassVar[dict[str, Any]] = {"t_128_ms": 46.75, "t_512_ms": 153.16, "t_1024_ms": 295.04}

    def jobs(self, s):
        out = []
        for b in s.sat_budgets:
            out.append((f"saturated@{b}", single_job(scenario_config(
                "fig1", scheduler="sarathi", budget=b, horizon=s.sat_horizon, load=1.3), ("served",)), 0))
        return out

    def assemble(self, s, got, searched, plots):
        from llmqueue.real.fit import Samples, fit_piecewise_linear
        stair = make_batch_time(PAPER_STAIRCASE)
        grid = np.arange(1, 2049, dtype=float)
        sample = grid[::8]
        z = np.zeros(len(sample))
        pwl = fit_piecewise_linear(Samples(sample, z, z, z, stair.seconds(sample)))
        pwl_model = pwl.batch_time
        numbers: dict[str, Any] = {"piecewise_linear_fit": {**pwl_model.to_dict(), "r2": pwl.r2}}
        for b in (128, 512, 1024):
            numbers[f"t_{b}_ms"] = float(stair.seconds(np.array([b]))[0] * 1e3)
        rows, sat = [], {}
        for b in s.sat_budgets:
            t = float(stair.seconds(np.array([b]))[0])
            capb = b / t
            r = got(f"saturated@{b}", 0)
            served = None if r is None else r["served"]["prefill_tokens_per_s"] + r["served"]["decode_tokens_per_s"]
            sat[b] = served
            err = None if served is None else served / capb - 1
            numbers[f"budget_{b}"] = {"t_b_ms": t * 1e3, "capacity_tokens_per_s": capb,
                                      "lambda_star_fig1_rps": capb / sum(FIG1_MEANS),
                                      "lambda_star_100_100_rps": capb / 200,
                                      "served_at_1.3_lambda_star_tokens_per_s": served, "relative_error": err}
            rows.append([str(b), num(t * 1e3), num(capb, 0), num(capb / sum(FIG1_MEANS)), num(capb / 200),
                         num(served, 0), "–" if err is None else f"{err:+.2%}"])
        figures.batch_time(stair, pwl_model, sat, plots / "batch_time.png")
        pub_ok = all(abs(numbers[f"t_{b}_ms"] - self.published[f"t_{b}_ms"]) < 0.005 for b in (128, 512, 1024))
        errs = [abs(v["relative_error"]) for k, v in numbers.items() if k.startswith("budget_") and v["relative_error"] is not None]
        sat_ok = bool(errs) and max(errs) < 0.01
        verdict = REPRODUCED if pub_ok and sat_ok else DIFFERS
        text = (f"t_128, t_512, t_1024 = {numbers['t_128_ms']:.2f}, {numbers['t_512_ms']:.2f}, {numbers['t_1024_ms']:.2f} ms "
                f"(computed from the staircase; the paper: 46.75, 153.16, 295.04). Sarathi at 1.3·λ* serves "
                f"{'within ' + format(max(errs), '.2%') if errs else 'NO RESULT'} of b_max/t_{{b_max}} at every budget "
                f"run. Piecewise-linear fit to the staircase (the paper gives no v1/v2 numbers): c = "
                f"{pwl_model.c * 1e3:.2f} ms, a = {pwl_model.a * 1e3:.4f} ms/token, b0 = {pwl_model.b0}, R² = {pwl.r2:.3f}.")
        return self.result(
            config=f"[engine.batch_time]\nmodel = \"staircase\"\nc_ms = 11.28\na_ms = 35.47\nb0 = 128\n\n"
                   f"# saturation runs: the fig1 scenario, scheduler sarathi, workload.load = 1.3, token_budget = "
                   f"{', '.join(map(str, s.sat_budgets))}, run.horizon_s = {s.sat_horizon:g}; served rate over the second half",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Capacity b/t_b and λ* (computed) next to the token rate Sarathi serves at 1.3·λ* "
                          "(simulated, second half of the run).",
                          ["b_max", "t_b ms", "b/t_b tokens/s", "λ* Fig. 1 req/s", "λ* 100+100 req/s",
                           "served tokens/s", "served vs b/t_b"], rows)],
            plots=[("batch_time.png", "Left: batch time against tokens. Right: capacity b/t_b against the token budget, "
                                      "with the simulated saturation throughput.")])


# ---- 5. §6 region ----------------------------------------------------------------------

POINT_C_RUNS = [  # (label, scheduler, budget, options)
    ("sarathi-128", "sarathi", 128, {}), ("sarathi-1024", "sarathi", 1024, {}), ("orca-128", "orca", 128, {}),
    ("vllm-128 (split)", "vllm", 128, {"split_prompts": True}), ("vllm-128 (no split)", "vllm", 128, {}),
    ("fastertransformer-128 (split)", "fastertransformer", 128, {"split_prompts": True}),
    ("fastertransformer-128 (no split)", "fastertransformer", 128, {}),
    ("vllm-v1-128", "vllm-v1", 128, {}), ("vllm-v1-1024", "vllm-v1", 1024, {}),
    ("maxweight-1024", "maxweight", 1024, {}), ("maxweight-128", "maxweight", 128, {}),
]
PAPER_POINT_C = {"sarathi-128": "stable", "sarathi-1024": "unstable", "orca-128": "unstable",
                 "vllm-128 (split)": "unstable", "fastertransformer-128 (split)": "unstable"}


WHERE = {"inside": "inside", "boundary": "on the boundary of", "outside": "outside"}


class Region(Section):
    key, title = "region", "5. The batch-size limit: 2-D region and point C (§6, Fig. 14)"
    claim = ("With at most k_max = 100 requests per batch the stability region is 2-D (Theorem 10). Its vertex C "
             "is batches of 29 prefill + 99 decode tokens every 46.75 ms, (0.6203, 2.1176) tokens/ms. At point C "
             "(one request every 467.5 ms, 290 + 990 tokens) only Sarathi with b_max = 128 stays stable (≈ 99 in "
             "the system, 29 + 99 batches); Sarathi-1024, Orca-128, vanilla vLLM-128 and FasterTransformer-128 "
             "diverge (paper §6.2). Which policy reaches the whole region is open.")
    published: ClassVar[dict[str, Any]] = {"vertex_C_batch": "29 prefill + 99 decode", "vertex_C_tokens_per_ms": [0.6203, 2.1176],
                 "sarathi_128_in_system": 99}

    def jobs(self, s):
        out = []
        for label, sched, budget, opts in POINT_C_RUNS:
            data = scenario_config("point-c", scheduler=sched, budget=budget, horizon=s.pointc_horizon)
            data["engine"].update(opts)
            out.append((label, single_job(data, ("series", "served", "shapes")), 0))
        return out

    def assemble(self, s, got, searched, plots):
        from llmqueue.analysis.region import stability_region
        regions = {b: stability_region(PAPER_STAIRCASE, b, 100) for b in (128, 512, 1024)}
        numbers: dict[str, Any] = {}
        vrows = []
        for b, reg in regions.items():
            verts = [v for v in reg.vertices if v.batch is not None]
            c = next((v for v in verts if (v.batch.num_prefill_tokens, v.batch.num_decode_tokens) == (29, 99)), None)
            numbers[f"region_{b}"] = {"vertices": [v.to_dict() for v in reg.vertices],
                                      "vertex_C": None if c is None else [c.prefill_rate / 1e3, c.decode_rate / 1e3]}
            vrows.append([str(b), str(len(reg.vertices)),
                          "; ".join(f"{v.batch.num_prefill_tokens}+{v.batch.num_decode_tokens} → "
                                    f"({v.prefill_rate / 1e3:.4f}, {v.decode_rate / 1e3:.4f})" for v in verts),
                          "–" if c is None else f"({c.prefill_rate / 1e3:.4f}, {c.decode_rate / 1e3:.4f})"])
        data = scenario_data("point-c")
        w = data["workload"]
        pos = {b: reg.locate(w["rate"], w["prompt"]["value"], w["output"]["value"]) for b, reg in regions.items()}
        rows, series, served = [], {}, []
        for label, sched, budget, _ in POINT_C_RUNS:
            r = got(label, 0)
            if r is None:
                rows.append([label, "error", "", "", "", "", "", PAPER_POINT_C.get(label, "–")])
                continue
            shape = r.get("steady_shapes") or []
            top = f"{shape[0]['prefill']}+{shape[0]['decode']} ({shape[0]['share']:.0%})" if shape else "– (no batches)"
            numbers[label] = {k: r[k] for k in ("verdict", "mean_in_system", "final_in_system", "rejected", "completed",
                                                "backlog_slope_tokens_per_s", "work_conserving_violations")}
            numbers[label]["steady_shapes"] = shape
            numbers[label]["served_tokens_per_ms"] = [r["served"]["prefill_tokens_per_s"] / 1e3,
                                                      r["served"]["decode_tokens_per_s"] / 1e3]
            rows.append([label, r["verdict"], num(r["mean_in_system"], 1), str(r["final_in_system"]), str(r["rejected"]),
                         top, f"({numbers[label]['served_tokens_per_ms'][0]:.3f}, {numbers[label]['served_tokens_per_ms'][1]:.3f})",
                         PAPER_POINT_C.get(label, "–")])
            series[label] = (r["series"], r["verdict"])
            served.append((label, budget, (r["served"]["prefill_tokens_per_s"], r["served"]["decode_tokens_per_s"]),
                           r["verdict"]))   # the figure is in tokens/s, as the CLI prints
        figures.region(regions, pos[128], served, plots / "region.png")
        figures.in_system_lines(series, "Point C: requests in the system (+1, log scale)", plots / "point_c_in_system.png")
        c_ok = all(numbers[f"region_{b}"]["vertex_C"] is not None and
                   np.allclose(numbers[f"region_{b}"]["vertex_C"], self.published["vertex_C_tokens_per_ms"], atol=1e-4)
                   for b in regions)
        runs_ok = all(label in numbers and numbers[label]["verdict"] == want for label, want in PAPER_POINT_C.items())
        s128 = numbers.get("sarathi-128", {})
        shape_ok = bool(s128.get("steady_shapes")) and (s128["steady_shapes"][0]["prefill"], s128["steady_shapes"][0]["decode"]) == (29, 99)
        verdict = REPRODUCED if c_ok and runs_ok and shape_ok else DIFFERS
        nosplit = [lab for lab in ("vllm-128 (no split)", "fastertransformer-128 (no split)") if lab in numbers]
        vc = numbers["region_128"]["vertex_C"]
        shown_c = "none" if vc is None else f"({vc[0]:.4f}, {vc[1]:.4f})"
        text = (f"Vertex C = {shown_c} tokens/ms (computed, all three budgets: "
                f"{'the same as' if c_ok else 'NOT the published'} (0.6203, 2.1176)). Point C lies "
                f"{WHERE[pos[128].status]} the region (ρ along its ray {pos[128].rho:.4f}). "
                + ("The paper's five runs end as it says" if runs_ok else "Some of the paper's five runs end differently")
                + (f"; Sarathi-128 holds {s128.get('mean_in_system', float('nan')):.1f} requests on average with "
                   f"{'29+99' if shape_ok else 'OTHER'} batches in steady state" if s128 else "")
                + ". Beyond the paper: " + ", ".join(f"{lab} {numbers[lab]['verdict']}" for lab in
                                                     ("maxweight-1024", "vllm-v1-128", "vllm-v1-1024") if lab in numbers)
                + " (maxweight is this project's region-reaching scheduler; vLLM v1 batches like Sarathi here). "
                + (f"Without prompt splitting ({', '.join(nosplit)}) no 290-token prompt fits a 128-token batch: "
                   "every request is rejected and nothing is served (an open point of the paper's §4)." if nosplit else ""))
        return self.result(
            config=scenario_text("point-c").strip() + f"\n\n# runs: {', '.join(lab for lab, *_ in POINT_C_RUNS)}; "
                                                      f"run.horizon_s = {s.pointc_horizon:g}",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Vertices of the region (computed, k_max = 100, the paper's staircase): batch type "
                          "(prefill + decode tokens) → (prefill, decode) tokens/ms.",
                          ["b_max", "vertices", "batch type → rates", "vertex C (29+99)"], vrows),
                    Table("Point C, one run each (deterministic arrivals and lengths). 'paper' is the published outcome.",
                          ["run", "verdict", "mean in system", "final", "rejected", "most common batch (2nd half)",
                           "served (prefill, decode) tokens/ms", "paper"], rows)],
            plots=[("region.png", "The regions for b_max = 128, 512, 1024 (k_max = 100), point C and what each run served."),
                   ("point_c_in_system.png", "Requests in the system at point C.")])


# ---- 6. §5 networks --------------------------------------------------------------------

RS_POLICIES = [  # (label, scenario, per-engine sets)
    ("priority to the leaving class", "rybko-stolyar", []),
    ("reverse priority", "rybko-stolyar-reverse", []),
    ("fcfs (K-FCFS)", "rybko-stolyar", ["policy=fcfs"]),
    ("max-pressure", "rybko-stolyar", ["policy=max-pressure"]),
]
TOPOLOGIES = ("dag", "fork-join")


def _engine_names(scenario: str) -> list[str]:
    from llmqueue.network import load_network
    return [e.name for e in load_network(scenario).engines]


def _wave_ratios(series: dict | None) -> list[float]:
    """Successive peak ratios of the backlog waves that alternate between the two engines."""
    if not series:
        return []
    from llmqueue.network.overlay import wave_peaks

    arrays = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    peaks = wave_peaks(arrays, ["S1", "S2"], floor=0.05 * float(arrays["total_backlog_tokens"].max()))
    return [b[2] / a[2] for a, b in zip(peaks, peaks[1:]) if a[2] > 0]


def _fluid_text(f: dict) -> str:
    if f["fluid_growth_per_half_cycle"] is None:
        return ""
    sim = f["simulated_peak_ratio_geomean"]
    return (f"The fluid model (`network capacity`: exact, from a standard initial backlog) {f['fluid_outcome']} with "
            f"peaks ×{f['fluid_growth_per_half_cycle']:.3f} per half-cycle (λm/(1 − λm), m = 544/768); the simulated "
            "waves' peaks (seed 0) grew " + ("— too few waves to say" if sim is None else
                                            f"×{sim:.3f} (geometric mean of {len(f['simulated_peak_ratios'])} ratios, "
                                            f"{sim / f['fluid_growth_per_half_cycle'] - 1:+.1%})") + ". ")


class Networks(Section):
    key, title = "networks", "6. Networks of LLM agents (§5): Rybko–Stolyar, fork-join and DAG"
    claim = ("For DAG and fork-join routing, work-conserving (K-FCFS) scheduling at every engine is throughput-"
             "optimal: stable whenever each engine's load is below its capacity. For cyclic routing it is not: in "
             "the Rybko–Stolyar network (two Sarathi engines, b_max = 768, t ≡ 1, ρ = 0.9 at both), strict "
             "priority to the class leaving each engine diverges, the reverse priority is stable (paper §5.4).")
    published: ClassVar[dict[str, Any]] = {"rybko_stolyar_rho": 0.9, "rybko_stolyar_lambda_per_type": 1.1368}

    def jobs(self, s):
        out = []
        for label, scenario, per in RS_POLICIES:
            sets = [f"run.horizon_s={s.rs_horizon}"] + [f"engines.{e}.{x}" for e in ("S1", "S2") for x in per]
            for seed in range(s.rs_seeds):
                out.append((f"rs:{label}", {"kind": "network", "source": scenario, "sets": sets,
                                            "keep": ["series", "fluid"]}, seed))
        for scenario in TOPOLOGIES:
            for sched in ("sarathi", "orca"):
                for load in (0.9, 1.1):
                    if sched == "orca" and (scenario != "fork-join" or load != 0.9):
                        continue  # one Orca run: the finding beyond the paper
                    sets = [f"network.load={load}", f"run.horizon_s={s.topo_horizon}"]
                    sets += [f"engines.{e}.scheduler={sched}" for e in _engine_names(scenario)]
                    for seed in range(s.topo_seeds):
                        out.append((f"{scenario}/{sched}@{load}", {"kind": "network", "source": scenario, "sets": sets,
                                                                   "keep": ["series"]}, seed))
        return out

    def assemble(self, s, got, searched, plots):
        numbers: dict[str, Any] = {}
        rows, rs_series, rs_fluid = [], {}, {}
        for label, _, _ in RS_POLICIES:
            runs = [got(f"rs:{label}", seed) for seed in range(s.rs_seeds)]
            ok = [r for r in runs if r]
            nv = [r["network"] for r in ok]
            numbers[f"rs:{label}"] = {"verdicts": verdict_counts([r["network"] if r else None for r in runs]),
                                      "peak_backlog_tokens": [n["peak_backlog_tokens"] for n in nv],
                                      "slope_tokens_per_s": [n["backlog_slope_tokens_per_s"] for n in nv],
                                      "violations": [n["work_conserving_violations"] for n in nv]}
            rows.append([label, show_counts(numbers[f"rs:{label}"]["verdicts"]),
                         " / ".join(f"{p / 1e3:,.0f}k" for p in numbers[f"rs:{label}"]["peak_backlog_tokens"]),
                         " / ".join(num(x, 1) for x in numbers[f"rs:{label}"]["slope_tokens_per_s"]),
                         str(sum(numbers[f"rs:{label}"]["violations"]))])
            if ok:
                rs_series[label] = ok[0]["series"]
                rs_fluid.setdefault(label, ok[0].get("fluid"))
        trows, topo_series = [], {}
        for scenario in TOPOLOGIES:
            for sched, load in (("sarathi", 0.9), ("sarathi", 1.1), ("orca", 0.9)):
                key = f"{scenario}/{sched}@{load}"
                if sched == "orca" and scenario != "fork-join":
                    continue
                runs = [got(key, seed) for seed in range(s.topo_seeds)]
                ok = [r for r in runs if r]
                nv = [r["network"] for r in ok]
                numbers[key] = {"verdicts": verdict_counts([r["network"] if r else None for r in runs]),
                                "slope_tokens_per_s": [n["backlog_slope_tokens_per_s"] for n in nv],
                                "bottleneck": nv[0]["bottleneck"] if nv else None,
                                "max_rho": nv[0]["max_rho"] if nv else None}
                engines = ", ".join(f"{e['engine']} {e['verdict']}" for e in ok[0]["engines"]) if ok else "–"
                trows.append([scenario, sched, f"{load:g}", num(numbers[key]["max_rho"], 3),
                              show_counts(numbers[key]["verdicts"]),
                              " / ".join(num(x, 1) for x in numbers[key]["slope_tokens_per_s"]),
                              str(numbers[key]["bottleneck"]), engines])
                if ok and sched == "sarathi":
                    topo_series[f"{scenario} at {load:g}"] = ok[0]["series"]
        from llmqueue.plots import plot_network_backlog
        bad_label = RS_POLICIES[0][0]
        fluid = rs_fluid.get(bad_label)
        waves = _wave_ratios(rs_series.get(bad_label))
        from llmqueue.network import load_network
        from llmqueue.network.analysis import analyze_network
        from llmqueue.network.stability import stability

        bad_net = load_network(RS_POLICIES[0][1])
        closed = stability(bad_net, analyze_network(bad_net)).fluid or {}
        numbers["rs_fluid"] = {"fluid_growth_per_half_cycle": closed.get("growth_factor"),
                               "fluid_outcome": closed.get("outcome"),
                               "fluid_from_the_run": None if not fluid else {"t0_s": fluid["t0_s"],
                                                                             "outcome": fluid["outcome"],
                                                                             "growth_factor": fluid["growth_factor"]},
                               "simulated_peak_ratios": waves,
                               "simulated_peak_ratio_geomean": float(np.exp(np.mean(np.log(waves)))) if waves else None}
        if rs_series:
            plot_network_backlog(rs_series, plots / "rybko_stolyar.png",
                                 "Rybko–Stolyar at ρ = 0.9 (seed 0): network backlog by per-engine policy",
                                 detail=bad_label if bad_label in rs_series else None, fluid=fluid)
        if topo_series:
            plot_network_backlog(topo_series, plots / "topologies.png",
                                 "DAG and fork-join, Sarathi at every engine (seed 0): network backlog")

        def verdicts(key):
            return numbers[key]["verdicts"]
        rs_bad = verdicts("rs:priority to the leaving class")
        rs_good = verdicts("rs:reverse priority")
        rs_ok = set(rs_bad) == {"unstable"} and set(rs_good) == {"stable"}
        topo_ok = all("unstable" not in verdicts(f"{sc}/sarathi@0.9") and "error" not in verdicts(f"{sc}/sarathi@0.9")
                      and set(verdicts(f"{sc}/sarathi@1.1")) == {"unstable"} for sc in TOPOLOGIES)
        mp = verdicts("rs:max-pressure")
        orca_fj = verdicts("fork-join/orca@0.9")
        verdict = REPRODUCED if rs_ok and topo_ok else DIFFERS
        text = (f"Rybko–Stolyar at ρ = 0.9: priority to the leaving class {show_counts(rs_bad)}, the reverse priority "
                f"{show_counts(rs_good)} ({'as the paper says' if rs_ok else 'NOT as the paper says'}). DAG and fork-join "
                f"with Sarathi: {'never unstable at 0.9 and unstable at 1.1 of the traffic equations’ capacity' if topo_ok else 'NOT as predicted'}. "
                + _fluid_text(numbers["rs_fluid"]) +
                f"Beyond the paper: max-pressure over Sarathi is {show_counts(mp)} on Rybko–Stolyar; Orca at both engines "
                f"of the fork-join scenario (whose summariser returns to the planner's engine) is {show_counts(orca_fj)} at 0.9 "
                "— a revisited engine's prefill-first order can starve the downstream engine (docs/network.md).")
        return self.result(
            config=_config_block("rybko-stolyar", [f"policies: {', '.join(lab for lab, *_ in RS_POLICIES)}",
                                                   f"run.horizon_s = {s.rs_horizon:g}", f"seeds 0..{s.rs_seeds - 1}"])
            + f"\n\n# topologies: dag, fork-join at network.load = 0.9, 1.1 (Sarathi), fork-join 0.9 (Orca); "
              f"run.horizon_s = {s.topo_horizon:g}, seeds 0..{s.topo_seeds - 1}; `llmqueue scenarios show dag`",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Rybko–Stolyar at ρ = 0.9: network verdict per seed, peak backlog, backlog slope (tokens/s, "
                          "after the warm-up), work-conservation violations.",
                          ["policy at both engines", "verdicts", "peak backlog", "slope tokens/s", "violations"], rows),
                    Table("DAG and fork-join at a fraction of the traffic equations' capacity.",
                          ["scenario", "scheduler", "load", "max ρ", "verdicts", "slope tokens/s", "bottleneck",
                           "engines (seed 0)"], trows)],
            plots=[("rybko_stolyar.png", "Rybko–Stolyar: network backlog by policy; right, the diverging one engine by "
                                         "engine; dashed, the fluid model started from that run's state."),
                   ("topologies.png", "DAG and fork-join: network backlog below and above capacity.")])


# ---- 7. Latency ------------------------------------------------------------------------

LAT_SCHEDULERS = ("sarathi", "orca")


class Latency(Section):
    key, title = "latency", "7. Latency against load and token budget"
    claim = ("Not measured in the paper (latency and the token budget's latency trade-off are among "
             "what it leaves out): a larger budget raises capacity but lengthens each batch, so time between tokens "
             "grows with the budget while time to first token falls near capacity.")

    def jobs(self, s):
        lam = lambda_star(512, *FIG1_MEANS)
        return [(f"{sched}/{b}@{f}", single_job(scenario_config("fig1", scheduler=sched, budget=b, rate=round(f * lam, 6),
                                                                horizon=s.lat_horizon)), 0)
                for sched in LAT_SCHEDULERS for b in s.lat_budgets for f in s.lat_loads]

    def assemble(self, s, got, searched, plots):
        lam = lambda_star(512, *FIG1_MEANS)
        rows, numbers, pts = [], {"lambda_star_512_rps": lam}, {}
        for sched in LAT_SCHEDULERS:
            for b in s.lat_budgets:
                for f in s.lat_loads:
                    r = got(f"{sched}/{b}@{f}", 0)
                    if r is None:
                        continue
                    d = {m: {q: r[f"{m}_s"][q] for q in ("p50", "p90", "p99")} for m in ("ttft", "tbt", "e2e")}
                    d["verdict"], d["rho"] = r["verdict"], r["rho"]
                    numbers[f"{sched}/{b}@{f}"] = d
                    pts[(sched, b, f)] = d
                    rows.append([sched, str(b), num(f * lam), num(r["rho"], 2), r["verdict"],
                                 *(num(d[m][q] * (1e3 if m == "tbt" else 1), 1 if m == "tbt" else 3)
                                   for m in ("ttft", "tbt", "e2e") for q in ("p50", "p99"))])
        figures.latency(pts, LAT_SCHEDULERS, s.lat_budgets, s.lat_loads, lam, plots / "latency.png")
        facts = []
        for sched in LAT_SCHEDULERS:
            for f in s.lat_loads:
                stable = [b for b in s.lat_budgets if (sched, b, f) in pts and pts[(sched, b, f)]["verdict"] == "stable"
                          and pts[(sched, b, f)]["tbt"]["p50"] is not None]
                if len(stable) >= 2:
                    tbt = [pts[(sched, b, f)]["tbt"]["p50"] for b in stable]
                    ttft = [pts[(sched, b, f)]["ttft"]["p99"] for b in stable]
                    facts.append({"scheduler": sched, "load": f, "budgets": stable,
                                  "tbt_p50_grows_with_budget": bool(all(np.diff(tbt) >= -1e-9)),
                                  "best_ttft_p99_budget": stable[int(np.argmin(ttft))],
                                  "best_tbt_p50_budget": stable[int(np.argmin(tbt))]})
        numbers["observations"] = facts
        top = [x for x in facts if x["load"] == max(s.lat_loads)] or facts[-1:]
        text = ("Beyond the paper (no published numbers to compare). "
                + " ".join(f"{x['scheduler']} at {x['load']:g}·λ*(512): median time between tokens "
                           f"{'grows' if x['tbt_p50_grows_with_budget'] else 'does not always grow'} with the budget "
                           f"(lowest at b_max = {x['best_tbt_p50_budget']}), p99 time to first token is lowest at "
                           f"b_max = {x['best_ttft_p99_budget']}." for x in top)
                + " Budgets whose own λ* is below the offered rate are unstable there: the throughput side of the trade-off.")
        return self.result(
            config=_config_block("fig1", [f"engine.scheduler = {', '.join(LAT_SCHEDULERS)}",
                                          f"engine.token_budget = {', '.join(map(str, s.lat_budgets))}",
                                          f"workload.rate = {', '.join(f'{f:g}' for f in s.lat_loads)} × λ*(512) = "
                                          f"{', '.join(num(f * lam) for f in s.lat_loads)} req/s",
                                          f"run.horizon_s = {s.lat_horizon:g}", "seed 0"]),
            verdict=BEYOND, verdict_text=text, numbers=numbers,
            tables=[Table("Latency percentiles (simulated, seed 0): TTFT and E2E in seconds, TBT (time between tokens) "
                          "in milliseconds. ρ is relative to each budget's own capacity.",
                          ["scheduler", "b_max", "λ req/s", "ρ", "verdict", "TTFT p50", "TTFT p99", "TBT p50 ms",
                           "TBT p99 ms", "E2E p50", "E2E p99"], rows)],
            plots=[("latency.png", "TTFT p99, TBT p50 and E2E p99 against the arrival rate, one line per budget.")])


# ---- 8. KV-cache memory -----------------------------------------------------------------

#: Dong & Cao's setting on the engine: one token per request per iteration (a constant iteration
#: time, a budget that never binds), memory in tokens (block_size 1), M = 16,492 tokens.
DONG_CAO = {
    "engine": {"scheduler": "sarathi", "token_budget": 4096, "kv_blocks": 16493, "block_size": 1,
               "batch_time": {"model": "constant", "duration_ms": 10.0}},
    "workload": {"arrival": "poisson", "rate": 1000.0, "prompt": {"dist": "fixed", "value": 10},
                 "output": {"dist": "uniform", "low": 20, "high": 60}},
    "run": {"horizon_s": 300.0, "seed": 0},
}
MEM_POLICIES = ("recompute", "reserve")
THRASH_SCHEDULERS = ("orca", "sarathi", "maxweight")


class Memory(Section):
    key, title = "memory", "8. KV-cache memory: the largest stable rate against the memory bounds"
    claim = ("Beyond the paper, whose model has no memory. With a KV cache of M tokens a request of prompt l and "
             "output o holds w = l·o + (o + o²)/2 token-iterations, so stability needs λ·E[w]·t̄ ≤ M (Dong & Cao, "
             "arXiv 2604.11001): a necessary memory bound λ_mem next to Theorem 2's λ*. In a fluid model where memory "
             "is never wasted, work-conserving policies are stable below λ_mem(1 − δ), δ = ess sup (l + o)/M (Nie, "
             "Si & Zhou, arXiv 2605.04595). Checked: no largest stable rate found by simulation exceeds min(λ*, "
             "λ_mem); in their setting (one token per request per iteration, bounded lengths) the bisection lands "
             "between the two bounds.")

    def searches(self, s):
        out = [("dong-cao", {**DONG_CAO, "run": {"horizon_s": s.mem_dc_horizon, "seed": 0}})]
        for blocks in s.mem_blocks:
            for policy in MEM_POLICIES:
                data = scenario_config("fig1", scheduler="sarathi", load=0.9, horizon=s.maxrate_horizon)
                data["engine"].update(kv_blocks=blocks, kv_policy=policy)
                out.append((f"fig1/{blocks}/{policy}", data))
        return out

    def jobs(self, s):
        return [(f"thrash/{sched}", single_job(_thrash_config(sched, s.thm2_horizon)), seed)
                for sched in THRASH_SCHEDULERS for seed in range(s.mem_seeds)]

    def assemble(self, s, got, searched, plots):
        from llmqueue.config import parse_config
        from llmqueue.runner import build_workload, memory_of

        rows, numbers, points = [], {}, []
        for name, r in searched.items():
            data = DONG_CAO if name == "dong-cao" else None
            if data is None:
                _, blocks, policy = name.split("/")
                data = scenario_config("fig1", scheduler="sarathi", load=0.9)
                data["engine"].update(kv_blocks=int(blocks), kv_policy=policy)
            cfg = parse_config(data)
            m = memory_of(cfg, build_workload(cfg))
            bound = min(m.token_bound_rps, m.memory_necessary_blocks_rps)
            d = {"label": name, "max_rate_rps": r.max_rate_rps, "failed_rate_rps": r.failed_rate_rps,
                 "lambda_star_rps": m.token_bound_rps, "memory_bound_rps": m.memory_necessary_blocks_rps,
                 "sufficient_rps": m.memory_sufficient_blocks_rps, "binding": m.binding,
                 "ratio_to_bound": None if r.max_rate_rps is None else r.max_rate_rps / bound,
                 "probes": len(r.probes)}
            numbers[name] = d
            points.append(d)
            rows.append([name, num(m.token_bound_rps), num(m.memory_necessary_blocks_rps),
                         num(m.memory_sufficient_blocks_rps), m.binding, num(r.max_rate_rps), num(r.failed_rate_rps),
                         num(d["ratio_to_bound"], 3)])
        if points:
            figures.memory(points, plots / "memory_max_rate.png")
        tol = s.maxrate_rel_tol
        never_above = bool(points) and all(d["max_rate_rps"] is None or d["ratio_to_bound"] <= 1 + tol for d in points)
        dc = numbers.get("dong-cao")
        between = (dc is not None and dc["max_rate_rps"] is not None and dc["failed_rate_rps"] is not None
                   and dc["sufficient_rps"] is not None
                   and dc["failed_rate_rps"] >= dc["sufficient_rps"] * (1 - tol)
                   and dc["max_rate_rps"] <= dc["memory_bound_rps"] * (1 + tol))
        trows = []
        for sched in THRASH_SCHEDULERS:
            runs = [got(f"thrash/{sched}", seed) for seed in range(s.mem_seeds)]
            ok = [r for r in runs if r]
            kv = [r["kv"] for r in ok if "kv" in r]
            numbers[f"thrash/{sched}"] = {"verdicts": verdict_counts(runs),
                                          "preemptions": mean([k["preemptions"] for k in kv]),
                                          "recompute_share": mean([k["recompute_share"] for k in kv])}
            trows.append([sched, show_counts(verdict_counts(runs)), num(numbers[f"thrash/{sched}"]["preemptions"], 0),
                          num(None if not kv else 100 * numbers[f"thrash/{sched}"]["recompute_share"], 1)])
        verdict = REPRODUCED if never_above and between else DIFFERS
        thrash = parse_config(_thrash_config("orca", s.thm2_horizon))
        tw = build_workload(thrash)
        tm = memory_of(thrash, tw)
        numbers["thrash_bounds"] = {"arrival_rate_rps": tw.arrival_rate, "memory_bound_rps": tm.memory_necessary_blocks_rps,
                                    "sufficient_rps": tm.memory_sufficient_blocks_rps}
        text = ((f"In Dong & Cao's setting the bisection brackets [{num(dc['max_rate_rps'])}, {num(dc['failed_rate_rps'])}] "
                 f"req/s against the sufficient {num(dc['sufficient_rps'])} and necessary {num(dc['memory_bound_rps'])} "
                 f"memory bounds ({'agrees' if between else 'does NOT agree'}, λ* = {num(dc['lambda_star_rps'])} far above). "
                 if dc else "Dong & Cao's setting was not searched. ")
                + ("No largest stable rate is above min(λ*, λ_mem)" if never_above else
                   "Some largest stable rate is ABOVE min(λ*, λ_mem)")
                + f" (within the {tol:.0%} bracket). On the Fig. 1 engine (staircase batch time, unbounded lengths) "
                "Sarathi reaches " + ", ".join(f"{d['label'].split('/', 1)[1]} {num(d['ratio_to_bound'], 2)}"
                                               for d in points if d["label"] != "dong-cao")
                + " of the bound: lumpy batches raise t̄ above the fixed point's and preempted requests recompute. "
                "The theorem2 workload at half of λ* with 600 blocks (below both memory bounds) shows why nothing "
                "is predicted below λ_mem: " + "; ".join(f"{r[0]} {r[1]}" for r in trows) + ".")
        return self.result(
            config="# Dong & Cao's setting on the engine (searched):\n" + _toml(DONG_CAO)
                   + "\n\n" + _config_block("fig1", [f"engine.kv_blocks = {', '.join(map(str, s.mem_blocks))}",
                                                     f"engine.kv_policy = {', '.join(MEM_POLICIES)}",
                                                     "engine.scheduler = sarathi",
                                                     f"bisection: {s.maxrate_seeds} seed(s), {s.maxrate_horizon:g} s "
                                                     f"runs (Dong & Cao: {s.mem_dc_horizon:g} s), bracket "
                                                     f"{s.maxrate_rel_tol:.0%}",
                                                     "thrash runs: theorem2 scenario, kv_blocks = 600, load 0.5, "
                                                     f"{s.thm2_horizon:g} s, seeds 0..{s.mem_seeds - 1}"]),
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Largest stable rate by bisection (llmqueue max-rate) against the closed form (requests/s; "
                          "memory bounds in blocks, as the engine allocates). ratio = max stable / min(λ*, λ_mem).",
                          ["configuration", "λ* (Thm 2)", "λ_mem (necessary)", "sufficient (fluid)", "binding",
                           "max stable", "fails at", "ratio"], rows),
                    Table(f"Below both memory bounds: (l, o) = (100, 100) at 0.5·λ*, 600 blocks of 16 tokens (λ = "
                          f"{num(tw.arrival_rate)} req/s, λ_mem = {num(tm.memory_necessary_blocks_rps)}, sufficient "
                          f"{num(tm.memory_sufficient_blocks_rps)}). Verdicts over seeds, mean preemptions and the "
                          "share of work recomputed.", ["scheduler", "verdicts", "preemptions", "recomputed %"], trows)],
            plots=[("memory_max_rate.png", "Bisection brackets against λ_mem, the fluid sufficient bound and λ*.")])


# ---- 9. Clusters ------------------------------------------------------------------------

#: One token per batch (budget 1, 10 ms batches, Sarathi's FCFS): each replica serves one request
#: at a time, a service of 1 + o batches, o geometric with mean 9: 0.1 s on average.
UNBATCHED_POOL = {
    "engine": {"scheduler": "sarathi", "token_budget": 1, "batch_time": {"model": "constant", "duration_ms": 10.0}},
    "workload": {"arrival": "poisson", "prompt": {"dist": "fixed", "value": 1},
                 "output": {"dist": "geometric", "mean": 9}},
    "cluster": {"replicas": 16},
}
CL_ROUTERS = ("random", "power-of-d", "jsq")
PD_SPLITS = ("pd-2-6", "pd-4-4", "pd-6-2")


def _cluster_job(data: dict, horizon: float | None = None) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if horizon is not None:
        data["run"] = {**data.get("run", {}), "horizon_s": horizon}
    return {"kind": "cluster", "config": data}


def _unbatched(load: float, router: str, horizon: float) -> dict:
    data = {**UNBATCHED_POOL, "workload": {**UNBATCHED_POOL["workload"], "load": load},
            "cluster": {**UNBATCHED_POOL["cluster"], "router": router}}
    return _cluster_job(data, horizon)


def _service_moments() -> tuple[float, float]:
    """The unbatched pool's service, in batches: its mean and squared coefficient of variation,
    from the workload's own output distribution (10^6 draws, a fixed seed)."""
    from llmqueue.config import parse_config
    from llmqueue.runner import build_workload

    single = {k: v for k, v in UNBATCHED_POOL.items() if k != "cluster"}
    wl = build_workload(parse_config({**single, "workload": {**single["workload"], "rate": 1.0}}))
    o = wl.generate(0, num_requests=1_000_000).num_output_tokens.astype(float)
    service = 1.0 + o
    return float(service.mean()), float(service.var() / service.mean() ** 2)


class Clusters(Section):
    key, title = "clusters", "9. Clusters: routers, pooled capacity and prefill/decode disaggregation"
    claim = ("Beyond the paper, whose model is one engine: a pool of replicas, each the paper's engine, behind a router "
             "(docs/cluster.md). Routing theory checked on the simulator: random routing splits a Poisson stream, so "
             "each replica is an independent engine at λ/N (with one request served at a time, an M/G/1 queue: "
             "Pollaczek–Khinchine); power of two choices comes close to Mitzenmacher's supermarket limit "
             "Σ ρ^(2^i − 2) and far below random, JSQ lower still; on a mixed pool at 0.8 of the pooled capacity "
             "equal-weight random routing overloads the slow replicas while JSQ keeps every replica stable; and a "
             "prefill/decode split is stable exactly where both pools' Theorem 2 capacities carry the load.")

    def jobs(self, s):
        from llmqueue.cluster.scenarios import scenario_data as cluster_scenario

        out = []
        for load in s.cl_loads:
            for router in CL_ROUTERS:
                out += [(f"unbatched/{load}/{router}", _unbatched(load, router, s.cl_horizon), seed)
                        for seed in range(s.cl_seeds)]
        for seed in range(s.cl_seeds):
            out.append(("identical/pool", _cluster_job(cluster_scenario("pool-random"), s.cl_long), seed))
            out.append(("identical/engine", single_job(scenario_config("fig1", scheduler="sarathi", load=0.9,
                                                                       horizon=s.cl_long)), 1000 + seed))
            mixed = cluster_scenario("pool-heterogeneous")
            for router in ("random", "jsq"):
                mixed["cluster"]["router"] = router
                out.append((f"mixed/{router}", _cluster_job(mixed, s.cl_long), seed))
        for name in PD_SPLITS:
            out.append((name, _cluster_job(cluster_scenario(name), s.cl_pd_horizon), 0))
        return out

    def assemble(self, s, got, searched, plots):
        from llmqueue.cluster.capacity import mg1_sojourn, supermarket_sojourn
        from llmqueue.cluster.disagg import load_disagg, plan

        mean_service, cv2 = _service_moments()
        numbers: dict[str, Any] = {"service_batches_mean": mean_service, "service_cv2": cv2}
        checks: list[bool] = []
        urows, points = [], {}
        tol_pk, tol_sm = (0.15, 0.25) if s.name != "smoke" else (1.0, 1.0)
        for load in s.cl_loads:
            got_means = {}
            for router in CL_ROUTERS:
                runs = [got(f"unbatched/{load}/{router}", seed) for seed in range(s.cl_seeds)]
                e2e = [r["pool"]["e2e_s"]["mean"] for r in runs if r and r["pool"]["e2e_s"]]
                got_means[router] = None if not e2e else float(np.mean(e2e)) / (mean_service * 0.01)
            pk, sm = mg1_sojourn(load, cv2), supermarket_sojourn(load, 2)
            r, p, j = got_means["random"], got_means["power-of-d"], got_means["jsq"]
            ok = (None not in (r, p, j) and abs(r / pk - 1) <= tol_pk and abs(p / sm - 1) <= tol_sm
                  and j <= p < r)
            checks.append(ok)
            numbers[f"unbatched/{load}"] = {"random": r, "power_of_two": p, "jsq": j, "mg1": pk, "supermarket": sm,
                                            "agrees": ok}
            points[load] = numbers[f"unbatched/{load}"]
            urows.append([f"{load:g}", num(r), num(pk), num(p), num(sm), num(j), "yes" if ok else "NO"])
        if points:
            figures.routers(points, plots / "cluster_routers.png")
        # random to N identical replicas against one engine at λ/N
        pool_runs = [got("identical/pool", seed) for seed in range(s.cl_seeds)]
        engine_runs = [got("identical/engine", 1000 + seed) for seed in range(s.cl_seeds)]
        rep_e2e = [rr["summary"]["e2e_s"]["mean"] for r in pool_runs if r for rr in r["replicas"]]
        eng_e2e = [r["e2e_s"]["mean"] for r in engine_runs if r]
        ident = {"replica_e2e_mean_s": mean(rep_e2e), "engine_e2e_mean_s": mean(eng_e2e),
                 "replica_verdicts": verdict_counts([rr["summary"] for r in pool_runs if r for rr in r["replicas"]]),
                 "engine_verdicts": verdict_counts(engine_runs)}
        tol_id = 0.05 if s.name != "smoke" else 1.0
        ident["agrees"] = bool(rep_e2e and eng_e2e and abs(ident["replica_e2e_mean_s"] / ident["engine_e2e_mean_s"] - 1)
                               <= tol_id)
        checks.append(ident["agrees"])
        numbers["identical"] = ident
        # the mixed pool
        mrows = []
        for router in ("random", "jsq"):
            runs = [got(f"mixed/{router}", seed) for seed in range(s.cl_seeds)]
            ok_runs = [r for r in runs if r]
            pool_v = verdict_counts([r["pool"] for r in ok_runs])
            slow_v = verdict_counts([rr["summary"] for r in ok_runs for rr in r["replicas"]
                                     if rr["replica"].startswith("slow")])
            shares = [[rr["share"] for rr in r["replicas"]] for r in ok_runs]
            numbers[f"mixed/{router}"] = {"pool": pool_v, "slow_replicas": slow_v,
                                          "shares": None if not shares else np.mean(shares, axis=0).tolist()}
            want = UNSTABLE_V if router == "random" else "stable"
            ok = bool(ok_runs) and all_are([r["pool"] for r in ok_runs], want) and (
                router == "jsq" or all_are([rr["summary"] for r in ok_runs for rr in r["replicas"]
                                            if rr["replica"].startswith("slow")], UNSTABLE_V))
            checks.append(ok or s.name == "smoke")
            mrows.append([router, show_counts(pool_v), show_counts(slow_v),
                          " / ".join(f"{100 * x:.0f} %" for x in numbers[f"mixed/{router}"]["shares"] or []),
                          "yes" if ok else "NO"])
        # prefill/decode splits of 8 GPUs
        prows = []
        planned = {f"{p['prefill']}:{p['decode']}": p for p in plan(load_disagg(PD_SPLITS[0]), 8)}
        for name in PD_SPLITS:
            run = got(name, 0)
            split = name.removeprefix("pd-").replace("-", ":")
            lam_pd = planned[split]["max_stable_rate_rps"]
            rate = None if run is None else run["arrival_rate"]
            expect = None if rate is None else ("stable" if rate < lam_pd else UNSTABLE_V)
            verdict = None if run is None else run["verdict"]
            ok = verdict is not None and verdict == expect
            checks.append(ok or s.name == "smoke")
            numbers[name] = {"lambda_pd_rps": lam_pd, "binds": planned[split]["binding"], "rate_rps": rate,
                             "verdict": verdict, "expected": expect}
            prows.append([split, num(planned[split]["prefill_rate_rps"]), num(planned[split]["decode_rate_rps"]), num(lam_pd),
                          planned[split]["binding"], num(rate), verdict or "—", "yes" if ok else "NO"])
        verdict = REPRODUCED if all(checks) else DIFFERS
        u = numbers.get(f"unbatched/{s.cl_loads[-1]}", {})
        text = (f"Unbatched pools of 16 (service {num(mean_service * 0.01, 3)} s, c² = {num(cv2, 3)}): at ρ = "
                f"{s.cl_loads[-1]:g} random routing gives {num(u.get('random'))} mean services against "
                f"Pollaczek–Khinchine's {num(u.get('mg1'))}, power of two {num(u.get('power_of_two'))} against the "
                f"supermarket limit {num(u.get('supermarket'))}, JSQ {num(u.get('jsq'))}; "
                f"{sum(1 for l in s.cl_loads if numbers[f'unbatched/{l}']['agrees'])} of {len(s.cl_loads)} loads "
                f"agree within {tol_pk:.0%} / {tol_sm:.0%}. Random routing to 8 Fig. 1 replicas at 0.9·λ* each: mean "
                f"E2E {num(ident['replica_e2e_mean_s'])} s per replica against {num(ident['engine_e2e_mean_s'])} s "
                f"for one engine at λ/8 ({'agrees' if ident['agrees'] else 'does NOT agree'} within {tol_id:.0%}). "
                f"Mixed pool at 0.8 of the pooled capacity: random {show_counts(numbers['mixed/random']['pool'])}, "
                f"its slow replicas {show_counts(numbers['mixed/random']['slow_replicas'])}; JSQ "
                f"{show_counts(numbers['mixed/jsq']['pool'])}. P:D splits of 8 GPUs at "
                f"{num(numbers[PD_SPLITS[0]]['rate_rps'])} requests/s: "
                + ", ".join(f"{n.removeprefix('pd-').replace('-', ':')} {numbers[n]['verdict']} (λ*_PD "
                            f"{num(numbers[n]['lambda_pd_rps'])})" for n in PD_SPLITS) + ".")
        return self.result(
            config="# unbatched pools (routing theory):\n" + _toml(UNBATCHED_POOL)
                   + f"\n# varied: workload.load = {', '.join(f'{x:g}' for x in s.cl_loads)} (of the pooled λ*); "
                     f"cluster.router = {', '.join(CL_ROUTERS)}; run.horizon_s = {s.cl_horizon:g}; seeds "
                     f"0..{s.cl_seeds - 1}\n\n# and the cluster scenarios pool-random (against fig1 at 0.9·λ*), "
                     f"pool-heterogeneous (random, jsq), {s.cl_long:g} s, and {', '.join(PD_SPLITS)} "
                     "(llmqueue cluster scenarios)",
            verdict=verdict, verdict_text=text, numbers=numbers,
            tables=[Table("Unbatched pool of 16 replicas: mean time in system in mean services (mean over seeds) "
                          "against the closed forms. P–K: M/G/1 (Pollaczek–Khinchine) with the service's own c²; "
                          "supermarket: Mitzenmacher's d = 2 limit (exponential service, N → ∞).",
                          ["ρ", "random", "M/G/1 (P–K)", "power of two", "supermarket limit", "JSQ", "agrees"],
                          urows),
                    Table("Mixed pool: 2 replicas and 2 of half their speed at 0.8 of the pooled capacity "
                          "(verdicts over seeds; shares of the arrivals fast, fast, slow, slow).",
                          ["router", "pool", "slow replicas", "shares", "as predicted"], mrows),
                    Table("Prefill/decode splits of 8 identical GPUs (llmqueue cluster plan): each pool's Theorem 2 "
                          "rate, the split's λ*_PD = min of the two, and the simulated verdict at the scenarios' rate.",
                          ["P:D", "prefill req/s", "decode req/s", "λ*_PD req/s", "binds", "rate req/s",
                           "verdict", "as predicted"], prows)],
            plots=[("cluster_routers.png", "Mean time in system (in mean services) of the unbatched pool against "
                                           "the load, per router, with the two closed forms.")])


UNSTABLE_V = "unstable"


def _thrash_config(scheduler: str, horizon: float) -> dict:
    data = scenario_config("theorem2", scheduler=scheduler, load=0.5, horizon=horizon)
    data["engine"]["kv_blocks"] = 600
    return data


def _toml(data: dict) -> str:
    from llmqueue.config import dumps
    return dumps(data).strip()


def _config_block(scenario: str, varied: list[str]) -> str:
    return scenario_text(scenario).strip() + "\n\n# varied:\n" + "\n".join(f"#   {v}" for v in varied)


SECTIONS: list[Section] = [Fig8(), Fig1(), Theorem2(), BatchTimeModels(), Region(), Networks(), Latency(), Memory(),
                           Clusters()]
