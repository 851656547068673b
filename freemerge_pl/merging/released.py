"""FR-/FREE-Merging as the authors' released code computes it (``semantics: released_code``, DESIGN §9).

Source: github.com/Zhengsh123/FREE-Merging, commit 36c0f41. ViT path (profile ``vit``):
``merge_vit/src/task_vectors.py``, ``utils.py``, ``eval.py``, ``main_merging.py``,
``config/ViT-B-32_8_{FR,FREE}.yaml``. GLUE path (profile ``glue``): ``merge_lm/merge_roberta_glue.py``,
``merge_lm/model_merging_methods/{merging_methods,task_vector}.py``. File:line references below are
to that commit. These functions reproduce what the code computes, quirks included; the paper's text
is ``fr.py`` (the default ``paper`` semantics).

Symbols: ``filter_ratio`` ρ (the paper's "filtering percentage" p is 1 − ρ), ``scaling`` s,
``expert_density`` d, ``v_i`` the task vector of task i, ``G`` the released high-pass below,
``u_i`` = G(v_i) on the filtered keys and v_i elsewhere, ``c_ik`` the per-key alignment factors
(1 when ``align`` is off), ``S_k = Σ_i c_ik·u_ik``.

Filter G (task_vectors.py:465-485, merge_lm task_vector.py:99-121):

* ``fft2`` of the 2-D tensor, NOT shifted. ``dist`` = distance of array index (i, j) from the array
  index (H//2, W//2), computed as ``sqrt`` of an int64 tensor, i.e. in float32. In an unshifted
  spectrum (H//2, W//2) is the Nyquist point, so the kept disk holds the highest frequencies.
* R_low = min(H, W)//10 (int), R_high = ρ·min(H, W) (compared in float32, as torch casts the Python
  scalar to the tensor's dtype). Output = Re ifft2(F·[dist ≤ R_low]) + Re ifft2(F·[R_low ≤ dist ≤ R_high]):
  a coefficient's multiplicity is 1 inside the disk, 2 on the ring dist == R_low (counted by both
  parts; for min(H, W) < 10 that "ring" is the single point (H//2, W//2)), 0 outside. When
  ρ·min(H, W) < R_low the disk dist ≤ R_low is still kept (multiplicity 1, ring included).
* Only 2-D tensors: the code crashes on others (``fft2`` of a 1-D tensor raises, ``H, W = shape``
  fails for > 2-D). Here ``released_highpass`` raises a ConfigError instead.
* For non-square weights the disk (radius ρ·min) removes most rows of the long axis (3072×768 at
  ρ = 0.7: 1075 of 3072 rows, 31.7% of the coefficients survive), far more than 1 − ρ of the spectrum;
  a square 768×768 loses only its 113 corner coefficients.

Profile ``vit`` (main_merging.py:16-54):

* "Changed" keys: ``'attn' in key or 'mlp' in key`` (``key_pattern``, default ``attn|mlp``, searched
  as a regex); ``apply_to`` (task_vectors.py:80-95) leaves every other key at θ_pre. Filtered,
  summed and μ-scaled keys: changed keys that also contain ``weight`` (``in_proj_weight`` does).
* Alignment (utils.py:108-130, ``with_align``; FR config on, FREE config off): per key, every key of
  the vector (changed or not), m_ik = mean|u_ik| and u_ik ← u_ik / (m_ik / max_j m_jk). Biases are
  aligned too. Quirk kept out: an all-zero u_ik becomes NaN there (0·∞); here it stays zero
  (factor recorded as 1).
* Sum (task_vectors.py:38-54 via Python's ``sum``, whose ``0 + tv`` returns tv itself): changed weight
  keys are summed; every other key keeps the FIRST task's (aligned) delta, the other operand dropped
  (``keep_first_task_bias_quirk``; off = those keys summed too).
* FR (``shared_only``): θ = θ_pre + s·S on changed keys (weights: s·Σ_i c_ik·G(v_ik); biases, quirk
  on: s·c_0k·v_0k). No Eq. 3 λ's.
* FREE experts (task_vectors.py:238-247, ``TaskVectorMiddleKeep`` with top_k_remove 0): for EVERY key,
  the top ``int(d·W)`` entries by |v| along the last dimension of the raw task vector (per row for
  2-D; over the vector for 1-D, so tensors with < 1/d entries get none; one row per leading index
  for > 2-D); a 0-d tensor is kept whole. Rescaler (utils.py:132-143)
  μ_i = −log10(d)·A_i/(d·B_i), A_i = mean over keys of mean|expert_ik|, B_i = mean over keys of
  mean|c_ik·u_ik|, unweighted means over EVERY key of the vector (keys whose delta is zero add 0 to
  both sums, so only the set of nonzero keys matters). Base-10 log; Eq. 4's λ cancels.
* FREE task model (eval.py:144-153: ``task_expert.sum_two(shared*s).apply_to(s)``; ``__mul__`` at
  task_vectors.py:61-69 scales only changed weight keys): on changed weight keys
  θ_i = θ_pre + s·(μ_i·e_i where μ_i·e_i ≠ 0, else s·S): the expert REPLACES the shared value and the
  shared sum is scaled twice (s²). On changed non-weight keys θ_i = θ_pre + s·(e_i where e_i ≠ 0,
  else S) with S the first task's delta (quirk): scaled once, no μ. Other keys: θ_pre.
  Here the backbone is θ_pre + [s²·S on weight keys, s·S on the other changed keys] and each expert
  stores, at its nonzero entries, the target minus that backbone (s·μ·v − s²·S, resp. s·v − s·S), so
  backbone + expert.apply_(weight=1) is task i's model. The FREE backbone alone (no expert) is the
  s²-scaled shared model, not the FR model.

Profile ``glue`` (merge_roberta_glue.py:108-219, 276-317): the caller passes everything but the
classifier (the code excludes ``.*classifier.*``); filtered keys: ``'weight' in key`` and 2-D (word,
position and token-type embeddings included); sum over all tasks on every key (no quirk, no align).
FR: θ = θ_pre + s·S on the filtered keys ONLY (task_vector.py:169-187; biases and LayerNorms stay
θ_pre), s = 0.5 (argparse default ``--scaling``). FREE: θ_i = θ_pre + 0.2·S + 10·e_i on every key
(expert ADDED, no μ, ``args.scaling`` unused; merge_roberta_glue.py:193-196), e_i = per-row top-k of
the raw v_i (``TaskVectorBREAD``: remove the top ``int(r·W)`` per row, then keep the top
``int(d·W)`` of the rest). The functions' defaults are d = 0.02, r = 0 (merge_roberta_glue.py:166);
the README command passes the argparse defaults d = 0.1, r = 0.02 (lines 29-30, 450). GLUE expert
selection uses the dataset index, i.e. oracle routing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, HyperparameterError, check_range
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.experts import SparseExpert, index_dtype

PROFILES = ("vit", "glue")
RELEASED_REFERENCE = "Zheng & Wang 2025, released code github.com/Zhengsh123/FREE-Merging@36c0f41"
# Per-profile defaults of released_fr_merge where the two scripts differ.
FR_PROFILE_DEFAULTS = {"vit": {"align": True, "scaling": 0.7}, "glue": {"align": False, "scaling": 0.5}}


# ---------------------------------------------------------------------------------------------- filter


@lru_cache(maxsize=256)
def _filter_mask(height: int, width: int, filter_ratio: float) -> Tensor:
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    dist = torch.sqrt((cols - width // 2) ** 2 + (rows - height // 2) ** 2)  # int64 -> float32, as released
    low_radius = min(height, width) // 10
    high_radius = min(height, width) * filter_ratio
    inner = (dist <= low_radius).float()
    band = ((dist >= low_radius) & (dist <= high_radius)).float()
    return inner + band


@lru_cache(maxsize=256)
def _half_symmetric_mask(height: int, width: int, filter_ratio: float, dtype: torch.dtype) -> Tensor:
    mask = _filter_mask(height, width, filter_ratio).double()
    neg_rows = (-torch.arange(height)) % height
    neg_cols = (-torch.arange(width)) % width
    symmetric = 0.5 * (mask + mask[neg_rows][:, neg_cols])
    return symmetric[:, : width // 2 + 1].to(dtype).contiguous()


def check_released_filter_ratio(filter_ratio: float) -> None:
    check_range("filter_ratio", filter_ratio, 0.0, math.inf)


def released_filter_mask(shape_hw: tuple[int, int], filter_ratio: float) -> Tensor:
    """Multiplicity (0., 1. or 2.) of each coefficient of the UNSHIFTED ``fft2`` spectrum of an H×W matrix.

    Quirks reproduced (task_vectors.py:465-485): distance from the array index (H//2, W//2), computed in
    float32; kept when ≤ ρ·min(H, W); the ring at distance exactly min(H, W)//10 counted twice; the disk
    of radius min(H, W)//10 kept even when ρ·min(H, W) is smaller. Returns a float32 H×W tensor.
    """
    check_released_filter_ratio(filter_ratio)
    height, width = (int(n) for n in shape_hw)
    return _filter_mask(height, width, float(filter_ratio)).clone()


def released_highpass(v: Tensor, filter_ratio: float) -> Tensor:
    """The released filter G(v) = Re ifft2(fft2(v)·mask) of a 2-D tensor (mask: ``released_filter_mask``).

    Computed as ``irfft2(rfft2(v)·M_sym)`` with M_sym(k) = (M(k) + M(−k))/2, which equals the real part
    of the masked full inverse for real v (the mask is not conjugate-symmetric for odd sizes, hence the
    symmetrisation). float64 stays float64, other dtypes are computed in float32. The released code
    only handles 2-D tensors (1-D: ``fft2`` raises; > 2-D: ``H, W = shape`` fails); so does this.
    """
    check_released_filter_ratio(filter_ratio)
    if v.dim() != 2:
        raise ConfigError(f"the released filter takes 2-D tensors; got shape {tuple(v.shape)} "
                          f"(the released code crashes on it too)")
    work = _work(v)
    height, width = work.shape
    if work.numel() == 0:
        return work.clone()
    mask = _half_symmetric_mask(height, width, float(filter_ratio), work.dtype).to(work.device)
    return torch.fft.irfft2(torch.fft.rfft2(work) * mask, s=(height, width))


# ---------------------------------------------------------------------------------------------- experts


def released_expert_indices(v: Tensor, density: float, remove_density: float = 0.0) -> Tensor:
    """Sorted flat indices of the released expert's nonzero entries of ``v``.

    ``TaskVectorMiddleKeep``/``TaskVectorBREAD`` (task_vectors.py:238-258): along the last dimension,
    zero the top ``int(remove_density·W)`` entries by |v|, then keep the top ``int(density·W)`` of the
    rest (``torch.topk``, so ties break as there); 1-D tensors are one row; a 0-d tensor is kept whole.
    Selected entries whose value is 0 are left out (they change nothing in the released composition).
    """
    flat = v.reshape(-1)
    if v.dim() == 0:
        return torch.nonzero(flat != 0).flatten()
    width = v.shape[-1]
    if width == 0 or flat.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    magnitude = flat.abs().reshape(-1, width)
    n_remove = int(width * remove_density)
    if n_remove > 0:
        magnitude = magnitude.scatter(1, torch.topk(magnitude, n_remove, dim=1).indices, 0.0)
    n_keep = int(width * density)
    if n_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    cols = torch.topk(magnitude, n_keep, dim=1).indices
    rows = torch.arange(magnitude.shape[0], device=v.device)[:, None]
    indices = (rows * width + cols).reshape(-1)
    indices = indices[magnitude.reshape(-1)[indices] != 0]
    return indices.sort().values


def released_rescaler(expert_abs_mean: float, shared_abs_mean: float, density: float) -> float:
    """μ_i of utils.py:132-143: ``−log10(d)·A_i/(d·B_i)`` (0 where B_i = 0), written as the code does."""
    if shared_abs_mean == 0:
        return 0.0
    return (expert_abs_mean / density * math.log10(density)) / -shared_abs_mean


# ---------------------------------------------------------------------------------------------- shared pass


@dataclass
class _SharedPass:
    sums: dict[str, Tensor]
    means: list[dict[str, float]] | None
    factors: dict[str, list[float]] | None


def _work(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _abs_mean(t: Tensor) -> float:
    return float(t.abs().mean()) if t.numel() else 0.0


def _alignment(means: list[float]) -> list[float]:
    """utils.py:119-130: factor ``1/(m_i/max_j m_j)``; 1 for an all-zero tensor (the code yields NaN)."""
    top = max(means)
    return [1.0 / (m / top) if m > 0 else 1.0 for m in means]


def _shared_pass(
    task_vectors: Sequence[StateDict],
    keys: Sequence[str],
    *,
    filter_ratio: float,
    is_filtered: Callable[[str, Tensor], bool],
    first_only: Callable[[str], bool],
    sum_keys: set[str],
    align: bool,
    want_means: bool,
) -> _SharedPass:
    """Per key, loop over tasks: filter, statistics (alignment, μ's B), and S_k = Σ_i c_ik·u_ik.

    One task's spectrum at a time. The aligned filtered sum uses G's linearity: Σ_i c_i·G(v_i) =
    G(Σ_i c_i·v_i), one more FFT instead of K filtered tensors held at once.
    """
    K = len(task_vectors)
    sums: dict[str, Tensor] = {}
    means: list[dict[str, float]] | None = [{} for _ in range(K)] if (want_means or align) else None
    factors: dict[str, list[float]] | None = {} if align else None
    for key in keys:
        filtered = is_filtered(key, task_vectors[0][key])
        wants_sum = key in sum_keys
        accumulate = wants_sum and filtered and not align and not first_only(key)
        acc: Tensor | None = None
        coeffs = [1.0] * K
        if means is not None:
            key_means = []
            for tv in task_vectors:
                u = released_highpass(tv[key], filter_ratio) if filtered else _work(tv[key])
                key_means.append(_abs_mean(u))
                if accumulate:
                    acc = u if acc is None else acc.add_(u)
            if align:
                coeffs = _alignment(key_means)
                factors[key] = coeffs
                key_means = [c * m for c, m in zip(coeffs, key_means)]
            for i, m in enumerate(key_means):
                means[i][key] = m
        if not wants_sum:
            continue
        if first_only(key):
            sums[key] = coeffs[0] * _work(task_vectors[0][key])
        elif acc is not None:
            sums[key] = acc
        else:
            total = torch.zeros_like(_work(task_vectors[0][key]))
            for c, tv in zip(coeffs, task_vectors):
                total.add_(_work(tv[key]), alpha=c)
            sums[key] = released_highpass(total, filter_ratio) if filtered else total
    return _SharedPass(sums, means, factors)


# ---------------------------------------------------------------------------------------------- drivers


def _check_inputs(task_vectors: Sequence[StateDict], profile: str) -> list[str]:
    if profile not in PROFILES:
        raise HyperparameterError(f"profile={profile!r}; accepted: {list(PROFILES)}")
    if len(task_vectors) == 0:
        raise ConfigError("released_code merging needs at least one task vector")
    keys = list(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], start=1):
        if set(tv) != set(keys):
            missing = sorted(set(keys) - set(tv))[:5]
            extra = sorted(set(tv) - set(keys))[:5]
            raise CheckpointMismatchError(f"task vector {i} keys differ from task vector 0's: "
                                          f"missing {missing}, unexpected {extra}")
    return keys


def _vit_predicates(key_pattern: str, keep_first_task_bias_quirk: bool):
    pattern = re.compile(key_pattern)

    def changed(key: str) -> bool:
        return pattern.search(key) is not None

    def filtered(key: str, t: Tensor) -> bool:
        if not (changed(key) and "weight" in key):
            return False
        if t.dim() != 2:
            raise ConfigError(
                f"released_code (vit): key {key!r} of shape {tuple(t.shape)} matches key_pattern "
                f"{key_pattern!r} and contains 'weight', so the released code would 2-D-FFT it and crash "
                f"(it is {t.dim()}-D); narrow key_pattern")
        return True

    def first_only(key: str) -> bool:
        return keep_first_task_bias_quirk and not (changed(key) and "weight" in key)

    return changed, filtered, first_only


def _glue_filtered(key: str, t: Tensor) -> bool:
    return "weight" in key and t.dim() == 2


def _common_info(profile: str, filter_ratio: float, align: bool, shared: _SharedPass, filtered: list[str]):
    info = {"semantics": "released_code", "reference": RELEASED_REFERENCE, "profile": profile,
            "filter_ratio": filter_ratio, "align": align, "filtered_keys": filtered}
    if shared.factors is not None:
        info["alignment_factors"] = shared.factors
    return info


def released_fr_merge(
    task_vectors: list[StateDict],
    *,
    profile: str = "vit",
    filter_ratio: float = 0.7,
    align: bool | None = None,
    scaling: float | None = None,
    key_pattern: str = "attn|mlp",
    keep_first_task_bias_quirk: bool = True,
) -> MergeResult:
    """FR-Merging as the released code computes it; ``delta`` is relative to θ_pre (module docstring).

    ``vit``: θ = θ_pre + s·S on the keys matching ``key_pattern`` (changed weight keys: Σ_i c_ik·G(v_ik);
    other changed keys: the first task's aligned delta, ``keep_first_task_bias_quirk``), θ_pre elsewhere.
    ``glue``: θ = θ_pre + s·Σ_i G(v_ik) on 2-D ``weight`` keys only; ``key_pattern`` and the bias quirk
    do not apply. ``align``/``scaling`` None take the profile's released values: vit (ViT-B-32_8_FR.yaml)
    align on, s = 0.7; glue (merge_roberta_glue.py argparse) align off, s = 0.5.
    """
    keys = _check_inputs(task_vectors, profile)
    check_released_filter_ratio(filter_ratio)
    align = FR_PROFILE_DEFAULTS[profile]["align"] if align is None else bool(align)
    scaling = FR_PROFILE_DEFAULTS[profile]["scaling"] if scaling is None else float(scaling)
    if profile == "vit":
        changed, is_filtered, first_only = _vit_predicates(key_pattern, keep_first_task_bias_quirk)
        sum_keys = {k for k in keys if changed(k)}
    else:
        is_filtered, first_only = _glue_filtered, (lambda key: False)
        sum_keys = {k for k in keys if _glue_filtered(k, task_vectors[0][k])}
    shared = _shared_pass(task_vectors, keys, filter_ratio=filter_ratio, is_filtered=is_filtered,
                          first_only=first_only, sum_keys=sum_keys, align=align, want_means=False)
    delta = {}
    for key in keys:
        delta[key] = scaling * shared.sums[key] if key in sum_keys else torch.zeros_like(_work(task_vectors[0][key]))
    filtered = [k for k in keys if k in sum_keys and is_filtered(k, task_vectors[0][k])]
    info = _common_info(profile, filter_ratio, align, shared, filtered)
    info.update({"scaling": scaling, "merged_keys": sorted(sum_keys, key=keys.index)})
    if profile == "vit":
        info.update({"key_pattern": key_pattern, "keep_first_task_bias_quirk": keep_first_task_bias_quirk})
    return MergeResult(delta, info=info)


def released_free_merge(
    task_vectors: list[StateDict],
    *,
    profile: str = "vit",
    filter_ratio: float = 0.7,
    align: bool = False,
    scaling: float = 0.5,
    expert_density: float = 0.01,
    key_pattern: str = "attn|mlp",
    keep_first_task_bias_quirk: bool = True,
    glue_shared_scale: float = 0.2,
    glue_expert_scale: float = 10.0,
    glue_expert_density: float = 0.02,
    glue_expert_remove: float = 0.0,
) -> MergeResult:
    """FREE-Merging as the released code computes it: a shared backbone ``delta`` and one SparseExpert per
    task holding, at its entries, task i's released model minus the backbone (module docstring).

    ``vit`` (ViT-B-32_8_FREE.yaml: ρ 0.7, align off, s 0.5, d 0.01): backbone s²·S on changed weight
    keys, s·S (first task's delta with the quirk) on other changed keys; experts replace it at the
    per-row top-``int(d·W)`` entries of v_i by s·μ_i·v_i (weights) or s·v_i (other changed keys).
    ``glue``: backbone ``glue_shared_scale``·S on every key, expert ``glue_expert_scale``·v_i at the
    per-row top-``int(glue_expert_density·W)`` entries after removing the top
    ``int(glue_expert_remove·W)`` (added, no μ); ``scaling``, ``expert_density``, ``key_pattern`` and the
    bias quirk do not apply. Expert values are float32 (float64 for float64 task vectors).
    """
    keys = _check_inputs(task_vectors, profile)
    check_released_filter_ratio(filter_ratio)
    if profile == "glue":
        return _free_glue(task_vectors, keys, filter_ratio, align, glue_shared_scale, glue_expert_scale,
                          glue_expert_density, glue_expert_remove)
    check_range("expert_density", expert_density, 0.0, 1.0, low_open=True)
    changed, is_filtered, first_only = _vit_predicates(key_pattern, keep_first_task_bias_quirk)
    changed_keys = [k for k in keys if changed(k)]
    shared = _shared_pass(task_vectors, keys, filter_ratio=filter_ratio, is_filtered=is_filtered,
                          first_only=first_only, sum_keys=set(changed_keys), align=align, want_means=True)
    is_weight = {k: "weight" in k for k in changed_keys}
    delta = {}
    for key in keys:
        if key in shared.sums:
            delta[key] = (scaling * scaling if is_weight[key] else scaling) * shared.sums[key]
        else:
            delta[key] = torch.zeros_like(_work(task_vectors[0][key]))
    selected, expert_means = [], []  # A_i runs over every key; indices are kept for the changed keys only
    for tv in task_vectors:
        sel, total = {}, 0.0
        for key in keys:
            idx = released_expert_indices(tv[key], expert_density)
            total += float(tv[key].reshape(-1)[idx].abs().double().sum()) / max(tv[key].numel(), 1)
            if key in shared.sums:
                sel[key] = idx
        expert_means.append(total / len(keys))
        selected.append(sel)
    shared_means = [sum(m.values()) / len(keys) for m in shared.means]
    mu = [released_rescaler(a, b, expert_density) for a, b in zip(expert_means, shared_means)]
    experts = []
    for tv, sel, mu_i in zip(task_vectors, selected, mu):
        entries, shapes = {}, {}
        for key in changed_keys:
            v = _work(tv[key]).reshape(-1)
            idx = sel[key]
            replacement = v[idx] * mu_i if is_weight[key] else v[idx]
            nonzero = replacement != 0
            idx, replacement = idx[nonzero], replacement[nonzero]
            values = scaling * replacement - delta[key].reshape(-1)[idx]
            entries[key] = (idx.to(index_dtype(v.numel())), values)
            shapes[key] = list(tv[key].shape)
        experts.append(SparseExpert(entries, shapes))
    filtered = [k for k in changed_keys if is_filtered(k, task_vectors[0][k])]
    info = _common_info("vit", filter_ratio, align, shared, filtered)
    info.update({
        "scaling": scaling, "expert_density": expert_density, "key_pattern": key_pattern,
        "keep_first_task_bias_quirk": keep_first_task_bias_quirk, "mu": mu,
        "expert_abs_mean": expert_means, "shared_abs_mean": shared_means,
        "expert_nnz": [e.nnz for e in experts], "changed_keys": changed_keys,
    })
    return MergeResult(delta, experts, info=info)


def _free_glue(task_vectors, keys, filter_ratio, align, shared_scale, expert_scale, density, remove):
    check_range("glue_expert_density", density, 0.0, 1.0, low_open=True)
    check_range("glue_expert_remove", remove, 0.0, 1.0)
    shared = _shared_pass(task_vectors, keys, filter_ratio=filter_ratio, is_filtered=_glue_filtered,
                          first_only=lambda key: False, sum_keys=set(keys), align=align, want_means=False)
    delta = {key: shared_scale * shared.sums[key] for key in keys}
    experts = []
    for tv in task_vectors:
        entries, shapes = {}, {}
        for key in keys:
            v = _work(tv[key]).reshape(-1)
            idx = released_expert_indices(tv[key], density, remove)
            entries[key] = (idx.to(index_dtype(v.numel())), expert_scale * v[idx])
            shapes[key] = list(tv[key].shape)
        experts.append(SparseExpert(entries, shapes))
    filtered = [k for k in keys if _glue_filtered(k, task_vectors[0][k])]
    info = _common_info("glue", filter_ratio, align, shared, filtered)
    info.update({"glue_shared_scale": shared_scale, "glue_expert_scale": expert_scale,
                 "glue_expert_density": density, "glue_expert_remove": remove,
                 "expert_nnz": [e.nnz for e in experts]})
    return MergeResult(delta, experts, info=info)
