"""Cost-free baselines (semantics §6): weight averaging, task arithmetic, TIES, DARE, Breadcrumbs, DELLA,
PCB-Merging and TSV-Merging here; EMR-Merging in ``emr.py`` and Twin-Merging in ``twin.py``.

Every method is a typed configuration (``MergeMethod``) with a per-tensor kernel ``merge_key`` on one key's
fp32 task vectors ``v_k = θ_k − θ_pre`` and, where it needs model-wide quantities (TIES/PCB model-scope
thresholds), a ``statistics`` pass; the backbone is ``θ_pre + delta``. The building blocks (trim, sign
election, disjoint merge, drops) live in ``ops.py`` and are shared. Random methods draw from the engine's
seeded generator key by key, task by task, in key order (replayed identically in every pass).
The lower-case functions (``ties(task_vectors, **hyperparameters)``) run a method on in-memory task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.errors import check_range
from freemerge_pl.merging import linalg
from freemerge_pl.merging.experts import topk_count
from freemerge_pl.merging.method import Context, KeyTensors, MergeMethod, Scan
from freemerge_pl.merging.ops import (
    magnitude_band_mask,
    magnitude_trim,
    magprune,
    per_task,
    random_drop,
    task_weights,
    ties_combine,
)
from freemerge_pl.merging.quantile import kth_largest_indices, magnitude_thresholds, run_order_statistics
from freemerge_pl.merging.registry import functional, register

# ---------------------------------------------------------------- shared helpers

def sum_vectors(vectors: Iterable[Tensor]) -> Tensor:
    """``Σ_k v_k`` in float32, accumulated in place into a fresh tensor (no [K, ...] stack: K× less memory
    and faster); the inputs are never modified."""
    total = None
    for v in vectors:
        if total is None:
            total = v.to(dtype=torch.float32, copy=True)
        else:
            total.add_(v.to(device=total.device, dtype=torch.float32))
    return total


def model_trim_thresholds(scan: Scan, values_of: Callable[[KeyTensors], Sequence[Tensor]], num_tasks: int,
                          density: float) -> Tensor:
    """Per task, the |v| threshold keeping the ⌈density·N⌉ largest entries of the whole model (exact)."""
    return magnitude_thresholds(lambda fn: scan(fn, "trim threshold"), values_of, num_tasks,
                                lambda n: topk_count(n, density))


# ---------------------------------------------------------------- weight averaging, task arithmetic

@register("weight_averaging", reference="Wortsman et al. 2022 (model soups); semantics §6")
@dataclass
class WeightAveraging(MergeMethod):
    """Weight averaging: θ_m = (1/K) Σ_k θ_k, i.e. delta = (1/K) Σ_k v_k."""

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        return sum_vectors(x.vectors()).div_(x.num_tasks)


@register("task_arithmetic", reference="Ilharco et al. 2023, Editing Models with Task Arithmetic")
@dataclass
class TaskArithmetic(MergeMethod):
    """Task arithmetic: θ_m = θ_pre + λ Σ_k v_k, with ``scaling`` λ (paper default 0.3)."""

    scaling: float = 0.3

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        return sum_vectors(x.vectors()).mul_(self.scaling)


weight_averaging = functional(WeightAveraging)
task_arithmetic = functional(TaskArithmetic)


# ---------------------------------------------------------------- TIES

def check_weights(weights: Sequence[float] | None, num_tasks: int) -> None:
    task_weights(weights, num_tasks)


@register("ties", reference="Yadav et al. 2023, TIES-Merging (NeurIPS), Alg. 1 (trim, elect, disjoint merge)")
@dataclass
class TIES(MergeMethod):
    """TIES-Merging: trim each task vector to its top-k magnitudes, elect signs, disjoint mean.

    Symbols (Alg. 1): k = ``density`` (0.2: the top 20% |v_k| are kept, ties at the threshold too),
    over the whole model (``trim_scope="model"``: the paper's code, FusionBench; an exact two-pass
    quantile, one tensor at a time) or per tensor (``"tensor"``: peft, mergekit); γ_m = sgn(Σ_k trimmed
    v_k) (a zero sum elects +); τ_m = mean over A = {k : v_k ≠ 0, sgn v_k = γ_m}; θ_m = θ_pre + λ τ_m with
    λ = ``scaling`` (1.0, the paper's ViT setting; FusionBench uses 0.3).
    ``sign_election="unweighted"`` (default, the paper and peft): elect on Σ v_k, merge Σ_A w_k v_k / |A|;
    ``"weighted"`` (mergekit): elect on Σ w_k v_k, merge Σ_A w_k v_k / Σ_A w_k. ``weights`` w_k default 1,
    where the two conventions coincide. Deviation: the paper's code keeps one entry more (it thresholds at
    the ⌊N(1−k)⌋-th smallest |v| inclusive); we keep ⌈k·N⌉.
    """

    density: float = 0.2
    trim_scope: Literal["model", "tensor"] = "model"
    sign_election: Literal["unweighted", "weighted"] = "unweighted"
    weights: list[float] | None = None
    scaling: float = 1.0

    def check(self) -> None:
        check_range("density", self.density, 0.0, 1.0, low_open=True)

    def begin(self, ctx: Context) -> None:
        check_weights(self.weights, ctx.num_tasks)

    def trimmed_vectors(self, x: KeyTensors, ctx: Context) -> list[Tensor]:
        """The task vectors TIES trims (DARE+TIES overrides this with the dropped ones)."""
        return list(x.vectors())

    def statistics(self, scan: Scan):
        if self.trim_scope == "model" and self.density < 1:
            return model_trim_thresholds(scan, lambda x: self.trimmed_vectors(x, scan.ctx), scan.ctx.num_tasks,
                                         self.density)
        return None

    def merge_key(self, x: KeyTensors, thresholds, ctx: Context) -> Tensor:
        stacked = torch.stack(self.trimmed_vectors(x, ctx))
        if self.density < 1:
            stacked = magnitude_trim(stacked, self.density, thresholds)
        return self.scaling * ties_combine(stacked, task_weights(self.weights, x.num_tasks), self.sign_election)


ties = functional(TIES)


# ---------------------------------------------------------------- DARE

@register("dare", reference="Yu et al. 2024, Language Models are Super Mario (ICML), DARE drop-and-rescale")
@dataclass
class DARE(MergeMethod):
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p), then merge.

    Symbols (the paper's drop-and-rescale equations): p = ``drop_rate`` (0.9), m ~ Bernoulli(p),
    ṽ = (1 − m) ⊙ v / (1 − p) (``rescale=False`` keeps ṽ = (1 − m) ⊙ v, the un-rescaled convention).
    Then ``merge``:
    ``"task_arithmetic"``: λ Σ_k w_k ṽ_k; ``"ties"``: TIES on ṽ_k (trim to ``ties_density`` — 1.0 = no
    further trim, as mergekit's dare_ties — over ``trim_scope``, elect by ``sign_election``, disjoint
    mean), times λ = ``scaling`` (0.3, the task-arithmetic default; the paper tunes it per merge).
    Deviation: mergekit's dare_ties sums the agreeing entries without dividing; we take TIES's mean.
    Reproducible under the run's seed (the engine's generator, replayed per key in every pass).
    """

    random = True

    drop_rate: float = 0.9
    rescale: bool = True
    merge: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scaling: float = 0.3
    weights: list[float] | None = None
    ties_density: float = 1.0
    trim_scope: Literal["model", "tensor"] = "model"
    sign_election: Literal["unweighted", "weighted"] = "unweighted"

    def check(self) -> None:
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        self._ties = TIES(density=self.ties_density, trim_scope=self.trim_scope,
                          sign_election=self.sign_election, weights=self.weights, scaling=self.scaling)
        self._ties.trimmed_vectors = self.dropped

    def begin(self, ctx: Context) -> None:
        check_weights(self.weights, ctx.num_tasks)

    def dropped(self, x: KeyTensors, ctx: Context) -> list[Tensor]:
        generator = ctx.rng(x.key)
        return [random_drop(v, self.drop_rate, generator, self.rescale) for v in x.vectors()]

    def statistics(self, scan: Scan):
        return self._ties.statistics(scan) if self.merge == "ties" else None

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        if self.merge == "ties":
            return self._ties.merge_key(x, stats, ctx)
        stacked = torch.stack(self.dropped(x, ctx))
        return self.scaling * (stacked * per_task(task_weights(self.weights, x.num_tasks), stacked)).sum(0)


dare = functional(DARE)


# ---------------------------------------------------------------- Breadcrumbs

@register("breadcrumbs",
          reference="Davari & Belilovsky 2023, Model Breadcrumbs (mask both magnitude tails, then add)")
@dataclass
class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: per tensor, drop the largest β and smallest γ magnitudes, then task arithmetic.

    Symbols: β = ``drop_top`` (1%: the ⌊β·n⌋ largest |v| of each tensor, outliers), γ = ``drop_bottom``
    (90%: the ⌊γ·n⌋ smallest); θ_m = θ_pre + α Σ_k m_k ⊙ v_k with α = ``scaling`` (0.3, the
    task-arithmetic default; the paper tunes α with β, γ on validation data).
    """

    drop_top: float = 0.01
    drop_bottom: float = 0.9
    scaling: float = 0.3

    def check(self) -> None:
        check_range("drop_top", self.drop_top, 0.0, 1.0)
        check_range("drop_bottom", self.drop_bottom, 0.0, 1.0)
        check_range("drop_top + drop_bottom", self.drop_top + self.drop_bottom, 0.0, 1.0, high_open=True)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        total = torch.zeros(x.shape, dtype=torch.float32, device=ctx.device)
        for v in x.vectors():
            total = total.to(v.device)
            total += torch.where(magnitude_band_mask(v, self.drop_top, self.drop_bottom), v, torch.zeros_like(v))
        return self.scaling * total


breadcrumbs = functional(Breadcrumbs)


# ---------------------------------------------------------------- DELLA

@register("della", reference="Deep et al. 2024, DELLA-Merging (MAGPRUNE, elect, fuse)")
@dataclass
class DELLA(MergeMethod):
    """DELLA-Merging: magnitude-ranked random drop (MAGPRUNE), rescale, elect signs, disjoint mean.

    Symbols (MAGPRUNE: Δ = ε/n, p_i = p_min + Δ·r_i, p_min = p − ε/2, with larger |v| dropped less):
    within each row (a ≥2-D tensor viewed as ``(shape[0], -1)``, 1-D as one row) rank entries by |v|
    (r_i = 0 smallest … n−1 largest); drop probability
    p_i = p + ε/2 − ε·r_i/(n−1), i.e. from p + ε/2 (smallest) to p − ε/2 (largest), mean p;
    survivors rescaled by 1/(1 − p_i) (``rescale``). p = ``drop_rate``, ε = ``epsilon`` (the window
    width; mergekit's ``epsilon`` is ε/2). Then elect and disjoint mean as TIES (``sign_election``,
    ``weights``), θ_m = θ_pre + λ·merged with λ = ``scaling``. Defaults p = 0.3, ε = 0.14, λ = 1.1:
    the authors' example command (declare-lab/della README).
    """

    random = True

    drop_rate: float = 0.3
    epsilon: float = 0.14
    rescale: bool = True
    sign_election: Literal["unweighted", "weighted"] = "unweighted"
    weights: list[float] | None = None
    scaling: float = 1.1

    def check(self) -> None:
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        check_range("epsilon", self.epsilon, 0.0, 1.0)
        check_range("drop_rate - epsilon/2", self.drop_rate - self.epsilon / 2, 0.0, 1.0, high_open=True)
        check_range("drop_rate + epsilon/2", self.drop_rate + self.epsilon / 2, 0.0, 1.0, high_open=True)

    def begin(self, ctx: Context) -> None:
        check_weights(self.weights, ctx.num_tasks)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        generator = ctx.rng(x.key)
        pruned = torch.stack([magprune(v, self.drop_rate, self.epsilon, generator, self.rescale)
                              for v in x.vectors()])
        return self.scaling * ties_combine(pruned, task_weights(self.weights, x.num_tasks), self.sign_election)


della = functional(DELLA)


# ---------------------------------------------------------------- PCB-Merging

def _normalise(x: Tensor, lo: float, hi: float) -> Tensor:
    """Min-max normalisation with given bounds: (x − lo)/(hi − lo), 0 when hi = lo (``ops.minmax_rows``)."""
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


@dataclass
class PCBPaperStats:
    """Model- (or tensor-) wide quantities of PCB's paper formulation: min/max of τ_i ⊙ τ_j per pair, the
    softmax denominators, and each task's β threshold (keep the ⌈r·D⌉ largest)."""

    lo: Tensor
    hi: Tensor
    z_intra: Tensor | None = None
    z_inter: Tensor | None = None
    thresholds: Tensor | None = None


def _pairs(K: int):
    return [(i, j) for i in range(K) for j in range(i, K)]


def pcb_minmax(flat: Tensor, stats: PCBPaperStats) -> None:
    """Fold one chunk ``[K, n]`` into the pairwise min/max of τ_i ⊙ τ_j."""
    for i, j in _pairs(flat.shape[0]):
        p = flat[i] * flat[j]
        lo, hi = float(p.min()), float(p.max())
        stats.lo[i, j] = stats.lo[j, i] = min(float(stats.lo[i, j]), lo)
        stats.hi[i, j] = stats.hi[j, i] = max(float(stats.hi[i, j]), hi)


def _pcb_exponents(flat: Tensor, stats: PCBPaperStats, i: int, j: int, factor: float) -> Tensor:
    """exp(factor·Norm(τ_i ⊙ τ_j) − its maximum): the numerator of the (stable) softmax."""
    lo, hi = float(stats.lo[i, j]), float(stats.hi[i, j])
    top = factor if hi > lo else 0.0
    return torch.exp(factor * _normalise(flat[i] * flat[j], lo, hi) - top)


def pcb_exp_sums(flat: Tensor, stats: PCBPaperStats) -> None:
    """Fold one chunk into the softmax denominators (intra: scale K on τ_i², inter: scale 1 per pair)."""
    K = flat.shape[0]
    for i in range(K):
        stats.z_intra[i] += float(_pcb_exponents(flat, stats, i, i, float(K)).sum(dtype=torch.float64))
    for i, j in _pairs(K):
        s = float(_pcb_exponents(flat, stats, i, j, 1.0).sum(dtype=torch.float64))
        stats.z_inter[i, j] += s
        if i != j:
            stats.z_inter[j, i] += s


def pcb_beta(flat: Tensor, stats: PCBPaperStats) -> Tensor:
    """β_i = Softmax(K·Norm(τ_i²)) ⊙ Σ_j Softmax(Norm(τ_i ⊙ τ_j)) for every task, ``[K, n]``."""
    K = flat.shape[0]
    rows = []
    for i in range(K):
        intra = _pcb_exponents(flat, stats, i, i, float(K)) / float(stats.z_intra[i])
        inter = sum(_pcb_exponents(flat, stats, i, j, 1.0) / float(stats.z_inter[i, j]) for j in range(K))
        rows.append(intra * inter)
    return torch.stack(rows)


def pcb_paper_statistics(run: Callable[[Callable[[Tensor], None]], None], K: int, density: float,
                         threshold_of: Callable[..., Tensor]) -> PCBPaperStats:
    """The three passes of PCB's paper formulation over whatever ``run`` visits (one tensor or the model)."""
    stats = PCBPaperStats(torch.full((K, K), math.inf, dtype=torch.float64),
                          torch.full((K, K), -math.inf, dtype=torch.float64))
    run(lambda flat: pcb_minmax(flat, stats))
    stats.z_intra = torch.zeros(K, dtype=torch.float64)
    stats.z_inter = torch.zeros(K, K, dtype=torch.float64)
    run(lambda flat: pcb_exp_sums(flat, stats))
    stats.thresholds = threshold_of(lambda flat: list(pcb_beta(flat, stats)), K, density)
    return stats


def pcb_paper_merge(flat: Tensor, stats: PCBPaperStats) -> Tensor:
    """τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i (0 where Σ β̂ = 0), β̂_i = β_i where β_i ≥ its threshold."""
    beta = pcb_beta(flat, stats)
    beta = torch.where(beta >= stats.thresholds.to(beta)[:, None], beta, torch.zeros_like(beta))
    numerator, total = (beta * flat).sum(0), beta.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, numerator / safe, torch.zeros_like(total))


@dataclass
class PCBReleasedStats:
    """Whole-scope quantities of the authors' ``PCB_merge``: |τ| clamp bounds (order statistics), |τ|
    min/max, the score floor (an order statistic) and the score maximum."""

    clamp_lo: Tensor
    clamp_hi: Tensor
    mag_min: Tensor
    mag_max: Tensor
    floor: Tensor | None = None
    score_max: Tensor | None = None


def _clamped(row: Tensor, stats: PCBReleasedStats, i: int) -> tuple[Tensor, float, float]:
    lo, hi = float(stats.clamp_lo[i]), float(stats.clamp_hi[i])
    mags = torch.clamp(row.abs(), min=lo, max=hi)
    lo_c = min(max(float(stats.mag_min[i]), lo), hi)
    hi_c = min(max(float(stats.mag_max[i]), lo), hi)
    return mags, lo_c, hi_c


def pcb_released_scores(flat: Tensor, stats: PCBReleasedStats) -> Tensor:
    """exp(K·Norm(clamp|τ_i|)²)·tanh(τ_i ⊙ Σ_j τ_j) per task, ``[K, n]``."""
    K = flat.shape[0]
    column_sum = flat.sum(0)
    rows = []
    for i in range(K):
        mags, lo_c, hi_c = _clamped(flat[i], stats, i)
        rows.append(torch.exp(K * _normalise(mags, lo_c, hi_c) ** 2) * torch.tanh(flat[i] * column_sum))
    return torch.stack(rows)


def pcb_released_statistics(run, K: int, density: float, clamp_ratio: float, order_statistics) -> PCBReleasedStats:
    """The passes of ``PCB_merge`` over whatever ``run`` visits (one tensor or the model)."""
    def clamp_indices(stream: int, n: int) -> list[int]:
        return [int(n * clamp_ratio), int(n * (1 - clamp_ratio) - 1)]

    bounds = order_statistics(lambda flat: [row.abs() for row in flat], K, clamp_indices)
    mag_min = torch.full((K,), math.inf, dtype=torch.float64)
    mag_max = torch.full((K,), -math.inf, dtype=torch.float64)

    def minmax(flat: Tensor) -> None:
        mags = flat.abs()
        torch.minimum(mag_min, mags.amin(1).double(), out=mag_min)
        torch.maximum(mag_max, mags.amax(1).double(), out=mag_max)

    run(minmax)
    stats = PCBReleasedStats(bounds[:, 0].float(), bounds[:, 1].float(), mag_min, mag_max)
    stats.floor = order_statistics(lambda flat: list(pcb_released_scores(flat, stats)), K,
                                   lambda s, n: [int(n * (1 - density))])[:, 0].float()
    stats.score_max = torch.full((K,), -math.inf, dtype=torch.float64)
    run(lambda flat: torch.maximum(stats.score_max, pcb_released_scores(flat, stats).amax(1).double(),
                                   out=stats.score_max))
    return stats


def pcb_released_merge(flat: Tensor, stats: PCBReleasedStats) -> Tensor:
    """``PCB_merge``'s merged (unscaled) vector for one chunk: scores floored at their order statistic,
    min-max normalised, weighting the clamped |τ| with τ's sign."""
    scores = pcb_released_scores(flat, stats)
    numerator, denominator = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
    for i in range(flat.shape[0]):
        floor, top = float(stats.floor[i]), float(stats.score_max[i])
        scale = _normalise(torch.clamp(scores[i], min=floor), floor, max(top, floor))
        mags, _, _ = _clamped(flat[i], stats, i)
        numerator += torch.sign(flat[i]) * mags * scale
        denominator += scale
    return numerator / denominator.clamp_min(1e-12)


def _tensor_order_statistics(flat: Tensor):
    """Order statistics over one ``[K, n]`` tensor (the tensor-scope counterpart of the model scan)."""
    def order_statistics(values_of, num_streams, indices) -> Tensor:
        return run_order_statistics(lambda fn: fn(flat), values_of, num_streams, indices)
    return order_statistics


@register("pcb", reference="Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS)")
@dataclass
class PCB(MergeMethod):
    """PCB-Merging: weight every entry of every task by intra- × inter-balancing scores, drop low scores,
    and take the score-weighted mean.

    Symbols (``formulation="paper"``: the paper's intra-balancing, inter-balancing, drop and rescale
    equations; Norm = min-max to [0, 1]; Softmax over the entries of the ``scope``):
    β_intra,i = Softmax(N·Norm(τ_i ⊙ τ_i)) (N = number of tasks); β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j));
    β_i = β_intra,i ⊙ β_inter,i; drop: m_i = β_i ≥ sorted(β_i)[(1−r)·D], i.e. keep the ⌈r·D⌉ largest
    (r = ``density``: the paper's ratio r is the share kept), β̂_i = m_i ⊙ β_i;
    τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i (0 where Σ β̂ = 0); θ_m = θ_pre + λ τ_m with λ = ``scaling``.
    ``scope="model"`` (default) normalises, soft-maxes and thresholds over the whole model per task as the
    authors' code does (computed exactly in statistics passes, one tensor at a time: min/max, softmax
    denominators, an exact two-pass quantile); ``"tensor"`` applies it per tensor.
    ``formulation="released_code"`` reproduces ``PCB_merge`` in the authors' ``pcb-merging.py``: |τ|
    clamped at its 0.01% / 99.99% order statistics, intra = exp(N·Norm(|τ|)²), inter = tanh(τ_i·Σ_j τ_j),
    scores below the (1−r) order statistic floored, min-max normalised, merged with the clamped τ.
    Defaults r = 0.1 (``pcb-merging.py``), λ = 1.0 (Eq. 6 is a weighted mean; the authors' ViT script
    uses r = 0.05, λ = 1.2).
    """

    density: float = 0.1
    scaling: float = 1.0
    scope: Literal["model", "tensor"] = "model"
    formulation: Literal["paper", "released_code"] = "paper"

    clamp_ratio = 1e-4

    def check(self) -> None:
        check_range("density", self.density, 0.0, 1.0, low_open=True)

    def _statistics(self, run, order_statistics, K: int):
        if self.formulation == "released_code":
            return pcb_released_statistics(run, K, self.density, self.clamp_ratio, order_statistics)
        indices = kth_largest_indices(lambda n: topk_count(n, self.density))
        return pcb_paper_statistics(run, K, self.density,
                                    lambda values_of, k, d: order_statistics(values_of, k, indices)[:, 0].float())

    def statistics(self, scan: Scan):
        if self.scope == "tensor":
            return None
        K = scan.ctx.num_tasks

        def run(fn) -> None:
            scan(lambda x: fn(x.stacked().reshape(K, -1)), "pcb statistics")

        return self._statistics(run, lambda values_of, n, idx: run_order_statistics(run, values_of, n, idx), K)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        flat = x.stacked().reshape(x.num_tasks, -1)
        if stats is None:
            stats = self._statistics(lambda fn: fn(flat), _tensor_order_statistics(flat), x.num_tasks)
        merge = pcb_released_merge if self.formulation == "released_code" else pcb_paper_merge
        return (self.scaling * merge(flat, stats)).reshape(x.shape)


pcb = functional(PCB)


# ---------------------------------------------------------------- TSV-Merging

@register("tsv", reference="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference "
                           "in Model Merging (CVPR), TSV-M")
@dataclass
class TSV(MergeMethod):
    """TSV-Merging: keep each task's top singular vectors per layer, whiten the concatenated bases, recombine.

    Symbols (TSV-M): for each 2-D tensor Δ_i = U_i Σ_i V_iᵀ, keep k = ⌊``rank_fraction``·min(m, n)⌋ triplets
    (default fraction 1/T, T tasks; at least 1); U = [U_1 … U_T], Σ = diag(Σ_1 … Σ_T), V = [V_1 … V_T];
    whitening (orthogonal Procrustes): U⊥ = P_U Q_Uᵀ from U = P_U S_U Q_Uᵀ, likewise V⊥;
    Δ_m = U⊥ Σ V⊥ᵀ, θ_m = θ_pre + α Δ_m with α = ``scaling`` (1.0). Tensors that are not 2-D (biases,
    norms, embeddings of other rank, convolutions) are averaged, as the authors' code does.
    """

    rank_fraction: float | None = None
    scaling: float = 1.0

    def check(self) -> None:
        if self.rank_fraction is not None:
            check_range("rank_fraction", self.rank_fraction, 0.0, 1.0, low_open=True)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        fraction = 1.0 / x.num_tasks if self.rank_fraction is None else self.rank_fraction
        if len(x.shape) == 2 and x.numel > 0:
            rank = max(1, math.floor(fraction * min(x.shape) + 1e-9))
            return self.scaling * linalg.tsv_merge_matrix(list(x.vectors()), rank)
        return self.scaling * x.stacked().mean(0)


tsv = functional(TSV)


# EMR-Merging and Twin-Merging register themselves on import.
from freemerge_pl.merging import emr as _emr  # noqa: F401
from freemerge_pl.merging import twin as _twin  # noqa: F401
