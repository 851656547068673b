"""Frequency-domain interference analysis of the model's checkpoints (semantics §10) as a Lightning callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from freemerge_pl.jobs.analysis.interference import DEFAULT_METHODS, DEFAULT_RATIOS, InterferenceReport
from freemerge_pl.jobs.analysis.run import analyze_adapter


class SpectrumAnalysis(Callback):
    """Analyses the ``MergedModule``'s adapter checkpoints once (rank 0) at ``setup`` (default) or at
    ``on_test_start`` (``when: test_start``), and writes ``interference.json``/``.md``, ``spectra.png`` (task-vector
    spectra of ``plot_layers`` keys × ``plot_tasks``) and ``cutoff.png`` (energy below each FR cutoff, metric
    after the filter) to ``dirpath`` (default ``<default_root_dir>/interference``).

    ``methods`` (default Table 1's: TA, DARE, TIES, Breadcrumbs, PCB, FR) with ``method_args`` (method →
    hyperparameters); ``ratios``: FR filter ratios of the curve (default 0 … 0.9); ``layers``: regex of the keys
    analysed; ``tasks``: a subset of the adapter's tasks; ``cutoff_mode`` as FR-Merging's; ``plots`` False
    writes the tables only. Random methods use the module's ``merge_seed``. The report is kept as ``report``.
    """

    def __init__(self, dirpath: str | None = None, methods: list[str] | None = None,
                 method_args: dict[str, dict[str, Any]] | None = None, ratios: list[float] | None = None,
                 layers: str | None = None, tasks: list[str] | None = None, plot_tasks: list[str] | None = None,
                 plot_layers: int = 4, include_1d: bool = False,
                 cutoff_mode: Literal["fraction", "radius"] = "fraction", plots: bool = True,
                 when: Literal["setup", "test_start"] = "setup") -> None:
        self.dirpath = dirpath
        self.options = {"methods": list(methods) if methods is not None else list(DEFAULT_METHODS),
                        "method_args": method_args, "ratios": list(ratios) if ratios is not None else
                        list(DEFAULT_RATIOS), "layers": layers, "plot_tasks": plot_tasks, "plot_layers": plot_layers,
                        "include_1d": include_1d, "cutoff_mode": cutoff_mode}
        self.tasks = tasks
        self.plots = plots
        self.when = when
        self.report: InterferenceReport | None = None

    @rank_zero_only
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.when == "setup":
            self._run(trainer, pl_module)

    @rank_zero_only
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "test_start":
            self._run(trainer, pl_module)

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.report is not None:
            return
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "interference")
        self.report = analyze_adapter(pl_module.adapter, root, tasks=self.tasks, plots=self.plots,
                                      seed=int(getattr(pl_module, "merge_seed", 0)), **self.options)
        rank_zero_info(f"interference metric {self.report.metric:.4g} ({len(self.report.keys)} tensors); "
                       f"wrote {root}")
