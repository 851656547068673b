"""The text zoo recipe: every setting of a build per size, what else changes its bits (build environment, the
versions of the packages whose text it reads), and its cache key (``freemerge_pl.zoo.spec.recipe_hash``)."""

from __future__ import annotations

import copy
from typing import Any

import transformers

from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.spec import build_environment, recipe_hash
from freemerge_pl.zoo.text.sources import LANGUAGES, STDLIB_TOPICS, UNICODE_CATEGORIES, source_versions

#: bump when the sources or the training code change what a recipe produces
RECIPE_VERSION = 1
#: the pre-trained encoder of the default size: sentence-transformers' all-MiniLM-L6-v2 from its PyPI wheel
MINILM = "all-MiniLM-L6-v2"

#: the tasks, in their fixed order (each ≥ 4 balanced classes)
TASKS: dict[str, dict[str, Any]] = {
    "language": {"kind": "language", "languages": list(LANGUAGES), "top": 5000, "min_length": 3},
    "sentiment": {"kind": "sentiment"},
    "unicode_category": {"kind": "unicode_category", "categories": list(UNICODE_CATEGORIES)},
    "stdlib_topic": {"kind": "stdlib_topic", "topics": {k: list(v) for k, v in STDLIB_TOPICS.items()}},
}

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        # a tiny random BERT (θ_pre is its seeded initialisation), MiniLM's tokenizer
        "encoder": {"kind": "random_bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "max_position_embeddings": 64},
        "data": {"n_router_per_class": 2, "n_test_per_class": 6, "max_train_per_class": 12, "max_length": 24},
        "finetune": {"steps": 4, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01, "warmup_fraction": 0.1},
    },
    "default": {
        "encoder": {"kind": MINILM},
        "data": {"n_router_per_class": 4, "n_test_per_class": 100, "max_train_per_class": 256, "max_length": 24},
        "finetune": {"steps": 200, "batch_size": 16, "lr": 5e-5, "weight_decay": 0.01, "warmup_fraction": 0.1},
    },
}
EVAL_BATCH_SIZE = 128


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ConfigError(f"unknown text zoo size {size!r}; accepted: {sorted(SIZES)}")


def text_zoo_recipe(size: str = "default", threads: int | None = None) -> dict[str, Any]:
    """The full recipe of a text zoo size (a fresh copy): settings, tasks, optimiser, build environment and the
    versions of the text sources (``threads``: the build's thread count, default ``build_threads()``)."""
    check_size(size)
    r = copy.deepcopy(SIZES[size])
    r.update({
        "recipe_version": RECIPE_VERSION,
        "size": size,
        "tasks": copy.deepcopy(TASKS),
        "model": "BertForSequenceClassification (encoder + pooler merged; classifier per task)",
        "optimizer": {"name": "AdamW (freemerge_pl.zoo.build)", "schedule": "linear warmup, cosine to 0",
                      "dropout": "the encoder config's (0.1)"},
        "eval_batch_size": EVAL_BATCH_SIZE,
        "environment": {**build_environment(threads), "transformers": ".".join(transformers.__version__.split(".")[:2]),
                        "sources": source_versions()},
    })
    return r


def text_zoo_hash(recipe: dict[str, Any], seed: int) -> str:
    """The text zoo's cache key (``freemerge_pl.zoo.spec.recipe_hash``: SHA-256 of recipe and seed)."""
    return recipe_hash(recipe, seed)


def text_zoo_task_names(size: str = "default") -> list[str]:
    check_size(size)
    return list(TASKS)


__all__ = ["MINILM", "SIZES", "TASKS", "check_size", "text_zoo_hash", "text_zoo_recipe", "text_zoo_task_names"]
