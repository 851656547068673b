"""Lightweight experts (paper Eq. 4): top-d entries of each task vector, rescaled, stored sparse.

Symbols: ``expert_density`` d, the paper's M(v, d) keeps the top ⌈d·numel⌉ entries of v by |value|
(per tensor; ``expert_scope="model"`` uses one global threshold instead), and
``μ_k = −E(M(v_k, d)) · ln(d) / (λ_k · E(v_k))`` with ``E(x) = mean|x|`` over all entries (zeros of the
sparsified tensor included), computed at the scope of λ (semantics §8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

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


def flat_chunks(v: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(offset, v.flatten()[offset:offset + _CHUNK])`` over a tensor (views, not copies)."""
    flat = v.reshape(-1)
    for s in range(0, flat.numel(), _CHUNK):
        yield s, flat[s:s + _CHUNK]


def chunked_abs_sum(chunks: Iterable[tuple[int, Tensor]]) -> float:
    """Σ|v| over ``flat_chunks``-style chunks: one float32 sum per chunk, added in float64 (so the same
    value whether v is whole in memory or computed chunk by chunk from checkpoints)."""
    return sum(float(c.abs().sum()) for _, c in chunks)


def topk_selection(magnitudes: Tensor, count: int) -> tuple[float, int]:
    """``(t, ties)``: the ``count``-th largest of a flat tensor of magnitudes, and how many entries equal to
    t belong to the top ``count`` (the first ones by index). Enough to cut the same entries again later.

    Float32 tensors of ``_CHUNK`` elements or more: t from two radix-histogram passes over the float bits
    (non-negative floats order like their bit patterns), chunk by chunk, the same t as ``kthvalue``, which
    copies the tensor with int64 indices (3× its bytes) and took twice as long on 65 M elements."""
    return topk_selection_chunks(lambda: flat_chunks(magnitudes), magnitudes.numel(), count, absolute=False)


def topk_selection_chunks(chunks: Callable[[], Iterable[tuple[int, Tensor]]], numel: int, count: int, *,
                          absolute: bool = True) -> tuple[float, int]:
    """``topk_selection`` of the values (``absolute``: their magnitudes) that ``chunks()`` yields, never
    holding more than one chunk's magnitudes when the tensor is large (``chunks`` is called once per pass)."""
    if count <= 0:
        return math.inf, 0

    def mags() -> Iterator[Tensor]:
        for _, c in chunks():
            yield c.abs() if absolute else c

    if numel >= _CHUNK:
        found = _radix_kth_largest(mags, count)
        if found is not None:
            return found
    m = torch.cat([c.reshape(-1) for c in mags()])
    t = m.kthvalue(m.numel() - count + 1).values
    return float(t), count - int((m > t).sum())


def _radix_kth_largest(mags: Callable[[], Iterable[Tensor]], count: int) -> tuple[float, int] | None:
    """``topk_selection`` of finite non-negative float32 values (``mags()``: their chunks, one pass per call)
    by their bit patterns; None when a value is negative, infinite or NaN, or not float32 (left to ``kthvalue``)."""
    buckets = 1 << 16
    coarse = None
    for m in mags():
        if m.dtype != torch.float32:
            return None
        bits = m.reshape(-1).view(torch.int32)
        hist = torch.bincount(torch.bitwise_and(bits >> 16, buckets - 1), minlength=buckets)
        coarse = hist if coarse is None else coarse.add_(hist)
    if coarse is None or int(coarse[0x7F80:].sum()):  # Inf/NaN (0x7F80...) or a sign bit set (0x8000...)
        return None
    at_least = coarse.flip(0).cumsum(0).flip(0)  # [b]: how many values have high bits ≥ b
    high = int(torch.nonzero(at_least >= count).max())
    greater = int(at_least[high + 1])  # values in higher buckets (bucket 0x7F80 and up are empty)
    fine = torch.zeros(buckets, dtype=torch.int64, device=coarse.device)
    for m in mags():
        bits = m.reshape(-1).view(torch.int32)
        fine += torch.bincount(torch.bitwise_and(bits[(bits >> 16) == high], buckets - 1), minlength=buckets)
    fine_at_least = fine.flip(0).cumsum(0).flip(0)
    low = int(torch.nonzero(fine_at_least >= count - greater).max())
    greater += int(fine_at_least[low + 1]) if low + 1 < buckets else 0
    t = torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item()
    return t, count - greater


def top_abs_sum(chunks: Iterable[tuple[int, Tensor]], threshold: float, ties: int) -> float:
    """Σ|v| of the entries ``selection_entries`` keeps: those above ``threshold`` plus ``ties`` × threshold (every
    |v| ≥ threshold when ``ties`` is negative); one float32 sum per chunk, added in float64."""
    total = 0.0
    for _, c in chunks:
        m = c.abs()
        total += float(m[m >= threshold].sum()) if ties < 0 else float(m[m > threshold].sum())
    return total if ties < 0 else total + ties * threshold


def selection_entries(chunks: Iterable[tuple[int, Tensor]], threshold: float, ties: int, *,
                      absolute: bool = True) -> tuple[Tensor, Tensor]:
    """Sorted flat indices, and the values there, of the entries whose magnitude (``absolute``; else the value)
    is above ``threshold`` plus the first ``ties`` (by index) equal to it — every entry equal to it when
    ``ties`` is negative (a model-wide threshold keeps all ties); chunk by chunk (no full-size masks)."""
    idx, vals = [], []
    budget = ties
    for s, c in chunks:
        c = c.reshape(-1)
        m = c.abs() if absolute else c
        hit = torch.nonzero(m >= threshold).flatten()
        if ties >= 0:
            at = m[hit]
            equal = hit[at == threshold][:max(budget, 0)]
            budget -= equal.numel()
            hit = hit[at > threshold]
            if equal.numel():
                hit = torch.cat([hit, equal]).sort().values
        idx.append(hit + s)
        vals.append(c[hit])
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx), torch.cat(vals)


def selection_indices(magnitudes: Tensor, threshold: float, ties: int, *, absolute: bool = False) -> Tensor:
    """Sorted flat indices of the entries above ``threshold`` plus the first ``ties`` equal to it (every
    entry equal to it when ``ties`` is negative: a model-wide threshold keeps all ties). ``absolute``: the
    magnitudes are ``|magnitudes|`` (taken chunk by chunk, never for the whole tensor)."""
    return selection_entries(flat_chunks(magnitudes), threshold, ties, absolute=absolute)[0]


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


INDEX_ENCODINGS = ("flat", "compact")
#: codes a compact index stream may use; ``flat`` is int32/int64 flat indices (the only one before compact storage)
INDEX_CODES = ("flat", "bitmap", "delta8", "delta16")
_DELTA_BASE = {"delta8": 255, "delta16": 65535}


def encode_indices(indices: Tensor, numel: int | None, code: str) -> Tensor:
    """Sorted, unique flat ``indices`` of a tensor of ``numel`` entries as the stream of ``code``:

    * ``flat``: the indices as int32 (int64 from 2³¹ entries on);
    * ``bitmap``: one bit per entry of the tensor (``ops.packbits``; needs ``numel``);
    * ``delta8`` / ``delta16``: the gaps between consecutive indices (the first from −1), each gap g written as
      ⌊(g−1)/B⌋ escape codes 0 ("advance B, no entry") and then the code g − B·⌊(g−1)/B⌋ ∈ [1, B]
      (B = 255 in uint8, B = 65535 in int16 holding the uint16 bit pattern). Exact for any gap.
    """
    idx = indices.reshape(-1).long()
    if code == "flat":
        return idx.to(index_dtype(numel if numel is not None else int(idx.max()) + 1 if idx.numel() else 0))
    if code == "bitmap":
        from freemerge_pl.merging.ops import packbits

        mask = torch.zeros(numel, dtype=torch.bool, device=idx.device)
        mask[idx] = True
        return packbits(mask)
    base = _DELTA_BASE[code]
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1))
    escapes = torch.div(gaps - 1, base, rounding_mode="floor")
    ends = torch.cumsum(escapes + 1, 0) - 1  # position of each entry's final code
    codes = torch.zeros(int(ends[-1]) + 1 if idx.numel() else 0, dtype=torch.int32, device=idx.device)
    codes[ends] = (gaps - base * escapes).int()
    if code == "delta8":
        return codes.to(torch.uint8)
    return torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)  # uint16 bits in int16


def decode_indices(stream: Tensor, numel: int | None, code: str, count: int) -> Tensor:
    """Inverse of ``encode_indices``: the ``count`` sorted flat indices (int32, int64 from 2³¹ entries on)."""
    if code == "flat":
        return stream
    out_dtype = index_dtype(numel) if numel is not None else torch.int64
    if code == "bitmap":
        from freemerge_pl.merging.ops import unpackbits

        found = torch.nonzero(unpackbits(stream, numel)).flatten()
    else:
        base = _DELTA_BASE[code]
        codes = stream.long() & 0xFFFF if code == "delta16" else stream.long()
        steps = torch.where(codes == 0, base, codes)
        found = (torch.cumsum(steps, 0) - 1)[codes != 0]
    if found.numel() != count:
        raise CheckpointMismatchError(f"a {code} index stream holds {found.numel()} entries but the expert has "
                                      f"{count} values")
    return found.to(out_dtype)


def encoded_nbytes(indices: Tensor, numel: int | None, code: str) -> int:
    """Bytes of ``encode_indices(indices, numel, code)``, computed without building it."""
    n = indices.numel()
    if code == "flat":
        return n * (8 if numel is not None and numel >= 2**31 else 4)
    if code == "bitmap":
        return (numel + 7) // 8
    if n == 0:
        return 0
    gaps = torch.diff(indices.reshape(-1).long(), prepend=indices.new_full((1,), -1, dtype=torch.long))
    escapes = int(torch.div(gaps - 1, _DELTA_BASE[code], rounding_mode="floor").sum())
    return (n + escapes) * (1 if code == "delta8" else 2)


def smallest_code(indices: Tensor, numel: int | None) -> str:
    """The index code with the fewest bytes for these sorted unique indices (ties: the earlier in
    ``INDEX_CODES``, flat first); ``bitmap`` needs the tensor's size, so not without ``numel``."""
    codes = [c for c in INDEX_CODES if c != "bitmap" or numel is not None]
    return min(codes, key=lambda c: encoded_nbytes(indices, numel, c))


class SparseExpert(TaskModule):
    """A sparse additive task module: flat indices + values per tensor key, as buffers.

    ``apply_(target, w)`` sets ``t[idx] = t[idx] + w·values`` (computed in fp32, one rounding) after
    saving ``t[idx]``; ``restore_`` writes the saved values back with ``index_copy_`` (bit-exact).

    Storage: the values in their own dtype (``cast_values_``; FREE-Merging's ``expert_dtype``), the indices
    per ``index_encoding``: ``flat`` int32 flat indices (int64 from 2³¹ entries on), or ``compact``: per tensor
    the smallest of flat, a bitmap and the uint8/uint16 gap codes of ``encode_indices`` (loss-free; about 1.1
    bytes an entry at d = 1%). ``entries(key)`` always returns the decoded flat indices; ``nbytes`` counts the
    stored buffers; ``get_extra_state`` records each key's code (files without it are flat).
    """

    def __init__(
        self,
        entries: dict[str, tuple[Tensor, Tensor]] | None = None,
        shapes: dict[str, Sequence[int]] | None = None,
        index_encoding: Literal["flat", "compact"] = "flat",
        *,
        codes: dict[str, str] | None = None,
    ) -> None:
        """``entries``: key → (flat indices, values); with ``codes`` (key → an ``INDEX_CODES`` name, as
        ``get_extra_state`` records them) the first tensor is that key's already encoded index stream."""
        super().__init__()
        if index_encoding not in INDEX_ENCODINGS:
            raise HyperparameterError(f"index_encoding={index_encoding!r}; accepted: {list(INDEX_ENCODINGS)}")
        self._keys: list[str] = []
        self._shapes: dict[str, list[int]] = {}
        self._codes: dict[str, str] = {}
        for key, (indices, values) in (entries or {}).items():
            shape = list(shapes[key]) if shapes and key in shapes else [-1]
            numel = math.prod(shape) if -1 not in shape else None
            if codes is not None:
                code = codes.get(key, "flat")
                if code not in INDEX_CODES:
                    raise CheckpointMismatchError(f"expert key {key!r}: index code {code!r} is unknown; "
                                                  f"accepted: {list(INDEX_CODES)}")
                if code == "bitmap" and numel is None:
                    raise CheckpointMismatchError(f"expert key {key!r}: a bitmap index needs the tensor's shape")
                if values.dim() != 1 or indices.dim() != 1:
                    raise CheckpointMismatchError(f"expert key {key!r}: index stream and values must be vectors")
                stream = indices
                if code != "flat":  # a stream that does not decode to one index per value fails here
                    decoded = decode_indices(stream, numel, code, values.numel())
                    if numel is not None and decoded.numel() and int(decoded[-1]) >= numel:
                        raise CheckpointMismatchError(f"expert key {key!r}: {code} indices reach past the "
                                                      f"tensor's {numel} entries")
            else:
                if indices.shape != values.shape or indices.dim() != 1:
                    raise CheckpointMismatchError(f"expert key {key!r}: indices {tuple(indices.shape)} and values "
                                                  f"{tuple(values.shape)} must be equal-length vectors")
                code = "flat"
                if index_encoding == "compact":
                    indices, values = _sorted_unique(key, indices, values, numel)
                    code = smallest_code(indices, numel)
                stream = indices if index_encoding == "flat" else encode_indices(indices, numel, code)
            j = len(self._keys)
            self._keys.append(key)
            self._shapes[key] = shape
            self._codes[key] = code
            self.register_buffer(f"indices_{j}", stream)
            self.register_buffer(f"values_{j}", values)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> list[int]:
        """The shape of the tensor ``key`` changes (``[-1]`` when the expert was built without shapes)."""
        return list(self._shapes[key])

    def index_code(self, key: str) -> str:
        return self._codes[key]

    def entries(self, key: str) -> tuple[Tensor, Tensor]:
        """``(flat indices, values)`` of ``key`` (indices decoded from their stored code)."""
        j = self._keys.index(key)
        stream, values = getattr(self, f"indices_{j}"), getattr(self, f"values_{j}")
        shape = self._shapes[key]
        numel = math.prod(shape) if -1 not in shape else None
        return decode_indices(stream, numel, self._codes[key], values.numel()), values

    @property
    def nnz(self) -> int:
        return sum(getattr(self, f"values_{j}").numel() for j in range(len(self._keys)))

    def get_extra_state(self):
        state = {"keys": self._keys, "shapes": self._shapes}
        if any(c != "flat" for c in self._codes.values()):
            state["index_codes"] = self._codes
        return state

    def set_extra_state(self, state) -> None:
        if list(state["keys"]) != self._keys:
            raise CheckpointMismatchError(f"expert checkpoint keys {state['keys'][:3]}... differ from this expert's "
                             f"{self._keys[:3]}...")
        codes = {k: state.get("index_codes", {}).get(k, "flat") for k in self._keys}
        if codes != self._codes:
            raise CheckpointMismatchError(f"expert checkpoint index codes {codes} differ from this expert's "
                                          f"{self._codes}")

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
        """Flat ``{key}::indices`` (the stored index stream) / ``{key}::values`` tensors, for safetensors; the
        index codes are in ``get_extra_state`` (``save`` and ``save_task_modules`` write it as metadata)."""
        out = {}
        for j, key in enumerate(self._keys):
            out[f"{key}::indices"] = getattr(self, f"indices_{j}").contiguous()
            out[f"{key}::values"] = getattr(self, f"values_{j}").contiguous()
        return out

    @classmethod
    def from_state_dict(cls, sd: StateDict, extra_state: dict | None = None) -> SparseExpert:
        """The expert of ``to_state_dict``'s tensors and ``get_extra_state``'s record (None: flat indices,
        keys from the tensor names, shapes unknown; how files written before compact storage load)."""
        keys = list(extra_state["keys"]) if extra_state else [k[: -len("::indices")] for k in sd
                                                               if k.endswith("::indices")]
        missing = [f"{k}::{part}" for k in keys for part in ("indices", "values") if f"{k}::{part}" not in sd]
        if missing:
            raise KeyError(f"expert tensors {missing[:3]}")
        shapes = extra_state.get("shapes") if extra_state else None
        codes = extra_state.get("index_codes", {}) if extra_state else {}
        return cls({k: (sd[f"{k}::indices"], sd[f"{k}::values"]) for k in keys}, shapes, codes=codes)

    def save(self, path, metadata: dict[str, str] | None = None) -> None:
        """Write the expert as safetensors, atomically (``extra_state`` metadata: keys, shapes, index codes)."""
        import json

        from freemerge_pl.io import save_safetensors_atomic

        meta = {**(metadata or {}), "extra_state": json.dumps(self.get_extra_state(), sort_keys=True)}
        save_safetensors_atomic(self.to_state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path) -> SparseExpert:
        import json

        from freemerge_pl.io import read_safetensors_header

        meta = read_safetensors_header(path)[0]
        extra = json.loads(meta["extra_state"]) if "extra_state" in meta else None
        return cls.from_state_dict(load_file(str(path)), extra)


def _sorted_unique(key: str, indices: Tensor, values: Tensor, numel: int | None) -> tuple[Tensor, Tensor]:
    """Indices sorted (values along) for the compact codes; duplicates or indices outside the tensor fail."""
    idx = indices.long()
    if idx.numel() and bool((idx[1:] < idx[:-1]).any()):
        idx, order = idx.sort()
        values = values[order]
    if idx.numel() and (bool((idx[1:] == idx[:-1]).any()) or int(idx[0]) < 0
                        or (numel is not None and int(idx[-1]) >= numel)):
        raise CheckpointMismatchError(f"expert key {key!r}: indices must be unique and inside the tensor "
                                      f"({numel} entries) for compact storage")
    return idx, values


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
