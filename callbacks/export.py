"""Exports the merged backbone, task modules, heads and router as safetensors after ``fit``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportMerged(Callback):
    """After ``fit`` (rank 0): ``pl_module.export(dirpath)``; dirpath defaults to ``<root>/merged``."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "merged")
        written = pl_module.export(root)
        rank_zero_info(f"exported {len(written)} files to {root}")
