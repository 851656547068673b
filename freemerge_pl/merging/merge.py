"""The in-memory merge driver: checkpoints → task vectors → optional FR pre-filter → method → backbone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import freemerge_pl
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.engine import (
    CheckpointInputs,
    apply_key,
    check_prefilter,
    execute,
    prefilter_transform,
)
from freemerge_pl.merging.experts import SparseExpert
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.task_vectors import validate_checkpoints
from freemerge_pl.sources import StateDictSource


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
    **hyperparameters: Any,
) -> MergeOutput:
    """Merge ``finetuned`` into ``pretrained`` with ``method`` (a registry name plus ``hyperparameters``, or a
    configured ``MergeMethod``): the engine run with in-memory sources and sink.

    ``exclude_keys`` (regexes) are never merged (task-specific heads); ``fr_filter_ratio`` > 0 applies the
    FR high-pass to every task vector before the method runs; ``seed`` drives random methods (DARE).
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
        if d is not None:
            delta[key] = d
        state_dict[key] = apply_key(pretrained[key], d) if d is not None else pretrained[key].clone()

    fin = execute(config, inputs, emit, seed=seed, cache=cache)
    result = MergeResult(delta, fin.task_modules, fin.info, fin.shared_modules)
    seconds = time.perf_counter() - start
    record = merge_record(config, fr_filter_ratio=fr_filter_ratio, seed=seed, exclude_keys=exclude_keys,
                          names=names, info=result.info, seconds=seconds)
    return MergeOutput(state_dict, result, config.name, config.hyperparameters(), seconds, record)


def merge_record(config: MergeMethod, **fields: Any) -> dict[str, Any]:
    """The provenance record of a merge (method, reference, every hyperparameter, package version)."""
    return {"method": config.name, "reference": config.reference, "hyperparameters": config.hyperparameters(),
            **fields, "package_version": freemerge_pl.__version__}


def save_merge(output: MergeOutput, directory, *, inputs: Sequence[str | Path] = (),
               max_shard_bytes: int | None = None) -> list[Path]:
    """Write the backbone (sharded when large), each task module, and ``merge_info.json`` (inputs + sha256)."""
    return write_export(directory, output.state_dict, output.task_modules or [], output.result.shared_modules,
                        output.record, names=output.record.get("names"), method=output.method, inputs=inputs,
                        max_shard_bytes=max_shard_bytes)


def write_export(directory, state_dict: StateDict, task_modules, shared_modules, record: dict[str, Any], *,
                 names: Sequence[str] | None, method: str, inputs: Sequence[str | Path] = (),
                 extra_files: dict[str, StateDict] | None = None, max_shard_bytes: int | None = None) -> list[Path]:
    """The one export writer (``save_merge``, ``MergedModule.export``): task modules, ``extra_files`` (name →
    tensors: heads, router), the backbone (sharded when large) and ``merge_info.json`` with the inputs'
    sha256 and the task-module files."""
    from freemerge_pl.io import DEFAULT_SHARD_BYTES, save_safetensors_atomic, save_state_dict, sha256_file

    directory = Path(directory)
    record = dict(record)
    record["inputs"] = [{"path": str(p), "sha256": sha256_file(p) if Path(p).is_file() else None}
                        for p in inputs]
    written = save_task_modules(task_modules, shared_modules, directory, names=names, method=method)
    record["task_module_files"] = [p.name for p in written]
    for name, tensors in (extra_files or {}).items():
        written.append(save_safetensors_atomic(tensors, directory / name))
    written += save_state_dict(state_dict, directory, metadata=record,
                               max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
    return written


def task_module_tensors(module) -> dict[str, torch.Tensor]:
    """The tensors that define a task module (a SparseExpert's ``key::indices``/``key::values``; else its
    state dict's tensors)."""
    if isinstance(module, SparseExpert):
        return module.to_state_dict()
    return {n: t for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def save_task_modules(task_modules, shared_modules, directory, *, names=None, method: str = "") -> list[Path]:
    """Write ``task_module_<k>.safetensors`` per task and ``shared_<name>.safetensors`` (atomic writes)."""
    from freemerge_pl.io import save_safetensors_atomic

    directory = Path(directory)
    written = []
    for k, module in enumerate(task_modules):
        meta = {"task_index": str(k), "type": type(module).__name__, "method": method}
        if names:
            meta["task"] = str(names[k])
        written.append(save_safetensors_atomic(task_module_tensors(module),
                                               directory / f"task_module_{k:02d}.safetensors", metadata=meta))
    for name, module in (shared_modules or {}).items():
        written.append(save_safetensors_atomic(task_module_tensors(module),
                                               directory / f"shared_{name}.safetensors"))
    return written
