"""The router (paper §5, Alg. 1): cheap features of the input → a small head → K task scores.

Feature sources (``RouterConfig.feature_source``; measured in ``benchmarks/router_compare.py``):

* ``"auto"`` (default): chosen from the adapter's ``input_kind`` (``resolve_feature_source``): images →
  ``AUTO_IMAGE_SOURCE`` (``"backbone"`` where the adapter cannot run a prefix), token ids → the merged
  backbone's features, anything else → ``"input"``.
* ``"input"``: the input average-pooled to ``pool_size × pool_size`` (images; other inputs are flattened).
  Independent of the backbone, the cheapest; meaningless on token ids (refused for ``input_kind="tokens"``).
* ``"backbone"``: the merged backbone's features (θ_m, no expert): one extra full backbone pass per batch.
* ``"backbone_prefix"``: the merged backbone's own early features, the first ``split_block`` blocks
  (``ModelAdapter.prefix_features``): ``split_block / depth`` of a backbone pass.
* ``"pretrained_backbone"``: the pre-trained backbone's (θ_pre) features — its first ``split_block`` blocks,
  or the whole backbone with ``split_block=0``; holds a second copy of the backbone's weights.

Heads (``RouterConfig.head``): ``linear`` (LayerNorm → Linear), ``mlp`` (LayerNorm → Linear → GELU → Linear),
``ncm`` (nearest class mean: cosine similarity of the centred, L2-normalised features to each task's mean,
divided by ``ncm_temperature``; fitted in one pass, no gradient training, few-shot friendly).

Confidence-aware fallback: a sample whose top routing probability is below ``fallback_threshold`` gets no
expert (``fallback="none"``: the merged backbone alone, weight 0) or a soft mix of its top-k experts
(``fallback="soft"``, k = max(2, top_k), renormalised softmax weights). Routed ids stay the router's choice
(used for the routed head and routing accuracy); the weights say how much of each expert is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from freemerge_pl.errors import ConfigError

FEATURE_SOURCES = ("auto", "input", "backbone", "backbone_prefix", "pretrained_backbone")
HEADS = ("linear", "mlp", "ncm")
PREFIX_POOLS = ("class_token", "class_mean_std")
FALLBACKS = ("none", "soft")
INPUT_KINDS = ("image", "tokens", "other")
#: the feature source ``auto`` picks for image adapters: chosen by ``benchmarks/router_compare.py`` on the
#: zoo's val split (backbone_prefix, split_block 3 + mlp: the best routed FREE on val, at half a backbone pass)
AUTO_IMAGE_SOURCE = "backbone_prefix"
#: sources that run (part of) a backbone and therefore accept any input the backbone accepts
BACKBONE_SOURCES = ("backbone", "backbone_prefix", "pretrained_backbone")


@dataclass
class RouterConfig:
    """Router settings (YAML ``model.router``); every field is checked at construction.

    Args:
        feature_source: where the router's features come from (module docstring).
        head: ``linear``, ``mlp`` or ``ncm`` (nearest class mean, no gradient training).
        split_block: blocks of the backbone prefix (``backbone_prefix``: ≥ 1; ``pretrained_backbone``: 0 =
            the whole pre-trained backbone). Checked against the backbone's depth when it is built.
        hidden_dim: the MLP head's hidden width.
        pool_size: the ``input`` source's pooled image side.
        epochs, lr, weight_decay, batch_size, seed: the head's training (``linear``/``mlp``).
        ncm_temperature: the NCM head's softmax temperature on cosine similarities.
        fallback_threshold: below this top routing probability the ``fallback`` applies (0 = never).
        fallback: ``none`` (no expert: the merged backbone alone) or ``soft`` (top-k softmax mix).
        prefix_pool: how a backbone prefix's token states become the router's features: ``class_token`` (the
            class token, ``prefix_features``) or ``class_mean_std`` (the class token, and the mean and the
            standard deviation of the other tokens, concatenated: 3× wider; adapters with ``prefix_states``).
        shared_prefix: ``backbone_prefix`` only: run the backbone's first ``split_block`` blocks once, with the
            merged weights alone; the router reads them and each sample's expert applies from block
            ``split_block`` on (its changes to the embeddings and those first blocks are not used), so routing
            costs no extra backbone pass. Oracle routing takes the same path (a like-for-like comparison).
    """

    feature_source: Literal["auto", "input", "backbone", "backbone_prefix", "pretrained_backbone"] = "auto"
    head: Literal["linear", "mlp", "ncm"] = "mlp"
    split_block: int = 3
    hidden_dim: int = 256
    pool_size: int = 8
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    ncm_temperature: float = 0.05
    fallback_threshold: float = 0.0
    fallback: Literal["none", "soft"] = "none"
    prefix_pool: Literal["class_token", "class_mean_std"] = "class_token"
    shared_prefix: bool = False

    def __post_init__(self) -> None:
        check_router_config(self)


def check_router_config(config: RouterConfig, owner: str = "model.router") -> RouterConfig:
    """Choices, sizes and ranges of a RouterConfig; a ConfigError names the setting and the accepted values."""
    for name, accepted in (("feature_source", FEATURE_SOURCES), ("head", HEADS), ("fallback", FALLBACKS),
                           ("prefix_pool", PREFIX_POOLS)):
        if getattr(config, name) not in accepted:
            raise ConfigError(f"{owner}.{name}={getattr(config, name)!r}; accepted: {list(accepted)}")
    for name, low in (("hidden_dim", 1), ("pool_size", 1), ("batch_size", 1), ("epochs", 0), ("split_block", 0)):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{owner}.{name}={value!r} must be a whole number ≥ {low}")
    if not isinstance(config.shared_prefix, bool):
        raise ConfigError(f"{owner}.shared_prefix={config.shared_prefix!r} must be true or false")
    if config.shared_prefix and config.feature_source not in ("auto", "backbone_prefix"):
        raise ConfigError(f"{owner}.shared_prefix=true needs feature_source 'backbone_prefix' (or 'auto' on "
                          f"images), not {config.feature_source!r}: only the merged backbone's own prefix is shared")
    if config.feature_source == "backbone_prefix" and config.split_block < 1:
        raise ConfigError(f"{owner}.split_block={config.split_block} must be ≥ 1 for feature_source "
                          "'backbone_prefix' (the number of leading blocks the router reads)")
    for name, low, high, low_open, high_open in (("lr", 0.0, math.inf, True, True),
                                                 ("weight_decay", 0.0, math.inf, False, True),
                                                 ("ncm_temperature", 0.0, math.inf, True, True),
                                                 ("fallback_threshold", 0.0, 1.0, False, False)):
        value = getattr(config, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
        if not ok:
            lb, hb = "(" if low_open else "[", ")" if high_open else "]"
            raise ConfigError(f"{owner}.{name}={value!r} is outside its accepted range {lb}{low}, {high}{hb}")
    return config


def resolve_feature_source(config: RouterConfig, input_kind: str, adapter_name: str = "the adapter",
                           has_prefix: bool = True) -> str:
    """The feature source actually used for an adapter whose inputs are ``input_kind`` (``has_prefix``: the
    adapter implements ``prefix_features``; without it ``auto`` on images reads the whole merged backbone); a
    ConfigError when the configured source cannot read such inputs (``input`` on token ids)."""
    if input_kind not in INPUT_KINDS:
        raise ConfigError(f"{adapter_name}.input_kind={input_kind!r}; accepted: {list(INPUT_KINDS)}")
    source = config.feature_source
    if source == "auto":
        image = AUTO_IMAGE_SOURCE if has_prefix else "backbone"
        return {"image": image, "tokens": "backbone", "other": "input"}[input_kind]
    if source == "input" and input_kind == "tokens":
        raise ConfigError(f"model.router.feature_source='input' cannot route {adapter_name}'s inputs: they are "
                          "token ids, which pooling would read as numbers; use 'auto', 'backbone', "
                          "'backbone_prefix' or 'pretrained_backbone'")
    return source


def pool_prefix_states(states: Tensor, mode: str) -> Tensor:
    """Router features ``[B, D']`` from a prefix's token states ``[B, T, D]`` (``RouterConfig.prefix_pool``)."""
    if mode == "class_token":
        return states[:, 0].float()
    tokens = states[:, 1:].float()
    return torch.cat([states[:, 0].float(), tokens.mean(1), tokens.std(1, correction=0)], dim=-1)


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
    """The configured head over the router's features; outputs K task logits.

    ``linear``/``mlp`` keep their layers in ``self.mlp`` (trained with cross-entropy); ``ncm`` keeps the
    buffers ``feature_mean [D]`` and ``class_means [K, D]`` (set by ``fit_means``)."""

    def __init__(self, num_tasks: int, config: RouterConfig, in_features: int) -> None:
        super().__init__()
        self.config = check_router_config(config)
        self.num_tasks = num_tasks
        self.pool = InputPool(config.pool_size)
        if config.head == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, config.hidden_dim),
                                     nn.GELU(), nn.Linear(config.hidden_dim, num_tasks))
        elif config.head == "linear":
            self.mlp = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, num_tasks))
        else:
            self.register_buffer("feature_mean", torch.zeros(in_features))
            self.register_buffer("class_means", torch.zeros(num_tasks, in_features))

    @property
    def trainable(self) -> bool:
        """Whether the head learns by gradient descent (``ncm`` is fitted by ``fit_means``)."""
        return self.config.head != "ncm"

    def _ncm_features(self, features: Tensor) -> Tensor:
        return F.normalize(features.float() - self.feature_mean, dim=-1)

    @torch.no_grad()
    def fit_means(self, features: Tensor, task_ids: Tensor) -> None:
        """NCM: the features' mean (centring) and each task's mean direction of centred, normalised features."""
        if self.config.head != "ncm":
            raise ConfigError(f"fit_means is for the 'ncm' head; this router's head is {self.config.head!r}")
        missing = sorted(set(range(self.num_tasks)) - set(task_ids.tolist()))
        if missing:
            raise ConfigError(f"the router data has no sample of task id(s) {missing}: the nearest-class-mean "
                              "router needs at least one per task")
        self.feature_mean.copy_(features.float().mean(0))
        z = self._ncm_features(features)
        means = torch.zeros_like(self.class_means).index_add_(0, task_ids.long().to(z.device), z)
        self.class_means.copy_(F.normalize(means, dim=-1))

    def fit(self, features: Tensor, task_ids: Tensor) -> Router:
        """Fit on frozen features ``[N, D]`` and task ids ``[N]``: ``ncm`` takes the task means; ``linear``/``mlp``
        train with a plain loop seeded by ``config.seed`` (AdamW, ``epochs`` shuffled passes of ``batch_size``)."""
        if not self.trainable:
            self.fit_means(features, task_ids)
            return self
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, task_ids),
                                             batch_size=cfg.batch_size, shuffle=True, generator=g)
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        with torch.inference_mode(False), torch.enable_grad():
            self.train()
            for _ in range(cfg.epochs):
                for f, t in loader:
                    opt.zero_grad()
                    F.cross_entropy(self(f.clone()), t.clone()).backward()
                    opt.step()
            self.eval()
        return self

    def forward(self, features: Tensor) -> Tensor:
        if self.config.head == "ncm":
            return self._ncm_features(features) @ self.class_means.T / self.config.ncm_temperature
        return self.mlp(features)

    def route(self, logits: Tensor, top_k: int = 1) -> tuple[Tensor, Tensor]:
        """Task ids ``[B, k]`` and weights ``[B, k]``: the top-k with renormalised softmax weights (top-1:
        weight 1), then the confidence fallback (``fallback_routing``)."""
        if top_k == 1:
            ids = logits.argmax(-1, keepdim=True)
            weights = torch.ones_like(ids, dtype=torch.float32)
        else:
            vals, ids = logits.topk(top_k, dim=-1)
            weights = torch.softmax(vals.float(), dim=-1)
        return fallback_routing(logits, ids, weights, self.config.fallback_threshold, self.config.fallback)


def fallback_routing(logits: Tensor, ids: Tensor, weights: Tensor, threshold: float,
                     fallback: str) -> tuple[Tensor, Tensor]:
    """Rows whose top softmax probability is below ``threshold`` get weight 0 on every expert (``none``: the
    merged backbone alone) or their top-max(2, k) experts with renormalised softmax weights (``soft``; the
    confident rows keep their routing, padded with weight-0 copies of their first id). Ids keep the
    router's ranking."""
    if threshold <= 0 or logits.shape[-1] == 1:
        return ids, weights
    low = torch.softmax(logits.float(), dim=-1).amax(-1) < threshold
    if not bool(low.any()):
        return ids, weights
    if fallback == "none":
        return ids, weights.masked_fill(low[:, None], 0.0)
    k = min(max(2, ids.shape[1]), logits.shape[-1])
    vals, soft_ids = logits.topk(k, dim=-1)
    soft_w = torch.softmax(vals.float(), dim=-1)
    pad = k - ids.shape[1]
    if pad:
        ids = torch.cat([ids, ids[:, :1].expand(-1, pad)], dim=1)
        weights = torch.cat([weights, weights.new_zeros(weights.shape[0], pad)], dim=1)
    return torch.where(low[:, None], soft_ids, ids), torch.where(low[:, None], soft_w, weights)


def routing_confusion_markdown(matrix: list[list[int]] | Tensor, names: list[str]) -> str:
    """A Markdown table of a routing confusion matrix (rows: true task, columns: routed task) with each
    row's routing accuracy, and the overall accuracy below."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    lines = ["| true \\ routed | " + " | ".join(names) + " | accuracy |",
             "|---" * (len(names) + 2) + "|"]
    for i, name in enumerate(names):
        total = float(m[i].sum())
        acc = f"{float(m[i, i]) / total:.3f}" if total else "–"
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in m[i].tolist()) + f" | {acc} |")
    total = float(m.sum())
    overall = f"{float(m.diagonal().sum()) / total:.4f}" if total else "–"
    return "\n".join(lines) + f"\n\nrouting accuracy: {overall}\n"


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
