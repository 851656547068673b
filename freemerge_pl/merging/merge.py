"""The in-memory merge driver: checkpoints → task vectors → optional FR pre-filter → method → backbone."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from freemerge_pl._version import __version__
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.engine import (
    CheckpointInputs,
    apply_key,
    check_prefilter,
    execute,
    prefilter_transform,
    sub_pretrained_,
)
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.source import StateDictSource
from freemerge_pl.merging.task_vectors import validate_checkpoints


@dataclass
class MergeOutput:
    """A merged backbone state dict (θ_pre's dtypes), the method's task modules and a provenance record."""

    state_dict: StateDict
    result: MergeResult
    method: str
    hyperparameters: dict[str, Any]
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def task_modules(self):
        return self.result.task_modules


def prefilter(
    task_vectors: list[StateDict], fr_filter_ratio: float, cutoff_mode: str = "fraction"
) -> list[StateDict]:
    """The FR high-pass as a pre-transform for any task-vector method (paper Table 8), on whole dicts."""
    transform = prefilter_transform(fr_filter_ratio, cutoff_mode)
    if transform is None:
        return task_vectors
    return [{k: transform(v) for k, v in tv.items()} for tv in task_vectors]


def merge(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    method: str | MergeMethod = "free_merging",
    *,
    names: Sequence[str] | None = None,
    exclude_keys: str | Sequence[str] | None = None,
    fr_filter_ratio: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    cache: dict | None = None,
    progress: bool | Callable = False,
    **hyperparameters: Any,
) -> MergeOutput:
    """Merge ``finetuned`` into ``pretrained`` with ``method`` (a registry name plus ``hyperparameters``, or a
    configured ``MergeMethod``): the engine run with in-memory sources and sink.

    ``exclude_keys`` (regexes) are never merged (task-specific heads); ``fr_filter_ratio`` > 0 applies the
    FR high-pass to every task vector before the method runs; ``seed`` drives random methods (DARE);
    ``progress`` as ``engine.execute``'s (True: a bar on a terminal, periodic lines otherwise).
    """
    config = build_method(method, hyperparameters)
    check_prefilter(config, fr_filter_ratio)
    start = time.perf_counter()
    validate_checkpoints(pretrained, finetuned, names, exclude_keys)
    names = list(names) if names is not None else [f"finetuned[{i}]" for i in range(len(finetuned))]
    inputs = CheckpointInputs(StateDictSource(pretrained, "pretrained"),
                              [StateDictSource(sd, n) for sd, n in zip(finetuned, names)], names=names,
                              exclude_keys=exclude_keys, device=device,
                              transform=prefilter_transform(fr_filter_ratio), check_finite=False)
    delta: StateDict = {}
    state_dict: StateDict = {}

    def emit(key: str, x, d, rng_state) -> None:
        if d is None:
            state_dict[key] = pretrained[key].clone()
        elif config.output_is_weights:  # θ_m itself, cast once (as the streaming job writes it)
            state_dict[key] = d.to(pretrained[key].dtype, copy=True)
            delta[key] = sub_pretrained_(d, pretrained[key])
        else:
            delta[key] = d
            state_dict[key] = apply_key(pretrained[key], d)

    fin = execute(config, inputs, emit, seed=seed, cache=cache, progress=progress, emit_weights=True)
    result = MergeResult(delta, fin.task_modules, fin.info, fin.shared_modules)
    seconds = time.perf_counter() - start
    record = merge_record(config, fr_filter_ratio=fr_filter_ratio, seed=seed, exclude_keys=exclude_keys,
                          names=names, info=result.info, seconds=seconds)
    return MergeOutput(state_dict, result, config.name, config.hyperparameters(), seconds, record)


def merge_record(config: MergeMethod, **fields: Any) -> dict[str, Any]:
    """The provenance record of a merge (method, reference, every hyperparameter, package version)."""
    return {"method": config.name, "reference": config.reference, "hyperparameters": config.hyperparameters(),
            **fields, "package_version": __version__}
