"""The model-adapter interface: how a family of checkpoints is read and turned into modules.

An adapter knows where θ_pre and θ_1..θ_K live, which keys are task-specific (never merged), how to
build the backbone module that a merged state dict loads into, and each task's classification head.
Real-checkpoint adapters (open_clip/task_vectors, HF CLIP, timm, HF text, PEFT) implement the same
interface; the merge maths only ever sees state dicts.
"""

from __future__ import annotations

from torch import Tensor, nn

StateDict = dict[str, Tensor]


class ModelAdapter:
    """Base class. Subclasses take plain typed constructor arguments (built from YAML)."""

    #: regexes of state-dict keys that are never merged (each task keeps its own)
    exclude_keys: tuple[str, ...] = ()

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
