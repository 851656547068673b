"""How routing accuracy on the default zoo grows with the router's data: is the ≥ 90 % goal data-limited?

    python benchmarks/router_data_scaling.py [--per-task 20,50,100,200,400,800,1600] [--seeds 3]

The router only learns which task an image comes from, so any image of a task's training split is fair data for
it (the paper's router uses 1 % of the training data; the zoo's fine-tuned models trained on these images, which
does not matter for task identity). For each size n, n images per task are drawn (seeded, nested) from the zoo's
``train`` split, and the default router head (MLP, ``RouterConfig`` defaults) is fitted on the merged FREE
backbone's first ``SPLIT_BLOCK`` blocks, pooled two ways (``class_token``, the product's, and
``class_mean_std``, built here); routing accuracy is measured on the ``test`` split (mean over tasks), averaged over seeds.
Features are computed once. Writes ``benchmarks/results/router_data_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.router import SPLIT_BLOCK, Router, RouterConfig
from freemerge_pl.zoo.vision.build import normalize_images
from freemerge_pl.zoo.vision.dataset import ZooTaskDataset

RESULTS = Path(__file__).resolve().parent / "results"
POOLS = ("class_token", "class_mean_std")


@torch.no_grad()
def pooled(module: MergedModule, x: torch.Tensor, pool: str) -> torch.Tensor:
    """The router's features of ``x``: the default (the prefix's class token), or ``class_mean_std`` (the class
    token, and the mean and standard deviation of the other tokens: 3× wider; built here, not a setting)."""
    if pool == "class_token":
        return module.model.router_input(x)
    states = module.adapter.prefix_states(module.backbone, x, SPLIT_BLOCK)
    tokens = states[:, 1:].float()
    return torch.cat([states[:, 0].float(), tokens.mean(1), tokens.std(1, correction=0)], dim=-1)


def features(module: MergedModule, images: torch.Tensor, pool: str, batch: int = 512) -> torch.Tensor:
    return torch.cat([pooled(module, normalize_images(images[s:s + batch]), pool)
                      for s in range(0, len(images), batch)])


def fit(feats: torch.Tensor, ids: torch.Tensor, num_tasks: int, seed: int) -> Router:
    """The default head, seeded, trained as ``MergedModule`` trains it (``Router.fit``, the one loop)."""
    torch.manual_seed(seed)
    return Router(num_tasks, RouterConfig(), feats.shape[1]).fit(feats, ids, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", default="20,50,100,200,400,800,1600")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(n) for n in args.per_task.split(",")]
    start = time.perf_counter()
    adapter = ZooViTAdapter()
    module = MergedModule(adapter, method="free_merging")
    module.build(torch.zeros(1, 3, 32, 32))
    tasks = adapter.task_names
    train = [ZooTaskDataset(task=t, split="train").images for t in tasks]
    test = [ZooTaskDataset(task=t, split="test").images for t in tasks]
    test_ids = torch.cat([torch.full((len(x),), k) for k, x in enumerate(test)])
    results: dict[str, dict[int, list[float]]] = {p: {n: [] for n in sizes} for p in POOLS}
    for pool in POOLS:
        train_feats = [features(module, x, pool) for x in train]
        test_feats = features(module, torch.cat(test), pool)
        for seed in range(args.seeds):
            orders = [torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 * seed + k))
                      for k, x in enumerate(train)]
            for n in sizes:
                feats = torch.cat([f[o[:n]] for f, o in zip(train_feats, orders)])
                ids = torch.cat([torch.full((min(n, len(o)),), k) for k, o in enumerate(orders)])
                router = fit(feats, ids, len(tasks), seed)
                with torch.no_grad():
                    routed = router(test_feats).argmax(1)
                per_task = [float((routed[test_ids == k] == k).float().mean()) for k in range(len(tasks))]
                results[pool][n].append(sum(per_task) / len(per_task))
                print(f"{pool} n={n} seed={seed}: routing {results[pool][n][-1]:.3f}", flush=True)
    mean = {p: {n: sum(v) / len(v) for n, v in r.items()} for p, r in results.items()}
    report = {"split_block": module.router_config.split_block, "per_task": sizes, "seeds": args.seeds,
              "routing_accuracy": {p: {str(n): v for n, v in r.items()} for p, r in results.items()},
              "mean": {p: {str(n): v for n, v in r.items()} for p, r in mean.items()},
              "seconds": time.perf_counter() - start}
    lines = ["# Routing accuracy vs the router's data (default zoo, FREE-Merging)", "",
             (f"Router: the default MLP head on the merged backbone's first {report['split_block']} blocks; n "
              f"training images per task from the zoo's train split (seeded, nested), test routing accuracy (mean "
              f"over tasks), mean of {args.seeds} seeds. The zoo's protocol gives the router 20 images per task "
              f"(1 % of the training data); router_compare.py's split has 100. {report['seconds']:.0f} s."), "",
             "| images per task | " + " | ".join(POOLS) + " |", "|---|" + "---|" * len(POOLS)]
    lines += [f"| {n} | " + " | ".join(f"{100 * mean[p][n]:.1f} %" for p in POOLS) + " |" for n in sizes]
    md = "\n".join(lines) + "\n"
    write_json_atomic(report, RESULTS / "router_data_scaling.json")
    write_text_atomic(md, RESULTS / "router_data_scaling.md")
    print(md)


if __name__ == "__main__":
    main()
