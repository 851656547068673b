"""Frequency-domain views of one tensor: its 2-D amplitude spectrum, the display spectrum (centred log power),
the energy below each FR cutoff, and a running variance of amplitude across tasks (docs/semantics.md §10).

A tensor is viewed as the FR filter views it (``fourier.matrix_shape``: ``(shape[0], numel/shape[0])``; 1-D
tensors as vectors) and transformed with the orthonormal DFT (``norm="ortho"``), so Parseval holds exactly:
``Σ_f |F(v)(f)|² = ||v||²``, amplitudes are comparable across tensor sizes, and the energy FR removes at
ratio r is the energy of the coefficients its mask zeroes (``fourier.full_highpass_mask``: the same D0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from freemerge_pl.merging.fourier import full_highpass_mask, matrix_shape


def spectrum(v: Tensor) -> Tensor:
    """The orthonormal DFT of ``v``'s matrix view (unshifted, complex; fp64 stays fp64, else complex64)."""
    x = (v if v.dtype == torch.float64 else v.float()).reshape(matrix_shape(v.shape))
    return torch.fft.fftn(x, norm="ortho")


def amplitude(v: Tensor) -> Tensor:
    """``|F(v)|``: the amplitude of every frequency of ``v``'s matrix view (unshifted)."""
    return spectrum(v).abs()


def log_power(v: Tensor, *, max_side: int | None = 256, eps: float = 1e-20) -> Tensor:
    """The display spectrum of Fig. 2a: ``log10 |F(v)|²``, centred (``fftshift``: zero frequency in the
    middle, distance from the centre = frequency). Sides longer than ``max_side`` are average-pooled (of the
    log power) to at most ``max_side`` cells, so a plot of a large matrix stays small; None keeps every bin."""
    return centred_log_power(spectrum(v).abs().square_(), max_side=max_side, eps=eps)


def centred_log_power(power: Tensor, *, max_side: int | None = 256, eps: float = 1e-20) -> Tensor:
    """``log_power`` from an unshifted power spectrum |F|² already computed."""
    out = torch.fft.fftshift(torch.log10(power + eps)).float()
    if max_side is not None and out.dim() == 2 and max(out.shape) > max_side:
        size = (min(out.shape[0], max_side), min(out.shape[1], max_side))
        out = torch.nn.functional.adaptive_avg_pool2d(out[None, None], size)[0, 0]
    return out


def removed_masks(mshape: tuple[int, ...], ratios: Sequence[float], cutoff_mode: str = "fraction") -> list[Tensor]:
    """Per ratio, the coefficients the FR high-pass removes (centred distance < D0) over the full unshifted
    spectrum of ``mshape``: the complement of ``fourier.full_highpass_mask`` (the filter's own definition)."""
    return [~full_highpass_mask(mshape, float(r), cutoff_mode) for r in ratios]


def energy_below(power: Tensor, masks: Sequence[Tensor]) -> list[float]:
    """Σ of ``power`` (|F|²) over each mask (the energy the FR filter removes at that ratio)."""
    return [float(power[m.to(power.device)].sum(dtype=torch.float64)) for m in masks]


class AmplitudeVariance:
    """Per-frequency mean and variance of amplitude across tasks, fed one task at a time (Welford, float64),
    so a key's K task vectors are never held together.

    ``variance()`` is the population variance over the K tasks (divides by K): zero when every task has the
    same amplitude spectrum."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None

    def add(self, amp: Tensor) -> None:
        amp = amp.double()
        self.count += 1
        if self.mean is None:
            self.mean = amp.clone()
            self._m2 = torch.zeros_like(amp)
            return
        if amp.shape != self.mean.shape:
            raise ValueError(f"amplitude spectrum of shape {tuple(amp.shape)} added to a running variance of "
                             f"shape {tuple(self.mean.shape)}")
        delta = amp - self.mean
        self.mean.add_(delta / self.count)
        self._m2.add_(delta * (amp - self.mean))

    def variance(self) -> Tensor:
        if self.mean is None:
            raise ValueError("no amplitude spectrum was added")
        return self._m2 / self.count
