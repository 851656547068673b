"""The FR high-pass G (fourier.py) against a brute-force numpy reference written from DESIGN §3/§8.

FILTER-DEF as refined for the issue's "a constant task vector is removed entirely by any positive
cutoff": k = ⌈r·N⌉, D0 = the (k+1)-th smallest centred distance (+inf when k ≥ N), zero distance < D0.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging.fourier import Spectrum, full_highpass_mask, highpass, highpass_mask, matrix_shape

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
    k = reference_k(ratio, dist.size)
    return dist[k] if k < dist.size else np.inf  # sorted index k (0-based) = the (k+1)-th smallest


def reference_k(ratio: float, n: int) -> int:
    """The exact ⌈r·N⌉ for the decimal r (no float rounding)."""
    return math.ceil(Fraction(str(ratio)) * n)


def removed_count(v: torch.Tensor, ratio: float, **kwargs) -> int:
    """How many spectrum coefficients of a random float64 ``v`` the filter's output has at (numerical) zero."""
    spec = np.fft.fftn(highpass(v, ratio, **kwargs).numpy().reshape(matrix_shape(v.shape)))
    scale = np.abs(np.fft.fftn(v.numpy().reshape(matrix_shape(v.shape)))).max()
    return int((np.abs(spec) < 1e-9 * scale).sum())


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


@pytest.mark.parametrize("shape", [(6, 8), (7, 5), (4, 3, 3), (9,), (1, 1), (1,), (2,)])
def test_constant_task_vector_removed_by_any_positive_cutoff(shape):
    n = math.prod(shape)
    v = torch.full(shape, 0.37)
    # D0 is the (k+1)-th smallest distance and the DC (distance 0) is the unique smallest, so it goes for
    # every k = ⌈r·N⌉ ≥ 1, i.e. every r > 0 — including r ≤ 1/N (k = 1), where the DC is all that goes.
    for ratio in [1e-6, 0.5 / n, 1 / n, 1.01 / n, 0.15, 0.3, 0.7, 0.99]:
        if ratio >= 1:
            continue
        out = highpass(v, ratio, filter_1d=True)
        assert out.abs().max() < 1e-6, ratio
        assert not bool(full_highpass_mask(matrix_shape(shape), ratio).flatten()[0])  # DC is unkept
    # radius mode: D0 = r × the largest distance > 0 = the DC's distance, once N > 1 (for N = 1 the largest
    # distance is 0, so D0 = 0 and radius mode keeps the lone coefficient; fraction mode removes it)
    for ratio in [0.01, 0.3, 0.9] if n > 1 else []:
        assert highpass(v, ratio, cutoff_mode="radius", filter_1d=True).abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (6, 9), (16, 12), (1, 7), (10, 10)])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.55, 0.75])
def test_removed_share_is_about_r(shape, ratio):
    """The coefficients removed are those with distance < D0: k = ⌈r·N⌉ minus the ranks ≤ k tied at D0."""
    n = math.prod(shape)
    k = reference_k(ratio, n)
    ordered = np.sort(centred_distances(shape).ravel())
    d0 = reference_cutoff(shape, ratio)
    ties_in_first_k = int((ordered[:k] == d0).sum())  # 0 unless the k-th and (k+1)-th smallest tie
    expected_removed = k - ties_in_first_k
    assert expected_removed == int((centred_distances(shape) < d0).sum())
    # measured on the filter's output: coefficients of a random matrix that became zero
    v = torch.randn(shape, dtype=torch.float64)
    removed = removed_count(v, ratio)
    assert removed == expected_removed
    assert abs(removed / n - ratio) <= (int((ordered == d0).sum()) + 1) / n
    mask = full_highpass_mask(shape, ratio)
    assert int((~mask).sum()) == expected_removed


def test_exactly_k_removed_without_a_boundary_tie_and_at_most_k_with_one():
    """#removed == k = ⌈r·N⌉ when the k-th and (k+1)-th smallest distances differ, ≤ k otherwise."""
    seen = {"tie": 0, "no_tie": 0}
    gen = torch.Generator().manual_seed(0)
    for shape in [(8, 8), (7, 5), (6, 9), (3, 3), (1, 7), (11,), (12,), (4, 3, 5)]:
        mshape = matrix_shape(shape)
        n = math.prod(mshape)
        ordered = np.sort(centred_distances(mshape).ravel())
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        for ratio in [1e-3, 0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 0.97]:
            k = reference_k(ratio, n)
            removed = removed_count(v, ratio, filter_1d=True)
            if k >= n or ordered[k - 1] < ordered[k]:
                assert removed == min(k, n), (shape, ratio)
                seen["no_tie"] += 1
            else:
                assert removed < k, (shape, ratio)  # the tied k-th smallest is kept with its partner
                seen["tie"] += 1
    assert seen["tie"] > 0 and seen["no_tie"] > 0


def test_worked_counts_one_dimensional():
    """1-D, N = 11: sorted centred distances 0,1,1,2,2,3,3,4,4,5,5 (conjugate pairs tie); 0-based index k
    of that list is the (k+1)-th smallest, i.e. D0."""
    v = torch.randn(11, dtype=torch.float64)
    # r = 1/11 → k = 1, D0 = sorted[1] = 1: removed {0} = 1 = k (the DC alone; r ≤ 1/N still removes it)
    assert removed_count(v, 1 / 11, filter_1d=True) == 1
    # r = 2/11 → k = 2, D0 = sorted[2] = 1: removed {0} = 1 < k (the 2nd smallest, 1, ties with the 3rd)
    assert removed_count(v, 2 / 11, filter_1d=True) == 1
    # r = 5/11 → k = 5, D0 = sorted[5] = 3: removed {0,1,1,2,2} = 5 = k (sorted[4] = 2 < 3, no tie)
    assert removed_count(v, 5 / 11, filter_1d=True) == 5
    # r = 6/11 → k = 6, D0 = sorted[6] = 3: removed {0,1,1,2,2} = 5 < k (the 6th smallest, 3, ties with the 7th)
    assert removed_count(v, 6 / 11, filter_1d=True) == 5
    # r = 0.9 → k = ⌈9.9⌉ = 10, D0 = sorted[10] = 5: removed all but the two 5's = 9 < k (tie at 5)
    assert removed_count(v, 0.9, filter_1d=True) == 9
    # r = 0.95 → k = ⌈10.45⌉ = 11 = N, D0 = +inf: everything removed, the output is zero
    assert removed_count(v, 0.95, filter_1d=True) == 11
    assert highpass(v, 0.95, filter_1d=True).abs().max() < 1e-12


def test_worked_counts_three_by_three():
    """3×3: centred distances 0 (centre), 1 (×4 edges), √2 (×4 corners)."""
    v = torch.randn(3, 3, dtype=torch.float64)
    # r = 0.1 → k = ⌈0.9⌉ = 1, D0 = sorted[1] = 1: removed the DC only
    assert removed_count(v, 0.1) == 1
    # r = 0.3 → k = ⌈2.7⌉ = 3, D0 = sorted[3] = 1: removed the DC only = 1 < k (ranks 2..5 tie at 1)
    assert removed_count(v, 0.3) == 1
    # r = 0.5 → k = ⌈4.5⌉ = 5, D0 = sorted[5] = √2: removed DC + 4 edges = 5 = k
    assert removed_count(v, 0.5) == 5
    # r = 0.9 → k = ⌈8.1⌉ = 9 = N, D0 = +inf: all 9 removed
    assert removed_count(v, 0.9) == 9


@pytest.mark.parametrize("shape", [(8, 8), (7, 5), (4, 3, 5), (11,), (1, 1)])
@pytest.mark.parametrize("mode", ["fraction", "radius"])
def test_spectrum_highpass_is_bit_identical_to_highpass(shape, mode):
    v = torch.randn(shape)
    n = math.prod(shape)
    spectrum = Spectrum(v, cutoff_mode=mode, filter_1d=True)
    for ratio in [0.0, 0.5 / n, 1 / n, 0.1, 0.3, 0.55, 0.99]:
        if ratio >= 1:
            continue
        assert torch.equal(spectrum.highpass(ratio), highpass(v, ratio, cutoff_mode=mode, filter_1d=True))


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
    """1-D N = 100, sorted distances 0, 1,1, 2,2, ..., 49,49, 50: sorted[2j−1] = sorted[2j] = j.

    r = 0.56: r·N is 56.00000000000001 in floats, but k = ⌈r·N⌉ = 56, so D0 = sorted[56] = 28 and the
    removed distances are 0, ±1, ..., ±27 = 55 (the 56th smallest, 28, ties with the 57th and is kept);
    a float ceiling k = 57 would give D0 = sorted[57] = 29 and remove 57.
    r = 0.55: r·N is 55.00000000000001, k = 55, D0 = sorted[55] = 28: removed 55 = k (no tie).
    """
    v = torch.randn(100, dtype=torch.float64)
    assert removed_count(v, 0.56, filter_1d=True) == 55
    assert removed_count(v, 0.55, filter_1d=True) == 55
    assert_rel(highpass(v, 0.56, filter_1d=True), reference_tensor_highpass(v, 0.56))
