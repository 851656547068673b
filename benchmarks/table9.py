"""Paper Table 9 analogue: what each method needs (data, training, storage) against its accuracy, per zoo.

    python benchmarks/table9.py

Rendered from the zoo tables' JSON (``benchmarks/results/zoo_vision.json``, ``zoo_text.json``; run
``zoo_table.py`` first), nothing is measured here: for the data-dependent rows the statistics/training step's
samples, sample passes and seconds (``merge_record["data_statistics"]``), for routed rows the router's fit
(samples × its epochs), the extra storage per task beyond one merged backbone, the table's throughput (samples/s
of its own evaluation run, on a shared machine: indicative) and the average accuracy. Writes
``benchmarks/results/zoo_data_dependent.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from freemerge_pl.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROWS = ("Task Arithmetic", "TSV", "FREE-Merging (router)", "EMR (router)", "Twin (router)", "Fisher merging",
        "RegMean", "AdaMerging (layer-wise)", "AdaMerging++ (layer-wise)",
        "MTL (joint fine-tuning on the router split)",
        "MTL (joint fine-tuning on 50% of the training split, 3 epochs: the upper bound)")
NEEDS = {"Task Arithmetic": "none", "TSV": "none", "Fisher merging": "inputs (predicted classes)",
         "RegMean": "inputs", "AdaMerging (layer-wise)": "inputs (entropy)",
         "AdaMerging++ (layer-wise)": "inputs (entropy)"}


def router_epochs(zoo: str) -> int:
    """``model.router.epochs`` of the zoo's FREE config (what its routed rows trained with)."""
    folder = {"vision": "zoo", "text": "text"}[zoo]
    cfg = yaml.safe_load((REPO / "configs" / folder / "free_merging.yaml").read_text())
    return int(cfg["model"]["router"]["epochs"])


def training(row: dict[str, Any], router_samples: int, epochs: int) -> tuple[str, str, str, str]:
    """(what the data must carry, distinct samples, sample passes, seconds) of a row's data step."""
    stats = row.get("data_statistics") or {}
    label = row["label"]
    if stats.get("samples"):
        passes = stats.get("sample_passes", stats["samples"])
        return (NEEDS.get(label, "inputs + labels"), f"{stats['samples']:,}", f"{passes:,}",
                f"{stats['seconds']:.1f}")
    if row.get("routing_accuracy") is not None:  # a routed row: the router is its only training
        return ("task ids (the router)", f"{router_samples:,}", f"{router_samples * epochs:,}",
                f"{row['router_fit_seconds']:.1f}")
    return NEEDS.get(label, "none"), "0", "0", "0"


def table(zoo: str) -> list[str]:
    path = RESULTS / f"zoo_{zoo}.json"
    if not path.is_file():
        return [f"*{path.name} missing: run `python benchmarks/zoo_table.py --zoo {zoo}`.*", ""]
    record = json.loads(path.read_text())
    rows = {r["label"]: r for r in record["rows"]}
    unit = "images" if zoo == "vision" else "texts"
    # the router split's size: what the router-split statistics (Fisher, RegMean) read whole
    router_samples = max((r["data_statistics"]["samples"] for r in record["rows"]
                          if (r.get("data_statistics") or {}).get("kind") in ("fisher", "gram")), default=0)
    backbone = next(r["backbone_bytes"] for r in record["rows"] if "backbone_bytes" in r)
    out = [(f"### {zoo.capitalize()} zoo (recipe `{str(record['zoo_recipe_hash'])[:12]}`, {len(record['tasks'])} "
            f"tasks; backbone {backbone / 2**20:.1f} MiB fp32)"), "",
           (f"| method | data needed | distinct {unit} | sample passes | training s | extra storage / task | "
            f"{unit}/s | avg acc. % |"), "|---|---|---|---|---|---|---|---|"]
    for label in ROWS:
        if label not in rows:
            continue
        r = rows[label]
        needs, samples, passes, seconds = training(r, router_samples, router_epochs(zoo))
        extra = r.get("task_module_bytes_per_task") or 0
        storage = "0" if not extra else f"{extra / 2**10:,.0f} KiB ({100 * extra / backbone:.2f} %)"
        out.append(f"| {label} | {needs} | {samples} | {passes} | {seconds} | {storage} | "
                   f"{r.get('images_per_s', 0):.0f} | {100 * r['avg']:.1f} |")
    return out + [""]


def main() -> None:
    lines = ["# Data-dependent baselines vs FREE-Merging: cost and accuracy (paper Table 9 analogue)", "",
             ("Rendered by `benchmarks/table9.py` from the zoo tables (`zoo_vision.json`, `zoo_text.json`): nothing is "
              "measured here. *training s*: the statistics/training step alone (FREE, EMR, Twin: fitting the router, "
              "the configs' `model.router.epochs` over the router split's task ids; the backbone never runs "
              "backward), not the "
              "merge or the evaluation. All data comes from the router split except the MTL upper bound's (half of "
              "the training split). *extra storage*: bytes a task adds to the one merged backbone (the data-dependent "
              "methods keep nothing after the merge). Samples/s come from the tables' own evaluation runs on a "
              "shared 2-core machine and are indicative only; `inference_overhead.md` measures routing overhead."),
             ""]
    for zoo in ("vision", "text"):
        lines += table(zoo)
    md = "\n".join(lines)
    write_text_atomic(md, RESULTS / "zoo_data_dependent.md")
    print(md)


if __name__ == "__main__":
    main()
