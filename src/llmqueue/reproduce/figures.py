"""The plots of ``llmqueue reproduce`` (matplotlib, headless), one function per figure.

Inputs are the JSON-able results the sections hold (time series as lists), not live runs, so a
report can be redrawn from stored results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from llmqueue.plots import legend_outside, line_style, save_figure

STYLES = ["-", "--", "-.", ":"]
COLORS = ["tab:red", "tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:brown", "tab:gray", "tab:olive",
          "tab:cyan"]


def fig8(numbers: dict, path: Path) -> Path:
    """Each scheduler's batches as columns of token cells (decode blue, prefill orange)."""
    from llmqueue.worked_example import parse_sequence
    names = list(numbers)
    fig, ax = plt.subplots(figsize=(10, 0.9 * len(names) + 1.2), dpi=110)
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        batches = parse_sequence(numbers[name]["batches"])
        for col, batch in enumerate(batches):
            for k, tok in enumerate(batch):
                color = "#9ecae1" if tok[1] == "d" else "#fdae6b"
                ax.add_patch(plt.Rectangle((col * 1.2 + k * 0.2, y - 0.35), 0.19, 0.7, color=color, ec="k", lw=0.5))
                ax.text(col * 1.2 + k * 0.2 + 0.095, y, tok, ha="center", va="center", fontsize=7)
        ax.text(-0.15, y, f"{name} (b_max {numbers[name]['token_budget']})", ha="right", va="center", fontsize=9)
    ax.set_xlim(-2.6, 7.4)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xticks([i * 1.2 + 0.5 for i in range(6)], [f"batch {i + 1}" for i in range(6)])
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title("Fig. 8 (simulated): decode tokens (blue, Xd) and prefill tokens (orange, Xp) per batch", fontsize=10)
    return save_figure(fig, path)


def fig1(series: dict, loads: Sequence[float], schedulers: Sequence[str], lam: float, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), dpi=110, sharey=True)
    for ax, load in zip(axes.flat, loads):
        for i, sched in enumerate(schedulers):   # a scheduler keeps its style in every panel
            if (load, sched) in series:
                s, verdict = series[(load, sched)]
                ax.plot(s["time_s"], np.asarray(s["in_system"]) + 1, lw=1.4, zorder=len(schedulers) - i,
                        label=f"{sched} ({verdict})", **line_style(i, len(schedulers), len(s["time_s"])))
        ax.set_yscale("log")
        ax.set_title(f"load {load:g}·λ* = {load * lam:.2f} requests/s", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        legend_outside(ax)
    for ax in axes[1]:
        ax.set_xlabel("simulated time (s)")
    for ax in axes[:, 0]:
        ax.set_ylabel("requests in system + 1")
    fig.suptitle("Fig. 1 workload (b_max = 512): number in system, seed 0")
    return save_figure(fig, path)


def theorem2(points: dict, schedulers: Sequence[str], loads: Sequence[float], lam: float, cap: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    grid = np.linspace(min(loads), max(loads), 200)
    ax.plot(grid, np.maximum(0, grid * cap - cap), "k-", lw=1.2, label="fluid: max(0, λ(m_p+m_d) − b/t_b)")
    for i, sched in enumerate(schedulers):
        xs, ys, es = [], [], []
        for load in loads:
            m, half = points.get((sched, load), (None, None))
            if m is not None:
                xs.append(load + (i - 0.5) * 0.01)
                ys.append(m)
                es.append(half or 0.0)
        ax.errorbar(xs, ys, yerr=es, fmt="o", color=COLORS[2 + i], capsize=3, ms=4, label=f"{sched} (mean ± 95 %)")
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel(f"load λ/λ*  (λ* = {lam:.2f} requests/s)")
    ax.set_ylabel("backlog growth (tokens/s)")
    ax.set_title("Theorem 2: backlog growth against load, (v_p, v_d) = (100, 100), b_max = 512", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


def max_rate(numbers: dict, schedulers: Sequence[str], lam: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    vals = [numbers[f"max_rate[{s}]"]["max_rate_rps"] or 0.0 for s in schedulers]
    bars = ax.bar(schedulers, vals, color=[COLORS[i] for i in range(len(schedulers))])
    for bar, v in zip(bars, vals):   # inside the bar's top (clear of the λ* line), above a short bar
        inside = v > 0.2 * lam
        ax.text(bar.get_x() + bar.get_width() / 2, v * 0.97 if inside else v, f"{v / lam:.2f}·λ*", ha="center",
                va="top" if inside else "bottom", fontsize=8, color="white" if inside else "black")
    ax.axhline(lam, color="k", ls="--", lw=1, label=f"λ* = {lam:.2f} requests/s (Theorem 2)")
    ax.set_xlabel("scheduler")
    ax.set_ylabel("largest stable rate (requests/s)")
    ax.set_title("Largest stable rate by simulation, Fig. 1 workload, b_max = 512", fontsize=10)
    legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def batch_time(stair, pwl, saturated: dict, path: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 4.5), dpi=110)
    b = np.arange(1, 2049)
    a1.plot(b, stair.seconds(b) * 1e3, label="staircase (v3, the paper's fit)")
    a1.plot(b, pwl.seconds(b) * 1e3, "--", label="piecewise linear (fitted to the staircase)")
    a1.set_xlabel("tokens in the batch b")
    a1.set_ylabel("batch time t_b (ms)")
    a1.grid(True, alpha=0.3)
    legend_outside(a1)
    budgets = np.arange(16, 2049, 16)
    a2.plot(budgets, budgets / stair.seconds(budgets), label="staircase: b/t_b")
    a2.plot(budgets, budgets / pwl.seconds(budgets), "--", label="piecewise linear: b/t_b")
    pts = [(k, v) for k, v in saturated.items() if v is not None]
    if pts:
        a2.plot([k for k, _ in pts], [v for _, v in pts], "ko", ms=5, label="Sarathi at 1.3·λ* (simulated)")
    a2.set_xlabel("token budget b_max (tokens)")
    a2.set_ylabel("capacity (tokens/s)")
    a2.grid(True, alpha=0.3)
    legend_outside(a2)
    return save_figure(fig, path)


def region(regions: dict, position, served: list, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=110)
    for i, (b, reg) in enumerate(sorted(regions.items())):
        u = np.array([0.0] + [v.prefill_rate for v in reg.vertices] + [0.0])   # tokens/s, as the CLI prints
        w = np.array([0.0] + [v.decode_rate for v in reg.vertices] + [0.0])
        ax.fill(u, w, alpha=0.08, color=COLORS[2 + i])
        ax.plot(u[1:-1], w[1:-1], "-o", ms=3, color=COLORS[2 + i], label=f"region, b_max = {b}")
    p = np.array([position.prefill_rate, position.decode_rate])
    ax.plot(*p, "k*", ms=14, label="point C (the workload)")
    ax.annotate(f"C = ({p[0]:.1f}, {p[1]:.1f}) tokens/s: 29 + 99 tokens per 46.75 ms", p, textcoords="offset points",
                xytext=(12, -16), fontsize=8)
    markers = ["s", "^", "D", "v", "P", "X", "<", ">", "h"]
    for i, (label, _, (x, y), verdict) in enumerate(served):
        ax.plot(x, y, markers[i % len(markers)], ms=7, alpha=0.8, label=f"{label} served ({verdict})")
    ax.set_xlabel("prefill tokens/s (λ·m_p)")
    ax.set_ylabel("decode tokens/s (λ·m_d)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    ax.set_title("§6: stability regions under k_max = 100, and the rates each run served (2nd half)", fontsize=10)
    return save_figure(fig, path)


def in_system_lines(series: dict, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    for i, (label, (s, verdict)) in enumerate(series.items()):   # staggered markers: equal lines stay visible
        ax.plot(s["time_s"], np.asarray(s["in_system"]) + 1, lw=1.3, zorder=len(series) - i, label=f"{label} ({verdict})",
                **line_style(i, len(series), len(s["time_s"])))
    ax.set_yscale("log")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests in system + 1")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


def latency(points: dict, schedulers: Sequence[str], budgets: Sequence[int], loads: Sequence[float], lam: float,
            path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), dpi=110)
    panels = [("ttft", "p99", "time to first token p99 (s)"), ("tbt", "p50", "time between tokens p50 (ms)"),
              ("e2e", "p99", "end-to-end latency p99 (s)")]
    for ax, (metric, q, ylabel) in zip(axes, panels):
        for j, sched in enumerate(schedulers):
            for i, b in enumerate(budgets):
                xs, ys = [], []
                for f in loads:
                    d = points.get((sched, b, f))
                    if d is not None and d[metric][q] is not None:
                        xs.append(f * lam)
                        ys.append(d[metric][q] * (1e3 if metric == "tbt" else 1))
                if xs:   # colour: the budget; line and marker: the scheduler (equal curves stay visible)
                    ax.plot(xs, ys, STYLES[j % 4], marker="os^D"[j % 4], ms=7 - 2 * (j % 3), color=COLORS[i % len(COLORS)],
                            label=f"{sched}, b_max {b}")
        ax.set_yscale("log")
        ax.axvline(lam, color="k", ls=":", lw=1)
        ax.set_xlabel(f"arrival rate (requests/s; λ* = {lam:.2f} dotted)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    legend_outside(axes[-1])
    fig.suptitle("Latency against load and token budget (Fig. 1 workload, seed 0)", fontsize=11)
    return save_figure(fig, path)


def memory(rows: Sequence[dict], path: Path) -> Path:
    """Largest stable rate by bisection against the closed form's bound, per memory configuration:
    the bracket [max stable, first failing] as a bar, λ_mem and λ* as ticks (ratios to min of both)."""
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    x = np.arange(len(rows))
    for i, r in enumerate(rows):
        bound = min(r["lambda_star_rps"], r["memory_bound_rps"])
        lo = (r["max_rate_rps"] or 0.0) / bound
        hi = (r["failed_rate_rps"] or lo * bound) / bound
        ax.bar(i, hi - lo, bottom=lo, width=0.5, color="tab:blue", alpha=0.8,
               label="bisection bracket [stable, failing]" if i == 0 else None)
        ax.plot([i - 0.3, i + 0.3], [r["memory_bound_rps"] / bound] * 2, color="tab:red", lw=2,
                label="λ_mem (memory, necessary)" if i == 0 else None)
        if r.get("sufficient_rps"):
            ax.plot([i - 0.3, i + 0.3], [r["sufficient_rps"] / bound] * 2, color="tab:green", lw=2, ls="--",
                    label="fluid sufficient bound" if i == 0 else None)
        ax.plot([i - 0.3, i + 0.3], [min(r["lambda_star_rps"] / bound, 1.3)] * 2, color="k", lw=1, ls=":",
                label="λ* (Theorem 2; clipped at 1.3)" if i == 0 else None)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("rate / min(λ*, λ_mem)")
    ax.set_ylim(0.5, 1.35)
    ax.set_title("Largest stable rate with KV memory: simulation against the closed form", fontsize=10)
    legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def routers(points: dict, path: Path) -> Path:
    """The unbatched pool's mean time in system per router against the load, with the closed forms."""
    loads = sorted(points)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    lines = [("random", "random"), ("power_of_two", "power of two"), ("jsq", "JSQ"),
             ("mg1", "M/G/1 (Pollaczek–Khinchine)"), ("supermarket", "supermarket limit, d = 2")]
    for i, (key, label) in enumerate(lines):
        ys = [points[x][key] for x in loads]
        style = line_style(i, 3) if i < 3 else {**line_style(i - 3, 3), "linestyle": ":", "lw": 1.2, "marker": None}
        ax.plot(loads, [np.nan if y is None else y for y in ys], label=label, **style)   # a closed form: its router's colour, dotted
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("load ρ (of the pooled capacity)")
    ax.set_ylabel("mean time in system / mean service (log scale)")
    ax.set_title("16 replicas serving one request at a time: routers against routing theory", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)
