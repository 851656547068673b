"""The fast SVD kernels of ``merging/linalg.py`` against the reference formulas (the full
``torch.linalg.svd`` ones of ``baselines.py`` / ``twin.py``, copied here verbatim and, when importable, the
modules' own functions) and float64 numpy SVDs: tall, wide, square and rank-deficient matrices, the
refined (k ≪ n) eigen path and its fallback, reconstruction at full rank, deterministic signs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freemerge_pl.merging import linalg
from freemerge_pl.merging.linalg import (
    polar_factor,
    top_singular_triplets,
    truncated_svd_factors,
    tsv_merge_matrix,
)

# ---------------------------------------------------------------- references (baselines.py / twin.py as of 7ce34e9)

def ref_polar_factor(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv_merge_matrix(matrices, rank):
    us, ss, vhs = [], [], []
    for m in matrices:
        u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vhs.append(vh[:rank])
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return ref_polar_factor(u_cat) @ torch.diag(s_cat) @ ref_polar_factor(vh_cat)


def ref_truncated_svd_factors(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def np_svd(x):
    return np.linalg.svd(x.double().numpy(), full_matrices=False)


def np_polar(x):
    p, _, qh = np_svd(x)
    return p @ qh


def np_tsv(matrices, rank):
    us, ss, vs = [], [], []
    for m in matrices:
        u, s, vh = np_svd(m)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vs.append(vh[:rank])
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    return np_polar(torch.from_numpy(u)) @ np.diag(s) @ np_polar(torch.from_numpy(v))


def np_truncation(x, rank):
    u, s, vh = np_svd(x)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def close(got, want, atol, rtol=0.0):
    got = got.double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = want.double().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def with_spectrum(m, n, s, seed=0):
    """An fp32 ``[m, n]`` matrix with singular values ``s`` (float64 construction)."""
    g = torch.Generator().manual_seed(seed)
    p = len(s)
    u = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]
    return ((u * torch.as_tensor(s, dtype=torch.float64)) @ v.mT).float()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [(40, 12), (12, 40), (20, 20), (300, 16), (1, 7), (7, 1)]


# ---------------------------------------------------------------- top_singular_triplets

@pytest.mark.parametrize("shape", SHAPES)
def test_triplets_match_numpy_and_torch(shape):
    m, n = shape
    p = min(m, n)
    x = with_spectrum(m, n, np.geomspace(3.0, 0.05, p), seed=m * 100 + n)  # separated singular values
    U, S, Vh = np_svd(x)
    ur, sr, vhr = torch.linalg.svd(x, full_matrices=False)
    for rank in sorted({1, max(1, p // 3), p}):
        u, s, vh = top_singular_triplets(x, rank)
        assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        close(s, S[:rank], atol=1e-6 * S[0])
        close((u * s) @ vh, np_truncation(x, rank), atol=2e-6 * S[0])
        close((u * s) @ vh, (ur[:, :rank] * sr[:rank]) @ vhr[:rank], atol=3e-6 * S[0])
        # factors: numpy's up to the sign of each pair
        sign = np.sign(U[np.abs(U[:, :rank]).argmax(0), np.arange(rank)])
        close(u, U[:, :rank] * sign, atol=2e-6)
        close(vh, Vh[:rank] * sign[:, None], atol=2e-6)
        close(u.mT @ u, np.eye(rank), atol=1e-6)
        close(vh @ vh.mT, np.eye(rank), atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6), (50, 3)])
def test_full_rank_reconstructs(shape):
    x = randn(*shape, seed=sum(shape))
    u, s, vh = top_singular_triplets(x, min(shape))
    close((u * s) @ vh, x, atol=2e-6 * float(x.abs().max()))
    u2, s2, vh2 = top_singular_triplets(x, 10 * max(shape))  # a rank above min(m, n) is clamped, as slicing is
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    us, v = truncated_svd_factors(x, min(shape))
    close(us @ v, x, atol=2e-6 * float(x.abs().max()))


@pytest.mark.parametrize("shape", [(30, 8), (8, 30), (160, 150)])
def test_signs_are_deterministic(shape):
    x = randn(*shape, seed=3)
    rank = min(shape) // 2
    u, s, vh = top_singular_triplets(x, rank)
    top = u.gather(0, u.abs().argmax(0, keepdim=True))[0]
    assert bool((top > 0).all())
    again = top_singular_triplets(x.clone(), rank)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))
    # −x has the same left vectors under this convention, and negated right ones
    un, sn, vhn = top_singular_triplets(-x, rank)
    close(un, u, atol=1e-6)
    close(sn, s, atol=1e-6 * float(s[0]))
    close(vhn, -vh, atol=1e-6)


def test_refined_path_is_used_and_exact(monkeypatch):
    # n = 150 ≥ 128 and k + 16 ≤ n/2: the float32 eigh + float64 Rayleigh–Ritz/Newton path, no fallback
    calls = []
    real = linalg._eigh_desc
    monkeypatch.setattr(linalg, "_eigh_desc", lambda g, k: calls.append(k) or real(g, k))
    for shape, spectrum in [((200, 150), np.geomspace(10.0, 1e-3, 150)), ((150, 400), None)]:
        x = with_spectrum(*shape, spectrum, seed=5) if spectrum is not None else randn(*shape, seed=6)
        _, S, _ = np_svd(x)
        for rank in (1, 12, 40):
            u, s, vh = top_singular_triplets(x, rank)
            close(s, S[:rank], atol=1e-6 * S[0])
            close((u * s) @ vh, np_truncation(x, rank), atol=1e-6 * S[0])
            close(u.mT @ u, np.eye(rank), atol=1e-6)
    assert calls == []


def test_refined_path_falls_back_on_a_flat_spectrum(monkeypatch):
    # σ_1 = … = σ_150: no gap between the Ritz block and the rest → the float64 eigh fallback, still exact
    calls = []
    real = linalg._eigh_desc
    monkeypatch.setattr(linalg, "_eigh_desc", lambda g, k: calls.append(k) or real(g, k))
    x = with_spectrum(200, 150, np.ones(150), seed=7)
    u, s, vh = top_singular_triplets(x, 10)
    assert calls == [10]
    close(s, np.ones(10), atol=1e-6)
    close(u.mT @ u, np.eye(10), atol=1e-6)
    close(x.mT @ u, vh.mT * s, atol=2e-6)  # x v = σ u ⇔ xᵀ u = σ v


def test_rank_deficient_triplets_fall_back_to_the_reference():
    x = with_spectrum(30, 10, [4.0, 2.0], seed=8)  # rank 2, asked for 5
    u, s, vh = top_singular_triplets(x, 5)
    ur, sr, vhr = torch.linalg.svd(x, full_matrices=False)
    close(s, sr[:5], atol=0)
    close((u * s) @ vh, (ur[:, :5] * sr[:5]) @ vhr[:5], atol=0)  # the same LAPACK call, signs aside
    close((u * s) @ vh, x, atol=2e-6)
    close(u.mT @ u, np.eye(5), atol=1e-6)
    zero = top_singular_triplets(torch.zeros(6, 4), 2)
    assert torch.equal(zero[1], torch.zeros(2)) and torch.equal(zero[0].mT @ zero[0], torch.eye(2))


def test_triplets_edge_cases():
    x = randn(5, 3)
    u, s, vh = top_singular_triplets(x, 0)
    assert u.shape == (5, 0) and s.shape == (0,) and vh.shape == (0, 3)
    u, s, vh = top_singular_triplets(torch.zeros(0, 3), 2)
    assert u.shape == (0, 0) and s.shape == (0,) and vh.shape == (0, 3)
    with pytest.raises(ValueError, match="2-D"):
        top_singular_triplets(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="rank"):
        top_singular_triplets(x, -1)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError):  # the reference's own error (torch.linalg.svd on non-finite input)
        top_singular_triplets(bad, 1)


def test_dtypes():
    x = randn(12, 5, seed=9)
    u64, s64, vh64 = top_singular_triplets(x.double(), 3)
    assert u64.dtype == s64.dtype == vh64.dtype == torch.float64
    close((u64 * s64) @ vh64, np_truncation(x, 3), atol=1e-12)
    u16, s16, vh16 = top_singular_triplets(x.bfloat16(), 3)
    assert u16.dtype == torch.float32
    close((u16 * s16) @ vh16, np_truncation(x.bfloat16().float(), 3), atol=1e-5)
    assert polar_factor(x.double()).dtype == torch.float64
    assert tsv_merge_matrix([x.double(), x.double()], 2).dtype == torch.float32  # as the reference (m.float())


def test_chunked_float64_rows(monkeypatch):
    monkeypatch.setattr(linalg, "_CHUNK_ELEMENTS", 37)  # 37 // 6 = 6 rows per chunk
    x = with_spectrum(50, 6, np.geomspace(2.0, 0.1, 6), seed=10)
    u, s, vh = top_singular_triplets(x, 3)
    close((u * s) @ vh, np_truncation(x, 3), atol=1e-6)
    close(polar_factor(x), np_polar(x), atol=1e-6)
    close(polar_factor(x.mT), np_polar(x.mT), atol=1e-6)


# ---------------------------------------------------------------- polar_factor

@pytest.mark.parametrize("shape", SHAPES + [(48, 48)])
def test_polar_factor_matches_reference(shape):
    x = randn(*shape, seed=11 + shape[0])
    got = polar_factor(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    close(got, np_polar(x), atol=5e-7)
    close(got, ref_polar_factor(x), atol=2e-5)  # the fp32 reference carries ~ε₃₂·cond(x) itself
    small = min(shape)
    gram = got.mT @ got if shape[0] >= shape[1] else got @ got.mT
    close(gram, np.eye(small), atol=1e-6)


def test_polar_factor_rank_deficient():
    for x in (with_spectrum(20, 6, [3.0, 1.0, 0.5], seed=12), with_spectrum(6, 20, [3.0, 1.0, 0.5], seed=13)):
        got, ref = polar_factor(x), ref_polar_factor(x)
        close(got, ref, atol=0)  # not unique here: the reference (LAPACK's completion) is kept
        # the unique part: on the range, P Qᵀ acts as the partial isometry, (x xᵀ)^{1/2} = polar · xᵀ
        P, S, _ = np_svd(x)
        close(got @ x.mT, (P * S) @ P.T, atol=2e-6)


# ---------------------------------------------------------------- tsv_merge_matrix, truncated_svd_factors

TSV_CASES = [  # (shape, tasks, rank): tall, wide, square, K·r > min(m, n) (wide U_cat), 2×n embeddings
    ((40, 12), 4, 3), ((12, 40), 4, 3), ((16, 16), 3, 5), ((9, 7), 3, 3), ((2, 30), 8, 1), ((200, 150), 3, 20),
]


@pytest.mark.parametrize("shape,tasks,rank", TSV_CASES)
def test_tsv_merge_matrix_matches_reference(shape, tasks, rank):
    mats = [1e-3 * randn(*shape, seed=20 + k) for k in range(tasks)]
    got = tsv_merge_matrix(mats, rank)
    scale = max(float(m.abs().max()) for m in mats)
    assert got.shape == shape and got.dtype == torch.float32
    close(got, np_tsv(mats, rank), atol=2e-6 * scale)
    close(got, ref_tsv_merge_matrix(mats, rank), atol=2e-5 * scale)


def test_tsv_merge_matrix_with_zero_and_low_rank_tasks():
    # zero and rank-1 task vectors: their triplets take the reference SVD path (same LAPACK call, same
    # completion of the null singular vectors) up to pair signs, to which TSV is invariant
    mats = [1e-3 * randn(10, 8, seed=30), torch.zeros(10, 8),
            1e-3 * torch.outer(randn(10, seed=31), randn(8, seed=32)), 1e-3 * randn(10, 8, seed=33)]
    close(tsv_merge_matrix(mats, 2), ref_tsv_merge_matrix(mats, 2), atol=1e-8)


def test_tsv_merge_matrix_with_duplicate_tasks():
    # identical task vectors: U_cat = [U_1, U_1] has rank r < 2r, its polar factor (so the reference
    # result) depends on LAPACK's arbitrary null-space completion. What is defined agrees: the result
    # seen through task 1's own top-r singular subspaces, U_1 U_1ᵀ · Δ_m · V_1 V_1ᵀ (= its rank-r truncation).
    m = 1e-3 * randn(12, 8, seed=34)
    got, ref = tsv_merge_matrix([m, m], 2), ref_tsv_merge_matrix([m, m], 2)
    U, _, Vh = np_svd(m)
    pu, pv = U[:, :2] @ U[:, :2].T, Vh[:2].T @ Vh[:2]
    close(pu @ got.double().numpy() @ pv, pu @ ref.double().numpy() @ pv, atol=1e-9)
    close(pu @ got.double().numpy() @ pv, np_truncation(m, 2), atol=1e-9)


@pytest.mark.parametrize("shape,rank", [((30, 10), 3), ((10, 30), 3), ((12, 12), 12), ((200, 150), 15)])
def test_truncated_svd_factors_match_reference(shape, rank):
    x = 1e-3 * randn(*shape, seed=40 + rank)
    us, vh = truncated_svd_factors(x, rank)
    rus, rvh = ref_truncated_svd_factors(x, rank)
    assert us.shape == rus.shape and vh.shape == rvh.shape
    assert us.is_contiguous() and vh.is_contiguous()
    close(us @ vh, np_truncation(x, rank), atol=2e-9)
    close(us @ vh, rus @ rvh, atol=2e-8)


def test_current_module_functions_agree():
    """The functions of baselines.py / twin.py, where they still exist under these names."""
    baselines = pytest.importorskip("freemerge_pl.merging.baselines")
    twin = pytest.importorskip("freemerge_pl.merging.twin")
    spectrum = 1e-3 * np.geomspace(4.0, 0.1, 10)  # separated singular values: the fp32 reference is accurate
    x = with_spectrum(24, 10, spectrum, seed=50)
    mats = [with_spectrum(24, 10, spectrum, seed=51 + k) for k in range(3)]
    checked = 0
    if hasattr(baselines, "polar_factor"):
        close(polar_factor(x), baselines.polar_factor(x), atol=2e-6)
        checked += 1
    if hasattr(baselines, "tsv_merge_matrix"):
        close(tsv_merge_matrix(mats, 3), baselines.tsv_merge_matrix(mats, 3), atol=2e-8)
        checked += 1
    if hasattr(twin, "truncated_svd_factors"):
        us, vh = twin.truncated_svd_factors(x, 4)
        new_us, new_vh = truncated_svd_factors(x, 4)
        close(new_us @ new_vh, us @ vh, atol=2e-9)
        checked += 1
    if checked == 0:
        pytest.skip("baselines.py / twin.py no longer define these functions")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = with_spectrum(300, 150, np.geomspace(5.0, 1e-2, 150), seed=60)
    for fn in (lambda t: top_singular_triplets(t, 20), lambda t: truncated_svd_factors(t, 20),
               polar_factor, lambda t: tsv_merge_matrix([t, 2 * t.flip(0)], 30)):
        got, want = fn(x.cuda()), fn(x)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, b in zip(got, want):
            assert a.device.type == "cuda"
            close(a.cpu(), b, atol=1e-5 * float(b.abs().max()))
