"""Regenerates the method configs under configs/zoo/ and configs/text/ (one per registry method, same settings
otherwise).

    python configs/make_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

from freemerge_pl.merging import get_method, list_methods
from freemerge_pl.zoo.text import text_zoo_task_names
from freemerge_pl.zoo.vision import zoo_task_names

HERE = Path(__file__).resolve().parent
ZOO_TASKS = ["digits", "letters", "signs", "textures", "counting", "orientation", "layout", "handwritten"]
TEXT_TASKS = ["language", "sentiment", "unicode_category", "stdlib_topic"]


def _config(out: str, adapter: dict, method: str, method_args: dict | None, router: dict, data: dict,
            model: dict) -> dict:
    """The LightningCLI config both zoos share: trainer, model (adapter, method, protocol, router) and data."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "auto", "devices": 1, "logger": False,
            "default_root_dir": out, "enable_checkpointing": True,
            "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable"},
                          {"class_path": "freemerge_pl.callbacks.RoutingStats"}],
        },
        "model": {
            "adapter": adapter,
            "method": method,
            "method_args": method_args or {},
            "routing": "router",
            "head_selection": "dataset",
            "router": router,
            **model,
        },
        "data": data,
    }


def zoo_config(method: str, size: str = "default", method_args: dict | None = None, **model) -> dict:
    return _config(
        f"outputs/zoo{'' if size == 'default' else '_' + size}/{method}",
        {"class_path": "freemerge_pl.adapters.zoo_vit.ZooViTAdapter",
         "init_args": {"size": size, "seed": 0, "tasks": ZOO_TASKS}},
        method, method_args,
        {"epochs": 20},  # feature_source auto: the pre-trained backbone's pooled features
        {"router_fraction": 0.01, "min_router_samples": 16, "batch_size": 256, "seed": 0,
         "tasks": [{"name": t, "dataset": "freemerge_pl.zoo.vision.ZooTaskDataset",
                    "dataset_args": {"task": t, "size": size, "seed": 0}} for t in ZOO_TASKS]},
        model)


def text_config(method: str, size: str = "default", method_args: dict | None = None, **model) -> dict:
    """The text zoo (MiniLM fine-tuned on 4 text tasks): the router reads the merged encoder's features (token
    ids are no input features) and trains on each task's held-out router split (never fine-tuned on)."""
    return _config(
        f"outputs/text{'' if size == 'default' else '_' + size}/{method}",
        {"class_path": "freemerge_pl.adapters.text_zoo.TextZooAdapter",
         "init_args": {"size": size, "seed": 0, "tasks": TEXT_TASKS}},
        method, method_args,
        {"epochs": 20},  # feature_source auto: the pre-trained encoder's first layers, token mean
        {"router_fraction": 1.0, "min_router_samples": 1, "batch_size": 128, "seed": 0,
         "tasks": [{"name": t, "dataset": "freemerge_pl.zoo.text.TextZooTaskDataset",
                    "dataset_args": {"task": t, "size": size, "seed": 0},
                    "train_args": {"split": "router"}} for t in TEXT_TASKS]},
        model)


#: The data-dependent rows (issue 20) on the zoo: the statistics/training budgets sized for 2 CPU cores (the
#: classes' defaults are the papers': AdaMerging trains 500 steps). Training cost is reported beside accuracy.
DATA_DEPENDENT_ZOO_ARGS = {
    "fisher": {"fisher_batches": 8, "batch_size": 16, "fisher_target": "predicted"},
    "regmean": {"gram_batches": 8, "batch_size": 16, "alpha": 0.9},
    "adamerging": {"granularity": "layer", "steps": 100, "lr": 0.01, "init": 0.3, "batch_size": 16},
    "adamerging_pp": {"granularity": "layer", "steps": 100, "lr": 0.01, "init": 0.3, "batch_size": 16,
                      "density": 0.2},
    "mtl": {"data_split": "router", "epochs": 10, "lr": 1e-4, "batch_size": 32},
}


#: model settings per method: ``individual`` (each task's own fine-tuned model) is scored with the true task
#: (``routing: oracle``, the tables' reference row; ``routing: router`` would be the upper bound of a router over
#: whole models)
MODEL_ARGS = {"individual": {"routing": "oracle"}}
NOTES = {"individual": " Routing: oracle (each task runs its own fine-tuned model: the Individual row).",
         "pretrained": " No task modules: nothing is routed (the Pre-trained row)."}


#: the released code's language-model path (merge_lm/merge_roberta_glue.py) for the BERT encoder of the text zoo:
#: the ViT profile's ``attn|mlp`` key pattern names no BERT tensor (an error)
TEXT_ARGS = {"fr_merging_released": {"profile": "glue"}, "free_merging_released": {"profile": "glue"}}


def write_data_dependent_zoo_configs(size: str = "default") -> None:
    """configs/zoo/{fisher,regmean,adamerging,adamerging_pp,mtl}.yaml: statistics from the router split."""
    for method, args in DATA_DEPENDENT_ZOO_ARGS.items():
        spec = get_method(method)
        write(HERE / "zoo" / f"{method}.yaml", zoo_config(method, size=size, method_args=args),
              f"{method} ({spec.reference}) on the offline zoo; data statistics / training from the router split "
              "(1% of each task's training data), never the test split.")


def write(path: Path, cfg: dict, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    assert zoo_task_names("default")[:8] == ZOO_TASKS
    for method in list_methods():
        spec = get_method(method)
        write(HERE / "zoo" / f"{method}.yaml", zoo_config(method, **MODEL_ARGS.get(method, {})),
              f"{method} ({spec.reference}) on the offline zoo, the method's default hyperparameters."
              + NOTES.get(method, ""))
    write_data_dependent_zoo_configs()
    write(HERE / "zoo" / "tiny" / "free_merging.yaml", zoo_config("free_merging", size="tiny"),
          "FREE-Merging on the tiny zoo (seconds; what CI runs end to end).")
    assert text_zoo_task_names("default") == TEXT_TASKS
    for method in list_methods():
        spec = get_method(method)
        write(HERE / "text" / f"{method}.yaml",
              text_config(method, method_args=TEXT_ARGS.get(method), **MODEL_ARGS.get(method, {})),
              f"{method} ({spec.reference}) on the text zoo (all-MiniLM-L6-v2, 4 tasks), the method's defaults"
              + (f" but {TEXT_ARGS[method]} (the released code's language-model path)." if method in TEXT_ARGS
                 else ".") + NOTES.get(method, ""))
    write(HERE / "text" / "tiny" / "free_merging.yaml", text_config("free_merging", size="tiny"),
          "FREE-Merging on the tiny text zoo (a tiny random BERT; seconds; for tests).")

if __name__ == "__main__":
    main()
