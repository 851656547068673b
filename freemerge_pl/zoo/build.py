"""Building the zoo: data, pre-training, linear probes, full fine-tuning, atomic on-disk layout, cache.

Layout of a zoo directory (every file written atomically; the whole directory is built under a temporary
name next to its destination and renamed into place, so an interrupted build never leaves a half zoo)::

    manifest.json                          recipe, recipe_hash, backbone config, per-task results, sha256s
    pretrained/model.safetensors           θ_pre: the backbone's state dict (VisionTransformer keys)
    pretrained/config.json
    finetuned/<task>/model.safetensors     θ_k: backbone keys only
    finetuned/<task>/head.safetensors      weight [C, D], bias [C]
    finetuned/<task>/config.json
    data/<task>.safetensors                {train,router,test}_x uint8 [N,3,32,32], {…}_y int64 [N]
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

import freemerge_pl
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io import save_safetensors_atomic, sha256_file, write_json_atomic
from freemerge_pl.zoo import generators
from freemerge_pl.zoo.recipe import (
    ADAMW_BETAS,
    EVAL_BATCH_SIZE,
    ZOO_MEAN,
    ZOO_STD,
    check_size,
    default_zoo_root,
    recipe_hash,
    zoo_recipe,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "freemerge_pl.zoo/1"
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
             cfg: dict[str, Any], seed: int) -> float:
    """Train the backbone with throwaway pretext heads: scene attributes from the pooled output and the
    per-patch primitive map from the output tokens. Returns the mean loss of the last tenth of steps."""
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
             seed: int) -> None:
    """Full fine-tuning of the backbone (in place) with the task's head frozen or trained (``cfg['head']``)."""
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
    model.eval()
    head.eval()
    head.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- building
def build_threads() -> int:
    """CPU threads used by a build: ``$FREEMERGE_ZOO_THREADS`` or the CPUs this process may use (≤ 8)."""
    env = os.environ.get("FREEMERGE_ZOO_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


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


def _rel_sha(root: Path, paths: list[Path]) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in paths}


def _meta(**fields) -> dict[str, str]:
    """safetensors metadata as ONE key: the format stores a hash map, so several keys come out in a
    per-process random order and the file bytes would differ between identical builds."""
    return {"freemerge_pl.zoo": json.dumps(fields, sort_keys=True)}


def _task_data(tmp: Path, task: str, data_cfg: dict[str, int], seed: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[bytes] = set()
    for split in generators.SPLITS:
        x, y = generators.generate_split(task, split, data_cfg[f"n_{split}"], seed, exclude=seen)
        seen.update(generators.row_hash(r) for r in x)
        out[f"{split}_x"] = torch.from_numpy(x)
        out[f"{split}_y"] = torch.from_numpy(y)
    spec = generators.TASKS[task]
    save_safetensors_atomic(out, tmp / "data" / f"{task}.safetensors",
                            metadata=_meta(role="data", task=task, class_names=list(spec.class_names)))
    return out


def _write_zoo(tmp: Path, size: str, seed: int) -> dict[str, Any]:
    """Everything of a build, written under ``tmp``; returns the manifest."""
    start = time.perf_counter()
    recipe = zoo_recipe(size)
    bcfg = recipe["backbone"]
    normalisation = {"mean": list(ZOO_MEAN), "std": list(ZOO_STD), "scale": "uint8/255"}

    log.info("zoo %s seed %d: generating data for %d tasks", size, seed, len(recipe["tasks"]))
    data = {t: _task_data(tmp, t, recipe["data"], seed) for t in recipe["tasks"]}

    n_pre = recipe["pretrain"]["n_images"]
    log.info("zoo %s: pre-training on %d procedural scenes", size, n_pre)
    px, pt, pp = generators.pretext_batch(n_pre, seed, patch_grid=bcfg["image_size"] // bcfg["patch_size"])
    torch.manual_seed(_derived_seed(seed, 1))
    model = build_vit(bcfg)
    pretext_loss = pretrain(model, torch.from_numpy(px), torch.from_numpy(pt), torch.from_numpy(pp),
                            recipe["pretrain"], _derived_seed(seed, 2))
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone_info = {"class": BACKBONE_CLASS, "config": bcfg}
    pre_files = [save_safetensors_atomic(pre_state, tmp / "pretrained" / "model.safetensors",
                                         metadata=_meta(role="pretrained")),
                 write_json_atomic({"backbone": backbone_info, "normalisation": normalisation,
                                    "pretext": {"final_loss": pretext_loss, "n_images": n_pre}},
                                   tmp / "pretrained" / "config.json")]

    tasks = []
    for k, task in enumerate(recipe["tasks"]):
        spec = generators.TASKS[task]
        d = data[task]
        log.info("zoo %s: task %s (%d classes): probe + fine-tune", size, task, spec.num_classes)
        model.load_state_dict(pre_state)
        head = linear_probe(_features(model, d["train_x"]), d["train_y"], spec.num_classes, recipe["probe"])
        probe_acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
        finetune(model, head, d["train_x"], d["train_y"], recipe["finetune"], _derived_seed(seed, 3, k))
        acc = evaluate_accuracy(model, head, d["test_x"], d["test_y"])
        fdir = tmp / "finetuned" / task
        files = [
            save_safetensors_atomic(model.state_dict(), fdir / "model.safetensors",
                                    metadata=_meta(role="finetuned", task=task)),
            save_safetensors_atomic({"weight": head.weight, "bias": head.bias}, fdir / "head.safetensors",
                                    metadata=_meta(role="head", task=task)),
            write_json_atomic({"task": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                               "backbone": backbone_info, "normalisation": normalisation,
                               "head_protocol": recipe["finetune"]["head"], "individual_test_acc": acc,
                               "pretrained_probe_acc": probe_acc}, fdir / "config.json"),
            tmp / "data" / f"{task}.safetensors",
        ]
        tasks.append({"name": task, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                      "n_train": len(d["train_y"]), "n_router": len(d["router_y"]), "n_test": len(d["test_y"]),
                      "individual_test_acc": acc, "pretrained_probe_acc": probe_acc,
                      "files": _rel_sha(tmp, files)})

    return {
        "format": FORMAT, "size": size, "seed": seed, "package_version": freemerge_pl.__version__,
        "recipe": recipe, "recipe_hash": recipe_hash(recipe, seed), "backbone": backbone_info,
        "normalisation": normalisation,
        "pretrained": {"pretext_final_loss": pretext_loss, "files": _rel_sha(tmp, pre_files)},
        "tasks": tasks,
        "build": {"seconds": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                  "machine": platform.machine()},
    }


def build_zoo(dest: str | Path, size: str = "default", seed: int = 0) -> Path:
    """Build a zoo at ``dest`` (replacing an out-of-date one) via a temporary directory and one rename."""
    check_size(size)
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise ConfigError(f"zoo root {dest} exists, is not empty and holds no {MANIFEST}: refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with _deterministic(build_threads()):
            manifest = _write_zoo(tmp, size, seed)
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
    log.info("zoo %s seed %d built at %s in %.1f s", size, seed, dest, manifest["build"]["seconds"])
    return dest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FreeMergeError(f"{path} does not exist: build the zoo first (ensure_zoo)") from None


def _is_current(root: Path, want_hash: str) -> bool:
    try:
        m = read_manifest(root)
    except (FreeMergeError, json.JSONDecodeError, OSError):
        return False
    if m.get("format") != FORMAT or m.get("recipe_hash") != want_hash:
        return False
    files = list(m["pretrained"]["files"]) + [f for t in m["tasks"] for f in t["files"]]
    return all((root / f).is_file() for f in files)


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


def ensure_zoo(root: str | Path | None = None, size: str = "default", seed: int = 0) -> Path:
    """The zoo directory, built first if it is missing, incomplete or of another recipe (hash differs)."""
    dest = resolve_zoo_root(root, size, seed)
    want = recipe_hash(zoo_recipe(size), seed)
    if _is_current(dest, want):
        return dest
    with _build_lock(dest):
        if not _is_current(dest, want):
            build_zoo(dest, size, seed)
    return dest


def load_task_data(root: str | Path, task: str) -> dict[str, Tensor]:
    """The task's tensors (``{train,router,test}_x`` uint8 [N,3,32,32], ``…_y`` int64)."""
    path = Path(root) / "data" / f"{task}.safetensors"
    if not path.is_file():
        raise FreeMergeError(f"zoo data file {path} does not exist (task {task!r})")
    return load_file(str(path))
