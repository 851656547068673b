"""Building the zoo: data, pre-training, linear probes, full fine-tuning, atomic on-disk layout, cache.

Layout of a zoo directory (every file written atomically; the whole directory is built in a staging directory
next to its destination and renamed into place by ``freemerge_pl.zoo.cache``, so an interrupted build never
leaves a half zoo, and the next build resumes from the stages it finished)::

    manifest.json                          recipe (build environment included), recipe_hash, backbone config,
                                           per-task results, every file's size and sha256 (``files``)
    pretrained/model.safetensors           θ_pre: the backbone's state dict (VisionTransformer keys)
    pretrained/config.json
    finetuned/<task>/model.safetensors     θ_k: backbone keys only
    finetuned/<task>/head.safetensors      weight [C, D], bias [C]
    finetuned/<task>/config.json
    data/<task>.safetensors                {train,val,router,test}_x uint8 [N,3,32,32], {…}_y int64 [N]

``val`` is held out of the generated training images before fine-tuning (``holdout_split``): no fine-tuned model
trained on it, nor the router (``router``), so it is the honest data for choosing hyperparameters (tune-val).

Every file is checked against the manifest before use (``verify_zoo``: size always, sha256 once per process and
again when the file changes); a damaged file raises an error naming it and the rebuild command.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from freemerge_pl._version import __version__
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io import file_records, load_state_dict, save_safetensors_atomic, write_json_atomic
from freemerge_pl.zoo import cache
from freemerge_pl.zoo.cache import MANIFEST, Stages
from freemerge_pl.zoo.progress import BuildProgress
from freemerge_pl.zoo.spec import ZooSpec, recipe_hash
from freemerge_pl.zoo.training import adamw_cosine, batches, derived_seed
from freemerge_pl.zoo.vision.generators import SPLITS, TASKS, generate_split, row_hash
from freemerge_pl.zoo.vision.pretext import PATCH_CLASSES, PRETEXT_DIM, PRETEXT_SLICES, pretext_batch
from freemerge_pl.zoo.vision.recipe import EVAL_BATCH_SIZE, SIZES, ZOO_MEAN, ZOO_STD, zoo_recipe

FORMAT = "freemerge_pl.zoo/2"  # 2: the ``files`` table (size + sha256 of every file), the recipe's environment

#: seconds per unit of work on 2 threads (2 shared cores), per size: one generated task image (``data``) or
#: pre-training scene (``scenes``), one training sample (forward + backward), one inference sample (with the
#: probes' L-BFGS). tiny: a whole build's ``seconds_by_kind`` / ``units_by_kind``; default: each kind timed
#: alone, which over the plan sums to 417 s (a full build: 405 s). Only the first estimate uses them; later
#: progress lines use the rates measured during the build.
REFERENCE_THREADS = 2
REFERENCE_SECONDS_PER_UNIT: dict[str, dict[str, float]] = {
    "tiny": {"data": 2.3e-3, "scenes": 1.6e-3, "train": 6e-3, "infer": 4e-3},
    "default": {"data": 2.6e-3, "scenes": 1.0e-3, "train": 2.1e-3, "infer": 7e-4},
}
BACKBONE_CLASS = "open_clip.transformer.VisionTransformer"


# ----------------------------------------------------------------------------------------------- models
def build_vit(config: dict[str, Any]) -> VisionTransformer:
    """The zoo backbone: open_clip's ``VisionTransformer`` (real CLIP's code path); output ``[B, output_dim]``."""
    return VisionTransformer(
        image_size=config["image_size"], patch_size=config["patch_size"], width=config["width"],
        layers=config["layers"], heads=config["heads"], mlp_ratio=config["mlp_ratio"],
        output_dim=config["output_dim"],
    )


def normalize_images(x: Tensor) -> Tensor:
    """uint8 ``[..., 3, H, W]`` → float32 normalised with the zoo's (CLIP's) mean and std."""
    mean = torch.tensor(ZOO_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(ZOO_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean) / std


@torch.no_grad()
def predict_logits(backbone: nn.Module, head: nn.Module, images: Tensor,
                   batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Logits of ``head(backbone(x))`` over uint8 images, in eval mode, in fixed batches."""
    was = backbone.training, head.training
    backbone.eval()
    head.eval()
    out = [head(backbone(normalize_images(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
    backbone.train(was[0])
    head.train(was[1])
    return torch.cat(out) if out else torch.zeros(0, head.out_features)


def evaluate_accuracy(backbone: nn.Module, head: nn.Module, images: Tensor, labels: Tensor,
                      batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy (a fraction) of ``head(backbone(x))`` on uint8 images."""
    pred = predict_logits(backbone, head, images, batch_size).argmax(1)
    return float((pred == labels).sum().item() / max(1, len(labels)))


# ----------------------------------------------------------------------------------------------- training
def _pretext_loss(logits: Tensor, target: Tensor) -> Tensor:
    a, b = PRETEXT_SLICES["presence"]
    loss = F.binary_cross_entropy_with_logits(logits[:, a:b], target[:, a:b])
    for name in ("type", "hue", "cell", "background", "glyph"):
        a, b = PRETEXT_SLICES[name]
        loss = loss + F.cross_entropy(logits[:, a:b], target[:, a:b].argmax(1))
    return loss


def pretrain(model: VisionTransformer, images: Tensor, targets: Tensor, patch_labels: Tensor,
             cfg: dict[str, Any], seed: int, progress: Callable[[int], None] | None = None) -> float:
    """Train the backbone with throwaway pretext heads: scene attributes from the pooled output and the
    per-patch primitive map from the output tokens. Returns the mean loss of the last tenth of steps.
    ``progress(batch_size)`` is called after each step."""
    head = nn.Linear(model.output_dim, PRETEXT_DIM)
    patch_head = nn.Linear(model.ln_post.normalized_shape[0], PATCH_CLASSES)
    steps = cfg["epochs"] * math.ceil(len(images) / cfg["batch_size"])
    params = list(model.parameters()) + list(head.parameters()) + list(patch_head.parameters())
    opt, sched = adamw_cosine(params, cfg, steps)
    model.train()
    model.output_tokens = True
    losses = []
    try:
        for idx in batches(len(images), cfg["batch_size"], cfg["epochs"], seed):
            pooled, tokens = model(normalize_images(images[idx]))
            loss = _pretext_loss(head(pooled), targets[idx]) + F.cross_entropy(
                patch_head(tokens).flatten(0, 1), patch_labels[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(len(idx))
    finally:
        model.output_tokens = False
        model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return float(sum(tail) / len(tail))


@torch.no_grad()
def _features(model: nn.Module, images: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(normalize_images(images[i:i + EVAL_BATCH_SIZE]))
                      for i in range(0, len(images), EVAL_BATCH_SIZE)])


def linear_probe(features: Tensor, labels: Tensor, num_classes: int, cfg: dict[str, Any]) -> nn.Linear:
    """Multinomial logistic regression (L-BFGS, L2) on standardised features, folded into one nn.Linear."""
    mu = features.mean(0)
    sd = features.std(0) + 1e-6
    z = (features - mu) / sd
    w = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg["max_iter"], history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + cfg["l2"] * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(w / sd)
        head.bias.copy_(b - (w / sd) @ mu)
    return head


def finetune(model: VisionTransformer, head: nn.Linear, images: Tensor, labels: Tensor, cfg: dict[str, Any],
             seed: int, progress: Callable[[int], None] | None = None) -> None:
    """Full fine-tuning of the backbone (in place) with the task's head frozen or trained (``cfg['head']``);
    ``progress(batch_size)`` is called after each step."""
    train_head = cfg["head"] == "probe_init_trained"
    head.requires_grad_(train_head)
    params = list(model.parameters()) + (list(head.parameters()) if train_head else [])
    steps = cfg["epochs"] * math.ceil(len(images) / cfg["batch_size"])
    opt, sched = adamw_cosine(params, cfg, steps)
    model.train()
    head.train()
    for idx in batches(len(images), cfg["batch_size"], cfg["epochs"], seed):
        loss = F.cross_entropy(head(model(normalize_images(images[idx]))), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(len(idx))
    model.eval()
    head.eval()
    head.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- building
def _meta(**fields) -> dict[str, str]:
    """safetensors metadata as ONE key: the format stores a hash map, so several keys come out in a
    per-process random order and the file bytes would differ between identical builds."""
    return {"freemerge_pl.zoo": json.dumps(fields, sort_keys=True)}


def holdout_split(labels: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(kept, held)`` of a class-balanced, seeded hold-out of ``n_held`` of ``labels``: the
    held-out count of every class differs by at most one where the classes allow it (each class's members in
    a seeded random order, taken round-robin over the classes)."""
    n = len(labels)
    if not 0 <= n_held <= n:
        raise ConfigError(f"holdout_split: cannot hold out {n_held} of {n} samples")
    perm = np.random.default_rng(np.random.SeedSequence([seed, 4])).permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within a class
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(n) - starts  # position of each sample within its class
    held = np.sort(order[np.lexsort((sorted_labels, rank))[:n_held]])
    kept = np.setdiff1d(np.arange(n), held)
    return kept, held


def _task_data(tmp: Path, task: str, data_cfg: dict[str, int], seed: int,
               progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[bytes] = set()
    n_val = data_cfg.get("n_val", 0)
    for split in SPLITS:
        n = data_cfg[f"n_{split}"] + (n_val if split == "train" else 0)
        x, y = generate_split(task, split, n, seed, exclude=seen, progress=progress)
        seen.update(row_hash(r) for r in x)
        if split == "train":  # the validation split: held out of the training images, before any fine-tuning
            kept, held = holdout_split(y, n_val, seed)
            out["val_x"], out["val_y"] = torch.from_numpy(x[held]), torch.from_numpy(y[held])
            x, y = x[kept], y[kept]
        out[f"{split}_x"] = torch.from_numpy(np.ascontiguousarray(x))
        out[f"{split}_y"] = torch.from_numpy(np.ascontiguousarray(y))
    spec = TASKS[task]
    save_safetensors_atomic(out, tmp / "data" / f"{task}.safetensors",
                            metadata=_meta(role="data", task=task, class_names=list(spec.class_names)))
    return out


def build_plan(recipe: dict[str, Any]) -> dict[str, float]:
    """Units of work of a build per kind: task images and pre-training scenes generated, training samples
    (forward + backward), inference samples (probe features, probe and fine-tuned evaluation)."""
    k, d, pre, ft = len(recipe["tasks"]), recipe["data"], recipe["pretrain"], recipe["finetune"]
    return {"data": k * (d["n_train"] + d.get("n_val", 0) + d["n_router"] + d["n_test"]), "scenes": pre["n_images"],
            "train": pre["n_images"] * pre["epochs"] + k * ft["epochs"] * d["n_train"],
            "infer": k * (d["n_train"] + 2 * d["n_test"])}


def _prior_seconds_per_unit(size: str, threads: int) -> dict[str, float]:
    """``REFERENCE_SECONDS_PER_UNIT`` scaled to ``threads`` (training and inference only; roughly)."""
    ratio = REFERENCE_THREADS / max(1, threads)
    scale = ratio if threads <= REFERENCE_THREADS else ratio ** 0.5
    return {k: v * (scale if k in ("train", "infer") else 1.0) for k, v in REFERENCE_SECONDS_PER_UNIT[size].items()}


def _data_stage(tmp: Path, names: list[str], d_cfg: dict[str, int], seed: int, progress: BuildProgress,
                stages: Stages) -> dict[str, dict[str, Tensor]]:
    """Every task's splits: generated and saved, or read back where an interrupted build saved them."""
    data = {}
    for i, task in enumerate(names):
        n_images = sum(d_cfg[f"n_{split}"] for split in SPLITS) + d_cfg.get("n_val", 0)
        rel = f"data/{task}.safetensors"
        if stages.get(rel) is not None:
            progress.skip("data", n_images)
            data[task] = load_state_dict(tmp / rel)
            continue
        progress.stage(f"generating the data of task {i + 1}/{len(names)} ({task})", "data", n_images)
        data[task] = _task_data(tmp, task, d_cfg, seed, progress.advance)
        stages.done(rel)
    return data


def _pretrain_stage(tmp: Path, recipe: dict[str, Any], seed: int, progress: BuildProgress, stages: Stages,
                    info: dict[str, Any]) -> tuple[VisionTransformer, float]:
    """θ_pre (pre-trained and saved, or read back from an interrupted build) and its final pretext loss."""
    bcfg, n_pre, epochs = recipe["backbone"], recipe["pretrain"]["n_images"], recipe["pretrain"]["epochs"]
    done = stages.get("pretrained")
    if done is not None:
        progress.skip("scenes", n_pre)
        progress.skip("train", n_pre * epochs)
        model = build_vit(bcfg)
        model.load_state_dict(load_state_dict(tmp / "pretrained" / "model.safetensors"), strict=True)
        return model.eval(), float(done["pretext_final_loss"])
    progress.stage(f"generating {n_pre} pre-training scenes", "scenes", n_pre)
    px, pt, pp = pretext_batch(n_pre, seed, patch_grid=bcfg["image_size"] // bcfg["patch_size"],
                                       progress=progress.advance)
    progress.stage("pre-training the backbone", "train", n_pre * epochs)
    torch.manual_seed(derived_seed(seed, 1))
    model = build_vit(bcfg)
    loss = pretrain(model, torch.from_numpy(px), torch.from_numpy(pt), torch.from_numpy(pp), recipe["pretrain"],
                    derived_seed(seed, 2), progress=progress.advance)
    save_safetensors_atomic(model.state_dict(), tmp / "pretrained" / "model.safetensors",
                            metadata=_meta(role="pretrained"))
    write_json_atomic({"backbone": info["backbone"], "normalisation": info["normalisation"],
                       "pretext": {"final_loss": loss, "n_images": n_pre}}, tmp / "pretrained" / "config.json")
    stages.done("pretrained", {"pretext_final_loss": loss})
    return model, loss


def _finetune_stage(tmp: Path, model: VisionTransformer, task: str, k: int, d: dict[str, Tensor],
                    recipe: dict[str, Any], seed: int, progress: BuildProgress, info: dict[str, Any]) -> dict:
    """Task ``k``'s linear probe on θ_pre (``model``), full fine-tuning and evaluation; its files saved."""
    spec, n_tasks = TASKS[task], len(recipe["tasks"])
    progress.stage(f"linear probe of task {k + 1}/{n_tasks} ({task})", "infer", len(d["train_y"]) + len(d["test_y"]))
    features = _features(model, d["train_x"])
    progress.advance(len(d["train_y"]))
    head = linear_probe(features, d["train_y"], spec.num_classes, recipe["probe"])
    probe_acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
    progress.advance(len(d["test_y"]))
    progress.stage(f"fine-tuning task {k + 1}/{n_tasks} ({task})", "train",
                   recipe["finetune"]["epochs"] * len(d["train_y"]))
    finetune(model, head, d["train_x"], d["train_y"], recipe["finetune"], derived_seed(seed, 3, k),
             progress=progress.advance)
    progress.stage(f"evaluating fine-tuned task {k + 1}/{n_tasks} ({task})", "infer", len(d["test_y"]))
    acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
    progress.advance(len(d["test_y"]))
    fdir = tmp / "finetuned" / task
    save_safetensors_atomic(model.state_dict(), fdir / "model.safetensors", metadata=_meta(role="finetuned", task=task))
    save_safetensors_atomic({"weight": head.weight, "bias": head.bias}, fdir / "head.safetensors",
                            metadata=_meta(role="head", task=task))
    write_json_atomic({"task": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                       **info, "head_protocol": recipe["finetune"]["head"], "individual_test_acc": acc,
                       "pretrained_probe_acc": probe_acc}, fdir / "config.json")
    return {"individual_test_acc": acc, "pretrained_probe_acc": probe_acc}


def _write_zoo(tmp: Path, recipe: dict[str, Any], seed: int, progress: BuildProgress,
               stages: Stages) -> dict[str, Any]:
    """Everything of a build, written under ``tmp`` (stages ``stages`` records as finished are reused);
    returns the manifest (``build.seconds`` is the caller's)."""
    info = {"backbone": {"class": BACKBONE_CLASS, "config": recipe["backbone"]},
            "normalisation": {"mean": list(ZOO_MEAN), "std": list(ZOO_STD), "scale": "uint8/255"}}
    names = list(recipe["tasks"])
    data = _data_stage(tmp, names, recipe["data"], seed, progress, stages)
    model, pretext_loss = _pretrain_stage(tmp, recipe, seed, progress, stages, info)
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre_files = ["pretrained/model.safetensors", "pretrained/config.json"]

    tasks = []
    for k, task in enumerate(names):
        d = data[task]
        results = stages.get(f"finetuned/{task}")
        if results is None:
            model.load_state_dict(pre_state)
            results = _finetune_stage(tmp, model, task, k, d, recipe, seed, progress, info)
            stages.done(f"finetuned/{task}", results)
        else:
            progress.skip("infer", len(d["train_y"]) + 2 * len(d["test_y"]))
            progress.skip("train", recipe["finetune"]["epochs"] * len(d["train_y"]))
        spec = TASKS[task]
        tasks.append({"name": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                      "n_train": len(d["train_y"]), "n_val": len(d["val_y"]), "n_router": len(d["router_y"]),
                      "n_test": len(d["test_y"]), **results,
                      "files": [f"finetuned/{task}/{n}" for n in ("model.safetensors", "head.safetensors",
                                                                  "config.json")] + [f"data/{task}.safetensors"]})

    progress.stage("recording sizes and sha256s", "infer", 0)
    records = file_records(tmp, pre_files + [f for t in tasks for f in t["files"]])
    for t in tasks:
        t["files"] = {f: records[f]["sha256"] for f in t["files"]}
    progress.finish()
    return {
        "format": FORMAT, "size": recipe["size"], "seed": seed, "package_version": __version__,
        "recipe": recipe, "recipe_hash": recipe_hash(recipe, seed), **info,
        "pretrained": {"pretext_final_loss": pretext_loss, "files": {f: records[f]["sha256"] for f in pre_files}},
        "tasks": tasks,
        "files": records,
        "build": {"threads": torch.get_num_threads(),
                  "seconds_by_kind": progress.seconds_by_kind(), "units_by_kind": build_plan(recipe),
                  "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                  "machine": platform.machine()},
    }


def summary(manifest: dict) -> str:
    """The table ``python -m freemerge_pl.zoo.vision`` prints: the build, then each task's accuracies."""
    env = manifest["recipe"]["environment"]
    head = (f"zoo {manifest['size']} seed {manifest['seed']}  recipe {manifest['recipe_hash'][:12]}  "
            f"built in {manifest['build']['seconds']:.1f} s on {env['threads']} threads "
            f"(torch {env['torch']}, {env['cpu_capability']})")
    lines = [head,
             f"backbone {manifest['backbone']['class']} {manifest['backbone']['config']}",
             f"{'task':<12} {'classes':>7} {'train':>6} {'test':>5} {'probe':>7} {'finetuned':>9}"]
    for t in manifest["tasks"]:
        lines.append(f"{t['name']:<12} {t['num_classes']:>7} {t['n_train']:>6} {t['n_test']:>5} "
                     f"{100 * t['pretrained_probe_acc']:>6.1f}% {100 * t['individual_test_acc']:>8.1f}%")
    n = len(manifest["tasks"])
    lines.append(f"{'average':<12} {'':>7} {'':>6} {'':>5} "
                 f"{100 * sum(t['pretrained_probe_acc'] for t in manifest['tasks']) / n:>6.1f}% "
                 f"{100 * sum(t['individual_test_acc'] for t in manifest['tasks']) / n:>8.1f}%")
    return "\n".join(lines)


#: the vision zoo, for ``freemerge_pl.zoo.cache``
VISION_ZOO = ZooSpec(name="zoo", module="freemerge_pl.zoo.vision", format=FORMAT, root_env="FREEMERGE_ZOO_ROOT",
                     cache_dir="zoo", sizes=SIZES, recipe=zoo_recipe, plan=build_plan, prior=_prior_seconds_per_unit,
                     write=_write_zoo, summary=summary)


def default_zoo_root(size: str = "default", seed: int = 0) -> Path:
    """``$FREEMERGE_ZOO_ROOT/<size>-seed<seed>`` if that variable is set, else the user cache directory."""
    return VISION_ZOO.default_root(size, seed)


def resolve_zoo_root(root: str | Path | None, size: str = "default", seed: int = 0) -> Path:
    return VISION_ZOO.resolve_root(root, size, seed)


def rebuild_hint(root: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
    return VISION_ZOO.rebuild_hint(root, manifest)


def read_manifest(root: str | Path) -> dict[str, Any]:
    return cache.read_manifest(root, VISION_ZOO)


def verify_zoo(root: str | Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the zoo's files (``names``: relative paths; default all) against its manifest (``cache.verify``)."""
    return cache.verify(VISION_ZOO, root, names)


def build_zoo(dest: str | Path, size: str = "default", seed: int = 0, reason: str | None = None) -> Path:
    """Build a zoo at ``dest``, resuming an interrupted build of the same recipe (``cache.build_zoo``)."""
    return cache.build_zoo(VISION_ZOO, dest, size, seed, reason)


def ensure_zoo(root: str | Path | None = None, size: str = "default", seed: int = 0, rebuild: bool = False) -> Path:
    """The zoo directory, built first if it is missing, incomplete or of another recipe or build environment,
    or when ``rebuild``; every file checked against the manifest (``cache.ensure``)."""
    return cache.ensure(VISION_ZOO, root, size, seed, rebuild)


def load_task_data(root: str | Path, task: str) -> dict[str, Tensor]:
    """The task's tensors (``{train,val,router,test}_x`` uint8 [N,3,32,32], ``…_y`` int64), checked against the
    manifest first (``verify_zoo``)."""
    root = Path(root)
    rel = f"data/{task}.safetensors"
    if not (root / rel).is_file():
        raise FreeMergeError(f"zoo data file {root / rel} does not exist (task {task!r}); {rebuild_hint(root)}")
    verify_zoo(root, names=[rel])
    return load_state_dict(root / rel)


__all__ = ["FORMAT", "MANIFEST", "VISION_ZOO", "build_plan", "build_vit", "build_zoo", "default_zoo_root",
           "ensure_zoo", "evaluate_accuracy", "finetune", "holdout_split", "linear_probe", "load_task_data",
           "normalize_images", "predict_logits", "pretrain", "read_manifest", "rebuild_hint", "resolve_zoo_root",
           "summary", "verify_zoo"]
