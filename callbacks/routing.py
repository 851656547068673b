"""Routing statistics after ``test``: confusion matrix of routed vs true task (JSON + PNG), logged."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from freemerge_pl.io import write_json_atomic


class RoutingStats(Callback):
    """Writes ``routing_confusion.json`` and (with matplotlib) ``routing_confusion.png``; logs the figure
    to TensorBoard-like loggers that offer ``experiment.add_figure``."""

    def __init__(self, dirpath: str | None = None, plot: bool = True) -> None:
        self.dirpath = dirpath
        self.plot = plot

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results:
            return
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "results")
        matrix = results["routing_confusion"]
        names = list(results["tasks"])
        write_json_atomic({"tasks": names, "confusion": matrix, "rows": "true task", "cols": "routed task"},
                          root / "routing_confusion.json")
        if not self.plot:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("routed task")
        ax.set_ylabel("true task")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7)
        fig.tight_layout()
        root.mkdir(parents=True, exist_ok=True)
        fig.savefig(root / "routing_confusion.png", dpi=100)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("routing_confusion", fig)
        plt.close(fig)
