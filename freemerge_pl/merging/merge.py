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
from freemerge_pl.merging.experts import SparseExpert
from freemerge_pl.merging.fourier import check_filter_ratio, highpass
from freemerge_pl.merging.registry import get_method
from freemerge_pl.merging.task_vectors import apply_delta
from freemerge_pl.merging.task_vectors import task_vectors as make_task_vectors


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
    """The FR high-pass as a pre-transform for any task-vector method (paper Table 8)."""
    check_filter_ratio(fr_filter_ratio)
    if fr_filter_ratio == 0:
        return task_vectors
    return [{k: highpass(v, fr_filter_ratio, cutoff_mode=cutoff_mode) for k, v in tv.items()}
            for tv in task_vectors]


def merge(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    method: str = "free_merging",
    *,
    names: Sequence[str] | None = None,
    exclude_keys: str | Sequence[str] | None = None,
    fr_filter_ratio: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    **hyperparameters: Any,
) -> MergeOutput:
    """Merge ``finetuned`` into ``pretrained`` with the registered ``method``.

    ``exclude_keys`` (regexes) are never merged (task-specific heads); ``fr_filter_ratio`` > 0 applies the
    FR high-pass to every task vector before the method runs; ``seed`` drives random methods (DARE).
    """
    spec = get_method(method)
    spec.validate(hyperparameters)
    start = time.perf_counter()
    tvs = make_task_vectors(pretrained, finetuned, names, exclude_keys)
    if device is not None:
        tvs = [{k: v.to(device) for k, v in tv.items()} for tv in tvs]
    tvs = prefilter(tvs, fr_filter_ratio)
    result = run_method(method, tvs, pretrained, seed=seed, device=device, **hyperparameters)
    state_dict = apply_delta(pretrained, result.delta)
    seconds = time.perf_counter() - start
    record = {
        "method": method,
        "reference": spec.reference,
        "hyperparameters": {**spec.hyperparameters, **hyperparameters},
        "fr_filter_ratio": fr_filter_ratio,
        "seed": seed,
        "exclude_keys": exclude_keys,
        "names": list(names) if names is not None else None,
        "info": result.info,
        "package_version": freemerge_pl.__version__,
        "seconds": seconds,
    }
    return MergeOutput(state_dict, result, method, dict(hyperparameters), seconds, record)


def run_method(
    method: str,
    task_vectors: list[StateDict],
    pretrained: StateDict,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    **hyperparameters: Any,
) -> MergeResult:
    """Run a registered method on prepared task vectors: supplies its context (seeded generator, θ_pre)
    and, for ``expert_dtype=None``, casts expert values to θ_pre's dtypes."""
    spec = get_method(method)
    spec.validate(hyperparameters)
    context: dict[str, Any] = {}
    if "generator" in _params(spec.fn):
        context["generator"] = torch.Generator(device=device or "cpu").manual_seed(seed)
    if "pretrained" in _params(spec.fn):
        context["pretrained"] = pretrained
    result = spec.fn(task_vectors, **context, **hyperparameters)
    if not isinstance(result, MergeResult):
        result = MergeResult(result)
    effective = {**spec.hyperparameters, **hyperparameters}
    if "expert_dtype" in effective and effective["expert_dtype"] is None and result.task_modules:
        _cast_expert_values(result.task_modules, pretrained)
    return result


def _params(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _cast_expert_values(modules, pretrained: StateDict) -> None:
    for m in modules:
        if isinstance(m, SparseExpert):
            m.cast_values_({key: pretrained[key].dtype for key in m.keys})


def save_merge(output: MergeOutput, directory, *, inputs: Sequence[str | Path] = (),
               max_shard_bytes: int | None = None) -> list[Path]:
    """Write the backbone (sharded when large), each task module, and ``merge_info.json`` (inputs + sha256)."""
    from freemerge_pl.io import DEFAULT_SHARD_BYTES, save_state_dict, sha256_file

    directory = Path(directory)
    record = dict(output.record)
    record["inputs"] = [{"path": str(p), "sha256": sha256_file(p) if Path(p).is_file() else None}
                        for p in inputs]
    written = save_task_modules(output.task_modules or [], output.result.shared_modules, directory,
                                names=record.get("names"), method=output.method)
    record["task_module_files"] = [p.name for p in written]
    written += save_state_dict(output.state_dict, directory, metadata=record,
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
