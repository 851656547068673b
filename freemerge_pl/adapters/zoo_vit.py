"""Adapter for the offline zoo (``freemerge_pl.zoo.vision``): open_clip ViT backbones, one linear head per task.

The zoo stores θ_pre and each θ_k as safetensors with the keys of open_clip's ``VisionTransformer``
(the same code path the real open_clip adapters load), and each task's head as a separate file, so no
key of the backbone is task-specific (``exclude_keys = ()``).
"""

from __future__ import annotations

from pathlib import Path

from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from freemerge_pl.adapters.base import ModelAdapter, OpenCLIPViTSplit, StateDict, vit_prefix_features
from freemerge_pl.errors import FreeMergeError
from freemerge_pl.io import load_state_dict
from freemerge_pl.zoo.cache import task_entry
from freemerge_pl.zoo.vision.build import (
    build_vit,
    ensure_zoo,
    read_manifest,
    rebuild_hint,
    resolve_zoo_root,
    verify_zoo,
)


class ZooViTAdapter(OpenCLIPViTSplit, ModelAdapter):
    """The zoo's pre-trained and fine-tuned ViTs (built on first use by ``prepare`` / ``ensure_zoo``).

    Every file is checked against the zoo's manifest before it is read (``verify_zoo``: a damaged file raises
    an error naming it and the rebuild command).

    ``tasks`` selects and orders a subset of the zoo's tasks (default: all, in the zoo's order).
    """

    exclude_keys: tuple[str, ...] = ()
    input_kind = "image"

    def __init__(self, root: str | None = None, size: str = "default", seed: int = 0,
                 tasks: list[str] | None = None):
        self.root = root
        self.size = size
        self.seed = seed
        self.tasks = list(tasks) if tasks is not None else None
        self._zoo: Path | None = None
        self._manifest: dict | None = None

    # -- locating the zoo
    def prepare(self) -> None:
        """Build the zoo if it is missing or of another recipe (rank 0)."""
        self._zoo = ensure_zoo(self.root, self.size, self.seed)
        self._manifest = None

    @property
    def zoo_root(self) -> Path:
        if self._zoo is None:
            self.prepare()
        return self._zoo

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = read_manifest(self.zoo_root)
        return self._manifest

    def _task_entry(self, task: str) -> dict:
        return task_entry(self.manifest, task, self.zoo_root)

    @property
    def task_names(self) -> list[str]:
        names = [t["name"] for t in self.manifest["tasks"]]
        if self.tasks is None:
            return names
        for t in self.tasks:
            self._task_entry(t)
        return list(self.tasks)

    # -- checkpoints
    def _load(self, rel: str) -> StateDict:
        path = self.zoo_root / rel
        if not path.is_file():
            raise FreeMergeError(f"zoo checkpoint {path} does not exist; {rebuild_hint(self.zoo_root, self.manifest)}")
        verify_zoo(self.zoo_root, names=[rel])
        return load_state_dict(path)

    def pretrained_state_dict(self) -> StateDict:
        return self._load("pretrained/model.safetensors")

    def finetuned_state_dict(self, task: str) -> StateDict:
        self._task_entry(task)
        return self._load(f"finetuned/{task}/model.safetensors")

    def head_state_dict(self, task: str) -> StateDict:
        self._task_entry(task)
        return self._load(f"finetuned/{task}/head.safetensors")

    # -- modules
    def build_backbone(self) -> VisionTransformer:
        """open_clip ``VisionTransformer`` of the zoo's config (randomly initialised; load a state dict)."""
        return build_vit(self.manifest["backbone"]["config"])

    def build_head(self, task: str) -> nn.Linear:
        sd = self.head_state_dict(task)
        c, d = sd["weight"].shape
        if c != self.num_classes(task):
            raise FreeMergeError(f"{self.zoo_root}/finetuned/{task}/head.safetensors: weight shape "
                                 f"{tuple(sd['weight'].shape)} does not match num_classes={self.num_classes(task)}")
        head = nn.Linear(d, c)
        head.load_state_dict(sd, strict=True)
        return head

    def num_classes(self, task: str) -> int:
        return int(self._task_entry(task)["num_classes"])

    def class_names(self, task: str) -> list[str]:
        return list(self._task_entry(task)["class_names"])

    def individual_accuracy(self, task: str) -> float:
        """The fine-tuned model's test accuracy recorded in the manifest (a fraction)."""
        return float(self._task_entry(task)["individual_test_acc"])

    def checkpoint_paths(self) -> list[str]:
        files = ["pretrained/model.safetensors"]
        for t in self.task_names:
            files += [f"finetuned/{t}/model.safetensors", f"finetuned/{t}/head.safetensors"]
        return [str(self.zoo_root / f) for f in files]

    def __repr__(self) -> str:
        where = self.root or resolve_zoo_root(None, self.size, self.seed)
        return f"ZooViTAdapter(root={str(where)!r}, size={self.size!r}, seed={self.seed})"


def vit_early_features(backbone: VisionTransformer, x: Tensor, num_blocks: int = 2) -> Tensor:
    """Class-token features ``[B, width]`` after the first ``num_blocks`` residual blocks of an open_clip
    ``VisionTransformer`` (the prefix of its own forward pass; a cheap router feature source)."""
    return vit_prefix_features(backbone, x, num_blocks)


__all__ = ["ZooViTAdapter", "vit_early_features"]
