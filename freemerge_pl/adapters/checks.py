"""Checks and specs shared by the checkpoint adapters (one implementation each)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from freemerge_pl.errors import CheckpointMismatchError, ConfigError

StateDict = dict[str, torch.Tensor]


def meta_state_spec(build: Callable[[], nn.Module]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Key → (shape, dtype) of the state dict of the module ``build()`` returns, built on the meta device
    (no memory, no weights read)."""
    with torch.device("meta"):
        module = build()
    return {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}


def linear_head_tensors(sd: StateDict, in_features: int, where: str, what: str) -> StateDict:
    """``{"weight": [C, in_features], "bias": [C]}`` of a linear classification head read from a file (a
    missing bias is zeros); any other key or shape is an error naming ``where`` (role and file) and ``what``
    the input width is (e.g. "the features of timm vit_base_patch16_224")."""
    if "weight" not in sd or set(sd) - {"weight", "bias"}:
        raise CheckpointMismatchError(f"{where}: expected keys 'weight' [C, {in_features}] and optional 'bias' "
                                      f"[C], found {sorted(sd)[:10]}")
    weight = sd["weight"]
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise CheckpointMismatchError(f"{where}: weight has shape {tuple(weight.shape)}, expected "
                                      f"[num_classes, {in_features}] ({what})")
    bias = sd.get("bias")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    elif tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointMismatchError(f"{where}: bias has shape {tuple(bias.shape)}, expected "
                                      f"({weight.shape[0]},)")
    return {"weight": weight, "bias": bias}


def task_order(owner: str, finetuned: dict | None, tasks: list | None) -> tuple[dict[str, str], list[str]]:
    """An adapter's ``finetuned`` ({task: directory}, as strings) and its task order (``tasks``, else
    ``finetuned``'s): at least one task, no task twice, and no ``finetuned`` entry outside the order."""
    finetuned = {str(k): str(v) for k, v in (finetuned or {}).items()}
    order = [str(t) for t in tasks] if tasks is not None else list(finetuned)
    if not order:
        raise ConfigError(f"{owner} needs tasks (with checkpoint_root) or finetuned {{task: directory}}")
    if len(set(order)) != len(order):
        raise ConfigError(f"{owner}: tasks {order} name a task more than once")
    stray = [t for t in finetuned if t not in order]
    if stray:
        raise ConfigError(f"{owner}: finetuned names task(s) {stray} that are not in tasks {order}")
    return finetuned, order

