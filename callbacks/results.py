"""Writes the per-task results table (JSON + Markdown) after testing, and prints it on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from freemerge_pl.io import _atomic_write, write_json_atomic


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table: one row per task, one column per metric, then the average."""
    tasks = results["tasks"]
    metrics = list(next(iter(tasks.values())).keys()) if tasks else []
    proto = results.get("protocol", {})
    header = (f"method: `{results.get('method')}` · routing: {proto.get('routing')} · "
              f"heads: {proto.get('head_selection')} · task modules: {results.get('task_module_bytes')} bytes")
    lines = [header,
             "", "| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, values in tasks.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    lines.append("| **avg** | " + " | ".join(f"{results['avg'][m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


class ResultsTable(Callback):
    """After ``test``: ``<dirpath>/<filename>.json`` and ``.md`` (dirpath defaults to the trainer's root)."""

    def __init__(self, dirpath: str | None = None, filename: str = "results", print_table: bool = True) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.print_table = print_table
        self.last_paths: list[Path] = []

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results:
            return
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "results")
        md = results_markdown(results)
        json_path = write_json_atomic(results, root / f"{self.filename}.json")
        md_path = root / f"{self.filename}.md"

        def write(tmp):
            Path(tmp).write_text(md)

        _atomic_write(md_path, write)
        self.last_paths = [json_path, md_path]
        if self.print_table:
            print(md)
