"""Inference overhead of routed FREE-Merging over the merged backbone alone, and router training time.

    python benchmarks/inference_overhead.py [--config configs/zoo/free_merging.yaml] [--batches 20]

Measured in one run on the same batches (mixed tasks, as a deployment sees them): images/s of the routed
model (router + grouped sparse expert apply/restore + backbone) divided by images/s of the backbone alone
(goal ≥ 0.90; the paper reports 31.0 s vs 32.2 s, 0.96), for the ``input`` router features and the
``backbone`` features; and the router's training time on the router split. Writes
``benchmarks/results/inference_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from freemerge_pl.cli import build_from_config
from freemerge_pl.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def mixed_batches(datamodule, n_batches: int, batch_size: int) -> list[torch.Tensor]:
    """``n_batches`` batches drawn round-robin from every task's test set (tasks interleaved)."""
    datasets = [datamodule._test[t] for t in datamodule.task_names]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        xs = []
        for _ in range(batch_size):
            k = int(torch.randint(len(datasets), (1,), generator=g))
            i = int(torch.randint(len(datasets[k]), (1,), generator=g))
            xs.append(datasets[k][i][0])
        batches.append(torch.stack(xs))
    return batches


def throughput(fn, batches, repeats: int = 3) -> float:
    """Best-of-``repeats`` images/s of ``fn`` over all batches."""
    best = float("inf")
    with torch.inference_mode():
        fn(batches[0])
        for _ in range(repeats):
            start = time.perf_counter()
            for x in batches:
                fn(x)
            best = min(best, time.perf_counter() - start)
    return sum(len(x) for x in batches) / best


def run(config: str, n_batches: int, batch_size: int) -> dict:
    rows = {}
    for source in ("input", "backbone"):
        model, dm = build_from_config(["--config", config, "--model.router.feature_source", source])
        model.eval()
        start = time.perf_counter()
        model.fit_router(dm.router_dataset())
        router_seconds = time.perf_counter() - start
        batches = mixed_batches(dm, n_batches, batch_size)
        backbone = throughput(model.backbone, batches)
        routed = throughput(model, batches)
        rows[source] = {"backbone_images_per_s": backbone, "routed_images_per_s": routed,
                        "ratio": routed / backbone, "router_fit_seconds": router_seconds,
                        "router_samples": len(dm.router_dataset()), "method": model.method,
                        "task_modules": len(model.task_modules)}
    return {"config": config, "batches": n_batches, "batch_size": batch_size,
            "threads": torch.get_num_threads(), "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/zoo/free_merging.yaml")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    report = run(args.config, args.batches, args.batch_size)
    header = (f"config `{report['config']}`, {report['batches']} mixed-task batches of {report['batch_size']}, "
              f"{report['threads']} threads")
    lines = [header, "",
             "| router features | backbone img/s | routed img/s | ratio (goal ≥ 0.90) | router fit s |",
             "|---|---|---|---|---|"]
    for source, r in report["results"].items():
        lines.append(f"| {source} | {r['backbone_images_per_s']:.0f} | {r['routed_images_per_s']:.0f} | "
                     f"{r['ratio']:.3f} | {r['router_fit_seconds']:.2f} |")
    md = "\n".join(lines) + "\n"
    write_json_atomic(report, RESULTS / "inference_overhead.json")
    write_text_atomic(md, RESULTS / "inference_overhead.md")
    print(md)


if __name__ == "__main__":
    main()
