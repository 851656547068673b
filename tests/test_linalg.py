"""The fast SVD kernels of ``merging/linalg.py`` against the reference formulas (the full ``torch.linalg.svd``
ones of ``baselines.py`` / ``twin.py``, copied here verbatim) and float64 numpy SVDs: tall, wide, square and
rank-deficient matrices, the refined (k ≪ n) eigen path and its fallback, reconstruction at full rank,
deterministic signs."""

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


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """numpy's OpenBLAS on one thread too (conftest does it for torch): its threaded SVD of these small
    matrices costs ~0.1 s a call on a shared 2-core machine instead of ~0.5 ms."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


# ------------------------------------------------- references (baselines.py / twin.py as of 7ce34e9)

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


def close_to_truth(got, ref, truth, atol):
    """``got`` within ``atol`` of the float64 ``truth``, or no farther than twice the fp32 reference
    ``ref`` is (on the ``auto`` path small matrices use the reference SVD itself, with its own
    ~ε₃₂·σ₁/gap error)."""
    truth = truth.double().numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    err = float(np.abs(got.double().numpy() - truth).max())
    ref_err = float(np.abs(ref.double().numpy() - truth).max())
    assert err <= max(atol, 2 * ref_err), (err, ref_err, atol)


SHAPES = [(40, 12), (12, 40), (20, 20), (300, 16), (1, 7), (7, 1), (60, 50), (44, 90)]


@pytest.fixture(params=["auto", "gram"])
def path(request, monkeypatch):
    """``auto``: the module's size rules (small, and for polar factors near-square, matrices go straight to
    torch.linalg.svd); ``gram``: the float64 Gram path forced at every size and shape, with ``_top_eigh``'s
    float32-eigh + float64 refinement wherever k + 16 ≤ n/2 (by default only from n = 128)."""
    if request.param == "gram":
        monkeypatch.setattr(linalg, "_SMALL_FLOPS", 0)
        monkeypatch.setattr(linalg, "_REFINE_MIN_N", 0)
        monkeypatch.setattr(linalg, "_POLAR_MIN_ASPECT", 0.0)
    return request.param


@pytest.fixture
def full_eigh_calls(monkeypatch):
    """The ranks ``_top_eigh`` passed to its float64-eigh fallback."""
    calls = []
    real = linalg._eigh_desc
    monkeypatch.setattr(linalg, "_eigh_desc", lambda g, k: calls.append(k) or real(g, k))
    return calls


# ---------------------------------------------------------------- top_singular_triplets

@pytest.mark.parametrize("shape", SHAPES)
def test_triplets_match_numpy_and_torch(shape, path):
    m, n = shape
    p = min(m, n)
    x = with_spectrum(m, n, np.geomspace(3.0, 0.05, p), seed=m * 100 + n)  # separated singular values
    U, S, Vh = np_svd(x)
    ur, sr, vhr = torch.linalg.svd(x, full_matrices=False)
    for rank in sorted({1, min(4, p), max(1, p // 3), p}):
        u, s, vh = top_singular_triplets(x, rank)
        assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        ref = (ur[:, :rank] * sr[:rank]) @ vhr[:rank]
        close_to_truth(s, sr[:rank], S[:rank], atol=1e-7 * S[0])
        close_to_truth((u * s) @ vh, ref, np_truncation(x, rank), atol=1e-7 * S[0])
        close((u * s) @ vh, ref, atol=2e-6 * S[0])
        # factors: numpy's up to the sign of each pair, which follows the largest-|u| convention here
        sign = np.sign(U[np.abs(U[:, :rank]).argmax(0), np.arange(rank)])
        ref_sign = np.sign(np.einsum("ij,ij->j", ur[:, :rank].double().numpy(), U[:, :rank]))
        ref_sign = torch.from_numpy(ref_sign)
        close_to_truth(u, ur[:, :rank] * ref_sign, U[:, :rank] * sign, atol=2e-7)
        close_to_truth(vh, vhr[:rank] * ref_sign[:, None], Vh[:rank] * sign[:, None], atol=2e-7)
        close(u.mT @ u, np.eye(rank), atol=3e-6)  # the fp32 reference's own level (``auto``, small sizes)
        close(vh @ vh.mT, np.eye(rank), atol=3e-6)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6), (50, 3), (60, 50)])
def test_full_rank_reconstructs(shape, path):
    x = randn(*shape, seed=sum(shape))
    u, s, vh = top_singular_triplets(x, min(shape))
    close((u * s) @ vh, x, atol=2e-6 * float(x.abs().max()))
    u2, s2, vh2 = top_singular_triplets(x, 10 * max(shape))  # rank > min(m, n) is clamped, as slicing is
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    us, v = truncated_svd_factors(x, min(shape))
    close(us @ v, x, atol=2e-6 * float(x.abs().max()))


@pytest.mark.parametrize("shape", [(30, 8), (8, 30), (60, 50), (50, 60)])
def test_signs_are_deterministic(shape, path):
    x = randn(*shape, seed=3)
    rank = 4
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


def test_refined_path_is_used_and_exact(monkeypatch, full_eigh_calls):
    # k + 16 ≤ n/2: the float32 eigh + float64 Rayleigh–Ritz/Newton path, without its fallback
    monkeypatch.setattr(linalg, "_SMALL_FLOPS", 0)
    monkeypatch.setattr(linalg, "_REFINE_MIN_N", 0)
    for x, ranks in [(with_spectrum(70, 60, np.geomspace(10.0, 1e-3, 60), seed=5), (1, 7, 14)),
                     (randn(50, 120, seed=6), (1, 5, 9))]:
        _, S, _ = np_svd(x)
        for rank in ranks:
            u, s, vh = top_singular_triplets(x, rank)
            close(s, S[:rank], atol=1e-7 * S[0])
            close((u * s) @ vh, np_truncation(x, rank), atol=1e-7 * S[0])
            close(u.mT @ u, np.eye(rank), atol=1e-6)
    assert full_eigh_calls == []


def test_refined_path_at_default_sizes(full_eigh_calls):
    # the module's own thresholds (n ≥ 128); a float64 torch SVD as the truth (numpy's is slow at this size)
    x = with_spectrum(150, 130, np.geomspace(5.0, 1e-2, 130), seed=14)
    u, s, vh = top_singular_triplets(x, 13)
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    close(s, S[:13], atol=1e-7 * float(S[0]))
    close((u * s) @ vh, (U[:, :13] * S[:13]) @ Vh[:13], atol=1e-7 * float(S[0]))
    assert full_eigh_calls == []


def test_refined_path_falls_back_on_a_flat_spectrum(monkeypatch, full_eigh_calls):
    # σ_1 = … = σ_60: no gap between the Ritz block and the rest → the float64 eigh fallback, still exact
    monkeypatch.setattr(linalg, "_SMALL_FLOPS", 0)
    monkeypatch.setattr(linalg, "_REFINE_MIN_N", 0)
    x = with_spectrum(80, 60, np.ones(60), seed=7)
    u, s, vh = top_singular_triplets(x, 5)
    assert full_eigh_calls == [5]
    close(s, np.ones(5), atol=1e-6)
    close(u.mT @ u, np.eye(5), atol=1e-6)
    close(x.mT @ u, vh.mT * s, atol=2e-6)  # x v = σ u ⇔ xᵀ u = σ v


def test_rank_deficient_triplets_fall_back_to_the_reference(path):
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


def test_dtypes(path):
    x = randn(12, 5, seed=9)
    u64, s64, vh64 = top_singular_triplets(x.double(), 3)
    assert u64.dtype == s64.dtype == vh64.dtype == torch.float64
    close((u64 * s64) @ vh64, np_truncation(x, 3), atol=1e-12)
    u16, s16, vh16 = top_singular_triplets(x.bfloat16(), 3)
    assert u16.dtype == torch.float32
    close((u16 * s16) @ vh16, np_truncation(x.bfloat16().float(), 3), atol=1e-5)
    assert polar_factor(x.double()).dtype == torch.float64
    assert tsv_merge_matrix([x.double(), x.double()], 2).dtype == torch.float32  # as the reference: m.float()


def test_chunked_float64_rows(monkeypatch):
    monkeypatch.setattr(linalg, "_SMALL_FLOPS", 0)
    monkeypatch.setattr(linalg, "_POLAR_MIN_ASPECT", 0.0)
    monkeypatch.setattr(linalg, "_CHUNK_ELEMENTS", 37)  # 37 // 6 = 6 rows per chunk
    x = with_spectrum(50, 6, np.geomspace(2.0, 0.1, 6), seed=10)
    u, s, vh = top_singular_triplets(x, 3)
    close((u * s) @ vh, np_truncation(x, 3), atol=1e-7)
    close(polar_factor(x), np_polar(x), atol=1e-7)
    close(polar_factor(x.mT), np_polar(x.mT), atol=1e-7)


# ---------------------------------------------------------------- polar_factor

@pytest.mark.parametrize("shape", SHAPES + [(48, 48), (200, 40)])
def test_polar_factor_matches_reference(shape, path):
    p = min(shape)
    x = with_spectrum(*shape, np.geomspace(2.0, 0.2, p), seed=11 + shape[0])  # cond 10
    got = polar_factor(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    close(got, np_polar(x), atol=1e-6)
    close(got, ref_polar_factor(x), atol=2e-6)
    gram = got.mT @ got if shape[0] >= shape[1] else got @ got.mT
    close(gram, np.eye(p), atol=3e-6)
    x = randn(*shape, seed=12 + shape[0])  # Gaussian: cond ~ 10–10³
    close_to_truth(polar_factor(x), ref_polar_factor(x), np_polar(x), atol=1e-7)


def test_polar_factor_rank_deficient(path):
    for x in (with_spectrum(20, 6, [3.0, 1.0, 0.5], seed=12), with_spectrum(6, 20, [3.0, 1.0, 0.5], seed=13)):
        got, ref = polar_factor(x), ref_polar_factor(x)
        close(got, ref, atol=0)  # not unique here: the reference (LAPACK's completion) is kept
        # the unique part: on the range, P Qᵀ acts as the partial isometry, (x xᵀ)^{1/2} = polar · xᵀ
        P, S, _ = np_svd(x)
        close(got @ x.mT, (P * S) @ P.T, atol=2e-6)


# ---------------------------------------------------------------- tsv_merge_matrix, truncated_svd_factors

TSV_CASES = [  # (shape, tasks, rank): tall, wide, square, K·r > min(m, n) (wide U_cat), 2×n embeddings, k ≪ n
    ((40, 12), 4, 3), ((12, 40), 4, 3), ((16, 16), 3, 5), ((9, 7), 3, 3), ((2, 30), 8, 1), ((70, 60), 3, 6),
]


@pytest.mark.parametrize("shape,tasks,rank", TSV_CASES)
def test_tsv_merge_matrix_matches_reference(shape, tasks, rank, path):
    mats = [1e-3 * randn(*shape, seed=20 + k) for k in range(tasks)]
    got, ref = tsv_merge_matrix(mats, rank), ref_tsv_merge_matrix(mats, rank)
    scale = max(float(m.abs().max()) for m in mats)
    assert got.shape == shape and got.dtype == torch.float32
    close_to_truth(got, ref, np_tsv(mats, rank), atol=1e-7 * scale)
    close(got, ref, atol=2e-5 * scale)


def test_tsv_merge_matrix_with_zero_and_low_rank_tasks(path):
    # zero and rank-1 task vectors: their triplets take the reference SVD path (same LAPACK call, same
    # completion of the null singular vectors) up to pair signs, to which TSV is invariant
    mats = [1e-3 * randn(10, 8, seed=30), torch.zeros(10, 8),
            1e-3 * torch.outer(randn(10, seed=31), randn(8, seed=32)), 1e-3 * randn(10, 8, seed=33)]
    close(tsv_merge_matrix(mats, 2), ref_tsv_merge_matrix(mats, 2), atol=1e-8)


def test_tsv_merge_matrix_with_duplicate_tasks(path):
    # identical task vectors: U_cat = [U_1, U_1] has rank r < 2r, its polar factor (so the reference
    # result) depends on LAPACK's arbitrary null-space completion. What is defined agrees: the result
    # seen through task 1's own top-r singular subspaces, U_1 U_1ᵀ · Δ_m · V_1 V_1ᵀ (= its rank-r truncation).
    m = 1e-3 * randn(12, 8, seed=34)
    got, ref = tsv_merge_matrix([m, m], 2), ref_tsv_merge_matrix([m, m], 2)
    U, _, Vh = np_svd(m)
    pu, pv = U[:, :2] @ U[:, :2].T, Vh[:2].T @ Vh[:2]
    close(pu @ got.double().numpy() @ pv, pu @ ref.double().numpy() @ pv, atol=1e-9)
    close(pu @ got.double().numpy() @ pv, np_truncation(m, 2), atol=1e-9)


@pytest.mark.parametrize("shape,rank", [((30, 10), 3), ((10, 30), 3), ((12, 12), 12), ((70, 60), 6)])
def test_truncated_svd_factors_match_reference(shape, rank, path):
    x = 1e-3 * randn(*shape, seed=40 + rank)
    us, vh = truncated_svd_factors(x, rank)
    rus, rvh = ref_truncated_svd_factors(x, rank)
    assert us.shape == rus.shape and vh.shape == rvh.shape
    assert us.is_contiguous() and vh.is_contiguous()
    close_to_truth(us @ vh, rus @ rvh, np_truncation(x, rank), atol=1e-10)
    close(us @ vh, rus @ rvh, atol=1e-4 * float((rus @ rvh).abs().max()))  # the reference's ε₃₂·σ₁/gap


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
