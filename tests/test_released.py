"""The ``released_code`` preset against a deliberately naive transcription of DESIGN §9.

The transcription below follows the released code's structure (github.com/Zhengsh123/FREE-Merging@36c0f41):
two spectral masks built by plain loops and inverted separately, per-task filtered copies aligned in
place, Python ``sum`` with the first-task quirk, sorted per-row top-k, ``sum_two`` as ``np.where``. It
uses numpy float64 only and nothing from ``freemerge_pl.merging.methods.released``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer

from freemerge_pl.errors import ConfigError
from freemerge_pl.merging.engine import merge_task_vectors
from freemerge_pl.merging.methods.released import (
    FREEMergingReleased,
    FRMergingReleased,
    released_filter_mask,
    released_highpass,
)
from freemerge_pl.merging.topk import released_expert_indices

# ---------------------------------------------------------------------------------------------- transcription

_MASKS: dict = {}


def naive_masks(height, width, rho):
    """([dist ≤ R_low], [R_low ≤ dist ≤ R_high]) over the unshifted spectrum, centre (H//2, W//2)."""
    if (height, width, rho) not in _MASKS:
        low = min(height, width) // 10
        high = min(height, width) * rho
        inner = np.zeros((height, width))
        band = np.zeros((height, width))
        for i in range(height):
            for j in range(width):
                d = math.sqrt((i - height // 2) ** 2 + (j - width // 2) ** 2)
                if d <= low:
                    inner[i, j] = 1.0
                if low <= d <= high:
                    band[i, j] = 1.0
        _MASKS[(height, width, rho)] = (inner, band)
    return _MASKS[(height, width, rho)]


def naive_filter(v, rho):
    inner, band = naive_masks(*v.shape, rho)
    spectrum = np.fft.fft2(v)
    return np.fft.ifft2(spectrum * band).real + np.fft.ifft2(spectrum * inner).real


def naive_row_topk(v, keep, remove=0.0):
    """TaskVectorMiddleKeep / TaskVectorBREAD: per last-dim row drop the top int(remove·W), keep the top int(keep·W)."""
    if v.ndim == 0:
        return v.copy()
    width = v.shape[-1]
    rows = v.reshape(-1, width)
    out = np.zeros_like(rows)
    for r in range(rows.shape[0]):
        row = rows[r].copy()
        for j in sorted(range(width), key=lambda j: -abs(row[j]))[: int(width * remove)]:
            row[j] = 0.0
        for j in sorted(range(width), key=lambda j: -abs(row[j]))[: int(width * keep)]:
            out[r, j] = row[j]
    return out.reshape(v.shape)


def naive_vit(pre, fts, *, method, rho=0.7, align, s, d=0.01, quirk=True):
    """FR: the merged model. FREE: (one model per task, μ)."""
    keys = list(pre)

    def changed(k):
        return "attn" in k or "mlp" in k

    def weight_key(k):
        return "weight" in k and changed(k)

    tvs = [{k: ft[k] - pre[k] for k in keys} for ft in fts]
    shared = [{k: naive_filter(v, rho) if weight_key(k) else v.copy() for k, v in tv.items()} for tv in tvs]
    if align:
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in keys:
                means = np.array([np.mean(np.abs(sh[k])) for sh in shared])
                ratios = 1 / (means / means.max())
                for sh, ratio in zip(shared, ratios):
                    sh[k] = sh[k] * ratio
    total = {k: (sum(sh[k] for sh in shared) if weight_key(k) or not quirk else shared[0][k]) for k in keys}
    if method == "fr":
        return {k: pre[k] + s * total[k] if changed(k) else pre[k] for k in keys}
    experts = [{k: naive_row_topk(v, d) for k, v in tv.items()} for tv in tvs]
    a = [np.mean([np.mean(np.abs(e[k])) for k in keys]) for e in experts]
    b = [np.mean([np.mean(np.abs(sh[k])) for k in keys]) for sh in shared]
    mu = [-math.log10(d) * ai / (d * bi) for ai, bi in zip(a, b)]
    models = []
    for expert, mu_i in zip(experts, mu):
        theta = {}
        for k in keys:
            if not changed(k):
                theta[k] = pre[k]
                continue
            private = mu_i * expert[k] if weight_key(k) else expert[k]
            common = s * total[k] if weight_key(k) else total[k]
            theta[k] = pre[k] + s * np.where(private != 0, private, common)
        models.append(theta)
    return models, mu


def naive_glue(pre, fts, *, method, rho=0.7, s=0.5, shared_scale=0.2, expert_scale=10.0, d=0.02, remove=0.0):
    keys = list(pre)

    def filtered(k):
        return "weight" in k and pre[k].ndim == 2

    tvs = [{k: ft[k] - pre[k] for k in keys} for ft in fts]
    shared = [{k: naive_filter(v, rho) if filtered(k) else v.copy() for k, v in tv.items()} for tv in tvs]
    total = {k: sum(sh[k] for sh in shared) for k in keys}
    if method == "fr":
        return {k: pre[k] + s * total[k] if filtered(k) else pre[k] for k in keys}
    return [{k: pre[k] + (shared_scale * total[k] + expert_scale * naive_row_topk(tv[k], d, remove))
             for k in keys} for tv in tvs]


# ---------------------------------------------------------------------------------------------- fixtures


def vit_checkpoints(n_tasks=3, zero_key=True):
    """A tiny open_clip ViT keyed like the task_vectors ImageEncoder (``model.visual.*``), float64."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, width=16, layers=2, heads=2, mlp_ratio=2.0,
                              output_dim=8)
    pre = {f"model.visual.{k}": v.double() for k, v in model.state_dict().items()}
    pre["model.logit_scale"] = torch.tensor(4.6, dtype=torch.float64)  # 0-d: kept whole by the expert
    if zero_key:
        pre["model.ln_final.weight"] = torch.ones(16, dtype=torch.float64)  # never fine-tuned: zero delta
    gen = torch.Generator().manual_seed(1)
    fts = []
    for i in range(n_tasks):
        ft = {k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen, dtype=torch.float64)
              for k, v in pre.items()}
        if zero_key:
            ft["model.ln_final.weight"] = pre["model.ln_final.weight"].clone()
        fts.append(ft)
    return pre, fts


GLUE_SHAPES = {
    "roberta.embeddings.word_embeddings.weight": (40, 16),
    "roberta.embeddings.token_type_embeddings.weight": (1, 16),
    "roberta.embeddings.LayerNorm.weight": (16,),
    "roberta.embeddings.LayerNorm.bias": (16,),
    "roberta.encoder.layer.0.attention.self.query.weight": (16, 16),
    "roberta.encoder.layer.0.attention.self.query.bias": (16,),
    "roberta.encoder.layer.0.intermediate.dense.weight": (64, 16),
    "roberta.encoder.layer.0.intermediate.dense.bias": (64,),
    "roberta.encoder.layer.0.output.dense.weight": (16, 64),
}


def glue_checkpoints(n_tasks=3):
    gen = torch.Generator().manual_seed(2)
    pre = {k: torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in GLUE_SHAPES.items()}
    fts = [{k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen, dtype=torch.float64)
            for k, v in pre.items()} for i in range(n_tasks)]
    return pre, fts


def task_vectors(pre, fts):
    return [{k: ft[k] - pre[k] for k in pre} for ft in fts]


def as_numpy(sd):
    return {k: v.numpy() for k, v in sd.items()}


def assert_rel_close(actual: torch.Tensor, expected, rel: float, what: str = ""):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    err = float((actual.double() - expected).abs().max()) if expected.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-300), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def effective_models(pre, result):
    """(via SparseExpert.apply_, exact float64 scatter-add) per task: backbone + expert."""
    backbone = {k: pre[k] + result.delta[k] for k in pre}
    out = []
    for expert in result.task_modules:
        applied = {k: t.clone() for k, t in backbone.items()}
        expert.apply_(applied, 1.0)
        exact = {k: t.clone() for k, t in backbone.items()}
        for key in expert.keys:
            idx, values = expert.entries(key)
            exact[key].view(-1)[idx.long()] += values.double()
        out.append((applied, exact))
    return out


# ---------------------------------------------------------------------------------------------- filter geometry


def kept(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in torch.nonzero(mask > 0).tolist()}


def test_mask_6x8_hand_listed():
    # 6×8, ρ = 0.7: centre (3, 4), R_low = 6//10 = 0, R_high = 4.2, so keep (i−3)² + (j−4)² ≤ 17.
    # i=0 (di²=9): dj² ≤ 8 -> j 2..6; i=1,5 (4): dj² ≤ 13 -> j 1..7; i=2,3,4 (≤1): dj² ≤ 16 -> every j.
    expected = (
        {(0, j) for j in (2, 3, 4, 5, 6)}
        | {(1, j) for j in (1, 2, 3, 4, 5, 6, 7)}
        | {(2, j) for j in (0, 1, 2, 3, 4, 5, 6, 7)}
        | {(3, j) for j in (0, 1, 2, 3, 4, 5, 6, 7)}
        | {(4, j) for j in (0, 1, 2, 3, 4, 5, 6, 7)}
        | {(5, j) for j in (1, 2, 3, 4, 5, 6, 7)}
    )
    mask = released_filter_mask((6, 8), 0.7)
    assert kept(mask) == expected and len(expected) == 43
    # The "ring" at R_low = 0 is the centre point: counted twice.
    assert mask[3, 4] == 2 and int((mask == 2).sum()) == 1
    # ρ = 0.5: R_high = 3, keep (i−3)² + (j−4)² ≤ 9: i=0 only j=4; i=1,2,4,5: dj² ≤ 5 resp. 8 -> j 2..6;
    # i=3: dj² ≤ 9 -> j 1..7.
    expected_half = ({(0, 4)} | {(i, j) for i in (1, 2, 4, 5) for j in (2, 3, 4, 5, 6)}
                     | {(3, j) for j in (1, 2, 3, 4, 5, 6, 7)})
    assert kept(released_filter_mask((6, 8), 0.5)) == expected_half


def test_mask_12x4_hand_listed():
    # 12×4, ρ = 0.7: centre (6, 2), R_low = 0, R_high = 2.8, keep (i−6)² + (j−2)² ≤ 7 (dj ∈ −2..1).
    # |di| ≥ 3 never; i=4,8 (di²=4): dj² ≤ 3 -> j 1..3; i=5,6,7 (≤1): dj² ≤ 6 -> every j.
    # Only 5 of the 12 rows survive: the long axis loses most of its rows.
    expected = ({(i, j) for i in (4, 8) for j in (1, 2, 3)}
                | {(i, j) for i in (5, 6, 7) for j in (0, 1, 2, 3)})
    mask = released_filter_mask((12, 4), 0.7)
    assert kept(mask) == expected and len(expected) == 18
    assert mask[6, 2] == 2 and int((mask == 2).sum()) == 1


def test_ring_at_low_radius_is_doubled():
    # 20×20: R_low = 2, centre (10, 10); distance exactly 2 only at the four axis points.
    mask = released_filter_mask((20, 20), 0.7)
    doubled = {(int(i), int(j)) for i, j in torch.nonzero(mask == 2).tolist()}
    assert doubled == {(8, 10), (12, 10), (10, 8), (10, 12)}
    # R_high = 14: only the corner (0, 0), at distance √200 ≈ 14.14, falls outside.
    assert {(int(i), int(j)) for i, j in torch.nonzero(mask == 0).tolist()} == {(0, 0)}
    # ρ·min below R_low: the released code still keeps the disk dist ≤ R_low, ring counted once.
    small = released_filter_mask((20, 20), 0.05)
    expected = {(i, j) for i in range(20) for j in range(20) if (i - 10) ** 2 + (j - 10) ** 2 <= 4}
    assert kept(small) == expected and set(small.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("n", [3, 8, 9, 16, 21])
def test_rho_one_keeps_everything_on_a_square(n):
    assert bool((released_filter_mask((n, n), 1.0) >= 1).all())


@pytest.mark.parametrize("shape", [(6, 8), (12, 4), (7, 5), (9, 12), (20, 20), (1, 16), (48, 16)])
@pytest.mark.parametrize("rho", [0.7, 0.3, 1.0])
def test_highpass_matches_naive_two_mask_filter(shape, rho):
    v = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = released_highpass(v, rho)
    assert out.dtype == torch.float64 and out.shape == v.shape
    assert_rel_close(out, naive_filter(v.numpy(), rho), 1e-12, f"{shape} ρ={rho}")
    out32 = released_highpass(v.float(), rho)
    assert out32.dtype == torch.float32
    assert_rel_close(out32, naive_filter(v.numpy(), rho), 1e-5, f"{shape} ρ={rho} float32")


def test_highpass_rejects_non_2d():
    with pytest.raises(ConfigError, match="2-D"):
        released_highpass(torch.randn(5), 0.7)
    with pytest.raises(ConfigError, match=r"\(2, 3, 4\)"):
        released_highpass(torch.randn(2, 3, 4), 0.7)


def test_vit_key_pattern_rejects_non_2d_weight():
    tvs = [{"blocks.0.attn.conv.weight": torch.randn(4, 3, 2, 2)} for _ in range(2)]
    with pytest.raises(ConfigError, match="blocks.0.attn.conv.weight"):
        merge_task_vectors(FRMergingReleased(), tvs)


# ---------------------------------------------------------------------------------------------- experts


def test_expert_indices_per_row_and_small_tensors():
    v = torch.randn(3, 250, generator=torch.Generator().manual_seed(4))
    idx = released_expert_indices(v, 0.01)  # int(2.5) = 2 per row
    assert idx.numel() == 6 and (idx // 250).tolist() == [0, 0, 1, 1, 2, 2]
    for r in range(3):
        top = set(torch.topk(v[r].abs(), 2).indices.tolist())
        assert {int(i) % 250 for i in idx if i // 250 == r} == top
    assert released_expert_indices(torch.randn(99), 0.01).numel() == 0  # int(0.99) = 0
    assert released_expert_indices(torch.randn(100), 0.01).numel() == 1
    assert released_expert_indices(torch.tensor(0.3), 0.01).tolist() == [0]  # 0-d kept whole
    row = torch.tensor([[5.0, -4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.0]])
    assert released_expert_indices(row, 0.2, remove_density=0.1).tolist() == [1, 2]  # drop 5, keep -4, 3
    assert released_expert_indices(torch.zeros(2, 10), 0.5).numel() == 0  # zero entries change nothing


# ---------------------------------------------------------------------------------------------- vit profile


@pytest.mark.parametrize("align, quirk", [(True, True), (False, True), (True, False), (False, False)])
def test_vit_fr_matches_transcription(align, quirk):
    pre, fts = vit_checkpoints()
    method = FRMergingReleased(align=align, keep_first_task_bias_quirk=quirk)
    result = merge_task_vectors(method, task_vectors(pre, fts))
    assert result.info["scaling"] == 0.7 and result.info["align"] is align
    expected = naive_vit(as_numpy(pre), [as_numpy(ft) for ft in fts], method="fr", align=align, s=0.7,
                         quirk=quirk)
    for k in pre:
        assert_rel_close(pre[k] + result.delta[k], expected[k], 1e-10, k)
    if align:
        factors = result.info["alignment_factors"]["model.visual.transformer.resblocks.0.attn.in_proj_weight"]
        assert max(factors) > 1 and min(factors) == pytest.approx(1.0)


@pytest.mark.parametrize("align, quirk, density", [(False, True, 0.2), (True, False, 0.2), (False, True, 0.01)])
def test_vit_free_matches_transcription(align, quirk, density):
    pre, fts = vit_checkpoints(zero_key=not align)  # the released align turns an all-zero key into NaN
    method = FREEMergingReleased(align=align, expert_density=density, keep_first_task_bias_quirk=quirk)
    result = merge_task_vectors(method, task_vectors(pre, fts))
    models, mu = naive_vit(as_numpy(pre), [as_numpy(ft) for ft in fts], method="free", align=align, s=0.5,
                           d=density, quirk=quirk)
    assert result.info["mu"] == pytest.approx(mu, rel=1e-10)
    assert len(result.task_modules) == 3
    for i, (applied, exact) in enumerate(effective_models(pre, result)):
        for k in pre:
            assert_rel_close(exact[k], models[i][k], 1e-10, f"task {i} {k} (float64 scatter)")
            assert_rel_close(applied[k], models[i][k], 1e-6, f"task {i} {k} (apply_)")
    changed = {k for k in pre if "attn" in k or "mlp" in k}
    assert all(set(e.keys) == changed for e in result.task_modules)
    if density == 0.01:  # rows of 16-48 entries: int(d·W) = 0, no expert entries at all
        assert result.info["expert_nnz"] == [0, 0, 0]
    else:
        assert min(result.info["expert_nnz"]) > 0


def test_vit_free_float32_close_to_float64():
    pre, fts = vit_checkpoints()
    tvs = task_vectors(pre, fts)
    r64 = merge_task_vectors(FREEMergingReleased(expert_density=0.2), tvs)
    r32 = merge_task_vectors(FREEMergingReleased(expert_density=0.2),
                             [{k: v.float() for k, v in tv.items()} for tv in tvs])
    assert r32.info["mu"] == pytest.approx(r64.info["mu"], rel=1e-5)
    for k in pre:
        assert r32.delta[k].dtype == torch.float32
        assert_rel_close(r32.delta[k], r64.delta[k].numpy(), 1e-5, k)


def test_first_task_bias_quirk_on_and_off():
    pre, fts = vit_checkpoints()
    tvs = task_vectors(pre, fts)
    bias = "model.visual.transformer.resblocks.1.mlp.c_fc.bias"
    weight = "model.visual.transformer.resblocks.1.mlp.c_fc.weight"
    on = merge_task_vectors(FRMergingReleased(align=False, keep_first_task_bias_quirk=True), tvs)
    off = merge_task_vectors(FRMergingReleased(align=False, keep_first_task_bias_quirk=False), tvs)
    torch.testing.assert_close(on.delta[bias], 0.7 * tvs[0][bias], rtol=0, atol=0)
    torch.testing.assert_close(off.delta[bias], 0.7 * (tvs[0][bias] + tvs[1][bias] + tvs[2][bias]))
    torch.testing.assert_close(on.delta[weight], off.delta[weight], rtol=0, atol=0)
    assert not on.delta["model.visual.ln_pre.weight"].any()  # unchanged keys stay pre-trained
    free = merge_task_vectors(FREEMergingReleased(keep_first_task_bias_quirk=True), tvs)
    torch.testing.assert_close(free.delta[bias], 0.5 * tvs[0][bias], rtol=0, atol=0)


def test_vit_info_records_statistics():
    pre, fts = vit_checkpoints()
    result = merge_task_vectors(FREEMergingReleased(expert_density=0.2), task_vectors(pre, fts))
    info = result.info
    assert info["semantics"] == "released_code" and info["profile"] == "vit"
    assert len(info["mu"]) == len(info["expert_abs_mean"]) == len(info["shared_abs_mean"]) == 3
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in info["filtered_keys"]
    assert not any("bias" in k for k in info["filtered_keys"])


# ---------------------------------------------------------------------------------------------- glue profile


def test_glue_fr_matches_transcription():
    pre, fts = glue_checkpoints()
    result = merge_task_vectors(FRMergingReleased(profile="glue"), task_vectors(pre, fts))
    assert result.info["align"] is False and result.info["scaling"] == 0.5
    expected = naive_glue(as_numpy(pre), [as_numpy(ft) for ft in fts], method="fr")
    for k in pre:
        assert_rel_close(pre[k] + result.delta[k], expected[k], 1e-10, k)
    assert not result.delta["roberta.encoder.layer.0.attention.self.query.bias"].any()


@pytest.mark.parametrize("density, remove", [(0.02, 0.0), (0.25, 0.0), (0.25, 0.1)])
def test_glue_free_matches_transcription(density, remove):
    pre, fts = glue_checkpoints()
    method = FREEMergingReleased(profile="glue", glue_expert_density=density, glue_expert_remove=remove)
    result = merge_task_vectors(method, task_vectors(pre, fts))
    models = naive_glue(as_numpy(pre), [as_numpy(ft) for ft in fts], method="free", d=density, remove=remove)
    for i, (applied, exact) in enumerate(effective_models(pre, result)):
        for k in pre:
            assert_rel_close(exact[k], models[i][k], 1e-10, f"task {i} {k} (float64 scatter)")
            assert_rel_close(applied[k], models[i][k], 1e-6, f"task {i} {k} (apply_)")
    assert min(result.info["expert_nnz"]) > 0  # at 2%, the 64-wide rows give one entry each
