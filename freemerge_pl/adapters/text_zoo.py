"""Adapter for the text zoo (``freemerge_pl.zoo.text``): ``HFSequenceClassificationAdapter`` on the zoo's cache.

The zoo stores θ_pre as a ``BertModel`` directory and each θ_k as a ``BertForSequenceClassification``
directory, so the generic Hugging Face adapter reads them as they are: the encoder and its pooler are merged,
each task keeps its ``classifier``. This class only locates the zoo (building it on first use), restricts and
orders its tasks, and checks every file against the zoo's manifest before it is read.
"""

from __future__ import annotations

from pathlib import Path

from freemerge_pl.adapters.base import StateDict
from freemerge_pl.adapters.hf_text import HFSequenceClassificationAdapter, SequenceClassificationHead
from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.text.build import ensure_text_zoo, resolve_text_zoo_root, task_entry, verify_text_zoo
from freemerge_pl.zoo.text.recipe import text_zoo_task_names


class TextZooAdapter(HFSequenceClassificationAdapter):
    """The text zoo's pre-trained encoder and fine-tuned classifiers (``ensure_text_zoo`` builds them once).

    ``root``: the zoo directory (default ``$FREEMERGE_TEXT_ZOO_ROOT/<size>-seed<seed>`` or the user cache);
    ``tasks``: a subset of the zoo's tasks in the order wanted (default all, in the zoo's order).
    """

    def __init__(self, root: str | None = None, size: str = "default", seed: int = 0,
                 tasks: list[str] | None = None) -> None:
        known = text_zoo_task_names(size)
        tasks = list(tasks) if tasks is not None else known
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"TextZooAdapter: task(s) {unknown} are not in the text zoo; accepted: {known}")
        self.root, self.size, self.seed = root, size, seed
        self.zoo_root = resolve_text_zoo_root(root, size, seed)
        super().__init__(pretrained=str(self.zoo_root / "pretrained"), tasks=tasks,
                         checkpoint_root=str(self.zoo_root / "finetuned"))
        self._manifest: dict | None = None

    def _ensure(self) -> dict:
        if self._manifest is None:
            ensure_text_zoo(self.root, self.size, self.seed)
            self._manifest = verify_text_zoo(self.zoo_root, names=[])
        return self._manifest

    def prepare(self) -> None:
        """Build the zoo if it is missing or out of date (rank 0), then the generic adapter's checks."""
        self._ensure()
        super().prepare()

    def task_config(self, task: str) -> dict:
        self._ensure()
        return super().task_config(task)

    @property
    def manifest(self) -> dict:
        return self._ensure()

    def _verified(self, *directories: str) -> None:
        """Check every manifest file under ``directories`` (relative to the zoo) before it is read."""
        files = [f for f in self.manifest["files"] if any(f.startswith(d + "/") for d in directories)]
        verify_text_zoo(self.zoo_root, names=files)

    def pretrained_state_dict(self) -> StateDict:
        self._verified("pretrained")
        return super().pretrained_state_dict()

    def finetuned_state_dict(self, task: str) -> StateDict:
        self._verified(f"finetuned/{task}")
        return super().finetuned_state_dict(task)

    def build_head(self, task: str) -> SequenceClassificationHead:
        self._verified(f"finetuned/{task}")
        return super().build_head(task)

    def class_names(self, task: str) -> list[str]:
        return list(task_entry(self.manifest, task, self.zoo_root)["class_names"])

    def individual_accuracy(self, task: str) -> float:
        """The fine-tuned model's test accuracy recorded at build time (a fraction)."""
        return float(task_entry(self.manifest, task, self.zoo_root)["individual_test_acc"])

    def __repr__(self) -> str:
        return f"TextZooAdapter(root={str(Path(self.zoo_root))!r}, size={self.size!r}, seed={self.seed})"


__all__ = ["TextZooAdapter"]
