"""Exports the merged backbone, task modules, heads and router as safetensors after ``fit``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportMerged(Callback):
    """After ``fit`` (rank 0): ``pl_module.export(dirpath, overwrite)``; dirpath defaults to ``<root>/merged``.

    The export is built in ``.<name>.partial`` beside ``dirpath`` and renamed into place whole with its manifest
    (``merge_info.json``, every file with size and sha256): a previous export there is replaced, a non-empty
    directory that is not an export is refused unless ``overwrite``. ``freemerge_pl.load_merged`` reads it back.
    """

    def __init__(self, dirpath: str | None = None, overwrite: bool = False) -> None:
        self.dirpath = dirpath
        self.overwrite = overwrite

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "merged")
        written = pl_module.export(root, overwrite=self.overwrite)
        rank_zero_info(f"exported {len(written)} files to {root}")
