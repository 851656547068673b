"""The FR high-pass G (fourier.py) against a brute-force numpy reference written from DESIGN §3/§8."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.fourier import full_highpass_mask, highpass, highpass_mask, matrix_shape

SHAPES = [(8, 8), (7, 5), (6, 9), (12, 10), (1, 7), (5, 1), (4, 3, 5), (6, 3, 2, 2)]
RATIOS = [0.1, 0.3, 0.55, 0.9]


def centred_distances(shape: tuple[int, ...]) -> np.ndarray:
    """sqrt(η² + γ²) of every coefficient of the fftshifted spectrum, index by index."""
    grids = np.indices(shape)
    return np.sqrt(sum((g - n // 2) ** 2 for g, n in zip(grids, shape)).astype(np.float64))


def reference_cutoff(shape: tuple[int, ...], ratio: float, mode: str = "fraction") -> float:
    dist = np.sort(centred_distances(shape).ravel())
    if mode == "radius":
        return ratio * dist.max()
    k = math.ceil(Fraction(str(ratio)) * dist.size)  # exact ⌈r·N⌉ for the decimal r
    return dist[k - 1]


def reference_highpass(x: np.ndarray, ratio: float, mode: str = "fraction") -> np.ndarray:
    """fftn → fftshift → zero distance < D0 → ifftshift → ifftn → real, all in float64."""
    if ratio == 0:
        return x.copy()
    spec = np.fft.fftshift(np.fft.fftn(x))
    spec[centred_distances(x.shape) < reference_cutoff(x.shape, ratio, mode)] = 0
    return np.real(np.fft.ifftn(np.fft.ifftshift(spec)))


def reference_tensor_highpass(v: torch.Tensor, ratio: float, mode: str = "fraction") -> torch.Tensor:
    """The reference on a ≥2-D tensor viewed as (shape[0], rest), or on a 1-D tensor."""
    x = v.double().numpy().reshape(matrix_shape(v.shape))
    return torch.from_numpy(reference_highpass(x, ratio, mode)).reshape(v.shape)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Agreement to ``tol`` relative to the largest reference entry."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", ["fraction", "radius"])
def test_highpass_matches_bruteforce_reference(shape, ratio, mode):
    v = torch.randn(shape)
    out = highpass(v, ratio, cutoff_mode=mode)
    assert out.shape == v.shape and out.dtype == torch.float32
    assert_rel(out, reference_tensor_highpass(v, ratio, mode))


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (6, 9), (5, 3, 2)])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_energy_zero_inside_cutoff_and_spectrum_unchanged_outside(shape, ratio):
    v = torch.randn(shape)
    mshape = matrix_shape(shape)
    out = highpass(v, ratio).double().numpy().reshape(mshape)
    spec_in = np.fft.fftshift(np.fft.fft2(v.double().numpy().reshape(mshape)))
    spec_out = np.fft.fftshift(np.fft.fft2(out))
    inside = centred_distances(mshape) < reference_cutoff(mshape, ratio)
    scale = np.abs(spec_in).max()
    assert inside.any() and (~inside).any()
    assert np.abs(spec_out[inside]).max() <= 1e-5 * scale
    np.testing.assert_allclose(spec_out[~inside], spec_in[~inside], rtol=0, atol=1e-5 * scale)
    # energy (Parseval): what is left is exactly the energy outside the cutoff
    energy_out = (np.abs(spec_in[~inside]) ** 2).sum() / spec_in.size
    assert (out**2).sum() == pytest.approx(energy_out, rel=1e-5)


@pytest.mark.parametrize("shape", [(6, 8), (7, 5), (4, 3, 3), (9,)])
def test_constant_task_vector_removed_by_any_positive_cutoff(shape):
    n = math.prod(shape)
    v = torch.full(shape, 0.37)
    # FILTER-DEF keeps ties at D0, so the DC (distance 0) goes once k = ⌈r·N⌉ ≥ 2, i.e. r > 1/N.
    for ratio in [1.01 / n, 0.15, 0.3, 0.7, 0.99]:
        out = highpass(v, ratio, filter_1d=True)
        assert out.abs().max() < 1e-6, ratio
    for ratio in [0.01, 0.3, 0.9]:
        assert highpass(v, ratio, cutoff_mode="radius", filter_1d=True).abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (6, 9), (16, 12), (1, 7), (10, 10)])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.55, 0.75])
def test_removed_share_is_about_r(shape, ratio):
    """The coefficients removed are those with distance < D0: ⌈r·N⌉ minus the ranks ≤ k tied at D0."""
    n = math.prod(shape)
    k = math.ceil(Fraction(str(ratio)) * n)
    dist = centred_distances(shape)
    d0 = reference_cutoff(shape, ratio)
    expected_removed = int((dist < d0).sum())
    ties_in_first_k = k - expected_removed
    assert 1 <= ties_in_first_k <= int((dist == d0).sum())
    # measured on the filter's output: coefficients of a random matrix that became zero
    v = torch.randn(shape, dtype=torch.float64)
    spec = np.fft.fft2(highpass(v, ratio).numpy())
    removed = int((np.abs(spec) < 1e-9 * np.abs(spec).max()).sum())
    assert removed == expected_removed
    assert abs(removed / n - ratio) <= (int((dist == d0).sum()) + 1) / n
    mask = full_highpass_mask(shape, ratio)
    assert int((~mask).sum()) == expected_removed


def test_worked_counts_one_dimensional():
    """1-D, N = 11: centred distances 0,1,1,2,2,3,3,4,4,5,5 (conjugate pairs tie)."""
    v = torch.randn(11, dtype=torch.float64)
    # N = 11, r = 5/11 → k = 5, D0 = 2 (5th smallest of 0,1,1,2,2,3,...): removed {0,1,1} = 3 = k − 2 ties
    spec = np.fft.fft(highpass(v, 5 / 11, filter_1d=True).numpy())
    assert int((np.abs(spec) < 1e-9).sum()) == 3
    # r = 6/11 → k = 6, D0 = 3: removed {0,1,1,2,2} = 5 (the 6th, at distance 3, ties with the 7th and is kept)
    spec = np.fft.fft(highpass(v, 6 / 11, filter_1d=True).numpy())
    assert int((np.abs(spec) < 1e-9).sum()) == 5


def test_half_mask_is_the_rfft_half_of_the_full_mask():
    for shape in [(8, 8), (7, 5), (6, 9), (1, 4), (13,), (10,)]:
        for ratio in [0.1, 0.45, 0.8]:
            full = full_highpass_mask(shape, ratio)
            half = highpass_mask(shape, ratio)
            assert torch.equal(half, full[..., : shape[-1] // 2 + 1])
            # conjugate symmetry: the mask at −f equals the mask at f
            flipped = torch.roll(torch.flip(full, dims=tuple(range(full.dim()))), shifts=(1,) * full.dim(),
                                 dims=tuple(range(full.dim())))
            assert torch.equal(full, flipped)


def test_mask_is_cached_per_shape():
    a = highpass_mask((12, 10), 0.3)
    b = highpass_mask((12, 10), 0.3)
    assert a is b


def test_zero_ratio_is_identity():
    v = torch.randn(5, 6)
    assert torch.equal(highpass(v, 0.0), v)
    assert torch.equal(highpass(v, 0.0, cutoff_mode="radius"), v)


def test_linearity():
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 7, dtype=torch.float64)
    lhs = highpass(0.3 * x - 2.0 * y, 0.4)
    rhs = 0.3 * highpass(x, 0.4) - 2.0 * highpass(y, 0.4)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # G is a projection: applying it twice changes nothing
    torch.testing.assert_close(highpass(highpass(x, 0.4), 0.4), highpass(x, 0.4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [10, 11, 1])
def test_one_dimensional_tensors(n):
    v = torch.randn(n)
    assert torch.equal(highpass(v, 0.3), v)  # filter_1d defaults to False
    for ratio in [0.3, 0.6]:
        for mode in ["fraction", "radius"]:
            out = highpass(v, ratio, cutoff_mode=mode, filter_1d=True)
            assert_rel(out, reference_tensor_highpass(v, ratio, mode))


def test_dtypes():
    v = torch.randn(6, 10, dtype=torch.float64)
    out = highpass(v, 0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_tensor_highpass(v, 0.3), rtol=1e-12, atol=1e-12)
    low = v.to(torch.bfloat16)
    out = highpass(low, 0.3)
    assert out.dtype == torch.float32  # computed in fp32 whatever the storage dtype
    assert_rel(out, reference_tensor_highpass(low.float(), 0.3))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_filter_ratio_out_of_range(ratio):
    with pytest.raises(HyperparameterError, match="filter_ratio"):
        highpass(torch.randn(4, 4), ratio)


def test_unknown_cutoff_mode():
    with pytest.raises(HyperparameterError, match="cutoff_mode='diameter'"):
        highpass(torch.randn(4, 4), 0.3, cutoff_mode="diameter")


def test_k_is_the_exact_ceiling_of_r_times_n():
    """r = 0.55, N = 100: r·N is 55.00000000000001 in floats, but k = ⌈r·N⌉ = 55, so D0 = 27 (not 28)."""
    v = torch.randn(100, dtype=torch.float64)
    spec = np.fft.fft(highpass(v, 0.55, filter_1d=True).numpy())
    assert int((np.abs(spec) < 1e-9).sum()) == 53  # distances 0, ±1, ..., ±26
    assert_rel(highpass(v, 0.55, filter_1d=True), reference_tensor_highpass(v, 0.55))
