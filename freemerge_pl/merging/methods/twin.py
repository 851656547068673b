"""Twin-Merging (Lu et al. 2024): a shared task-arithmetic backbone plus, per task, the low-rank
"exclusive" knowledge θ_k − θ_shared stored as truncated-SVD factors.

Symbols (the paper's shared-expert and exclusive-knowledge steps): θ_shared = θ_pre + λ Σ_k v_k
(λ = ``scaling``); the twin vector of task k is v_k − λ Σ_j v_j = θ_k − θ_shared, compressed per ≥2-D
tensor (viewed as ``(shape[0], -1)``) to its rank-r truncated SVD, r = ⌈``rank_fraction``·min(m, n)⌉ (default 0.1: the released scripts' svd
mask rate 0.9; they floor, we take the ceiling so every tensor keeps at least one triplet); 1-D and
0-D tensors are stored dense. The router (semantics §5) mixes the twins per input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from freemerge_pl.errors import CheckpointMismatchError
from freemerge_pl.merging.base import DenseDeltaTaskModule, check_saved_keys
from freemerge_pl.merging.fourier import matrix_shape
from freemerge_pl.merging.linalg import truncated_svd_factors
from freemerge_pl.merging.method import (
    Context,
    Density,
    Finalized,
    Finite,
    KeyOutput,
    KeyTensors,
    MergeMethod,
)
from freemerge_pl.merging.registry import register

REFERENCE = ("Lu et al. 2024, Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging "
             "(NeurIPS)")


class LowRankTaskModule(DenseDeltaTaskModule):
    """An additive task module: per ≥2-D key the factors ``us`` = U·S ``[m, r]`` and ``vh`` = Vᵀ ``[r, n]``
    (buffers), per 1-D/0-D key a dense buffer. ``apply_(target, w)`` adds ``w·U S Vᵀ`` (fp32, one
    rounding) after saving the touched tensors; ``restore_`` writes them back bit-exactly.
    """

    def __init__(
        self,
        factors: dict[str, tuple[Tensor, Tensor]] | None = None,
        dense: dict[str, Tensor] | None = None,
        shapes: dict[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self._keys: list[str] = []
        self._kinds: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for key, (us, vh) in (factors or {}).items():
            j = len(self._keys)
            self.register_buffer(f"us_{j}", us)
            self.register_buffer(f"vh_{j}", vh)
            self._add(key, "lowrank", shapes[key] if shapes and key in shapes else [us.shape[0], vh.shape[1]])
        for key, t in (dense or {}).items():
            self.register_buffer(f"dense_{len(self._keys)}", t)
            self._add(key, "dense", list(t.shape))

    def _add(self, key: str, kind: str, shape: Sequence[int]) -> None:
        self._keys.append(key)
        self._kinds[key] = kind
        self._shapes[key] = list(shape)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def rank(self, key: str) -> int:
        """The stored rank of ``key`` (0 for a dense key)."""
        j = self._keys.index(key)
        return getattr(self, f"us_{j}").shape[1] if self._kinds[key] == "lowrank" else 0

    def delta(self, key: str) -> Tensor:
        """The dense fp32 change this module makes to ``key`` at weight 1 (U S Vᵀ or the dense tensor)."""
        j = self._keys.index(key)
        if self._kinds[key] == "dense":
            return getattr(self, f"dense_{j}").float()
        us, vh = getattr(self, f"us_{j}").float(), getattr(self, f"vh_{j}").float()
        return (us @ vh).reshape(self._shapes[key])

    def get_extra_state(self):
        return {"keys": self._keys, "kinds": self._kinds, "shapes": self._shapes}

    def to_tensors(self) -> dict[str, Tensor]:
        """``us_<j>``/``vh_<j>`` per low-rank key, ``dense_<j>`` per dense key (``get_extra_state``: which)."""
        return {n: t for n, t in self.state_dict().items() if isinstance(t, Tensor)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], extra: dict) -> LowRankTaskModule:
        """The module of ``to_tensors()`` and ``get_extra_state()``."""
        factors, dense = {}, {}
        for j, k in enumerate(extra["keys"]):
            if extra["kinds"][k] == "lowrank":
                factors[k] = (tensors[f"us_{j}"], tensors[f"vh_{j}"])
            else:
                dense[k] = tensors[f"dense_{j}"]
        module = cls(factors, dense, {k: extra["shapes"][k] for k in factors})
        if module.keys != list(extra["keys"]):  # the constructor numbers low-rank keys first, as when saved
            raise CheckpointMismatchError(f"key order {extra['keys'][:3]}...")
        return module

    def set_extra_state(self, state) -> None:
        check_saved_keys(state["keys"], self._keys, "low-rank task-module")

    def change(self, key: str, device: torch.device) -> Tensor:
        return self.delta(key).to(device)


def twin_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """r = ⌈rank_fraction · min(m, n)⌉ of the matrix view of ``shape``."""
    m, n = matrix_shape(tuple(shape))
    return min(m, n, max(1, math.ceil(rank_fraction * min(m, n) - 1e-9)))


@register("twin", reference=REFERENCE)
@dataclass
class Twin(MergeMethod):
    """Twin-Merging: task-arithmetic shared backbone + per-task low-rank twin vectors θ_k − θ_shared.

    Symbols in the module docstring. ``scaling`` λ of the shared task-arithmetic merge (0.3, the task-
    arithmetic default; the authors' RoBERTa scripts use 0.29); ``rank_fraction`` (0.1). ``delta`` is the
    shared merge; ``task_modules[k]`` adds the rank-r twin of task k.
    """

    produces_task_modules = True

    scaling: Finite = 0.3
    rank_fraction: Density = 0.1

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> KeyOutput:
        stacked = x.stacked()
        shared = self.scaling * stacked.sum(0)
        pieces = []
        for k in range(x.num_tasks):
            diff = stacked[k] - shared
            if diff.dim() >= 2 and diff.numel() > 0:
                factors = truncated_svd_factors(diff.reshape(matrix_shape(diff.shape)),
                                                twin_rank(diff.shape, self.rank_fraction))
                pieces.append(("lowrank", factors))
            else:
                pieces.append(("dense", diff))
        return KeyOutput(shared, pieces)

    def finalize(self, pieces: dict[str, list], stats, ctx: Context) -> Finalized:
        modules = []
        for k in range(ctx.num_tasks):
            factors = {key: p[k][1] for key, p in pieces.items() if p[k][0] == "lowrank"}
            dense = {key: p[k][1] for key, p in pieces.items() if p[k][0] == "dense"}
            modules.append(LowRankTaskModule(factors, dense, {key: list(ctx.shapes[key]) for key in factors}))
        return Finalized(modules)

