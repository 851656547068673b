"""The zoo recipe: every hyperparameter of a build, per size, the build environment that changes its bits (thread
count, torch version, CPU kernels), and its hash (a changed recipe ⇒ a rebuild)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from freemerge_pl.errors import ConfigError
from freemerge_pl.progress import usable_cpus
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
ADAMW_BETAS = (0.9, 0.98)
EVAL_BATCH_SIZE = 256


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ConfigError(f"unknown zoo size {size!r}; accepted: {sorted(SIZES)}")


def build_threads() -> int:
    """CPU threads a build uses: ``$FREEMERGE_ZOO_THREADS`` or the CPUs this process may use (≤ 8)."""
    env = os.environ.get("FREEMERGE_ZOO_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"FREEMERGE_ZOO_THREADS={env!r} is not an integer (the zoo build's thread count)") from None
    return max(1, min(usable_cpus(), 8))


def build_environment(threads: int | None = None) -> dict[str, Any]:
    """What besides the hyperparameters changes a build's bits, hence its accuracies: the intra-op thread count
    (it changes how reductions and matrix products are split: a 1- and a 2-thread build of the default size
    differ by up to 2 points on a task), torch's major.minor version and the CPU kernels it dispatches to."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return {"threads": int(threads) if threads is not None else build_threads(), "torch": major_minor,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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


def recipe_hash(recipe: dict[str, Any], seed: int) -> str:
    """The zoo's cache key: SHA-256 of the recipe (environment included) and the seed."""
    blob = json.dumps({"recipe": recipe, "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def zoo_task_names(size: str = "default") -> list[str]:
    """The zoo's downstream tasks in their fixed order (``fashion`` only where it is installed)."""
    return list(zoo_recipe(size)["tasks"])


def default_zoo_root(size: str = "default", seed: int = 0) -> Path:
    """``$FREEMERGE_ZOO_ROOT/<size>-seed<seed>`` if that variable is set, else the user cache directory."""
    base = os.environ.get("FREEMERGE_ZOO_ROOT")
    if base:
        parent = Path(base).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        parent = Path(cache).expanduser() / "freemerge_pl" / "zoo"
    return parent / f"{size}-seed{seed}"
