"""Plots of runs (matplotlib, headless).  Only the command line and reports import this."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llmqueue.metrics import in_system  # noqa: E402
from llmqueue.runner import Run  # noqa: E402


def plot_in_system(runs: Sequence[Run], path: str | Path, title: str, points: int = 600) -> Path:
    """Number of requests in the system over time, one line per run (log scale)."""
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    styles = ["-", "--", "-.", ":"]
    for i, run in enumerate(runs):
        r = run.result
        t = np.linspace(0, r.end_time, points)
        # Line styles cycle and earlier runs are drawn on top, so that schedulers with
        # identical paths (e.g. sarathi and vllm-v1 below max_num_seqs) stay visible.
        ax.plot(t, in_system(r, t) + 1, styles[i % len(styles)], linewidth=1.6, zorder=len(runs) - i,
                label=f"{r.scheduler} ({run.summary['verdict']})")
    ax.set_yscale("log")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests in system + 1 (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
