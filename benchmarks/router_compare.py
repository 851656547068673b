"""Routers compared on the default zoo: routing accuracy and routed FREE-Merging accuracy vs oracle FREE.

    python benchmarks/router_compare.py [--size default] [--threshold-grid 0,0.5,0.7,0.9]

One FREE-Merging merge (the zoo config's defaults); for each feature source × head a router is fitted on the
zoo's ``router`` split (100 images per task that no fine-tuned model trained on) and scored on the ``val``
split (held out before fine-tuning: the data the default is chosen on) and on ``test`` (reported, never used to
choose). Per router: routing accuracy, routed FREE accuracy (dataset heads, top-1, Alg. 1), the gap to
oracle FREE (true task → its expert), the merged backbone alone (no expert), and routed FREE's throughput on
mixed-task batches relative to the merged backbone's (measured in turns, as ``inference_overhead.py``). The
choice is the best val routed FREE. A prefix depth other than the product's (``router.SPLIT_BLOCK``) is a
``RoutedModel`` built here directly. Writes ``benchmarks/results/router_compare.{json,md}``, the chosen router's
routing confusion matrix
(``router_compare_confusion.{md,png}``, test split) and every router's (``router_compare_confusions.md``,
``router_confusions/<router>.png``).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from freemerge_pl.callbacks.routing import plot_routing_confusion
from inference_overhead import mixed_batches, throughput

from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
from freemerge_pl.io import write_json_atomic, write_text_atomic
from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.routed import RoutedModel
from freemerge_pl.lightning.router import (
    AUTO_IMAGE_SOURCE,
    SPLIT_BLOCK,
    RouterConfig,
    routing_confusion_markdown,
)
from freemerge_pl.zoo.vision.build import normalize_images

RESULTS = Path(__file__).resolve().parent / "results"
ROUTERS: list[dict] = [
    *({"feature_source": "input", "head": h} for h in ("linear", "mlp")),
    *({"feature_source": "backbone_prefix", "split_block": b, "head": h} for b in (1, 2, 3) for h in ("linear", "mlp")),
    *({"feature_source": "backbone", "head": h} for h in ("linear", "mlp")),
    *({"feature_source": "pretrained_backbone", "split_block": b, "head": h} for b in (0, 2)
      for h in ("linear", "mlp")),
]


def split_tensors(dm: MultiTaskDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and task ids of every task's ``split`` (``val`` = tune-val, ``test``)."""
    xs, ys, ts = [], [], []
    for i, name in enumerate(dm.task_names):
        ds = dm.tune_dataset(name).dataset if split == "val" else dm._test[name]
        xs.append(normalize_images(ds.images))
        ys.append(ds.labels)
        ts.append(torch.full((len(ds.labels),), i))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


@torch.no_grad()
def scores(module: RoutedModel, data, ids=None, batch: int = 512) -> dict[str, float]:
    """Accuracy with the dataset's head (mean over tasks) for routing ``ids`` (None: the router's own;
    ``"oracle"``: the true task; ``"none"``: the backbone alone), and routing accuracy."""
    x, y, t = data
    correct = torch.zeros(len(y), dtype=torch.bool)
    routed = torch.empty(len(y), dtype=torch.long)
    for s in range(0, len(y), batch):
        xb, tb = x[s:s + batch], t[s:s + batch]
        if ids == "none":
            i, feats = torch.zeros(len(tb), 1, dtype=torch.long), module.backbone(xb)
        else:
            feats, i, _ = module.routed_features(xb, tb if ids == "oracle" else None)
        routed[s:s + batch] = i[:, 0]
        for task in tb.unique().tolist():
            sel = tb == task
            pred = module.head_outputs(feats[sel], task).argmax(-1)
            correct[s:s + batch][sel] = pred == y[s:s + batch][sel]
    per_task = [float(correct[t == k].float().mean()) for k in range(int(t.max()) + 1)]
    route_acc = [float((routed[t == k] == k).float().mean()) for k in range(int(t.max()) + 1)]
    return {"accuracy": sum(per_task) / len(per_task), "routing_accuracy": sum(route_acc) / len(route_acc),
            "routed": routed}


def confusion(task_ids: torch.Tensor, routed: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Routing confusion counts ``[true task, routed task]``."""
    return torch.zeros(num_tasks, num_tasks, dtype=torch.long).index_put_(
        (task_ids, routed), torch.ones(len(routed), dtype=torch.long), accumulate=True)


def slug(text: str) -> str:
    """A file name for a router's label."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def use_router(merged: MergedModule, r: dict, router_data, example) -> tuple[RoutedModel, float]:
    """The merged model with router ``r`` (its prefix depth: ``split_block``), fitted on ``router_data``."""
    config = RouterConfig(**{k: v for k, v in r.items() if k != "split_block"})
    model = RoutedModel(merged.adapter, merged.task_names, merged.backbone, list(merged.task_modules),
                        dict(merged.model.shared_modules), config, example_input=example,
                        split_block=r.get("split_block", SPLIT_BLOCK))
    start = time.perf_counter()
    model.fit_router(router_data)
    return model, time.perf_counter() - start


def label(r: dict) -> str:
    split = f"[{r['split_block']}]" if "split_block" in r else ""
    return f"{r['feature_source']}{split} + {r['head']}"


def mixed_throughput(model: RoutedModel, batches) -> float:
    """Routed FREE's images/s on mixed-task batches over the merged backbone's, measured in turns
    (``inference_overhead.throughput``; the weight swap, the product's expert path)."""
    backbone, routed = throughput([lambda x, t: model.backbone(x), lambda x, t: model(x)], batches, repeats=3)
    return routed / backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default")
    parser.add_argument("--speed-batches", type=int, default=10,
                        help="mixed batches of 128 test images for each router's throughput ratio")
    args = parser.parse_args()
    torch.manual_seed(0)
    adapter = ZooViTAdapter(size=args.size)
    tasks = [TaskConfig(name=t, dataset="freemerge_pl.zoo.vision.ZooTaskDataset",
                        dataset_args={"task": t, "size": args.size}, train_args={"split": "router"})
             for t in adapter.task_names]
    dm = MultiTaskDataModule(tasks, router_fraction=1.0, min_router_samples=1, tune_fraction=0.5)
    dm.setup()
    merged = MergedModule(adapter, router=RouterConfig(feature_source="input"))
    router_data = dm.router_dataset()
    example = router_data[0][0][None]
    merged.build(example)
    module = merged.model
    data = {s: split_tensors(dm, s) for s in ("val", "test")}
    batches = mixed_batches(dm, args.speed_batches, 128)
    base = {s: {"oracle_free": scores(module, d, "oracle")["accuracy"],
                "backbone_alone": scores(module, d, "none")["accuracy"]} for s, d in data.items()}
    rows = []
    for r in ROUTERS:
        model, seconds = use_router(merged, r, router_data, example)
        row = {"router": label(r), "config": r, "fit_seconds": seconds,
               "mixed_throughput_ratio": mixed_throughput(model, batches)}
        for s, d in data.items():
            out = scores(model, d)
            row[s] = {"routing_accuracy": out["routing_accuracy"], "routed_free": out["accuracy"],
                      "gap_to_oracle": base[s]["oracle_free"] - out["accuracy"]}
            if s == "test":
                row["routing_confusion_test"] = confusion(d[2], out["routed"], len(dm.task_names)).tolist()
        rows.append(row)
        print(f"{row['router']:36s} val routing {row['val']['routing_accuracy']:.3f} free "
              f"{row['val']['routed_free']:.4f} | test routing {row['test']['routing_accuracy']:.3f} free "
              f"{row['test']['routed_free']:.4f} | mixed throughput {row['mixed_throughput_ratio']:.2f}", flush=True)
    # the choice: best routed FREE on val (ties: higher routing accuracy, then the cheaper: listed first)
    best = max(rows, key=lambda r: (round(r["val"]["routed_free"], 4), r["val"]["routing_accuracy"]))
    test_out = scores(use_router(merged, best["config"], router_data, example)[0], data["test"])
    K = len(dm.task_names)
    chosen_confusion = confusion(data["test"][2], test_out["routed"], K)
    report = {"size": args.size, "method": merged.method, "task_names": dm.task_names,
              "router_data": "zoo router split (100/task, never fine-tuned on)", "choose_on": "val",
              "baselines": base, "routers": rows,
              "chosen": {"router": best["router"], "config": best["config"]},
              "chosen_test": {"routing_accuracy": test_out["routing_accuracy"], "routed_free": test_out["accuracy"],
                              "gap_to_oracle": base["test"]["oracle_free"] - test_out["accuracy"]},
              "routing_confusion_test": chosen_confusion.tolist()}
    default_label = label({"feature_source": AUTO_IMAGE_SOURCE, "split_block": SPLIT_BLOCK,
                           "head": RouterConfig().head})
    lines = [f"# Routers on the {args.size} zoo (FREE-Merging, top-1)", "",
             (f"router fitted on the zoo's router split; the best chosen on val (the config default is "
              f"{default_label}); oracle FREE val {base['val']['oracle_free']:.4f} / test "
              f"{base['test']['oracle_free']:.4f}; merged backbone alone val {base['val']['backbone_alone']:.4f} / "
              f"test {base['test']['backbone_alone']:.4f}"), "",
             (f"mixed throughput: routed FREE / merged backbone images/s on {args.speed_batches} mixed-task batches "
              f"of 128 test images, measured in turns, the weight swap, {torch.get_num_threads()} CPU threads "
              f"(goal ≥ 0.90; the same router moved by up to 0.1 between runs on these VMs)"), "",
             ("| router | val routing | val routed FREE | val gap | test routing | test routed FREE | test gap | "
              "mixed throughput | fit s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['router']} | {r['val']['routing_accuracy']:.3f} | {r['val']['routed_free']:.4f} | "
                     f"{r['val']['gap_to_oracle']:+.4f} | {r['test']['routing_accuracy']:.3f} | "
                     f"{r['test']['routed_free']:.4f} | {r['test']['gap_to_oracle']:+.4f} | "
                     f"{r['mixed_throughput_ratio']:.2f} | {r['fit_seconds']:.1f} |")
    c = report["chosen_test"]
    lines += ["", (f"chosen: {best['router']} → test routing accuracy "
                   f"{c['routing_accuracy']:.4f}, routed FREE {c['routed_free']:.4f}, gap to oracle "
                   f"{c['gap_to_oracle']:+.4f} (goals: routing ≥ 0.90, gap ≤ 0.01), mixed throughput "
                   f"{best['mixed_throughput_ratio']:.2f}"), "",
              "routing confusion (test):", "", routing_confusion_markdown(chosen_confusion.tolist(), dm.task_names),
              "every router's routing confusion (test): `router_compare_confusions.md`, PNGs in `router_confusions/`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, RESULTS / "router_compare.json")
    write_text_atomic("\n".join(lines) + "\n", RESULTS / "router_compare.md")
    write_text_atomic(routing_confusion_markdown(chosen_confusion.tolist(), dm.task_names),
                      RESULTS / "router_compare_confusion.md")
    every = [f"# Routing confusion of every router on the {args.size} zoo's test split", ""]
    for r in rows:
        every += [f"## {r['router']}", "", routing_confusion_markdown(r["routing_confusion_test"], dm.task_names)]
    write_text_atomic("\n".join(every), RESULTS / "router_compare_confusions.md")
    folder = RESULTS / "router_confusions"
    folder.mkdir(exist_ok=True)
    pngs = [(r["routing_confusion_test"], r["router"], folder / f"{slug(r['router'])}.png") for r in rows]
    for stale in set(folder.glob("*.png")) - {path for _, _, path in pngs}:  # routers no longer compared
        stale.unlink()
    for matrix, title, path in [(chosen_confusion.tolist(), best["router"], RESULTS / "router_compare_confusion.png"),
                                *pngs]:
        fig = plot_routing_confusion(matrix, dm.task_names, path, title=title)
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
    print("\n".join(lines[-(K + 8):]))
    print(f"default router {best['router']}: test routing accuracy {c['routing_accuracy']:.3f}, "
          f"routed FREE {c['routed_free']:.4f} vs oracle {base['test']['oracle_free']:.4f}")


if __name__ == "__main__":
    main()
