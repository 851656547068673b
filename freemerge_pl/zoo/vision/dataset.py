"""``ZooTaskDataset``: one split of one zoo task as a torch Dataset (built from YAML by the data module)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from torch.utils.data import Dataset

from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.cache import task_entry
from freemerge_pl.zoo.vision.build import (
    ensure_zoo,
    load_task_data,
    normalize_images,
    read_manifest,
    resolve_zoo_root,
)
from freemerge_pl.zoo.vision.generators import SPLITS

#: the splits of a zoo task: the generated ones plus ``val``, held out of the training images before fine-tuning
ZOO_SPLITS = (*SPLITS, "val")


class ZooTaskDataset(Dataset):
    """``(image float32 [3,32,32] normalised with CLIP's mean/std, label int)`` of one zoo task and split.

    ``split`` is ``train``, ``val`` (held out before fine-tuning: tune-val), ``router`` (a small held-out set
    for router training) or ``test``. The zoo is
    built (``ensure_zoo``) on first access if it is missing or out of date, and its files are checked against
    the manifest (a damaged file raises an error naming it). ``images`` (uint8) and ``labels`` expose the
    whole split as tensors.
    """

    #: the split ``MultiTaskDataModule`` uses as tune-val (data no fine-tuned model trained on)
    validation_args: ClassVar[dict[str, Any]] = {"split": "val"}
    #: splits no fine-tuned model trained on (``MultiTaskDataModule`` does not warn when one is the training data)
    held_out_splits: ClassVar[tuple[str, ...]] = ("val", "router")

    def __init__(self, root: str | None = None, task: str | None = None, split: str = "train",
                 size: str = "default", seed: int = 0):
        if split not in ZOO_SPLITS:
            raise ConfigError(f"ZooTaskDataset: split={split!r}; accepted: {list(ZOO_SPLITS)}")
        self.root = root
        self.task = task
        self.split = split
        self.size = size
        self.seed = seed
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._num_classes: int | None = None
        self._class_names: list[str] | None = None

    def _load(self) -> None:
        if self._images is not None:
            return
        root = ensure_zoo(self.root, self.size, self.seed)
        entry = task_entry(read_manifest(root), self.task, root)
        data = load_task_data(root, self.task)
        self._images = data[f"{self.split}_x"]
        self._labels = data[f"{self.split}_y"]
        self._num_classes = int(entry["num_classes"])
        self._class_names = list(entry["class_names"])

    @property
    def zoo_root(self):
        return resolve_zoo_root(self.root, self.size, self.seed)

    @property
    def images(self) -> Tensor:
        self._load()
        return self._images

    @property
    def labels(self) -> Tensor:
        self._load()
        return self._labels

    @property
    def num_classes(self) -> int:
        self._load()
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        self._load()
        return self._class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        self._load()
        return normalize_images(self._images[index]), int(self._labels[index])

    def __repr__(self) -> str:
        return f"ZooTaskDataset(task={self.task!r}, split={self.split!r}, size={self.size!r}, seed={self.seed})"


__all__ = ["ZooTaskDataset"]
