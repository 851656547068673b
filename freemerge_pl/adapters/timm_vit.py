"""Adapter for timm image models (ViTs and others) fine-tuned per task: state dicts or safetensors files.

The backbone is ``timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)``: no
download, and its classifier is ``Identity``, so it maps images to pooled (pre-logits) features ``[B, D]``
and its state dict holds no ``head.*`` keys. Each fine-tuned checkpoint is a whole model's state dict (timm
``model.state_dict()``, ``.safetensors``/``.pth``/``.bin`` or a HF-style directory); its classifier keys
(``head_prefix``, default ``head.``: ``head.weight`` [C, D], ``head.bias`` [C]) are split off before merging
and become the task's head (or come from a separate file in ``heads``). The pre-trained checkpoint's
classifier (e.g. an ImageNet head) is dropped. ``num_classes(task)`` is the head's row count.

Every key of the backbone must be in every checkpoint with the backbone's shape, and a checkpoint may hold
nothing else besides the classifier: a checkpoint of another architecture fails before any merging, naming
the file, the task and the keys at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from freemerge_pl.adapters.base import ModelAdapter, StateDict
from freemerge_pl.adapters.checks import linear_head_tensors
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import PickledObjectsError, load_state_dict, open_checkpoint

#: prefixes tried, in this order, when ``key_prefix`` is None (the best-matching one wins)
AUTO_PREFIXES = ("", "module.", "model.")


class TimmViTAdapter(ModelAdapter):
    """timm models: θ_pre and one fine-tuned θ_k (with its classifier) per task.

    Args:
        model_name: a timm architecture (``vit_base_patch32_224``, ``vit_tiny_patch16_224``, ...).
        pretrained: θ_pre file (its classifier, if any, is ignored).
        finetuned: task → θ_k file, in task order; each holds the task's classifier unless ``heads`` gives it.
        heads: task → a file with the classifier (``weight`` [C, D] and optional ``bias`` [C], with or without
            ``head_prefix``); overrides the one inside ``finetuned``.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``depth``, ``global_pool``, ...).
        head_prefix: the classifier's key prefix in the checkpoints (timm ViTs: ``head.``).
        key_prefix: a prefix stripped from every checkpoint key (None: the best of ``''``, ``module.``,
            ``model.``).

    Nothing is read in ``__init__``; ``prepare`` checks that every file exists.
    """

    exclude_keys: tuple[str, ...] = ()  # the classifier is split off before merging (see the module docstring)
    input_kind = "image"

    def __init__(
        self,
        model_name: str,
        pretrained: str,
        finetuned: dict[str, str],
        heads: dict[str, str] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        head_prefix: str = "head.",
        key_prefix: str | None = None,
    ) -> None:
        import timm

        if not finetuned:
            raise ConfigError("TimmViTAdapter needs at least one fine-tuned checkpoint (finetuned: {task: path})")
        heads = {str(k): str(v) for k, v in (heads or {}).items()}
        stray = [t for t in heads if t not in finetuned]
        if stray:
            raise ConfigError(f"TimmViTAdapter: heads names task(s) {stray} without a finetuned checkpoint "
                              f"(tasks: {list(finetuned)})")
        if not timm.is_model(model_name):
            raise ConfigError(f"TimmViTAdapter: timm has no model named {model_name!r} (see timm.list_models())")
        if not head_prefix:
            raise ConfigError("TimmViTAdapter: head_prefix must not be empty (timm ViTs: 'head.')")
        self.model_name = model_name
        self.pretrained = str(pretrained)
        self.finetuned = {str(k): str(v) for k, v in finetuned.items()}
        self.heads = heads
        self.model_kwargs = dict(model_kwargs or {})
        self.head_prefix = head_prefix
        self.key_prefix = key_prefix
        self._spec: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._num_features: int | None = None
        self._head_sd: dict[str, StateDict] = {}

    # ------------------------------------------------------------------ modules
    def build_backbone(self) -> nn.Module:
        """The timm model without classifier (``num_classes=0``): images → pooled features ``[B, D]``."""
        import timm

        try:
            return timm.create_model(self.model_name, pretrained=False, **{**self.model_kwargs, "num_classes": 0})
        except TypeError as err:
            raise ConfigError(f"TimmViTAdapter: timm.create_model({self.model_name!r}) rejects model_kwargs "
                              f"{self.model_kwargs}: {err}") from None

    def _build_spec(self) -> None:
        with torch.device("meta"):
            model = self.build_backbone()
        self._spec = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        self._num_features = int(model.num_features)

    @property
    def backbone_spec(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Key → (shape, dtype) of the backbone's state dict (built once on the meta device: no memory)."""
        if self._spec is None:
            self._build_spec()
        return self._spec

    @property
    def num_features(self) -> int:
        if self._num_features is None:
            self._build_spec()
        return self._num_features

    # ------------------------------------------------------------------ files
    @property
    def task_names(self) -> list[str]:
        return list(self.finetuned)

    def checkpoint_paths(self) -> list[str]:
        return [self.pretrained, *self.finetuned.values(), *(self.heads[t] for t in self.task_names
                                                              if t in self.heads)]

    def prepare(self) -> None:
        """Check that every checkpoint and head file exists (one error listing all missing ones)."""
        missing = [p for p in self.checkpoint_paths() if not Path(p).exists()]
        if missing:
            raise FreeMergeError(f"TimmViTAdapter: {len(missing)} file(s) do not exist: {missing}")

    def _task_path(self, task: str) -> str:
        if task not in self.finetuned:
            raise ConfigError(f"task {task!r} is not configured; accepted: {self.task_names}")
        return self.finetuned[task]

    @staticmethod
    def _read(path: str, role: str) -> StateDict:
        if not Path(path).exists():
            raise FreeMergeError(f"{role} checkpoint {path} does not exist")
        try:
            return load_state_dict(path)
        except PickledObjectsError as err:
            raise FreeMergeError(f"{role} checkpoint {path}: {err}") from None

    def _prefix(self, sd) -> str:
        """``key_prefix``, or the one of AUTO_PREFIXES under which most backbone keys are in ``sd`` (a mapping)."""
        if self.key_prefix is not None:
            return self.key_prefix
        spec = self.backbone_spec
        counts = [(sum(p + k in sd for k in spec), -i, p) for i, p in enumerate(AUTO_PREFIXES)]
        return max(counts)[2]

    def _split(self, path: str, role: str) -> tuple[StateDict, StateDict]:
        """(backbone state dict, classifier state dict without prefix) of a checkpoint, every key checked."""
        sd = self._read(path, role)
        prefix = self._prefix(sd)
        spec = self.backbone_spec
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        head = {k[len(self.head_prefix):]: v for k, v in stripped.items() if k.startswith(self.head_prefix)}
        missing = [k for k in spec if k not in stripped]
        extra = [k for k in stripped if k not in spec and not k.startswith(self.head_prefix)]
        if missing or extra:
            raise CheckpointMismatchError(
                f"{role} checkpoint {path} does not fit timm {self.model_name} {self.model_kwargs}: "
                f"{len(missing)} missing key(s) {missing[:8]}, {len(extra)} unexpected key(s) {extra[:8]} "
                f"(key prefix {prefix!r}; check model_name/model_kwargs/key_prefix)")
        backbone = {}
        for key, (shape, _) in spec.items():
            t = stripped[key]
            if t.shape != shape:
                raise CheckpointMismatchError(f"{role} checkpoint {path}: key {prefix + key!r} has shape "
                                              f"{tuple(t.shape)}, timm {self.model_name} expects {tuple(shape)}")
            backbone[key] = t
        return backbone, head

    def _read_head(self, path: str, role: str) -> StateDict:
        """Only the classifier tensors of a checkpoint (read lazily: the rest of the file is not loaded)."""
        if not Path(path).exists():
            raise FreeMergeError(f"{role} checkpoint {path} does not exist")
        try:
            with open_checkpoint(path) as source:
                keys = source.keys()
                prefix = self._prefix(dict.fromkeys(keys))
                start = prefix + self.head_prefix
                return {k[len(start):]: source.get(k) for k in keys if k.startswith(start)}
        except PickledObjectsError as err:
            raise FreeMergeError(f"{role} checkpoint {path}: {err}") from None

    def pretrained_state_dict(self) -> StateDict:
        return self._split(self.pretrained, "pre-trained")[0]

    def finetuned_state_dict(self, task: str) -> StateDict:
        backbone, head = self._split(self._task_path(task), f"fine-tuned ({task})")
        if task not in self.heads:
            self._head_sd[task] = self._checked_head(head, self._task_path(task), task)
        return backbone

    # ------------------------------------------------------------------ heads
    def _checked_head(self, sd: StateDict, path: str, task: str) -> StateDict:
        sd = {k.removeprefix(self.head_prefix): v for k, v in sd.items()}
        return linear_head_tensors(sd, self.num_features, f"head ({task}): {path} ({self.head_prefix}weight, "
                                   f"{self.head_prefix}bias)",
                                   f"the features of timm {self.model_name}")

    def head_state_dict(self, task: str) -> StateDict:
        """The task's classifier ``{weight [C, D], bias [C]}``: from ``heads[task]`` or the fine-tuned file."""
        if task not in self._head_sd:
            path = self._task_path(task)
            if task in self.heads:
                path = self.heads[task]
                sd = self._read(path, f"head ({task})")
                if any(k.startswith(self.head_prefix) for k in sd):
                    sd = {k[len(self.head_prefix):]: v for k, v in sd.items() if k.startswith(self.head_prefix)}
            else:
                sd = self._read_head(path, f"fine-tuned ({task})")
            self._head_sd[task] = self._checked_head(sd, path, task)
        return self._head_sd[task]

    def build_head(self, task: str) -> nn.Linear:
        sd = self.head_state_dict(task)
        c, d = sd["weight"].shape
        head = nn.Linear(d, c)
        head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return head

    def num_classes(self, task: str) -> int:
        return int(self.head_state_dict(task)["weight"].shape[0])

    def __repr__(self) -> str:
        return f"TimmViTAdapter(model_name={self.model_name!r}, pretrained={self.pretrained!r}, tasks={self.task_names})"


__all__ = ["AUTO_PREFIXES", "TimmViTAdapter"]
