"""``python cli.py analyze --config X.yaml --output_dir D [options]``: the frequency-domain interference analysis
(docs/semantics.md §10) of the checkpoints a config names, written as JSON, Markdown and two PNGs.

``--config`` is either a LightningCLI config (its ``model.adapter``: ``class_path`` + ``init_args``, built
with jsonargparse exactly as ``fit``/``test`` build it) or a merge-job config (``base_model``, ``models``,
``exclude_keys``), whose checkpoint files are read lazily, one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.errors import ConfigError
from freemerge_pl.jobs.analysis.interference import (
    DEFAULT_METHODS,
    DEFAULT_RATIOS,
    InterferenceReport,
    analyze,
)
from freemerge_pl.jobs.analysis.run import adapter_inputs, checkpoint_inputs, choose_tasks, write_outputs
from freemerge_pl.merging.fourier import CUTOFF_MODES

DESCRIPTION = ("Analyse the frequency-domain interference of the task vectors a config names (JSON, Markdown "
               "and two PNGs).")


def add_arguments(p: ArgumentParser) -> None:
    """The ``analyze`` subcommand's options."""
    p.add_argument("--config", required=True,
                   help="a LightningCLI YAML (model.adapter) or a merge-job YAML (base_model, models)")
    p.add_argument("--output_dir", "--output-dir", required=True, help="directory of the outputs")
    p.add_argument("--layers", default=None, help="regex: analyse only the keys it matches (re.search)")
    p.add_argument("--tasks", nargs="+", default=None, help="analyse these tasks (default: all, at least two)")
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS),
                   help="FR filter ratios of the energy-below-cutoff curve")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="merging methods whose per-task vectors are compared (Table 1)")
    p.add_argument("--method_args", "--method-args", default=None,
                   help='JSON/YAML mapping method → hyperparameters, e.g. "{fr_merging: {filter_ratio: 0.5}}"')
    p.add_argument("--cutoff_mode", "--cutoff-mode", default="fraction", choices=list(CUTOFF_MODES),
                   help="how a filter ratio becomes a frequency cutoff (docs/semantics.md §10)")
    p.add_argument("--include_1d", "--include-1d", action="store_true", help="also analyse 1-D tensors")
    p.add_argument("--plot_tasks", "--plot-tasks", nargs="+", default=None,
                   help="tasks in the spectra grid (default: all analysed)")
    p.add_argument("--plot_layers", "--plot-layers", type=int, default=4,
                   help="keys in the spectra grid (evenly spaced among the analysed ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (DARE), as the merge's")
    p.add_argument("--no-plots", "--no_plots", dest="plots", action="store_false",
                   help="write the JSON and Markdown tables only")


def read_config(path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping (model.adapter, or base_model + models)")
    return raw


def build_adapter(spec: Any, where: str) -> ModelAdapter:
    """The adapter of a ``model.adapter`` entry (``class_path`` + ``init_args``), built by jsonargparse."""
    from jsonargparse import ArgumentError, ArgumentParser

    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{where}: model.adapter must be a mapping with class_path (and init_args)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--adapter", type=ModelAdapter)
    try:
        cfg = parser.parse_object({"adapter": spec})
        return parser.instantiate_classes(cfg).adapter
    except (ArgumentError, ImportError, TypeError, ValueError) as err:  # parse / import / constructor errors
        raise ConfigError(f"{where}: model.adapter {spec.get('class_path')!r}: {err}") from None


def _method_args(text: str | None) -> dict[str, dict[str, Any]] | None:
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--method_args {text!r} is not JSON/YAML: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"--method_args {text!r} must map each method name to a mapping of hyperparameters")
    return value


def run(args: Namespace) -> InterferenceReport:
    """Run the parsed ``analyze`` command."""
    raw = read_config(args.config)
    options = {"methods": args.methods, "method_args": _method_args(args.method_args), "ratios": args.ratios,
               "layers": args.layers, "include_1d": args.include_1d, "cutoff_mode": args.cutoff_mode,
               "plot_tasks": args.plot_tasks, "plot_layers": args.plot_layers, "seed": args.seed}
    if args.plots:
        from freemerge_pl.jobs.analysis.plots import pyplot

        pyplot()  # a missing matplotlib fails before any checkpoint is read
    if "base_model" in raw:  # a merge-job config: file-backed sources
        from freemerge_pl.jobs.merge_job import MergeJobConfig

        job = MergeJobConfig.from_yaml(args.config)
        names = choose_tasks(job.names, args.tasks, f"merge config {args.config}")
        paths = {n: m.model for n, m in zip(job.names, job.models)}
        inputs = checkpoint_inputs(job.base_model, [paths[n] for n in names], names=names,
                                   exclude_keys=job.exclude_keys)
        source = {"base_model": job.base_model, "models": [paths[n] for n in names]}
    else:
        model = raw.get("model")
        if not isinstance(model, dict) or "adapter" not in model:
            raise ConfigError(f"config {args.config}: no model.adapter (a LightningCLI config) and no base_model "
                              f"(a merge-job config)")
        adapter = build_adapter(model["adapter"], f"config {args.config}")
        adapter.prepare()
        inputs = adapter_inputs(adapter, args.tasks)
        source = {"adapter": model["adapter"]}
    report = analyze(inputs, progress=_progress(), **options)
    write_outputs(report, args.output_dir, plots=args.plots,
                  settings={"config": str(args.config), **source, **options})
    print(f"interference metric {report.metric:.4g} over {len(report.keys)} tensors of {len(report.tasks)} tasks; "
          f"wrote {args.output_dir}/interference.{{json,md}}" + (", spectra.png, cutoff.png" if args.plots else ""))
    return report


def _progress():
    from freemerge_pl.progress import progress_iter

    return lambda keys, desc: progress_iter(keys, desc, unit="tensor")
