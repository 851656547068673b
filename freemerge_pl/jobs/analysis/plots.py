"""Figures of the interference analysis (matplotlib, headless Agg backend; the ``plots`` extra).

``spectra_figure`` is the Fig. 2a grid (rows: keys, columns: tasks, centred log power, zero frequency in the
middle); ``cutoff_figure`` plots, per FR filter ratio, the share of task-vector energy below the cutoff and
the interference metric left after the filter. Both return the figure (axes labelled) so callers and tests
can inspect it before ``save_figure`` writes it atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freemerge_pl.errors import ConfigError
from freemerge_pl.io import atomic_write
from freemerge_pl.jobs.analysis.interference import InterferenceReport


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a clear error when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the interference plots need matplotlib: pip install 'freemerge_pl[plots]' "
                          "(or pass --no-plots / plots=False for the JSON and Markdown tables only)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectra_figure(report: InterferenceReport) -> Any:
    """The grid of centred log-power spectra (``report.spectra``: key → task → array): one row per key (its
    name and "row frequency" on the left axis), one column per task, "column frequency" on the bottom axes,
    one colour scale per row."""
    plt = pyplot()
    keys = list(report.spectra)
    if not keys:
        raise ConfigError("no spectra to plot: no analysed key of ≥ 2 dims (or plot_layers=0 / no plot_tasks)")
    tasks = [t for t in report.tasks if any(t in report.spectra[k] for k in keys)]
    fig, axes = plt.subplots(len(keys), len(tasks), figsize=(1.8 * len(tasks) + 1.6, 1.8 * len(keys) + 0.8),
                             squeeze=False, layout="constrained")
    for i, key in enumerate(keys):
        row = report.spectra[key]
        lo = min(float(a.min()) for a in row.values())
        hi = max(float(a.max()) for a in row.values())
        image = None
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            grid = row[task].numpy()
            h, w = report.spectra_shapes.get(key, grid.shape)  # frequencies (the grid may be pooled)
            image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest",
                              extent=(-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5))
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(task, fontsize=8)
            if i == len(keys) - 1:
                ax.set_xlabel("column frequency", fontsize=7)
            if j == 0:
                name = key if len(key) <= 28 else "…" + key[-27:]  # long keys would run into the next row
                ax.set_ylabel(f"{name}\nrow frequency", fontsize=7)
        fig.colorbar(image, ax=list(axes[i]), label="log10 |F(v)|²", shrink=0.9)
    fig.suptitle("Amplitude power spectra of task vectors (centred: distance from the centre = frequency)",
                 fontsize=9)
    return fig


def cutoff_figure(report: InterferenceReport) -> Any:
    """Energy below the cutoff and the interference metric after the FR filter, against the filter ratio."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = [100 * r for r in report.ratios]
    ax.plot(ratios, [100 * e for e in report.energy_below], marker="o", label="energy below the cutoff (removed)")
    if report.metric > 0:
        ax.plot(ratios, [100 * m / report.metric for m in report.metric_after_filter], marker="s",
                label="interference metric after the filter (% of unfiltered)")
    for values in report.energy_below_per_task.values():
        ax.plot(ratios, [100 * e for e in values], lw=0.6, alpha=0.4, color="grey")
    ax.set_xlabel("FR filter ratio r (% of the spectrum removed, lowest frequencies first)")
    ax.set_ylabel("% (grey: energy below the cutoff per task)")
    ax.set_title("Choosing the cutoff: energy vs interference removed", fontsize=9)
    ax.set_xlim(min(ratios), max(ratios))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (temp file, then rename) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return path
