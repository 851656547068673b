"""Inference overhead of routed FREE-Merging over the merged backbone alone, and router training time.

    python benchmarks/inference_overhead.py [--config configs/zoo/free_merging.yaml] [--batches 20]

Measured in one run on the same batches, the functions taking turns: images/s of the model with experts
(router + experts + backbone) divided by images/s of the merged backbone alone (goal ≥ 0.90; the paper reports
31.0 s vs 32.2 s, 0.96). The config's (default) router, on mixed-task batches (a task-agnostic deployment) with
two expert paths: ``weight_swap`` (the product's: one pass per routed group with the experts applied in place and
restored) and ``activation`` (experimental, ``benchmarks/experimental/activation_experts.py``: one backbone pass
with each sample's sparse expert added as a layer correction), and on per-task batches (the paper's evaluation);
oracle routing on per-task batches (one expert apply/restore per batch: the experts' own cost) and on mixed
batches (the experts' cost without the router's); the router's features alone; and the router's training time.
Writes ``benchmarks/results/inference_overhead.{json,md}`` (``--name``: another name, e.g.
``inference_overhead_text`` for ``--config configs/text/free_merging.yaml``); the last line printed is
``default router, mixed batches: routed/merged throughput X.XX`` (the weight swap).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.cli import build_from_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "experimental"))
from activation_experts import ActivationExperts

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
    """Images/s of each ``fn(x, task_ids)`` over all batches: per batch the functions take turns, and each
    function's time on a batch is its best of ``repeats`` (a slow spell of the machine hits them alike and is
    dropped; timing whole sweeps instead moved the same path by 15 % between turns on these VMs)."""
    best = [[float("inf")] * len(batches) for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn(*batches[0])
        for _ in range(repeats):
            for b, (x, t) in enumerate(batches):
                for j, fn in enumerate(fns):
                    start = time.perf_counter()
                    fn(x, t)
                    best[j][b] = min(best[j][b], time.perf_counter() - start)
    n = sum(len(x) for x, _ in batches)
    return [n / sum(b) for b in best]


def _with_path(model, path: str, routing: str):
    """``fn(x, task_ids)``: the routed model (a ``RoutedModel``) with the experts applied by ``path`` (oracle:
    the true task ids). ``activation`` falls back to the weight swap where it does not cover a layer."""
    activation = ActivationExperts(model.backbone, list(model.task_modules)) if path == "activation" else None

    def fn(x, t):
        ids, weights = model.route(x, None if routing == "router" else t)
        if activation is not None and activation.supported:
            return activation(x, ids, weights), ids[:, 0]
        return model.features(x, ids, weights), ids[:, 0]

    return fn


def run(config: str, n_batches: int, batch_size: int) -> dict:
    module, dm = build_from_config(["--config", config])
    model = module.model.eval()
    start = time.perf_counter()
    model.fit_router(dm.router_dataset())
    router_seconds = time.perf_counter() - start
    source = model.feature_source
    rows = {}
    # (routing, per-task batches, expert paths measured against the backbone in the same interleaved run)
    runs = [("router", False, ("weight_swap", "activation")), ("router", True, ("weight_swap",)),
            ("oracle", True, ("weight_swap",)), ("oracle", False, ("weight_swap", "activation"))]
    for routing, per_task, paths in runs:
        batches = mixed_batches(dm, n_batches, batch_size, per_task)
        fns = [lambda x, t, m=model: m.backbone(x)] + [_with_path(model, p, routing) for p in paths]
        speeds = throughput(fns, batches)
        for path, routed in zip(paths, speeds[1:]):
            label = (f"router on {source} features" if routing == "router" else "oracle") + \
                f", {'per-task' if per_task else 'mixed'} batches, {path}"
            rows[label] = {
                "backbone_images_per_s": speeds[0], "routed_images_per_s": routed, "ratio": routed / speeds[0],
                "expert_path": path, "router_fit_seconds": router_seconds if routing == "router" else None,
                "router_samples": len(dm.router_dataset()), "method": module.method,
                "task_modules": len(model.task_modules)}
    mixed = rows[f"router on {source} features, mixed batches, weight_swap"]["ratio"]
    backbone_speed, router_speed = throughput([lambda x, t: model.backbone(x), lambda x, t: model.router_logits(x)],
                                              mixed_batches(dm, n_batches, batch_size))
    return {"config": config, "batches": n_batches, "batch_size": batch_size,
            "threads": torch.get_num_threads(), "default_router": source, "default_router_mixed_ratio": mixed,
            "router_time_over_backbone": backbone_speed / router_speed, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/zoo/free_merging.yaml")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the .json/.md results")
    parser.add_argument("--name", default="inference_overhead", help="results file name (without suffix)")
    args = parser.parse_args()
    report = run(args.config, args.batches, args.batch_size)
    header = (f"config `{report['config']}`, {report['batches']} batches of {report['batch_size']} test images "
              f"(mixed: tasks interleaved within a batch; per-task: one task per batch), {report['threads']} threads")
    lines = [header, "",
             ("| routing, batches, expert path | backbone img/s | with experts img/s | ratio (goal ≥ 0.90) "
              "| router fit s |"),
             "|---|---|---|---|---|"]
    for label, r in report["results"].items():
        fit = f"{r['router_fit_seconds']:.2f}" if r["router_fit_seconds"] is not None else ""
        lines.append(f"| {label} | {r['backbone_images_per_s']:.0f} | {r['routed_images_per_s']:.0f} | "
                     f"{r['ratio']:.3f} | {fit} |")
    lines += ["", (f"the default router's features and head alone take {report['router_time_over_backbone']:.2f} × the "
                   f"merged backbone's time on mixed batches")]
    md = "\n".join(lines) + "\n"
    write_json_atomic(report, args.results / f"{args.name}.json")
    write_text_atomic(md, args.results / f"{args.name}.md")
    print(md)
    print(f"default router, mixed batches: routed/merged throughput {report['default_router_mixed_ratio']:.2f}")


if __name__ == "__main__":
    main()
