"""``DIR/*.png`` (matplotlib, Agg): top-1 and top-5 against epoch, one figure per global batch and
one per optimizer (a line per run), and for each run that logged ``optim/trust_ratio/<param>`` a
heatmap of the trust ratios, layers x optimizer steps (the paper's Figures 9-14)."""

from __future__ import annotations

import re
from pathlib import Path

from resnet_lamb.report.runs import Run


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "run"


def plot_accuracy(runs: list, title: str, path: Path) -> None:
    """Top-1 and top-5 against epoch, a line per run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, idx, metric in ((axes[0], 1, "top-1"), (axes[1], 2, "top-5")):
        for run in runs:
            ax.plot(
                [v[0] for v in run.val],
                [v[idx] for v in run.val],
                marker="o",
                markersize=3,
                label=run.name + (" (in progress)" if run.status == "in progress" else ""),
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"{title}: {metric}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trust_ratios(run: Run, path: Path) -> None:
    """Heatmap of the logged trust ratios: a row per layer, a column per logged optimizer step."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    values = np.array(run.trust_values, dtype=float).T  # layers x steps
    finite = values[np.isfinite(values)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() > 0 else None
    height = max(4.0, 0.12 * len(run.trust_layers) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height), constrained_layout=True)
    steps = run.trust_steps
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(run.trust_layers) - 0.5, -0.5)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm, extent=extent)
    ax.set_yticks(range(len(run.trust_layers)))
    ax.set_yticklabels(run.trust_layers, fontsize=max(3, min(8, 400 // max(len(run.trust_layers), 1))))
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{run.name}: trust ratio per layer ({run.optimizer}, batch {run.global_batch})")
    fig.colorbar(image, ax=ax, label="trust ratio")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(runs: list, out: Path) -> list:
    """All PNGs; returns [(file name, title)]."""
    import matplotlib

    matplotlib.use("Agg")
    figures = []
    plotted = [r for r in runs if r.status != "incomplete" and r.val]
    for key, prefix, what in (
        (lambda r: r.global_batch, "accuracy_batch", "global batch"),
        (lambda r: r.optimizer, "accuracy_optimizer", "optimizer"),
    ):
        groups: dict = {}
        for run in plotted:
            groups.setdefault(key(run), []).append(run)
        for value, group in sorted(groups.items()):
            name = f"{prefix}_{_slug(value)}.png"
            plot_accuracy(group, f"{what} {value}", out / name)
            figures.append((name, f"top-1 / top-5, {what} {value}"))
    for run in runs:
        if run.status != "incomplete" and run.trust_steps:
            name = f"trust_ratio_{_slug(run.name)}.png"
            plot_trust_ratios(run, out / name)
            figures.append((name, f"trust ratios, {run.name}"))
    return figures
