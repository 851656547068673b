"""Writes the per-task results table (JSON + Markdown) after testing, and prints it on rank 0."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from freemerge_pl.io import sha256_file, write_json_atomic, write_text_atomic


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table: one row per task, one column per metric, then the average."""
    tasks = results["tasks"]
    metrics = list(next(iter(tasks.values())).keys()) if tasks else []
    proto = results.get("protocol", {})
    routing = proto.get("routing") or "none (no task modules: every sample runs the merged backbone)"
    header = (f"method: `{results.get('method')}` · routing: {routing} · "
              f"heads: {proto.get('head_selection')} · task modules: {results.get('task_module_bytes')} bytes")
    lines = [header,
             "", "| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, values in tasks.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    lines.append("| **avg** | " + " | ".join(f"{results['avg'][m]:.4f}" for m in metrics) + " |")
    matrix = results.get("routing_confusion")
    if "routing_accuracy" in metrics and matrix and sum(map(sum, matrix)):
        pooled = sum(matrix[i][i] for i in range(len(matrix))) / sum(map(sum, matrix))
        lines += ["", (f"routing accuracy (mean over tasks, the avg row): {results['avg']['routing_accuracy']:.4f}; "
                       f"routing accuracy (pooled over all samples): {pooled:.4f}")]
    return "\n".join(lines) + "\n"


def run_config(trainer: Trainer) -> dict[str, Any] | None:
    """The resolved config of this run as LightningCLI's ``SaveConfigCallback`` writes it (``yaml`` text, its
    ``sha256`` and the ``file`` it goes to); None when the trainer has no such callback (no LightningCLI)."""
    cb = next((c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
    if cb is None:
        return None
    text = cb.parser.dump(cb.config, skip_none=False)
    path = os.path.join(trainer.log_dir, cb.config_filename) if trainer.log_dir else None
    return {"yaml": text, "sha256": hashlib.sha256(text.encode()).hexdigest(), "file": path}


class ResultsTable(Callback):
    """After ``test``: ``<dirpath>/<filename>.json`` and ``.md`` (dirpath defaults to ``<root>/results``).

    A run's results are never paired with another run's config (LightningCLI rewrites ``config.yaml`` in the
    log dir at every run, also at one that fails later):

    * at ``setup`` (every run, before the model is built) results already in ``dirpath`` are moved aside to
      ``<filename>.stale.json`` / ``.stale.md`` (replacing older stale ones), so a run that fails leaves no
      ``<filename>.json`` next to its config;
    * ``<filename>.json`` is one atomic write that embeds the run's resolved config (``config.yaml`` text,
      its sha256 and file): a results file carries the config it came from, whatever lies beside it. At write
      the config file on disk is hashed; if it is not this run's (another run wrote into the same log dir), a
      warning says so and ``config.file_matches`` is false.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "results", print_table: bool = True) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.print_table = print_table
        self.last_paths: list[Path] = []
        self._config: dict[str, Any] | None = None  # this run's resolved config (``setup``)

    def _root(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "results")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # on every rank: ``trainer.log_dir`` is a collective call under DDP (a broadcast)
        self._config = run_config(trainer)
        self._move_stale(trainer)

    @rank_zero_only
    def _move_stale(self, trainer: Trainer) -> None:
        root = self._root(trainer)
        for suffix in (".json", ".md"):
            current = root / f"{self.filename}{suffix}"
            if current.exists():
                stale = root / f"{self.filename}.stale{suffix}"
                os.replace(current, stale)
                rank_zero_info(f"moved the results of an earlier run {current} to {stale}")

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results:
            return
        config = dict(self._config) if self._config else None
        if config is not None:
            on_disk = sha256_file(config["file"]) if config["file"] and os.path.isfile(config["file"]) else None
            config["file_matches"] = on_disk == config["sha256"]
            if not config["file_matches"]:
                rank_zero_warn(f"{config['file']} is not this run's config (sha256 {on_disk}, this run's "
                               f"{config['sha256']}): another run wrote into the same log dir; the results "
                               f"embed this run's config")
        results = {**results, "config": config}
        root = self._root(trainer)
        md = results_markdown(results)
        json_path = write_json_atomic(results, root / f"{self.filename}.json")
        md_path = write_text_atomic(md, root / f"{self.filename}.md")
        self.last_paths = [json_path, md_path]
        if self.print_table:
            print(md)
