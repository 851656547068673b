"""``LineProgressBar``: Lightning's progress display as periodic lines (for a stderr that is not a terminal)."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import ProgressBar

from freemerge_pl.progress import Ticker


class LineProgressBar(ProgressBar):
    """Lightning's progress display for a non-terminal stderr: every ``interval`` seconds one line, e.g.
    ``test: task 2/8 (letters), batch 14/40, elapsed 12s, eta 1m05s`` (eta over all tasks' batches)."""

    def __init__(self, interval: float | None = None) -> None:
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._ticker: Ticker | None = None
        self._done = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, what: str, total: float) -> None:
        self._done = 0
        total = int(total) if math.isfinite(total) else None
        self._ticker = Ticker(what, total, interval=self.interval)

    def _tick(self, stage: str, dataloader_idx: int, batch_idx: int, batches: float) -> None:
        self._done += 1
        if not self._enabled or self._ticker is None:
            return
        names = getattr(self.trainer.lightning_module, "task_names", None) or []
        counts = self.trainer.num_test_batches if stage == "test" else self.trainer.num_val_batches
        k = len(counts) if isinstance(counts, list) else 1
        task = f" ({names[dataloader_idx]})" if dataloader_idx < len(names) else ""
        b = f"{batch_idx + 1}/{int(batches)}" if math.isfinite(batches) else f"{batch_idx + 1}"
        self._ticker.update(self._done, what=f"{stage}: task {dataloader_idx + 1}/{k}{task}, batch {b} · all batches")

    def _total(self, counts: Any) -> float:
        return sum(counts) if isinstance(counts, list) else counts

    def on_test_start(self, trainer, pl_module) -> None:
        self._start("test", self._total(trainer.num_test_batches))

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._start("validate", self._total(trainer.num_val_batches))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(f"fit epoch {trainer.current_epoch + 1}", self.total_train_batches)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._tick("test", dataloader_idx, batch_idx, self.total_test_batches_current_dataloader)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        self.has_dataloader_changed(dataloader_idx)
        self._tick("validate", dataloader_idx, batch_idx, self.total_val_batches_current_dataloader)

    def _finish(self) -> None:
        if self._enabled and self._ticker is not None:
            self._ticker.finish(self._done)
        self._ticker = None

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._finish()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._done += 1
        if self._enabled and self._ticker is not None:
            self._ticker.update(self._done)
