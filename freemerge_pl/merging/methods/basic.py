"""Cost-free baselines that add (masked) task vectors (semantics §6): weight averaging, task arithmetic and
Model Breadcrumbs. The sign-electing family (TIES, DARE, DELLA) is in ``ties.py``, PCB-Merging in ``pcb.py``,
TSV-Merging in ``tsv.py``, EMR-Merging in ``emr.py`` and Twin-Merging in ``twin.py``.

Every method is a typed configuration (``MergeMethod``) with a per-tensor kernel ``merge_key`` on one key's
fp32 task vectors ``v_k = θ_k − θ_pre`` and, where it needs model-wide quantities (TIES/PCB model-scope
thresholds), a ``statistics`` pass; the backbone is ``θ_pre + delta``. The building blocks (trim, sign
election, disjoint merge, drops) live in ``ops.py`` and ``topk.py`` and are shared. Random methods draw from
the engine's seeded generator key by key, task by task, in key order (replayed identically in every pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.method import Context, Finite, KeyTensors, MergeMethod, Unit
from freemerge_pl.merging.ops import masked, task_weights
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import magnitude_band_mask
from freemerge_pl.settings import Range

# ---------------------------------------------------------------- weight averaging, task arithmetic

@register("weight_averaging", reference="Wortsman et al. 2022 (model soups); semantics §6")
@dataclass
class WeightAveraging(MergeMethod):
    """Weight averaging: θ_m = (1/K) Σ_k θ_k, i.e. delta = (1/K) Σ_k v_k."""

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        return x.weighted_sum().div_(x.num_tasks)


@register("linear", reference="mergekit's linear (Wortsman et al. 2022, model soups): Σ_k w_k θ_k / Σ_k w_k")
@dataclass
class Linear(MergeMethod):
    """mergekit's ``linear``: θ_m = Σ_k w_k θ_k (divided by Σ_k w_k when ``normalize``), from the fine-tuned
    checkpoints themselves, θ_pre unused (the streaming job does not read it).

    ``weights`` w_k: one per fine-tuned model (the merge job's ``models[].parameters.weight``; default all 1,
    i.e. the plain average). Computed as mergekit computes it, in float32 (float64 for float64 checkpoints):
    a zero tensor, ``addcmul_`` of each θ_k times its weight in model order, then one division by Σ w_k, so
    the output equals mergekit's bit for bit. ``weight_averaging`` computes the same average as θ_pre + the
    mean task vector (one more input read; the two differ by float rounding only).
    """

    weights: list[Finite] | None = None
    normalize: bool = True

    uses_task_vectors = False
    output_is_weights = True

    def begin(self, ctx: Context) -> None:
        w = task_weights(self.weights, ctx.num_tasks)
        if self.normalize and float(w.sum()) == 0.0:
            raise HyperparameterError(f"linear.weights={self.weights} sum to 0: normalize=true divides by the "
                                      f"sum; use other weights or normalize=false")

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        first = x.finetuned(0)
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = task_weights(self.weights, x.num_tasks).to(dtype)
        coefficient = (1,) * len(x.shape)
        result = torch.zeros(x.shape, dtype=dtype, device=first.device)
        for k, w_k in enumerate(w.to(first.device).unbind(0)):
            theta = first if k == 0 else x.finetuned(k).to(first.device)  # each checkpoint read once
            result.addcmul_(theta, w_k.reshape(coefficient))
        if self.normalize:
            result.div_(w.sum().to(first.device).reshape(coefficient))
        return result


@register("task_arithmetic", reference="Ilharco et al. 2023, Editing Models with Task Arithmetic")
@dataclass
class TaskArithmetic(MergeMethod):
    """Task arithmetic: θ_m = θ_pre + λ Σ_k v_k, with ``scaling`` λ (paper default 0.3)."""

    scaling: Finite = 0.3

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        return x.weighted_sum().mul_(self.scaling)


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

    drop_top: Unit = 0.01
    drop_bottom: Unit = 0.9
    scaling: Finite = 0.3

    def check(self) -> None:
        total = self.drop_top + self.drop_bottom
        Range(0, 1, high_open=True).check("breadcrumbs.drop_top + drop_bottom", total)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        total = torch.zeros(x.shape, dtype=torch.float32, device=ctx.device)
        for v in x.vectors():
            total = total.to(v.device)
            total += masked(v, magnitude_band_mask(v, self.drop_top, self.drop_bottom))
        return self.scaling * total
