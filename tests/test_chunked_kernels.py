"""The memory-bounded paths of the streaming kernels (chunked threshold and cut, block-wise widening,
integer cutoff search, in-place band high-pass) against naive full-tensor references. Chunk sizes are
patched small so that tiny tensors take the paths that large ones take."""

from __future__ import annotations

import math

import pytest
import torch

from freemerge_pl.merging import engine, fourier, topk
from freemerge_pl.merging.fourier import Spectrum, cutoff_radius


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(topk, "_CHUNK", 64)
    monkeypatch.setattr(topk, "_RADIX_MIN", 64)
    monkeypatch.setattr(engine, "_BLOCK", 50)
    monkeypatch.setattr(fourier, "_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(fourier, "_TRANSPOSE_ROWS", 7)


def naive_selection(mags: torch.Tensor, count: int) -> torch.Tensor:
    """The top ``count`` entries by magnitude, ties broken by the lower index (a stable sort)."""
    order = sorted(range(mags.numel()), key=lambda i: (-float(mags[i]), i))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def select(values, count):
    """The expert cut ``(t, ties)`` of a whole tensor of magnitudes (``topk_cut`` over its chunks)."""
    found = topk.topk_cut(lambda: topk.flat_chunks(values), values.numel(), count, absolute=False)
    return found.threshold, found.ties


def cut(v, threshold, ties, absolute=False):
    """The flat indices ``selection_entries`` keeps for that cut, chunk by chunk."""
    return topk.selection_entries(topk.flat_chunks(v), threshold, ties, absolute=absolute)[0]


@pytest.mark.parametrize("count", [1, 7, 100, 333, 999, 1000])
def test_radix_threshold_and_cut_match_a_sort(small_chunks, count):
    g = torch.Generator().manual_seed(count)
    v = torch.randn(1000, generator=g)
    v[::17] = 0.5  # many ties, some at the cut
    v[5::13] = -0.5
    v[3] = -0.0
    mags = v.abs()
    t, ties = select(mags, count)
    t_ref = float(mags.kthvalue(mags.numel() - count + 1).values)
    assert t == t_ref
    assert ties == count - int((mags > t_ref).sum())
    got = cut(v, t, ties, absolute=True)
    assert torch.equal(got, naive_selection(mags, count))
    assert torch.equal(cut(mags, t, ties), got)  # absolute=False on |v| alike


def test_radix_leaves_non_finite_to_kthvalue(small_chunks):
    mags = torch.rand(500)
    mags[10] = math.inf
    assert topk._high_histogram(mags, finite=False) is None
    t, ties = select(mags, 3)
    assert t == float(mags.kthvalue(498).values) and ties == 3 - int((mags > t).sum())


def test_model_scope_cut_keeps_every_tie(small_chunks):
    v = torch.tensor([0.1, -0.3, 0.3, 0.2, -0.3, 0.05] * 30)
    got = cut(v, 0.3, -1, absolute=True)
    assert torch.equal(got, torch.nonzero(v.abs() >= 0.3).flatten())


@pytest.mark.parametrize("pre_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_blockwise_widening_equals_fp32_arithmetic(small_chunks, pre_dtype):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(37, 11, generator=g).to(pre_dtype)
    theta = torch.randn(37, 11, generator=g).to(pre_dtype)
    d = engine.blockwise_(theta.to(torch.float32, copy=True), pre, torch.Tensor.sub_)
    assert torch.equal(d, theta.double().sub(pre.double()).float())  # fp32(a) − fp32(b), one rounding
    out = engine.add_pretrained_(d.clone(), pre)
    assert torch.equal(out, (d.double() + pre.double()).float())


def grid_cutoff(mshape, ratio):
    """D0 from the full grid of centred distances: the (k+1)-th smallest, k = ⌈r·N⌉ (DESIGN §3)."""
    a = torch.fft.fftfreq(mshape[0], d=1.0 / mshape[0], dtype=torch.float64)
    b = torch.fft.fftfreq(mshape[1], d=1.0 / mshape[1], dtype=torch.float64)
    dist = torch.sqrt(a[:, None] ** 2 + b[None, :] ** 2).flatten()
    k = max(1, math.ceil(ratio * dist.numel() - 1e-9))
    return math.inf if k >= dist.numel() else float(dist.sort().values[k])


@pytest.mark.parametrize("mshape", [(1, 1), (1, 7), (5, 3), (8, 8), (17, 64), (64, 5), (33, 32)])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 0.55, 0.9, 0.999])
def test_integer_cutoff_search_equals_the_distance_grid(mshape, ratio):
    fourier._cutoff_radius.cache_clear()
    assert cutoff_radius(mshape, ratio) == grid_cutoff(mshape, ratio)


def fft2_highpass(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """Eq. 1-2 by the full 2-D FFT: zero the centred spectrum within D0, inverse (float64)."""
    x = v.double().reshape(v.shape[0], -1)
    d0 = grid_cutoff(tuple(x.shape), ratio)
    a = torch.fft.fftfreq(x.shape[0], d=1.0 / x.shape[0], dtype=torch.float64)
    b = torch.fft.fftfreq(x.shape[1], d=1.0 / x.shape[1], dtype=torch.float64)
    keep = torch.sqrt(a[:, None] ** 2 + b[None, :] ** 2) >= d0
    return torch.fft.ifft2(torch.fft.fft2(x) * keep).real.reshape(v.shape)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (13, 20), (20, 13), (9, 4, 5), (31, 31)])
@pytest.mark.parametrize("ratio", [0.1, 0.6])
def test_in_place_band_highpass_equals_the_full_fft(small_chunks, shape, ratio):
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    want = fft2_highpass(v, ratio)
    work = v.clone()
    got = Spectrum(work, keep=False, overwrite=True).highpass(ratio)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    plain = Spectrum(v.clone()).highpass(ratio)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
    assert got.data_ptr() == work.data_ptr() or len(shape) != 2  # 2-D float32: computed in v's storage


def test_cut_inside_a_group_of_ties_keeps_the_first_by_index(small_chunks):
    """The threshold falls inside a group of equal magnitudes spread over several chunks: only the first
    ``ties`` of them by index are kept (the budget carries across chunks)."""
    v = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    v[::17] = 0.5
    v[5::13] = -0.5
    mags = v.abs()
    count = int((mags > 0.5).sum()) + 5  # 5 of the ~136 entries equal to 0.5, the first 5 by index
    t, ties = select(mags, count)
    assert (t, ties) == (0.5, 5)
    got = cut(v, t, ties, absolute=True)
    assert torch.equal(got, naive_selection(mags, count))
