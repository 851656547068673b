"""LightningCLI entry point: fit / validate / test / predict, plus ``merge`` (build + export, no evaluation)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from freemerge_pl.data import MultiTaskDataModule
from freemerge_pl.errors import ConfigError
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.merging import list_methods
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.module import MergedModule
from freemerge_pl.tuning import CandidateMerger, check_candidates, grid_candidates, mean_objective, tune

#: the default search space per method (used when ``--space`` is not given)
DEFAULT_SPACES: dict[str, dict[str, list[Any]]] = {
    "task_arithmetic": {"scaling": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.1, 0.2, 0.3], "scaling": [0.5, 0.7, 1.0]},
    "dare": {"drop_rate": [0.5, 0.7, 0.9], "scaling": [0.2, 0.3, 0.5]},
    "fr_merging": {"filter_ratio": [0.1, 0.3, 0.5, 0.6], "scaling": [1.0, 1.5, 2.0, 2.5, 3.0]},
    "free_merging": {"filter_ratio": [0.1, 0.3, 0.5, 0.6], "scaling": [1.0, 1.5, 2.0, 2.5, 3.0],
                     "expert_scale": [1.0, 2.0]},
}


def prepare_and_build(model: MergedModule, datamodule: MultiTaskDataModule, stage: str) -> None:
    """Outside a Trainer loop: prepare data and checkpoints, check the config, build the merged model."""
    datamodule.prepare_data()
    datamodule.setup(stage)
    model.prepare_data()
    model._check_data(datamodule)
    model.build(datamodule.router_dataset()[0][0].unsqueeze(0))


class FreeMergeTrainer(Trainer):
    """A Trainer with ``merge`` (build, train the router, export) and ``tune`` entries. ``test``/``validate``
    default to ``verbose=False``: with one dataloader per task Lightning's own table repeats every metric
    once per dataloader, and the ``ResultsTable`` callback prints the per-task table instead
    (``--verbose true`` brings Lightning's back)."""

    def test(self, model=None, dataloaders=None, ckpt_path: str | Path | None = None, verbose: bool = False,
             datamodule=None, weights_only: bool | None = None):
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | Path | None = None, verbose: bool = False,
                 datamodule=None, weights_only: bool | None = None):
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def merge(self, model: MergedModule, datamodule: MultiTaskDataModule, output_dir: str = "merged",
              fit_router: bool = True) -> list[Path]:
        """Build backbone + task modules, optionally train the router on the router split, export safetensors."""
        prepare_and_build(model, datamodule, "test")
        router_data = datamodule.router_dataset()
        if fit_router and model.routing == "router":
            model.fit_router(router_data)
        written = model.export(output_dir)
        rank_zero_info(f"wrote {len(written)} files to {output_dir}")
        return written


    def tune(self, model: MergedModule, datamodule: MultiTaskDataModule, space: dict[str, list[Any]] | None = None,
             metric: str = "accuracy", normalised: bool = False, search: str = "grid", n_trials: int = 20,
             output_dir: str = "tuned") -> dict[str, Any]:
        """Choose hyperparameters on tune-val (a held-out part of the router split; needs
        ``data.tune_fraction`` > 0). ``space`` maps hyperparameters (or ``fr_filter_ratio``) to value lists;
        ``search`` grid (all combinations) or optuna (TPE, ``n_trials``; ``pip install -e .[tune]``).
        Writes ``<output_dir>/tune_report.{json,md}``; the CLI also writes ``<output_dir>/tuned.yaml``."""
        if datamodule.tune_fraction <= 0:
            raise ConfigError("tune needs a tune-val split: set data.tune_fraction > 0 (e.g. 0.5)")
        space = space or DEFAULT_SPACES.get(model.method)
        if not space:
            raise ConfigError(f"no default tune space for method {model.method!r}: pass --space")
        candidates = grid_candidates(space)
        check_candidates(model.method, model.method_args, model.fr_filter_ratio, candidates)
        start = time.perf_counter()
        prepare_and_build(model, datamodule, "validate")
        router_data = datamodule.router_dataset()
        names = model.task_names
        adapter = model.adapter
        finetuned = [adapter.finetuned_state_dict(t) for t in names]
        merger = CandidateMerger(adapter.pretrained_state_dict(), finetuned, model.method, model.method_args,
                                 names=names, exclude_keys=list(adapter.exclude_keys),
                                 fr_filter_ratio=model.fr_filter_ratio, seed=model.merge_seed)
        retrain_router = model.router_config.feature_source == "backbone"
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
        if search == "grid":
            report = tune(candidates, merger, evaluate, objective)
        elif search == "optuna":
            report = _optuna_search(space, n_trials, merger, evaluate, objective, model.merge_seed)
        else:
            raise ConfigError(f"search={search!r}; accepted: grid, optuna")
        report.update({
            "method": model.method, "base_args": model.method_args, "space": space, "metric": metric,
            "normalised": normalised, "individual": individual, "search": search,
            "tune_samples": {t: len(datamodule.tune_indices[t]) for t in names},
            "router_samples": {t: len(datamodule.router_indices[t]) for t in names},
            "seconds": time.perf_counter() - start,
        })
        if self.is_global_zero:
            out = Path(output_dir)
            write_json_atomic(report, out / "tune_report.json")
            write_text_atomic(tune_markdown(report), out / "tune_report.md")
        self.tune_report = report
        rank_zero_info(f"best {report['best']['params']} → {metric} {report['best']['score']:.4f} "
                       f"({len(report['candidates'])} candidates, {report['seconds']:.1f}s)")
        return report


def _optuna_search(space, n_trials, merger, evaluate, objective, seed) -> dict[str, Any]:
    try:
        import optuna
    except ImportError as err:
        raise ConfigError("search=optuna needs optuna: pip install -e '.[tune]'") from err
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows = []

    def propose(trial) -> float:
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in space.items()}
        row = tune([params], merger, evaluate, objective, progress=False)["best"]
        rows.append(row)
        return row["score"]

    study.optimize(propose, n_trials=n_trials)
    return {"candidates": rows, "best": max(rows, key=lambda r: r["score"])}


def tune_markdown(report: dict[str, Any]) -> str:
    """Every candidate's per-task scores as a Markdown table, best first."""
    rows = sorted(report["candidates"], key=lambda r: -r["score"])
    tasks = list(rows[0]["scores"]["tasks"])
    metric = report["metric"]
    header = (f"method `{report['method']}` · objective: mean {metric}"
              f"{' (normalised)' if report['normalised'] else ''} on tune-val · {report['seconds']:.1f}s")
    lines = [header, "",
             "| params | score | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['scores']['tasks'][t][metric]:.4f}" for t in tasks)
        lines.append(f"| {r['params']} | {r['score']:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


class FreeMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"},
                "tune": {"model", "datamodule"}}

    def after_tune(self) -> None:
        """Write ``<output_dir>/tuned.yaml``: the input config with the chosen hyperparameters."""
        report = getattr(self.trainer, "tune_report", None)
        if report is None or not self.trainer.is_global_zero:
            return
        cfg = self.config["tune"].clone()
        best = dict(report["best"]["params"])
        if "fr_filter_ratio" in best:
            cfg.model.fr_filter_ratio = best.pop("fr_filter_ratio")
        if isinstance(cfg.model.method, str):
            cfg.model.method_args = {**(cfg.model.method_args or {}), **best}
        else:  # a class_path method: the chosen values are its init_args
            for name, value in best.items():
                cfg.model.method.init_args[name] = value
        out = Path(cfg.output_dir)
        for key in ("space", "metric", "normalised", "search", "n_trials", "output_dir", "config"):
            if key in cfg:
                del cfg[key]
        parser = self.parser._subcommands_action._name_parser_map["tune"]
        write_text_atomic(parser.dump(cfg, skip_check=True), out / "tuned.yaml")


def main(args=None, run: bool = True) -> FreeMergeCLI:
    """The CLI; ``run=False`` only parses ``args`` (no subcommand) and instantiates model, data, trainer.

    ``merge --config X.yaml`` with a merge-job config (top-level ``base_model``) runs the streaming
    checkpoint merge job (``freemerge_pl.merge_job``) instead of LightningCLI.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if run and argv[:1] == ["merge"] and _job_config(argv):
        from freemerge_pl.errors import FreeMergeError
        from freemerge_pl.merge_job import job_main

        try:
            return job_main(argv[1:])
        except FreeMergeError as err:
            if args is not None:
                raise
            sys.exit(f"error: {err}")
    list_methods()  # import every method class, so ``class_path: TIES`` and ``--model.method.help TIES`` resolve
    set_parsing_settings(subclasses_enabled=[MergeMethod])
    return FreeMergeCLI(MergedModule, MultiTaskDataModule, trainer_class=FreeMergeTrainer,
                        save_config_kwargs={"overwrite": True}, args=args, run=run)


def _job_config(argv: list[str]) -> bool:
    from freemerge_pl.merge_job import is_job_config

    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a[len("--config="):] if \
            a.startswith("--config=") else None
        if path is not None and is_job_config(path):
            return True
    return False


def build_from_config(args) -> tuple[MergedModule, MultiTaskDataModule]:
    """Parse a config (``["--config", path, ...]``), prepare the data and build the merged model."""
    cli = main(args, run=False)
    prepare_and_build(cli.model, cli.datamodule, "test")
    return cli.model, cli.datamodule
