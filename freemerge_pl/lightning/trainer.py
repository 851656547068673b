"""The Trainer of ``cli.py``: Lightning's ``fit``/``validate``/``test`` plus ``export`` (build, train the router,
write the export; no evaluation) and ``tune`` (hyperparameters on tune-val), each a subcommand whose options
are its arguments (documented in its docstring)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only

from freemerge_pl.errors import ConfigError
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.jobs.tune import (
    CandidateMerger,
    check_candidates,
    check_tune_settings,
    grid_candidates,
    mean_objective,
    optuna_search,
    tune,
    tune_markdown,
    tune_val_record,
)
from freemerge_pl.lightning.datamodule import MultiTaskDataModule
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.merging.registry import get_method

#: rank 0 says what a run wrote (``HH:MM:SS`` lines on stderr)
say = rank_zero_only(logging.getLogger("freemerge_pl.cli").info)


def prepare_and_build(model: MergedModule, datamodule: MultiTaskDataModule, stage: str) -> None:
    """Outside a Trainer loop: prepare data and checkpoints, check the config, build the merged model."""
    datamodule.prepare_data()
    datamodule.setup(stage)
    model.prepare_data()
    model._check_data(datamodule)
    model.build(datamodule.router_dataset()[0][0].unsqueeze(0), datamodule=datamodule)


@contextmanager
def own_outputs_only(trainer: Trainer) -> Iterator[None]:
    """While ``tune`` runs, nothing but its ``output_dir`` is written: its validation passes run without the
    trainer's callbacks other than progress bars (``ResultsTable`` would move an earlier run's results aside,
    LightningCLI's ``SaveConfigCallback`` rewrite the log dir's ``config.yaml``, a checkpoint callback save) and
    without loggers; both are put back afterwards."""
    callbacks, loggers = trainer.callbacks, trainer.loggers
    trainer.callbacks = [c for c in callbacks if isinstance(c, ProgressBar)]
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.callbacks, trainer.loggers = callbacks, loggers


class RouterFirst(Callback):
    """Before ``predict``, an untrained router is trained on the router split (as before ``test``)."""

    def on_predict_start(self, trainer: Trainer, pl_module: MergedModule) -> None:
        pl_module._ensure_router()


def prediction_rows(outputs: list, datamodule: MultiTaskDataModule) -> list[dict[str, Any]]:
    """One row per sample of ``predict``'s outputs (per task's loader, batches of ``RoutedModel.predict``)."""
    names = datamodule.task_names
    per_loader = outputs if len(names) > 1 else [outputs]
    rows = []
    for name, batches in zip(names, per_loader):
        index = 0
        for batch in batches:
            for task, pred, conf in zip(batch["task"].tolist(), batch["prediction"].tolist(),
                                        batch["confidence"].tolist()):
                regression = math.isnan(conf)
                rows.append({"dataset": name, "index": index, "routed_task": names[task],
                             "prediction": pred if regression else int(pred),
                             "confidence": None if regression else conf})
                index += 1
    return rows


class FreeMergeTrainer(Trainer):
    """The Lightning Trainer, with the ``export`` and ``tune`` entries of ``cli.py``.

    ``test``/``validate`` default to ``verbose=False``: with one dataloader per task Lightning's own table
    repeats every metric once per dataloader, and the ``ResultsTable`` callback prints the per-task table
    instead (``--verbose true`` brings Lightning's back).
    """

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None,
            ckpt_path: str | Path | None = None, weights_only: bool | None = None) -> None:
        """Merge, then train the router on the router split; saves a checkpoint (for ``test --ckpt_path``).

        The backbone and the task modules stay frozen: only the router learns.

        Args:
            ckpt_path: a checkpoint of an earlier ``fit`` to resume from.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
        """
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def test(self, model=None, dataloaders=None, ckpt_path: str | Path | None = None, verbose: bool = False,
             datamodule=None, weights_only: bool | None = None):
        """Merge, train the router on the router split, and score every task's test split.

        Args:
            ckpt_path: a checkpoint of a ``fit`` run (the trained router) to test instead of a fresh merge.
            verbose: also print Lightning's metric table (the ``ResultsTable`` callback prints the per-task one).
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
        """
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | Path | None = None, verbose: bool = False,
                 datamodule=None, weights_only: bool | None = None):
        """Merge and score the tune-val split (every task's val_args, or data.tune_fraction > 0); prints the score.

        Args:
            ckpt_path: a checkpoint of a ``fit`` run (the trained router) to score instead of a fresh merge.
            verbose: also print Lightning's metric table.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions: bool | None = None,
                ckpt_path: str | Path | None = None, weights_only: bool | None = None,
                output: str | None = None):
        """Route every task's test split and write one JSON line per sample (routed task, class, confidence).

        Each line: ``dataset`` (the task whose test split holds the sample), ``index`` (in that split),
        ``routed_task``, ``prediction`` (the routed task's head's class; a regression head's value) and
        ``confidence`` (its softmax probability; null for regression). An untrained router is trained on
        the router split first. Called with ``dataloaders``, this is Lightning's ``predict``.

        Args:
            ckpt_path: a checkpoint of a ``fit`` run (the trained router) to predict with.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
            output: the JSONL file (default: ``<trainer.default_root_dir>/predictions.jsonl``).
        """
        if dataloaders is not None or not isinstance(datamodule, MultiTaskDataModule):
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        if self.world_size > 1:
            raise ConfigError("predict runs in one process (trainer.devices: 1): each rank would see a part "
                              "of the samples")
        if not any(isinstance(c, RouterFirst) for c in self.callbacks):
            self.callbacks.append(RouterFirst())
        outputs = super().predict(model, datamodule=datamodule, return_predictions=True, ckpt_path=ckpt_path,
                                  weights_only=weights_only)
        rows = prediction_rows(outputs, datamodule)
        path = Path(output) if output else Path(self.default_root_dir) / "predictions.jsonl"
        write_text_atomic("".join(json.dumps(r) + "\n" for r in rows), path)
        say(f"predictions: {path} ({len(rows)} samples)")
        return rows

    def export(self, model: MergedModule, datamodule: MultiTaskDataModule, output_dir: str = "merged",
               fit_router: bool = True, overwrite: bool = False) -> list[Path]:
        """Merge, train the router on the router split and write the export (safetensors); no evaluation.

        ``output_dir`` is published whole: a previous export there is replaced; a non-empty directory that is
        not an export is refused unless ``overwrite`` is set; another process writing it is refused at once
        (``OutputLockedError``, held for the whole run). ``load_merged`` reads the export back.

        Args:
            output_dir: the export directory.
            fit_router: train the router before exporting (with ``model.routing: router``).
            overwrite: replace a non-empty directory that is not an export.
        """
        from freemerge_pl.io import check_output_dir, output_lock

        with output_lock(output_dir):  # another run writing output_dir is refused before the merge
            check_output_dir(output_dir, overwrite=overwrite)  # before the merge, not after it
            prepare_and_build(model, datamodule, "test")
            router_data = datamodule.router_dataset()
            if fit_router and model.routing == "router":
                model.fit_router(router_data)
            written = model.export(output_dir, overwrite=overwrite)
        say(f"wrote {len(written)} files to {output_dir}")
        return written


    def tune(self, model: MergedModule, datamodule: MultiTaskDataModule, space: dict[str, list[Any]] | None = None,
             metric: str = "accuracy", normalised: bool = False, search: Literal["grid", "optuna"] = "grid",
             n_trials: int = 20, output_dir: str = "tuned") -> dict[str, Any]:
        """Choose hyperparameters on tune-val, a held-out part of the router split (never the test split).

        Tune-val is each task's validation split where it has one, else a held-out part of its router split;
        needs a validation split for every task (``data.tasks[*].val_args``) or ``data.tune_fraction`` > 0.
        Every candidate's settings are checked before any data or checkpoint is read. Candidates within the
        tune-val's standard error of the best score tie (for accuracy SE = sqrt(p(1−p)/n), n the tune-val
        samples of all tasks); the simplest of them is chosen: smaller expert storage, then no (or the smaller)
        filter, then the method's defaults, then grid order (``jobs.tune.choose``). Writes only into
        ``output_dir``: ``tune_report.{json,md}`` (every candidate, the tied set and the rule that chose) and
        ``tuned.yaml`` (the input config with the chosen values); no other run's results or config are touched.

        Args:
            space: hyperparameter (or ``fr_filter_ratio``) → list of values, e.g.
                ``'{"filter_ratio": [0.1, 0.3], "scaling": [1.0, 2.0]}'``; default: the method's own space.
            metric: the per-task metric averaged into the objective (one of the tasks' ``metrics``).
            normalised: divide each task's score by the fine-tuned model's score on tune-val.
            search: grid (all combinations) or optuna (TPE over the same values; ``pip install -e .[tune]``).
            n_trials: optuna trials.
            output_dir: where the report and ``tuned.yaml`` are written.
        """
        space = check_tune_settings(model, datamodule, space, metric, search, n_trials)
        candidates = grid_candidates(space)
        check_candidates(model.method, model.method_args, model.fr_filter_ratio, candidates)
        start = time.perf_counter()
        bar = self.progress_bar_callback
        if bar is not None:  # one progress display: the candidate lines (not a bar per validation)
            bar.disable()
        try:
            with own_outputs_only(self):
                report = self._tune(model, datamodule, space, candidates, metric, normalised, search, n_trials)
        finally:
            if bar is not None and self.is_global_zero:
                bar.enable()
        report["seconds"] = time.perf_counter() - start
        if self.is_global_zero:
            out = Path(output_dir)
            write_json_atomic(report, out / "tune_report.json")
            write_text_atomic(tune_markdown(report), out / "tune_report.md")
        self.tune_report = report
        ties = report["ties"]
        tie_note = (f"; {len(ties['tied'])} candidates tied within SE {ties['standard_error']:.4f}, chosen by "
                    f"{', then '.join(ties['rules'])}" if len(ties["tied"]) > 1 else "")
        say(f"chosen {report['best']['params']} → {metric} {report['best']['score']:.4f} "
            f"({len(report['candidates'])} candidates, {report['seconds']:.1f}s{tie_note})")
        return report

    def _tune(self, model: MergedModule, datamodule: MultiTaskDataModule, space: dict[str, list[Any]],
              candidates: list[dict[str, Any]], metric: str, normalised: bool, search: str,
              n_trials: int) -> dict[str, Any]:
        prepare_and_build(model, datamodule, "validate")
        router_data = datamodule.router_dataset()
        names = model.task_names
        adapter = model.adapter
        finetuned = [adapter.finetuned_state_dict(t) for t in names]
        merger = CandidateMerger(adapter.pretrained_state_dict(), finetuned, model.method, model.method_args,
                                 names=names, exclude_keys=list(adapter.exclude_keys),
                                 fr_filter_ratio=model.fr_filter_ratio, seed=model.merge_seed)
        retrain_router = model.router_reads_merged_backbone
        if model.routing == "router" and not retrain_router:
            model.fit_router(router_data)

        def evaluate(state_dict, result) -> dict[str, Any]:
            model.load_merge(state_dict, result.task_modules, result.shared_modules)
            if model.routing == "router" and retrain_router:
                model.reset_router()
                model.fit_router(router_data)
            self.validate(model, datamodule=datamodule, verbose=False)
            return model.val_results

        individual = None
        if normalised:
            individual = {}
            for task, sd in zip(names, finetuned):
                model.load_merge({**merger.pretrained, **sd})
                self.validate(model, datamodule=datamodule, verbose=False)
                individual[task] = model.val_results["tasks"][task][metric]
        objective = mean_objective(metric, individual)
        tie_args = {"samples": sum(len(datamodule.tune_indices[t]) for t in names), "metric": metric,
                    "normalised": normalised,
                    "defaults": {**get_method(model.method).hyperparameters, "fr_filter_ratio": 0.0},
                    "filter_ratio_keeps": get_method(model.method).cls.filter_ratio_keeps}
        if search == "grid":
            report = tune(candidates, merger, evaluate, objective, progress=self.is_global_zero, **tie_args)
        else:
            report = optuna_search(space, n_trials, merger, evaluate, objective, model.merge_seed,
                                   progress=self.is_global_zero, **tie_args)
        report.update({
            "method": model.method, "base_args": model.method_args, "space": space, "metric": metric,
            "normalised": normalised, "individual": individual, "search": search,
            "tune_samples": {t: len(datamodule.tune_indices[t]) for t in names},
            "tune_val": tune_val_record(datamodule),
            "router_samples": {t: len(datamodule.router_indices[t]) for t in names},
        })
        return report
