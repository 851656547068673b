"""MultiTaskDataModule: per-task datasets from YAML, a seeded router split, exact distributed evaluation."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from freemerge_pl.errors import ConfigError
from freemerge_pl.lightning.metrics import make_metric
from freemerge_pl.settings import Range, check_value


@dataclass
class TaskConfig:
    """One task: a dataset class path with shared ``dataset_args`` plus per-split args, and its metrics.

    ``metrics`` names torchmetrics entries (see ``freemerge_pl.lightning.metrics``); ``num_classes`` defaults to the
    dataset's ``num_classes`` attribute when it has one. ``val_args``: the args of the task's own validation
    split (data no fine-tuned model trained on), used as tune-val; None → the dataset class's
    ``validation_args`` when it declares one (``ZooTaskDataset``: ``{"split": "val"}``), else tune-val falls
    back to a share of the router split (with a warning: that is training data of the fine-tuned models, unless
    the dataset class lists the training split in ``held_out_splits``).

    Args:
        name: the task's name (in metrics and results).
        dataset: the dataset class, as an import path (e.g. ``freemerge_pl.zoo.vision.ZooTaskDataset``).
        dataset_args: keyword arguments of the dataset class, shared by every split.
        train_args: the training split's own arguments (the router split is drawn from it).
        test_args: the test split's own arguments.
        val_args: the task's own validation split's arguments (tune-val); None: see above.
        metrics: torchmetrics entries to compute (``freemerge_pl.lightning.metrics``).
        num_classes: the number of classes (default: the dataset's ``num_classes``).
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


def check_data(datamodule, adapter) -> dict[str, list[str]]:
    """``datamodule`` against the model ``adapter``: the same tasks in the same order, and each task's dataset
    as many classes as its head (ConfigError otherwise); returns each task's metric names."""
    names = list(adapter.task_names)
    data_names = list(getattr(datamodule, "task_names", names))
    if names != data_names:
        raise ConfigError(f"the model adapter has {len(names)} task(s) {names} but the data module has "
                          f"{len(data_names)} {data_names}; they must match in number and order")
    for task in names:
        expected = datamodule.num_classes(task) if hasattr(datamodule, "num_classes") else None
        have = adapter.num_classes(task)
        if expected is not None and expected != have:
            raise ConfigError(f"task {task!r}: the head has {have} classes but the dataset has {expected}")
    return {cfg.name: list(cfg.metrics) for cfg in getattr(datamodule, "tasks", [])}


class MultiTaskDataModule(LightningDataModule):
    """Train loader: the router split of every task, mixed, with task ids. Test: one loader per task.

    The router split is ⌈router_fraction·n⌉ seeded training indices per task. ``tune_fraction`` > 0, or a
    ``val_args`` on every task, turns on tune-val (``val_dataloader``, for ``tune``/``validate``;
    ``tune_val_enabled``): a task's own validation split where it has one
    (``TaskConfig.val_args`` or the dataset class's ``validation_args``; the router split is then not
    reduced), else a seeded ``tune_fraction`` share of its router split, held out (the router trains on the
    rest), with a warning: the fine-tuned models trained on it, so scores there favour memorised data.
    ``tune_val_sources`` says which kind each task uses.

    Args:
        tasks: the tasks, one entry per fine-tuned model, in the adapter's task order (``TaskConfig``).
        router_fraction: the share of each task's training split that trains the router (0, 1].
        min_router_samples: the least router samples per task, whatever the fraction.
        batch_size: samples per batch, for the router's training and for scoring.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: seeds the choice of the router (and tune-val) samples.
        tune_fraction: > 0 turns on tune-val (for ``tune``/``validate``; not needed when every task has
            ``val_args``); the held-out share of the router split for tasks without a validation split, [0, 1).
    """

    def __init__(
        self,
        tasks: list[TaskConfig],
        router_fraction: Annotated[float, Range(0, 1, low_open=True)] = 0.01,
        min_router_samples: Annotated[int, Range(1, integer=True)] = 16,
        batch_size: Annotated[int, Range(1, integer=True)] = 128,
        num_workers: Annotated[int, Range(0, integer=True)] = 0,
        seed: int = 0,
        tune_fraction: Annotated[float, Range(0, 1, high_open=True)] = 0.0,
    ) -> None:
        super().__init__()
        # Every setting is checked here, at construction: before any data set is built or read.
        if not tasks:
            raise ConfigError("data.tasks: MultiTaskDataModule needs at least one task")
        hints = typing.get_type_hints(MultiTaskDataModule.__init__, include_extras=True)
        for name, value in (("router_fraction", router_fraction), ("min_router_samples", min_router_samples),
                            ("batch_size", batch_size), ("num_workers", num_workers), ("seed", seed),
                            ("tune_fraction", tune_fraction)):
            check_value(f"data.{name}", value, hints[name])
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
    def tune_val_enabled(self) -> bool:
        """Whether there is tune-val (for ``tune``/``validate``): ``tune_fraction`` > 0, or every task names its
        own validation split (``val_args``), which is tune-val enough."""
        return self.tune_fraction > 0 or all(t.val_args is not None for t in self.tasks)

    @property
    def tune_val_sources(self) -> dict[str, str]:
        """Per task, where tune-val comes from: ``validation split`` (data no fine-tuned model trained on),
        ``held-out router split`` (a share of a router split the dataset class declares was never fine-tuned on:
        its ``held_out_splits`` names the split of ``train_args``) or ``router split`` (a share of training data;
        the fallback). Empty without tune-val (``tune_val_enabled``)."""
        if not self.tune_val_enabled:
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
        """``task``'s tune-val (``tune_val_enabled``) for choosing hyperparameters: its validation split, else
        the held-out part of its router split (``tune_val_sources``)."""
        self.setup()
        i = self.task_names.index(task)
        if task in self._val:
            return TaskIdDataset(self._val[task], i)
        return TaskIdDataset(Subset(self._train[task], self.tune_indices[task]), i)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over the tune-val split (never the test split); empty without tune-val."""
        if not self.tune_val_enabled:
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

    def predict_dataloader(self) -> list[DataLoader]:
        """``predict`` routes every task's test split (one loader per task, as ``test``)."""
        return self.test_dataloader()
