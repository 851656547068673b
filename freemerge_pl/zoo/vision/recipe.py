"""The zoo recipe: every hyperparameter of a build, per size, the build environment that changes its bits (thread
count, torch version, CPU kernels: ``freemerge_pl.zoo.spec.build_environment``); its hash
(``freemerge_pl.zoo.spec.recipe_hash``) is the cache key (a changed recipe ⇒ a rebuild)."""

from __future__ import annotations

import copy
from typing import Any

from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.spec import build_environment, build_threads, recipe_hash
from freemerge_pl.zoo.training import ADAMW_BETAS
from freemerge_pl.zoo.vision.generators import HAS_FREETYPE, available_tasks

#: bump when the generators or the training code change what a recipe produces
RECIPE_VERSION = 3  # 3: a validation split (``n_val``) held out of the training images before fine-tuning

#: input normalisation of every zoo model: OpenAI CLIP's mean and std (the real adapters' code path)
ZOO_MEAN = (0.48145466, 0.4578275, 0.40821073)
ZOO_STD = (0.26862954, 0.26130258, 0.27577711)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "backbone": {"image_size": 32, "patch_size": 4, "width": 32, "layers": 2, "heads": 2,
                     "mlp_ratio": 2.0, "output_dim": 32},
        "data": {"n_train": 96, "n_val": 32, "n_router": 16, "n_test": 64},
        "pretrain": {"n_images": 512, "epochs": 1, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05,
                     "warmup_fraction": 0.1},
        "probe": {"l2": 1e-3, "max_iter": 50},
        "finetune": {"epochs": 1, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.1, "warmup_fraction": 0.1,
                     "head": "probe_frozen"},
    },
    "default": {
        "backbone": {"image_size": 32, "patch_size": 8, "width": 192, "layers": 6, "heads": 3,
                     "mlp_ratio": 4.0, "output_dim": 128},
        "data": {"n_train": 2000, "n_val": 200, "n_router": 100, "n_test": 600},
        "pretrain": {"n_images": 24000, "epochs": 3, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05,
                     "warmup_fraction": 0.05},
        "probe": {"l2": 1e-3, "max_iter": 100},
        "finetune": {"epochs": 5, "batch_size": 64, "lr": 3e-4, "weight_decay": 0.1, "warmup_fraction": 0.1,
                     "head": "probe_frozen"},
    },
}
HEAD_PROTOCOLS = ("probe_frozen", "probe_init_trained")
EVAL_BATCH_SIZE = 256


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ConfigError(f"unknown zoo size {size!r}; accepted: {sorted(SIZES)}")


def zoo_recipe(size: str = "default", threads: int | None = None) -> dict[str, Any]:
    """The full recipe of a zoo size (a fresh copy): hyperparameters, task list, generator facts and the build
    environment (``threads``: the build's thread count, default ``build_threads()``)."""
    check_size(size)
    r = copy.deepcopy(SIZES[size])
    if r["finetune"]["head"] not in HEAD_PROTOCOLS:
        raise ConfigError(f"zoo size {size!r}: finetune.head={r['finetune']['head']!r}; accepted: {HEAD_PROTOCOLS}")
    r.update({
        "recipe_version": RECIPE_VERSION,
        "size": size,
        "tasks": available_tasks(),
        "generator": {"image_size": 32, "canvas": 64, "freetype_font": HAS_FREETYPE},
        "normalisation": {"mean": list(ZOO_MEAN), "std": list(ZOO_STD)},
        "optimizer": {"name": "AdamW", "betas": list(ADAMW_BETAS), "schedule": "linear warmup, cosine to 0"},
        "eval_batch_size": EVAL_BATCH_SIZE,
        "environment": build_environment(threads),
    })
    return r


def zoo_task_names(size: str = "default") -> list[str]:
    """The zoo's downstream tasks in their fixed order (``fashion`` only where it is installed)."""
    return list(zoo_recipe(size)["tasks"])


__all__ = ["ADAMW_BETAS", "EVAL_BATCH_SIZE", "HEAD_PROTOCOLS", "RECIPE_VERSION", "SIZES", "ZOO_MEAN", "ZOO_STD",
           "build_environment", "build_threads", "check_size", "recipe_hash", "zoo_recipe", "zoo_task_names"]
