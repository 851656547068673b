"""The LoRA merge driver: PEFT LoRA adapters of one base model merged in the full-delta space with any registry
method, and a merged delta written back as a PEFT-loadable LoRA.

Merging in the full-delta space: the task vector of adapter k is ``ΔW_k`` on the LoRA target weights
(``freemerge_pl.adapters.peft_lora`` reads them), and nothing else. Weights that no adapter targets have a zero
task vector for every task; they are excluded from the merge and stay θ_pre (``LoRAInputs`` hands only the
union of the target keys to the engine), so a method's statistics (λ, μ, thresholds) see only real deltas and
no expert entries are spent on zero tensors. A weight targeted by some adapters only has a zero task vector
for the others. ``modules_to_save`` weights (heads) are kept per task, never merged.

``merge_lora_adapters`` runs any registry method through the merge engine (``freemerge_pl.merging.engine``):
the backbone is θ_pre + the merged delta, the FREE-Merging experts are ``SparseExpert``s of the deltas, as for
any task vector. ``save_lora_adapter`` writes a merged delta back as a PEFT-loadable LoRA of a chosen rank
(truncated SVD, ``delta_to_lora``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freemerge_pl.adapters.peft_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LAYOUTS,
    PEFT_PREFIX,
    Layout,
    LoRAAdapter,
    read_adapter_config,
    read_lora_adapters,
    target_keys,
)
from freemerge_pl.errors import CheckpointMismatchError, ConfigError
from freemerge_pl.io import (
    open_checkpoint,
    publish_directory,
    save_safetensors_atomic,
    staged_directory,
    write_json_atomic,
)
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.engine import (
    MergeInputs,
    apply_key,
    check_prefilter,
    execute,
    prefilter_transform,
)
from freemerge_pl.merging.linalg import top_singular_triplets
from freemerge_pl.merging.merge import MergeOutput, merge_record
from freemerge_pl.merging.method import KeyTensors, MergeMethod
from freemerge_pl.merging.registry import build_method
from freemerge_pl.merging.source import StateDictSource, TensorSource

# ---------------------------------------------------------------------------------------------- merging


class LoRAInputs(MergeInputs):
    """The engine's inputs for LoRA adapters: per target key, task k's vector is its full delta ΔW_k (computed
    from the factors when the engine asks, float32 on ``device``; zeros when adapter k does not target the key);
    θ_pre from ``base``. Keys that no adapter targets are passed through from θ_pre (``output_keys`` holds
    every base key, ``keys`` the targets)."""

    def __init__(self, base: TensorSource, adapters: Sequence[LoRAAdapter], *, device=None,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if not adapters:
            raise ConfigError("no LoRA adapters were given: merging needs at least one")
        self.base = base
        self.adapters = list(adapters)
        self.device = device
        self.transform = transform
        self.num_tasks = len(self.adapters)
        self.output_keys = list(base.keys())
        self.keys = target_keys(self.adapters, self.output_keys)
        for key in self.keys:
            if not base.info(key).dtype.is_floating_point:
                raise CheckpointMismatchError(f"base key {key!r} is {base.info(key).dtype}: a LoRA target must be "
                                              f"a floating-point weight")
        self.shapes = {k: tuple(base.info(k).shape) for k in self.keys}
        self.dtypes = {k: base.info(k).dtype for k in self.keys}

    def load(self, key: str) -> KeyTensors:
        cache: dict[Any, Tensor] = {}

        def pre() -> Tensor:
            if "pre" not in cache:
                t = self.base.get(key)
                cache["pre"] = t if self.device is None else t.to(self.device)
            return cache["pre"]

        def loader(k: int) -> Callable[[], Tensor]:
            def load() -> Tensor:
                if k not in cache:
                    target = self.adapters[k].targets.get(key)
                    cache[k] = (target.delta(self.device) if target is not None else
                                torch.zeros(self.shapes[key], dtype=torch.float32, device=self.device))
                return cache[k]
            return load

        return KeyTensors(key, self.shapes[key], self.dtypes[key], [loader(k) for k in range(self.num_tasks)],
                          pretrained=pre, pretrained_fp32=lambda: pre().float(), transform=self.transform)


@dataclass
class LoRAMergeOutput:
    """A LoRA merge: the merged model (``output``: state dict, ``MergeResult`` with the merged delta on the target
    keys and the method's task modules, provenance record) and the adapters it read."""

    output: MergeOutput
    adapters: list[LoRAAdapter]
    names: list[str]

    @property
    def state_dict(self) -> StateDict:
        return self.output.state_dict

    @property
    def task_modules(self):
        return self.output.task_modules

    @property
    def merged_delta(self) -> StateDict:
        """θ_m − θ_pre (float32) on the LoRA target keys."""
        return self.output.result.delta

    @property
    def layouts(self) -> dict[str, Layout]:
        out: dict[str, Layout] = {}
        for adapter in self.adapters:
            out.update(adapter.layouts)
        return out

    @property
    def task_specific(self) -> dict[str, StateDict]:
        """Task name → the full weights of its ``modules_to_save`` (heads), never merged."""
        return {name: dict(a.saved_modules) for name, a in zip(self.names, self.adapters)}

    def save_lora(self, out_dir, rank: int, alpha: float | None = None, *, task: str | None = None,
                  overwrite: bool = False) -> Path:
        """The merged delta written as one PEFT LoRA adapter of ``rank`` (``save_lora_adapter``). ``task``: the
        task whose ``modules_to_save`` (its head) the adapter carries; None: none (``task_type`` null, the base
        model's own head stays), the per-task heads being in ``task_specific``."""
        if task is not None and task not in self.names:
            raise ConfigError(f"save_lora: task {task!r} is not one of the merged adapters {self.names}")
        saved = self.task_specific[task] if task is not None else None
        return save_lora_adapter(self.merged_delta, self.adapters[0].config, out_dir, rank, alpha,
                                 layouts=self.layouts, saved_modules=saved, overwrite=overwrite,
                                 record={"merge": dict(self.output.record), "head_of_task": task})


def open_base(base: str | Path | Mapping[str, Tensor] | TensorSource) -> TensorSource:
    """The base model as a lazy source: a state dict, a source, a ``.safetensors``/``.bin`` file or a directory."""
    if isinstance(base, TensorSource):
        return base
    if isinstance(base, Mapping):
        return StateDictSource(base, "base model")
    path = Path(base)
    if not path.exists():
        raise ConfigError(f"base model {path} does not exist")
    source = open_checkpoint(path)
    source.name = f"base model {path}"
    return source


def merge_lora_adapters(
    base: str | Path | Mapping[str, Tensor] | TensorSource,
    adapter_dirs: Sequence[str | Path],
    method: str | MergeMethod = "free_merging",
    *,
    names: Sequence[str] | None = None,
    fr_filter_ratio: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    **hyperparameters: Any,
) -> LoRAMergeOutput:
    """Merge LoRA adapters of one base model in the full-delta space with a registry method (or a configured
    ``MergeMethod``): task vectors are the adapters' ΔW on their target weights; every other weight stays θ_pre.

    The state dict is θ_pre + the merged delta in θ_pre's dtypes; the task modules (FREE-Merging's
    ``SparseExpert``s) are built from the deltas; ``names`` default to the adapter directory names.
    """
    config = build_method(method, hyperparameters)
    check_prefilter(config, fr_filter_ratio)
    start = time.perf_counter()
    source = open_base(base)
    adapters = read_lora_adapters(source, adapter_dirs)
    names = list(names) if names is not None else [a.name for a in adapters]
    if len(names) != len(adapters):
        raise ConfigError(f"{len(names)} names for {len(adapters)} LoRA adapters")
    inputs = LoRAInputs(source, adapters, device=device, transform=prefilter_transform(fr_filter_ratio))
    delta: StateDict = {}
    state_dict: StateDict = {}

    def emit(key: str, x, d, rng_state) -> None:
        base_tensor = source.get(key)
        if d is not None:
            delta[key] = d
        state_dict[key] = apply_key(base_tensor, d) if d is not None else base_tensor.clone()

    fin = execute(config, inputs, emit, seed=seed)
    result = MergeResult(delta, fin.task_modules, fin.info, fin.shared_modules)
    seconds = time.perf_counter() - start
    record = merge_record(config, fr_filter_ratio=fr_filter_ratio, seed=seed, names=names, info=result.info,
                          seconds=seconds, lora_adapters=[str(a.path) for a in adapters],
                          lora_targets=inputs.keys)
    output = MergeOutput(state_dict, result, config.name, config.hyperparameters(), seconds, record)
    return LoRAMergeOutput(output, adapters, names)


# ---------------------------------------------------------------------------------------------- write-back

#: adapter_config.json settings a written-back adapter turns off (set only where the base config has them)
WRITE_BACK_RESETS: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "use_qalora": False, "alora_invocation_tokens": None,
    "target_parameters": None, "layer_replication": None, "trainable_token_indices": None,
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "init_lora_weights": True,
}


def delta_to_lora(delta: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``scale·B @ A`` the best rank-``rank`` approximation of the 2-D
    ``delta`` ``[out, in]`` (truncated SVD, ``linalg.top_singular_triplets``; the singular values split evenly,
    √σ into each factor). Exact when ``rank`` ≥ rank(delta); zero rows/columns pad a ``rank`` above
    min(out, in). Float32 (float64 stays float64)."""
    if delta.dim() != 2:
        raise ValueError(f"delta_to_lora expects a 2-D delta, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    u, s, vh = top_singular_triplets(delta, rank)
    root = (s / scale).sqrt()
    b, a = u * root, root[:, None] * vh
    k = s.numel()
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
    return a.contiguous(), b.contiguous()


def _oriented(delta: Tensor, layout: Layout) -> Tensor:
    """The ``[out, in]`` matrix that ``scale·B @ A`` approximates for a delta in ``layout``."""
    return delta if layout == "linear" else delta.T


def save_lora_adapter(
    deltas: Mapping[str, Tensor],
    base_config: Mapping[str, Any] | str | Path,
    out_dir,
    rank: int,
    alpha: float | None = None,
    *,
    layouts: Mapping[str, Layout] | None = None,
    saved_modules: Mapping[str, Tensor] | None = None,
    overwrite: bool = False,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``deltas`` (base key ``<module>.weight`` → ΔW in the base weight's layout) as a PEFT LoRA adapter of
    rank ``rank`` and ``lora_alpha`` ``alpha`` (default: ``rank``, scale 1) into ``out_dir``.

    ``base_config``: an ``adapter_config.json`` (dict, file or adapter directory) giving ``task_type``,
    ``base_model_name_or_path`` and the rest; r, alpha, target modules and every variant setting are replaced.
    ``layouts``: key → linear | fan_in_fan_out | embedding (default linear). ``saved_modules``: full weights
    (base keys, e.g. one task's ``classifier.*``) written as ``modules_to_save``; without them ``task_type``
    is written null (peft would otherwise expect the task type's head among the weights). The directory (config,
    ``adapter_model.safetensors``, a ``merge_info.json`` with each key's relative truncation error) is built
    beside ``out_dir`` and renamed into place whole."""
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise ConfigError(f"lora_alpha={alpha} must be > 0")
    if isinstance(base_config, (str, Path)):
        path = Path(base_config)
        base_config = read_adapter_config(path if path.is_dir() else path.parent)
    layouts = dict(layouts or {})
    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    modules: list[str] = []
    for key, delta in deltas.items():
        layout = layouts.get(key, "linear")
        if layout not in LAYOUTS:
            raise ConfigError(f"layouts[{key!r}]={layout!r}; accepted: {list(LAYOUTS)}")
        if not key.endswith(".weight") or delta.dim() != 2:
            raise ConfigError(f"delta {key!r} (shape {tuple(delta.shape)}) cannot be written as LoRA: only 2-D "
                              f"'<module>.weight' deltas can")
        module = key[: -len(".weight")]
        matrix = _oriented(delta.float(), layout)
        a, b = delta_to_lora(matrix, rank, alpha / rank)
        norm = float(matrix.norm())
        errors[key] = float((matrix - (alpha / rank) * (b @ a)).norm()) / norm if norm else 0.0
        names = ("lora_embedding_A", "lora_embedding_B") if layout == "embedding" else ("lora_A.weight",
                                                                                       "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{names[0]}"] = a
        tensors[f"{PEFT_PREFIX}{module}.{names[1]}"] = b
        modules.append(module)
    if not modules:
        raise ConfigError("no deltas to write: save_lora_adapter needs at least one target weight")
    saved_names = sorted({k.split(".", 1)[0] for k in saved_modules or {}})
    for key, value in (saved_modules or {}).items():
        if key in deltas:
            raise ConfigError(f"saved_modules key {key!r} is also a LoRA target; a weight is one or the other")
        tensors[f"{PEFT_PREFIX}{key}"] = value
    resets = {k: v for k, v in WRITE_BACK_RESETS.items() if k in base_config}  # settings this peft knows
    config = {**dict(base_config), **resets, "peft_type": "LORA", "r": int(rank), "lora_alpha": alpha,
              "target_modules": sorted(modules), "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "fan_in_fan_out": any(layouts.get(f"{m}.weight") == "fan_in_fan_out" for m in modules),
              "bias": "none", "modules_to_save": saved_names or None, "inference_mode": True}
    if not saved_names:
        config["task_type"] = None
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        written = [write_json_atomic(config, staging / ADAPTER_CONFIG),
                   save_safetensors_atomic(tensors, staging / ADAPTER_WEIGHTS[0], metadata={"format": "pt"})]
        publish_directory(staging, out_dir, {**dict(record or {}), "lora_rank": int(rank), "lora_alpha": alpha,
                                             "relative_truncation_error": errors},
                          files=written, overwrite=overwrite)
    return out_dir


__all__ = [
    "LoRAInputs",
    "LoRAMergeOutput",
    "delta_to_lora",
    "merge_lora_adapters",
    "open_base",
    "save_lora_adapter",
]
