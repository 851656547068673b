"""Cost-free baselines (DESIGN §6): weight averaging, task arithmetic, TIES, DARE, Breadcrumbs, DELLA,
PCB-Merging and TSV-Merging here; EMR-Merging in ``emr.py`` and Twin-Merging in ``twin.py``.

Every method is ``fn(task_vectors, *, hyperparameters...) -> MergeResult`` with fp32 task vectors
``v_k = θ_k − θ_pre`` (key → tensor, the same keys in each); the backbone is ``θ_pre + delta``. The
building blocks (trim, sign election, disjoint merge, drops) live in ``ops.py`` and are shared.
Random methods take the driver's seeded ``generator`` and draw key by key, task by task, in key order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freemerge_pl.errors import check_range
from freemerge_pl.merging.base import MergeResult, StateDict, stack
from freemerge_pl.merging.ops import (
    SIGN_ELECTIONS,
    TRIM_SCOPES,
    check_choice,
    kth_largest_rows,
    magnitude_band_mask,
    magnitude_trim,
    magprune,
    method_keys,
    minmax_rows,
    model_trim_thresholds,
    per_task,
    random_drop,
    task_weights,
    ties_combine,
    trim_thresholds,
)
from freemerge_pl.merging.registry import register

DARE_MERGES = ("task_arithmetic", "ties")
PCB_FORMULATIONS = ("paper", "released_code")
PCB_SCOPES = ("model", "tensor")


def _default_generator(generator: torch.Generator | None,
                       task_vectors: Sequence[StateDict]) -> torch.Generator:
    """The driver's generator, or one seeded with 0 on the task vectors' device."""
    if generator is not None:
        return generator
    device = next(iter(task_vectors[0].values())).device if task_vectors[0] else torch.device("cpu")
    return torch.Generator(device=device).manual_seed(0)


# ---------------------------------------------------------------- weight averaging, task arithmetic

def _sum_fp32(task_vectors: Sequence[StateDict], key: str) -> Tensor:
    """``Σ_k v_k[key]`` in float32, accumulated in place into a fresh tensor (no [K, ...] stack: K× less
    memory and faster, as ``fr.fr_combine``); the inputs are never modified."""
    total = task_vectors[0][key].to(dtype=torch.float32, copy=True)
    for tv in task_vectors[1:]:
        total.add_(tv[key].to(device=total.device, dtype=torch.float32))
    return total


@register("weight_averaging", reference="Wortsman et al. 2022 (model soups); DESIGN §6")
def weight_averaging(task_vectors: list[StateDict]) -> MergeResult:
    """Weight averaging: θ_m = (1/K) Σ_k θ_k, i.e. delta = (1/K) Σ_k v_k."""
    keys = method_keys(task_vectors)
    return MergeResult({key: _sum_fp32(task_vectors, key).div_(len(task_vectors)) for key in keys})


@register("task_arithmetic", reference="Ilharco et al. 2023, Editing Models with Task Arithmetic")
def task_arithmetic(task_vectors: list[StateDict], *, scaling: float = 0.3) -> MergeResult:
    """Task arithmetic: θ_m = θ_pre + λ Σ_k v_k, with ``scaling`` λ (paper default 0.3)."""
    keys = method_keys(task_vectors)
    return MergeResult({key: _sum_fp32(task_vectors, key).mul_(scaling) for key in keys})


# ---------------------------------------------------------------- TIES

def _check_ties(density: float, trim_scope: str, sign_election: str) -> None:
    check_range("density", density, 0.0, 1.0, low_open=True)
    check_choice("trim_scope", trim_scope, TRIM_SCOPES)
    check_choice("sign_election", sign_election, SIGN_ELECTIONS)


def ties_delta(
    task_vectors: Sequence[StateDict],
    keys: Sequence[str],
    *,
    density: float,
    trim_scope: str,
    sign_election: str,
    weights: Sequence[float] | None,
    scaling: float,
) -> StateDict:
    """Trim (top ⌈k·N⌉ |v| per task, model- or tensor-wide), elect, disjoint-merge and scale."""
    w = task_weights(weights, len(task_vectors))
    thresholds = None
    if trim_scope == "model" and density < 1:
        thresholds = model_trim_thresholds(task_vectors, keys, density)
    delta = {}
    for key in keys:
        stacked = stack(task_vectors, key)
        if density < 1:
            stacked = magnitude_trim(stacked, density, thresholds)
        delta[key] = scaling * ties_combine(stacked, w, sign_election)
    return delta


@register("ties", reference="Yadav et al. 2023, TIES-Merging (NeurIPS), Alg. 1 (trim, elect, disjoint merge)")
def ties(
    task_vectors: list[StateDict],
    *,
    density: float = 0.2,
    trim_scope: str = "model",
    sign_election: str = "unweighted",
    weights: list[float] | None = None,
    scaling: float = 1.0,
) -> MergeResult:
    """TIES-Merging: trim each task vector to its top-k magnitudes, elect signs, disjoint mean.

    Symbols (Alg. 1): k = ``density`` (0.2: the top 20% |v_k| are kept, ties at the threshold too),
    over the whole model (``trim_scope="model"``: the paper's code, FusionBench) or per tensor
    (``"tensor"``: peft, mergekit); γ_m = sgn(Σ_k trimmed v_k) (a zero sum elects +);
    τ_m = mean over A = {k : v_k ≠ 0, sgn v_k = γ_m}; θ_m = θ_pre + λ τ_m with λ = ``scaling`` (1.0, the
    paper's ViT setting; FusionBench uses 0.3).
    ``sign_election="unweighted"`` (default, the paper and peft): elect on Σ v_k, merge Σ_A w_k v_k / |A|;
    ``"weighted"`` (mergekit): elect on Σ w_k v_k, merge Σ_A w_k v_k / Σ_A w_k. ``weights`` w_k default 1,
    where the two conventions coincide. Deviation: the paper's code keeps one entry more (it thresholds at
    the ⌊N(1−k)⌋-th smallest |v| inclusive); we keep ⌈k·N⌉.
    """
    _check_ties(density, trim_scope, sign_election)
    keys = method_keys(task_vectors)
    return MergeResult(ties_delta(task_vectors, keys, density=density, trim_scope=trim_scope,
                                  sign_election=sign_election, weights=weights, scaling=scaling))


# ---------------------------------------------------------------- DARE

@register("dare", reference="Yu et al. 2024, Language Models are Super Mario (ICML), DARE drop-and-rescale")
def dare(
    task_vectors: list[StateDict],
    *,
    drop_rate: float = 0.9,
    rescale: bool = True,
    merge: str = "task_arithmetic",
    scaling: float = 0.3,
    weights: list[float] | None = None,
    ties_density: float = 1.0,
    trim_scope: str = "model",
    sign_election: str = "unweighted",
    generator: torch.Generator | None = None,
) -> MergeResult:
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p), then merge.

    Symbols (the paper's drop-and-rescale equations): p = ``drop_rate`` (0.9), m ~ Bernoulli(p),
    ṽ = (1 − m) ⊙ v / (1 − p) (``rescale=False`` keeps ṽ = (1 − m) ⊙ v, the un-rescaled convention).
    Then ``merge``:
    ``"task_arithmetic"``: λ Σ_k w_k ṽ_k; ``"ties"``: TIES on ṽ_k (trim to ``ties_density`` — 1.0 = no
    further trim, as mergekit's dare_ties — over ``trim_scope``, elect by ``sign_election``, disjoint
    mean), times λ = ``scaling`` (0.3, the task-arithmetic default; the paper tunes it per merge).
    Deviation: mergekit's dare_ties sums the agreeing entries without dividing; we take TIES's mean.
    Reproducible under ``generator`` (the driver's seeded one; seed 0 when None).
    """
    check_range("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
    check_choice("merge", merge, DARE_MERGES)
    _check_ties(ties_density, trim_scope, sign_election)
    keys = method_keys(task_vectors)
    generator = _default_generator(generator, task_vectors)
    w = task_weights(weights, len(task_vectors))
    dropped: list[StateDict] = [{} for _ in task_vectors]
    for key in keys:
        for k, tv in enumerate(task_vectors):
            dropped[k][key] = random_drop(tv[key].float(), drop_rate, generator, rescale)
    if merge == "ties":
        delta = ties_delta(dropped, keys, density=ties_density, trim_scope=trim_scope,
                           sign_election=sign_election, weights=weights, scaling=scaling)
    else:
        delta = {}
        for key in keys:
            stacked = stack(dropped, key)
            delta[key] = scaling * (stacked * per_task(w, stacked)).sum(0)
    return MergeResult(delta)


# ---------------------------------------------------------------- Breadcrumbs

@register("breadcrumbs",
          reference="Davari & Belilovsky 2023, Model Breadcrumbs (mask both magnitude tails, then add)")
def breadcrumbs(
    task_vectors: list[StateDict],
    *,
    drop_top: float = 0.01,
    drop_bottom: float = 0.9,
    scaling: float = 0.3,
) -> MergeResult:
    """Model Breadcrumbs: per tensor, drop the largest β and smallest γ magnitudes, then task arithmetic.

    Symbols: β = ``drop_top`` (1%: the ⌊β·n⌋ largest |v| of each tensor, outliers), γ = ``drop_bottom``
    (90%: the ⌊γ·n⌋ smallest); θ_m = θ_pre + α Σ_k m_k ⊙ v_k with α = ``scaling`` (0.3, the
    task-arithmetic default; the paper tunes α with β, γ on validation data).
    """
    check_range("drop_top", drop_top, 0.0, 1.0)
    check_range("drop_bottom", drop_bottom, 0.0, 1.0)
    check_range("drop_top + drop_bottom", drop_top + drop_bottom, 0.0, 1.0, high_open=True)
    keys = method_keys(task_vectors)
    delta = {}
    for key in keys:
        total = torch.zeros_like(task_vectors[0][key], dtype=torch.float32)
        for tv in task_vectors:
            v = tv[key].float()
            total += torch.where(magnitude_band_mask(v, drop_top, drop_bottom), v, torch.zeros_like(v))
        delta[key] = scaling * total
    return MergeResult(delta)


# ---------------------------------------------------------------- DELLA

@register("della", reference="Deep et al. 2024, DELLA-Merging (MAGPRUNE, elect, fuse)")
def della(
    task_vectors: list[StateDict],
    *,
    drop_rate: float = 0.3,
    epsilon: float = 0.14,
    rescale: bool = True,
    sign_election: str = "unweighted",
    weights: list[float] | None = None,
    scaling: float = 1.1,
    generator: torch.Generator | None = None,
) -> MergeResult:
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
    check_range("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
    check_range("epsilon", epsilon, 0.0, 1.0)
    check_range("drop_rate - epsilon/2", drop_rate - epsilon / 2, 0.0, 1.0, high_open=True)
    check_range("drop_rate + epsilon/2", drop_rate + epsilon / 2, 0.0, 1.0, high_open=True)
    check_choice("sign_election", sign_election, SIGN_ELECTIONS)
    keys = method_keys(task_vectors)
    generator = _default_generator(generator, task_vectors)
    w = task_weights(weights, len(task_vectors))
    delta = {}
    for key in keys:
        pruned = torch.stack([magprune(tv[key].float(), drop_rate, epsilon, generator, rescale)
                              for tv in task_vectors])
        delta[key] = scaling * ties_combine(pruned, w, sign_election)
    return MergeResult(delta)


# ---------------------------------------------------------------- PCB-Merging

def pcb_score_paper(flat: Tensor, i: int, density: float) -> Tensor:
    """β̂_i of PCB (intra × inter balancing, top-r kept) for row ``i`` of ``[K, N]`` task vectors."""
    n_tasks, row = flat.shape[0], flat[i]
    beta = torch.softmax(n_tasks * minmax_rows((row * row)[None])[0], dim=0)
    inter = torch.zeros_like(row)
    for j in range(n_tasks):
        inter += torch.softmax(minmax_rows((row * flat[j])[None])[0], dim=0)
    beta *= inter
    keep = beta >= trim_thresholds(beta[None], density)[0]
    return torch.where(keep, beta, torch.zeros_like(beta))


def _sorted_at(values: Tensor, index: int) -> Tensor:
    """The value at ``index`` of the ascending sort of a 1-D tensor (``sorted(x)[index]``)."""
    return kth_largest_rows(values[None], values.numel() - index)[0]


def pcb_released_code(flat: Tensor, density: float, clamp_ratio: float = 1e-4) -> Tensor:
    """``PCB_merge`` of the authors' ``pcb-merging.py`` on ``[K, N]`` rows: the merged (unscaled) vector."""
    n_tasks, d = flat.shape
    column_sum = flat.sum(0)
    numerator, denominator = torch.zeros_like(column_sum), torch.zeros_like(column_sum)
    for row in flat:
        mags = row.abs()
        lo, hi = _sorted_at(mags, int(d * clamp_ratio)), _sorted_at(mags, int(d * (1 - clamp_ratio) - 1))
        mags = torch.minimum(torch.maximum(mags, lo), hi)
        score = torch.exp(n_tasks * minmax_rows(mags[None])[0] ** 2) * torch.tanh(row * column_sum)
        scale = minmax_rows(torch.maximum(score, _sorted_at(score, int(d * (1 - density))))[None])[0]
        numerator += torch.sign(row) * mags * scale
        denominator += scale
    return numerator / denominator.clamp_min(1e-12)


def _pcb_rows(flat: Tensor, density: float, formulation: str) -> Tensor:
    if formulation == "released_code":
        return pcb_released_code(flat, density)
    numerator, total = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
    for i in range(flat.shape[0]):
        beta = pcb_score_paper(flat, i, density)
        numerator += beta * flat[i]
        total += beta
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, numerator / safe, torch.zeros_like(total))


@register("pcb", reference="Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS)")
def pcb(
    task_vectors: list[StateDict],
    *,
    density: float = 0.1,
    scaling: float = 1.0,
    scope: str = "model",
    formulation: str = "paper",
) -> MergeResult:
    """PCB-Merging: weight every entry of every task by intra- × inter-balancing scores, drop low scores,
    and take the score-weighted mean.

    Symbols (``formulation="paper"``: the paper's intra-balancing, inter-balancing, drop and rescale
    equations; Norm = min-max to [0, 1]; Softmax over the entries of the ``scope``):
    β_intra,i = Softmax(N·Norm(τ_i ⊙ τ_i)) (N = number of tasks); β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j));
    β_i = β_intra,i ⊙ β_inter,i; drop: m_i = β_i ≥ sorted(β_i)[(1−r)·D], i.e. keep the ⌈r·D⌉ largest
    (r = ``density``: the paper's ratio r is the share kept), β̂_i = m_i ⊙ β_i;
    τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i (0 where Σ β̂ = 0); θ_m = θ_pre + λ τ_m with λ = ``scaling``.
    ``scope="model"`` (default) flattens the whole model per task as the authors' code does;
    ``"tensor"`` applies it per tensor.
    ``formulation="released_code"`` reproduces ``PCB_merge`` in the authors' ``pcb-merging.py``: |τ|
    clamped at its 0.01% / 99.99% order statistics, intra = exp(N·Norm(|τ|)²), inter = tanh(τ_i·Σ_j τ_j),
    scores below the (1−r) order statistic floored, min-max normalised, merged with the clamped τ.
    Defaults r = 0.1 (``pcb-merging.py``), λ = 1.0 (Eq. 6 is a weighted mean; the authors' ViT script
    uses r = 0.05, λ = 1.2).
    """
    check_range("density", density, 0.0, 1.0, low_open=True)
    check_choice("scope", scope, PCB_SCOPES)
    check_choice("formulation", formulation, PCB_FORMULATIONS)
    keys = method_keys(task_vectors)
    K = len(task_vectors)
    if scope == "tensor":
        delta = {}
        for key in keys:
            stacked = stack(task_vectors, key)
            delta[key] = scaling * _pcb_rows(stacked.reshape(K, -1), density, formulation).reshape(
                stacked.shape[1:])
        return MergeResult(delta)
    flat = torch.stack([torch.cat([tv[key].reshape(-1).float() for key in keys]) for tv in task_vectors])
    merged = scaling * _pcb_rows(flat, density, formulation)
    delta, start = {}, 0
    for key in keys:
        shape = task_vectors[0][key].shape
        n = task_vectors[0][key].numel()
        delta[key] = merged[start:start + n].reshape(shape)
        start += n
    return MergeResult(delta)


# ---------------------------------------------------------------- TSV-Merging

def polar_factor(x: Tensor) -> Tensor:
    """The orthogonal (Procrustes) factor P Qᵀ of ``x = P Σ Qᵀ``: the whitening step of TSV-M."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_merge_matrix(matrices: Sequence[Tensor], rank: int) -> Tensor:
    """TSV-M for one 2-D key: concatenate each task's top-``rank`` singular triplets, orthogonalise."""
    us, ss, vhs = [], [], []
    for m in matrices:
        u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vhs.append(vh[:rank])
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return polar_factor(u_cat) @ torch.diag(s_cat) @ polar_factor(vh_cat)


@register("tsv", reference="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference "
                           "in Model Merging (CVPR), TSV-M")
def tsv(
    task_vectors: list[StateDict],
    *,
    rank_fraction: float | None = None,
    scaling: float = 1.0,
) -> MergeResult:
    """TSV-Merging: keep each task's top singular vectors per layer, whiten the concatenated bases, recombine.

    Symbols (TSV-M): for each 2-D tensor Δ_i = U_i Σ_i V_iᵀ, keep k = ⌊``rank_fraction``·min(m, n)⌋ triplets
    (default fraction 1/T, T tasks; at least 1); U = [U_1 … U_T], Σ = diag(Σ_1 … Σ_T), V = [V_1 … V_T];
    whitening (orthogonal Procrustes): U⊥ = P_U Q_Uᵀ from U = P_U S_U Q_Uᵀ, likewise V⊥;
    Δ_m = U⊥ Σ V⊥ᵀ, θ_m = θ_pre + α Δ_m with α = ``scaling`` (1.0). Tensors that are not 2-D (biases,
    norms, embeddings of other rank, convolutions) are averaged, as the authors' code does.
    """
    keys = method_keys(task_vectors)
    K = len(task_vectors)
    fraction = 1.0 / K if rank_fraction is None else rank_fraction
    check_range("rank_fraction", fraction, 0.0, 1.0, low_open=True)
    delta = {}
    for key in keys:
        ref = task_vectors[0][key]
        if ref.dim() == 2 and ref.numel() > 0:
            rank = max(1, math.floor(fraction * min(ref.shape) + 1e-9))
            delta[key] = scaling * tsv_merge_matrix([tv[key] for tv in task_vectors], rank)
        else:
            delta[key] = scaling * stack(task_vectors, key).mean(0)
    return MergeResult(delta)


# EMR-Merging and Twin-Merging register themselves on import.
from freemerge_pl.merging import emr as _emr  # noqa: F401
from freemerge_pl.merging import twin as _twin  # noqa: F401
