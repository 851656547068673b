"""Building the zoo: data, pre-training, linear probes, full fine-tuning, atomic on-disk layout, cache.

Layout of a zoo directory (every file written atomically; the whole directory is built under a temporary
name next to its destination and renamed into place, so an interrupted build never leaves a half zoo)::

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

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
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
from freemerge_pl.io import (
    file_records,
    load_state_dict,
    save_safetensors_atomic,
    verify_manifest,
    write_json_atomic,
)
from freemerge_pl.progress import format_seconds
from freemerge_pl.zoo.vision import generators
from freemerge_pl.zoo.vision.progress import BuildProgress, rough_duration
from freemerge_pl.zoo.vision.recipe import (
    ADAMW_BETAS,
    EVAL_BATCH_SIZE,
    ZOO_MEAN,
    ZOO_STD,
    check_size,
    default_zoo_root,
    recipe_hash,
    zoo_recipe,
)

#: the zoo's logger: the build's progress lines (INFO), why a zoo is rebuilt
log = logging.getLogger("freemerge_pl.zoo.vision")

MANIFEST = "manifest.json"
FORMAT = "freemerge_pl.zoo.vision/2"  # 2: the ``files`` table (size + sha256 of every file), the recipe's environment

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
def _derived_seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _optimizer(params, cfg: dict[str, Any], steps: int):
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=ADAMW_BETAS, weight_decay=cfg["weight_decay"])
    warm = max(1, round(cfg["warmup_fraction"] * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batches(n: int, batch_size: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def _pretext_loss(logits: Tensor, target: Tensor) -> Tensor:
    a, b = generators.PRETEXT_SLICES["presence"]
    loss = F.binary_cross_entropy_with_logits(logits[:, a:b], target[:, a:b])
    for name in ("type", "hue", "cell", "background", "glyph"):
        a, b = generators.PRETEXT_SLICES[name]
        loss = loss + F.cross_entropy(logits[:, a:b], target[:, a:b].argmax(1))
    return loss


def pretrain(model: VisionTransformer, images: Tensor, targets: Tensor, patch_labels: Tensor,
             cfg: dict[str, Any], seed: int, progress: Callable[[int], None] | None = None) -> float:
    """Train the backbone with throwaway pretext heads: scene attributes from the pooled output and the
    per-patch primitive map from the output tokens. Returns the mean loss of the last tenth of steps.
    ``progress(batch_size)`` is called after each step."""
    head = nn.Linear(model.output_dim, generators.PRETEXT_DIM)
    patch_head = nn.Linear(model.ln_post.normalized_shape[0], generators.PATCH_CLASSES)
    steps = cfg["epochs"] * math.ceil(len(images) / cfg["batch_size"])
    params = list(model.parameters()) + list(head.parameters()) + list(patch_head.parameters())
    opt, sched = _optimizer(params, cfg, steps)
    model.train()
    model.output_tokens = True
    losses = []
    try:
        for idx in _batches(len(images), cfg["batch_size"], cfg["epochs"], seed):
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
    opt, sched = _optimizer(params, cfg, steps)
    model.train()
    head.train()
    for idx in _batches(len(images), cfg["batch_size"], cfg["epochs"], seed):
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
@contextlib.contextmanager
def _deterministic(threads: int):
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])


def _meta(**fields) -> dict[str, str]:
    """safetensors metadata as ONE key: the format stores a hash map, so several keys come out in a
    per-process random order and the file bytes would differ between identical builds."""
    return {"freemerge_pl.zoo.vision": json.dumps(fields, sort_keys=True)}


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
    for split in generators.SPLITS:
        n = data_cfg[f"n_{split}"] + (n_val if split == "train" else 0)
        x, y = generators.generate_split(task, split, n, seed, exclude=seen, progress=progress)
        seen.update(generators.row_hash(r) for r in x)
        if split == "train":  # the validation split: held out of the training images, before any fine-tuning
            kept, held = holdout_split(y, n_val, seed)
            out["val_x"], out["val_y"] = torch.from_numpy(x[held]), torch.from_numpy(y[held])
            x, y = x[kept], y[kept]
        out[f"{split}_x"] = torch.from_numpy(np.ascontiguousarray(x))
        out[f"{split}_y"] = torch.from_numpy(np.ascontiguousarray(y))
    spec = generators.TASKS[task]
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


def estimate_build_seconds(size: str = "default", threads: int | None = None) -> float:
    """A rough duration of a build of ``size`` on ``threads`` threads (default ``build_threads()``)."""
    recipe = zoo_recipe(size, threads)
    prior = _prior_seconds_per_unit(size, recipe["environment"]["threads"])
    return sum(units * prior[k] for k, units in build_plan(recipe).items())


def _write_zoo(tmp: Path, recipe: dict[str, Any], seed: int, progress: BuildProgress) -> dict[str, Any]:
    """Everything of a build, written under ``tmp``; returns the manifest."""
    start = time.perf_counter()
    bcfg = recipe["backbone"]
    normalisation = {"mean": list(ZOO_MEAN), "std": list(ZOO_STD), "scale": "uint8/255"}
    names = list(recipe["tasks"])
    n_tasks = len(names)
    d_cfg = recipe["data"]

    data = {}
    for i, task in enumerate(names):
        progress.stage(f"generating the data of task {i + 1}/{n_tasks} ({task})", "data",
                       sum(d_cfg[f"n_{split}"] for split in generators.SPLITS) + d_cfg.get("n_val", 0))
        data[task] = _task_data(tmp, task, d_cfg, seed, progress.advance)

    n_pre = recipe["pretrain"]["n_images"]
    progress.stage(f"generating {n_pre} pre-training scenes", "scenes", n_pre)
    px, pt, pp = generators.pretext_batch(n_pre, seed, patch_grid=bcfg["image_size"] // bcfg["patch_size"],
                                          progress=progress.advance)
    progress.stage("pre-training the backbone", "train", n_pre * recipe["pretrain"]["epochs"])
    torch.manual_seed(_derived_seed(seed, 1))
    model = build_vit(bcfg)
    pretext_loss = pretrain(model, torch.from_numpy(px), torch.from_numpy(pt), torch.from_numpy(pp),
                            recipe["pretrain"], _derived_seed(seed, 2), progress=progress.advance)
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone_info = {"class": BACKBONE_CLASS, "config": bcfg}
    save_safetensors_atomic(pre_state, tmp / "pretrained" / "model.safetensors", metadata=_meta(role="pretrained"))
    write_json_atomic({"backbone": backbone_info, "normalisation": normalisation,
                       "pretext": {"final_loss": pretext_loss, "n_images": n_pre}}, tmp / "pretrained" / "config.json")
    pre_files = ["pretrained/model.safetensors", "pretrained/config.json"]

    tasks = []
    for k, task in enumerate(names):
        spec = generators.TASKS[task]
        d = data[task]
        model.load_state_dict(pre_state)
        progress.stage(f"linear probe of task {k + 1}/{n_tasks} ({task})", "infer", len(d["train_y"]) + len(d["test_y"]))
        features = _features(model, d["train_x"])
        progress.advance(len(d["train_y"]))
        head = linear_probe(features, d["train_y"], spec.num_classes, recipe["probe"])
        probe_acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
        progress.advance(len(d["test_y"]))
        progress.stage(f"fine-tuning task {k + 1}/{n_tasks} ({task})", "train",
                       recipe["finetune"]["epochs"] * len(d["train_y"]))
        finetune(model, head, d["train_x"], d["train_y"], recipe["finetune"], _derived_seed(seed, 3, k),
                 progress=progress.advance)
        progress.stage(f"evaluating fine-tuned task {k + 1}/{n_tasks} ({task})", "infer", len(d["test_y"]))
        acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
        progress.advance(len(d["test_y"]))
        fdir = tmp / "finetuned" / task
        save_safetensors_atomic(model.state_dict(), fdir / "model.safetensors",
                                metadata=_meta(role="finetuned", task=task))
        save_safetensors_atomic({"weight": head.weight, "bias": head.bias}, fdir / "head.safetensors",
                                metadata=_meta(role="head", task=task))
        write_json_atomic({"task": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                           "backbone": backbone_info, "normalisation": normalisation,
                           "head_protocol": recipe["finetune"]["head"], "individual_test_acc": acc,
                           "pretrained_probe_acc": probe_acc}, fdir / "config.json")
        tasks.append({"name": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                      "n_train": len(d["train_y"]), "n_val": len(d["val_y"]), "n_router": len(d["router_y"]),
                      "n_test": len(d["test_y"]),
                      "individual_test_acc": acc, "pretrained_probe_acc": probe_acc,
                      "files": [f"finetuned/{task}/{n}" for n in ("model.safetensors", "head.safetensors",
                                                                  "config.json")] + [f"data/{task}.safetensors"]})

    progress.stage("recording sizes and sha256s", "infer", 0)
    records = file_records(tmp, pre_files + [f for t in tasks for f in t["files"]])
    for t in tasks:
        t["files"] = {f: records[f]["sha256"] for f in t["files"]}
    progress.finish()
    return {
        "format": FORMAT, "size": recipe["size"], "seed": seed, "package_version": __version__,
        "recipe": recipe, "recipe_hash": recipe_hash(recipe, seed), "backbone": backbone_info,
        "normalisation": normalisation,
        "pretrained": {"pretext_final_loss": pretext_loss, "files": {f: records[f]["sha256"] for f in pre_files}},
        "tasks": tasks,
        "files": records,
        "build": {"seconds": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
                  "seconds_by_kind": progress.seconds_by_kind(), "units_by_kind": build_plan(recipe),
                  "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                  "machine": platform.machine()},
    }


def build_zoo(dest: str | Path, size: str = "default", seed: int = 0, reason: str | None = None) -> Path:
    """Build a zoo at ``dest`` (replacing an out-of-date one) via a temporary directory and one rename.

    Logs (logger ``freemerge_pl.zoo.vision``, INFO) where and roughly how long first, then a line per stage and one
    at least every ``$FREEMERGE_PROGRESS_SECONDS`` (10 s) with the elapsed time and the time left."""
    check_size(size)
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise ConfigError(f"zoo root {dest} exists, is not empty and holds no {MANIFEST}: refusing to replace it")
    recipe = zoo_recipe(size)
    threads = recipe["environment"]["threads"]
    progress = BuildProgress(build_plan(recipe), _prior_seconds_per_unit(size, threads), log)
    log.info("building the offline zoo (size %s, seed %d) at %s%s; built once, later runs reuse it; expect %s on "
             "%d thread%s (a progress line every %s)", size, seed, dest, f" ({reason})" if reason else "",
             rough_duration(progress.estimate_total_s()), threads, "" if threads == 1 else "s",
             f"{progress.interval_s:g} s")
    def write(tmp: Path) -> dict[str, Any]:
        with _deterministic(threads), progress:
            return _write_zoo(tmp, recipe, seed, progress)

    manifest = build_atomically(dest, write)
    log.info("zoo %s seed %d built at %s in %s", size, seed, dest, format_seconds(manifest["build"]["seconds"]))
    return dest


def build_atomically(dest: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``write(tmp)`` into a fresh hidden sibling of ``dest``, then its returned manifest (``MANIFEST``, last),
    then ``dest`` replaced by it whole (a previous build moved aside and removed after the rename); on any error
    or interrupt the sibling is removed and ``dest`` is untouched. Returns the manifest. (Zoo and text zoo.)"""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        manifest = write(tmp)
        write_json_atomic(manifest, tmp / MANIFEST)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "zoo")
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FreeMergeError(f"{path} does not exist: build the zoo first (ensure_zoo)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FreeMergeError(f"{path} is damaged (not valid JSON: {err}); delete {Path(root)} to rebuild the "
                             f"zoo") from None
    if not isinstance(manifest, dict):
        raise FreeMergeError(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object); delete "
                             f"{Path(root)} to rebuild the zoo")
    return manifest


def rebuild_hint(root: str | Path, manifest: Mapping[str, Any] | None = None, *, what: str = "zoo",
                 module: str = "freemerge_pl.zoo.vision") -> str:
    """How to rebuild the ``what`` at ``root`` (the ``python -m module`` command line, with its size and seed
    when known; the text zoo passes its own)."""
    m = manifest or {}
    size, seed = m.get("size", "default"), m.get("seed", 0)
    return (f"rebuild the {what}: python -m {module} --size {size} --seed {seed} --root {Path(root)} "
            f"--rebuild (or delete {Path(root)})")


def verify_zoo(root: str | Path, names: Iterable[str] | None = None, *, fmt: str = FORMAT, what: str = "zoo",
               module: str = "freemerge_pl.zoo.vision") -> dict[str, Any]:
    """Check the zoo's files (``names``: relative paths; default all) against its manifest's ``files`` table
    (``freemerge_pl.io.verify_manifest``: size always, sha256 once per process and when a file changes);
    returns the manifest. A damaged or missing file raises ``FreeMergeError`` naming it and the rebuild
    (``fmt``/``what``/``module``: the manifest format and the names of another zoo, e.g. the text zoo's)."""
    root = Path(root)
    m = read_manifest(root)
    hint = rebuild_hint(root, m, what=what, module=module)
    if m.get("format") != fmt or not isinstance(m.get("files"), dict):
        raise FreeMergeError(f"{root / MANIFEST} has format {m.get('format')!r}; this version reads {fmt!r}; "
                             f"{hint}")
    verify_manifest(root, m["files"], remedy=hint, names=names)
    return m


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out if out else {prefix: d}


def recipe_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    """What differs between two recipes, as ``key: old -> new`` (at most ``limit`` entries)."""
    a, b = _flat(old if isinstance(old, dict) else {}), _flat(new)
    diff = [f"{k.rstrip('.')}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]
    return "; ".join(diff[:limit]) + (f"; {len(diff) - limit} more" if len(diff) > limit else "") if diff \
        else "same recipe, another seed or hash"


def stale_reason(root: Path, recipe: dict[str, Any], want_hash: str, *, what: str = "zoo",
                 fmt: str = FORMAT) -> str | None:
    """Why the ``what`` at ``root`` must be (re)built for ``recipe`` (hash ``want_hash``), or None if it is
    current: none there, an unreadable or older manifest (format ``fmt``), another recipe or build environment,
    or missing files. (The text zoo passes its own ``what`` and ``fmt``.)"""
    if not (root / MANIFEST).exists():
        return f"no {what} there yet"
    try:
        m = read_manifest(root)
    except FreeMergeError as err:
        return str(err)
    if m.get("format") != fmt:
        return f"its manifest has format {m.get('format')!r}, this version writes {fmt!r}"
    if m.get("recipe_hash") != want_hash:
        return f"it was built with another recipe or build environment: {recipe_changes(m.get('recipe'), recipe)}"
    files = m.get("files")
    if not isinstance(files, dict):
        return "its manifest lists no files"
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        return f"{len(missing)} of its files are missing ({missing[0]}{', ...' if len(missing) > 1 else ''})"
    return None


@contextlib.contextmanager
def _build_lock(dest: Path):
    """An exclusive lock next to ``dest`` (POSIX ``flock``), so concurrent processes build once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(dest.parent / f".{dest.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_zoo_root(root: str | Path | None, size: str = "default", seed: int = 0) -> Path:
    return Path(root).expanduser().absolute() if root else default_zoo_root(size, seed).absolute()


def ensure_zoo(root: str | Path | None = None, size: str = "default", seed: int = 0, rebuild: bool = False) -> Path:
    """The zoo directory, built first if it is missing, incomplete, or of another recipe or build environment
    (its recipe hash differs), or when ``rebuild``; then every file is checked against the manifest
    (``verify_zoo``): a damaged file raises an error naming it instead of giving wrong accuracies."""
    dest = resolve_zoo_root(root, size, seed)
    recipe = zoo_recipe(size)
    return ensure_built(dest, lambda: stale_reason(dest, recipe, recipe_hash(recipe, seed)),
                        lambda reason: build_zoo(dest, size, seed, reason=reason), verify_zoo, rebuild)


def ensure_built(dest: Path, stale: Callable[[], str | None], build: Callable[[str], Any],
                 verify: Callable[[Path], Any], rebuild: bool = False) -> Path:
    """``dest`` built when ``stale()`` names a reason (or when ``rebuild``), under the build lock and asked again
    inside it (another process may have built it meanwhile), then ``verify``-ed; shared by both zoos."""
    if rebuild or stale() is not None:
        with _build_lock(dest):
            reason = "a rebuild was asked for" if rebuild else stale()
            if reason is not None:
                build(reason)
    verify(dest)
    return dest


def load_task_data(root: str | Path, task: str) -> dict[str, Tensor]:
    """The task's tensors (``{train,val,router,test}_x`` uint8 [N,3,32,32], ``…_y`` int64), checked against the
    manifest first (``verify_zoo``)."""
    root = Path(root)
    rel = f"data/{task}.safetensors"
    if not (root / rel).is_file():
        raise FreeMergeError(f"zoo data file {root / rel} does not exist (task {task!r}); {rebuild_hint(root)}")
    verify_zoo(root, names=[rel])
    return load_state_dict(root / rel)
