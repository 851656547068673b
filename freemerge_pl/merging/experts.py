"""Lightweight experts (paper Eq. 4) as task modules: ``SparseExpert`` (flat indices + values per tensor, with
loss-free compact index codes) and the rescaler μ.

Symbols: ``expert_density`` d, the paper's M(v, d) keeps the top ⌈d·numel⌉ entries of v by |value|
(per tensor; ``expert_scope="model"`` uses one global threshold instead; the selection is in ``topk.py``, the
extraction is FREE-Merging's merge pass in ``methods/fr.py``), and
``μ_k = −E(M(v_k, d)) · ln(d) / (λ_k · E(v_k))`` with ``E(x) = mean|x|`` over all entries (zeros of the
sparsified tensor included), computed at the scope of λ (semantics §8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, HyperparameterError
from freemerge_pl.merging.base import StateDict, TaskModule, resolve_tensor
from freemerge_pl.merging.ops import packbits, unpackbits


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

    def to_tensors(self) -> StateDict:
        """Flat ``{key}::indices`` (the stored index stream) / ``{key}::values`` tensors, for safetensors; the
        index codes are in ``get_extra_state`` (``freemerge_pl.io.export`` writes it as metadata)."""
        out = {}
        for j, key in enumerate(self._keys):
            out[f"{key}::indices"] = getattr(self, f"indices_{j}").contiguous()
            out[f"{key}::values"] = getattr(self, f"values_{j}").contiguous()
        return out

    @classmethod
    def from_tensors(cls, sd: StateDict, extra_state: dict | None = None) -> SparseExpert:
        """The expert of ``to_tensors``'s tensors and ``get_extra_state``'s record (None: flat indices,
        keys from the tensor names, shapes unknown; how files written before compact storage load)."""
        keys = list(extra_state["keys"]) if extra_state else [k[: -len("::indices")] for k in sd
                                                               if k.endswith("::indices")]
        missing = [f"{k}::{part}" for k in keys for part in ("indices", "values") if f"{k}::{part}" not in sd]
        if missing:
            raise KeyError(f"expert tensors {missing[:3]}")
        shapes = extra_state.get("shapes") if extra_state else None
        codes = extra_state.get("index_codes", {}) if extra_state else {}
        return cls({k: (sd[f"{k}::indices"], sd[f"{k}::values"]) for k in keys}, shapes, codes=codes)


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


