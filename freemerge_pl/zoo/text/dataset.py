"""``TextZooTaskDataset``: one split of one text zoo task (built from YAML by the data module).

It is ``freemerge_pl.data.text.TextTask`` over the zoo's ``data/<task>/<split>.jsonl`` with the zoo's own
tokenizer (``pretrained/``), after the zoo is built or found current and the split's file is checked against
the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from torch import Tensor
from torch.utils.data import Dataset

from freemerge_pl.data.text import TextTask
from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.text.build import (
    SPLITS,
    ensure_text_zoo,
    resolve_text_zoo_root,
    task_entry,
    verify_text_zoo,
)


class TextZooTaskDataset(Dataset):
    """``(packed tokens [F, max_length], label)`` of one text zoo task and split.

    ``split``: ``train``, ``router`` (a small held-out split, never fine-tuned on, for the router) or ``test``.
    ``max_length``: tokens per item (default: the zoo recipe's, what fine-tuning truncated to). ``texts``, ``labels`` and
    ``class_names`` expose the split. The zoo is built (``ensure_text_zoo``) on first access if it is missing
    or out of date.
    """

    #: splits no fine-tuned model trained on: the configs' training data is the router split, so tune-val (a
    #: share of it) is held-out data too (``MultiTaskDataModule.tune_val_sources``)
    held_out_splits: ClassVar[tuple[str, ...]] = ("router",)

    def __init__(self, task: str, split: Literal["train", "router", "test"] = "train", root: str | None = None,
                 size: str = "default", seed: int = 0, max_length: int | None = None) -> None:
        if split not in SPLITS:
            raise ConfigError(f"TextZooTaskDataset: split={split!r}; accepted: {list(SPLITS)}")
        self.task, self.split, self.root, self.size, self.seed = task, split, root, size, seed
        self.max_length = max_length
        self._text: TextTask | None = None
        self._class_names: list[str] = []

    @property
    def zoo_root(self) -> Path:
        return resolve_text_zoo_root(self.root, self.size, self.seed)

    def _load(self) -> TextTask:
        if self._text is None:
            root = ensure_text_zoo(self.root, self.size, self.seed)
            rel = f"data/{self.task}/{self.split}.jsonl"
            manifest = verify_text_zoo(root, names=[])
            entry = task_entry(manifest, self.task, root)
            verify_text_zoo(root, names=[rel])  # again when the file changed since ensure_text_zoo
            self._class_names = list(entry["class_names"])
            self._text = TextTask(str(root / rel), tokenizer=str(root / "pretrained"), text_columns=["text"],
                                  label_column="label", format="jsonl",
                                  max_length=self.max_length or int(manifest["recipe"]["data"]["max_length"]),
                                  num_classes=int(entry["num_classes"]))
        return self._text

    @property
    def texts(self) -> list[str]:
        return [t[0] for t in self._load().texts]

    @property
    def labels(self) -> list[int]:
        return list(self._load().labels)

    @property
    def num_classes(self) -> int:
        return self._load().num_classes

    @property
    def class_names(self) -> list[str]:
        self._load()
        return list(self._class_names)

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self._load()[index]

    def __repr__(self) -> str:
        return (f"TextZooTaskDataset(task={self.task!r}, split={self.split!r}, size={self.size!r}, "
                f"seed={self.seed})")


__all__ = ["TextZooTaskDataset"]
