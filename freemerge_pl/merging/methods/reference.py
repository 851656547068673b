"""The reference rows of a merging table as registry methods: ``pretrained`` (θ_pre, no task modules) and
``individual`` (each task's own fine-tuned model, as task modules that write θ_k's tensors over the backbone).

Neither reads task vectors: the backbone is θ_pre exactly (the delta is −0.0 everywhere: x + (−0.0) = x for every
float x, zeros of either sign included, so θ_pre comes back bit for bit from float32/bfloat16/float16
checkpoints), and ``individual`` copies each θ_k as its checkpoint stores it (``KeyTensors.finetuned``), so a
pre-filter (``fr_filter_ratio``) is refused. Each task keeps its own head (the adapter's heads), as for every
method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from freemerge_pl.merging.base import DenseDeltaTaskModule, KeyedBuffers, StateDict, resolve_tensor
from freemerge_pl.merging.method import Context, Finalized, KeyOutput, KeyTensors, MergeMethod
from freemerge_pl.merging.registry import register


def unchanged(x: KeyTensors, ctx: Context) -> Tensor:
    """A delta that leaves θ_pre bit-identical when added in float32: −0.0 everywhere."""
    return torch.full(x.shape, -0.0, dtype=torch.float32, device=ctx.device)


@register("pretrained", reference="the pre-trained model θ_pre with each task's head (paper tables' Pre-trained row)")
@dataclass
class Pretrained(MergeMethod):
    """Pre-trained: the backbone is θ_pre, unchanged; no task modules (nothing is routed), each task's own head."""

    uses_task_vectors = False

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> Tensor:
        return unchanged(x, ctx)


class FinetunedWeights(KeyedBuffers, DenseDeltaTaskModule):
    """Task k of ``individual``: θ_k's own tensors (buffers, in θ_k's dtype), written over the backbone's.

    ``apply_(target, w)`` saves each touched tensor whole and sets it to θ_k (w = 1: ``copy_``, bit-exact, not
    θ_pre + v_k with a rounding) or, for a weighted route, to ``t + w·(θ_k − t)`` (fp32, one rounding: a blend
    toward θ_k); ``restore_`` writes the saved tensors back bit-exactly. ``nbytes`` is a whole model's share
    per task: the storage an upper bound costs.
    """

    buffer_prefix = "weight_"
    saved_as = "fine-tuned weights"

    def __init__(self, tensors: StateDict | None = None) -> None:
        super().__init__()
        self._register_keyed(tensors)

    def to_tensors(self) -> StateDict:
        """θ_k's tensors under their own keys (the order is ``get_extra_state``'s)."""
        return {key: self.tensor(key).contiguous() for key in self._keys}

    @classmethod
    def from_tensors(cls, tensors: StateDict, extra: dict | None = None) -> FinetunedWeights:
        """The module of ``to_tensors()`` and ``get_extra_state()`` (None: the tensors' own order)."""
        keys = list(extra["keys"]) if extra else list(tensors)
        return cls({key: tensors[key] for key in keys})

    def apply_(self, target: nn.Module | StateDict, weight: float = 1.0) -> None:
        tensors = [resolve_tensor(target, key) for key in self._keys]  # fail before any write
        saved = []
        for key, t in zip(self._keys, tensors):
            old = t.clone()
            theta = self.tensor(key).to(t.device)
            if weight == 1.0:
                t.copy_(theta)
            else:
                t.copy_((t.float() + weight * (theta.float() - t.float())).to(t.dtype))
            saved.append((t, old))
        self._saved.append(saved)


@register("individual", reference="each task's own fine-tuned model θ_k with its head (paper tables' Individual row)")
@dataclass
class Individual(MergeMethod):
    """Individual: task k runs its own fine-tuned model θ_k (bit-exact) with its own head; backbone θ_pre.

    Task modules (``FinetunedWeights``) write θ_k's tensors over the backbone for the samples of task k, so with
    ``routing: oracle`` every task scores exactly as its fine-tuned model does (the paper tables' reference row).
    With ``routing: router`` it is the upper bound of a router over whole models: every expert is exact, so only
    routing mistakes cost accuracy. Storage: one model per task. Keys excluded from merging (``exclude_keys``, e.g.
    a projection every task shares) and integer buffers stay θ_pre's, as in every merge.
    """

    produces_task_modules = True
    uses_task_vectors = False

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> KeyOutput:
        weights = [x.finetuned(k).detach().clone() for k in range(x.num_tasks)]  # owned copies
        return KeyOutput(unchanged(x, ctx), weights)

    def finalize(self, pieces: dict[str, list[Tensor]], stats, ctx: Context) -> Finalized:
        return Finalized([FinetunedWeights({key: weights[k] for key, weights in pieces.items()})
                          for k in range(ctx.num_tasks)])
