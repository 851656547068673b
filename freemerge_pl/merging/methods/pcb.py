"""PCB-Merging (semantics §6): intra- × inter-balancing scores, drop of low scores, score-weighted mean; the
paper's formulation and the authors' released code, per tensor or over the whole model (statistics passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.merging.method import Context, Density, Finite, KeyTensors, MergeMethod, Scan
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import kth_largest_indices, run_order_statistics, topk_count


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
    """exp(factor·Norm(τ_i ⊙ τ_j) − its maximum): the numerator of the (stable) softmax. In place on one
    fresh product (the same operations, in the same order, as the out-of-place formula: bit for bit)."""
    lo, hi = float(stats.lo[i, j]), float(stats.hi[i, j])
    if not hi > lo:  # Norm is 0 everywhere: exp(factor·0 − 0)
        return torch.ones_like(flat[i])
    p = flat[i] * flat[j]
    return p.sub_(lo).div_(hi - lo).mul_(factor).sub_(factor).exp_()


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


_PAIR_CACHE_BYTES = 1 << 30  # pcb_beta keeps the K(K+1)/2 inter terms of a chunk up to this size


def pcb_beta(flat: Tensor, stats: PCBPaperStats) -> Tensor:
    """β_i = Softmax(K·Norm(τ_i²)) ⊙ Σ_j Softmax(Norm(τ_i ⊙ τ_j)) for every task, ``[K, n]``.

    The inter term of (i, j) equals that of (j, i) bit for bit (τ_i ⊙ τ_j is commutative, min/max and the
    denominators are symmetric), so each pair is computed once while its K(K+1)/2 terms fit in
    ``_PAIR_CACHE_BYTES``; the sums over j keep their order."""
    K = flat.shape[0]
    cache: dict[tuple[int, int], Tensor] | None = (
        {} if K * (K + 1) // 2 * flat[0].numel() * flat.element_size() <= _PAIR_CACHE_BYTES else None)

    def inter_term(i: int, j: int) -> Tensor:
        pair = (min(i, j), max(i, j))
        if cache is not None and pair in cache:
            return cache.pop(pair) if i > j else cache[pair]
        term = _pcb_exponents(flat, stats, i, j, 1.0).div_(float(stats.z_inter[i, j]))
        if cache is not None and i < j:
            cache[pair] = term
        return term

    beta = torch.empty_like(flat)
    for i in range(K):
        intra = _pcb_exponents(flat, stats, i, i, float(K)).div_(float(stats.z_intra[i]))
        inter = inter_term(i, 0).clone() if K else torch.zeros_like(intra)
        for j in range(1, K):
            inter += inter_term(i, j)
        torch.mul(intra, inter, out=beta[i])
    return beta


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

    density: Density = 0.1
    scaling: Finite = 1.0
    scope: Literal["model", "tensor"] = "model"
    formulation: Literal["paper", "released_code"] = "paper"

    clamp_ratio = 1e-4

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
