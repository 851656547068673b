"""The router (paper §5, Alg. 1): a small MLP from cheap input features to K task scores.

Feature sources (semantics §5; measured in ``benchmarks/inference_overhead.py``):

* ``"input"`` (default): the input image average-pooled to ``pool_size × pool_size`` (non-image inputs
  are flattened), then the MLP. Costs a pooling and a tiny MLP, independent of the backbone.
* ``"backbone"``: the merged backbone's features (θ_m, no expert) → MLP. One extra backbone forward per
  batch: more accurate routing on hard inputs, about twice the inference cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FEATURE_SOURCES = ("input", "backbone")


@dataclass
class RouterConfig:
    """Router settings (YAML ``model.router``)."""

    feature_source: str = "input"
    hidden_dim: int = 256
    pool_size: int = 8
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0


class InputPool(nn.Module):
    """Average-pools images ``[B, C, H, W]`` to ``[B, C·p·p]``; other inputs are flattened."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x.float(), self.pool_size)
        return x.flatten(1).float()


class Router(nn.Module):
    """``LazyLinear → GELU → Linear`` over the chosen features; outputs K task logits."""

    def __init__(self, num_tasks: int, config: RouterConfig, in_features: int) -> None:
        super().__init__()
        self.config = config
        self.pool = InputPool(config.pool_size)
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, num_tasks),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)

    def route(self, logits: Tensor, top_k: int = 1) -> tuple[Tensor, Tensor]:
        """Top-k task ids ``[B, k]`` and their renormalised softmax weights (top-1: weight 1)."""
        if top_k == 1:
            ids = logits.argmax(-1, keepdim=True)
            return ids, torch.ones_like(ids, dtype=torch.float32)
        vals, ids = logits.topk(top_k, dim=-1)
        return ids, torch.softmax(vals.float(), dim=-1)
