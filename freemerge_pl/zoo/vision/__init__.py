"""The offline model zoo: a small CLIP-style ViT pre-trained on procedural scenes, fine-tuned on 8 tasks.

``ensure_zoo(root, size, seed)`` builds it once (deterministically for a given thread count, which is part of
its cache key) and caches it, checking every file against the manifest before use; ``ZooTaskDataset``
reads a task's split; ``freemerge_pl.adapters.zoo_vit.ZooViTAdapter`` reads the checkpoints. The recipe is
recorded in ``freemerge_pl/zoo/vision/README.md``. ``python -m freemerge_pl.zoo.vision --size default`` builds it
(an interrupted build resumes from its finished stages). It is the ``ZooSpec`` ``VISION_ZOO``
(``freemerge_pl.zoo.spec``) over the shared cache logic of ``freemerge_pl.zoo.cache``.
"""

from freemerge_pl.zoo.vision.build import (
    VISION_ZOO,
    build_vit,
    build_zoo,
    default_zoo_root,
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
    recipe_hash,
    zoo_recipe,
    zoo_task_names,
)

#: the vision zoo's ``ZooSpec`` (``freemerge_pl.zoo.cache`` builds, verifies and finds it)
SPEC = VISION_ZOO

__all__ = [
    "SPEC",
    "VISION_ZOO",
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
