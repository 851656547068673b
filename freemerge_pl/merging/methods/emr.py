"""EMR-Merging (Huang et al. 2024): a unified task vector plus, per task, a bit-packed mask and a rescaler.

Symbols (semantics §6; the paper's Elect, Mask and Rescale steps): ε = sgn(Σ_k v_k) (``flag``; a zero sum
gives 0, so that entry stays θ_pre; the authors' code maps it to −1, which differs only where the sum is
exactly 0); M_k = (v_k ⊙ ε > 0) (``mask_k``); τ_uni = ε ⊙ max_k |v_k ⊙ M_k|;
λ_k = Σ_tensors mean|v_k| / Σ_tensors mean|τ_uni ⊙ M_k| (``rescaler_k``, sums of per-tensor means as in the
authors' code; 0 when the denominator is 0); task model k = θ_pre + λ_k · M_k ⊙ τ_uni.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from freemerge_pl.merging.base import DenseDeltaTaskModule, KeyedBuffers, check_saved_keys
from freemerge_pl.merging.method import Context, Finalized, KeyOutput, KeyTensors, MergeMethod, Scan
from freemerge_pl.merging.ops import column_blocks, masked, packbits, unpackbits
from freemerge_pl.merging.registry import register

REFERENCE = "Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging (NeurIPS)"


class EMRUnified(KeyedBuffers, nn.Module):
    """The unified task vector τ_uni shared by every task's ``EMRTaskModule`` (one buffer per key)."""

    buffer_prefix = "tau_"
    saved_as = "EMR unified-vector"

    def __init__(self, tau: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self._register_keyed(tau)

    def to_tensors(self) -> dict[str, Tensor]:
        """``tau_<j>`` per key (the keys, in order, are ``get_extra_state``'s)."""
        return {f"tau_{j}": self.tensor(k) for j, k in enumerate(self._keys)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], extra: dict) -> EMRUnified:
        """The module of ``to_tensors()`` and ``get_extra_state()``."""
        return cls({k: tensors[f"tau_{j}"] for j, k in enumerate(extra["keys"])})


class EMRTaskModule(DenseDeltaTaskModule):
    """Task k of EMR-Merging: bit-packed masks M_k (uint8 buffers) and the rescaler λ_k (a buffer).

    It refers to the shared ``EMRUnified`` without registering it (the owner registers that once), so
    ``nbytes`` and the state dict hold only the packed masks and the rescaler. Applied to a backbone
    holding θ_pre + τ_uni, ``apply_(target, w)`` adds ``w·(λ_k M_k − 1) ⊙ τ_uni`` (fp32, one rounding),
    giving θ_pre + λ_k M_k ⊙ τ_uni at w = 1; ``restore_`` writes the saved tensors back bit-exactly.
    """

    def __init__(
        self,
        masks: dict[str, Tensor] | None = None,
        rescaler: float = 1.0,
        unified: EMRUnified | None = None,
    ) -> None:
        super().__init__()
        self._keys: list[str] = []
        self._shapes: dict[str, list[int]] = {}
        for key, mask in (masks or {}).items():
            self.register_buffer(f"mask_{len(self._keys)}", packbits(mask.bool()))
            self._shapes[key] = list(mask.shape)
            self._keys.append(key)
        device = next(iter(masks.values())).device if masks else None
        self.register_buffer("rescaler", torch.tensor(float(rescaler), dtype=torch.float32, device=device))
        self.bind(unified)

    def bind(self, unified: EMRUnified | None) -> EMRTaskModule:
        """Point this module at the shared unified vector (kept out of the module tree on purpose)."""
        self.__dict__["_unified"] = unified
        return self

    @property
    def unified(self) -> EMRUnified:
        unified = self.__dict__.get("_unified")
        if unified is None:
            raise RuntimeError("EMRTaskModule has no unified vector: "
                               "call bind(shared_modules['emr_unified'])")
        return unified

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def mask(self, key: str) -> Tensor:
        """The boolean mask M_k of ``key``, unpacked, in its tensor shape."""
        packed = getattr(self, f"mask_{self._keys.index(key)}")
        shape = self._shapes[key]
        numel = 1
        for n in shape:
            numel *= n
        return unpackbits(packed, numel).reshape(shape)

    def get_extra_state(self):
        return {"keys": self._keys, "shapes": self._shapes}

    def to_tensors(self) -> dict[str, Tensor]:
        """The packed masks ``mask_<j>`` and the ``rescaler`` (the unified vector is saved once, on its own)."""
        return {n: t for n, t in self.state_dict().items() if isinstance(t, Tensor)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], extra: dict) -> EMRTaskModule:
        """The module of ``to_tensors()`` and ``get_extra_state()``, unbound (``bind`` the unified vector)."""
        shapes = extra["shapes"]
        masks = {k: unpackbits(tensors[f"mask_{j}"], math.prod(shapes[k])).reshape(shapes[k])
                 for j, k in enumerate(extra["keys"])}
        return cls(masks, float(tensors["rescaler"]))

    def set_extra_state(self, state) -> None:
        check_saved_keys(state["keys"], self._keys, "EMR task-module")

    def change(self, key: str, device: torch.device) -> Tensor:
        tau = self.unified.tensor(key).to(device=device, dtype=torch.float32)
        return (float(self.rescaler) * self.mask(key).to(device).to(torch.float32) - 1.0) * tau


def emr_unify(vectors) -> tuple[Tensor, Tensor]:
    """Per tensor, from its K task vectors (a list or a ``[K, *shape]`` stack): (τ_uni, masks M_k as bool
    ``[K, *shape]``), column block by column block (``ops.column_blocks``: per-column steps, the values of the
    whole-stack formula without its full-size temporaries).

    Where M_k holds, v_k·sgn(Σ v) > 0 means the flag is ±1 and the product is |v_k| exactly (a sign flip),
    so the elected maximum reads the product instead of a second |v| pass."""
    rows = [v.reshape(-1) for v in vectors]
    shape = vectors[0].shape
    tau = rows[0].new_empty(rows[0].numel())
    masks = torch.empty(len(rows), rows[0].numel(), dtype=torch.bool, device=rows[0].device)
    for s, block in column_blocks(rows):
        flag = torch.sign(block.sum(0))
        signed = block * flag
        agree = signed > 0
        masks[:, s:s + block.shape[1]] = agree
        tau[s:s + block.shape[1]] = flag * masked(signed, agree).amax(0)
    return tau.reshape(shape), masks.reshape(len(rows), *shape)


@dataclass
class EMRStats:
    """Σ_tensors mean|v_k| and Σ_tensors mean|τ_uni ⊙ M_k| per task (float64 [K] each); ``unified``: each
    key's (τ_uni, masks) from the statistics pass, taken by the merge pass (the merge keeps every key's
    masks until the task modules are built, so holding them from the statistics pass adds nothing at peak)."""

    numerator: Tensor
    denominator: Tensor
    unified: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def rescalers(self) -> Tensor:
        """λ_k = numerator / denominator (0 where the denominator is 0)."""
        den = self.denominator
        return torch.where(den > 0, self.numerator / den.clamp_min(1e-300), torch.zeros_like(self.numerator))


def emr_fold(stats: EMRStats, vectors, key: str | None = None) -> None:
    """Statistics pass of EMR for one key's K task vectors (a list or ``[K, *shape]``): add its per-task means
    (empty keys add nothing); with ``key``, keep its (τ_uni, masks) in ``stats.unified``. The means are float64
    means of float64 copies (``x.double().mean()``), each written into one reused float64 buffer."""
    if vectors[0].numel() == 0:
        return
    tau, masks = emr_unify(vectors)
    if key is not None:
        stats.unified[key] = (tau, masks)
    magnitude = tau.abs().reshape(-1).double()  # |τ_uni ⊙ M_k| = |τ_uni| where M_k, else 0
    wide, zero = torch.empty_like(magnitude), magnitude.new_zeros(())
    finite = math.isfinite(float(magnitude.sum()))  # then |τ|·M_k (1 or +0.0) is the where, and faster
    for k, v in enumerate(vectors):
        stats.numerator[k] += float(wide.copy_(v.reshape(-1)).abs_().mean())
        mask = masks[k].reshape(-1)
        masked = torch.mul(magnitude, mask, out=wide) if finite else torch.where(mask, magnitude, zero, out=wide)
        stats.denominator[k] += float(masked.mean())


@register("emr", reference=REFERENCE)
@dataclass
class EMR(MergeMethod):
    """EMR-Merging: backbone θ_pre + τ_uni, plus per task a bit-packed mask and a rescaler (tuning-free).

    See the module docstring for the symbols. ``delta`` = τ_uni; ``task_modules[k]`` turns the backbone
    into θ_pre + λ_k M_k ⊙ τ_uni; the shared τ_uni is ``shared_modules["emr_unified"]``. The rescalers are
    a statistics pass over every tensor; the masks are built in the merge pass.
    """

    produces_task_modules = True

    def statistics(self, scan: Scan) -> EMRStats:
        K = scan.ctx.num_tasks
        stats = EMRStats(torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64))
        scan(lambda x: emr_fold(stats, list(x.vectors()), x.key), "emr rescalers")
        return stats

    def merge_key(self, x: KeyTensors, stats: EMRStats, ctx: Context) -> KeyOutput:
        unified = stats.unified.pop(x.key, None)
        tau, masks = emr_unify(list(x.vectors())) if unified is None else unified
        return KeyOutput(tau, (tau.clone(), masks))  # the engine owns (and may update) the delta

    def finalize(self, pieces: dict[str, tuple[Tensor, Tensor]], stats: EMRStats, ctx: Context) -> Finalized:
        rescalers = stats.rescalers()
        unified = EMRUnified({key: tau for key, (tau, _) in pieces.items()})
        modules = [EMRTaskModule({key: masks[k] for key, (_, masks) in pieces.items()}, float(rescalers[k]),
                                 unified) for k in range(ctx.num_tasks)]
        return Finalized(modules, {"emr_unified": unified}, {"rescalers": rescalers.tolist()})

