"""The model-adapter interface: how a family of checkpoints is read and turned into modules.

An adapter knows where θ_pre and θ_1..θ_K live, which keys are task-specific (never merged), how to
build the backbone module that a merged state dict loads into, and each task's classification head.
Real-checkpoint adapters (open_clip/task_vectors, HF CLIP, timm, HF text, PEFT) implement the same
interface; the merge maths only ever sees state dicts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from freemerge_pl.errors import ConfigError

StateDict = dict[str, Tensor]
InputKind = Literal["image", "tokens", "other"]


def _plain(value: Any) -> Any:
    """``value`` as JSON data (paths as strings, tuples as lists); TypeError for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is no plain value")


class ModelAdapter:
    """Base class. Subclasses take plain typed constructor arguments (built from YAML).

    Every subclass's ``__init__`` records the arguments it was called with (``init_args``), so an export can
    name the adapter it was built with and ``load_merged(dir)`` rebuild it (``adapter_record``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or hasattr(init, "_records_init_args"):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:  # the outermost ``__init__`` (a subclass's) records
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                params = list(signature.parameters.values())[1:]
                recorded: dict[str, Any] = {}
                for param in params:
                    value = bound.arguments.get(param.name)
                    if param.kind is param.VAR_KEYWORD:
                        recorded.update(value or {})
                    elif param.kind is not param.VAR_POSITIONAL:
                        recorded[param.name] = value
                    elif value:
                        recorded = None  # positional varargs have no name to record
                        break
                self.__dict__["_init_args"] = recorded
            init(self, *args, **kw)

        recording_init._records_init_args = True
        cls.__init__ = recording_init

    def init_args(self) -> dict[str, Any] | None:
        """The arguments this adapter was built with, as JSON data (None when they are no plain values, or the
        adapter's class defines no ``__init__``: then an export cannot name it)."""
        recorded = self.__dict__.get("_init_args", {} if type(self).__init__ is object.__init__ else None)
        try:
            return None if recorded is None else _plain(recorded)
        except TypeError:
            return None

    def adapter_record(self) -> dict[str, Any] | None:
        """``{"class_path": "module.Class", "init_args": {...}}`` (an export's ``module.adapter``), None when the
        adapter cannot be rebuilt from it (a class defined in a function, arguments that are no plain values)."""
        cls, init_args = type(self), self.init_args()
        if init_args is None or "<locals>" in cls.__qualname__:
            return None
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

    #: regexes of state-dict keys that are never merged (each task keeps its own)
    exclude_keys: tuple[str, ...] = ()
    #: what the backbone's inputs are: ``image`` (float ``[B, C, H, W]``), ``tokens`` (integer token ids) or
    #: ``other``; the router's ``feature_source: auto`` is chosen from it (``freemerge_pl.lightning.router``)
    input_kind: ClassVar[InputKind] = "other"

    def prepare(self) -> None:
        """Create or download-free-check anything on disk (called once, on rank 0, before setup)."""

    @property
    def task_names(self) -> list[str]:
        raise NotImplementedError

    def pretrained_state_dict(self) -> StateDict:
        """θ_pre of the backbone (keys as in ``build_backbone().state_dict()``)."""
        raise NotImplementedError

    def finetuned_state_dict(self, task: str) -> StateDict:
        """θ_k of the backbone for ``task`` (same keys as the pre-trained one)."""
        raise NotImplementedError

    def build_backbone(self) -> nn.Module:
        """An nn.Module mapping a batch of inputs to features ``[B, D]`` (weights are loaded afterwards)."""
        raise NotImplementedError

    def build_head(self, task: str) -> nn.Module:
        """The task's classification head ``[B, D] → [B, C]`` with its fine-tuned weights loaded."""
        raise NotImplementedError

    def num_classes(self, task: str) -> int:
        raise NotImplementedError

    def checkpoint_paths(self) -> list[str]:
        """Files read (recorded with their sha256 in merge sidecars)."""
        return []

    def prefix_features(self, backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
        """Optional: features ``[B, D]`` of ``x`` after the first ``n_blocks`` blocks of ``backbone`` (a
        module from ``build_backbone``), for the router's ``backbone_prefix`` / ``pretrained_backbone``
        feature sources. ``n_blocks`` beyond the backbone's depth raises a ConfigError naming both."""
        raise ConfigError(f"{type(self).__name__} cannot run a prefix of its backbone (no prefix_features): "
                          "use model.router.feature_source 'backbone', or 'pretrained_backbone' with split_block 0")

    def pooled_features(self, backbone: nn.Module, x: Tensor) -> Tensor:
        """The router's ``pretrained`` features ``[B, D]`` of ``x`` through ``backbone`` (θ_pre, from
        ``build_backbone``): by default the backbone's own output; token adapters pool every (unmasked) token."""
        return backbone(x)

    def backbone_depth(self, backbone: nn.Module) -> int | None:
        """Optional: how many blocks ``prefix_features`` can run on ``backbone`` (None: unknown)."""
        return None

    def prefix_states(self, backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
        """Optional (the router's ``shared_prefix``): the backbone's hidden states ``[B, ...]`` after its first
        ``n_blocks`` blocks, batch first; ``prefix_features`` pools them."""
        raise ConfigError(f"{type(self).__name__} cannot split its backbone into a prefix and the rest (no "
                          "prefix_states / suffix): set model.router.shared_prefix false")

    def suffix(self, backbone: nn.Module, n_blocks: int):
        """Optional (the router's ``shared_prefix``): a context manager within which ``backbone(states)`` runs
        only the blocks after the first ``n_blocks`` (and the pooling/projection) on ``prefix_states``."""
        raise ConfigError(f"{type(self).__name__} cannot split its backbone into a prefix and the rest (no "
                          "prefix_states / suffix): set model.router.shared_prefix false")


def implements(adapter: ModelAdapter, name: str) -> bool:
    """Whether ``adapter`` implements the base class's optional method ``name`` (e.g. ``prefix_states``)."""
    method = getattr(type(adapter), name, None)
    return method is not None and method is not getattr(ModelAdapter, name)


def has_prefix_features(adapter: ModelAdapter) -> bool:
    """Whether ``adapter`` implements ``prefix_features`` (the router's backbone-prefix feature sources)."""
    return implements(adapter, "prefix_features")


def open_clip_vit_prefix_features(adapter: ModelAdapter, backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
    """``prefix_features`` of an open_clip ``VisionTransformer`` (the zoo's and the open_clip adapters'):
    assign it as ``prefix_features = open_clip_vit_prefix_features`` in an adapter whose backbone is one."""
    return vit_prefix_features(backbone, x, n_blocks)


def open_clip_vit_pooled_features(adapter: ModelAdapter, backbone: nn.Module, x: Tensor) -> Tensor:
    """``pooled_features`` of an open_clip ``VisionTransformer`` (the router's ``pretrained`` source): its class
    token and the mean of its patch tokens after the last block, concatenated ``[B, 2·width]`` (measured above
    the class token alone and the projected output in ``benchmarks/router_compare.py``)."""
    states = vit_prefix_states(backbone, x, len(_vit_blocks(backbone, 0)[1]))
    return torch.cat([states[:, 0], states[:, 1:].mean(1)], -1)


def vit_depth(adapter: ModelAdapter, backbone: nn.Module) -> int | None:
    """``backbone_depth`` of an open_clip ``VisionTransformer``: its number of residual blocks."""
    blocks = getattr(getattr(backbone, "transformer", None), "resblocks", None)
    return None if blocks is None else len(blocks)


def open_clip_vit_prefix_states(adapter: ModelAdapter, backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
    """``prefix_states`` of an open_clip ``VisionTransformer`` (assign as ``prefix_states = ...``)."""
    return vit_prefix_states(backbone, x, n_blocks)


@contextmanager
def open_clip_vit_suffix(adapter: ModelAdapter, backbone: nn.Module, n_blocks: int) -> Iterator[None]:
    """``suffix`` of an open_clip ``VisionTransformer`` (assign as ``suffix = ...``): for the duration, its
    ``_embeds`` passes the given states through and its transformer runs only the blocks after ``n_blocks``
    (instance-level ``forward`` overrides; the module tree and its names are unchanged), so ``backbone(states)``
    runs the rest of its own forward (blocks, pooling, ``ln_post``, ``proj``) with every hook on those modules."""
    transformer, blocks = _vit_blocks(backbone, n_blocks)
    batch_first = getattr(transformer, "batch_first", True)

    def rest(x: Tensor, attn_mask: Tensor | None = None) -> Tensor:  # open_clip Transformer.forward, a suffix
        if not batch_first:
            x = x.transpose(0, 1).contiguous()
        for block in blocks[n_blocks:]:
            x = block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)

    transformer.forward = rest
    backbone._embeds = lambda states: states
    try:
        yield
    finally:
        transformer.__dict__.pop("forward", None)
        backbone.__dict__.pop("_embeds", None)


def _vit_blocks(backbone: nn.Module, n_blocks: int) -> tuple[nn.Module, nn.ModuleList]:
    """An open_clip ``VisionTransformer``'s transformer and residual blocks, ``n_blocks`` checked against them."""
    transformer = getattr(backbone, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not hasattr(backbone, "_embeds"):
        raise ConfigError(f"the backbone {type(backbone).__name__} is no open_clip VisionTransformer, so no "
                          "prefix of its blocks can be run; use model.router.feature_source 'backbone'")
    if not 0 <= n_blocks <= len(blocks):
        raise ConfigError(f"model.router.split_block={n_blocks} is beyond the backbone's depth: "
                          f"{type(backbone).__name__} has {len(blocks)} blocks (accepted: 1..{len(blocks)})")
    return transformer, blocks


def vit_prefix_states(backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
    """The token states ``[B, T, width]`` of an open_clip ``VisionTransformer`` after patch embedding and its
    first ``n_blocks`` residual blocks (the prefix of its own forward pass), batch first."""
    transformer, blocks = _vit_blocks(backbone, n_blocks)
    h = backbone._embeds(x)
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        h = h.transpose(0, 1)
    for block in blocks[:n_blocks]:
        h = block(h)
    if not batch_first:
        h = h.transpose(0, 1)
    return h


def vit_prefix_features(backbone: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
    """Class-token features ``[B, width]`` of an open_clip ``VisionTransformer`` after patch embedding and its
    first ``n_blocks`` residual blocks (the prefix of its own forward pass)."""
    return vit_prefix_states(backbone, x, n_blocks)[:, 0]


class OpenCLIPViTSplit:
    """Mixin for an adapter whose backbone is an open_clip ``VisionTransformer``: the router's prefix API
    (``prefix_features``, ``pooled_features``, ``prefix_states``, ``suffix``, ``backbone_depth``). List it before
    ``ModelAdapter``."""

    prefix_features = open_clip_vit_prefix_features
    pooled_features = open_clip_vit_pooled_features
    prefix_states = open_clip_vit_prefix_states
    suffix = open_clip_vit_suffix
    backbone_depth = vit_depth

