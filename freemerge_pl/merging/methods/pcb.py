"""PCB-Merging (semantics §6): intra- × inter-balancing scores, drop of low scores, score-weighted mean; the
paper's formulation and the authors' released code, per tensor or over the whole model (statistics passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.merging.method import Context, Density, Finite, KeyTensors, MergeMethod, Scan
from freemerge_pl.merging.ops import masked
from freemerge_pl.merging.order_statistics import kth_largest_indices, run_order_statistics
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import topk_count


def _normalise(x: Tensor, lo: float, hi: float) -> Tensor:
    """Min-max normalisation with given bounds: (x − lo)/(hi − lo), 0 when hi = lo (``ops.minmax_rows``)."""
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


class KeyRows(list):
    """A key's K task vectors as flat rows (views: no ``[K, n]`` stack is built), with the key's name."""

    def __init__(self, x: KeyTensors) -> None:
        super().__init__(v.reshape(-1) for v in x.vectors())
        self.key = x.key


BETA_STORE_BYTES = 1 << 30
"""β of the keys seen by the threshold passes is kept for the merge up to this many bytes (recomputed after)."""


@dataclass
class PCBPaperStats:
    """Model- (or tensor-) wide quantities of PCB's paper formulation: min/max of τ_i ⊙ τ_j per pair, the
    softmax denominators, and each task's β threshold (keep the ⌈r·D⌉ largest); ``betas``: β of keys
    (``KeyRows``) computed for the thresholds, kept for the merge while they fit in ``BETA_STORE_BYTES``."""

    lo: Tensor
    hi: Tensor
    z_intra: Tensor | None = None
    z_inter: Tensor | None = None
    thresholds: Tensor | None = None
    betas: dict[str, Tensor] = field(default_factory=dict)

    def beta(self, rows) -> Tensor:
        """``pcb_beta(rows, self)``, from (or into) ``betas`` when ``rows`` carries its key."""
        key = getattr(rows, "key", None)
        if key in self.betas:
            return self.betas[key]
        beta = pcb_beta(rows, self)
        if key is not None and beta.nbytes + sum(b.nbytes for b in self.betas.values()) <= BETA_STORE_BYTES:
            self.betas[key] = beta
        return beta


def _pairs(K: int):
    return [(i, j) for i in range(K) for j in range(i, K)]


_BLOCK = 1 << 15  # columns per block of the paper kernels: a block's [K(K+1)/2, 32768] products stay in cache


class _PairKernel:
    """The paper formulation's elementwise work on column blocks of K task vectors, every pair at once.

    ``rows``: a ``[K, n]`` tensor or K flat tensors (``KeyRows``). Each block's pair products τ_i ⊙ τ_j
    (i ≤ j, ``_pairs`` order) are one ``[P, block]`` tensor (P = K(K+1)/2) and go through the same fp32
    operations, in the same order, as the per-pair formula (sub the minimum, div by max − min, mul/sub the
    softmax factor, exp, div by the denominator): elementwise, so bit for bit whatever the block; only the
    float64 denominators are summed block by block (float64 additions in another order). Blocks keep the ~50
    passes over the products in cache instead of memory."""

    def __init__(self, rows, stats: PCBPaperStats) -> None:
        self.rows = [r.reshape(-1) for r in rows]
        self.n = self.rows[0].numel()
        device = self.rows[0].device
        K = len(self.rows)
        pairs = _pairs(K)
        self.first = torch.tensor([i for i, _ in pairs])
        self.second = torch.tensor([j for _, j in pairs])
        self.diagonal = torch.tensor([p for p, (i, j) in enumerate(pairs) if i == j], device=device)
        self.start = [0]  # pair (i, j), i ≤ j, is row start[i] + j − i
        for i in range(K):
            self.start.append(self.start[-1] + K - i)
        self.stats = stats

    def blocks(self):
        """``(start, [K, block] copy of the columns)`` over the columns."""
        for s in range(0, self.n, _BLOCK):
            yield s, torch.stack([r[s:s + _BLOCK] for r in self.rows])

    def products(self, block: Tensor) -> Tensor:
        """τ_i ⊙ τ_j of every pair, ``[P, block]``."""
        K = block.shape[0]
        out = block.new_empty(self.start[-1], block.shape[1])
        for i in range(K):
            torch.mul(block[i], block[i:], out=out[self.start[i]:self.start[i + 1]])
        return out

    def inter_sums(self, terms: Tensor) -> Tensor:
        """Σ_j t(i, j) per task i, j = 0, 1, …, K − 1 in that order (fp32), t(i, j) = t(j, i) the pair rows
        of ``terms``: for each j at once over i ≥ j (the rows (j, i), i ≥ j, are contiguous), one row at a
        time for i < j (no copies)."""
        K = len(self.rows)
        acc = terms[:K].clone()  # t(i, 0) = row (0, i)
        for j in range(1, K):
            acc[j:] += terms[self.start[j]:self.start[j + 1]]
            for i in range(j):
                acc[i] += terms[self.start[i] + j - i]
        return acc

    def pair_values(self, m: Tensor) -> Tensor:
        """A float64 ``[K, K]`` statistic per pair, fp32 ``[P, 1]`` on the rows' device."""
        return m[self.first, self.second].float()[:, None].to(self.diagonal.device)

    def exponent_terms(self):
        """Per pair (fp32 ``[P, 1]``): min, max − min (as the per-pair formula's scalars: the float64
        difference rounded once), and which pairs have max ≤ min (Norm is 0 there: the term is exp(0) = 1)."""
        lo64, hi64 = self.stats.lo, self.stats.hi
        live = hi64 > lo64
        lo = self.pair_values(torch.where(live, lo64, 0.0))
        span = self.pair_values(torch.where(live, hi64 - lo64, 1.0))
        dead = ~live[self.first, self.second]
        return lo, span, dead.to(lo.device) if bool(dead.any()) else None

    def exponentials(self, block: Tensor, lo: Tensor, span: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(intra [K, block], inter [P, block])``: exp(f·Norm(p) − f) of the block's pair products p, f = K on
        the diagonal pairs (intra), f = 1 on every pair (inter); Norm(p) = (p − min)/(max − min) is computed
        once for every pair (the intra rows copy the diagonal's), then ×f, −f, exp, as the per-pair formula
        does (×1 skipped: x·1 = x exactly); 1 where the pair's max ≤ min (``exponent_terms``)."""
        p = self.products(block).sub_(lo).div_(span)
        K = float(len(self.rows))
        intra = p[self.diagonal]  # a copy
        if K != 1.0:
            intra.mul_(K)
        intra.sub_(K).exp_()
        p.sub_(1.0).exp_()
        if dead is not None:
            p[dead] = 1.0
            intra[dead[self.diagonal]] = 1.0
        return intra, p


def pcb_minmax(rows, stats: PCBPaperStats) -> None:
    """Fold one key's K task vectors (``[K, n]`` or flat rows) into the pairwise min/max of τ_i ⊙ τ_j."""
    kernel = _PairKernel(rows, stats)
    i, j = kernel.first, kernel.second
    for _, block in kernel.blocks():
        p = kernel.products(block)
        lo, hi = p.amin(1).double().cpu(), p.amax(1).double().cpu()  # (aminmax along rows is 10x slower)
        for a, b in ((i, j), (j, i)):
            stats.lo[a, b] = torch.minimum(stats.lo[a, b], lo)
            stats.hi[a, b] = torch.maximum(stats.hi[a, b], hi)


def pcb_exp_sums(rows, stats: PCBPaperStats) -> None:
    """Fold one key into the softmax denominators (intra: scale K on τ_i², inter: scale 1 per pair)."""
    kernel = _PairKernel(rows, stats)
    K = len(kernel.rows)
    lo, span, dead = kernel.exponent_terms()
    intra = torch.zeros(K, dtype=torch.float64, device=lo.device)
    inter = torch.zeros(len(kernel.first), dtype=torch.float64, device=lo.device)
    # on the CPU x.sum(1, dtype=float64) sums a fresh float64 copy of x: one reused row buffer (it stays in the
    # core's cache; the whole block's copy does not) gives the same sums, 1.7x faster
    cpu = lo.device.type == "cpu"
    wide = torch.empty(min(_BLOCK, kernel.n) if cpu else 0, dtype=torch.float64)

    def sums(x: Tensor) -> Tensor:
        if not cpu:
            return x.sum(1, dtype=torch.float64)
        return torch.stack([wide[:row.numel()].copy_(row).sum() for row in x.unbind(0)])

    for _, block in kernel.blocks():
        e_intra, e_inter = kernel.exponentials(block, lo, span, dead)
        intra += sums(e_intra)
        inter += sums(e_inter)
    stats.z_intra += intra.cpu()
    i, j, inter = kernel.first, kernel.second, inter.cpu()
    stats.z_inter[i, j] += inter
    off = i != j
    stats.z_inter[j[off], i[off]] += inter[off]


def _beta_blocks(rows, stats: PCBPaperStats, out: Tensor | None = None):
    """``(start, K task vectors' block, β of that block)`` over the column blocks (``pcb_beta``); β is written
    into ``out[:, block's columns]`` when given."""
    kernel = _PairKernel(rows, stats)
    lo, span, dead = kernel.exponent_terms()
    z_inter = kernel.pair_values(stats.z_inter)  # the divisions round z to fp32, as the per-pair formula did
    z_intra = stats.z_intra.float()[:, None].to(lo.device)
    for s, block in kernel.blocks():
        intra, inter = kernel.exponentials(block, lo, span, dead)
        intra.div_(z_intra)
        inter = kernel.inter_sums(inter.div_(z_inter))
        yield s, block, intra.mul_(inter) if out is None else torch.mul(intra, inter, out=out[:, s:s + block.shape[1]])


def pcb_beta(rows, stats: PCBPaperStats) -> Tensor:
    """β_i = Softmax(K·Norm(τ_i²)) ⊙ Σ_j Softmax(Norm(τ_i ⊙ τ_j)) for every task, ``[K, n]`` (``rows``: a
    ``[K, n]`` tensor or K flat task vectors).

    The inter term of (i, j) equals that of (j, i) bit for bit (τ_i ⊙ τ_j is commutative, min/max and the
    denominators are symmetric), so each pair is computed once; the sums over j keep their order
    (j = 0, 1, …, K − 1, in fp32)."""
    rows = [r.reshape(-1) for r in rows]
    beta = rows[0].new_empty(len(rows), rows[0].numel())
    for _ in _beta_blocks(rows, stats, out=beta):
        pass
    return beta


def pcb_paper_statistics(run: Callable[[Callable], None], K: int, density: float,
                         threshold_of: Callable[..., Tensor]) -> PCBPaperStats:
    """The passes of PCB's paper formulation over whatever ``run`` visits (one tensor or the model, as
    ``[K, n]`` tensors or ``KeyRows``): min/max, softmax denominators, then the thresholds from
    ``threshold_of(values_of, K, density)`` (β ≥ 0: its order statistics may be taken as magnitudes)."""
    stats = PCBPaperStats(torch.full((K, K), math.inf, dtype=torch.float64),
                          torch.full((K, K), -math.inf, dtype=torch.float64))
    run(lambda rows: pcb_minmax(rows, stats))
    stats.z_intra = torch.zeros(K, dtype=torch.float64)
    stats.z_inter = torch.zeros(K, K, dtype=torch.float64)
    run(lambda rows: pcb_exp_sums(rows, stats))
    stats.thresholds = threshold_of(lambda rows: list(stats.beta(rows)), K, density)
    return stats


def pcb_paper_merge(rows, stats: PCBPaperStats) -> Tensor:
    """τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i (0 where Σ β̂ = 0), β̂_i = β_i where β_i ≥ its threshold; block by block
    (each output entry from its own column: the values of the whole-tensor formula), β taken from (and
    removed from) ``stats.betas`` when the threshold passes kept it."""
    rows = rows if isinstance(rows, KeyRows) else [r.reshape(-1) for r in rows]
    beta = stats.betas.pop(getattr(rows, "key", None), None)
    thresholds = stats.thresholds.to(rows[0])[:, None]
    out = rows[0].new_empty(rows[0].numel())
    if beta is None:
        blocks = _beta_blocks(rows, stats)
    else:
        blocks = ((s, torch.stack([r[s:s + _BLOCK] for r in rows]), beta[:, s:s + _BLOCK])
                  for s in range(0, beta.shape[1], _BLOCK))
    # β ≥ t ⇔ β > the float32 just below t (β not NaN): ``threshold`` per row, 5× faster than ``where``
    finite = bool(torch.isfinite(thresholds).all())
    lows = torch.nextafter(thresholds, torch.tensor(-math.inf)).flatten().tolist() if finite else None
    for s, x, b in blocks:
        total = None
        if lows is not None:
            kept = torch.empty_like(b)
            for k, low in enumerate(lows):
                torch.threshold(b[k], low, 0.0, out=kept[k])
            total = kept.sum(0)
            if bool(total.isnan().any()):  # a NaN β (NaN inputs) is dropped by the comparison, kept here
                total = None
        if total is None:
            kept = torch.where(b >= thresholds, b, torch.zeros_like(b))
            total = kept.sum(0)
        b = kept
        numerator = (b * x).sum(0)
        # where(total > 0, numerator / total, 0) without torch's bool-condition where (Σβ̂ ≥ 0 or NaN): the
        # divisor is 1 where total ≤ 0, and the quotient is kept where total > 0
        safe = torch.le(total, 0, out=torch.empty_like(total)).add_(total)
        out[s:s + b.shape[1]] = masked(numerator / safe, total > 0)
    return out


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


def _tensor_order_statistics(flat):
    """Order statistics over one key (``[K, n]`` or ``KeyRows``; the tensor-scope counterpart of the scan)."""
    def order_statistics(values_of, num_streams, indices, *, absolute: bool = False) -> Tensor:
        return run_order_statistics(lambda fn: fn(flat), values_of, num_streams, indices, absolute=absolute)
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
        return pcb_paper_statistics(run, K, self.density, lambda values_of, k, d: order_statistics(
            values_of, k, indices, absolute=True)[:, 0].float())  # β ≥ 0: |β| has β's bits

    def _rows(self, x: KeyTensors):
        """The paper kernels read the K vectors as flat rows; the released code's works on the stack."""
        return x.stacked().reshape(x.num_tasks, -1) if self.formulation == "released_code" else KeyRows(x)

    def statistics(self, scan: Scan):
        if self.scope == "tensor":
            return None

        def run(fn) -> None:
            scan(lambda x: fn(self._rows(x)), "pcb statistics")

        def order_statistics(values_of, n, idx, *, absolute: bool = False) -> Tensor:
            return run_order_statistics(run, values_of, n, idx, absolute=absolute)

        return self._statistics(run, order_statistics, scan.ctx.num_tasks)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        rows = self._rows(x)
        if stats is None:
            stats = self._statistics(lambda fn: fn(rows), _tensor_order_statistics(rows), x.num_tasks)
        merge = pcb_released_merge if self.formulation == "released_code" else pcb_paper_merge
        return (self.scaling * merge(rows, stats)).reshape(x.shape)
