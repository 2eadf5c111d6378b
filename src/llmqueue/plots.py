"""Plots of runs (matplotlib, headless).  Only the command line and reports import this."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llmqueue.files import atomic_path  # noqa: E402
from llmqueue.metrics import in_system, kv_blocks_at  # noqa: E402
from llmqueue.runner import Run  # noqa: E402

# ---- one look for every figure: distinct lines, readable labels with units, legends off the data --

#: (colour, line style, marker) of the i-th line of a figure: no two lines look alike, and the
#: markers of each line sit at x positions of their own, so that equal curves (e.g. Sarathi-Serve
#: and vLLM v1 below their request cap) both stay visible.
LINE_STYLES = [("tab:blue", "-", "o"), ("tab:orange", "--", "s"), ("tab:green", "-.", "^"),
               ("tab:red", ":", "D"), ("tab:purple", (0, (5, 1)), "v"), ("tab:brown", (0, (3, 1, 1, 1)), "P"),
               ("tab:pink", "-", "X"), ("tab:gray", "--", "*"), ("tab:olive", "-.", "<"), ("tab:cyan", ":", ">")]

#: Summary keys as axis labels, each with its unit (the CLI's units: seconds, requests/s, tokens/s).
METRIC_LABELS = {"ttft_s": "time to first token", "tbt_s": "time between tokens", "e2e_s": "end-to-end latency",
                 "throughput_rps": "throughput (requests/s)", "token_throughput": "throughput (tokens/s)",
                 "mean_in_system": "mean requests in system", "backlog_slope_tokens_per_s": "backlog growth (tokens/s)"}


def line_style(i: int, n: int, points: int | None = None) -> dict:
    """Keyword arguments of ``ax.plot`` for line ``i`` of ``n``; with ``points`` (the samples of
    the line) about eight markers, staggered between the lines."""
    n_styles = len(LINE_STYLES)
    color, linestyle, _ = LINE_STYLES[i % n_styles]
    marker = LINE_STYLES[(i + 3 * (i // n_styles)) % n_styles][2]   # past ten lines: the same colour, another marker
    if i >= n_styles:
        linestyle = LINE_STYLES[(i + i // n_styles) % 4][1]
    style = {"color": color, "linestyle": linestyle, "marker": marker, "markersize": 5}
    if points is not None and points > 16:
        step = max(points // 8, 1)
        style["markevery"] = ((i * step) // max(n, 1), step)
    return style


def metric_label(key: str) -> str:
    """``"ttft_s.p99"`` → ``"time to first token p99 (s)"``; other keys as they are."""
    base, _, stat = key.partition(".")
    if base in METRIC_LABELS and base.endswith("_s"):
        return f"{METRIC_LABELS[base]} {stat or ''} (s)".replace("  ", " ")
    return METRIC_LABELS.get(key, key)


def legend_outside(ax, **kw):
    """The legend to the right of the axes, so it never covers data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kw)


def plot_in_system(runs: Sequence[Run], path: str | Path, title: str, points: int = 600,
                   xlabel: str = "simulated time (s)") -> Path:
    """Number of requests in the system over time, one line per run (log scale)."""
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for i, run in enumerate(runs):
        r = run.result
        t = np.linspace(0, r.end_time, points)
        # Distinct styles with staggered markers, earlier runs on top: schedulers with identical
        # paths (e.g. sarathi and vllm-v1 below max_num_seqs) both stay visible.
        ax.plot(t, in_system(r, t) + 1, linewidth=1.5, zorder=len(runs) - i,
                label=f"{r.scheduler} ({run.summary['verdict']})", **line_style(i, len(runs), points))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests in system + 1 (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


def plot_kv_blocks(runs: Sequence[Run], path: str | Path, title: str, points: int = 1200,
                   xlabel: str = "simulated time (s)") -> Path:
    """KV blocks in use over time as a share of the usable cache (docs/memory.md), one line per run
    with memory on; the full cache (kv_blocks − 1 blocks) is the top of the axis."""
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    usable = None
    with_kv = [r for r in runs if r.result.kv is not None]
    for i, run in enumerate(with_kv):
        r = run.result
        t = np.linspace(0, r.end_time, points)
        usable = r.kv.blocks - 1
        k = run.summary.get("kv", {})
        ax.plot(t, kv_blocks_at(r, t) / usable * 100, linewidth=1.2, zorder=len(runs) - i,
                label=f"{r.scheduler} (mean {k.get('mean_utilisation', 0):.0%}, {k.get('preemptions', 0)} preemptions)",
                **line_style(i, len(with_kv), points))
    ax.set_ylim(0, 105)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"KV blocks in use (% of {usable} usable blocks)" if usable else "KV blocks in use (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


def plot_region(region, position, achieved: Sequence[dict], path: str | Path, title: str) -> Path:
    """The 2-D stability region (paper §6, Theorem 10) in tokens/s (the CLI's unit), the
    workload's point and ray, and the (prefill, decode) rates that simulated schedulers served."""
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    u = np.array([0.0] + [v.prefill_rate for v in region.vertices] + [0.0])
    w = np.array([0.0] + [v.decode_rate for v in region.vertices] + [0.0])
    ax.fill(u, w, alpha=0.15, color="tab:blue", label="stability region")
    ax.plot(u[1:-1], w[1:-1], "-o", color="tab:blue", markersize=4)
    for v in region.vertices:
        if v.batch is not None:
            ax.annotate(f"{v.batch.num_prefill_tokens}+{v.batch.num_decode_tokens}",
                        (v.prefill_rate, v.decode_rate), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    p = np.array([position.prefill_rate, position.decode_rate])
    reach = p / position.rho if position.rho > 0 else p
    end = p if position.rho > 1 else reach
    ax.plot([0, end[0]], [0, end[1]], ":", color="gray", linewidth=1)
    ax.plot(*p, "k*", markersize=12, label=f"workload ({position.status}, ρ = {position.rho:.3f})")
    markers = ["s", "^", "D", "v", "P", "X"]
    for i, r in enumerate(achieved):
        ax.plot(r["prefill_tokens_per_s"], r["decode_tokens_per_s"], markers[i % len(markers)],
                markersize=8, label=f"{r['scheduler']} served ({r['verdict']})")
    ax.set_xlabel("prefill tokens/s (λ·m_p)")
    ax.set_ylabel("decode tokens/s (λ·m_d)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


# ---- sweeps (docs/sweeps.md): tidy rows from llmqueue.sweep.results.tidy ---------------

_VERDICT_COLORS = {"stable": "tab:green", "unstable": "tab:red", "rejects": "tab:purple", "mixed": "tab:orange"}


def _arrival_rate(row: dict) -> float:
    return row["rho"] * row["max_stable_rate_rps"]  # λ = ρ·λ*, whether the grid set rate or load


def _by_scheduler(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["scheduler"], []).append(row)
    return groups


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write and close ``fig``: under a temporary name in the same folder, renamed when
    whole (removed if the write fails or is interrupted), in the format of the file's suffix."""
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            # bbox "tight": legends placed outside the axes are kept whole in the file
            fig.savefig(tmp, format=path.suffix[1:].lower() or "png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_stability_map(rows: Sequence[dict], path: str | Path) -> Path:
    """Phase map of verdicts: arrival rate × token budget, one panel per scheduler, with
    Theorem 2's λ* at each budget (paper Fig. 1 / Theorem 2). A point is green when every
    seed was stable, red when every seed was unstable, purple when every seed rejected more
    than the allowed share of its arrivals, orange otherwise."""
    groups = _by_scheduler(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.2), dpi=120, sharey=True, squeeze=False)
    for ax, (name, group) in zip(axes[0], groups.items()):
        cells: dict[tuple[float, int], list[str]] = {}
        star: dict[int, float] = {}
        for r in group:
            cells.setdefault((round(_arrival_rate(r), 9), r["token_budget"]), []).append(r["verdict"])
            star[r["token_budget"]] = r["max_stable_rate_rps"]
        state = {cell: v[0] if len(set(v)) == 1 and v[0] in ("stable", "unstable", "rejects") else "mixed"
                 for cell, v in cells.items()}
        for kind, color in _VERDICT_COLORS.items():
            pts = [cell for cell, s in state.items() if s == kind]
            if pts:
                ax.scatter(*zip(*pts), s=36, marker="s", color=color,
                           label="mixed or inconclusive" if kind == "mixed" else f"{kind} (every seed)")
        budgets = sorted(star)
        # λ* at each budget: a line through them, and a tick at each (one budget still shows it)
        ax.plot([star[b] for b in budgets], budgets, "k--", linewidth=1.2, label="λ* (Theorem 2)")
        ax.plot([star[b] for b in budgets], budgets, "k|", markersize=22, markeredgewidth=2)
        ax.set_yscale("log", base=2)
        ax.set_yticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("arrival rate λ (requests/s)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("token budget b_max (tokens)")
    legend_outside(axes[0][-1])
    return save_figure(fig, path)


def plot_latency_vs_load(rows: Sequence[dict], path: str | Path,
                         metrics: Sequence[str] = ("ttft_s.p99", "tbt_s.p99", "e2e_s.p99")) -> Path:
    """Latency percentiles against load ρ, one line per scheduler and budget (median over
    seeds); unstable points are marked with a cross."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics) + 2, 4.2), dpi=120, squeeze=False)
    lines: dict[tuple[str, int], dict[float, list[dict]]] = {}
    for r in rows:
        lines.setdefault((r["scheduler"], r["token_budget"]), {}).setdefault(round(r["rho"], 6), []).append(r)
    for ax, metric in zip(axes[0], metrics):
        for i, ((name, budget), points) in enumerate(sorted(lines.items())):
            rhos = sorted(points)
            values = [np.median([r[metric] for r in points[x] if r.get(metric) is not None] or [np.nan]) for x in rhos]
            style = line_style(i, len(lines))
            ax.plot(rhos, values, linewidth=1.4, label=f"{name}, b_max = {budget}", **style)
            bad = [(x, v) for x, v in zip(rhos, values) if any(r["verdict"] == "unstable" for r in points[x])]
            if bad:
                ax.plot(*zip(*bad), "x", color=style["color"], markersize=10, markeredgewidth=2)
        ax.axvline(1.0, color="k", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("load ρ = λ / λ* (λ* of Theorem 2 at ρ = 1)")
        ax.set_ylabel(f"{metric_label(metric)}, median over seeds")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][-1]
    ax.plot([], [], "kx", markersize=10, markeredgewidth=2, label="unstable (some seed)")
    ax.plot([], [], "k:", linewidth=1, label="ρ = 1 (λ = λ*)")
    legend_outside(ax)
    return save_figure(fig, path)


def plot_max_rate_vs_budget(searches: Sequence[dict], rows: Sequence[dict], path: str | Path) -> Path:
    """Largest stable rate against token budget per scheduler, with λ* (Theorem 2) drawn.

    From ``max-rate`` searches when the store has any; otherwise from a sweep's runs: per
    scheduler and budget, the largest swept rate below the first rate any seed failed."""
    best: dict[str, dict[int, float]] = {}
    star: dict[int, float] = {}
    if searches:
        source = "max-rate searches"
        for s in searches:
            budget, name = s["config"]["engine"]["token_budget"], s["config"]["engine"]["scheduler"]
            star[budget] = s["lambda_star_rps"]
            if s["max_rate_rps"] is not None:
                best.setdefault(name, {})[budget] = s["max_rate_rps"]
    else:
        source = "sweep (largest rate with every seed stable)"
        cells: dict[tuple[str, int], dict[float, list[str]]] = {}
        for r in rows:
            star[r["token_budget"]] = r["max_stable_rate_rps"]
            cells.setdefault((r["scheduler"], r["token_budget"]), {}).setdefault(
                round(_arrival_rate(r), 9), []).append(r["verdict"])
        for (name, budget), by_rate in cells.items():
            ok = None
            for rate in sorted(by_rate):
                if set(by_rate[rate]) != {"stable"}:
                    break
                ok = rate
            if ok is not None:
                best.setdefault(name, {})[budget] = ok
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    budgets = sorted(star)
    ax.plot(budgets, [star[b] for b in budgets], "k--", linewidth=1.5, label="λ* (Theorem 2)")
    for i, (name, points) in enumerate(sorted(best.items())):
        xs = sorted(points)
        style = line_style(i, len(best)) | {"markersize": 8 - min(i, 4)}   # equal curves (orca, sarathi) stay visible
        ax.plot(xs, [points[b] for b in xs], label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("token budget b_max (tokens)")
    ax.set_ylabel("largest stable arrival rate (requests/s)")
    ax.set_title(f"Max stable rate vs token budget ({source})", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)


def plot_network_backlog(series: dict[str, dict], path: str | Path, title: str, detail: str | None = None,
                         fluid: dict | None = None) -> Path:
    """Network backlog (tokens) over time, one line per labelled run (docs/network.md, arXiv 2504.07347 §5);
    with ``detail`` (a label), a second panel shows that run's backlog engine by engine.

    ``series`` maps a label to :func:`llmqueue.network.network_timeseries` output; ``fluid`` (the
    same keys, from the fluid model started at the ``detail`` run's state) is drawn dashed over it.
    """
    fig, axes = plt.subplots(1, 2 if detail else 1, figsize=(13 if detail else 9, 5), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for i, (label, s) in enumerate(series.items()):
        ax.plot(s["time_s"], s["total_backlog_tokens"], linewidth=1.4, label=label,
                **line_style(i, len(series), len(s["time_s"])))
    if fluid is not None:
        ax.plot(fluid["time_s"], fluid["total_backlog_tokens"], color="black", linestyle="--", linewidth=1.2,
                label=f"fluid model (from t = {fluid['t0_s']:.0f} s)")
    ax.set_yscale("symlog", linthresh=1e4)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("network backlog (tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    if detail:
        ax = axes[0, 1]
        s = series[detail]
        engines = [n for n in s if n.endswith("_backlog_tokens") and n != "total_backlog_tokens"]
        for i, name in enumerate(engines):
            style = line_style(i, len(engines), len(s["time_s"]))
            ax.plot(s["time_s"], s[name], linewidth=1.2, label=name.removesuffix("_backlog_tokens"), **style)
            if fluid is not None and name in fluid:
                ax.plot(fluid["time_s"], fluid[name], color=style["color"], linestyle="--", linewidth=1.0,
                        label=f"{name.removesuffix('_backlog_tokens')}, fluid")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("backlog at the engine (tokens)")
        ax.set_title(f"{detail}: engine by engine", fontsize=10)
        ax.grid(True, alpha=0.3)
        legend_outside(ax)
    return save_figure(fig, path)


def plot_network_fluid(result, path: str | Path, title: str | None = None) -> Path:
    """A network run's backlog, in total and engine by engine, with the fluid model's path from the
    run's state at t0 dashed over it (docs/network.md, "Stability beyond ρ < 1")."""
    from llmqueue.network.metrics import network_timeseries
    from llmqueue.network.overlay import fluid_from_run

    ts = network_timeseries(result)
    engines = [e.name for e in result.network.engines]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    ax.plot(ts["time_s"], ts["total_backlog_tokens"], color="black", lw=1.2, label="network backlog (simulated)")
    colors = [line_style(i, len(engines))["color"] for i in range(len(engines))]
    for i, e in enumerate(engines):
        ax.plot(ts["time_s"], ts[f"{e}_backlog_tokens"], color=colors[i], lw=0.8, alpha=0.7,
                label=f"{e} backlog (simulated)")
    fl = fluid_from_run(result)
    note = "fluid model not applicable"
    if fl is not None:
        model, fp, t0 = fl
        tt = t0 + fp.times
        ax.plot(tt, fp.remaining_tokens(model), color="black", ls="--", lw=1.5,
                label=f"network backlog, fluid from t = {t0:.0f} s ({fp.outcome})")
        eng = fp.engine_tokens(model)
        for i, e in enumerate(engines):
            ax.plot(tt, eng[:, i], color=colors[i], ls="--", lw=1.0, label=f"{e}, fluid")
        note = f"fluid {fp.outcome}" + (f", peaks ×{fp.growth_factor:.3g}" if fp.growth_factor else "")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("unprocessed tokens (tokens)")
    ax.set_title(title or f"Network backlog, simulated and fluid ({note})", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return save_figure(fig, path)
