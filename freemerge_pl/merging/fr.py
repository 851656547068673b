"""FR-Merging (Eq. 1-3) and FREE-Merging (FR backbone + Eq. 4 experts), paper semantics (DESIGN §3/§4/§8).

Symbols: λ_k (``lambdas``) = E(v_k) / Σ_j E(v_j) with E = mean|·| (LAMBDA-DEF); ``scaling`` s;
``filter_ratio`` r; ``expert_density`` d. The backbone is ``θ_pre + s·Σ_k λ_k G(v_k)``, computed as
``s·G(Σ_k λ_k v_k)`` (G is linear and its mask is shared per tensor): one rfft2/irfft2 per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.experts import EXPERT_SCOPES, extract_experts
from freemerge_pl.merging.fourier import check_filter_ratio, highpass
from freemerge_pl.merging.registry import register

LAMBDA_SCOPES = ("model", "tensor")
PAPER_REFERENCE = "Zheng & Wang 2025, FREE-Merging (arXiv:2411.16815)"


def abs_sums(task_vectors: Sequence[StateDict], keys: Sequence[str]) -> dict[str, Tensor]:
    """Statistics pass: Σ|v_k| per key, as a float64 [K] tensor per key."""
    return {key: torch.tensor([float(tv[key].abs().sum()) for tv in task_vectors], dtype=torch.float64)
            for key in keys}


def energy_lambdas(
    task_vectors: Sequence[StateDict], keys: Sequence[str] | None = None, scope: str = "model"
) -> Tensor | dict[str, Tensor]:
    """Eq. 3 coefficients λ_k = E(v_k)/Σ_j E(v_j), E = mean|·|; a [K] tensor ("model") or key → [K] ("tensor").

    A key (or model) where every task vector is zero gets equal λ's (1/K).
    """
    if scope not in LAMBDA_SCOPES:
        raise HyperparameterError(f"lambda_scope={scope!r}; accepted: {list(LAMBDA_SCOPES)}")
    keys = list(keys) if keys is not None else list(task_vectors[0])
    sums = abs_sums(task_vectors, keys)
    K = len(task_vectors)

    def normalise(s: Tensor) -> Tensor:
        total = s.sum()
        return s / total if total > 0 else torch.full((K,), 1.0 / K, dtype=torch.float64)

    if scope == "tensor":
        return {key: normalise(s) for key, s in sums.items()}
    return normalise(torch.stack(list(sums.values())).sum(0) if sums else torch.zeros(K, dtype=torch.float64))


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
    combined = fr_combine(vectors, lambdas)
    filtered = highpass(combined, filter_ratio, cutoff_mode=cutoff_mode, filter_1d=filter_1d)
    return filtered if scaling == 1 else scaling * filtered


def fr_combine(vectors: Sequence[Tensor] | Tensor, lambdas: Tensor) -> Tensor:
    """``Σ_k λ_k v_k`` in float32 for one tensor (the input of the single FFT of ``fr_merge_tensor``)."""
    if isinstance(vectors, Tensor):
        lam = lambdas.to(device=vectors.device, dtype=torch.float32).reshape(-1, *([1] * (vectors.dim() - 1)))
        return (lam * vectors.float()).sum(0)
    # accumulate in place: no [K, ...] stack (K× the tensor's memory, ~5× slower on a ViT-B/32)
    lam = lambdas.to(dtype=torch.float32).tolist()
    combined = vectors[0].float() * lam[0]
    for weight, v in zip(lam[1:], vectors[1:]):
        combined.add_(v.to(device=combined.device, dtype=torch.float32), alpha=weight)
    return combined


def _fr_delta(task_vectors, keys, lambdas, filter_ratio, cutoff_mode, filter_1d, scaling) -> StateDict:
    delta = {}
    for key in keys:
        lam = lambdas[key] if isinstance(lambdas, dict) else lambdas
        delta[key] = fr_merge_tensor(
            [tv[key] for tv in task_vectors], lam, filter_ratio=filter_ratio,
            cutoff_mode=cutoff_mode, filter_1d=filter_1d, scaling=scaling,
        )
    return delta


def _lambda_info(lambdas) -> list | dict:
    if isinstance(lambdas, dict):
        return {k: v.tolist() for k, v in lambdas.items()}
    return lambdas.tolist()


SEMANTICS = ("paper", "released_code")


def _released(semantics: str, released_options: dict[str, Any] | None, **given: Any) -> dict[str, Any] | None:
    """Keyword arguments for the released-code functions, or None under the paper semantics."""
    if semantics not in SEMANTICS:
        raise HyperparameterError(f"semantics={semantics!r}; accepted: {list(SEMANTICS)}")
    if semantics == "paper":
        if released_options:
            raise HyperparameterError("released_options are only read under semantics='released_code'")
        return None
    return {**{k: v for k, v in given.items() if v is not None}, **(released_options or {})}


@register("fr_merging", reference=PAPER_REFERENCE + ", Eq. 1-3")
def fr_merging(
    task_vectors: list[StateDict],
    *,
    semantics: str = "paper",
    filter_ratio: float | None = None,
    cutoff_mode: str = "fraction",
    lambda_scope: str = "model",
    filter_1d: bool = False,
    scaling: float | None = None,
    released_options: dict[str, Any] | None = None,
) -> MergeResult:
    """FR-Merging: high-pass filter every task vector in 2-D Fourier space and add them with Eq. 3's λ.

    ``semantics="paper"`` (default): DESIGN §3/§8, ``filter_ratio`` None → 0.3 (share removed),
    ``scaling`` None → 1.0. ``semantics="released_code"``: the authors' code (``released.released_fr_merge``;
    ``filter_ratio`` is then its ρ, None → 0.7; ``scaling`` None → the profile's value;
    ``released_options`` passes ``profile``, ``align``, ``key_pattern``, ``keep_first_task_bias_quirk``).
    """
    options = _released(semantics, released_options, filter_ratio=filter_ratio, scaling=scaling)
    if options is not None:
        from freemerge_pl.merging.released import released_fr_merge

        return released_fr_merge(task_vectors, **options)
    filter_ratio = 0.3 if filter_ratio is None else filter_ratio
    scaling = 1.0 if scaling is None else scaling
    check_filter_ratio(filter_ratio)
    keys = list(task_vectors[0])
    lambdas = energy_lambdas(task_vectors, keys, lambda_scope)
    delta = _fr_delta(task_vectors, keys, lambdas, filter_ratio, cutoff_mode, filter_1d, scaling)
    return MergeResult(delta, info={"lambdas": _lambda_info(lambdas)})


@register("free_merging", reference=PAPER_REFERENCE + ", Eq. 1-4, Alg. 1", produces_task_modules=True)
def free_merging(
    task_vectors: list[StateDict],
    *,
    semantics: str = "paper",
    filter_ratio: float | None = None,
    cutoff_mode: str = "fraction",
    lambda_scope: str = "model",
    filter_1d: bool = False,
    scaling: float | None = None,
    expert_density: float = 0.01,
    expert_scope: str = "tensor",
    expert_scale: float = 1.0,
    expert_dtype: str | None = None,
    released_options: dict[str, Any] | None = None,
) -> MergeResult:
    """FREE-Merging: the FR-Merging backbone plus one sparse expert per task (Eq. 4).

    Defaults as ``fr_merging``. ``expert_dtype`` None stores expert values in float32 here; the ``merge``
    driver then casts them to each tensor's dtype in the pre-trained checkpoint (the model dtype).
    Under ``semantics="released_code"`` the experts' values are relative to the released backbone
    (``released.released_free_merge``: replace-not-add, s² on the shared part), so inference is the same
    sparse ``apply_``/``restore_`` path; ``expert_scale`` must stay 1 there.
    """
    options = _released(semantics, released_options, filter_ratio=filter_ratio, scaling=scaling,
                        expert_density=expert_density)
    if options is not None:
        if expert_scale != 1.0:
            raise HyperparameterError("expert_scale is a paper-semantics option; the released code has none")
        from freemerge_pl.merging.released import released_free_merge

        result = released_free_merge(task_vectors, **options)
        if expert_dtype is not None:
            for m in result.task_modules:
                m.cast_values_(getattr(torch, expert_dtype))
        return result
    filter_ratio = 0.3 if filter_ratio is None else filter_ratio
    scaling = 1.0 if scaling is None else scaling
    if expert_scope not in EXPERT_SCOPES:
        raise HyperparameterError(f"expert_scope={expert_scope!r}; accepted: {list(EXPERT_SCOPES)}")
    check_filter_ratio(filter_ratio)
    keys = list(task_vectors[0])
    lambdas = energy_lambdas(task_vectors, keys, lambda_scope)
    delta = _fr_delta(task_vectors, keys, lambdas, filter_ratio, cutoff_mode, filter_1d, scaling)
    experts, mu = extract_experts(
        task_vectors, lambdas, expert_density=expert_density, expert_scope=expert_scope,
        expert_scale=expert_scale, value_dtype=getattr(torch, expert_dtype or "float32"), keys=keys,
    )
    return MergeResult(delta, experts, info={"lambdas": _lambda_info(lambdas), "mu": _lambda_info(mu)})
