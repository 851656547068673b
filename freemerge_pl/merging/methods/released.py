"""FR-/FREE-Merging as the authors' released code computes it (docs/semantics.md §9).

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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging.experts import SparseExpert, index_dtype
from freemerge_pl.merging.method import (
    Context,
    Density,
    Finalized,
    Finite,
    KeyOutput,
    KeyTensors,
    MergeMethod,
    NonNegative,
    Scan,
    Unit,
)
from freemerge_pl.merging.registry import register
from freemerge_pl.merging.topk import released_expert_indices
from freemerge_pl.settings import Range

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
    Range(0, math.inf, high_open=True).check("filter_ratio", filter_ratio)


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


def released_rescaler(expert_abs_mean: float, shared_abs_mean: float, density: float) -> float:
    """μ_i of utils.py:132-143: ``−log10(d)·A_i/(d·B_i)`` (0 where B_i = 0), written as the code does."""
    if shared_abs_mean == 0:
        return 0.0
    return (expert_abs_mean / density * math.log10(density)) / -shared_abs_mean


# ---------------------------------------------------------------------------------------------- one key


def _work(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _abs_mean(t: Tensor) -> float:
    return float(t.abs().mean()) if t.numel() else 0.0


def _alignment(means: list[float]) -> list[float]:
    """utils.py:119-130: factor ``1/(m_i/max_j m_j)``; 1 for an all-zero tensor (the code yields NaN)."""
    top = max(means)
    return [1.0 / (m / top) if m > 0 else 1.0 for m in means]


@dataclass
class KeySum:
    """One key of the released shared pass: S_k (None when the key is not summed), the per-task
    mean|c_ik·u_ik| (None unless asked) and the alignment factors c_ik (None unless ``align``)."""

    total: Tensor | None
    means: list[float] | None
    factors: list[float] | None


def released_key_sum(vectors: Sequence[Tensor], *, filter_ratio: float, filtered: bool, summed: bool,
                     first_only: bool, align: bool, want_means: bool) -> KeySum:
    """Per key, loop over tasks: filter, statistics (alignment, μ's B), and S_k = Σ_i c_ik·u_ik.

    One task's spectrum at a time. The aligned filtered sum uses G's linearity: Σ_i c_i·G(v_i) =
    G(Σ_i c_i·v_i), one more FFT instead of K filtered tensors held at once.
    """
    K = len(vectors)
    accumulate = summed and filtered and not align and not first_only
    acc: Tensor | None = None
    coeffs, means, factors = [1.0] * K, None, None
    if want_means or align:
        means = []
        for v in vectors:
            u = released_highpass(v, filter_ratio) if filtered else _work(v)
            means.append(_abs_mean(u))
            if accumulate:
                acc = u if acc is None else acc.add_(u)
        if align:
            coeffs = factors = _alignment(means)
            means = [c * m for c, m in zip(coeffs, means)]
    if not summed:
        return KeySum(None, means, factors)
    if first_only:
        return KeySum(coeffs[0] * _work(vectors[0]), means, factors)
    if acc is not None:
        return KeySum(acc, means, factors)
    total = torch.zeros_like(_work(vectors[0]))
    for c, v in zip(coeffs, vectors):
        total.add_(_work(v), alpha=c)
    return KeySum(released_highpass(total, filter_ratio) if filtered else total, means, factors)


# ---------------------------------------------------------------------------------------------- methods


def _check_profile_settings(method, profile_only: dict[str, tuple[str, ...]]) -> None:
    """A setting the chosen profile ignores is an error naming both."""
    for field_name, profiles in profile_only.items():
        if getattr(method, field_name) is not None and method.profile not in profiles:
            raise HyperparameterError(
                f"{method.name}: {field_name}={getattr(method, field_name)!r} is ignored by profile="
                f"{method.profile!r} (it applies to profile {' / '.join(repr(p) for p in profiles)} only); "
                f"remove it or change the profile")


class _ReleasedBase(MergeMethod):
    """Shared key predicates of the two released-code methods (``profile`` vit: ``key_pattern``; glue)."""

    filters_task_vectors = True
    #: ``filter_ratio`` is the radius of the band the released mask keeps: larger filters less
    filter_ratio_keeps = True

    def _vit_pattern(self) -> re.Pattern:
        pattern = self.key_pattern if self.key_pattern is not None else "attn|mlp"
        try:
            return re.compile(pattern)
        except re.error as err:
            raise HyperparameterError(f"{self.name}: key_pattern={pattern!r} is not a valid regex: {err}") from err

    def _quirk(self) -> bool:
        return True if self.keep_first_task_bias_quirk is None else self.keep_first_task_bias_quirk

    def changed(self, key: str) -> bool:
        return self._pattern.search(key) is not None if self.profile == "vit" else True

    def is_filtered(self, key: str, shape: tuple[int, ...]) -> bool:
        if self.profile == "glue":
            return "weight" in key and len(shape) == 2
        return self.changed(key) and "weight" in key

    def first_only(self, key: str) -> bool:
        return self.profile == "vit" and self._quirk() and not (self.changed(key) and "weight" in key)

    def begin(self, ctx: Context) -> None:
        if self.profile != "vit":
            return
        changed = [k for k in ctx.keys if self.changed(k)]
        if not changed:
            raise ConfigError(
                f"{self.name}: key_pattern={self._pattern.pattern!r} (profile 'vit') matches none of the "
                f"{len(ctx.keys)} merged tensors (e.g. {ctx.keys[:3]}), so the merge would return the "
                f"pre-trained weights; set key_pattern for this model's key names")
        for key in changed:
            shape = ctx.shapes[key]
            if "weight" in key and len(shape) != 2:
                raise ConfigError(
                    f"released_code (vit): key {key!r} of shape {tuple(shape)} matches key_pattern "
                    f"{self._pattern.pattern!r} and contains 'weight', so the released code would 2-D-FFT it "
                    f"and crash (it is {len(shape)}-D); narrow key_pattern")

    def key_sum(self, x: KeyTensors, *, summed: bool, want_means: bool, align: bool) -> KeySum:
        return released_key_sum(list(x.vectors()), filter_ratio=self.filter_ratio,
                                filtered=self.is_filtered(x.key, x.shape), summed=summed,
                                first_only=self.first_only(x.key), align=align, want_means=want_means)

    def _info(self, ctx: Context, align: bool, factors: dict) -> dict:
        info = {"semantics": "released_code", "reference": RELEASED_REFERENCE, "profile": self.profile,
                "filter_ratio": self.filter_ratio, "align": align}
        if align:
            info["alignment_factors"] = factors
        return info


@register("fr_merging_released", reference=RELEASED_REFERENCE + " (FR)")
@dataclass
class FRMergingReleased(_ReleasedBase):
    """FR-Merging as the released code computes it; ``delta`` is relative to θ_pre (module docstring).

    ``vit``: θ = θ_pre + s·S on the keys matching ``key_pattern`` (changed weight keys: Σ_i c_ik·G(v_ik);
    other changed keys: the first task's aligned delta, ``keep_first_task_bias_quirk``), θ_pre elsewhere.
    ``glue``: θ = θ_pre + s·Σ_i G(v_ik) on 2-D ``weight`` keys only (``key_pattern`` and the bias quirk do
    not apply: setting them is an error). ``filter_ratio`` is the released ρ (0.7 = the paper's 30%).
    ``align``/``scaling`` None take the profile's released values: vit (ViT-B-32_8_FR.yaml) align on,
    s = 0.7; glue (merge_roberta_glue.py argparse) align off, s = 0.5.
    """

    profile: Literal["vit", "glue"] = "vit"
    filter_ratio: NonNegative = 0.7
    align: bool | None = None
    scaling: Finite | None = None
    key_pattern: str | None = None
    keep_first_task_bias_quirk: bool | None = None

    def check(self) -> None:
        _check_profile_settings(self, {"key_pattern": ("vit",), "keep_first_task_bias_quirk": ("vit",)})
        self._pattern = self._vit_pattern()

    def settings(self) -> tuple[bool, float]:
        defaults = FR_PROFILE_DEFAULTS[self.profile]
        align = defaults["align"] if self.align is None else self.align
        return align, defaults["scaling"] if self.scaling is None else self.scaling

    def summed(self, key: str, shape) -> bool:
        return self.changed(key) if self.profile == "vit" else self.is_filtered(key, shape)

    def merge_key(self, x: KeyTensors, stats, ctx: Context) -> KeyOutput:
        align, scaling = self.settings()
        summed = self.summed(x.key, x.shape)
        part = self.key_sum(x, summed=summed, want_means=False, align=align)
        delta = scaling * part.total if summed else torch.zeros(x.shape, dtype=_dtype(x), device=ctx.device)
        return KeyOutput(delta, part.factors)

    def finalize(self, pieces: dict, stats, ctx: Context) -> Finalized:
        align, scaling = self.settings()
        merged = [k for k in ctx.keys if self.summed(k, ctx.shapes[k])]
        info = self._info(ctx, align, pieces)
        info.update({"filtered_keys": [k for k in merged if self.is_filtered(k, ctx.shapes[k])],
                     "scaling": scaling, "merged_keys": merged})
        if self.profile == "vit":
            info.update({"key_pattern": self._pattern.pattern, "keep_first_task_bias_quirk": self._quirk()})
        return Finalized(info=info)


def _dtype(x: KeyTensors) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class ReleasedFREEStats:
    mu: list[float]
    expert_means: list[float]
    shared_means: list[float]


@register("free_merging_released", reference=RELEASED_REFERENCE + " (FREE)")
@dataclass
class FREEMergingReleased(_ReleasedBase):
    """FREE-Merging as the released code computes it: a shared backbone ``delta`` and one SparseExpert per
    task holding, at its entries, task i's released model minus the backbone (module docstring).

    ``vit`` (ViT-B-32_8_FREE.yaml: ρ 0.7, align off, s 0.5, d 0.01): backbone s²·S on changed weight
    keys, s·S (first task's delta with the quirk) on other changed keys; experts replace it at the
    per-row top-``int(d·W)`` entries of v_i by s·μ_i·v_i (weights) or s·v_i (other changed keys).
    ``glue``: backbone ``glue_shared_scale``·S on every key, expert ``glue_expert_scale``·v_i at the
    per-row top-``int(glue_expert_density·W)`` entries after removing the top
    ``int(glue_expert_remove·W)`` (added, no μ). Each profile's settings are errors under the other.
    Expert values are float32 (float64 for float64 task vectors) unless ``expert_dtype`` is set; indices are
    stored in the fewest bytes (``expert_index_encoding`` "compact", loss-free) or as flat int32 ("flat").
    """

    produces_task_modules = True

    profile: Literal["vit", "glue"] = "vit"
    filter_ratio: NonNegative = 0.7
    align: bool = False
    scaling: Finite | None = None
    expert_density: Density | None = None
    key_pattern: str | None = None
    keep_first_task_bias_quirk: bool | None = None
    glue_shared_scale: Finite | None = None
    glue_expert_scale: Finite | None = None
    glue_expert_density: Density | None = None
    glue_expert_remove: Unit | None = None
    expert_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    expert_index_encoding: Literal["compact", "flat"] = "compact"

    def check(self) -> None:
        vit, glue = ("vit",), ("glue",)
        _check_profile_settings(self, {"scaling": vit, "expert_density": vit, "key_pattern": vit,
                                       "keep_first_task_bias_quirk": vit, "glue_shared_scale": glue,
                                       "glue_expert_scale": glue, "glue_expert_density": glue,
                                       "glue_expert_remove": glue})
        self._pattern = self._vit_pattern()

    @property
    def s(self) -> float:
        return 0.5 if self.scaling is None else self.scaling

    @property
    def density(self) -> float:
        if self.profile == "glue":
            return 0.02 if self.glue_expert_density is None else self.glue_expert_density
        return 0.01 if self.expert_density is None else self.expert_density

    @property
    def remove(self) -> float:
        return 0.0 if self.glue_expert_remove is None or self.profile == "vit" else self.glue_expert_remove

    def statistics(self, scan: Scan) -> ReleasedFREEStats | None:
        if self.profile == "glue":
            return None
        expert_total = [0.0] * scan.ctx.num_tasks
        shared_total = [0.0] * scan.ctx.num_tasks

        def fold(x: KeyTensors) -> None:
            part = self.key_sum(x, summed=False, want_means=True, align=self.align)
            for i, v in enumerate(x.vectors()):
                idx = released_expert_indices(v, self.density)
                expert_total[i] += float(v.reshape(-1)[idx].abs().double().sum()) / max(v.numel(), 1)
                shared_total[i] += part.means[i]

        scan(fold, "released μ")
        n = len(scan.keys)
        expert_means = [t / n for t in expert_total]
        shared_means = [t / n for t in shared_total]
        mu = [released_rescaler(a, b, self.density) for a, b in zip(expert_means, shared_means)]
        return ReleasedFREEStats(mu, expert_means, shared_means)

    def merge_key(self, x: KeyTensors, stats: ReleasedFREEStats | None, ctx: Context) -> KeyOutput:
        if self.profile == "glue":
            return self._glue_key(x)
        if not self.changed(x.key):
            return KeyOutput(torch.zeros(x.shape, dtype=_dtype(x), device=ctx.device), None)
        part = self.key_sum(x, summed=True, want_means=False, align=self.align)
        is_weight = "weight" in x.key
        delta = (self.s * self.s if is_weight else self.s) * part.total
        entries = []
        for v, mu_i in zip(x.vectors(), stats.mu):
            flat = _work(v).reshape(-1)
            idx = released_expert_indices(v, self.density)
            replacement = flat[idx] * mu_i if is_weight else flat[idx]
            nonzero = replacement != 0
            idx, replacement = idx[nonzero], replacement[nonzero]
            entries.append((idx.to(index_dtype(flat.numel())), self.s * replacement - delta.reshape(-1)[idx]))
        return KeyOutput(delta, (entries, part.factors))

    def _glue_key(self, x: KeyTensors) -> KeyOutput:
        shared_scale = 0.2 if self.glue_shared_scale is None else self.glue_shared_scale
        expert_scale = 10.0 if self.glue_expert_scale is None else self.glue_expert_scale
        part = self.key_sum(x, summed=True, want_means=False, align=self.align)
        entries = []
        for v in x.vectors():
            flat = _work(v).reshape(-1)
            idx = released_expert_indices(v, self.density, self.remove)
            entries.append((idx.to(index_dtype(flat.numel())), expert_scale * flat[idx]))
        return KeyOutput(shared_scale * part.total, (entries, part.factors))

    def finalize(self, pieces: dict, stats: ReleasedFREEStats | None, ctx: Context) -> Finalized:
        experts = []
        with_entries = {k: p for k, p in pieces.items() if p is not None}
        for i in range(ctx.num_tasks):
            entries = {key: p[0][i] for key, p in with_entries.items()}
            if self.expert_dtype is not None:
                entries = {key: (idx, vals.to(getattr(torch, self.expert_dtype))) for key, (idx, vals) in entries.items()}
            experts.append(SparseExpert(entries, {key: list(ctx.shapes[key]) for key in entries},
                                        self.expert_index_encoding))
        factors = {k: p[1] for k, p in with_entries.items() if p[1] is not None}
        info = self._info(ctx, self.align, factors)
        summed = [k for k in ctx.keys if k in with_entries]
        info["filtered_keys"] = [k for k in summed if self.is_filtered(k, ctx.shapes[k])]
        info["expert_nnz"] = [e.nnz for e in experts]
        if self.profile == "glue":
            info.update({"glue_shared_scale": 0.2 if self.glue_shared_scale is None else self.glue_shared_scale,
                         "glue_expert_scale": 10.0 if self.glue_expert_scale is None else self.glue_expert_scale,
                         "glue_expert_density": self.density, "glue_expert_remove": self.remove})
        else:
            info.update({"scaling": self.s, "expert_density": self.density,
                         "key_pattern": self._pattern.pattern, "keep_first_task_bias_quirk": self._quirk(),
                         "mu": stats.mu, "expert_abs_mean": stats.expert_means,
                         "shared_abs_mean": stats.shared_means, "changed_keys": summed})
        return Finalized(experts, info=info)

