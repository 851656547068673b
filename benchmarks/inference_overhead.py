"""Inference overhead of routed FREE-Merging over the merged backbone alone, and router training time.

    python benchmarks/inference_overhead.py [--config configs/zoo/free_merging.yaml] [--batches 20]

Measured in one run on the same batches, the two taking turns: images/s of the model with experts
(router + grouped sparse expert apply/restore + backbone) divided by images/s of the backbone alone
(goal ≥ 0.90; the paper reports 31.0 s vs 32.2 s, 0.96), for the ``input`` and ``backbone`` router
features, on mixed-task batches (a task-agnostic deployment) and per-task batches (the paper's
evaluation), plus oracle routing on per-task batches (one expert apply/restore per batch: the experts'
own cost); and the router's training time on the router split. A router that splits a batch into G
groups runs G smaller forward passes. Writes ``benchmarks/results/inference_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from freemerge_pl.cli import build_from_config
from freemerge_pl.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def mixed_batches(datamodule, n_batches: int, batch_size: int, per_task: bool = False
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of test images: every image from a random task (``per_task=False``: what a
    task-agnostic deployment sees), or each batch from one task, tasks in turn (``per_task=True``: the
    paper's evaluation, one dataloader per dataset). Each batch comes with its images' true task ids."""
    datasets = [datamodule._test[t] for t in datamodule.task_names]
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n_batches):
        xs, ts = [], []
        for _ in range(batch_size):
            k = b % len(datasets) if per_task else int(torch.randint(len(datasets), (1,), generator=g))
            i = int(torch.randint(len(datasets[k]), (1,), generator=g))
            xs.append(datasets[k][i][0])
            ts.append(k)
        batches.append((torch.stack(xs), torch.tensor(ts)))
    return batches


def throughput(fns, batches, repeats: int = 5) -> list[float]:
    """Best-of-``repeats`` images/s of each ``fn(x, task_ids)`` over all batches; the functions take turns
    within each repeat, so a slow spell of the machine hits them alike."""
    best = [float("inf")] * len(fns)
    with torch.inference_mode():
        for fn in fns:
            fn(*batches[0])
        for _ in range(repeats):
            for j, fn in enumerate(fns):
                start = time.perf_counter()
                for x, t in batches:
                    fn(x, t)
                best[j] = min(best[j], time.perf_counter() - start)
    n = sum(len(x) for x, _ in batches)
    return [n / b for b in best]


def run(config: str, n_batches: int, batch_size: int) -> dict:
    rows = {}
    for source in ("input", "backbone"):
        model, dm = build_from_config(["--config", config, "--model.router.feature_source", source])
        model.eval()
        start = time.perf_counter()
        model.fit_router(dm.router_dataset())
        router_seconds = time.perf_counter() - start
        runs = [("router", False), ("router", True)] + ([("oracle", True)] if source == "input" else [])
        for routing, per_task in runs:
            batches = mixed_batches(dm, n_batches, batch_size, per_task)
            # oracle: the true task, one group per per-task batch — the expert's apply/restore cost alone
            with_experts = (lambda x, t, m=model: m(x)) if routing == "router" else (lambda x, t, m=model: m(x, t))
            backbone, routed = throughput([lambda x, t, m=model: m.backbone(x), with_experts], batches)
            label = (f"{routing} on {source} features" if routing == "router" else "oracle") + \
                f", {'per-task' if per_task else 'mixed'} batches"
            rows[label] = {
                "backbone_images_per_s": backbone, "routed_images_per_s": routed, "ratio": routed / backbone,
                "router_fit_seconds": router_seconds if routing == "router" else None,
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
    header = (f"config `{report['config']}`, {report['batches']} batches of {report['batch_size']} test images "
              f"(mixed: tasks interleaved within a batch; per-task: one task per batch), {report['threads']} threads")
    lines = [header, "",
             "| routing, batches | backbone img/s | with experts img/s | ratio (goal ≥ 0.90) | router fit s |",
             "|---|---|---|---|---|"]
    for label, r in report["results"].items():
        fit = f"{r['router_fit_seconds']:.2f}" if r["router_fit_seconds"] is not None else ""
        lines.append(f"| {label} | {r['backbone_images_per_s']:.0f} | {r['routed_images_per_s']:.0f} | "
                     f"{r['ratio']:.3f} | {fit} |")
    md = "\n".join(lines) + "\n"
    write_json_atomic(report, RESULTS / "inference_overhead.json")
    write_text_atomic(md, RESULTS / "inference_overhead.md")
    print(md)


if __name__ == "__main__":
    main()
