"""Writes configs/paper/table4_roberta_glue_<method>.yaml: FREE-Merging's Table 4 (RoBERTa-base, 8 GLUE tasks),
one file per registry method (FR/FREE in paper and released-code semantics, and every baseline).

    python configs/paper/make_table4.py

``CHECKPOINT_ROOT`` and ``DATA_ROOT`` in the files are placeholders (see README.md, "Table 4").
"""

from __future__ import annotations

from pathlib import Path

import yaml

from freemerge_pl.lightning.metrics import GLUE_PAPER_METRIC, glue_metrics, glue_task_key
from freemerge_pl.merging import get_method, list_methods

HERE = Path(__file__).resolve().parent
#: Table 4's tasks, in the paper's order, with their HF ``glue`` text columns and evaluation split
GLUE_TASKS: dict[str, tuple[list[str], str]] = {
    "CoLA": (["sentence"], "validation"),
    "SST-2": (["sentence"], "validation"),
    "MRPC": (["sentence1", "sentence2"], "validation"),
    "STS-B": (["sentence1", "sentence2"], "validation"),
    "QQP": (["question1", "question2"], "validation"),
    "MNLI": (["premise", "hypothesis"], "validation_matched"),
    "QNLI": (["question", "sentence"], "validation"),
    "RTE": (["sentence1", "sentence2"], "validation"),
}
#: Table 4 rows (RoBERTa column) of the methods that have one
PAPER_ROWS = {"individual": ("Individual", 85.55),
              "weight_averaging": ("Weight Averaging", 51.34), "task_arithmetic": ("Task Arithmetic", 66.65),
              "ties": ("Ties-Merging", 64.04), "breadcrumbs": ("Breadcrumbs", 68.19),
              "pcb": ("PCB-Merging", 67.86), "fr_merging": ("FR-Merging(ours)", 70.02),
              "fr_merging_released": ("FR-Merging(ours)", 70.02), "emr": ("EMR-Merging", 74.20),
              "twin": ("Twin-Merging", 78.29), "free_merging": ("FREE-Merging(ours)", 80.16),
              "free_merging_released": ("FREE-Merging(ours)", 80.16)}
#: settings that differ from the method's defaults; the released files take the GLUE profile of the
#: released script (merge_lm/merge_roberta_glue.py), FREE with its README command's expert settings
METHOD_ARGS: dict[str, dict] = {
    "fr_merging": {"filter_ratio": 0.3, "scaling": 1.0},
    "free_merging": {"filter_ratio": 0.3, "scaling": 1.0, "expert_density": 0.01},
    "fr_merging_released": {"profile": "glue", "filter_ratio": 0.7},
    "free_merging_released": {"profile": "glue", "filter_ratio": 0.7, "glue_expert_density": 0.1,
                              "glue_expert_remove": 0.02},
}
#: the released GLUE script picks each dataset's expert by the dataset index (no router); ``individual`` (each
#: task's own fine-tuned model) is scored with the true task: the Individual row
ROUTING = {"free_merging_released": "oracle", "individual": "oracle"}


def adapter_args() -> dict:
    return {"pretrained": "CHECKPOINT_ROOT/roberta-base",
            "finetuned": {t: f"CHECKPOINT_ROOT/roberta-base_glue-{glue_task_key(t)}" for t in GLUE_TASKS}}


def task_entry(name: str) -> dict:
    columns, test_split = GLUE_TASKS[name]
    key = glue_task_key(name)
    args = {"path": f"DATA_ROOT/glue/{key}", "tokenizer": "CHECKPOINT_ROOT/roberta-base", "text_columns": columns,
            "max_length": 128}
    if key == "stsb":
        args["label_type"] = "regression"
    return {"name": name, "dataset": "freemerge_pl.data.text.TextTask", "dataset_args": args,
            "train_args": {"split": "train"}, "test_args": {"split": test_split}, "metrics": glue_metrics(name)}


def table4_config(method: str) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "auto", "devices": 1, "logger": False,
            "default_root_dir": f"outputs/paper/table4_roberta_glue_{method}", "enable_checkpointing": True,
            "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable"},
                          {"class_path": "freemerge_pl.callbacks.RoutingStats"}],
        },
        "model": {
            "adapter": {"class_path": "freemerge_pl.adapters.hf_text.HFSequenceClassificationAdapter",
                        "init_args": adapter_args()},
            "method": method,
            "method_args": METHOD_ARGS.get(method, {}),
            "routing": ROUTING.get(method, "router"),
            "head_selection": "dataset",
            "router": {"epochs": 20},
        },
        "data": {"router_fraction": 0.01, "min_router_samples": 16, "batch_size": 64, "num_workers": 4, "seed": 0,
                 "tasks": [task_entry(t) for t in GLUE_TASKS]},
    }


def header(method: str) -> str:
    spec = get_method(method)
    row = PAPER_ROWS.get(method)
    setting = (f"Setting of: paper Table 4, row \"{row[0]}\", column RoBERTa (avg {row[1]})." if row else
               "Not a Table 4 row: the same setting for comparison.")
    args = METHOD_ARGS.get(method)
    lines = [
        f"{method} ({spec.reference}) on RoBERTa-base fine-tuned on 8 GLUE tasks.",
        setting,
        "Hyperparameters: " + (", ".join(f"{k} {v}" for k, v in args.items()) if args else "the method's defaults")
        + "; routing " + ROUTING.get(method, "router (on the merged encoder's features)") + ".",
        "Generated by configs/paper/make_table4.py; placeholders CHECKPOINT_ROOT (roberta-base and the",
        "roberta-base_glue-<task> sequence classifiers, save_pretrained folders) and DATA_ROOT (glue/<task>,",
        "datasets save_to_disk of the HF glue configs): see configs/paper/README.md, Table 4.",
        "Paper score per task: " + ", ".join(f"{t} {GLUE_PAPER_METRIC[glue_task_key(t)]}" for t in GLUE_TASKS) + ".",
        f"Run: python cli.py test --config configs/paper/table4_roberta_glue_{method}.yaml",
    ]
    return "".join(f"# {line}\n" for line in lines)


def render_all() -> dict[str, str]:
    """File name → text of every Table 4 config."""
    return {f"table4_roberta_glue_{m}.yaml": header(m) + yaml.safe_dump(table4_config(m), sort_keys=False)
            for m in list_methods()}


def main() -> None:
    for name, text in render_all().items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
