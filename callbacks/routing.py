"""Routing statistics after ``test``: routing accuracy and the confusion matrix of routed vs true task
(JSON, Markdown and PNG), logged."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from freemerge_pl.io import atomic_write, write_json_atomic, write_text_atomic
from freemerge_pl.lightning.router import routing_confusion_markdown


def plot_routing_confusion(matrix: list[list[int]], names: list[str], path: str | Path | None = None,
                           title: str | None = None):
    """The confusion matrix as a matplotlib figure (Agg backend), saved to ``path`` (atomically) when
    given; None without matplotlib. The caller closes the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed task")
    ax.set_ylabel("true task")
    if title:
        ax.set_title(title, fontsize=8)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    if path is not None:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return fig


class RoutingStats(Callback):
    """Writes ``routing_confusion.json``, ``routing_confusion.md`` (the matrix with per-task and overall routing
    accuracy) and (with matplotlib) ``routing_confusion.png``; logs the figure to TensorBoard-like loggers that
    offer ``experiment.add_figure``. A method without task modules routes nothing: no files are written."""

    def __init__(self, dirpath: str | None = None, plot: bool = True) -> None:
        self.dirpath = dirpath
        self.plot = plot

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results or results.get("routing_confusion") is None:  # nothing routed (no task modules)
            return
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "results")
        matrix = results["routing_confusion"]
        names = list(results["tasks"])
        total = sum(map(sum, matrix))
        accuracy = sum(matrix[i][i] for i in range(len(names))) / total if total else None
        write_json_atomic({"tasks": names, "confusion": matrix, "rows": "true task", "cols": "routed task",
                           "routing_accuracy": accuracy}, root / "routing_confusion.json")
        write_text_atomic(routing_confusion_markdown(matrix, names), root / "routing_confusion.md")
        if not self.plot:
            return
        fig = plot_routing_confusion(matrix, names, root / "routing_confusion.png")
        if fig is None:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("routing_confusion", fig)
        import matplotlib.pyplot as plt

        plt.close(fig)
