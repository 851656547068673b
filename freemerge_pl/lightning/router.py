"""The router (paper §5, Alg. 1): cheap features of the input → a small head → K task scores.

Feature sources (``RouterConfig.feature_source``; measured in ``benchmarks/router_compare.py``):

* ``"auto"`` (default): chosen from the adapter's ``input_kind`` (``resolve_feature_source``, ``AUTO_SOURCES``):
  images → ``"pretrained"``, token ids → ``"pretrained_backbone"`` (``"pretrained"`` where the adapter cannot
  run a prefix), anything else → ``"input"``.
* ``"input"``: the input average-pooled to ``POOL_SIZE × POOL_SIZE`` (images; other inputs are flattened).
  Independent of the backbone, the cheapest; meaningless on token ids (refused for ``input_kind="tokens"``).
* ``"backbone"``: the merged backbone's features (θ_m, no expert): one extra full backbone pass per batch.
* ``"backbone_prefix"``: the merged backbone's own early features, its first ``SPLIT_BLOCK`` blocks
  (``ModelAdapter.prefix_features``): ``SPLIT_BLOCK / depth`` of a backbone pass.
* ``"pretrained_backbone"``: the pre-trained backbone's (θ_pre) features, its first ``SPLIT_BLOCK`` blocks;
  holds a second copy of the backbone's weights.
* ``"pretrained"``: the whole pre-trained backbone's pooled features (``ModelAdapter.pooled_features``: the
  backbone's output; token adapters: the mean of the unmasked tokens' last hidden states); holds a second copy
  of the backbone's weights and costs a backbone pass per batch.

``pretrained`` and ``pretrained_backbone`` do not depend on the merge: ``tune`` trains such a router once and,
while it is unchanged, reuses each tune-val batch's route for every candidate (``RoutedModel.cache_routes``).

Heads (``RouterConfig.head``): ``linear`` (LayerNorm → Linear) or ``mlp`` (LayerNorm → Linear → GELU →
Linear), trained by ``Router.fit``, the one training loop (``fit`` and ``test`` both run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from freemerge_pl.errors import ConfigError
from freemerge_pl.settings import Range, check_fields

INPUT_KINDS = ("image", "tokens", "other")
#: the feature source ``auto`` picks per ``input_kind``: chosen by ``benchmarks/router_compare.py`` on both zoos'
#: tune-val (the pre-trained model's pooled features: the best routing accuracy and gain kept there, and
#: independent of the merge, so a routed ``tune`` trains the router once and routes each batch once)
AUTO_SOURCES = {"image": "pretrained", "tokens": "pretrained_backbone", "other": "input"}
#: sources that run (part of) a backbone and therefore accept any input the backbone accepts
BACKBONE_SOURCES = ("backbone", "backbone_prefix", "pretrained_backbone", "pretrained")
# Fixed settings (not options: every shipped run uses these; a benchmark needing a variant builds it directly).
SPLIT_BLOCK = 3  #: leading backbone blocks the prefix sources read
POOL_SIZE = 8  #: the ``input`` source's pooled image side
WEIGHT_DECAY = 1e-4  #: AdamW weight decay of the router's training
BATCH_SIZE = 64  #: the router's training batch (and its feature pass)
SEED = 0  #: seeds the router's initial weights and its training order


@dataclass
class RouterConfig:
    """Router settings (YAML ``model.router``), checked once at construction (``freemerge_pl.settings``).

    Args:
        feature_source: where the router's features come from: ``auto`` (chosen from the adapter's inputs),
            ``input`` (the input pooled), ``backbone`` (the merged backbone), ``backbone_prefix`` (its first
            blocks), ``pretrained_backbone`` (the pre-trained backbone's first blocks) or ``pretrained`` (the
            whole pre-trained backbone, pooled; token adapters: the mean over the tokens).
        head: ``linear`` or ``mlp``.
        epochs: passes of the router's training over the router split.
        lr: AdamW learning rate of the router's training.
        hidden_dim: the MLP head's hidden width.
    """

    feature_source: Literal["auto", "input", "backbone", "backbone_prefix", "pretrained_backbone",
                            "pretrained"] = "auto"
    head: Literal["linear", "mlp"] = "mlp"
    epochs: Annotated[int, Range(0, integer=True)] = 20
    lr: Annotated[float, Range(0, float("inf"), low_open=True, high_open=True)] = 1e-3
    hidden_dim: Annotated[int, Range(1, integer=True)] = 256

    def __post_init__(self) -> None:
        check_fields(self, "model.router")


def resolve_feature_source(config: RouterConfig, input_kind: str, adapter_name: str = "the adapter",
                           has_prefix: bool = True) -> str:
    """The feature source actually used for an adapter whose inputs are ``input_kind`` (``auto``:
    ``AUTO_SOURCES``; ``has_prefix``: the adapter implements ``prefix_features``, without it ``auto`` reads the
    whole pre-trained backbone); a ConfigError when the configured source cannot read such inputs (``input`` on
    token ids)."""
    if input_kind not in INPUT_KINDS:
        raise ConfigError(f"{adapter_name}.input_kind={input_kind!r}; accepted: {list(INPUT_KINDS)}")
    source = config.feature_source
    if source == "auto":
        auto = AUTO_SOURCES[input_kind]
        return "pretrained" if auto == "pretrained_backbone" and not has_prefix else auto
    if source == "input" and input_kind == "tokens":
        raise ConfigError(f"model.router.feature_source='input' cannot route {adapter_name}'s inputs: they are "
                          "token ids, which pooling would read as numbers; use 'auto', 'backbone', "
                          "'backbone_prefix', 'pretrained_backbone' or 'pretrained'")
    return source


class InputPool(nn.Module):
    """Average-pools images ``[B, C, H, W]`` to ``[B, C·p·p]``; other inputs are flattened."""

    def __init__(self, pool_size: int = POOL_SIZE) -> None:
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x.float(), self.pool_size)
        return x.flatten(1).float()


class Router(nn.Module):
    """The configured head over the router's features (``self.mlp``); outputs K task logits."""

    def __init__(self, num_tasks: int, config: RouterConfig, in_features: int) -> None:
        super().__init__()
        self.config = config
        self.num_tasks = num_tasks
        if config.head == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, config.hidden_dim),
                                     nn.GELU(), nn.Linear(config.hidden_dim, num_tasks))
        else:
            self.mlp = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, num_tasks))

    def optimizer(self) -> torch.optim.Optimizer:
        """The router's optimiser (AdamW, ``lr``, ``WEIGHT_DECAY``)."""
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=WEIGHT_DECAY)

    def fit(self, features: Tensor, task_ids: Tensor, optimizer=None, seed: int = SEED) -> Router:
        """The one training loop: frozen features ``[N, D]`` and task ids ``[N]``, ``epochs`` passes of
        ``BATCH_SIZE`` shuffled by a generator seeded with ``seed``, cross-entropy, ``optimizer`` (default
        ``self.optimizer()``; Lightning's ``fit`` passes its wrapper of the same optimiser, which counts the
        steps). Runs in full precision with gradients on whatever the caller's context."""
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, task_ids),
                                             batch_size=BATCH_SIZE, shuffle=True, generator=g)
        opt = optimizer if optimizer is not None else self.optimizer()
        autocast_off = torch.autocast(features.device.type, enabled=False)
        with torch.inference_mode(False), torch.enable_grad(), autocast_off:
            self.train()
            for _ in range(self.config.epochs):
                for f, t in loader:
                    opt.zero_grad()
                    F.cross_entropy(self(f.clone()), t.clone()).backward()
                    opt.step()
            self.eval()
        return self

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)

    @staticmethod
    def route(logits: Tensor, top_k: int = 1) -> tuple[Tensor, Tensor]:
        """Task ids ``[B, k]`` and weights ``[B, k]``: the top-k with renormalised softmax weights (top-1:
        weight 1)."""
        if top_k == 1:
            ids = logits.argmax(-1, keepdim=True)
            return ids, torch.ones_like(ids, dtype=torch.float32)
        vals, ids = logits.topk(top_k, dim=-1)
        return ids, torch.softmax(vals.float(), dim=-1)


def routing_confusion_markdown(matrix: list[list[int]] | Tensor, names: list[str]) -> str:
    """A Markdown table of a routing confusion matrix (rows: true task, columns: routed task) with each
    row's routing accuracy, and below it the two overall figures, each labelled: the mean over tasks of the
    rows' accuracies (what the results tables report) and the share of all samples routed right (pooled)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    lines = ["| true \\ routed | " + " | ".join(names) + " | accuracy |",
             "|---" * (len(names) + 2) + "|"]
    rows = []
    for i, name in enumerate(names):
        total = float(m[i].sum())
        if total:
            rows.append(float(m[i, i]) / total)
        acc = f"{rows[-1]:.3f}" if total else "–"
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in m[i].tolist()) + f" | {acc} |")
    total = float(m.sum())
    pooled = f"{float(m.diagonal().sum()) / total:.4f}" if total else "–"
    mean = f"{sum(rows) / len(rows):.4f}" if rows else "–"
    return ("\n".join(lines) + f"\n\nrouting accuracy (mean over tasks): {mean}\n"
            f"routing accuracy (pooled over all samples): {pooled}\n")


class RoutingConfusionMatrix(MulticlassConfusionMatrix):
    """The routed-vs-true task confusion matrix ``[K, K]`` for any K ≥ 1 (torchmetrics needs two classes or more:
    a single task is counted in a 2×2 matrix and returned cut to 1×1, which torchmetrics' ``compute`` wrapper
    squeezes to a scalar: reshape it to ``[K, K]``)."""

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(num_classes=max(2, num_tasks), **kwargs)
        self.num_tasks = num_tasks

    def compute(self) -> Tensor:
        return super().compute()[: self.num_tasks, : self.num_tasks]


def routing_accuracy_metric(num_tasks: int) -> MulticlassAccuracy:
    """Micro routing accuracy over K ≥ 1 tasks (one task: counted over two classes, the same number)."""
    return MulticlassAccuracy(num_classes=max(2, num_tasks), average="micro")
