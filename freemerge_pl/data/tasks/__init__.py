"""Class names and prompt templates of the standard CLIP image-classification tasks (package data).

One JSON file per task, ``<Name>.json``: ``name``, ``dataset`` (FusionBench's dataset name, the suffix of its
checkpoints ``tanganke/clip-vit-base-patch32_<dataset>``), ``aliases``, ``suite`` (8: the task-arithmetic
eight; 14 and 20: the TALL-mask extensions of Wang et al. 2024), ``num_classes``, ``classnames`` (in label
order: class i is label i of the dataset, as FusionBench's and task_vectors' datasets number them) and
``templates`` (prompts with the placeholder ``{c}`` for the class name).

The lists are the public CLIP zero-shot lists (OpenAI CLIP's notebooks, task_vectors' ``templates.py``) as
FusionBench ships them (``fusion_bench/tasks/clip_classification/*.py``, read at commit 54c9e8c; CIFAR-100
uses its ``fine_label`` names, EMNIST its ``emnist_letters`` list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from freemerge_pl.errors import ConfigError

#: the task suites in FusionBench's order (TA8, TALL14, TALL20)
SUITE_SIZES = (8, 14, 20)


@dataclass(frozen=True)
class TaskInfo:
    """One task's zero-shot metadata (see the module docstring for the fields)."""

    name: str
    dataset: str
    aliases: tuple[str, ...]
    suite: int
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template with ``{c}`` replaced by ``classname`` (plain replacement: no other brace is special)."""
        return [t.replace("{c}", classname) for t in self.templates]


def _parse(name: str, text: str) -> TaskInfo:
    raw = json.loads(text)
    info = TaskInfo(name=raw["name"], dataset=raw["dataset"], aliases=tuple(raw.get("aliases", ())),
                    suite=int(raw["suite"]), classnames=tuple(raw["classnames"]),
                    templates=tuple(raw["templates"]))
    if raw.get("num_classes", info.num_classes) != info.num_classes or not info.templates:
        raise ConfigError(f"package data freemerge_pl/data/tasks/{name}: num_classes or templates inconsistent")
    return info


@lru_cache(maxsize=1)
def _all_tasks() -> dict[str, TaskInfo]:
    """Every shipped task, in ``SUITE_ORDER`` (then any other file, by name)."""
    files = sorted((f for f in resources.files(__name__).iterdir() if f.name.endswith(".json")),
                   key=lambda f: f.name)
    infos = [_parse(f.name, f.read_text(encoding="utf-8")) for f in files]
    order = {n: i for i, n in enumerate(SUITE_ORDER)}
    return {i.name: i for i in sorted(infos, key=lambda i: (order.get(i.name, len(order)), i.name))}


def list_tasks(suite: int | None = None) -> list[str]:
    """Names of the shipped tasks; with ``suite`` (8, 14 or 20) those of that suite, in FusionBench's order."""
    tasks = _all_tasks()
    if suite is None:
        return list(tasks)
    if suite not in SUITE_SIZES:
        raise ConfigError(f"suite={suite!r}; accepted: {list(SUITE_SIZES)}")
    return [n for n, info in tasks.items() if info.suite <= suite]


def task_info(name: str) -> TaskInfo:
    """The task named ``name``: its name, FusionBench dataset name or an alias, compared case-insensitively."""
    wanted = name.lower()
    for info in _all_tasks().values():
        if wanted in {n.lower() for n in (info.name, info.dataset, *info.aliases)}:
            return info
    raise ConfigError(f"no class names/templates are shipped for task {name!r}; known tasks: {list_tasks()} "
                      f"(give class_names and templates for it explicitly)")


#: FusionBench's task order (clip-vit-base-patch32_TALL20.yaml): the eight, then the 14- and 20-task additions
SUITE_ORDER = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD",
               "Flowers102", "PCAM", "FER2013", "OxfordIIITPet", "STL10", "CIFAR100",
               "CIFAR10", "Food101", "FashionMNIST", "EMNIST", "KMNIST", "RenderedSST2")

__all__ = ["SUITE_ORDER", "SUITE_SIZES", "TaskInfo", "list_tasks", "task_info"]
