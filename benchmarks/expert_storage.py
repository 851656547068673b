"""Expert storage and its accuracy effect: FREE-Merging experts stored as float32 / bfloat16 / float16 values with
flat int32 or compact indices, on the zoo with oracle routing (the experts' own effect, no router error).

    python benchmarks/expert_storage.py [--size default]

For each storage choice: bytes of one task's expert as a % of the float32 backbone, bytes an entry, and the
average test accuracy (points; goal: 16-bit values within 0.2 points of float32, storage ≤ 1.0 % at d = 1 %).
Indices are loss-free in every choice (``experts.encode_indices``), so only the value rounding can move accuracy.
FREE-Merging's defaults are the "bfloat16 values, compact indices" row (issue 28 item 6); every row passes its
``expert_dtype`` explicitly, so the table does not depend on the default. Writes
``benchmarks/results/expert_storage.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from freemerge_pl.io import write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_table import build, evaluate  # the zoo table's own build and evaluation

RESULTS = Path(__file__).resolve().parent / "results"
CHOICES = {
    "float32 values, flat int32 indices": {"expert_dtype": "float32", "expert_index_encoding": "flat"},
    "float32 values, compact indices": {"expert_dtype": "float32", "expert_index_encoding": "compact"},
    "bfloat16 values, compact indices": {"expert_dtype": "bfloat16", "expert_index_encoding": "compact"},
    "float16 values, compact indices": {"expert_dtype": "float16", "expert_index_encoding": "compact"},
}


def run(size: str) -> dict:
    rows = {}
    for label, args in CHOICES.items():
        module, dm = build(size, "free_merging", args, {"routing": "oracle"})
        res = evaluate(module, dm)
        nnz = sum(m.nnz for m in module.task_modules) / len(module.task_modules)
        per_task = res["task_module_bytes_per_task"]
        codes: dict[str, int] = {}
        for m in module.task_modules:
            for key in m.keys:
                codes[m.index_code(key)] = codes.get(m.index_code(key), 0) + 1
        rows[label] = {"method_args": args, "storage_percent": 100 * per_task / res["backbone_bytes"],
                       "bytes_per_entry": per_task / nnz, "entries_per_task": nnz,
                       "accuracy": 100 * sum(res["tasks"].values()) / len(res["tasks"]), "tasks": res["tasks"],
                       "index_codes": codes}
    reference = rows["float32 values, flat int32 indices"]["accuracy"]
    for r in rows.values():
        r["accuracy_change_points"] = r["accuracy"] - reference
    return {"size": size, "expert_density": 0.01, "routing": "oracle", "threads": torch.get_num_threads(),
            "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the .json/.md results")
    args = parser.parse_args()
    report = run(args.size)
    title = (f"zoo `{report['size']}`, FREE-Merging d = 1 %, oracle routing; storage of one task's expert as a % "
             f"of the float32 backbone (goal ≤ 1.0 %), accuracy change vs float32 values (goal within 0.2 points)")
    lines = [title, "",
             "| storage | % of backbone | bytes/entry | accuracy % | change (points) | index codes (tensors) |",
             "|---|---|---|---|---|---|"]
    for label, r in report["results"].items():
        codes = ", ".join(f"{c} {n}" for c, n in sorted(r["index_codes"].items()))
        lines.append(f"| {label} | {r['storage_percent']:.3f} | {r['bytes_per_entry']:.2f} | {r['accuracy']:.2f} | "
                     f"{r['accuracy_change_points']:+.2f} | {codes} |")
    md = "\n".join(lines) + "\n"
    write_json_atomic(report, args.results / "expert_storage.json")
    write_text_atomic(md, args.results / "expert_storage.md")
    print(md)


if __name__ == "__main__":
    main()
