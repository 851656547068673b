"""The sign-electing baselines (semantics §6): TIES-Merging (trim, elect, disjoint mean), DARE (random drop
and rescale, then task arithmetic or TIES) and DELLA-Merging (magnitude-ranked random drop, elect, disjoint
mean).

Random methods draw from the engine's seeded generator key by key, task by task, in key order (replayed
identically in every pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.method import Context, Density, Finite, KeyTensors, MergeMethod, Rate, Scan, Unit
from freemerge_pl.merging.ops import (
    column_blocks,
    magprune,
    per_task,
    random_drop,
    task_weights,
    ties_combine,
)
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import (
    exact_count_trim,
    flat_chunks,
    magnitude_trim,
    model_thresholds,
    topk_count,
    topk_cut,
)
from freemerge_pl.settings import Range

# ---------------------------------------------------------------- TIES


def ties_merge(vectors: list[Tensor], weights: Tensor, sign_election: str = "unweighted",
               thresholds: Tensor | None = None) -> Tensor:
    """``ties_combine`` of the K task vectors trimmed to ``|v_k| >= thresholds[k]`` (``topk.magnitude_trim``;
    None: no trim), column block by column block (``ops.column_blocks``: every step is per column, so the
    values of the whole-stack formula, without its ``[K, *shape]`` stack or full-size temporaries)."""
    rows = [v.reshape(-1) for v in vectors]
    out = rows[0].new_empty(rows[0].numel())
    for s, block in column_blocks(rows):
        if thresholds is not None:
            block = magnitude_trim(block, 1.0, thresholds)
        out[s:s + block.shape[1]] = ties_combine(block, weights, sign_election)
    return out.reshape(vectors[0].shape)


TrimTies = Literal["keep_all", "exact_count"]


def check_weights(weights: Sequence[float] | None, num_tasks: int) -> None:
    task_weights(weights, num_tasks)


def check_trim_ties(owner: str, trim_ties: str, trim_scope: str) -> None:
    if trim_ties == "exact_count" and trim_scope != "tensor":
        raise HyperparameterError(f"{owner}.trim_ties='exact_count' needs trim_scope='tensor' (mergekit's "
                                  f"per-tensor count), got trim_scope={trim_scope!r}")


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

    ``trim_ties`` — which entries tied at the trim threshold are kept:
    ``"keep_all"`` (default): every |v| ≥ the ⌈k·N⌉-th largest, so a task may keep a few entries more than
    ⌈k·N⌉; the rule of the TIES authors' code and FusionBench (a threshold compare), independent of any
    sort order, and the only one the model-wide exact quantile can apply without a second ranking pass.
    ``"exact_count"``: mergekit's rule (``sparsify.magnitude``), exactly ``max(1, int(k·N))`` entries per
    tensor and task, the first of ``torch.argsort(|v|, descending=True)`` (the same call, so ties break as
    in mergekit); needs ``trim_scope="tensor"``. bf16 task vectors tie by the thousands at the threshold,
    where the two rules differ.
    """

    density: Density = 0.2
    trim_scope: Literal["model", "tensor"] = "model"
    trim_ties: TrimTies = "keep_all"
    sign_election: Literal["unweighted", "weighted"] = "unweighted"
    weights: list[Finite] | None = None
    scaling: Finite = 1.0

    def check(self) -> None:
        check_trim_ties("ties", self.trim_ties, self.trim_scope)

    def begin(self, ctx: Context) -> None:
        check_weights(self.weights, ctx.num_tasks)

    def trimmed_vectors(self, x: KeyTensors, ctx: Context) -> list[Tensor]:
        """The task vectors TIES trims (DARE+TIES overrides this with the dropped ones)."""
        return list(x.vectors())

    def statistics(self, scan: Scan):
        if self.trim_scope == "model" and self.density < 1 and self.trim_ties == "keep_all":
            return model_thresholds(scan, lambda x: self.trimmed_vectors(x, scan.ctx), scan.ctx.num_tasks,
                                    self.density, "trim threshold")
        return None

    def merge_key(self, x: KeyTensors, thresholds, ctx: Context) -> Tensor:
        vectors = self.trimmed_vectors(x, ctx)
        if self.density < 1 and self.trim_ties == "exact_count":
            vectors, thresholds = list(exact_count_trim(torch.stack(vectors), self.density)), None
        elif self.density < 1 and thresholds is None:  # per tensor: each task's ⌈k·N⌉-th largest |v|
            count = topk_count(x.numel, self.density)
            thresholds = torch.tensor([topk_cut(lambda v=v: flat_chunks(v), x.numel, count).threshold
                                       for v in vectors], dtype=torch.float32)
        weights = task_weights(self.weights, x.num_tasks)
        return self.scaling * ties_merge(vectors, weights, self.sign_election, thresholds)


# ---------------------------------------------------------------- DARE

@register("dare", reference="Yu et al. 2024, Language Models are Super Mario (ICML), DARE drop-and-rescale")
@dataclass
class DARE(MergeMethod):
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p), then merge.

    Symbols (the paper's drop-and-rescale equations): p = ``drop_rate`` (0.9), m ~ Bernoulli(p),
    ṽ = (1 − m) ⊙ v / (1 − p) (``rescale=False`` keeps ṽ = (1 − m) ⊙ v, the un-rescaled convention).
    Then ``merge``:
    ``"task_arithmetic"``: λ Σ_k w_k ṽ_k; ``"ties"``: TIES on ṽ_k (trim to ``ties_density`` — 1.0 = no
    further trim, as mergekit's dare_ties — over ``trim_scope``, ties at the threshold by ``trim_ties``
    as in TIES: ``"keep_all"`` default, ``"exact_count"`` mergekit's int(d·N)), elect by ``sign_election``, disjoint
    mean), times λ = ``scaling`` (0.3, the task-arithmetic default; the paper tunes it per merge).
    Deviation: mergekit's dare_ties sums the agreeing entries without dividing; we take TIES's mean.
    Reproducible under the run's seed (the engine's generator, replayed per key in every pass).
    """

    random = True

    drop_rate: Rate = 0.9
    rescale: bool = True
    merge: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scaling: Finite = 0.3
    weights: list[Finite] | None = None
    ties_density: Density = 1.0
    trim_scope: Literal["model", "tensor"] = "model"
    trim_ties: TrimTies = "keep_all"
    sign_election: Literal["unweighted", "weighted"] = "unweighted"

    def check(self) -> None:
        check_trim_ties("dare", self.trim_ties, self.trim_scope)
        self._ties = TIES(density=self.ties_density, trim_scope=self.trim_scope, trim_ties=self.trim_ties,
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
    the authors' example command (declare-lab/della README). DELLA has no count trim (so no
    ``trim_ties``): entries tied in |v| are ranked in index order (a stable sort).
    """

    random = True

    drop_rate: Rate = 0.3
    epsilon: Unit = 0.14
    rescale: bool = True
    sign_election: Literal["unweighted", "weighted"] = "unweighted"
    weights: list[Finite] | None = None
    scaling: Finite = 1.1

    def check(self) -> None:
        probability = Range(0, 1, high_open=True)
        probability.check("della.drop_rate - epsilon/2", self.drop_rate - self.epsilon / 2)
        probability.check("della.drop_rate + epsilon/2", self.drop_rate + self.epsilon / 2)

    def begin(self, ctx: Context) -> None:
        check_weights(self.weights, ctx.num_tasks)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        generator = ctx.rng(x.key)
        pruned = [magprune(v, self.drop_rate, self.epsilon, generator, self.rescale) for v in x.vectors()]
        return self.scaling * ties_merge(pruned, task_weights(self.weights, x.num_tasks), self.sign_election)
