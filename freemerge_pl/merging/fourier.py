"""The FR-Merging high-pass filter G (paper Eq. 1-2) as small tensor functions.

Symbols: the paper's cutoff ``D0`` is set by ``filter_ratio`` r (FILTER-DEF, docs/semantics.md §8):

* ``cutoff_mode="fraction"`` (default): with k = ⌈r·N⌉ over the spectrum's N coefficients, D0 is the
  (k+1)-th smallest centred distance (the smallest distance not among the k smallest; D0 = +inf when
  k ≥ N, i.e. everything goes), and coefficients with distance < D0 are zeroed (ties at D0 kept, so
  the mask stays conjugate-symmetric). Hence exactly k coefficients are removed when the k-th and
  (k+1)-th smallest distances differ, never more than k, lowest radial frequency first, so r is the
  share of the spectrum removed; r = 0 removes nothing, and the DC term (distance 0, the unique
  smallest) is removed by every r > 0, so a constant task vector vanishes under any positive cutoff.

  (docs/semantics.md §8 FILTER-DEF.)
* ``cutoff_mode="radius"``: D0 = r × the largest centred distance of that shape.

Distances are in frequency-index units: the centred (fftshifted) index (i − H//2) of row i is the
signed frequency ``fftfreq(H)·H`` of the unshifted index, so ``sqrt(η² + γ²)`` is computed from
``fftfreq`` directly, and the mask is conjugate-symmetric (|−f| = |f|, the Nyquist index maps to
itself), hence ``irfft2`` of the masked ``rfft2`` is exactly the real inverse of the masked ``fft2``.
Tensors of ≥ 2 dims are viewed as ``(shape[0], numel/shape[0])``; 1-D tensors are filtered only when
asked (``filter_1d``) with the 1-D analogue.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.settings import Range

CUTOFF_MODES = ("fraction", "radius")
#: the FR filter ratio r: the share of the spectrum removed, [0, 1)
FILTER_RATIO_RANGE = Range(0, 1, high_open=True)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The 2-D view ``(shape[0], numel/shape[0])`` of a ≥2-D shape; 1-D (and 0-D) shapes as ``(numel,)``."""
    if len(shape) >= 2:
        return (int(shape[0]), int(math.prod(shape[1:])))
    return (int(math.prod(shape)),)


def _full_distances(mshape: tuple[int, ...]) -> Tensor:
    """Centred distance of every coefficient of the full (not half) spectrum of ``mshape``."""
    freqs = [torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64).abs() for n in mshape]
    if len(freqs) == 1:
        return freqs[0]
    return torch.sqrt(freqs[0][:, None] ** 2 + freqs[1][None, :] ** 2)


def _half_distances(mshape: tuple[int, ...]) -> Tensor:
    """Centred distance of the coefficients that ``rfftn`` returns (last axis non-negative)."""
    last = torch.fft.rfftfreq(mshape[-1], d=1.0 / mshape[-1], dtype=torch.float64)
    if len(mshape) == 1:
        return last
    first = torch.fft.fftfreq(mshape[0], d=1.0 / mshape[0], dtype=torch.float64).abs()
    return torch.sqrt(first[:, None] ** 2 + last[None, :] ** 2)


def cutoff_radius(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str = "fraction") -> float:
    """The cutoff D0 of a spectrum shape (cached per shape, ratio and mode; see ``_cutoff_radius``)."""
    return _cutoff_radius(tuple(int(n) for n in mshape), float(filter_ratio), cutoff_mode)


@lru_cache(maxsize=1024)
def _cutoff_radius(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str = "fraction") -> float:
    """The cutoff D0 for a (1-D or 2-D) spectrum shape; coefficients with distance < D0 are removed.

    ``"fraction"``: the (k+1)-th smallest centred distance, k = ⌈r·N⌉ (+inf when k ≥ N), so at most k
    coefficients — exactly k unless the k-th and (k+1)-th distances tie — and always the DC term for
    r > 0. ``"radius"``: r × the largest distance. r = 0 gives 0 (nothing removed).
    """
    check_filter_ratio(filter_ratio)
    if cutoff_mode not in CUTOFF_MODES:
        raise HyperparameterError(f"cutoff_mode={cutoff_mode!r}; accepted: {list(CUTOFF_MODES)}")
    if filter_ratio == 0:
        return 0.0
    if len(mshape) == 2:  # the same values from integer squared distances, without the N·M float64 grid
        return _cutoff_radius_2d(mshape, filter_ratio, cutoff_mode)
    dist = _full_distances(mshape).flatten()
    if cutoff_mode == "radius":
        return float(filter_ratio * dist.max())
    k = max(1, math.ceil(filter_ratio * dist.numel() - 1e-9))  # 0.55·100 is 55.00000000000001 in floats
    if k >= dist.numel():
        return math.inf  # every coefficient is among the k smallest: remove them all
    # the (k+1)-th smallest distance: every distance < D0 is among the k smallest (ties at D0 are kept)
    return float(torch.kthvalue(dist, k + 1).values)


def _cutoff_radius_2d(mshape: tuple[int, int], filter_ratio: float, cutoff_mode: str) -> float:
    """``_cutoff_radius`` of a 2-D shape. The centred frequencies are integers a_i, b_j, so the (k+1)-th
    smallest distance is √q for the smallest integer q with #{a_i² + b_j² ≤ q} ≥ k + 1 (a binary search,
    counting per row against the sorted b_j²); √ of the same float64 as ``_full_distances`` takes. The grid
    and ``kthvalue`` took 6× the bytes of an fp32 [N, M] tensor (1.5 GiB for 32000 × 2048)."""
    a2, b2 = (torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64).abs().square().long() for n in mshape)
    if cutoff_mode == "radius":
        return float(filter_ratio * torch.tensor(float(a2.max() + b2.max()), dtype=torch.float64).sqrt())
    total = mshape[0] * mshape[1]
    k = max(1, math.ceil(filter_ratio * total - 1e-9))
    if k >= total:
        return math.inf
    b2 = b2.sort().values

    def count(q: int) -> int:  # how many a_i² + b_j² ≤ q
        return int(torch.searchsorted(b2, (q - a2).clamp_min(-1), right=True).sum())

    lo, hi = 0, int(a2.max() + b2.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(float(lo), dtype=torch.float64).sqrt())


@lru_cache(maxsize=256)
def _cached_mask(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str) -> Tensor:
    d0 = cutoff_radius(mshape, filter_ratio, cutoff_mode)
    return _half_distances(mshape) >= d0


def highpass_mask(
    mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str = "fraction", device=None
) -> Tensor:
    """Boolean keep-mask H(η, γ) over the ``rfftn`` half spectrum of a 1-D/2-D shape (cached per shape)."""
    mask = _cached_mask(tuple(int(n) for n in mshape), float(filter_ratio), cutoff_mode)
    return mask if device is None else mask.to(device)


def full_highpass_mask(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str = "fraction") -> Tensor:
    """The keep-mask over the full unshifted spectrum (for analysis and reference implementations)."""
    return _full_distances(mshape) >= cutoff_radius(mshape, filter_ratio, cutoff_mode)


def check_filter_ratio(filter_ratio: float) -> None:
    FILTER_RATIO_RANGE.check("filter_ratio", filter_ratio)


@lru_cache(maxsize=256)
def _band_remove_mask(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str) -> Tensor:
    """The removed coefficients (distance < D0) of the band that ``Spectrum`` transforms: along the last
    (real-transform) axis only the first ⌈D0⌉ non-negative frequencies, along the first axis all of them."""
    d0 = cutoff_radius(mshape, filter_ratio, cutoff_mode)
    n_real = mshape[-1]
    real = torch.fft.rfftfreq(n_real, d=1.0 / n_real, dtype=torch.float64)[: _band_width(n_real, d0)]
    if len(mshape) == 1:
        return real < d0
    first = torch.fft.fftfreq(mshape[0], d=1.0 / mshape[0], dtype=torch.float64).abs()
    out = torch.empty(len(first), len(real), dtype=torch.bool)
    rows = max(1, (1 << 20) // max(1, len(real)))  # row blocks: no float64 temporaries of the band's size
    for i in range(0, len(first), rows):
        out[i:i + rows] = torch.sqrt(first[i:i + rows, None] ** 2 + real[None, :] ** 2) < d0
    return out


@lru_cache(maxsize=256)
def _band_keep_mask(mshape: tuple[int, ...], filter_ratio: float, cutoff_mode: str) -> Tensor:
    """The complement of ``_band_remove_mask``: the band's coefficients the low-pass zeroes (``masked_fill_``
    with it is the mask product, without a complex copy of the boolean mask per tensor)."""
    return ~_band_remove_mask(mshape, filter_ratio, cutoff_mode)


def _band_width(n_real: int, d0: float) -> int:
    """How many non-negative frequencies k of a real axis of length n lie below D0 (k < D0)."""
    return min(n_real // 2 + 1, math.ceil(d0)) if math.isfinite(d0) else n_real // 2 + 1


_BLOCK_ELEMENTS = 1 << 22  # elements per block of the in-place high-pass (16 MiB of float32)
_TRANSPOSE_ROWS = 256  # rows per tile of a transposed copy (``_row_tiles``)


def _row_tiles(n: int, device: torch.device) -> list[slice]:
    """Slices of ``_TRANSPOSE_ROWS`` rows over ``n`` (one slice off the CPU). A CPU transposed copy in row tiles
    runs about twice as fast as one strided copy of the whole matrix (torch walks the destination, reading
    the source a column at a time)."""
    if device.type != "cpu":
        return [slice(None)]
    return [slice(i, i + _TRANSPOSE_ROWS) for i in range(0, n, _TRANSPOSE_ROWS)]


def _band_highpass_(x: Tensor, keep: Tensor, width: int, real_dim: int) -> Tensor:
    """x − L(x) into x (2-D, float32/64), transforming along ``real_dim`` (the longer axis), in blocks of
    ``_BLOCK_ELEMENTS`` along the other axis: the real transform of each block (a tall x's column block is first
    copied transposed into a row buffer, so every transform runs along a contiguous axis), its first ``width``
    coefficients (the band) kept, the complex transform of the band along the other axis, the coefficients
    ``keep`` (``(n_other, width)``, ``_band_keep_mask``) zeroed, the inverse, and each block's inverse real
    transform subtracted from x.

    A single block's band is transformed where it lies (a view of the coefficients; no copy). The inverse reuses
    the forward's coefficient buffer with its columns past the band zeroed once (``irfft``'s own zero-padding
    filled a fresh buffer per block), and a tall x takes the subtraction in row tiles."""
    other = 1 - real_dim
    n_real, n_other = x.shape[real_dim], x.shape[other]
    step = min(n_other, max(1, _BLOCK_ELEMENTS // n_real))
    ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    band = torch.empty((n_other, width), dtype=ctype, device=x.device) if step < n_other else None
    rows = torch.empty((step, n_real), dtype=x.dtype, device=x.device) if real_dim == 0 else None
    spec = None
    for i in range(0, n_other, step):
        s = min(step, n_other - i)
        block = x.narrow(other, i, s)
        if rows is not None:  # (n_real, s) column block → (s, n_real) rows
            for r in _row_tiles(n_real, x.device):
                rows[:s, r].copy_(block[r].T)
            block = rows[:s]
        spec = torch.fft.rfft(block, dim=-1)
        if band is not None:
            band[i:i + s] = spec[:, :width]
    coefficients = torch.fft.fft(spec[:, :width] if band is None else band, dim=0)
    del band  # freed before the inverse: two band-sized buffers at a time, not three (a vocabulary-sized key's peak)
    low = torch.fft.ifft(coefficients.masked_fill_(keep, 0), dim=0)
    del coefficients
    if spec.shape[0] != step:  # the last block was short: a full-height buffer for the inverse
        spec = torch.empty((step, spec.shape[1]), dtype=ctype, device=x.device)
    spec[:, width:] = 0
    for i in range(0, n_other, step):
        s = min(step, n_other - i)
        spec[:s, :width] = low[i:i + s]
        inv = torch.fft.irfft(spec[:s], n=n_real, dim=-1)  # (s, n_real)
        if rows is None:
            x.narrow(0, i, s).sub_(inv)
        else:  # x's (n_real, s) column block −= invᵀ, in tiles of x's rows
            target = x.narrow(1, i, s)
            for r in _row_tiles(n_real, x.device):
                target[r].sub_(inv[:, r].T)
    return x


class Spectrum:
    """G(v) = v − L(v) for any filter ratio, with L the low-pass of the removed band, transforming only
    that band (``highpass(r)``; the real transform is done once and reused across ratios).

    The removed coefficients (centred distance < D0) have non-negative frequency k < D0 along the axis of
    the real transform, so after that transform (``rfft`` along the longer axis: a tall matrix view is
    transposed first, as the distance is symmetric in the two axes and a contiguous last axis is fastest)
    only the first ⌈D0⌉ coefficient columns enter the complex transform along the other axis, the mask and
    the inverse; ``irfft`` zero-pads the rest. Mathematically ``irfft2(rfft2(v) ⊙ H)``, with the removed
    share r of the spectrum the only part transformed both ways: on a ViT-B/32 (768×3072 MLP weights,
    r = 0.3) 40% less than the full ``rfft2``/``irfft2``, and a search over ``filter_ratio`` costs one
    real transform per tensor plus one band transform per ratio.
    """

    def __init__(self, v: Tensor, *, cutoff_mode: str = "fraction", filter_1d: bool = False,
                 keep: bool = True, overwrite: bool = False) -> None:
        self.v = v
        self.keep = keep and not overwrite  # False: one ratio only, the real transform is dropped after use
        self.overwrite = overwrite  # one ratio, and v (float32/64) may be overwritten with the result
        self.cutoff_mode = cutoff_mode
        self.passthrough = v.numel() == 0 or (v.dim() < 2 and not filter_1d)
        self.mshape = matrix_shape(v.shape)
        self.transposed = len(self.mshape) == 2 and self.mshape[0] > self.mshape[1]
        self.shape = tuple(reversed(self.mshape)) if self.transposed else self.mshape
        self._work: Tensor | None = None
        self._real: Tensor | None = None

    @property
    def work(self) -> Tensor:
        """The fp32 (fp64 stays fp64) matrix view, transposed when tall."""
        if self._work is None:
            x = (self.v if self.v.dtype == torch.float64 else self.v.float()).reshape(self.mshape)
            self._work = x.T.contiguous() if self.transposed else x
        return self._work

    @property
    def real_transform(self) -> Tensor:
        """``rfft`` of ``work`` along its last axis (cached)."""
        if self._real is None:
            self._real = torch.fft.rfft(self.work, dim=-1)
        return self._real

    def lowpass(self, filter_ratio: float) -> Tensor | None:
        """L(v) in ``work``'s layout: the part the high-pass removes (None when it removes nothing)."""
        check_filter_ratio(filter_ratio)
        if filter_ratio == 0 or self.passthrough:
            return None
        d0 = cutoff_radius(self.shape, filter_ratio, self.cutoff_mode)
        if d0 == 0:
            return None
        n_real = self.shape[-1]
        band = self.real_transform[..., : _band_width(n_real, d0)]
        if len(self.shape) == 1:
            mask = _band_remove_mask(self.shape, float(filter_ratio), self.cutoff_mode).to(band.device)
            return torch.fft.irfft(band * mask, n=n_real)
        keep = _band_keep_mask(self.shape, float(filter_ratio), self.cutoff_mode).to(band.device)
        coefficients = torch.fft.fft(band, dim=0).masked_fill_(keep, 0)
        if not self.keep:
            del band
            self._real = None
        return torch.fft.irfft(torch.fft.ifft(coefficients, dim=0), n=n_real, dim=-1)

    def _highpass_in_place(self, filter_ratio: float) -> Tensor | None:
        """``highpass`` for ``overwrite``: v − L(v) computed into v (``_band_highpass_``; a tall float v along
        its first axis, so without the transposed copy): no full-size real transform, L(v) or copy of v.
        None when the plain path applies (nothing removed, everything removed, 1-D)."""
        check_filter_ratio(filter_ratio)
        if filter_ratio == 0 or self.passthrough or len(self.shape) != 2:
            return None
        d0 = cutoff_radius(self.shape, filter_ratio, self.cutoff_mode)
        if d0 == 0 or not math.isfinite(d0):
            return None
        n_real = self.shape[-1]
        width = _band_width(n_real, d0)
        keep = _band_keep_mask(self.shape, float(filter_ratio), self.cutoff_mode)
        if self.transposed and self.v.dtype in (torch.float32, torch.float64) and self.v.is_contiguous():
            # a tall v is transformed along its own first axis in column blocks: no transposed copy
            x = self.v.view(self.mshape)
            return _band_highpass_(x, keep.to(x.device), width, real_dim=0).view(self.v.shape)
        work = self.work
        out = _band_highpass_(work, keep.to(work.device), width, real_dim=1)
        return (out.T if self.transposed else out).reshape(self.v.shape)

    def highpass(self, filter_ratio: float) -> Tensor:
        if self.overwrite:
            out = self._highpass_in_place(filter_ratio)
            if out is not None:
                return out
        low = self.lowpass(filter_ratio)
        if low is None:
            return self.v
        if not math.isfinite(cutoff_radius(self.shape, filter_ratio, self.cutoff_mode)):
            return torch.zeros(self.v.shape, dtype=self.work.dtype, device=self.v.device)
        out = low.neg_().add_(self.work)  # v − L(v), in L's buffer
        return (out.T if self.transposed else out).reshape(self.v.shape)  # a view for 2-D tensors


def highpass(
    v: Tensor, filter_ratio: float, *, cutoff_mode: str = "fraction", filter_1d: bool = False
) -> Tensor:
    """G(v): zero the low-frequency part of ``v``'s centred spectrum, invert, keep the real part.

    Computed in float32 (float64 stays float64) as v − L(v), transforming only the removed band
    (``Spectrum``); the output has ``v``'s shape. 1-D tensors are returned unchanged unless ``filter_1d``; r = 0 returns ``v`` unchanged.
    """
    return Spectrum(v, cutoff_mode=cutoff_mode, filter_1d=filter_1d).highpass(filter_ratio)
