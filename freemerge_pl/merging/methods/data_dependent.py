"""Data-dependent baselines (semantics §6, issue 20): Fisher merging, RegMean, AdaMerging / AdaMerging++ and
the multi-task-learning upper bound, as per-tensor kernels of the one engine.

Each method needs statistics that only data can give (Fisher diagonals, Gram matrices of linear-layer inputs,
learned merging coefficients, a jointly fine-tuned backbone). ``freemerge_pl.lightning.activation_stats`` collects them
from the router split (never the test split) and hands them over as ``DataStatistics`` (kind → key → tensor,
read one key at a time); ``method.with_data(statistics)`` returns the configured method bound to them, which
then runs key by key through ``merge()`` like every other method. Without statistics a method's
``statistics`` pass stops with an error saying how to run it. The maths here imports no Lightning.

Shapes of the statistics, per merged key of the backbone state dict (K tasks):

* ``fisher``: ``[K, *shape]`` diagonal empirical Fisher of θ_k on task k's data;
* ``gram``: ``[K, d_in, d_in]`` mean x xᵀ of the inputs of the linear map that ``key`` (a ``[d_out, d_in]``
  weight) belongs to, under θ_k on task k's data;
* ``coefficients``: ``[K]`` the learned λ_{k,key} (task-wise: the same ``[K]`` for every key);
* ``delta``: ``[*shape]`` θ_MTL − θ_pre of the jointly fine-tuned backbone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from freemerge_pl.errors import ConfigError
from freemerge_pl.merging.method import (
    Context,
    Count,
    Density,
    KeyTensors,
    MergeMethod,
    NonNegative,
    Positive,
    Scan,
    Unit,
)
from freemerge_pl.merging.ops import agreement_mask, elect_sign, masked
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import magnitude_trim, model_thresholds

StatisticKind = Literal["fisher", "gram", "coefficients", "delta"]


class DataStatistics:
    """Statistics collected from data, per kind and key (``get(kind, key)``; shapes in the module docstring).

    Per-task tensors are kept as given (one dict per task) and stacked into ``[K, ...]`` only when a key is
    read, so a merge never holds more than one key's stack. ``info`` records the cost of the collection
    (samples, seconds, optimisation steps) for the results tables.
    """

    def __init__(self, per_task: Mapping[str, list[Mapping[str, Tensor]]] | None = None,
                 shared: Mapping[str, Mapping[str, Tensor]] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self._per_task = {kind: [dict(d) for d in dicts] for kind, dicts in (per_task or {}).items()}
        self._shared = {kind: dict(d) for kind, d in (shared or {}).items()}
        self.info: dict[str, Any] = dict(info or {})

    def kinds(self) -> list[str]:
        return sorted({*self._per_task, *self._shared})

    def has(self, kind: str, key: str) -> bool:
        if kind in self._shared:
            return key in self._shared[kind]
        return kind in self._per_task and all(key in d for d in self._per_task[kind])

    def keys(self, kind: str) -> list[str]:
        if kind in self._shared:
            return list(self._shared[kind])
        dicts = self._per_task.get(kind, [])
        return [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []

    def num_tasks(self, kind: str) -> int | None:
        return len(self._per_task[kind]) if kind in self._per_task else None

    def get(self, kind: str, key: str) -> Tensor:
        """``kind``'s tensor of ``key``: per-task kinds stacked to ``[K, ...]`` (float32), shared ones as stored."""
        if not self.has(kind, key):
            raise KeyError(f"no {kind!r} statistics for key {key!r}")
        if kind in self._shared:
            return self._shared[kind][key]
        return torch.stack([d[key].float() for d in self._per_task[kind]])


@dataclass
class DataDependentMethod(MergeMethod):
    """Base of the methods that need data statistics (``statistic``: the kind ``activation_stats`` collects)."""

    statistic: ClassVar[StatisticKind] = "fisher"

    def with_data(self, data: DataStatistics) -> DataDependentMethod:
        """A copy of this configuration bound to ``data`` (the configuration itself is left unbound)."""
        bound = dataclasses.replace(self)
        bound._data = data
        return bound

    @property
    def data(self) -> DataStatistics:
        data = self.__dict__.get("_data")
        if data is None:
            raise ConfigError(
                f"method {self.name!r} needs statistics from data ({self.statistic}); run it through "
                "MergedModule (cli.py test/fit with a data module: they are collected from the router split) "
                "or bind them with method.with_data(freemerge_pl.lightning.activation_stats.collect_statistics(...))")
        return data

    def begin(self, ctx: Context) -> None:
        data = self.data
        k = data.num_tasks(self.statistic)
        if k is not None and k != ctx.num_tasks:
            raise ConfigError(f"method {self.name!r}: {self.statistic} statistics of {k} task(s) for a merge of "
                              f"{ctx.num_tasks}")

    def statistics(self, scan: Scan) -> Any:
        self.data  # noqa: B018 - fails early, naming how to provide the statistics
        return None


# ---------------------------------------------------------------- Fisher merging

def fisher_weighted_average(vectors: Tensor, fisher: Tensor, floor: float) -> Tensor:
    """Σ_k F̂_k v_k with F̂_k = (F_k + floor) / Σ_j (F_j + floor): per entry, the Fisher-weighted mean of the
    task vectors (θ_pre cancels: Σ_k F̂_k θ_k = θ_pre + Σ_k F̂_k v_k). One task gives F̂ = 1 exactly."""
    f = fisher.to(vectors.device, torch.float32) + floor
    return (f / f.sum(0) * vectors).sum(0)


@register("fisher", reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (Eq. 4)",
          needs=("data",))
@dataclass
class FisherMerging(DataDependentMethod):
    """Fisher merging: θ_m = Σ_k F_k θ_k / Σ_k F_k per entry, F_k the diagonal empirical Fisher of θ_k.

    F_k = mean over task k's samples of (∂ log p(ŷ | x; θ_k) / ∂θ)², per-sample gradients (``torch.func``),
    with ŷ = ``fisher_target``: ``predicted`` (default: the task head's argmax, label-free, the Fisher of
    the model's own prediction) or ``label`` (the empirical Fisher of the data's labels; regression heads
    always use the label with a unit-variance Gaussian likelihood). Samples: at most ``fisher_batches``
    batches of ``batch_size`` from task k's router split, run through θ_k's backbone and task k's head.
    ``fisher_floor`` (1e-6) is added to every Fisher, so an entry no task's loss touches is averaged.
    Keys without a Fisher (float buffers) are averaged.
    """

    statistic: ClassVar[StatisticKind] = "fisher"

    fisher_batches: Count = 8
    batch_size: Count = 16
    fisher_target: Literal["predicted", "label"] = "predicted"
    fisher_floor: Positive = 1e-6


    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        if not self.data.has("fisher", x.key):
            ctx.info.setdefault("averaged_keys", []).append(x.key)
            return x.weighted_sum().div_(x.num_tasks)
        return fisher_weighted_average(x.stacked(), self.data.get("fisher", x.key), self.fisher_floor)


# ---------------------------------------------------------------- RegMean

def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): RegMean's regularised Gram (off-diagonal entries scaled by α), batched."""
    diag = torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return alpha * gram + (1 - alpha) * diag


def regmean_solve(vectors: Tensor, grams: Tensor, alpha: float) -> Tensor:
    """RegMean's closed form on ``[K, d_out, d_in]`` weight deltas: W = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ, transposed
    back to ``[d_out, d_in]`` (θ_pre cancels because Σ G̃_k appears on both sides). Solved in float64; a
    singular Σ G̃ (inputs spanning fewer than d_in directions with α = 1) uses the pseudo-inverse."""
    g = scale_off_diagonal(grams.double(), alpha)
    total = g.sum(0)
    rhs = (g @ vectors.double().transpose(-1, -2)).sum(0)
    solution, info = torch.linalg.solve_ex(total, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.pinv(total, hermitian=True) @ rhs
    return solution.transpose(0, 1).to(torch.float32)


@register("regmean", reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
          "Models (RegMean, ICLR), Eq. 4 with α-scaled non-diagonal Gram entries", needs=("data",))
@dataclass
class RegMean(DataDependentMethod):
    """RegMean: each linear map merged in closed form to minimise Σ_k ‖X_k W − X_k W_k‖², other tensors
    averaged.

    For a weight W ``[d_out, d_in]`` with task Grams G_k = mean over task k's inputs of x xᵀ (forward hooks
    on every ``nn.Linear`` — and on ``nn.MultiheadAttention``'s packed input projection in self-attention —
    of θ_k's backbone on at most ``gram_batches`` batches of ``batch_size`` from task k's router split;
    inputs of every token position are samples): G̃_k = α G_k + (1 − α) diag(G_k) with α = ``alpha``
    (0.9, the paper's default region; α = 1 is the exact least-squares merge), W = (Σ G̃_k)⁻¹ Σ G̃_k W_k in
    the paper's ``[d_in, d_out]`` orientation. Using the mean rather than the paper's sum weighs tasks
    equally whatever their sample counts (the two agree with equal counts). Biases, LayerNorms, embeddings
    and linear maps whose hook never ran (e.g. an attention output projection called functionally) are
    averaged (``info['averaged_keys']``).
    """

    statistic: ClassVar[StatisticKind] = "gram"

    gram_batches: Count = 8
    batch_size: Count = 16
    alpha: Unit = 0.9


    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        if len(x.shape) != 2 or not self.data.has("gram", x.key):
            ctx.info.setdefault("averaged_keys", []).append(x.key)
            return x.weighted_sum().div_(x.num_tasks)
        grams = self.data.get("gram", x.key).to(ctx.device)
        if grams.shape[-1] != x.shape[1]:
            raise ConfigError(f"regmean: key {x.key!r} has shape {x.shape} but its Gram matrices are "
                              f"{tuple(grams.shape[1:])}: the statistics belong to another model")
        return regmean_solve(x.stacked(), grams, self.alpha).to(ctx.device)


# ---------------------------------------------------------------- AdaMerging / AdaMerging++

@register("adamerging", reference="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task "
          "Learning (ICLR), Eq. 5-7 (entropy minimisation of task-/layer-wise coefficients)", needs=("data",))
@dataclass
class AdaMerging(DataDependentMethod):
    """AdaMerging: θ_m = θ_pre + Σ_k λ_k v_k (``granularity="task"``) or Σ_k λ_{k,l} v_{k,l} per tensor l
    (``"layer"``, default, the paper's best), with λ learned by minimising the Shannon entropy of each
    task head's predictions on unlabeled inputs.

    The inputs are task k's router-split inputs (labels unused; never the test split), fed to task k's head
    as in the paper. Training: ``steps`` Adam steps (``lr`` 1e-3, paper) on Σ_k mean entropy of one batch of
    ``batch_size`` (16, paper) per task, λ initialised at ``init`` (0.3, paper) and clamped to [0, 1] in
    every forward (the authors' code), only λ receiving gradients (the backbone runs as a
    ``torch.func.functional_call`` over θ_pre + Σ λ v). Regression heads have no entropy and are skipped.
    The paper trains 500 steps; the zoo configs use fewer (cost is ``steps`` × K forward/backward passes).
    """

    statistic: ClassVar[StatisticKind] = "coefficients"

    granularity: Literal["task", "layer"] = "layer"
    steps: Count = 500
    lr: Positive = 1e-3
    init: Unit = 0.3
    batch_size: Count = 16
    seed: int = 0


    def vector_statistics(self, scan: Scan) -> Any:
        """Model-wide quantities of the task vectors the coefficients multiply (none for plain AdaMerging)."""
        return None

    def prepared_vectors(self, x: KeyTensors, stats: Any) -> Tensor:
        """The ``[K, *shape]`` task vectors the coefficients multiply (plain AdaMerging: v_k as they are)."""
        return x.stacked()

    def statistics(self, scan: Scan) -> Any:
        self.data  # noqa: B018 - fails early, naming how to provide the statistics
        return self.vector_statistics(scan)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        vectors = self.prepared_vectors(x, stats)
        lam = self.data.get("coefficients", x.key).to(vectors.device, torch.float32)
        return combine(vectors, lam)


def combine(vectors: Tensor, coefficients: Tensor) -> Tensor:
    """Σ_k λ_k v_k of a ``[K, *shape]`` stack (λ clamped to [0, 1], as trained)."""
    lam = coefficients.clamp(0.0, 1.0).reshape(-1, *([1] * (vectors.dim() - 1)))
    return (lam * vectors).sum(0)


def ties_prepared(stacked: Tensor, density: float, thresholds: Tensor | None) -> Tensor:
    """TIES's trim and elect applied per task, without the merge: each v_k trimmed to its top ``density``
    magnitudes, then only the entries that agree with the elected sign kept (AdaMerging++'s task vectors)."""
    trimmed = magnitude_trim(stacked, density, thresholds) if density < 1 else stacked
    return masked(trimmed, agreement_mask(trimmed, elect_sign(trimmed)))


@register("adamerging_pp", reference="Yang et al. 2024, AdaMerging (ICLR), AdaMerging++: coefficients learned "
          "over TIES-processed task vectors", needs=("data",))
@dataclass
class AdaMergingPP(AdaMerging):
    """AdaMerging++: AdaMerging over TIES-processed task vectors (trim to the top ``density`` magnitudes over
    ``trim_scope`` — model: the TIES code's global threshold, exact; tensor: per tensor — then keep each
    task's entries that agree with the elected sign); the coefficients are then learned as in AdaMerging."""

    density: Density = 0.2
    trim_scope: Literal["model", "tensor"] = "model"


    def vector_statistics(self, scan: Scan) -> Any:
        if self.trim_scope == "model" and self.density < 1:
            return model_thresholds(scan, lambda x: list(x.vectors()), scan.ctx.num_tasks, self.density)
        return None

    def prepared_vectors(self, x: KeyTensors, stats: Any) -> Tensor:
        return ties_prepared(x.stacked(), self.density, stats)


# ---------------------------------------------------------------- multi-task learning (upper bound)

@register("mtl", reference="Caruana 1997, Multitask Learning; the upper-bound row of merging papers "
          "(joint fine-tuning of θ_pre on all tasks)", needs=("data",))
@dataclass
class MultiTaskLearning(DataDependentMethod):
    """Traditional multi-task learning: θ_pre's backbone fine-tuned jointly on every task's labelled training
    data (each sample through its own task's head; heads frozen, as the merged models use them), AdamW with
    ``lr`` / ``weight_decay`` for ``epochs`` passes over shuffled mixed batches of ``batch_size``.

    ``data_split``: ``router`` (the router split, the data every row of the table may use) or ``train`` (a
    seeded ``train_fraction`` of each task's training split: the dataset built with the data module's
    ``train_args``, or with ``train_split_args`` when given — e.g. ``{split: train}`` where the data module's
    training data is itself a held-out router split, as in the text zoo's configs). Not a merge: the "merged"
    backbone is θ_MTL (delta θ_MTL − θ_pre), the reference row that merging methods approach.
    """

    statistic: ClassVar[StatisticKind] = "delta"

    data_split: Literal["router", "train"] = "router"
    train_fraction: Density = 0.1
    train_split_args: dict[str, Any] | None = None
    epochs: Count = 5
    lr: Positive = 1e-4
    weight_decay: NonNegative = 0.0
    batch_size: Count = 32
    seed: int = 0

    def check(self) -> None:
        if self.train_split_args is not None and self.data_split != "train":
            raise ConfigError(f"mtl: train_split_args={self.train_split_args!r} is ignored by "
                              f"data_split={self.data_split!r} (it applies to data_split 'train' only)")

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        if not self.data.has("delta", x.key):
            raise ConfigError(f"mtl: no trained delta for key {x.key!r}: the statistics belong to another model")
        return self.data.get("delta", x.key).to(ctx.device, torch.float32, copy=True)


DATA_DEPENDENT_METHODS: tuple[str, ...] = ("fisher", "regmean", "adamerging", "adamerging_pp", "mtl")


def needs_data(method: MergeMethod) -> bool:
    """Whether ``method`` must be bound to data statistics before it can merge."""
    return isinstance(method, DataDependentMethod)
