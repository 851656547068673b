"""FR-Merging (Eq. 1-3) and FREE-Merging (FR backbone + Eq. 4 experts), the paper's text (docs/semantics.md §3/§4/§8).

Symbols: λ_k (``lambdas``) = E(v_k) / Σ_j E(v_j) with E = mean|·| (LAMBDA-DEF); ``scaling`` s;
``filter_ratio`` r; ``expert_density`` d. The backbone is ``θ_pre + s·Σ_k λ_k G(v_k)``, computed as
``s·G(Σ_k λ_k v_k)`` (G is linear and its mask is shared per tensor): one rfft2/irfft2 per tensor.
The λ's (and Eq. 4's μ) need sums over the whole model: a statistics pass that reads one key at a time.
The authors' released code is ``released.py`` (methods ``fr_merging_released``/``free_merging_released``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.base import StateDict
from freemerge_pl.merging.experts import (
    SparseExpert,
    decode_indices,
    encode_indices,
    index_dtype,
    rescalers_from_sums,
)
from freemerge_pl.merging.fourier import Spectrum, highpass
from freemerge_pl.merging.method import (
    Context,
    Density,
    Finalized,
    Finite,
    KeyOutput,
    KeyTensors,
    MergeMethod,
    Rate,
    Scan,
)
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import (
    chunked_abs_sum,
    flat_chunks,
    gather_blocks,
    model_thresholds,
    sampled_cut,
    selection_entries,
    top_abs_sum,
    topk_count,
)

PAPER_REFERENCE = "Zheng & Wang 2025, FREE-Merging (arXiv:2411.16815)"
LAMBDA_SCOPES = ("model", "tensor")


def abs_sum(v: Tensor) -> float:
    """Σ|v| of one tensor (E(v)·numel): ``topk.chunked_abs_sum`` of its chunks (one float32 ``abs().sum()``
    per 4 Mi entries — twice as fast as ``vector_norm(v, 1)`` on the CPU — added in float64), the same value
    the streaming statistics compute chunk by chunk."""
    return chunked_abs_sum(flat_chunks(v))


def lambdas_from_sums(sums: dict[str, Tensor], num_tasks: int, scope: str) -> Tensor | dict[str, Tensor]:
    """Eq. 3 from per-key Σ|v_k| (float64 [K] per key): a [K] tensor ("model") or key → [K] ("tensor").

    A key (or model) where every task vector is zero gets equal λ's (1/K).
    """
    def normalise(s: Tensor) -> Tensor:
        total = s.sum()
        return s / total if total > 0 else torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    if scope == "tensor":
        return {key: normalise(s) for key, s in sums.items()}
    total = torch.stack(list(sums.values())).sum(0) if sums else torch.zeros(num_tasks, dtype=torch.float64)
    return normalise(total)


def energy_lambdas(
    task_vectors: Sequence[StateDict], keys: Sequence[str] | None = None, scope: str = "model"
) -> Tensor | dict[str, Tensor]:
    """Eq. 3 coefficients λ_k = E(v_k)/Σ_j E(v_j), E = mean|·|, of in-memory task vectors."""
    if scope not in LAMBDA_SCOPES:
        raise HyperparameterError(f"lambda_scope={scope!r}; accepted: {list(LAMBDA_SCOPES)}")
    keys = list(keys) if keys is not None else list(task_vectors[0])
    sums = {key: torch.tensor([abs_sum(tv[key]) for tv in task_vectors], dtype=torch.float64) for key in keys}
    return lambdas_from_sums(sums, len(task_vectors), scope)


def _weights(lambdas: Tensor) -> list[float]:
    """λ as the float32 values ``fr_combine`` multiplies by (``KeyTensors.weighted_sum``'s weights)."""
    return lambdas.to(dtype=torch.float32).tolist()


def fr_combine(vectors: Iterable[Tensor] | Tensor, lambdas: Tensor) -> Tensor:
    """``Σ_k λ_k v_k`` in float32 for one tensor (the input of the single FFT of ``fr_merge_tensor``),
    accumulated in place as the vectors arrive (no [K, ...] stack)."""
    if isinstance(vectors, Tensor):
        lam = lambdas.to(device=vectors.device, dtype=torch.float32).reshape(-1, *([1] * (vectors.dim() - 1)))
        return (lam * vectors.float()).sum(0)
    combined = None
    for weight, v in zip(lambdas.to(dtype=torch.float32).tolist(), vectors):
        if combined is None:
            combined = v.float() * weight
        else:
            combined.add_(v.to(device=combined.device, dtype=torch.float32), alpha=weight)
    return combined


def fr_merge_tensor(
    vectors: Sequence[Tensor] | Tensor,
    lambdas: Tensor,
    *,
    filter_ratio: float = 0.3,
    cutoff_mode: str = "fraction",
    filter_1d: bool = False,
    scaling: float = 1.0,
) -> Tensor:
    """Per-tensor core of FR-Merging: ``s·G(Σ_k λ_k v_k)`` (equal to ``s·Σ_k λ_k G(v_k)``)."""
    filtered = highpass(fr_combine(vectors, lambdas), filter_ratio, cutoff_mode=cutoff_mode, filter_1d=filter_1d)
    return filtered if scaling == 1 else scaling * filtered


def _info(values: Tensor | dict[str, Tensor]) -> list | dict:
    if isinstance(values, dict):
        return {k: v.tolist() for k, v in values.items()}
    return values.tolist()


@dataclass
class FRStats:
    """λ (a [K] tensor or key → [K]); for FREE also μ and each key's expert cut per task: ``(t, ties)``,
    keep |v| > t plus the first ``ties`` entries equal to t, or every |v| ≥ t when ``ties`` is −1 (model
    scope; ``topk.selection_entries``); ``selected``: per key and task the flat indices of that cut when the scan
    found them (``TopkCut.indices``) as a ``delta8`` stream and their count (about a byte an entry: held from
    the scan to the merge pass, which reads v_k there), else None."""

    lambdas: Tensor | dict[str, Tensor]
    mu: Tensor | dict[str, Tensor] | None = None
    cuts: dict[str, list[tuple[float, int]]] | None = None
    selected: dict[str, list[tuple[Tensor, int] | None]] | None = None  # the cut's indices, found by the scan

    def lambdas_of(self, key: str) -> Tensor:
        return self.lambdas[key] if isinstance(self.lambdas, dict) else self.lambdas

    def mu_of(self, key: str, k: int) -> float:
        return float(self.mu[key][k] if isinstance(self.mu, dict) else self.mu[k])


@register("fr_merging", reference=PAPER_REFERENCE + ", Eq. 1-3")
@dataclass
class FRMerging(MergeMethod):
    """FR-Merging: high-pass filter every task vector in 2-D Fourier space and add them with Eq. 3's λ.

    ``filter_ratio`` r ∈ [0, 1): the share of the centred spectrum removed, lowest frequency first
    (FILTER-DEF; ``cutoff_mode="radius"``: D0 = r × the largest radius); ``lambda_scope`` λ over the whole
    model (default) or per tensor; ``filter_1d`` also filters 1-D tensors; ``scaling`` s (1.0 = the text).
    """

    filters_task_vectors = True

    filter_ratio: Rate = 0.3
    cutoff_mode: Literal["fraction", "radius"] = "fraction"
    lambda_scope: Literal["model", "tensor"] = "model"
    filter_1d: bool = False
    scaling: Finite = 1.0

    def statistics(self, scan: Scan) -> FRStats:
        def compute() -> dict[str, Tensor]:
            sums: dict[str, Tensor] = {}
            scan(lambda x: sums.__setitem__(x.key, torch.tensor(  # chunk by chunk: no float32 v_k (= abs_sum)
                [chunked_abs_sum(x.vector_chunks(k)) for k in range(x.num_tasks)], dtype=torch.float64)), "λ")
            return sums

        sums = scan.ctx.memo(("fr-abs-sums",), compute)
        return FRStats(lambdas_from_sums(sums, scan.ctx.num_tasks, self.lambda_scope))

    def _spectrum_key(self, key: str) -> tuple:
        return ("fr-spectrum", key, self.lambda_scope, self.cutoff_mode, self.filter_1d)

    def filtered(self, x: KeyTensors, stats: FRStats, ctx: Context, combined: Tensor | None = None) -> Tensor:
        """s·G(Σ_k λ_k v_k) of one key (the spectrum and each ratio's inverse are memoised when tuning)."""
        def spectrum(keep: bool = True) -> Spectrum:
            c = combined if combined is not None else x.weighted_sum(_weights(stats.lambdas_of(x.key)))
            return Spectrum(c, cutoff_mode=self.cutoff_mode, filter_1d=self.filter_1d, keep=keep,
                            overwrite=not keep)  # one ratio: Σλv (built here) may take the result

        if ctx.cache is None:  # the result is this call's own tensor: scale in place
            out = spectrum(keep=False).highpass(self.filter_ratio)
            return out if self.scaling == 1 else out.mul_(self.scaling)
        spec = ctx.memo(self._spectrum_key(x.key), spectrum)
        out = ctx.memo((*self._spectrum_key(x.key), self.filter_ratio), lambda: spec.highpass(self.filter_ratio))
        return out if self.scaling == 1 else self.scaling * out

    def merge_key(self, x: KeyTensors, stats: FRStats, ctx: Context) -> Tensor:
        return self.filtered(x, stats, ctx)

    def finalize(self, pieces: dict[str, Any], stats: FRStats, ctx: Context) -> Finalized:
        return Finalized(info={"lambdas": _info(stats.lambdas)})



@register("free_merging", reference=PAPER_REFERENCE + ", Eq. 1-4, Alg. 1")
@dataclass
class FREEMerging(FRMerging):
    """FREE-Merging: the FR-Merging backbone plus one sparse expert per task (Eq. 4).

    ``expert_density`` d: the expert keeps the top ⌈d·numel⌉ |v_k| of each tensor (``expert_scope="model"``:
    one exact model-wide threshold per task), scaled by ``expert_scale``·μ_k. ``expert_dtype`` (the values'
    storage): ``"bfloat16"`` (default) halves float32 values (each rounded once, after μ: compact experts, issue
    28; the accuracy effect on the zoo is in ``benchmarks/results/expert_storage.md``); ``"float32"`` keeps
    them exact; None stores them in each tensor's dtype in the pre-trained checkpoint (float32 for bare task
    vectors). ``expert_index_encoding`` ``"compact"`` (default) stores each tensor's indices in the fewest
    bytes of flat int32, a bitmap or uint8/uint16 gap codes (loss-free, ``experts.encode_indices``);
    ``"flat"``: int32 flat indices. With the defaults an expert at d = 1% takes about 0.8% of the float32
    backbone.
    """

    produces_task_modules = True

    expert_density: Density = 0.01
    expert_scope: Literal["tensor", "model"] = "tensor"
    expert_scale: Finite = 1.0
    expert_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = "bfloat16"
    expert_index_encoding: Literal["compact", "flat"] = "compact"

    def statistics(self, scan: Scan) -> FRStats:
        ctx, d = scan.ctx, self.expert_density
        key = ("free-sums", d, self.expert_scope)

        def compute():
            sums: dict[str, Tensor] = {}
            tops: dict[str, Tensor] = {}
            cuts: dict[str, list[tuple[float, int]]] = {}
            selected: dict[str, list] = {}
            thresholds = None
            if self.expert_scope == "model":
                thresholds = model_thresholds(scan, lambda x: list(x.vectors()), ctx.num_tasks, d,
                                              "expert threshold")

            def fold(x: KeyTensors) -> None:
                total, top, cut, entries = [], [], [], []
                for k in range(x.num_tasks):  # chunk by chunk: θ_k and one chunk of v_k held (engine.py)
                    v = x.vector_chunks(k)
                    if thresholds is None:  # per tensor: the ⌈d·n⌉-th largest, and its entries for the merge pass
                        found = sampled_cut(v, topk_count(v.numel, d))
                        total.append(found.total)
                        cut.append((found.threshold, found.ties))
                        top.append(found.top)
                        entries.append(None if found.indices is None else  # held until the merge pass
                                       (encode_indices(found.indices, v.numel, "delta8"), len(found.indices)))
                    else:  # one model-wide threshold: every |v| ≥ it
                        total.append(chunked_abs_sum(v))
                        cut.append((float(thresholds[k]), -1))
                        top.append(top_abs_sum(v, float(thresholds[k]), -1))
                        entries.append(None)
                    del v  # θ_k freed before θ_{k+1} is read
                sums[x.key] = torch.tensor(total, dtype=torch.float64)
                tops[x.key] = torch.tensor(top, dtype=torch.float64)
                cuts[x.key] = cut
                selected[x.key] = entries

            scan(fold, "λ, μ")
            return sums, tops, cuts, selected

        sums, tops, cuts, selected = ctx.memo(key, compute)
        lambdas = lambdas_from_sums(sums, ctx.num_tasks, self.lambda_scope)
        return FRStats(lambdas, rescalers_from_sums(tops, sums, lambdas, d), cuts, selected)

    def _value_dtype(self, ctx: Context, key: str) -> torch.dtype:
        return getattr(torch, self.expert_dtype) if self.expert_dtype else ctx.dtypes.get(key, torch.float32)

    def _entries(self, idx: Tensor, values: Tensor, numel: int, k: int, stats: FRStats, ctx: Context,
                 key: str) -> tuple[Tensor, Tensor]:
        """Task k's expert entries of ``key`` from the selected flat indices and v_k's values there."""
        scale = self.expert_scale * stats.mu_of(key, k)
        values = (values.double() * scale).to(torch.float32).to(self._value_dtype(ctx, key))
        return idx.to(index_dtype(numel)), values

    def merge_key(self, x: KeyTensors, stats: FRStats, ctx: Context) -> KeyOutput:
        key = x.key
        entries_key = ("free-entries", key, self.expert_density, self.expert_scope, self.expert_scale,
                       self.expert_dtype, self.lambda_scope)
        cached = ctx.cache is not None and entries_key in ctx.cache
        if ctx.cache is not None and self._spectrum_key(key) in ctx.cache and cached:
            return KeyOutput(self.filtered(x, stats, ctx), ctx.cache[entries_key])
        # one pass over the K task vectors, block by block: accumulate Σλv for the filter and take each expert's
        # entries (found by the statistics scan, or cut here)
        entries = []

        def cut(k: int, blocks) -> None:  # reads each block right after it is accumulated
            found = stats.selected[key][k] if stats.selected else None
            if found is not None and ctx.cache is None:  # used once: not held past this key
                stats.selected[key][k] = None
            if found is None:
                idx, values = selection_entries(blocks, *stats.cuts[key][k])
            else:
                idx = decode_indices(found[0], x.numel, "delta8", found[1]).long()
                values = gather_blocks(blocks, idx)
            entries.append(self._entries(idx, values, x.numel, k, stats, ctx, key))

        combined = x.weighted_sum(_weights(stats.lambdas_of(key)), None if cached else cut)
        entries = ctx.cache[entries_key] if cached else ctx.memo(entries_key, lambda: entries)
        return KeyOutput(self.filtered(x, stats, ctx, combined), entries)

    def finalize(self, pieces: dict[str, list], stats: FRStats, ctx: Context) -> Finalized:
        experts = [SparseExpert({key: entries[k] for key, entries in pieces.items()},
                                {key: list(ctx.shapes[key]) for key in pieces}, self.expert_index_encoding)
                   for k in range(ctx.num_tasks)]
        return Finalized(experts, info={"lambdas": _info(stats.lambdas), "mu": _info(stats.mu)})

