"""Regenerates the method configs under configs/zoo/ (one per registry method, same settings otherwise).

    python configs/make_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

from freemerge_pl.merging import get_method, list_methods
from freemerge_pl.zoo import zoo_task_names

HERE = Path(__file__).resolve().parent
ZOO_TASKS = ["digits", "letters", "signs", "textures", "counting", "orientation", "layout", "handwritten"]


def zoo_config(method: str, size: str = "default", method_args: dict | None = None, **model) -> dict:
    out = f"outputs/zoo{'' if size == 'default' else '_' + size}/{method}"
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "auto", "devices": 1, "max_epochs": 20, "logger": False,
            "default_root_dir": out, "enable_checkpointing": True,
            "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable"},
                          {"class_path": "freemerge_pl.callbacks.RoutingStats"}],
        },
        "model": {
            "adapter": {"class_path": "freemerge_pl.models.zoo_vit.ZooViTAdapter",
                        "init_args": {"size": size, "seed": 0, "tasks": ZOO_TASKS}},
            "method": method,
            "method_args": method_args or {},
            "routing": "router",
            "head_selection": "dataset",
            "router": {"feature_source": "input", "epochs": 20},
            **model,
        },
        "data": {
            "router_fraction": 0.01, "min_router_samples": 16, "batch_size": 256, "seed": 0,
            "tasks": [{"name": t, "dataset": "freemerge_pl.zoo.ZooTaskDataset",
                       "dataset_args": {"task": t, "size": size, "seed": 0}} for t in ZOO_TASKS],
        },
    }


def write(path: Path, cfg: dict, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    assert zoo_task_names("default")[:8] == ZOO_TASKS
    for method in list_methods():
        spec = get_method(method)
        write(HERE / "zoo" / f"{method}.yaml", zoo_config(method),
              f"{method} ({spec.reference}) on the offline zoo, the method's default hyperparameters.")
    write(HERE / "zoo" / "tiny" / "free_merging.yaml", zoo_config("free_merging", size="tiny"),
          "FREE-Merging on the tiny zoo (seconds; what CI runs end to end).")

if __name__ == "__main__":
    main()
