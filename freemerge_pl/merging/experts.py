"""Lightweight experts (paper Eq. 4): top-d entries of each task vector, rescaled, stored sparse.

Symbols: ``expert_density`` d, the paper's M(v, d) keeps the top ⌈d·numel⌉ entries of v by |value|
(per tensor; ``expert_scope="model"`` uses one global threshold instead), and
``μ_k = −E(M(v_k, d)) · ln(d) / (λ_k · E(v_k))`` with ``E(x) = mean|x|`` over all entries (zeros of the
sparsified tensor included), computed at the scope of λ (semantics §8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, HyperparameterError, check_range
from freemerge_pl.merging.base import StateDict, TaskModule, resolve_tensor
from freemerge_pl.merging.quantile import magnitude_thresholds

EXPERT_SCOPES = ("tensor", "model")


def check_density(expert_density: float) -> None:
    check_range("expert_density", expert_density, 0.0, 1.0, low_open=True)


def topk_count(numel: int, density: float) -> int:
    """Number of entries an expert keeps in a tensor: ⌈d·numel⌉ (at least 1 for a non-empty tensor)."""
    return max(1, min(numel, math.ceil(density * numel - 1e-9))) if numel else 0


_CHUNK = 1 << 22  # elements per chunk (16 MiB of float32) of the large-tensor threshold and cut


def topk_selection(magnitudes: Tensor, count: int) -> tuple[float, int]:
    """``(t, ties)``: the ``count``-th largest of a flat tensor of magnitudes, and how many entries equal to
    t belong to the top ``count`` (the first ones by index). Enough to cut the same entries again later.

    Float32 tensors of ``_CHUNK`` elements or more: t from two radix-histogram passes over the float bits
    (non-negative floats order like their bit patterns), chunk by chunk, the same t as ``kthvalue``, which
    copies the tensor with int64 indices (3× its bytes) and took twice as long on 65 M elements."""
    if count <= 0:
        return math.inf, 0
    if magnitudes.numel() >= _CHUNK and magnitudes.dtype == torch.float32:
        found = _radix_kth_largest(magnitudes, count)
        if found is not None:
            return found
    t = magnitudes.kthvalue(magnitudes.numel() - count + 1).values
    return float(t), count - int((magnitudes > t).sum())


def _radix_kth_largest(magnitudes: Tensor, count: int) -> tuple[float, int] | None:
    """``topk_selection`` of finite non-negative float32 values by their bit patterns; None when a value is
    negative, infinite or NaN (left to ``kthvalue``)."""
    n, buckets = magnitudes.numel(), 1 << 16
    coarse = torch.zeros(buckets, dtype=torch.int64, device=magnitudes.device)
    for s in range(0, n, _CHUNK):
        bits = magnitudes[s:s + _CHUNK].view(torch.int32)
        coarse += torch.bincount(torch.bitwise_and(bits >> 16, buckets - 1), minlength=buckets)
    if int(coarse[0x7F80:].sum()):  # Inf/NaN (0x7F80...) or a sign bit set (0x8000...)
        return None
    at_least = coarse.flip(0).cumsum(0).flip(0)  # [b]: how many values have high bits ≥ b
    high = int(torch.nonzero(at_least >= count).max())
    greater = int(at_least[high + 1])  # values in higher buckets (bucket 0x7F80 and up are empty)
    fine = torch.zeros(buckets, dtype=torch.int64, device=magnitudes.device)
    for s in range(0, n, _CHUNK):
        bits = magnitudes[s:s + _CHUNK].view(torch.int32)
        fine += torch.bincount(torch.bitwise_and(bits[(bits >> 16) == high], buckets - 1), minlength=buckets)
    fine_at_least = fine.flip(0).cumsum(0).flip(0)
    low = int(torch.nonzero(fine_at_least >= count - greater).max())
    greater += int(fine_at_least[low + 1]) if low + 1 < buckets else 0
    t = torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item()
    return t, count - greater


def selection_indices(magnitudes: Tensor, threshold: float, ties: int, *, absolute: bool = False) -> Tensor:
    """Sorted flat indices of the entries above ``threshold`` plus the first ``ties`` equal to it (every
    entry equal to it when ``ties`` is negative: a model-wide threshold keeps all ties). ``absolute``: the
    magnitudes are ``|magnitudes|`` (taken chunk by chunk, never for the whole tensor)."""
    flat = magnitudes.reshape(-1)
    above, equal = [], []
    for s in range(0, flat.numel(), _CHUNK):  # chunks: no full-size masks, no int64 cumsum over the tensor
        m = flat[s:s + _CHUNK].abs() if absolute else flat[s:s + _CHUNK]
        hit = torch.nonzero(m >= threshold).flatten()
        if ties < 0:
            above.append(hit + s)
            continue
        values = m[hit]
        above.append(hit[values > threshold] + s)
        if ties > 0:
            equal.append(hit[values == threshold] + s)
    if not above:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    idx = torch.cat(above)
    if equal:
        idx = torch.cat([idx, torch.cat(equal)[:ties]]).sort().values
    return idx


def topk_flat_indices(v: Tensor, density: float) -> Tensor:
    """Sorted flat indices of the ⌈d·numel⌉ largest |v| entries (ties at the threshold: lowest index first)."""
    mags = v.reshape(-1).abs()
    return selection_indices(mags, *topk_selection(mags, topk_count(mags.numel(), density)))


def global_threshold(task_vector: StateDict, keys: Sequence[str], density: float) -> float:
    """|v| threshold keeping the top ⌈d·N⌉ entries over all ``keys`` (``expert_scope="model"``; exact)."""
    def run(fn) -> None:
        for k in keys:
            fn(task_vector[k].float())

    return float(magnitude_thresholds(run, lambda v: [v], 1, lambda n: topk_count(n, density))[0])


def model_expert_thresholds(scan, num_tasks: int, density: float) -> Tensor:
    """Per task, the model-wide |v| threshold of ``expert_scope="model"`` (two exact scans; float32 [K])."""
    return magnitude_thresholds(lambda fn: scan(fn, "expert threshold"), lambda x: list(x.vectors()), num_tasks,
                                lambda n: topk_count(n, density))


def selected_indices(v: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Flat indices of M(v, d): the top ⌈d·numel⌉ |v| of the tensor, or every |v| ≥ ``threshold``."""
    if threshold is None:
        return topk_flat_indices(v, density)
    return torch.nonzero(v.reshape(-1).abs() >= threshold).flatten()


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class SparseExpert(TaskModule):
    """A sparse additive task module: flat indices + values per tensor key, as buffers.

    ``apply_(target, w)`` sets ``t[idx] = t[idx] + w·values`` (computed in fp32, one rounding) after
    saving ``t[idx]``; ``restore_`` writes the saved values back with ``index_copy_`` (bit-exact).
    """

    def __init__(
        self,
        entries: dict[str, tuple[Tensor, Tensor]] | None = None,
        shapes: dict[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self._keys: list[str] = []
        self._shapes: dict[str, list[int]] = {}
        for key, (indices, values) in (entries or {}).items():
            if indices.shape != values.shape or indices.dim() != 1:
                raise CheckpointMismatchError(f"expert key {key!r}: indices {tuple(indices.shape)} and values "
                                 f"{tuple(values.shape)} must be equal-length vectors")
            j = len(self._keys)
            self._keys.append(key)
            self._shapes[key] = list(shapes[key]) if shapes and key in shapes else [-1]
            self.register_buffer(f"indices_{j}", indices)
            self.register_buffer(f"values_{j}", values)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def entries(self, key: str) -> tuple[Tensor, Tensor]:
        j = self._keys.index(key)
        return getattr(self, f"indices_{j}"), getattr(self, f"values_{j}")

    @property
    def nnz(self) -> int:
        return sum(self.entries(k)[0].numel() for k in self._keys)

    def get_extra_state(self):
        return {"keys": self._keys, "shapes": self._shapes}

    def set_extra_state(self, state) -> None:
        if list(state["keys"]) != self._keys:
            raise CheckpointMismatchError(f"expert checkpoint keys {state['keys'][:3]}... differ from this expert's "
                             f"{self._keys[:3]}...")

    def apply_(self, target: nn.Module | StateDict, weight: float = 1.0) -> None:
        saved = []
        flats = [resolve_tensor(target, key).view(-1) for key in self._keys]  # fail before any write
        for key, flat in zip(self._keys, flats):
            indices, values = self.entries(key)
            idx = indices.to(device=flat.device, dtype=torch.long)
            old = flat.index_select(0, idx)
            new = old.float() + weight * values.to(device=flat.device, dtype=torch.float32)
            flat.index_copy_(0, idx, new.to(flat.dtype))
            saved.append((flat, idx, old))
        self._saved.append(saved)

    def restore_(self, target: nn.Module | StateDict) -> None:
        if not self._saved:
            raise RuntimeError("restore_ called without a matching apply_")
        for flat, idx, old in reversed(self._saved.pop()):
            flat.index_copy_(0, idx, old)

    def cast_values_(self, dtype: torch.dtype | dict[str, torch.dtype]) -> SparseExpert:
        """Store the values in ``dtype`` (one for all keys, or key → dtype)."""
        for j, key in enumerate(self._keys):
            target = dtype[key] if isinstance(dtype, dict) else dtype
            setattr(self, f"values_{j}", getattr(self, f"values_{j}").to(target))
        return self

    def to_state_dict(self) -> StateDict:
        """Flat ``{key}::indices`` / ``{key}::values`` tensors, for safetensors."""
        out = {}
        for key in self._keys:
            i, v = self.entries(key)
            out[f"{key}::indices"] = i.contiguous()
            out[f"{key}::values"] = v.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> SparseExpert:
        keys = [k[: -len("::indices")] for k in sd if k.endswith("::indices")]
        return cls({k: (sd[f"{k}::indices"], sd[f"{k}::values"]) for k in keys})

    def save(self, path, metadata: dict[str, str] | None = None) -> None:
        """Write the expert as safetensors, atomically."""
        from freemerge_pl.io import save_safetensors_atomic

        save_safetensors_atomic(self.to_state_dict(), path, metadata=metadata)

    @classmethod
    def load(cls, path) -> SparseExpert:
        return cls.from_state_dict(load_file(str(path)))


def rescalers_from_sums(
    tops: dict[str, Tensor], sums: dict[str, Tensor], lambdas: Tensor | dict[str, Tensor], density: float
) -> Tensor | dict[str, Tensor]:
    """μ of Eq. 4 from per-key Σ|M(v_k, d)| (``tops``) and Σ|v_k| (``sums``), float64 [K] per key: one μ per
    task (λ a [K] tensor) or per key and task (λ key → [K]). ``μ = −ln(d)·Σ|M| / (λ·Σ|v|)`` (the E(·)
    means share their denominator numel); 0 where λ·Σ|v| = 0."""
    log_d = math.log(density)
    if isinstance(lambdas, dict):
        out = {}
        for key, total in sums.items():
            denom = lambdas[key].double() * total
            out[key] = torch.where(denom > 0, -log_d * tops[key] / denom.clamp_min(1e-300), 0.0)
        return out
    K = lambdas.numel()
    top = torch.zeros(K, dtype=torch.float64)
    total = torch.zeros(K, dtype=torch.float64)
    for key, key_total in sums.items():
        top += tops[key]
        total += key_total
    denom = lambdas.double() * total
    return torch.where(denom > 0, -log_d * top / denom.clamp_min(1e-300), 0.0)


def select_entries(
    task_vector: StateDict, keys: Sequence[str], density: float, scope: str = "tensor"
) -> dict[str, Tensor]:
    """Flat indices of M(v, d) per key (``scope`` "tensor": top ⌈d·numel⌉ per tensor; "model": global)."""
    check_density(density)
    if scope not in EXPERT_SCOPES:
        raise HyperparameterError(f"expert_scope={scope!r}; accepted: {list(EXPERT_SCOPES)}")
    threshold = global_threshold(task_vector, keys, density) if scope == "model" else None
    return {k: selected_indices(task_vector[k], density, threshold) for k in keys}


def extract_experts(
    task_vectors: Sequence[StateDict],
    lambdas: Tensor | dict[str, Tensor],
    *,
    expert_density: float = 0.01,
    expert_scope: str = "tensor",
    expert_scale: float = 1.0,
    value_dtype: torch.dtype = torch.float32,
    keys: Sequence[str] | None = None,
) -> tuple[list[SparseExpert], Tensor | dict[str, Tensor]]:
    """Experts ``e_k = expert_scale · μ_k · M(v_k, d)`` of in-memory task vectors for given λ's, and the μ's."""
    check_density(expert_density)
    keys = list(keys) if keys is not None else list(task_vectors[0])
    selected = [select_entries(tv, keys, expert_density, expert_scope) for tv in task_vectors]
    tops = {key: torch.tensor([float(tv[key].reshape(-1)[sel[key]].abs().sum()) for tv, sel in
                               zip(task_vectors, selected)], dtype=torch.float64) for key in keys}
    from freemerge_pl.merging.fr import abs_sum

    sums = {key: torch.tensor([abs_sum(tv[key]) for tv in task_vectors], dtype=torch.float64) for key in keys}
    mu = rescalers_from_sums(tops, sums, lambdas, expert_density)
    experts = []
    for k, (tv, sel) in enumerate(zip(task_vectors, selected)):
        entries = {}
        for key in keys:
            scale = expert_scale * float(mu[key][k] if isinstance(mu, dict) else mu[k])
            idx = sel[key]
            vals = (tv[key].reshape(-1)[idx].double() * scale).to(value_dtype)
            entries[key] = (idx.to(index_dtype(tv[key].numel())), vals)
        experts.append(SparseExpert(entries, {key: list(tv[key].shape) for key in keys}))
    return experts, mu
