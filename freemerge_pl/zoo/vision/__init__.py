"""The offline model zoo: a small CLIP-style ViT pre-trained on procedural scenes, fine-tuned on 8 tasks.

``ensure_zoo(root, size, seed)`` builds it once (deterministically for a given thread count, which is part of
its cache key) and caches it, checking every file against the manifest before use; ``ZooTaskDataset``
reads a task's split; ``freemerge_pl.adapters.zoo_vit.ZooViTAdapter`` reads the checkpoints. The recipe is
recorded in ``freemerge_pl/zoo/vision/README.md``.
"""

from freemerge_pl.zoo.vision.build import (
    build_vit,
    build_zoo,
    ensure_zoo,
    evaluate_accuracy,
    load_task_data,
    normalize_images,
    read_manifest,
    resolve_zoo_root,
    verify_zoo,
)
from freemerge_pl.zoo.vision.dataset import ZooTaskDataset
from freemerge_pl.zoo.vision.recipe import (
    ZOO_MEAN,
    ZOO_STD,
    build_threads,
    default_zoo_root,
    recipe_hash,
    zoo_recipe,
    zoo_task_names,
)

__all__ = [
    "ZOO_MEAN",
    "ZOO_STD",
    "ZooTaskDataset",
    "build_threads",
    "build_vit",
    "build_zoo",
    "default_zoo_root",
    "ensure_zoo",
    "evaluate_accuracy",
    "load_task_data",
    "normalize_images",
    "read_manifest",
    "recipe_hash",
    "resolve_zoo_root",
    "verify_zoo",
    "zoo_recipe",
    "zoo_task_names",
]
