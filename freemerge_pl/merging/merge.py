"""The in-memory merge driver: checkpoints → task vectors → optional FR pre-filter → method → backbone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
)
from freemerge_pl.merging.experts import SparseExpert
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.task_vectors import validate_checkpoints
from freemerge_pl.merging.source import StateDictSource


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
        if d is not None:
            delta[key] = d
        state_dict[key] = apply_key(pretrained[key], d) if d is not None else pretrained[key].clone()

    fin = execute(config, inputs, emit, seed=seed, cache=cache, progress=progress)
    result = MergeResult(delta, fin.task_modules, fin.info, fin.shared_modules)
    seconds = time.perf_counter() - start
    record = merge_record(config, fr_filter_ratio=fr_filter_ratio, seed=seed, exclude_keys=exclude_keys,
                          names=names, info=result.info, seconds=seconds)
    return MergeOutput(state_dict, result, config.name, config.hyperparameters(), seconds, record)


def merge_record(config: MergeMethod, **fields: Any) -> dict[str, Any]:
    """The provenance record of a merge (method, reference, every hyperparameter, package version)."""
    return {"method": config.name, "reference": config.reference, "hyperparameters": config.hyperparameters(),
            **fields, "package_version": __version__}


def save_merge(output: MergeOutput, directory, *, inputs: Sequence[str | Path] = (),
               max_shard_bytes: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write the backbone (sharded when large), each task module, and ``merge_info.json`` (inputs + sha256,
    every file with its size and sha256); published whole as ``write_export`` does."""
    return write_export(directory, output.state_dict, output.task_modules or [], output.result.shared_modules,
                        output.record, names=output.record.get("names"), method=output.method, inputs=inputs,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def write_export(directory, state_dict: StateDict, task_modules, shared_modules, record: dict[str, Any], *,
                 names: Sequence[str] | None, method: str, inputs: Sequence[str | Path] = (),
                 extra_files: dict[str, StateDict] | None = None, max_shard_bytes: int | None = None,
                 overwrite: bool = False) -> list[Path]:
    """The one export writer (``save_merge``, ``MergedModule.export``): task modules, ``extra_files`` (name →
    tensors: heads, router), the backbone (sharded when large) and, last, the manifest ``merge_info.json``:
    ``record``, the inputs' sha256, ``task_module_files`` and ``files`` (every file: bytes, sha256).

    Everything is written into ``.<name>.partial`` beside ``directory`` and renamed into place whole
    (``freemerge_pl.io.staged_directory`` / ``publish_directory``): a previous export of ours there is replaced
    whole (none of its files survive), any other non-empty directory is refused unless ``overwrite``; an
    error or a kill midway leaves the previous export byte-identical. Returns the published files' paths.
    """
    from freemerge_pl.io import (
        DEFAULT_SHARD_BYTES,
        MANIFEST_NAME,
        publish_directory,
        save_safetensors_atomic,
        save_state_dict,
        sha256_file,
        staged_directory,
    )

    directory = Path(directory)
    record = dict(record)
    record["inputs"] = [{"path": str(p), "sha256": sha256_file(p) if Path(p).is_file() else None}
                        for p in inputs]
    with staged_directory(directory, overwrite=overwrite) as staging:
        written = save_task_modules(task_modules, shared_modules, staging, names=names, method=method)
        record["task_module_files"] = [p.name for p in written]
        for name, tensors in (extra_files or {}).items():
            written.append(save_safetensors_atomic(tensors, staging / name))
        written += save_state_dict(state_dict, staging, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
        publish_directory(staging, directory, record, files=written, overwrite=overwrite)
    return [directory / p.name for p in written] + [directory / MANIFEST_NAME]


def task_module_tensors(module) -> dict[str, torch.Tensor]:
    """The tensors that define a task module (a SparseExpert's ``key::indices``/``key::values``; else its
    state dict's tensors)."""
    if isinstance(module, SparseExpert):
        return module.to_state_dict()
    return {n: t for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}


def task_module_metadata(module) -> dict[str, str]:
    """The safetensors metadata that, with the tensors, rebuilds ``module`` (``freemerge_pl.lightning.loading``): its
    type and, as JSON, its ``get_extra_state()`` (tensor keys, shapes, kinds) when it defines one."""
    meta = {"type": type(module).__name__}
    if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
        meta["extra_state"] = json.dumps(module.get_extra_state(), sort_keys=True)
    return meta


def save_task_modules(task_modules, shared_modules, directory, *, names=None, method: str = "") -> list[Path]:
    """Write ``task_module_<k>.safetensors`` per task and ``shared_<name>.safetensors`` (atomic writes; the
    metadata names the task, the type and what ``freemerge_pl.lightning.loading`` needs to rebuild the module)."""
    from freemerge_pl.io import save_safetensors_atomic

    directory = Path(directory)
    written = []
    for k, module in enumerate(task_modules):
        meta = {"task_index": str(k), "method": method, **task_module_metadata(module)}
        if names:
            meta["task"] = str(names[k])
        written.append(save_safetensors_atomic(task_module_tensors(module),
                                               directory / f"task_module_{k:02d}.safetensors", metadata=meta))
    for name, module in (shared_modules or {}).items():
        meta = {"name": name, "method": method, **task_module_metadata(module)}
        written.append(save_safetensors_atomic(task_module_tensors(module),
                                               directory / f"shared_{name}.safetensors", metadata=meta))
    return written
