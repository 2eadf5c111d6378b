"""Plots of calibrations (matplotlib, headless); only the command line imports this."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from llmqueue.files import atomic_path
from llmqueue.real.fit import Fit, Samples


def plot_residuals(samples: Samples, fits: Sequence[Fit], path: str | Path, title: str) -> Path:
    """Residuals (measured − fitted, ms) against the batch's token count, one panel per model;
    colour = share of decode tokens in the batch."""
    fig, axes = plt.subplots(1, len(fits), figsize=(3.2 * len(fits), 3.6), dpi=120, sharey=True)
    share = np.divide(samples.decode_tokens, samples.tokens, out=np.zeros_like(samples.tokens), where=samples.tokens > 0)
    for ax, fit in zip(np.atleast_1d(axes), fits):
        points = ax.scatter(samples.tokens, fit.residuals * 1e3, c=share, cmap="viridis", s=12, vmin=0, vmax=1)
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_title(f"{fit.name}\nR² = {fit.r2:.3f}", fontsize=9)
        ax.set_xlabel("tokens in the batch (tokens)")
        ax.grid(True, alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("measured − fitted batch time (ms)")
    fig.colorbar(points, ax=axes, label="decode share of tokens")
    fig.suptitle(title, fontsize=10, y=1.04)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight", format=path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return path
