"""Fast exact SVD kernels for TSV-Merging and Twin-Merging: drop-in replacements for the full
``torch.linalg.svd`` calls of the former ``baselines.polar_factor`` / ``baselines.tsv_merge_matrix`` and
``twin.truncated_svd_factors`` (as of 7ce34e9), computing the same mathematical result.

Method. Every kernel reduces a 2-D matrix ``a`` ``[m, n]`` to the Gram matrix of its *smaller* side,
``G = aᵀa`` (``n × n``, after transposing a wide ``a``), formed in float64 (the products of two fp32 numbers
are exact in float64 and the sums carry float64 rounding), and takes its symmetric eigendecomposition
``G = V Λ Vᵀ``. Then σ = √λ, the right singular vectors are V, and the left ones are ``a V Σ⁻¹`` (only the
``r`` requested ones); the polar factor of a tall ``a`` is ``a G^{-1/2} = a V Λ^{-1/2} Vᵀ``. One GEMM over
the long side and an ``n × n`` eigenproblem replace the bidiagonalisation of the whole ``m × n`` matrix
and the ``m × n`` U that the full SVD builds and the callers then mostly discard. For ``r ≪ n`` the
float64 ``eigh`` is itself replaced by a float32 one made exact again in float64 (``_top_eigh``). Tiny
matrices (m·n·min(m, n) < 2^18) go straight to ``torch.linalg.svd``, which is as fast there.
Per call, 2 CPU threads, idle machine (MKL LAPACK): top-48 triplets of the 30522 × 384 word embedding
~0.17 s instead of ~0.40 s, of 1536 × 384 / 384 × 1536 ~14 ms instead of 29 / 47 ms, of 384 × 384 ~9 ms
instead of ~14 ms; polar factors 0.29 s instead of 0.43 s (30522 × 384), ~25 ms instead of 31 / 47 ms
(1536 × 384 / 384 × 1536). Near-square polar factors (384 × 384) keep the reference SVD: there a float64
eigh costs what the fp32 SVD does. Whole methods on that encoder (8 tasks, 1 thread): ``tsv`` 29.8 → 16.9 s,
``twin`` 25.3 → 13.6 s, ~1.8× (profile and measurements: the TSV/Twin profile report of this change).

Accuracy. Squaring the condition number costs nothing visible here: in float64 the eigenvectors of G
carry an error ~ε₆₄·(σ₁/σᵢ)²/gap, below the ~ε₃₂·(σ₁/σᵢ)/gap of an fp32 SVD as long as σᵢ/σ₁ ≳ 1e-9; on
the synthetic BERT-small task vectors the merged TSV / Twin matrices land 10–300× closer to a float64
SVD than the reference does (max abs error ~1e-9–3e-8 against ~1e-8–1e-6, on entries of ~5e-3), and
they differ from the reference by its own fp32 error. (Tiny matrices and near-square polar factors
go through ``torch.linalg.svd`` itself.) The kernels only use the Gram path when every triplet they
need is well above the noise, σᵢ > ``RTOL``·σ₁ (``RTOL`` = 1e-4); otherwise — a (numerically)
rank-deficient matrix, e.g. a zero, duplicated or low-rank (LoRA) task vector, or a polar factor of a
rank-deficient basis — they fall back to the reference computation, ``torch.linalg.svd`` of the same
matrix. There the SVD (and so the polar factor) is not unique: the singular vectors of the zero singular
values are whatever orthonormal completion LAPACK picks, and the reference results depend on that
choice; the fallback keeps that behaviour rather than inventing another completion. Non-finite inputs
fall back too, so they raise the reference's error.

Sign convention (``top_singular_triplets``): each left singular vector u is flipped so that its
largest-magnitude entry (the first one, on ties) is positive, and the matching row of Vh with it, so
the factors are a deterministic function of the input. ``torch.linalg.svd`` makes no such promise:
its factors may differ from these by the sign of a (u, v) pair, never in ``U·diag(S)·Vh``.

Dtypes and devices: fp16/bf16/fp32 inputs are computed from fp32 and returned in fp32, float64 inputs
in float64; all work stays on the input's device (CPU or CUDA). ``tsv_merge_matrix`` always returns
fp32, as the reference does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

RTOL = 1e-4
"""The Gram (eigh) path is used only when every needed σᵢ exceeds ``RTOL·σ₁``; else ``torch.linalg.svd``."""

_REFINE_MIN_N = 128  # below this a float64 eigh is as fast as the float32 one plus refinement
_REFINE_MAX_COUPLING = 1e-4  # the O(c²) left by the Newton step stays ≤ 1e-8
_SMALL_FLOPS = 1 << 18  # below m·n·min(m, n) = 2^18 (64³) torch.linalg.svd is as fast: fixed costs dominate
_POLAR_MIN_ASPECT = 1.25  # polar_factor takes the Gram route only for max(m, n) ≥ 1.25·min(m, n)
_CHUNK_ELEMENTS = 1 << 24  # rows of at most this many elements are cast to float64 at a time (128 MiB)


def _check_matrix(x: Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} expects a 2-D matrix, got shape {tuple(x.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Float64Rows:
    """A tall matrix seen in float64: converted once when it fits in one chunk, else chunk by chunk."""

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.rows = max(1, _CHUNK_ELEMENTS // max(1, a.shape[1]))
        self.whole = a.to(torch.float64) if a.shape[0] <= self.rows else None

    def chunks(self) -> Iterator[Tensor]:
        if self.whole is not None:
            yield self.whole
        else:
            for chunk in self.a.split(self.rows):
                yield chunk.to(torch.float64)

    def gram(self) -> Tensor:
        """``aᵀa`` in float64."""
        if self.whole is not None:
            return self.whole.mT @ self.whole
        n = self.a.shape[1]
        g = torch.zeros(n, n, dtype=torch.float64, device=self.a.device)
        for chunk in self.chunks():
            g.addmm_(chunk.mT, chunk)
        return g

    def matmul(self, w: Tensor) -> Tensor:
        """``a @ w`` in float64 (``w`` float64)."""
        return torch.cat([chunk @ w for chunk in self.chunks()])


def _is_small(a: Tensor) -> bool:
    rows, cols = a.shape
    return rows * cols * min(rows, cols) < _SMALL_FLOPS


def _all_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _normalize_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each (u column, vh row) pair so that the largest-|.| entry of u (the first on ties) is > 0."""
    idx = u.abs().argmax(0, keepdim=True)
    sign = torch.where(u.gather(0, idx)[0] < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, vh * sign[:, None]


def _sym(h: Tensor) -> Tensor:
    return (h + h.mT) / 2


def _top_eigh(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs (descending) of a symmetric PSD float64 matrix ``g``, to float64 accuracy.

    Small ``n``, or ``k`` > n/2 − 16: one float64 ``eigh``. Otherwise the float64 eigendecomposition is
    replaced by a float32 one (about half the time; the tridiagonal reduction dominates) made exact again
    in float64 (not iterated to a tolerance: two fixed steps): (1) Rayleigh–Ritz on the top ``b = k + 16``
    float32 eigenvectors, which resolves the eigenvectors near the cut at k however close their
    eigenvalues are; (2) one Newton correction of the k Ritz vectors against the other ``n − b``
    eigenvectors: their coupling c = xᵀr/(λ − θ) ~ ε₃₂·λ₁/gap, gap = θ_k − λ_{b+1}, and the correction
    leaves O(c²). Float64 ``eigh`` instead whenever gap < 1e-3·λ₁ or some c > ``_REFINE_MAX_COUPLING``.
    """
    n = g.shape[0]
    b = k + 16
    if n < _REFINE_MIN_N or 2 * b > n:
        return _eigh_desc(g, k)
    scale = g.diagonal().max()  # λ₁ ≤ trace ≤ n·scale: no float32 overflow or underflow of g / scale
    if not bool(scale > 0):
        return _eigh_desc(g, k)
    lam32, x32 = torch.linalg.eigh((g / scale).to(torch.float32))
    x, lam_out = x32.to(torch.float64), lam32[: n - b].to(torch.float64) * scale
    xb = x[:, n - b:]
    chol = torch.linalg.cholesky(_sym(xb.mT @ xb))  # Cholesky QR: xb orthonormal to ε₃₂ → to ε₆₄
    xb = torch.linalg.solve_triangular(chol, xb.mT, upper=False).mT
    y = g @ xb
    theta, z = torch.linalg.eigh(_sym(xb.mT @ y))
    theta, z = theta.flip(0)[:k], z.flip(1)[:, :k]
    v = xb @ z
    resid = y @ z - v * theta  # ⟂ xb; its components along the other eigenvectors are c·(λ − θ)
    gap = theta[-1] - lam_out[-1]
    ok = (torch.isfinite(lam32).all() & (gap > 1e-3 * theta[0])
          & (resid.norm(dim=0).max() <= _REFINE_MAX_COUPLING * gap))
    if not bool(ok):
        return _eigh_desc(g, k)
    xo = x[:, : n - b]
    v = v - xo @ ((xo.mT @ resid) / (lam_out[:, None] - theta[None, :]))
    return theta, v / v.norm(dim=0)


def _eigh_desc(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    lam, vecs = torch.linalg.eigh(g)  # ascending
    return lam.flip(0)[:k], vecs.flip(1)[:, :k]


def _svd_triplets(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference: the top ``k`` triplets of the full thin ``torch.linalg.svd``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def _finish(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference path (rank-deficient or non-finite input), with the deterministic signs."""
    u, s, vh = _svd_triplets(a, k)
    u, vh = _normalize_signs(u, vh)
    return u.contiguous(), s.contiguous(), vh.contiguous()


def top_singular_triplets(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U[:, :r], S[:r], Vh[:r])`` of the thin SVD ``m = U diag(S) Vh``, r = min(``rank``, m, n).

    Equal to ``torch.linalg.svd(m, full_matrices=False)`` truncated to r, to float32 rounding, up to the
    sign of each (u, v) pair: here the largest-|.| entry of every u column is positive (module
    docstring). Singular values descending. Exact (no randomisation): float64 eigendecomposition of
    the Gram matrix of the smaller side, or ``torch.linalg.svd`` itself when σ_r ≤ ``RTOL``·σ₁.
    """
    _check_matrix(m, "top_singular_triplets")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dtype = _compute_dtype(m)
    a = m.to(dtype)
    rows, cols = a.shape
    k = min(rank, rows, cols)
    if k == 0:
        return a.new_zeros(rows, 0), a.new_zeros(0), a.new_zeros(0, cols)
    if _is_small(a):
        return _finish(a, k)
    wide = rows < cols
    tall = a.mT if wide else a  # tall = ut diag(s) vᵀ, ut [max, k], v [min, k]
    view = _Float64Rows(tall)
    g = view.gram()
    if not _all_finite(g):
        return _finish(a, k)
    lam_top, v = _top_eigh(g, k)
    if not bool(lam_top[-1] > (RTOL * RTOL) * lam_top[0]):
        return _finish(a, k)
    s64 = lam_top.sqrt()
    ut = view.matmul(v / s64)
    u, vh = (v, ut.mT) if wide else (ut, v.mT)
    u, vh = _normalize_signs(u.to(dtype), vh.to(dtype))
    return u.contiguous(), s64.to(dtype), vh.contiguous()


def polar_factor(x: Tensor) -> Tensor:
    """The orthogonal (Procrustes) factor ``P Qᵀ`` of ``x = P Σ Qᵀ`` (thin SVD), ``x``'s shape.

    For a tall ``x`` (m ≥ n) this is ``x (xᵀx)^{-1/2}`` (orthonormal columns), for a wide one the
    transpose of the polar factor of ``xᵀ`` (orthonormal rows): only the Gram matrix of the smaller
    side is decomposed, in float64. Unique when x has full rank min(m, n); when σ_min ≤ ``RTOL``·σ_max it
    is not (its action on the null space is LAPACK's arbitrary completion), and this falls back to the
    reference ``P Qᵀ`` from ``torch.linalg.svd``, as it does for tiny and for near-square matrices
    (max(m, n) < 1.25·min(m, n)), where the float64 eigendecomposition saves nothing.
    """
    _check_matrix(x, "polar_factor")
    dtype = _compute_dtype(x)
    a = x.to(dtype)
    rows, cols = a.shape
    if a.numel() == 0 or _is_small(a) or max(rows, cols) < _POLAR_MIN_ASPECT * min(rows, cols):
        return _polar_svd(a)  # near-square: the float64 eigh + products cost what the fp32 SVD does
    wide = rows < cols
    view = _Float64Rows(a.mT if wide else a)
    g = view.gram()
    if not _all_finite(g):
        return _polar_svd(a)
    lam, q = torch.linalg.eigh(g)  # ascending
    if not bool(lam[0] > (RTOL * RTOL) * lam[-1]):
        return _polar_svd(a)
    p = view.matmul((q * lam.rsqrt()) @ q.mT).to(dtype)  # x G^{-1/2}, the product in float64 too
    return p.mT.contiguous() if wide else p


def _polar_svd(a: Tensor) -> Tensor:
    """The reference polar factor."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_merge_matrix(matrices: Sequence[Tensor], rank: int) -> Tensor:
    """TSV-M for one 2-D key (``baselines.tsv_merge_matrix``): concatenate each task's top-``rank``
    singular triplets, U = [U_1 … U_T], Σ, V = [V_1 … V_T], and return polar(U) Σ polar(Vᵀ), fp32."""
    if len(matrices) == 0:
        raise ValueError("tsv_merge_matrix needs at least one matrix")
    us, ss, vhs = zip(*(top_singular_triplets(m.float(), rank) for m in matrices))
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return polar_factor(u_cat) @ (s_cat[:, None] * polar_factor(vh_cat))


def truncated_svd_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r·S_r, V_rᵀ)`` of the rank-``rank`` truncated SVD of a 2-D matrix
    (``twin.truncated_svd_factors``)."""
    u, s, vh = top_singular_triplets(matrix, rank)
    return (u * s).contiguous(), vh.contiguous()
