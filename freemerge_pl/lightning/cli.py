"""``python cli.py <subcommand>``: one jsonargparse/LightningCLI parser for every entry point.

========== ============================================================================================
fit        train the router on the router split (Lightning ``fit``; says where the checkpoint went)
validate   score the tune-val split (the ``tune`` objective)
test       merge, train the router, score every task's test split (says where results.json went)
predict    route every task's test split: one JSON line per sample (routed task, class, confidence)
tune       choose hyperparameters on tune-val (``<output_dir>/tune_report.*``, ``tuned.yaml``)
export     merge, train the router, write the export (no evaluation)
merge      the checkpoint merge job: a mergekit-style YAML, streamed and resumable (``--dry-run``)
analyze    the frequency-domain interference analysis of a config's checkpoints
========== ============================================================================================

``cli_main`` is the program (``python cli.py ...``): it sets up logging and the thread count, and prints a
package error (``FreeMergeError``: bad setting, file or checkpoint) as one line naming what is wrong, exit
status 2 (``--debug`` or ``FREEMERGE_DEBUG=1``: the traceback); Ctrl-C exits 130 with one line. ``main`` is
the same CLI for Python callers; it raises.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from freemerge_pl.callbacks import LineProgressBar, ResultsTable
from freemerge_pl.errors import ConfigError, FreeMergeError, one_line
from freemerge_pl.io import write_text_atomic
from freemerge_pl.jobs import merge_cli
from freemerge_pl.jobs.analysis import cli as analyze_cli
from freemerge_pl.jobs.program import run_program, tidy_help
from freemerge_pl.jobs.tune import DEFAULT_SPACES  # noqa: F401  (re-exported for the benchmarks)
from freemerge_pl.lightning.datamodule import MultiTaskDataModule
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.trainer import FreeMergeTrainer, prepare_and_build, say
from freemerge_pl.merging import get_method, list_methods
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.progress import stderr_is_terminal

#: the subcommands outside Lightning: name → (one-line description, add its options, run it)
JOB_COMMANDS: dict[str, tuple[str, Callable[[Any], None], Callable[[Namespace], Any]]] = {
    "merge": (merge_cli.DESCRIPTION, merge_cli.add_arguments, merge_cli.run),
    "analyze": (analyze_cli.DESCRIPTION, analyze_cli.add_arguments, analyze_cli.run),
}

#: the Trainer options ``--help`` shows (the others are accepted too; Lightning's docs describe them)
SHOWN_TRAINER_OPTIONS = ("accelerator", "devices", "precision", "strategy", "num_nodes", "logger", "callbacks",
                         "max_epochs", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                         "enable_checkpointing", "enable_progress_bar", "deterministic", "default_root_dir")
#: group titles that say more than the first sentence of the class docstring
GROUP_TITLES = {
    "trainer": ("The Lightning Trainer (shown: the options of this package's workflows; every other Trainer "
                "argument is accepted too, as --trainer.<name>: see Lightning's Trainer docs)"),
    "data": "The tasks: their data sets, splits and metrics, and how the router and tune-val samples are drawn",
}
#: ``--ckpt_path`` values Lightning resolves itself (no file of that name is read)
SPECIAL_CKPT_PATHS = ("best", "last", "hpc", "registry")


def read_ckpt(path: str) -> dict[str, Any]:
    """The Lightning checkpoint at ``path`` (``--ckpt_path``), read with ``torch.load(weights_only=True)``: a file
    that pickles code (a callable, any class outside torch's allow-list) is refused before anything in it runs,
    and a missing, truncated or damaged file is a ``FreeMergeError`` naming it (one line, exit 2)."""
    if not Path(path).is_file():
        raise ConfigError(f"--ckpt_path {path}: no such file (a checkpoint written by `cli.py fit`)")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        why = one_line(err).split(". ")[0][:160]
        raise FreeMergeError(f"--ckpt_path {path}: refused, no checkpoint of tensors and plain values (it pickles "
                             f"other objects, or is no checkpoint: {why}); only load checkpoints you trust and "
                             f"that this package wrote") from None
    except Exception as err:  # noqa: BLE001  (a damaged zip: RuntimeError; other bytes: IndexError, ...)
        raise FreeMergeError(f"--ckpt_path {path}: not a readable PyTorch checkpoint (truncated or damaged: "
                             f"{one_line(err)[:160]})") from None
    if not isinstance(ckpt, dict):
        raise FreeMergeError(f"--ckpt_path {path}: holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    return ckpt


def import_adapters() -> list[str]:
    """Import every module of ``freemerge_pl.adapters`` (those whose optional dependency is installed), so
    that ``--model.adapter`` help lists the concrete adapters as known subclasses."""
    import freemerge_pl.adapters as models

    imported = []
    for info in pkgutil.iter_modules(models.__path__):
        try:
            importlib.import_module(f"{models.__name__}.{info.name}")
        except ImportError:
            continue
        imported.append(info.name)
    return imported


def unlisted(action: argparse.Action) -> bool:
    """A Trainer option that ``--help`` leaves out (accepted, parsed and saved like every other)."""
    dest = action.dest or ""
    return dest.startswith("trainer.") and dest.split(".")[1] not in SHOWN_TRAINER_OPTIONS


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
    """Dumps configs with the named method's hyperparameter defaults filled in (``with_method_defaults``);
    a bad value for ``merge``/``analyze`` is a one-line ``ConfigError`` (exit status 2 in ``cli_main``)."""

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        return super().dump(with_method_defaults(namespace), *args, **kwargs)

    def format_help(self) -> str:
        return self._without_unlisted(super().format_help)

    def format_usage(self) -> str:
        return self._without_unlisted(super().format_usage)

    def _without_unlisted(self, formatter: Callable[[], str]) -> str:
        """Help and usage show the workflows' Trainer options; the ~25 others are accepted, not listed (a
        suppressed option only while formatting: jsonargparse leaves suppressed options out of dumps)."""
        hidden = [(a, a.help) for a in self._actions if unlisted(a)]
        for action, _ in hidden:
            action.help = argparse.SUPPRESS
        try:
            return formatter()
        finally:
            for action, text in hidden:
                action.help = text

    def error(self, message: str, ex: Exception | None = None):
        sub = getattr(ex, "subcommand_parser", None)
        if getattr(sub, "one_line_errors", False) or getattr(self, "one_line_errors", False):
            prog = (sub or self).prog.replace(" [options]", "")
            raise ConfigError(f"{prog}: {one_line(message)}") from ex
        return super().error(message, ex)


class FreeMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning = LightningCLI.subcommands()
        return {"fit": lightning["fit"], "validate": lightning["validate"], "test": lightning["test"],
                "predict": {*lightning["predict"], "return_predictions"},
                "tune": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # Program options, read by ``cli_main`` before parsing (so they may stand anywhere); listed here for --help.
        self.parser.add_argument("--debug", action="store_true",
                                 help="on a configuration or input error, show the traceback (also: FREEMERGE_DEBUG=1)")
        self.parser.add_argument("--threads", type=int | None, default=None,
                                 help="torch threads (default: FREEMERGE_THREADS, else OMP_NUM_THREADS, else the "
                                      "usable CPUs minus the load average)")
        docs = {"model": MergedModule.__doc__, "MergeJobConfig": merge_cli.MergeJobConfig.__doc__,
                **{name: getattr(FreeMergeTrainer, name).__doc__ for name in self.subcommands()}}
        for sub in [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            tidy_help(sub, docs, GROUP_TITLES)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--seed_everything", type=bool | int, default=self.seed_everything_default,
                            help="seed of every random generator, set before the classes are built (true: a "
                                 "random seed; false: none)")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, (description, add_arguments, _) in JOB_COMMANDS.items():
            sub = self.parser_class(description=description, epilog=getattr(merge_cli, "EPILOG", None)
                                    if name == "merge" else None)
            sub.one_line_errors = True
            add_arguments(sub)
            parser._subcommands_action.add_subcommand(name, sub, help=description)
            self._subcommand_parsers[name] = sub

    def _parse_ckpt_path(self) -> None:
        """Lightning's ``_parse_ckpt_path`` (the checkpoint's hyperparameters update the config), after the file
        is read by ``read_ckpt``: a malicious or damaged ``--ckpt_path`` is a one-line error before the CLI is
        built, where Lightning's own read raised a raw ``UnpicklingError``."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and isinstance(path, str) and path not in SPECIAL_CKPT_PATHS and "://" not in path:
            read_ckpt(path)
        return super()._parse_ckpt_path()

    @property
    def is_job(self) -> bool:
        return self.subcommand in JOB_COMMANDS

    def _set_seed(self) -> None:
        if not self.is_job:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.is_job:  # no model, data or trainer: the job reads its own config
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if self.is_job:
            self.result = JOB_COMMANDS[subcommand][2](self.config[subcommand])
            return
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if self.trainer is not None and self.trainer.interrupted:  # Lightning turns Ctrl-C into exit(1)
                raise KeyboardInterrupt from None
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """On a non-terminal stderr, progress lines every few seconds instead of a progress bar."""
        configured = [*(config.get("callbacks") or []), *callbacks]
        if (config.get("enable_progress_bar", True) is not False and not stderr_is_terminal()
                and not any(isinstance(c, ProgressBar) for c in configured)):
            callbacks = [*callbacks, LineProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        """Say where the trained router went (the checkpoint ``test --ckpt_path`` takes)."""
        checkpoint = self.trainer.checkpoint_callback
        path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        if self.model.model is not None and not self.model.model.routes:
            say(f"nothing to train: {self.model.method} has no task modules, so no router (test needs no --ckpt_path)")
        elif path:
            say(f"checkpoint: {path} (test it: cli.py test --config ... --ckpt_path {path})")
        else:
            say("no checkpoint written (trainer.enable_checkpointing is false)")

    def after_test(self) -> None:
        """Say where the results went."""
        tables = [c for c in self.trainer.callbacks if isinstance(c, ResultsTable) and c.last_paths]
        if tables:
            say("results: " + ", ".join(str(p) for t in tables for p in t.last_paths))
        else:
            say("results were printed only (add the ResultsTable callback to write results.json)")

    def before_validate(self) -> None:
        if not self.datamodule.tune_val_enabled:
            raise ConfigError("validate scores the tune-val split: give every task a validation split "
                              "(data.tasks[*].val_args) or set data.tune_fraction > 0 (e.g. 0.5, as for tune); "
                              "the test split is scored by `test`")

    def after_validate(self) -> None:
        """Print the tune-val scores (the objective ``tune`` maximises for these settings)."""
        results = self.model.val_results
        if not results or not self.trainer.is_global_zero:
            return
        from freemerge_pl.callbacks import results_markdown

        print(results_markdown(results), end="")
        print("tune-val mean " + ", ".join(f"{k} {v:.4f}" for k, v in results["avg"].items()))
        if self.trainer.log_dir:
            say(f"metrics logged to {self.trainer.log_dir}")

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
        parser = self._subcommand_parsers["tune"]
        path = write_text_atomic(parser.dump(cfg, skip_check=True), out / "tuned.yaml")
        say(f"wrote {out / 'tune_report.json'}, {out / 'tune_report.md'} and {path}")


def main(args=None, run: bool = True) -> FreeMergeCLI:
    """The CLI for Python callers (errors are raised); ``run=False`` only parses ``args`` (no subcommand)
    and instantiates model, data, trainer. After ``merge``/``analyze`` the returned CLI's ``result`` holds the
    job's report."""
    argv = list(sys.argv[1:] if args is None else args)
    list_methods()  # import every method class, so ``class_path: TIES`` and ``--model.method.help TIES`` resolve
    import_adapters()
    set_parsing_settings(subclasses_enabled=[MergeMethod])
    return FreeMergeCLI(MergedModule, MultiTaskDataModule, trainer_class=FreeMergeTrainer,
                        parser_class=FreeMergeArgumentParser, auto_configure_optimizers=False,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "cli.py"}, args=argv,
                        run=run)


def cli_main(argv: list[str] | None = None) -> int:
    """``python cli.py ...`` (``freemerge_pl.jobs.program.run_program`` around ``main``): logging, thread count,
    a package error as one line naming the setting, file or key at fault with status 2 (``--debug`` /
    ``FREEMERGE_DEBUG=1``: with traceback), Ctrl-C as one line with status 130."""
    return run_program(list(sys.argv[1:] if argv is None else argv), main)


def build_from_config(args) -> tuple[MergedModule, MultiTaskDataModule]:
    """Parse a config (``["--config", path, ...]``), prepare the data and build the merged model."""
    cli = main(args, run=False)
    prepare_and_build(cli.model, cli.datamodule, "test")
    return cli.model, cli.datamodule
