"""The faster kernels of issue 27 item 2 against the formulas they replace, bit for bit.

PCB's paper formulation runs on column blocks with every pair at once, keeps β from the threshold passes for
the merge, and takes its thresholds as magnitudes; Breadcrumbs' band finds its cuts from the float bits;
EMR reads τ_uni's maximum off the signed product and keeps the statistics pass's masks; the disjoint merge
skips a product by one. Each is checked here against the direct per-pair / per-task formula written out
in the test (the old computation), with ``torch.equal``.
"""

from __future__ import annotations

import math

import pytest
import torch

from freemerge_pl.merging.engine import TaskVectorInputs, merge_task_vectors, preflight
from freemerge_pl.merging.method import Scan, VectorChunks
from freemerge_pl.merging.methods import pcb
from freemerge_pl.merging.methods.emr import EMR, emr_unify
from freemerge_pl.merging.methods.pcb import PCB
from freemerge_pl.merging.ops import disjoint_merge, elect_sign, magprune_drop_probabilities, ties_combine
from freemerge_pl.merging.order_statistics import abs_order_statistics
from freemerge_pl.merging.topk import magnitude_band_mask


def naive_pcb_stats(flat: torch.Tensor):
    """min/max per pair and the softmax denominators, one pair at a time on the whole rows."""
    K = flat.shape[0]
    lo = torch.full((K, K), math.inf, dtype=torch.float64)
    hi = torch.full((K, K), -math.inf, dtype=torch.float64)
    for i in range(K):
        for j in range(K):
            p = flat[i] * flat[j]
            lo[i, j], hi[i, j] = float(p.min()), float(p.max())
    z_intra = torch.tensor([float(naive_exponents(flat, lo, hi, i, i, K).sum(dtype=torch.float64))
                            for i in range(K)], dtype=torch.float64)
    z_inter = torch.tensor([[float(naive_exponents(flat, lo, hi, i, j, 1).sum(dtype=torch.float64))
                             for j in range(K)] for i in range(K)], dtype=torch.float64)
    return lo, hi, z_intra, z_inter


def naive_exponents(flat, lo, hi, i, j, factor):
    a, b = float(lo[i, j]), float(hi[i, j])
    if not b > a:
        return torch.ones_like(flat[i])
    return torch.exp((flat[i] * flat[j] - a) / (b - a) * float(factor) - float(factor))


def naive_beta(flat, lo, hi, z_intra, z_inter):
    K = flat.shape[0]
    rows = []
    for i in range(K):
        intra = naive_exponents(flat, lo, hi, i, i, K) / float(z_intra[i])
        inter = naive_exponents(flat, lo, hi, i, 0, 1) / float(z_inter[i, 0])
        for j in range(1, K):
            inter = inter + naive_exponents(flat, lo, hi, i, j, 1) / float(z_inter[i, j])
        rows.append(intra * inter)
    return torch.stack(rows)


def pcb_tensor(K: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(K, n, generator=g) * 1e-3
    flat[:, :7] = 0.0  # ties and zero products
    if K > 1:
        flat[1] = 2e-3  # τ_1 ⊙ τ_1 is constant: a pair whose Norm is 0 everywhere
    return flat


@pytest.mark.parametrize("K,n", [(1, 40), (3, 1000), (8, 333)])
def test_pcb_block_kernels_equal_the_per_pair_formula(monkeypatch, K, n):
    monkeypatch.setattr(pcb, "_BLOCK", 64)  # many blocks and a ragged last one
    flat = pcb_tensor(K, n, seed=K)
    lo, hi, z_intra, z_inter = naive_pcb_stats(flat)
    stats = pcb.PCBPaperStats(torch.full((K, K), math.inf, dtype=torch.float64),
                              torch.full((K, K), -math.inf, dtype=torch.float64))
    pcb.pcb_minmax(flat, stats)
    assert torch.equal(stats.lo, lo) and torch.equal(stats.hi, hi)
    stats.z_intra, stats.z_inter = torch.zeros(K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
    pcb.pcb_exp_sums(flat, stats)
    # block-wise float64 sums: equal to the whole-row sums to float64 rounding, and as the fp32 divisors used
    torch.testing.assert_close(stats.z_intra, z_intra, rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.z_inter, z_inter, rtol=1e-13, atol=0)
    assert torch.equal(stats.z_intra.float(), z_intra.float()) and torch.equal(stats.z_inter.float(), z_inter.float())
    want = naive_beta(flat, lo, hi, z_intra, z_inter)
    assert torch.equal(pcb.pcb_beta(flat, stats), want)
    # the merge, block by block, equals the whole-tensor formula
    stats.thresholds = want.kthvalue(n - math.ceil(0.3 * n) + 1, dim=1).values
    kept = torch.where(want >= stats.thresholds[:, None], want, torch.zeros_like(want))
    num, den = (kept * flat).sum(0), kept.sum(0)
    merged = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    assert torch.equal(pcb.pcb_paper_merge(flat, stats), merged)


def pcb_task_vectors(seed: int = 0, K: int = 4):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (33, 20), "b": (20,), "e": (7, 3, 5)}
    tvs = [{k: torch.randn(s, generator=g) * 1e-2 for k, s in shapes.items()} for _ in range(K)]
    tvs[0]["w"][:4] = 0.0
    return tvs


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_pcb_kept_betas_change_nothing(monkeypatch, scope):
    """β kept from the threshold passes (the default) or recomputed for the merge: the same merge."""
    monkeypatch.setattr(pcb, "_BLOCK", 50)
    tvs = pcb_task_vectors()
    kept = merge_task_vectors(PCB(density=0.3, scope=scope), tvs).delta
    monkeypatch.setattr(pcb, "BETA_STORE_BYTES", 0)
    recomputed = merge_task_vectors(PCB(density=0.3, scope=scope), tvs).delta
    for key in kept:
        assert torch.equal(kept[key], recomputed[key])


def test_pcb_thresholds_as_magnitudes_equal_signed_order_statistics():
    """β ≥ 0, so its order statistics taken on |β| (the float bits without the sign) are its own."""
    tvs = pcb_task_vectors(seed=3, K=3)
    method = PCB(density=0.25, scope="model")
    inputs = TaskVectorInputs(tvs)
    stats = method.statistics(Scan(inputs.keys, inputs.load, preflight(method, inputs)))
    betas = torch.cat([naive_beta(torch.stack([tv[k].reshape(-1) for tv in tvs]), stats.lo, stats.hi,
                                  stats.z_intra, stats.z_inter) for k in inputs.keys], 1)
    n = betas.shape[1]
    assert torch.equal(stats.thresholds, betas.kthvalue(n - math.ceil(0.25 * n) + 1, dim=1).values)


@pytest.mark.parametrize("values", [
    torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0, 2.0, -2.0, 0.5, 0.0]),
    torch.randint(-4, 5, (2000,)).float() * 0.25,
    torch.randn(5000),
])
def test_abs_order_statistics_match_a_sort(values):
    mags = values.abs()
    s = mags.sort().values
    n = values.numel()
    ranks = [0, n // 3, n // 2, n - 1]
    for (value, below, equal), r in zip(abs_order_statistics(values, ranks), ranks):
        assert value == float(s[r])
        assert below == int((mags < s[r]).sum()) and equal == int((mags == s[r]).sum())


def test_abs_order_statistics_leave_non_finite_and_other_dtypes_to_kthvalue():
    assert abs_order_statistics(torch.tensor([1.0, math.inf]), [0]) is None
    assert abs_order_statistics(torch.tensor([1.0, math.nan]), [0]) is None
    assert abs_order_statistics(torch.tensor([1.0, 2.0], dtype=torch.float64), [0]) is None


@pytest.mark.parametrize("v", [
    torch.randn(40, 30),
    torch.randint(-3, 4, (500,)).float(),  # heavy ties at both cuts
    torch.tensor([1.0, -1, 1, 0, 0, 2, -2, 0, -0.0, 3]),
    torch.tensor([1.0, math.inf, 0.0, -0.0, 2.0]),
])
@pytest.mark.parametrize("top,bottom", [(0.01, 0.9), (0.0, 0.5), (0.3, 0.0), (0.2, 0.7)])
def test_band_mask_equals_a_stable_sort(v, top, bottom):
    flat = v.reshape(-1)
    n = flat.numel()
    order = torch.sort(flat.abs(), stable=True).indices
    want = torch.ones(n, dtype=torch.bool)
    want[order[:math.floor(bottom * n + 1e-9)]] = False
    n_top = math.floor(top * n + 1e-9)
    if n_top:
        want[order[n - n_top:]] = False
    assert torch.equal(magnitude_band_mask(v, top, bottom).reshape(-1), want)


def test_emr_unify_equals_the_direct_formula():
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(5, 300, generator=g)
    stacked[:, :20] = 0.0
    stacked[:2, 20:40] = torch.tensor(0.5)
    stacked[2:, 20:40] = -0.5  # Σ v = 0 → flag 0
    flag = torch.sign(stacked.sum(0))
    masks = (stacked * flag) > 0
    tau = flag * torch.where(masks, stacked.abs(), torch.zeros_like(stacked)).amax(0)
    got_tau, got_masks = emr_unify(stacked)
    assert torch.equal(got_tau, tau) and torch.equal(got_masks, masks)
    # the statistics pass's (τ_uni, masks) reused by the merge: the merge alone gives the same output
    tvs = [{"w": stacked[k].reshape(20, 15).clone()} for k in range(5)]
    method = EMR()
    result = merge_task_vectors(method, tvs)
    assert torch.equal(result.delta["w"], tau.reshape(20, 15))
    assert all(torch.equal(m.mask("w").reshape(-1), masks[k]) for k, m in enumerate(result.task_modules))


@pytest.mark.parametrize("divisor", ["count", "weight_sum"])
def test_disjoint_merge_with_unit_weights_is_the_weighted_formula(divisor):
    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(4, 100, generator=g)
    stacked[:, :10] = 0.0
    stacked[1, 10:14] = -0.0
    stacked[2, 20] = math.nan
    stacked[3, 30:32] = torch.tensor([math.inf, -math.inf])
    sign = elect_sign(stacked)
    agree = ((stacked * sign) > 0).float()
    w = torch.ones(4, 1)
    num = (stacked * w * agree).sum(0)
    den = agree.sum(0) if divisor == "count" else (w * agree).sum(0)
    want = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
    for weights in (None, torch.ones(4)):
        assert torch.equal(disjoint_merge(stacked, sign, weights, divisor).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_elect_and_disjoint_merge_equal_the_where_formulas(dtype):
    """The sign election and the disjoint mean written with ``torch.where`` (the old kernels): ±0, NaN, ±inf,
    ties of the sum at 0, and weights summing to 0 over the agreeing tasks (a zero denominator with a
    nonzero numerator)."""
    g = torch.Generator().manual_seed(5)
    stacked = torch.randint(-2, 3, (4, 300), generator=g).float()
    stacked[:, :6] = torch.tensor([[-0.0, 0.0, 1.0, math.nan, math.inf, 1.0]]).expand(4, 6)
    stacked[0, 6:9] = torch.tensor([math.nan, -math.inf, -0.0])
    stacked = stacked.to(dtype)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[stacked.element_size()]
    for weights in (None, torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])):
        w = torch.ones(4, 1) if weights is None else weights[:, None]
        total = stacked.sum(0) if weights is None else (stacked * w.to(dtype)).sum(0)
        sign = torch.where(total >= 0, 1.0, -1.0).to(dtype)
        assert torch.equal(elect_sign(stacked, weights).view(ints), sign.view(ints))
        agree = ((stacked * sign) > 0).to(dtype)
        for divisor in ("count", "weight_sum"):
            wd = w.to(dtype)
            num = (stacked * agree if weights is None else stacked * wd * agree).sum(0)
            den = agree.sum(0) if divisor == "count" or weights is None else (wd * agree).sum(0)
            want = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
            got = disjoint_merge(stacked, sign, weights, divisor)
            assert got.dtype == want.dtype and torch.equal(got.view(ints), want.view(ints)), (weights, divisor)


@pytest.mark.parametrize("v", [torch.randn(6, 50), torch.randint(-2, 3, (4, 9)).float(), torch.randn(7),
                               torch.tensor(2.0), torch.randn(3, 1), torch.randint(-3, 4, (40, 3, 7)).float()])
@pytest.mark.parametrize("group", [None, 1, 20])
def test_della_drop_probabilities_equal_the_rank_formula(monkeypatch, v, group):
    """p_i computed once per rank and scattered (rows in groups of ``group`` entries) equals the per-entry formula
    on the ranks of a stable sort."""
    from freemerge_pl.merging import ops
    if group is not None:
        monkeypatch.setattr(ops, "RANK_ENTRIES", group)
    rows = v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(1, -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    frac = ranks.to(torch.float32) / (n - 1) if n > 1 else torch.full(rows.shape, 0.5)
    want = (0.3 + 0.14 / 2 - 0.14 * frac).reshape(v.shape)
    assert torch.equal(magprune_drop_probabilities(v, 0.3, 0.14), want)


def reference_magnitude_order(rows: torch.Tensor) -> torch.Tensor:
    """Each row's indices by ascending |v|, ties in index order, by Python's sort (no NaN)."""
    return torch.tensor([sorted(range(len(r)), key=lambda i: (abs(r[i]), i)) for r in rows.double().tolist()],
                        dtype=torch.int64).reshape(rows.shape)


def awkward_rows(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(-4, 5, (9, 300), generator=g).float() * 1e-3  # ties by the dozen, ±
    rows[0, ::3] = -0.0
    rows[1, ::5] = 0.0
    rows[2, :4] = torch.tensor([1e-45, -1e-45, 1e-40, -3e-39])  # subnormals
    rows[3, 10:13] = torch.tensor([math.inf, -math.inf, 3e38])
    rows[4] = 5.0  # one value throughout
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_magnitude_order_is_the_stable_sort_of_magnitudes(dtype):
    from freemerge_pl.merging.ops import magnitude_order

    rows = awkward_rows(dtype)
    want = reference_magnitude_order(rows)
    assert torch.equal(magnitude_order(rows), want)
    assert torch.equal(torch.sort(rows.abs(), dim=1, stable=True).indices, want)  # the call it stands for
    for part in (rows[:1], rows[:, :1], rows[2:5, 7:40], rows[:0]):  # one row, one column, strided, empty
        assert torch.equal(magnitude_order(part), torch.sort(part.abs(), dim=1, stable=True).indices)


def test_magnitude_order_with_nan_is_torch_sort():
    """NaN (any payload or sign) ranks last in index order, as torch's stable sort ranks it."""
    from freemerge_pl.merging.ops import magnitude_order

    rows = awkward_rows()
    nans = torch.tensor([0x7FC00000, 0xFFC00001 - (1 << 32), 0x7F800001, 0x7FFFFFFF], dtype=torch.int32)
    rows[5, [3, 50, 8, 200]] = nans.view(torch.float32)
    got = magnitude_order(rows)
    assert torch.equal(got, torch.sort(rows.abs(), dim=1, stable=True).indices)
    assert got[5, -4:].tolist() == [3, 8, 50, 200]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_is_where_bit_for_bit(dtype):
    from freemerge_pl.merging.ops import masked

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g)
    x[0, :3] = torch.tensor([-0.0, math.nan, -math.inf])
    x[1, :2] = torch.tensor([math.inf, -math.nan])
    x = x.to(dtype)
    keep = torch.rand(5, 64, generator=g) > 0.5
    keep[:2, :3] = True
    keep[2, :3] = False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    want = torch.where(keep, x, torch.zeros_like(x))
    got = masked(x, keep)
    assert got.dtype == dtype and torch.equal(got.view(ints), want.view(ints))  # −0.0 and NaN bits kept, +0.0 dropped
    assert torch.equal(masked(x.t(), keep.t()).view(ints), want.t().view(ints))  # strided
    assert torch.equal(masked(x, keep[:1]).view(ints), torch.where(keep[:1], x, 0.0).view(ints))  # broadcast


def test_masked_keeps_autograd():
    from freemerge_pl.merging.ops import masked

    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    masked(x, torch.tensor([True, False, True])).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0]


def test_magprune_keeps_autograd_and_its_values():
    from freemerge_pl.merging.ops import magprune

    v = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    want = magprune(v, 0.3, 0.14, torch.Generator().manual_seed(2))
    x = v.clone().requires_grad_(True)
    got = magprune(x, 0.3, 0.14, torch.Generator().manual_seed(2))
    assert torch.equal(got.detach(), want)
    got.sum().backward()  # d/dv of v/(1 − p) where kept: 1/(1 − p), else 0
    p = magprune_drop_probabilities(v, 0.3, 0.14)
    assert 0 < int((want == 0).sum()) < want.numel()
    torch.testing.assert_close(x.grad, torch.where(want != 0, 1 / (1 - p), torch.zeros_like(v)), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- FREE's expert cut (topk.topk_cut)


def naive_cut(v: torch.Tensor, chunk: int, count: int, absolute: bool = True):
    """The old four steps: Σ|v| per chunk, kthvalue of every |v|, its ties, Σ of the top per chunk."""
    chunks = [c for c in v.reshape(-1).split(chunk)]
    mags = [c.abs() if absolute else c for c in chunks]
    total = sum(float(m.sum()) for m in mags)
    allm = torch.cat(mags)
    t = allm.kthvalue(allm.numel() - count + 1).values
    ties = count - int((allm > t).sum())
    top = 0.0
    for m in mags:
        top += float(m[m > float(t)].sum())
    return float(t), ties, total, top + ties * float(t)


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def cut_cases():
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(3000, generator=g) * 1e-3
    bf16 = (torch.randn(3000, generator=g) * 1e-3).bfloat16().float()  # ties by the dozen everywhere
    zeros = torch.randn(3000, generator=g)
    zeros[::3] = 0.0
    zeros[1::3] = -0.0
    few = torch.zeros(3000)  # fewer nonzeros than the count: t = 0, ~everything tied
    few[::250] = torch.randn(12, generator=g)
    one_value = torch.full((3000,), -0.25)
    inf = gauss.clone()
    inf[[7, 900]] = torch.tensor([math.inf, -math.inf])
    nan = gauss.clone()
    nan[[3, 2000]] = math.nan
    return {"gauss": gauss, "bf16": bf16, "zeros": zeros, "few": few, "one_value": one_value, "inf": inf,
            "nan": nan}


@pytest.mark.parametrize("case", list(cut_cases()))
@pytest.mark.parametrize("chunk,radix_min,bound", [(4096, 100, 1 << 22), (700, 100, 1 << 22), (700, 100, 1),
                                                   (4096, 1 << 16, 1 << 22)])
@pytest.mark.parametrize("count", [1, 30, 299, 1500, 3000])
def test_topk_cut_equals_kthvalue_and_the_sums(monkeypatch, case, chunk, radix_min, bound, count):
    """The histogram + selection cut (one chunk or several of ``chunk`` entries; kthvalue below ``radix_min``;
    ``bound`` 1: every selection outgrows a chunk, so the low-bits pass pins t) against the old kthvalue
    formula, bit for bit, and the entries it cuts against a sort (ties by index)."""
    from freemerge_pl.merging import topk

    v = cut_cases()[case]
    monkeypatch.setattr(topk, "_RADIX_MIN", radix_min)
    monkeypatch.setattr(topk, "_CHUNK", bound)
    chunks = list(zip(range(0, v.numel(), chunk), v.split(chunk)))
    got = topk.topk_cut(lambda: iter(chunks), v.numel(), count)
    want = naive_cut(v, chunk, count)
    assert same_float(got.threshold, want[0]) and got.ties == want[1]
    assert same_float(got.total, want[2]) and same_float(got.top, want[3])
    idx = topk.selection_entries(iter(chunks), got.threshold, got.ties)[0]
    if not bool(v.isnan().any()):  # the cut keeps exactly count entries, ties by index
        order = sorted(range(v.numel()), key=lambda i: (-abs(float(v[i])), i))
        assert torch.equal(idx, torch.tensor(sorted(order[:count]), dtype=torch.long))
    indexed = topk.topk_cut(lambda: iter(chunks), v.numel(), count, keep_indices=True)
    assert all(same_float(a, b) for a, b in zip(indexed[:4], got[:4]))  # the indices change nothing else
    if indexed.indices is not None:  # found on the way: the cut's own entries
        assert torch.equal(indexed.indices, idx)
    else:  # only off the histogram path: kthvalue (small, negative, non-finite) or the low-bits pass
        assert v.numel() < radix_min or bound == 1 or not bool(v.isfinite().all()) or case == "zeros"


def counted_chunks(v: torch.Tensor, reads: list) -> VectorChunks:
    """``VectorChunks.of(v)`` that counts its reads (a whole pass of blocks or chunks) in ``reads``."""
    inner = VectorChunks.of(v)
    return VectorChunks(v.numel(), lambda size: reads.append(size) or inner.blocks(size), inner.at)


@pytest.mark.parametrize("case", list(cut_cases()))
@pytest.mark.parametrize("count", [1, 30, 299, 1500, 2900])
def test_sampled_cut_equals_the_naive_cut_in_one_read(monkeypatch, case, count):
    """``sampled_cut`` (a floor from every stride-th |v|, candidates gathered block by block while |v| is
    summed): the naive cut's t, ties and sums bit for bit and the sorted top ``count`` (ties by index); one read
    when the sample places the cut, ``topk_cut``'s otherwise (small stride, non-finite values)."""
    from freemerge_pl.merging import topk

    v = cut_cases()[case]
    monkeypatch.setattr(topk, "_RADIX_MIN", 100)
    monkeypatch.setattr(topk, "_CHUNK", 700)  # 5 chunks (a short last one) of 7 blocks
    monkeypatch.setattr(topk, "SUM_BLOCK", 100)
    monkeypatch.setattr(topk, "_SAMPLE_MIN", 8)  # strides 3, 37, 64 for counts 30, 299, 1500
    monkeypatch.setattr(topk, "_SAMPLE_RUN", 4)  # runs of 4: enough of them in 3000 entries
    reads = []
    got = topk.sampled_cut(counted_chunks(v, reads), count)
    want = naive_cut(v, 700, count)
    assert same_float(got.threshold, want[0]) and got.ties == want[1]
    assert same_float(got.total, want[2]) and same_float(got.top, want[3])
    sampled = reads == [100]
    if not bool(v.isfinite().all()) or count in (1, 2900):  # Inf/NaN, or no sample can place the cut
        assert not sampled, reads
    elif case in ("gauss", "bf16"):
        assert sampled, reads
    if not bool(v.isnan().any()) and got.indices is not None:
        order = sorted(range(v.numel()), key=lambda i: (-abs(float(v[i])), i))
        assert torch.equal(got.indices, torch.tensor(sorted(order[:count]), dtype=torch.long))
    assert sampled <= (got.indices is not None)


@pytest.mark.parametrize("n", [0, 5, 8, 1000, 1003, 1 << 17])
@pytest.mark.parametrize("share", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("path", ["numpy", "words"])
def test_positions_at_least_equal_nonzero(n, share, path):
    """The positions of m ≥ floor, through NumPy (float32/64 on the CPU) or through the mask's 8-byte words (any
    other m, here bfloat16): the naive comparison's, in order (NaN never ≥, lengths that are not a multiple of
    8, a strided m, and floors that float32 rounds or cannot hold included)."""
    from freemerge_pl.merging import topk

    m = torch.rand(2 * n, generator=torch.Generator().manual_seed(n))[::2]  # strided
    if n > 7:
        m[3], m[7] = math.nan, 0.5  # m[7] ties the floor 0.5 of share 0.5: kept
    if path == "words":
        m = m.to(torch.bfloat16)
    for floor in (1.0 - share if share < 1 else 0.0, 0.1 + 1e-12, 1e39, -1e39):  # rounded, ±inf in float32
        bound = torch.tensor(floor, dtype=m.dtype)  # the floor as m's dtype holds it
        want = [i for i in range(n) if float(m[i]) >= float(bound)] if n < 2000 else \
            torch.nonzero(m >= bound).flatten().tolist()  # (torch's plain comparison and nonzero)
        got = topk.positions_at_least(m, floor)
        assert got.dtype == torch.long and got.tolist() == want


def test_gather_blocks_takes_each_index_from_its_block():
    """Values at sorted flat indices, taken block by block (ragged last block, blocks without an index): those
    of the whole vector."""
    from freemerge_pl.merging import topk

    v = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 1, 99, 100, 101, 512, 999])
    got = topk.gather_blocks(topk.flat_chunks(v, 100), idx)
    assert torch.equal(got, torch.stack([v[i] for i in idx.tolist()]))
    assert topk.gather_blocks(topk.flat_chunks(v, 100), torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("layout", ["gauss", "aliased"])
def test_sampled_cut_falls_back_when_the_sample_misjudges(monkeypatch, layout):
    """FREE's cut: the candidates come from a sampled floor, in one read ("gauss"); when the sample misjudges
    the tensor (every sampled entry large, the rest small: "aliased", the sample's floor leaves fewer than count
    entries) the cut falls back to ``topk_cut``'s histogram. Both give the naive cut and its entries."""
    from freemerge_pl.merging import topk

    g = torch.Generator().manual_seed(11)
    v = (torch.randn(200_000, generator=g) * 1e-3).bfloat16().float()  # ties by the dozen
    count = 2000
    if layout == "aliased":  # every sampled entry large (the sample's stride is min(64, count // 256) = 7)
        at = topk.sample_indices(v.numel(), 7)
        v[at] = 10.0 + torch.rand(at.shape, generator=g)
    histograms = []
    real = topk._high_histogram
    monkeypatch.setattr(topk, "_high_histogram", lambda *a: histograms.append(1) or real(*a))
    monkeypatch.setattr(topk, "_CHUNK", 28_000)  # 8 chunks
    reads = []
    got = topk.sampled_cut(counted_chunks(v, reads), count)
    want = naive_cut(v, 28_000, count)
    assert (got.threshold, got.ties, got.total, got.top) == want
    order = sorted(range(v.numel()), key=lambda i: (-abs(float(v[i])), i))[:count]
    assert torch.equal(got.indices, torch.tensor(sorted(order)))
    assert bool(histograms) == (layout == "aliased")
    assert len(reads) == (1 if layout == "gauss" else 3)  # the sampled read; then the histogram's two


def test_topk_cut_of_signed_values_leaves_negatives_to_kthvalue(monkeypatch):
    from freemerge_pl.merging import topk

    monkeypatch.setattr(topk, "_RADIX_MIN", 10)
    v = torch.randn(500)
    for values in (v, v.abs(), torch.cat([v.abs(), torch.tensor([-0.0])])):
        got = topk.topk_cut(lambda values=values: topk.flat_chunks(values), values.numel(), 17, absolute=False)
        assert (got.threshold, got.ties) == naive_cut(values, 1 << 22, 17, absolute=False)[:2]


# ---------------------------------------------------------------- column-blocked TIES and EMR (ops.column_blocks)


def awkward_vectors(K: int, n: int, seed: int) -> list[torch.Tensor]:
    """K task vectors with zeros, ±0, bf16-rounded ties and an all-zero stretch (elected +, no agreement)."""
    g = torch.Generator().manual_seed(seed)
    vs = [(torch.randn(n, generator=g) * 1e-3).bfloat16().float() for _ in range(K)]
    for k, v in enumerate(vs):
        v[k::7] = 0.0
        v[(k + 3)::11] = -0.0
        v[:5] = 0.0
    return vs


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("n", [5, 64, 129, 64 * 5 + 1, 64 * 5 + 5, 64 * 6 + 17, 64 * 9 + 40])
def test_ties_merge_blocks_equal_the_whole_stack(monkeypatch, K, n):
    """Trim + elect + disjoint mean block by block (narrow blocks, every tail a sum over dim 0 can meet)
    against the old whole-stack formula, bit for bit: both conventions, unit and other weights."""
    from freemerge_pl.merging import ops
    from freemerge_pl.merging.methods.ties import ties_merge
    from freemerge_pl.merging.topk import magnitude_trim, trim_thresholds

    monkeypatch.setattr(ops, "COLUMNS", 64)
    vs = awkward_vectors(K, n, seed=K * 1000 + n)
    stacked = torch.stack(vs)
    thresholds = trim_thresholds(stacked.abs(), 0.3)
    for weights in (torch.ones(K), torch.linspace(0.5, 1.5, K)):
        for election in ("unweighted", "weighted"):
            want = ties_combine(magnitude_trim(stacked, 0.3, thresholds), weights, election)
            got = ties_merge(vs, weights, election, thresholds)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # ±0 too
            untrimmed = ties_merge(vs, weights, election)
            assert torch.equal(untrimmed.view(torch.int32), ties_combine(stacked, weights, election).view(torch.int32))


def test_ties_merge_blocks_keep_non_finite_entries_as_the_formula(monkeypatch):
    from freemerge_pl.merging import ops
    from freemerge_pl.merging.methods.ties import ties_merge
    from freemerge_pl.merging.topk import magnitude_trim

    monkeypatch.setattr(ops, "COLUMNS", 64)
    vs = awkward_vectors(4, 300, seed=9)
    vs[1][[10, 100]] = torch.tensor([math.inf, -math.inf])
    vs[2][200] = math.nan
    thresholds = torch.tensor([1e-4, 2e-4, math.nan, math.inf])
    want = ties_combine(magnitude_trim(torch.stack(vs), 0.3, thresholds), torch.ones(4))
    got = ties_merge(vs, torch.ones(4), "unweighted", thresholds)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("n", [5, 129, 64 * 5 + 5, 64 * 6 + 17, 64 * 9 + 40])
def test_emr_unify_blocks_equal_the_whole_stack(monkeypatch, K, n):
    from freemerge_pl.merging import ops

    monkeypatch.setattr(ops, "COLUMNS", 64)
    vs = awkward_vectors(K, n, seed=n)
    if K > 2:
        vs[0][50:60] = 1e-3
        vs[1][50:60] = -1e-3  # Σ v may cancel to 0: flag 0
        vs[2][50:60] = 0.0
    stacked = torch.stack(vs)
    flag = torch.sign(stacked.sum(0))
    masks = (stacked * flag) > 0
    tau = flag * torch.where(masks, stacked.abs(), torch.zeros_like(stacked)).amax(0)
    got_tau, got_masks = emr_unify(vs)
    assert torch.equal(got_tau.view(torch.int32), tau.view(torch.int32)) and torch.equal(got_masks, masks)


# ---------------------------------------------------------------- PCB: float64 sums from one buffer, drop by threshold


def test_pcb_exp_sums_equal_a_float64_sum_of_each_block(monkeypatch):
    """The softmax denominators summed from one reused float64 buffer equal the per-pair formula's exponentials
    summed block by block with ``sum(dtype=float64)``, bit for bit, ragged last block included."""
    monkeypatch.setattr(pcb, "_BLOCK", 64)
    K, n = 5, 333
    flat = pcb_tensor(K, n, seed=11)
    stats = pcb.PCBPaperStats(torch.full((K, K), math.inf, dtype=torch.float64),
                              torch.full((K, K), -math.inf, dtype=torch.float64))
    pcb.pcb_minmax(flat, stats)
    stats.z_intra, stats.z_inter = torch.zeros(K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
    pcb.pcb_exp_sums(flat, stats)
    # each block's float64 sums of the per-pair formula's exponentials (min/max from the naive per-pair pass)
    lo, hi, _, _ = naive_pcb_stats(flat)
    intra = torch.zeros(K, dtype=torch.float64)
    inter = torch.zeros(K, K, dtype=torch.float64)
    for s in range(0, n, 64):
        block = flat[:, s:s + 64]
        for i in range(K):
            intra[i] += naive_exponents(block, lo, hi, i, i, K).sum(dtype=torch.float64)
            for j in range(i, K):
                inter[i, j] += naive_exponents(block, lo, hi, i, j, 1).sum(dtype=torch.float64)
    assert torch.equal(stats.z_intra, intra)
    assert torch.equal(stats.z_inter, torch.triu(inter) + torch.triu(inter, 1).T)


def keyed_rows(x: torch.Tensor, key: str) -> pcb.KeyRows:
    """A key's rows as the merge receives them (``KeyRows``), without building a ``KeyTensors``."""
    rows = pcb.KeyRows.__new__(pcb.KeyRows)
    rows.extend(x)
    rows.key = key
    return rows


@pytest.mark.parametrize("case", ["finite", "nan_beta", "inf_beta", "nan_threshold", "inf_threshold", "zero"])
def test_pcb_merge_drop_equals_the_where_formula(case):
    """β̂ = β where β ≥ its threshold, else 0: ``threshold`` against the float32 just below t, falling back to
    the comparison for NaN; the merge equals the whole-tensor formula bit for bit."""
    g = torch.Generator().manual_seed(4)
    K, n = 4, 500
    x = torch.randn(K, n, generator=g)
    beta = torch.rand(K, n, generator=g)
    beta[:, :20] = 0.0
    beta[1, 30:40] = 0.5  # ties at the threshold
    thresholds = torch.tensor([0.5, 0.5, 0.9, 0.1])
    if case == "nan_beta":
        beta[2, 7] = math.nan
    elif case == "inf_beta":
        beta[0, 9] = math.inf
    elif case == "nan_threshold":
        thresholds[1] = math.nan
    elif case == "inf_threshold":
        thresholds[3] = math.inf
    elif case == "zero":
        thresholds[0] = 0.0
    kept = torch.where(beta >= thresholds[:, None], beta, torch.zeros_like(beta))
    num, total = (kept * x).sum(0), kept.sum(0)
    want = torch.where(total > 0, num / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    stats = pcb.PCBPaperStats(torch.zeros(K, K), torch.zeros(K, K), thresholds=thresholds,
                              betas={"w": beta.clone()})
    got = pcb.pcb_paper_merge(keyed_rows(x, "w"), stats)
    assert not stats.betas  # the kept β was used (and dropped)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
