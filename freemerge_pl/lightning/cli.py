"""LightningCLI entry point: fit / validate / test / predict, plus ``merge`` (build + export, no evaluation)
and ``tune`` (hyperparameters on tune-val).

``cli_main`` is the program (``python cli.py ...``): it sets up logging and the thread count, and prints a
package error (``FreeMergeError``: bad setting, file or checkpoint) as one line naming what is wrong, exit
status 2 (``--debug`` or ``FREEMERGE_DEBUG=1``: the traceback). ``main`` is the same CLI for Python callers;
it raises.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from freemerge_pl.callbacks import LineProgressBar
from freemerge_pl.lightning.datamodule import MultiTaskDataModule
from freemerge_pl.errors import ConfigError, FreeMergeError, one_line
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.merging import get_method, list_methods
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.progress import (
    Ticker,
    apply_threads,
    setup_logging,
    silence_known_noise,
    stderr_is_terminal,
)
from freemerge_pl.jobs.tune import (
    CandidateMerger,
    check_candidates,
    grid_candidates,
    mean_objective,
    tune,
    tune_val_record,
)


def import_adapters() -> list[str]:
    """Import every module of ``freemerge_pl.adapters`` (those whose optional dependency is installed), so
    that ``--model.adapter`` help lists the concrete adapters as known subclasses."""
    from freemerge_pl import adapters as models

    imported = []
    for info in pkgutil.iter_modules(models.__path__):
        try:
            importlib.import_module(f"{models.__name__}.{info.name}")
        except ImportError:
            continue
        imported.append(info.name)
    return imported

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
    model.build(datamodule.router_dataset()[0][0].unsqueeze(0), datamodule=datamodule)


class FreeMergeTrainer(Trainer):
    """A Trainer with ``merge`` (build, train the router, export) and ``tune`` entries. ``test``/``validate``
    default to ``verbose=False``: with one dataloader per task Lightning's own table repeats every metric
    once per dataloader, and the ``ResultsTable`` callback prints the per-task table instead
    (``--verbose true`` brings Lightning's back)."""

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
        """Merge and score the tune-val split (needs data.tune_fraction > 0); prints the tune score.

        Args:
            ckpt_path: a checkpoint of a ``fit`` run (the trained router) to score instead of a fresh merge.
            verbose: also print Lightning's metric table.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def merge(self, model: MergedModule, datamodule: MultiTaskDataModule, output_dir: str = "merged",
              fit_router: bool = True, overwrite: bool = False) -> list[Path]:
        """Build backbone + task modules, optionally train the router on the router split, export safetensors.
        ``output_dir`` is published whole: a previous export there is replaced; a non-empty directory that is
        not an export is refused unless ``overwrite`` (``--overwrite true``) is set."""
        from freemerge_pl.io import check_output_dir

        check_output_dir(output_dir, overwrite=overwrite)  # before the merge, not after it
        prepare_and_build(model, datamodule, "test")
        router_data = datamodule.router_dataset()
        if fit_router and model.routing == "router":
            model.fit_router(router_data)
        written = model.export(output_dir, overwrite=overwrite)
        rank_zero_info(f"wrote {len(written)} files to {output_dir}")
        return written


    def tune(self, model: MergedModule, datamodule: MultiTaskDataModule, space: dict[str, list[Any]] | None = None,
             metric: str = "accuracy", normalised: bool = False, search: Literal["grid", "optuna"] = "grid",
             n_trials: int = 20, output_dir: str = "tuned") -> dict[str, Any]:
        """Choose hyperparameters on tune-val, a held-out part of the router split (never the test split).

        Needs ``data.tune_fraction`` > 0. Every candidate's settings are checked before any data or
        checkpoint is read. Writes ``<output_dir>/tune_report.{json,md}`` and ``<output_dir>/tuned.yaml``
        (the input config with the chosen values).

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
        rank_zero_info(f"best {report['best']['params']} → {metric} {report['best']['score']:.4f} "
                       f"({len(report['candidates'])} candidates, {report['seconds']:.1f}s)")
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
        if search == "grid":
            report = tune(candidates, merger, evaluate, objective, progress=self.is_global_zero)
        else:
            report = _optuna_search(space, n_trials, merger, evaluate, objective, model.merge_seed,
                                    progress=self.is_global_zero)
        report.update({
            "method": model.method, "base_args": model.method_args, "space": space, "metric": metric,
            "normalised": normalised, "individual": individual, "search": search,
            "tune_samples": {t: len(datamodule.tune_indices[t]) for t in names},
            "tune_val": tune_val_record(datamodule),
            "router_samples": {t: len(datamodule.router_indices[t]) for t in names},
        })
        return report


def check_tune_settings(model: MergedModule, datamodule: MultiTaskDataModule, space: dict[str, list[Any]] | None,
                        metric: str, search: str, n_trials: int) -> dict[str, list[Any]]:
    """The search space (given or the method's default) after checking every ``tune`` setting that needs
    no data: tune-val split, metric, search, trials, optuna installed."""
    if datamodule.tune_fraction <= 0:
        raise ConfigError("tune needs a tune-val split: set data.tune_fraction > 0 (e.g. 0.5)")
    space = space or DEFAULT_SPACES.get(model.method)
    if not space:
        raise ConfigError(f"no default tune space for method {model.method!r}: pass --space "
                          f"(known defaults: {sorted(DEFAULT_SPACES)})")
    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search={search!r}; accepted: grid, optuna")
    lacking = [t.name for t in datamodule.tasks if metric not in (*t.metrics, "routing_accuracy")]
    if lacking:
        raise ConfigError(f"--metric={metric!r} is not among the metrics of task(s) {lacking} "
                          f"(data.tasks[*].metrics); accepted: the metrics every task lists, or routing_accuracy")
    if search == "optuna":
        if n_trials < 1:
            raise ConfigError(f"--n_trials={n_trials} must be ≥ 1")
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise ConfigError("--search=optuna needs optuna: pip install -e '.[tune]'") from err
    return space


def _optuna_search(space, n_trials, merger, evaluate, objective, seed, progress: bool = True) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial lines below say the same, once
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows = []
    ticker = Ticker("tune (optuna)", n_trials, interval=0, log=None if progress else lambda line: None)

    def propose(trial) -> float:
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in space.items()}
        row = tune([params], merger, evaluate, objective, progress=False)["best"]
        rows.append(row)
        ticker.update(len(rows), f"{params} → {row['score']:.4f}", what="tune (optuna): trial")
        return row["score"]

    study.optimize(propose, n_trials=n_trials)
    return {"candidates": rows, "best": max(rows, key=lambda r: r["score"])}


def tune_markdown(report: dict[str, Any]) -> str:
    """Every candidate's per-task scores as a Markdown table, best first."""
    rows = sorted(report["candidates"], key=lambda r: -r["score"])
    tasks = list(rows[0]["scores"]["tasks"])
    metric = report["metric"]
    kinds = sorted({v["source"] for v in report.get("tune_val", {}).values()})
    header = (f"method `{report['method']}` · objective: mean {metric}"
              f"{' (normalised)' if report['normalised'] else ''} on tune-val"
              f"{' (' + ', '.join(kinds) + ')' if kinds else ''} · {report['seconds']:.1f}s")
    lines = [header, "",
             "| params | score | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['scores']['tasks'][t][metric]:.4f}" for t in tasks)
        lines.append(f"| {r['params']} | {r['score']:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


def with_method_defaults(cfg: Namespace) -> Namespace:
    """``cfg`` with every named method's ``method_args`` completed by the method's defaults, so a dumped
    config (``--print_config``, ``config.yaml``, ``tuned.yaml``) shows the values the merge will use."""
    cfg = cfg.clone()
    keys = cfg.keys()  # the flattened, dotted keys
    for key in [k for k in keys if k == "model.method" or k.endswith(".model.method")]:
        name = cfg[key]
        if not isinstance(name, str):
            continue  # a class_path method shows its init_args already
        try:
            defaults = get_method(name).hyperparameters
        except FreeMergeError:
            continue  # reported when the model is built
        given = cfg.get(f"{key}_args") or {}
        cfg[f"{key}_args"] = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()},
                              **given}
    return cfg


class FreeMergeArgumentParser(LightningArgumentParser):
    """Dumps configs with the named method's hyperparameter defaults filled in (``with_method_defaults``)."""

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        return super().dump(with_method_defaults(namespace), *args, **kwargs)


class FreeMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"},
                "tune": {"model", "datamodule"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # Program options, read by ``cli_main`` before parsing (so they may stand anywhere); listed here for --help.
        self.parser.add_argument("--debug", action="store_true",
                                 help="on a configuration or input error, show the traceback (also: FREEMERGE_DEBUG=1)")
        self.parser.add_argument("--threads", type=int | None, default=None,
                                 help="torch threads (default: FREEMERGE_THREADS, else OMP_NUM_THREADS, else the "
                                      "usable CPUs minus the load average)")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """On a non-terminal stderr, progress lines every few seconds instead of a progress bar."""
        configured = [*(config.get("callbacks") or []), *callbacks]
        if (config.get("enable_progress_bar", True) is not False and not stderr_is_terminal()
                and not any(isinstance(c, ProgressBar) for c in configured)):
            callbacks = [*callbacks, LineProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_validate(self) -> None:
        if self.datamodule.tune_fraction <= 0:
            raise ConfigError("validate scores the tune-val split: set data.tune_fraction > 0 (e.g. 0.5, as for "
                              "tune); the test split is scored by `test`")

    def after_validate(self) -> None:
        """Print the tune-val scores (the objective ``tune`` maximises for these settings)."""
        results = self.model.val_results
        if not results or not self.trainer.is_global_zero:
            return
        from freemerge_pl.callbacks import results_markdown

        print(results_markdown(results), end="")
        print("tune-val mean " + ", ".join(f"{k} {v:.4f}" for k, v in results["avg"].items()))

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
    """The CLI for Python callers (errors are raised); ``run=False`` only parses ``args`` (no subcommand)
    and instantiates model, data, trainer.

    ``merge --config X.yaml`` with a merge-job config (top-level ``base_model``) runs the streaming
    checkpoint merge job (``freemerge_pl.jobs.merge_job``) instead of LightningCLI.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if run and argv[:1] == ["merge"] and _job_config(argv):
        from freemerge_pl.jobs.merge_job import job_main

        return job_main(argv[1:])
    if run and argv[:1] == ["analyze"]:
        from freemerge_pl.jobs.analysis.cli import analyze_main

        return analyze_main(argv[1:])
    list_methods()  # import every method class, so ``class_path: TIES`` and ``--model.method.help TIES`` resolve
    import_adapters()
    set_parsing_settings(subclasses_enabled=[MergeMethod])
    return FreeMergeCLI(MergedModule, MultiTaskDataModule, trainer_class=FreeMergeTrainer,
                        parser_class=FreeMergeArgumentParser, auto_configure_optimizers=False,
                        save_config_kwargs={"overwrite": True}, args=argv, run=run)


def program_options(argv: list[str]) -> tuple[list[str], bool, int | None]:
    """``argv`` without the program options ``--debug`` and ``--threads N`` (anywhere), and their values."""
    rest: list[str] = []
    debug, threads = False, None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--debug":
            debug = True
        elif a == "--threads" or a.startswith("--threads="):
            raw = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if "=" not in a:
                next(it, None)
            try:
                threads = int(raw)
            except ValueError:
                raise ConfigError(f"--threads {raw!r}: accepted: a whole number ≥ 1") from None
        else:
            rest.append(a)
    return rest, debug, threads


def cli_main(argv: list[str] | None = None) -> int:
    """``python cli.py ...``: logging, thread count, then ``main``; a package error prints one line naming
    the setting, file or key at fault and returns 2 (``--debug`` / ``FREEMERGE_DEBUG=1``: with traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FREEMERGE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    setup_logging()
    silence_known_noise()
    try:
        argv, debug_flag, threads = program_options(argv)
        debug = debug or debug_flag
        apply_threads(threads)
        main(argv)
    except FreeMergeError as err:
        if debug:
            traceback.print_exc()
        message = one_line(err)
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _job_config(argv: list[str]) -> bool:
    from freemerge_pl.jobs.merge_job import is_job_config

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
