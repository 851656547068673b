"""TSV-Merging (semantics §6): each task's top singular vectors per 2-D tensor, whitened and recombined."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from freemerge_pl.merging.linalg import tsv_merge_matrix
from freemerge_pl.merging.method import Context, Density, Finite, KeyTensors, MergeMethod
from freemerge_pl.merging.registry import register


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

    rank_fraction: Density | None = None
    scaling: Finite = 1.0

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        fraction = 1.0 / x.num_tasks if self.rank_fraction is None else self.rank_fraction
        if len(x.shape) == 2 and x.numel > 0:
            rank = max(1, math.floor(fraction * min(x.shape) + 1e-9))
            return self.scaling * tsv_merge_matrix(list(x.vectors()), rank)
        return self.scaling * x.stacked().mean(0)
