"""PEFT LoRA adapters on a shared base model, read without peft: the adapter files, their full deltas, the
fine-tuned models they define, and ``PeftLoRAAdapter`` (the ``ModelAdapter`` for ``MergedModule``).

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) with, per
target module ``<path>`` of the base model, ``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and
``.lora_B.weight`` ``[out, r]`` (some versions keep the adapter name: ``.lora_A.default.weight``), or for an
embedding ``.lora_embedding_A`` ``[r, num_embeddings]`` / ``.lora_embedding_B`` ``[dim, r]``; plus the full
weights of ``modules_to_save`` (a sequence-classification adapter's ``classifier``/``score``). Its change of
the base weight ``<path>.weight`` is (peft's ``get_delta_weight``)::

    ΔW = scale · B @ A                 (nn.Linear, [out, in])
    ΔW = scale · (B @ A)ᵀ              (fan_in_fan_out: GPT-2's Conv1D, [in, out]; embeddings, [num, dim])
    scale = alpha / r                  (alpha / √r with use_rslora)

with ``r``/``alpha`` from ``rank_pattern``/``alpha_pattern`` when a pattern matches the module (peft's rule).
The layout of each target is read from the base weight's shape (a square weight follows ``fan_in_fan_out``).
Unsupported variants (DoRA, LoRA biases, trainable biases, conv LoRA, aLoRA, QALoRA, LoRA on parameters, layer
replication, trainable tokens) fail with an error naming the file and the setting.

The task vector of adapter k is ``ΔW_k`` on its LoRA target weights and nothing else: weights that no adapter
targets stay θ_pre (``target_keys``/``non_target_pattern`` name them for ``exclude_keys``).
``modules_to_save`` weights are task-specific, like classification heads: kept per task
(``LoRAAdapter.saved_modules``), never merged. ``LoRAModelSource`` is θ_k = θ_pre + ΔW_k as a lazy checkpoint
source. Merging adapters and writing a merge back as a LoRA: ``freemerge_pl.jobs.lora``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.adapters.hf_text import (
    TextEncoderBackbone,
    text_depth,
    text_prefix_features,
    text_token_mean,
)
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import load_state_dict
from freemerge_pl.merging.base import StateDict
from freemerge_pl.merging.source import TensorInfo, TensorSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

Layout = Literal["linear", "fan_in_fan_out", "embedding"]
LAYOUTS: tuple[str, ...] = ("linear", "fan_in_fan_out", "embedding")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?$")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")

#: adapter_config.json settings this reader cannot turn into ΔW = scale·B·A: (setting, is-set test, why)
UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_dora", bool, "DoRA rescales the merged weight per column by a learned magnitude"),
    ("bias", lambda v: v not in (None, "none"), "trained biases are not a LoRA delta (train with bias='none')"),
    ("lora_bias", bool, "a bias on lora_B is not part of ΔW = scale·B·A"),
    ("use_qalora", bool, "QALoRA pools the input before lora_A"),
    ("alora_invocation_tokens", bool, "activated LoRA applies only after its invocation tokens"),
    ("target_parameters", bool, "LoRA on bare nn.Parameters (MoE experts) is not read"),
    ("layer_replication", bool, "replicated layers share weights the base model does not have"),
    ("trainable_token_indices", bool, "trainable-token deltas are not read"),
)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA-adapted weight: the base key it changes, its layout, the factors and the scale."""

    module: str
    key: str
    layout: Layout
    lora_A: Tensor
    lora_B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the base weight this target changes."""
        out, inp = int(self.lora_B.shape[0]), int(self.lora_A.shape[1])
        return (out, inp) if self.layout == "linear" else (inp, out)

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """ΔW in float32, in the base weight's layout (peft's ``get_delta_weight``)."""
        a = self.lora_A.to(device=device, dtype=torch.float32)
        b = self.lora_B.to(device=device, dtype=torch.float32)
        product = (b @ a) * self.scale
        return product if self.layout == "linear" else product.T.contiguous()


@dataclass
class LoRAAdapter:
    """A PEFT LoRA directory read into memory: its config, its targets (by base key) and the full weights of its
    ``modules_to_save`` (base keys; task-specific)."""

    path: Path
    weights_file: Path
    config: dict[str, Any]
    targets: dict[str, LoRATarget]
    saved_modules: dict[str, Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def deltas(self, device: torch.device | str | None = None) -> StateDict:
        """Base key → ΔW (float32) for every target."""
        return {key: t.delta(device) for key, t in self.targets.items()}

    @property
    def layouts(self) -> dict[str, Layout]:
        return {key: t.layout for key, t in self.targets.items()}


def is_lora_adapter_dir(path) -> bool:
    """Whether ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA directory, checked for settings this module cannot read."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise FreeMergeError(f"LoRA adapter {path} is not a directory (expected a PEFT adapter directory with "
                             f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]})")
    if not file.is_file():
        raise FreeMergeError(f"LoRA adapter {path} has no {ADAPTER_CONFIG} (is it a PEFT adapter directory? a "
                             f"merged model directory goes into a plain merge instead)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FreeMergeError(f"{file} cannot be read as JSON: {err}") from err
    if not isinstance(config, dict):
        raise FreeMergeError(f"{file} must hold a JSON object, found {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FreeMergeError(f"{file}: peft_type={config.get('peft_type')!r}; only LoRA adapters are supported")
    for setting, is_set, why in UNSUPPORTED:
        if is_set(config.get(setting)):
            raise FreeMergeError(f"{file}: {setting}={config.get(setting)!r} is not supported ({why})")
    for setting in ("r", "lora_alpha"):
        value = config.get(setting)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise FreeMergeError(f"{file}: {setting}={value!r} must be a positive number")
    return config


def _weights_file(path: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise FreeMergeError(f"LoRA adapter {path} has neither {ADAPTER_WEIGHTS[0]} nor {ADAPTER_WEIGHTS[1]}")


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key matching ``module`` (peft's ``get_pattern_key`` rule:
    the pattern matches a dot-separated suffix of the module path), or None."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


def lora_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """``(r, scale)`` of ``module``: r and alpha from the patterns or the defaults; scale = alpha/r
    (alpha/√r with ``use_rslora``)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config["lora_alpha"]
    return int(r), float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _module_and_kind(key: str) -> tuple[str, str, str | None] | None:
    """``(module path, A|B|embedding_A|embedding_B, adapter name)`` of a LoRA factor key, or None."""
    match = _LORA_KEY.match(key) or _EMBEDDING_KEY.match(key)
    if match is None:
        return None
    return match.group("module"), match.group("kind").replace("lora_", ""), match.group("name")


def _layout(kind: str, a: Tensor, b: Tensor, base_shape: tuple[int, ...] | None, fan_in_fan_out: bool,
            where: str) -> Layout:
    """The target's layout: embeddings by their key; else from the base weight's shape (config flag when square
    or unknown); an error naming ``where`` when neither layout fits the base weight."""
    out, inp = int(b.shape[0]), int(a.shape[1])
    if kind.startswith("embedding"):
        expected: list[tuple[Layout, tuple[int, int]]] = [("embedding", (inp, out))]
    else:
        expected = [("fan_in_fan_out", (inp, out)), ("linear", (out, inp))]
        if not fan_in_fan_out:
            expected.reverse()
    if base_shape is None:
        return expected[0][0]
    for layout, shape in expected:
        if tuple(base_shape) == shape:
            return layout
    raise CheckpointMismatchError(
        f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} give a delta of shape {expected[0][1]}, "
        f"the base weight has shape {tuple(base_shape)} (an adapter trained on another base model?)")


def read_lora_adapter(path, base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA directory; with ``base_shapes`` (base key → shape) every target is checked against the
    base model (missing module or wrong shape: an error naming file and key). Saved modules are task-specific
    and may differ in shape from the base's (a head with another class count)."""
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = _weights_file(path)
    tensors = load_state_dict(weights_file)
    factors: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    names: set[str] = set()
    for raw_key, value in tensors.items():
        key = raw_key.removeprefix(PEFT_PREFIX)
        parsed = _module_and_kind(key)
        if parsed is not None:
            module, kind, name = parsed
            if name is not None:
                names.add(name)
            factors.setdefault(module, {})[kind] = value
        elif "lora_" in key:
            why = " (DoRA)" if "lora_magnitude_vector" in key else ""
            raise FreeMergeError(f"{weights_file}: key {raw_key!r} is not a LoRA factor this reader supports{why}")
        elif config.get("modules_to_save"):
            saved[_SAVED_WRAPPER.sub(".", key)] = value
        else:
            raise FreeMergeError(f"{weights_file}: unexpected key {raw_key!r} (neither a lora_A/lora_B factor nor, "
                                 f"with no modules_to_save in {ADAPTER_CONFIG}, a saved module)")
    if len(names) > 1:
        raise FreeMergeError(f"{weights_file} holds several adapters {sorted(names)}; save each one on its own")
    if not factors:
        raise FreeMergeError(f"{weights_file} holds no LoRA factors (lora_A/lora_B)")
    targets: dict[str, LoRATarget] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in factors.items():
        kinds = ("embedding_A", "embedding_B") if "embedding_A" in parts or "embedding_B" in parts else ("A", "B")
        where = f"{weights_file} module {module!r}"
        if set(parts) != set(kinds):
            raise FreeMergeError(f"{where}: has lora_{sorted(parts)} but needs both lora_{kinds[0]} and "
                                 f"lora_{kinds[1]}")
        a, b = parts[kinds[0]], parts[kinds[1]]
        if a.dim() != 2 or b.dim() != 2:
            raise FreeMergeError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not matrices "
                                 f"(convolution LoRA is not supported)")
        r, scale = lora_scale(config, module)
        if a.shape[0] != r or b.shape[1] != r:
            raise FreeMergeError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank "
                                 f"r={r} from {ADAPTER_CONFIG} (r / rank_pattern)")
        key = f"{module}.weight"
        base_shape = None
        if base_shapes is not None:
            if key not in base_shapes:
                raise CheckpointMismatchError(
                    f"{where}: the base model has no weight {key!r} for this LoRA target (an adapter of another "
                    f"base model?); base keys look like {list(base_shapes)[:3]}")
            base_shape = tuple(base_shapes[key])
        layout = _layout(kinds[0], a, b, base_shape, fan_in_fan_out, where)
        targets[key] = LoRATarget(module, key, layout, a, b, scale)
    return LoRAAdapter(path, weights_file, config, targets, saved)


def _shapes(base: TensorSource) -> dict[str, tuple[int, ...]]:
    return {k: tuple(base.info(k).shape) for k in base}


def read_lora_adapters(base: TensorSource, adapter_dirs: Sequence[str | Path]) -> list[LoRAAdapter]:
    """Every adapter read and checked against ``base`` (keys and shapes)."""
    if not adapter_dirs:
        raise ConfigError("no LoRA adapters were given: merging needs at least one adapter directory")
    shapes = _shapes(base)
    return [read_lora_adapter(p, shapes) for p in adapter_dirs]


# ------------------------------------------------------------------------------------ fine-tuned models


def target_keys(adapters: Sequence[LoRAAdapter], order: Sequence[str]) -> list[str]:
    """The union of the adapters' target keys, in ``order`` (the base's key order)."""
    union = set().union(*(a.targets for a in adapters))
    return [k for k in order if k in union]


def non_target_pattern(keys: Sequence[str]) -> str:
    """One regex matching every key except ``keys`` (for ``exclude_keys``: those keys stay θ_pre)."""
    return "^(?!(?:" + "|".join(re.escape(k) for k in keys) + ")$)"


class LoRAModelSource(TensorSource):
    """θ_k = θ_pre + ΔW_k as a lazy checkpoint source (for drivers that read fine-tuned checkpoints, e.g. the
    streaming merge job): target keys come in float32 (fp32(θ_pre) + ΔW, so θ_k − θ_pre recovers ΔW to float32
    rounding instead of losing it to a bf16/fp16 cast), every other key is θ_pre's tensor. Pair it with
    ``exclude_keys=[non_target_pattern(keys)]`` so non-targets stay θ_pre (``LoRAInputs`` does both exactly)."""

    def __init__(self, base: TensorSource, adapter: LoRAAdapter) -> None:
        self.base, self.adapter = base, adapter
        self.name = f"LoRA adapter {adapter.path}"

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def info(self, key: str) -> TensorInfo:
        info = self.base.info(key)
        if key in self.adapter.targets:
            return TensorInfo(info.shape, torch.float32, str(self.adapter.weights_file))
        return info

    def get(self, key: str) -> Tensor:
        t = self.base.get(key)
        target = self.adapter.targets.get(key)
        return t.float() + target.delta(t.device) if target is not None else t


# ---------------------------------------------------------------------------------------------- ModelAdapter

#: HF model types whose sequence-classification head reads the first token's state or the base model's pooler
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


class FirstTokenHead(nn.Module):
    """A HF head that takes hidden states ``[B, T, D]`` and reads token 0 (RoBERTa's), fed ``[B, D]``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features[:, None, :])


class PeftLoRAAdapter(ModelAdapter):
    """LoRA adapters (one per task) of one HF sequence-classification base model, for ``MergedModule``.

    ``base_model``: the base model's directory (``config.json`` + ``model.safetensors``), read offline.
    ``adapters``: task → PEFT LoRA directory, in task order; each one's ``modules_to_save`` must hold its
    classification head (peft's ``task_type: SEQ_CLS`` saves ``classifier``/``score``).
    θ_k = θ_pre + ΔW_k (float32) on the adapter's targets; every key no adapter targets is excluded from the
    merge (``exclude_keys``), so it stays θ_pre. Inputs are token ids ``[B, T]`` (no padding).
    Supported model types: BERT, RoBERTa, XLM-RoBERTa (``SUPPORTED_MODEL_TYPES``).
    """

    input_kind = "tokens"
    pooled_features = text_token_mean
    prefix_features = text_prefix_features
    backbone_depth = text_depth

    def __init__(self, base_model: str, adapters: dict[str, str]) -> None:
        if not adapters:
            raise ConfigError("PeftLoRAAdapter needs at least one LoRA adapter (adapters: {task: directory})")
        self.base_model = str(base_model)
        self.adapters = {str(k): str(v) for k, v in adapters.items()}
        self._hf_config = None
        self._base: StateDict | None = None
        self._read: dict[str, LoRAAdapter] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.adapters)

    def checkpoint_paths(self) -> list[str]:
        files = [str(p) for p in sorted(Path(self.base_model).glob("*.safetensors"))]
        for path in self.adapters.values():
            files += [str(Path(path) / ADAPTER_CONFIG)] + [str(Path(path) / n) for n in ADAPTER_WEIGHTS
                                                            if (Path(path) / n).is_file()]
        return files

    def prepare(self) -> None:
        """Check that the base model and every adapter directory exist (one error listing the missing ones)."""
        missing = [p for p in [self.base_model, *self.adapters.values()] if not Path(p).exists()]
        if missing:
            raise FreeMergeError(f"PeftLoRAAdapter: {len(missing)} path(s) do not exist: {missing}")

    # ------------------------------------------------------------------ files
    def hf_config(self):
        if self._hf_config is None:
            from transformers import AutoConfig

            try:
                self._hf_config = AutoConfig.from_pretrained(self.base_model, local_files_only=True)
            except (OSError, ValueError) as err:
                raise FreeMergeError(f"base model {self.base_model}: cannot read its config.json: {err}") from err
            if self._hf_config.model_type not in SUPPORTED_MODEL_TYPES:
                raise ConfigError(f"base model {self.base_model}: model_type {self._hf_config.model_type!r} is not "
                                  f"supported by PeftLoRAAdapter; accepted: {list(SUPPORTED_MODEL_TYPES)}")
        return self._hf_config

    def _model(self, num_labels: int | None = None, device: str | None = None) -> nn.Module:
        """The HF sequence classifier, randomly initialised (``device="meta"``: shapes only, no memory)."""
        from transformers import AutoModelForSequenceClassification

        config = self.hf_config()
        if num_labels is not None:
            config = type(config).from_dict({**config.to_dict(), "num_labels": num_labels})
        with torch.device(device or "cpu"):
            return AutoModelForSequenceClassification.from_config(config)

    @property
    def prefix(self) -> str:
        from transformers import AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification._model_mapping[type(self.hf_config())]
        return cls.base_model_prefix

    def base_state_dict(self) -> StateDict:
        """Every tensor of the base model's checkpoint (read once)."""
        if self._base is None:
            self._base = load_state_dict(self.base_model)
        return self._base

    def adapter(self, task: str) -> LoRAAdapter:
        """The task's adapter, read and checked against the base model's keys and shapes (once)."""
        if task not in self.adapters:
            raise ConfigError(f"task {task!r} is not configured; accepted: {self.task_names}")
        if task not in self._read:
            shapes = {k: tuple(v.shape) for k, v in self.base_state_dict().items()}
            adapter = read_lora_adapter(self.adapters[task], shapes)
            outside = [k for k in adapter.targets if not k.startswith(self.prefix + ".")]
            if outside:
                raise ConfigError(f"LoRA adapter {adapter.path} ({task}): targets {outside[:5]} lie outside the "
                                  f"encoder {self.prefix!r}; only encoder weights are merged")
            self._read[task] = adapter
        return self._read[task]

    # ------------------------------------------------------------------ state dicts
    def pretrained_state_dict(self) -> StateDict:
        start = self.prefix + "."
        return {k: v for k, v in self.base_state_dict().items() if k.startswith(start)}

    def finetuned_state_dict(self, task: str) -> StateDict:
        out = dict(self.pretrained_state_dict())
        for key, target in self.adapter(task).targets.items():
            out[key] = out[key].float() + target.delta()
        return out

    @property
    def exclude_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        """Every backbone key that no adapter targets: passed through from θ_pre."""
        keys = target_keys([self.adapter(t) for t in self.task_names], list(self.pretrained_state_dict()))
        return (non_target_pattern(keys),)

    # ------------------------------------------------------------------ modules
    def build_backbone(self) -> nn.Module:
        encoder = getattr(self._model(), self.prefix)
        # BERT's classifier reads the pooler; RoBERTa's classifier (no pooler) the first token's hidden state
        return TextEncoderBackbone(encoder, self.prefix,
                                   "pooler" if getattr(encoder, "pooler", None) is not None else "first_token")

    def _head_name(self, task: str) -> str:
        adapter = self.adapter(task)
        heads = sorted({k.split(".", 1)[0] for k in adapter.saved_modules})
        if len(heads) != 1:
            raise ConfigError(f"LoRA adapter {adapter.path} ({task}): modules_to_save must hold exactly one "
                              f"classification head, found {heads or 'none'} (train with task_type='SEQ_CLS')")
        return heads[0]

    def head_state_dict(self, task: str) -> StateDict:
        """The task's head tensors, keys relative to the head module."""
        name = self._head_name(task)
        return {k[len(name) + 1:]: v for k, v in self.adapter(task).saved_modules.items()}

    def num_classes(self, task: str) -> int:
        name, sd = self._head_name(task), self.head_state_dict(task)
        head = getattr(self._model(device="meta"), name)
        last = [n for n, p in head.named_parameters() if p.dim() == 2][-1]
        if last not in sd:
            raise CheckpointMismatchError(f"LoRA adapter {self.adapter(task).path} ({task}): head {name!r} has no "
                                          f"{last!r}; found {sorted(sd)}")
        return int(sd[last].shape[0])

    def build_head(self, task: str) -> nn.Module:
        name = self._head_name(task)
        head = getattr(self._model(self.num_classes(task), device="meta"), name).to_empty(device="cpu")
        try:
            head.load_state_dict({k: v.float() for k, v in self.head_state_dict(task).items()}, strict=True)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"LoRA adapter {self.adapter(task).path} ({task}): its saved head "
                                          f"{name!r} does not fit the base model's: {err}") from err
        return head if isinstance(head, nn.Linear) else FirstTokenHead(head)

    def __repr__(self) -> str:
        return f"PeftLoRAAdapter(base_model={self.base_model!r}, tasks={self.task_names})"


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LAYOUTS",
    "PEFT_PREFIX",
    "Layout",
    "LoRAAdapter",
    "LoRAModelSource",
    "LoRATarget",
    "PeftLoRAAdapter",
    "is_lora_adapter_dir",
    "non_target_pattern",
    "read_adapter_config",
    "read_lora_adapter",
    "read_lora_adapters",
    "target_keys",
]
