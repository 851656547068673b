"""FR-Merging (Eq. 1-3) against a straightforward per-task reference: filter each v_k, then Σ λ_k G(v_k)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import merge
from freemerge_pl.merging.engine import merge_task_vectors
from freemerge_pl.merging.merge import prefilter
from freemerge_pl.merging.methods.fr import FREEMerging, FRMerging, energy_lambdas, fr_merge_tensor

SHAPES = {
    "square": (8, 8),
    "odd": (7, 5),
    "even_odd": (6, 9),
    "conv3d": (4, 3, 5),
    "conv4d": (6, 3, 2, 2),
    "bias": (10,),
    "scalar_row": (1, 6),
}


def reference_filter(v: torch.Tensor, ratio: float, mode: str = "fraction", filter_1d: bool = False):
    """One task's G(v) written out: full fftn → fftshift → brute-force D0 → zero < D0 → back, float64."""
    if ratio == 0 or (v.dim() < 2 and not filter_1d):
        return v.double()
    x = v.double().numpy()
    x = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x
    spec = np.fft.fftshift(np.fft.fftn(x))
    grids = np.indices(x.shape)
    dist = np.sqrt(sum((g - n // 2) ** 2 for g, n in zip(grids, x.shape)).astype(np.float64))
    ordered = np.sort(dist.ravel())
    if mode == "fraction":
        # FILTER-DEF as refined in fourier.py: D0 = the (k+1)-th smallest distance, k = ⌈r·N⌉ (+inf if k ≥ N)
        k = math.ceil(Fraction(str(ratio)) * dist.size)
        d0 = ordered[k] if k < dist.size else np.inf
    else:
        d0 = ratio * ordered[-1]
    spec[dist < d0] = 0
    return torch.from_numpy(np.real(np.fft.ifftn(np.fft.ifftshift(spec)))).reshape(v.shape)


def reference_lambdas(tvs, keys=None):
    """λ_k = mean|v_k| over all entries of the model (or of ``keys``) / Σ_j mean|v_j|."""
    keys = keys or list(tvs[0])
    means = [torch.cat([tv[k].double().reshape(-1) for k in keys]).abs().mean() for tv in tvs]
    total = sum(means)
    return [float(m / total) for m in means]


def reference_fr(tvs, ratio, *, mode="fraction", lambda_scope="model", filter_1d=False, scaling=1.0):
    out = {}
    lam_model = reference_lambdas(tvs)
    for key in tvs[0]:
        lam = lam_model if lambda_scope == "model" else reference_lambdas(tvs, [key])
        out[key] = scaling * sum(lk * reference_filter(tv[key], ratio, mode, filter_1d) for lk, tv in zip(lam, tvs))
    return out


def random_task_vectors(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # tasks of different magnitudes so the λ's differ
    return [{k: (0.5 + t) * torch.randn(s, generator=g) for k, s in SHAPES.items()} for t in range(n_tasks)]


def assert_rel(actual, expected, tol=1e-5):
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("mode", ["fraction", "radius"])
@pytest.mark.parametrize("lambda_scope", ["model", "tensor"])
@pytest.mark.parametrize("filter_1d", [False, True])
def test_fr_merging_matches_per_task_reference(ratio, mode, lambda_scope, filter_1d):
    tvs = random_task_vectors()
    method = FRMerging(filter_ratio=ratio, cutoff_mode=mode, lambda_scope=lambda_scope, filter_1d=filter_1d)
    result = merge_task_vectors(method, tvs)
    expected = reference_fr(tvs, ratio, mode=mode, lambda_scope=lambda_scope, filter_1d=filter_1d)
    assert set(result.delta) == set(expected)
    for key in expected:
        assert result.delta[key].shape == expected[key].shape
        assert_rel(result.delta[key], expected[key])
    if not filter_1d:
        torch.testing.assert_close(result.delta["bias"].double(), expected["bias"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", list(SHAPES.values()))
def test_fr_merge_tensor_matches_reference(shape):
    vs = [torch.randn(shape) * (k + 1) for k in range(4)]
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = fr_merge_tensor(vs, lam, filter_ratio=0.4, filter_1d=True)
    expected = sum(float(lk) * reference_filter(v, 0.4, filter_1d=True) for lk, v in zip(lam, vs))
    assert_rel(out, expected)
    # a pre-stacked [K, ...] tensor gives the same answer
    torch.testing.assert_close(fr_merge_tensor(torch.stack(vs), lam, filter_ratio=0.4, filter_1d=True), out)


def test_lambdas_are_eq3_energy_ratios():
    tvs = random_task_vectors(4)
    lam = energy_lambdas(tvs)
    torch.testing.assert_close(lam, torch.tensor(reference_lambdas(tvs), dtype=torch.float64))
    assert float(lam.sum()) == pytest.approx(1.0)
    per_key = energy_lambdas(tvs, scope="tensor")
    for key in SHAPES:
        torch.testing.assert_close(per_key[key], torch.tensor(reference_lambdas(tvs, [key]), dtype=torch.float64))
    result = merge_task_vectors(FRMerging(), tvs)
    assert result.info["lambdas"] == pytest.approx(reference_lambdas(tvs))


def test_lambdas_hand_worked():
    # task 1: |v| = 1, 3 (mean 2); task 2: |v| = 2, 0 (mean 1) → λ = 2/3, 1/3
    tvs = [{"w": torch.tensor([1.0, -3.0])}, {"w": torch.tensor([-2.0, 0.0])}]
    torch.testing.assert_close(energy_lambdas(tvs), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    # a key where every task vector is zero gets equal λ's at tensor scope
    tvs = [{"w": torch.zeros(3)}, {"w": torch.zeros(3)}]
    torch.testing.assert_close(energy_lambdas(tvs, scope="tensor")["w"], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_zero_cutoff_is_task_arithmetic_with_the_same_lambdas():
    tvs = random_task_vectors()
    lam = reference_lambdas(tvs)
    result = merge_task_vectors(FRMerging(filter_ratio=0.0), tvs)
    for key in SHAPES:
        expected = sum(lk * tv[key].double() for lk, tv in zip(lam, tvs))
        torch.testing.assert_close(result.delta[key].double(), expected, rtol=1e-6, atol=1e-6)


def test_scaling_multiplies_the_delta():
    tvs = random_task_vectors()
    base = merge_task_vectors(FRMerging(filter_ratio=0.3), tvs).delta
    scaled = merge_task_vectors(FRMerging(filter_ratio=0.3, scaling=2.5), tvs).delta
    for key in base:
        torch.testing.assert_close(scaled[key], 2.5 * base[key], rtol=1e-6, atol=1e-7)


def test_constant_task_vectors_are_removed():
    tvs = [{"w": torch.full((6, 8), c), "b": torch.full((5,), c)} for c in (0.5, -2.0, 1.0)]
    delta = merge_task_vectors(FRMerging(filter_ratio=0.1), tvs).delta
    assert delta["w"].abs().max() < 1e-6
    # 1-D: kept by default (merged with its λ), removed with filter_1d
    lam = reference_lambdas(tvs)
    assert float(delta["b"][0]) == pytest.approx(sum(lk * c for lk, c in zip(lam, (0.5, -2.0, 1.0))), rel=1e-6)
    assert merge_task_vectors(FRMerging(filter_ratio=0.3, filter_1d=True), tvs).delta["b"].abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_keeps_low_precision_dtype_with_fp32_maths(dtype):
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(12, 10, generator=g).to(dtype), "b": torch.randn(10, generator=g).to(dtype),
           "position_ids": torch.arange(7), "flag": torch.tensor([True, False])}
    fts = []
    for t in range(3):
        ft = {k: v.clone() for k, v in pre.items()}
        ft["w"] = (pre["w"].float() + 0.05 * (t + 1) * torch.randn(12, 10, generator=g)).to(dtype)
        ft["b"] = (pre["b"].float() + 0.05 * torch.randn(10, generator=g)).to(dtype)
        ft["position_ids"] = torch.arange(7) + 100  # integer buffers are copied from θ_pre, never merged
        ft["flag"] = torch.tensor([False, True])
        fts.append(ft)
    out = merge(pre, fts, "fr_merging", filter_ratio=0.3)
    sd = out.state_dict
    assert sd["w"].dtype == dtype and sd["b"].dtype == dtype
    assert torch.equal(sd["position_ids"], pre["position_ids"]) and sd["position_ids"].dtype == torch.int64
    assert torch.equal(sd["flag"], pre["flag"])
    tvs = [{k: ft[k].double() - pre[k].double() for k in ("w", "b")} for ft in fts]
    ref = reference_fr(tvs, 0.3)
    for key in ("w", "b"):
        expected = (pre[key].double() + ref[key]).to(dtype)
        # equal up to one rounding step of the storage dtype at rounding boundaries
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(sd[key].double(), expected.double(), rtol=eps, atol=eps * 1e-3)
        assert (sd[key] == expected).float().mean() > 0.97


def test_free_merging_backbone_is_fr_and_experts_per_task():
    tvs = random_task_vectors()
    fr = merge_task_vectors(FRMerging(filter_ratio=0.3), tvs)
    free = merge_task_vectors(FREEMerging(filter_ratio=0.3, expert_density=0.25), tvs)
    for key in fr.delta:
        torch.testing.assert_close(free.delta[key], fr.delta[key])
    assert len(free.task_modules) == 3
    assert len(free.info["mu"]) == 3


def test_merge_expert_dtype_none_keeps_the_model_dtype_and_the_default_is_bfloat16():
    pre = {"w": torch.randn(8, 8).to(torch.bfloat16), "b": torch.randn(8).to(torch.float16)}
    fts = [{k: v + 0.1 * torch.randn(v.shape).to(v.dtype) for k, v in pre.items()} for _ in range(2)]
    experts = merge(pre, fts, "free_merging", expert_density=0.25, expert_dtype=None).task_modules
    for e in experts:
        assert e.entries("w")[1].dtype == torch.bfloat16 and e.entries("b")[1].dtype == torch.float16
    experts = merge(pre, fts, "free_merging", expert_density=0.25, expert_dtype="float32").task_modules
    assert all(e.entries("w")[1].dtype == torch.float32 for e in experts)
    pre32 = {k: v.float() for k, v in pre.items()}
    default = merge(pre32, [{k: v.float() for k, v in ft.items()} for ft in fts], "free_merging",
                    expert_density=0.25).task_modules
    exact = merge(pre32, [{k: v.float() for k, v in ft.items()} for ft in fts], "free_merging",
                  expert_density=0.25, expert_dtype="float32").task_modules
    for e, f in zip(default, exact):  # float32 checkpoints: the values rounded once to bfloat16, same entries
        for key in ("w", "b"):
            assert e.entries(key)[1].dtype == torch.bfloat16
            assert torch.equal(e.entries(key)[0], f.entries(key)[0])
            assert torch.equal(e.entries(key)[1], f.entries(key)[1].to(torch.bfloat16))


def test_prefilter_filters_each_task_vector():
    tvs = random_task_vectors(2)
    out = prefilter(tvs, 0.3)
    for tv, ftv in zip(tvs, out):
        for key in tv:
            assert_rel(ftv[key], reference_filter(tv[key], 0.3))
    assert prefilter(tvs, 0.0) is tvs


@pytest.mark.parametrize("ratio", [-0.01, 1.0, 2.0])
def test_out_of_range_filter_ratio(ratio):
    tvs = random_task_vectors(2)
    with pytest.raises(HyperparameterError,
                       match=r"fr_merging\.filter_ratio=.* is outside its accepted range \[0, 1\)"):
        merge_task_vectors(FRMerging(filter_ratio=ratio), tvs)
    pre = {"w": torch.zeros(4, 4)}
    with pytest.raises(HyperparameterError, match="filter_ratio"):
        merge(pre, [{"w": torch.ones(4, 4)}], "fr_merging", filter_ratio=ratio)
    with pytest.raises(HyperparameterError, match="filter_ratio"):
        merge(pre, [{"w": torch.ones(4, 4)}], "free_merging", fr_filter_ratio=ratio)


def test_bad_scopes_and_modes():
    tvs = random_task_vectors(2)
    with pytest.raises(ConfigError, match=r"fr_merging\.lambda_scope='layer'; accepted: \['model', 'tensor'\]"):
        merge_task_vectors(FRMerging(lambda_scope="layer"), tvs)
    with pytest.raises(ConfigError, match="fr_merging.cutoff_mode='disk'"):
        merge_task_vectors(FRMerging(cutoff_mode="disk"), tvs)
    with pytest.raises(ConfigError, match="free_merging.expert_scope='row'"):
        merge_task_vectors(FREEMerging(expert_scope="row"), tvs)
