"""``python cli.py merge --config job.yaml [--dry-run]``: the checkpoint merge job. Every field of
``MergeJobConfig`` is an option (typed and described from its docstring), so a value of the YAML may also be
given, or overridden, on the command line (``--merge_method ties``).

``cli.py`` runs ``main`` (its own small parser, ``parser()``) before anything imports Lightning; the one
Lightning parser (``freemerge_pl.lightning.cli``) lists ``merge`` as a subcommand built from the same
``add_arguments`` and ``run``, so both take the same options and behave alike."""

from __future__ import annotations

import logging
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from freemerge_pl.errors import ConfigError, one_line
from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job
from freemerge_pl.jobs.program import tidy_help

DESCRIPTION = ("Merge checkpoints from a mergekit-style job YAML (base_model, models, merge_method, "
               "parameters, ...), streamed tensor by tensor.")

EPILOG = ("Every input is checked first (files, keys, shapes, dtypes, vocabulary, settings, free disk); "
          "--dry-run stops there. The output is built in a hidden .<output_dir>.partial/ and renamed into "
          "place when complete; rerunning an interrupted job resumes from its last complete shard and "
          "writes the same bytes (--resume false starts over).")

#: the options of the command that are not job settings
RUN_OPTIONS = ("config", "dry_run", "overwrite", "resume", "progress")


def add_arguments(parser: ArgumentParser) -> None:
    """The ``merge`` subcommand's options: the job YAML, every job field, and how to run it."""
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="the job YAML (its keys are the job options below)")
    parser.add_class_arguments(MergeJobConfig, None, sub_configs=True)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="check every input (files, keys, shapes, dtypes, vocabulary, settings, disk space), "
                             "report the plan and write nothing")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace an existing output directory (a previous merge there is kept otherwise)")
    parser.add_argument("--resume", type=bool, default=True,
                        help="continue an interrupted run of the same job from its last complete shard; "
                             "false discards the partial output and starts over")
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")


def job_config(cfg: Namespace) -> MergeJobConfig:
    """The checked ``MergeJobConfig`` of a parsed ``merge`` command line."""
    values = {k: v for k, v in cfg.as_dict().items() if k not in RUN_OPTIONS and k != "__path__"}
    return MergeJobConfig(**values)


def run(cfg: Namespace) -> dict[str, Any]:
    """Run the parsed ``merge`` command: check, then (unless ``dry_run``) merge; logs what was written."""
    log = logging.getLogger("freemerge_pl.merge")
    config = job_config(cfg)
    # --resume false discards the partial output inside the job, under its output lock
    report = run_merge_job(config, dry_run=cfg.dry_run, overwrite=cfg.overwrite, resume=cfg.resume,
                           progress=cfg.progress)
    if cfg.dry_run:
        log.info(f"dry run OK: {report['merged_tensors']} tensors to merge with {report['method']} from "
                 f"{len(report['models'])} models, {report['passthrough_tensors']} copied; output "
                 f"{report['output_bytes'] / 1e9:.3f} GB (+ task modules ≈ "
                 f"{report['task_module_bytes_estimate'] / 1e9:.3f} GB), {report['free_bytes'] / 1e9:.1f} GB free; "
                 f"nothing written")
    else:
        log.info(f"wrote {len(report['files'])} files to {report['output']}")
    return report


class _Parser(ArgumentParser):
    """A bad option or value is a one-line ``ConfigError`` naming it (exit status 2 in ``run_program``)."""

    def error(self, message: str, ex: Exception | None = None):
        raise ConfigError(f"{self.prog}: {one_line(message)}") from ex


def parser() -> ArgumentParser:
    """The ``cli.py merge`` parser on its own (no Lightning): the options of ``add_arguments``, tidy help."""
    p = _Parser(prog="cli.py merge", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    tidy_help(p, {"MergeJobConfig": MergeJobConfig.__doc__})
    return p


def main(args: list[str]) -> dict[str, Any]:
    """``cli.py merge ARGS``: parse (``--help`` prints the options and exits), check, merge; the job's report."""
    return run(parser().parse_args(args))
