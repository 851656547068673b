"""Running the interference analysis on a model adapter or on checkpoint files, and writing its outputs.

Outputs of ``write_outputs(report, directory)``: ``interference.json`` (every number, the metric's definition,
the settings), ``interference.md`` (the tables), ``spectra.png`` (the Fig. 2a grid) and ``cutoff.png``
(energy below the cutoff and metric after the filter vs filter ratio); every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.errors import ConfigError
from freemerge_pl.io import open_checkpoint, write_json_atomic, write_text_atomic
from freemerge_pl.jobs.analysis.interference import InterferenceReport, analyze
from freemerge_pl.merging.engine import CheckpointInputs
from freemerge_pl.merging.source import StateDictSource, TensorSource

OUTPUT_NAMES = ("interference.json", "interference.md", "spectra.png", "cutoff.png")


def choose_tasks(available: Sequence[str], tasks: Sequence[str] | None, where: str) -> list[str]:
    """``tasks`` (in that order) checked against ``available``; all of them when None."""
    if tasks is None:
        return list(available)
    unknown = [t for t in tasks if t not in available]
    if unknown or len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks {list(tasks)}: {where} has tasks {list(available)}"
                          f"{'; unknown ' + str(unknown) if unknown else '; a task is repeated'}")
    if len(tasks) < 2:
        raise ConfigError(f"tasks {list(tasks)}: the variance across tasks needs at least two")
    return list(tasks)


def adapter_inputs(adapter: ModelAdapter, tasks: Sequence[str] | None = None) -> CheckpointInputs:
    """The engine's inputs for an adapter's θ_pre and θ_k (its ``exclude_keys`` never analysed).

    The adapter interface hands over whole state dicts, so these are held in memory (one per task); for
    checkpoints larger than memory use ``checkpoint_inputs`` (file-backed sources read tensor by tensor)."""
    names = choose_tasks(list(adapter.task_names), tasks, f"the adapter {type(adapter).__name__}")
    pretrained = StateDictSource(adapter.pretrained_state_dict(), "pretrained")
    finetuned = [StateDictSource(adapter.finetuned_state_dict(t), t) for t in names]
    return CheckpointInputs(pretrained, finetuned, names=names, exclude_keys=list(adapter.exclude_keys) or None)


def checkpoint_inputs(base: str | TensorSource, models: Sequence[str | TensorSource], *,
                      names: Sequence[str] | None = None,
                      exclude_keys: Sequence[str] | None = None) -> CheckpointInputs:
    """Inputs over lazy sources (paths: ``io.open_checkpoint``): one tensor is read at a time."""
    def source(s):
        return s if isinstance(s, TensorSource) else open_checkpoint(s)

    return CheckpointInputs(source(base), [source(m) for m in models], names=names,
                            exclude_keys=list(exclude_keys) if exclude_keys else None)


def write_outputs(report: InterferenceReport, directory, *, plots: bool = True,
                  settings: dict[str, Any] | None = None, title: str = "Frequency-domain task interference") -> list[Path]:
    """Write the JSON and Markdown tables and (``plots``) the two PNGs under ``directory``."""
    directory = Path(directory)
    written = [write_json_atomic({**report.to_json(), "settings": dict(settings or {})},
                                 directory / "interference.json"),
               write_text_atomic(report.to_markdown(title), directory / "interference.md")]
    if plots:
        from freemerge_pl.jobs.analysis.plots import cutoff_figure, save_figure, spectra_figure

        if report.spectra:
            written.append(save_figure(spectra_figure(report), directory / "spectra.png"))
        written.append(save_figure(cutoff_figure(report), directory / "cutoff.png"))
    return written


def analyze_adapter(adapter: ModelAdapter, output_dir, *, tasks: Sequence[str] | None = None,
                    plots: bool = True, **options: Any) -> InterferenceReport:
    """``analyze`` on an adapter's checkpoints, outputs written to ``output_dir`` (``options``: ``analyze``'s)."""
    if plots:
        from freemerge_pl.jobs.analysis.plots import pyplot

        pyplot()  # a missing matplotlib fails before any checkpoint is read
    inputs = adapter_inputs(adapter, tasks)
    report = analyze(inputs, **options)
    write_outputs(report, output_dir, plots=plots,
                  settings={"adapter": type(adapter).__name__, "tasks": report.tasks, **_plain(options)})
    return report


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
            if k != "progress" and (v is None or isinstance(v, (str, int, float, bool, list, tuple, dict)))}
