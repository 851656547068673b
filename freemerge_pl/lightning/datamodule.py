"""MultiTaskDataModule: per-task datasets from YAML, a seeded router split, exact distributed evaluation."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from freemerge_pl.errors import ConfigError
from freemerge_pl.lightning.metrics import make_metric


@dataclass
class TaskConfig:
    """One task: a dataset class path with shared ``dataset_args`` plus per-split args, and its metrics.

    ``metrics`` names torchmetrics entries (see ``freemerge_pl.lightning.metrics``); ``num_classes`` defaults to the
    dataset's ``num_classes`` attribute when it has one. ``val_args``: the args of the task's own validation
    split (data no fine-tuned model trained on), used as tune-val; None → the dataset class's
    ``validation_args`` when it declares one (``ZooTaskDataset``: ``{"split": "val"}``), else tune-val falls
    back to a share of the router split (with a warning: that is training data of the fine-tuned models, unless
    the dataset class lists the training split in ``held_out_splits``).
    """

    name: str
    dataset: str
    dataset_args: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=lambda: {"split": "train"})
    test_args: dict[str, Any] = field(default_factory=lambda: {"split": "test"})
    val_args: dict[str, Any] | None = None
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    num_classes: int | None = None


def import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import dataset class {path!r}: {err}") from err


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A finite real number inside the interval (a ConfigError naming the setting otherwise)."""
    lb, hb = "(" if low_open else "[", ")" if high_open else "]"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        raise ConfigError(f"{name}={value!r} is outside its accepted range {lb}{low}, {high}{hb}")


def check_task(task: TaskConfig | dict[str, Any], index: int) -> TaskConfig:
    """``data.tasks[index]`` as a TaskConfig, checked without building the data set: the class imports,
    the metrics are known, and the class takes ``dataset_args`` plus each split's args."""
    where = f"data.tasks[{index}]"
    if not isinstance(task, TaskConfig):
        if not isinstance(task, dict):
            raise ConfigError(f"{where}={task!r} must be a mapping with name, dataset, dataset_args, ...")
        accepted = [f.name for f in dataclasses.fields(TaskConfig)]
        unknown = sorted(set(task) - set(accepted))
        missing = [k for k in ("name", "dataset") if k not in task]
        if unknown or missing:
            raise ConfigError(f"{where}: unknown key(s) {unknown}, missing {missing}; accepted: {accepted}")
        task = TaskConfig(**task)
    where = f"{where} ({task.name!r})"
    if not task.metrics:
        raise ConfigError(f"{where}.metrics is empty; accepted: accuracy, f1, matthews, pearson, spearman")
    for metric in task.metrics:
        try:
            make_metric(metric, 2)
        except ConfigError as err:
            raise ConfigError(f"{where}.metrics: {err}") from err
    if task.num_classes is not None and task.num_classes < 1:
        raise ConfigError(f"{where}.num_classes={task.num_classes} must be ≥ 1")
    try:
        cls = import_class(task.dataset)
    except ConfigError as err:
        raise ConfigError(f"{where}.dataset: {err}") from err
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return task  # a class without an inspectable signature: its own errors will tell
    if task.val_args is not None and not isinstance(task.val_args, dict):
        raise ConfigError(f"{where}.val_args={task.val_args!r} must be a mapping (e.g. {{'split': 'val'}}) or null")
    val_args = validation_args(task)
    splits = [("train_args", task.train_args), ("test_args", task.test_args)]
    for split, args in splits + ([("val_args", val_args)] if val_args is not None else []):
        try:
            signature.bind(**{**task.dataset_args, **args})
        except TypeError as err:
            params = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            raise ConfigError(f"{where}: {task.dataset} does not accept dataset_args + {split} "
                              f"{sorted({**task.dataset_args, **args})}: {err}; accepted: {params}") from err
    return task


def validation_args(task: TaskConfig) -> dict[str, Any] | None:
    """The split args of ``task``'s own validation split: ``val_args``, else the dataset class's
    ``validation_args`` attribute (None: the task has no validation split)."""
    if task.val_args is not None:
        return dict(task.val_args)
    declared = getattr(import_class(task.dataset), "validation_args", None)
    return dict(declared) if declared is not None else None


class TaskIdDataset(Dataset):
    """Wraps a dataset so each item is ``(x, y, task_id)``."""

    def __init__(self, dataset: Dataset, task_id: int) -> None:
        self.dataset, self.task_id = dataset, task_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, self.task_id


def held_out_training(task: TaskConfig) -> bool:
    """Whether ``task``'s training data (its ``train_args`` split) is one its dataset class declares no
    fine-tuned model trained on (``held_out_splits``, e.g. the zoos' ``router`` split)."""
    split = task.train_args.get("split")
    return split is not None and split in getattr(import_class(task.dataset), "held_out_splits", ())


def router_split(n: int, fraction: float, seed: int, task_index: int, min_samples: int = 1) -> list[int]:
    """Seeded indices of the router split of a training set of size ``n`` (⌈fraction·n⌉, ≥ min_samples)."""
    k = min(n, max(min_samples, math.ceil(fraction * n)))
    g = torch.Generator().manual_seed(seed * 1000003 + task_index)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def split_off(indices: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (rest, held-out ⌈fraction·n⌉) with a seeded permutation; fraction 0 → no hold-out."""
    if fraction == 0 or not indices:
        return list(indices), []
    k = min(len(indices) - 1, max(1, math.ceil(fraction * len(indices))))
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(indices[j] for j in perm[:k])
    rest = sorted(indices[j] for j in perm[k:])
    return rest, held


class MultiTaskDataModule(LightningDataModule):
    """Train loader: the router split of every task, mixed, with task ids. Test: one loader per task.

    The router split is ⌈router_fraction·n⌉ seeded training indices per task. ``tune_fraction`` > 0 turns on
    tune-val (``val_dataloader``, for ``tune``/``validate``): a task's own validation split where it has one
    (``TaskConfig.val_args`` or the dataset class's ``validation_args``; the router split is then not
    reduced), else a seeded ``tune_fraction`` share of its router split, held out (the router trains on the
    rest), with a warning: the fine-tuned models trained on it, so scores there favour memorised data.
    ``tune_val_sources`` says which kind each task uses.
    """

    def __init__(
        self,
        tasks: list[TaskConfig],
        router_fraction: float = 0.01,
        min_router_samples: int = 16,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        tune_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        # Every setting is checked here, at construction: before any data set is built or read.
        if not tasks:
            raise ConfigError("data.tasks: MultiTaskDataModule needs at least one task")
        check_number("data.router_fraction", router_fraction, 0, 1, low_open=True)
        check_number("data.tune_fraction", tune_fraction, 0, 1, high_open=True)
        for name, value, low in (("min_router_samples", min_router_samples, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, None)):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ConfigError(f"data.{name}={value!r} must be a whole number"
                                  f"{f' ≥ {low}' if low is not None else ''}")
        self.tasks = [check_task(t, i) for i, t in enumerate(tasks)]
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"data.tasks: task name(s) {repeated} appear more than once; names must be unique")
        self.router_fraction = router_fraction
        self.min_router_samples = min_router_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tune_fraction = tune_fraction
        self.tune_indices: dict[str, list[int]] = {}
        self._val: dict[str, Dataset] = {}
        self._train: dict[str, Dataset] = {}
        self._test: dict[str, Dataset] = {}
        self.router_indices: dict[str, list[int]] = {}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def _make(self, task: TaskConfig, split_args: dict[str, Any]) -> Dataset:
        cls = import_class(task.dataset)
        return cls(**{**task.dataset_args, **split_args})

    def prepare_data(self) -> None:
        for task in self.tasks:
            prepare = getattr(import_class(task.dataset), "prepare", None)
            if callable(prepare):
                prepare(**task.dataset_args)

    @property
    def tune_val_sources(self) -> dict[str, str]:
        """Per task, where tune-val comes from: ``validation split`` (data no fine-tuned model trained on),
        ``held-out router split`` (a share of a router split the dataset class declares was never fine-tuned on:
        its ``held_out_splits`` names the split of ``train_args``) or ``router split`` (a share of training data;
        the fallback). Empty without ``tune_fraction``."""
        if self.tune_fraction == 0:
            return {}
        return {t.name: "validation split" if validation_args(t) is not None
                else "held-out router split" if held_out_training(t) else "router split" for t in self.tasks}

    def setup(self, stage: str | None = None) -> None:
        sources = self.tune_val_sources
        for i, task in enumerate(self.tasks):
            if task.name not in self._train:
                ds = self._make(task, task.train_args)
                self._train[task.name] = ds
                split = router_split(len(ds), self.router_fraction, self.seed, i, self.min_router_samples)
                if sources.get(task.name) == "validation split":
                    self._val[task.name] = self._make(task, validation_args(task))
                    self.router_indices[task.name] = split
                    self.tune_indices[task.name] = list(range(len(self._val[task.name])))
                else:
                    if sources.get(task.name) == "router split":
                        rank_zero_warn(f"data.tasks ({task.name!r}): no validation split (val_args, or the "
                                       f"dataset class's validation_args), so tune-val is a share of the router "
                                       f"split, which the fine-tuned models trained on: tune scores there "
                                       f"overrate settings that recall memorised data")
                    self.router_indices[task.name], self.tune_indices[task.name] = split_off(
                        split, self.tune_fraction, self.seed + 7919 * (i + 1))
            if task.name not in self._test:
                self._test[task.name] = self._make(task, task.test_args)

    def num_classes(self, task: str) -> int | None:
        cfg = self.tasks[self.task_names.index(task)]
        if cfg.num_classes is not None:
            return cfg.num_classes
        self.setup()
        return getattr(self._test[task], "num_classes", None)

    def tune_dataset(self, task: str) -> Dataset:
        """``task``'s tune-val (``tune_fraction`` > 0) for choosing hyperparameters: its validation split, else
        the held-out part of its router split (``tune_val_sources``)."""
        self.setup()
        i = self.task_names.index(task)
        if task in self._val:
            return TaskIdDataset(self._val[task], i)
        return TaskIdDataset(Subset(self._train[task], self.tune_indices[task]), i)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over the tune-val split (never the test split); empty without ``tune_fraction``."""
        if self.tune_fraction == 0:
            return []
        return [self._eval_loader(self.tune_dataset(t)) for t in self.task_names]

    def router_dataset(self) -> Dataset:
        self.setup()
        return ConcatDataset([
            TaskIdDataset(Subset(self._train[t.name], self.router_indices[t.name]), i)
            for i, t in enumerate(self.tasks)
        ])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.router_dataset(), batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=self.num_workers)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each sample once across ranks: no padding duplicates (Lightning keeps DistributedSamplers).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._eval_loader(TaskIdDataset(self._test[t.name], i)) for i, t in enumerate(self.tasks)]
