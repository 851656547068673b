"""Lightweight experts (Eq. 4): selection counts, μ on a hand-worked example, exact apply/restore, storage."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.merging import merge
from freemerge_pl.merging.experts import SparseExpert, index_dtype
from freemerge_pl.merging.topk import topk_count

LN2 = math.log(2.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (compares -0.0 / NaN payloads too)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def expected_count(numel: int, density: float) -> int:
    return max(1, math.ceil(Fraction(str(density)) * numel))


def free(task_vectors, **hyperparameters):
    """FREE-Merging through ``merge()`` (the product's path) on θ_pre = 0, so v_k = θ_k exactly; the expert
    values stay float32 (the worked examples pin them) unless a test asks for another ``expert_dtype``."""
    pre = {k: torch.zeros_like(v) for k, v in task_vectors[0].items()}
    return merge(pre, task_vectors, "free_merging", **{"expert_dtype": "float32", **hyperparameters})


@pytest.mark.parametrize(
    "numel,density",
    [(1, 0.01), (2, 0.5), (3, 0.5), (5, 0.01), (7, 1.0), (10, 0.07), (100, 0.07), (100, 0.01), (100, 0.55),
     (37, 0.3), (1000, 0.001), (4096, 0.01), (5, 1e-12)],
)
def test_topk_count_per_tensor(numel, density):
    v = torch.randn(numel)
    assert topk_count(numel, density) == expected_count(numel, density)
    for e in free([{"w": v}, {"w": -v}], expert_density=density).task_modules:
        idx, vals = e.entries("w")
        assert idx.numel() == expected_count(numel, density)
        assert len(set(idx.tolist())) == idx.numel()
        assert int((vals != 0).sum()) == expected_count(numel, density) or density == 1.0  # μ = 0 when d = 1


def test_selected_entries_are_the_largest_magnitudes():
    v = torch.randn(13, 11)
    sel = free([{"w": v}], expert_density=0.2).task_modules[0].entries("w")[0].long()
    mags = v.reshape(-1).abs()
    chosen = torch.zeros_like(mags, dtype=torch.bool)
    chosen[sel] = True
    assert int(chosen.sum()) == expected_count(v.numel(), 0.2)
    assert mags[chosen].min() > mags[~chosen].max()
    assert torch.equal(sel, torch.sort(sel).values)


def test_model_scope_uses_one_global_threshold():
    tv = {"a": torch.randn(6, 7) * 3.0, "b": torch.randn(20) * 0.2, "c": torch.randn(3, 2, 4)}
    keys = list(tv)
    density = 0.1
    # brute force: sort every |v| of the model, the ⌈d·N⌉-th largest is the threshold
    everything = sorted((abs(float(x)) for k in keys for x in tv[k].reshape(-1)), reverse=True)
    k_total = math.ceil(Fraction(str(density)) * len(everything))
    threshold = everything[k_total - 1]
    (expert,) = free([tv], expert_density=density, expert_scope="model").task_modules
    sel = {key: expert.entries(key)[0] for key in keys}
    for key in keys:
        expected = [i for i, x in enumerate(tv[key].reshape(-1).tolist()) if abs(x) >= threshold]
        assert sel[key].tolist() == expected
    assert sum(s.numel() for s in sel.values()) == k_total
    # the large-magnitude tensor takes more than its per-tensor share, the small one less
    assert sel["a"].numel() > math.ceil(density * 42) and sel["b"].numel() < math.ceil(density * 20)


def worked_example():
    """Two tasks, two tensors (a: 2×2, b: 2), N = 6 entries in the model.

    task 1: a = [[4, -1], [0, 2]], b = [1, -3]   Σ|v1| = 7 + 4 = 11, E(v1) = 11/6
    task 2: a = [[0, 2], [-1, 0]], b = [-2, 0]   Σ|v2| = 3 + 2 = 5,  E(v2) = 5/6
    """
    return [
        {"a": torch.tensor([[4.0, -1.0], [0.0, 2.0]]), "b": torch.tensor([1.0, -3.0])},
        {"a": torch.tensor([[0.0, 2.0], [-1.0, 0.0]]), "b": torch.tensor([-2.0, 0.0])},
    ]


def test_mu_worked_example_model_scope():
    tvs = worked_example()
    out = free(tvs, expert_density=0.5)
    # λ over the whole model: λ1 = (11/6)/(11/6 + 5/6) = 11/16, λ2 = 5/16
    assert out.result.info["lambdas"] == pytest.approx([11 / 16, 5 / 16], rel=1e-12)
    # d = 0.5, per tensor: a keeps ⌈0.5·4⌉ = 2 entries, b keeps ⌈0.5·2⌉ = 1.
    # task 1: M(v1) keeps a: 4 (idx 0), 2 (idx 3); b: -3 (idx 1) → Σ|M| = 9, E(M(v1)) = 9/6
    #   μ1 = −(9/6)·ln(0.5) / ((11/16)·(11/6)) = 144·ln2/121 ≈ 0.824902
    # task 2: M(v2) keeps a: 2 (idx 1), -1 (idx 2); b: -2 (idx 0) → Σ|M| = 5, E(M(v2)) = 5/6
    #   μ2 = −(5/6)·ln(0.5) / ((5/16)·(5/6)) = 16·ln2/5 ≈ 2.218071
    mu1, mu2 = 144 * LN2 / 121, 16 * LN2 / 5
    torch.testing.assert_close(torch.tensor(out.result.info["mu"], dtype=torch.float64),
                               torch.tensor([mu1, mu2], dtype=torch.float64))
    assert mu1 == pytest.approx(0.824902, abs=1e-6) and mu2 == pytest.approx(2.218071, abs=1e-6)
    e1, e2 = out.task_modules
    assert e1.entries("a")[0].tolist() == [0, 3] and e1.entries("b")[0].tolist() == [1]
    assert e2.entries("a")[0].tolist() == [1, 2] and e2.entries("b")[0].tolist() == [0]
    torch.testing.assert_close(e1.entries("a")[1], torch.tensor([4 * mu1, 2 * mu1]))
    torch.testing.assert_close(e1.entries("b")[1], torch.tensor([-3 * mu1]))
    torch.testing.assert_close(e2.entries("a")[1], torch.tensor([2 * mu2, -mu2]))
    torch.testing.assert_close(e2.entries("b")[1], torch.tensor([-2 * mu2]))
    # expert_scale multiplies every value
    scaled = free(tvs, expert_density=0.5, expert_scale=0.5).task_modules
    torch.testing.assert_close(scaled[0].entries("a")[1], torch.tensor([2 * mu1, mu1]))


def test_mu_worked_example_tensor_scope():
    tvs = worked_example()
    info = free(tvs, expert_density=0.5, lambda_scope="tensor").result.info
    # key a: E(a1) = 7/4, E(a2) = 3/4 → λ_a = (0.7, 0.3); key b: E(b1) = 2, E(b2) = 1 → λ_b = (2/3, 1/3)
    assert info["lambdas"]["a"] == pytest.approx([0.7, 0.3], rel=1e-12)
    assert info["lambdas"]["b"] == pytest.approx([2 / 3, 1 / 3], rel=1e-12)
    # μ_a1 = (6/4)·ln2 / (0.7·7/4) = 6·ln2/4.9     μ_a2 = (3/4)·ln2 / (0.3·3/4) = ln2/0.3
    # μ_b1 = (3/2)·ln2 / ((2/3)·2) = 1.125·ln2     μ_b2 = (2/2)·ln2 / ((1/3)·1) = 3·ln2
    torch.testing.assert_close(torch.tensor(info["mu"]["a"], dtype=torch.float64),
                               torch.tensor([6 * LN2 / 4.9, LN2 / 0.3], dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(info["mu"]["b"], dtype=torch.float64),
                               torch.tensor([1.125 * LN2, 3 * LN2], dtype=torch.float64))


def test_mu_is_of_order_one_for_realistic_settings():
    """DESIGN §8: with d = 1%, K = 8 Gaussian task vectors, μ ≈ −ln(d)·d·mean|top-d| / (λ·mean|v|) ≈ 1–3."""
    out = free([{"w": torch.randn(64, 64)} for _ in range(8)], expert_density=0.01)
    mu = torch.tensor(out.result.info["mu"])
    assert bool(((mu > 1) & (mu < 3)).all())


def test_index_dtype_and_storage_accounting():
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    tvs = [{"a": torch.randn(30, 10), "b": torch.randn(25)}]
    for value_dtype, value_bytes in [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)]:
        (e,) = free(tvs, expert_density=0.1, expert_dtype=str(value_dtype).removeprefix("torch."),
                    expert_index_encoding="flat").task_modules
        assert e.entries("a")[0].dtype == torch.int32 and e.entries("a")[1].dtype == value_dtype
        assert e.nnz == 30 + 3
        assert e.nbytes == 33 * (4 + value_bytes)


def model_and_experts(dtype):
    """A small net and two FREE experts for it through ``merge()``: values stored in the net's dtype."""
    net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)).to(dtype)
    pre = {k: p.detach().clone() for k, p in net.named_parameters()}
    fts = [{k: (p.float() + torch.randn(p.shape)).to(dtype) for k, p in pre.items()} for _ in range(2)]
    experts = merge(pre, fts, "free_merging", expert_density=0.3, expert_index_encoding="flat",
                    expert_dtype=None).task_modules
    assert all(e.entries(k)[1].dtype == dtype for e in experts for k in pre)
    return net, experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["module", "state_dict"])
def test_apply_and_restore_are_exact(dtype, target_kind):
    net, (e1, e2) = model_and_experts(dtype)
    target = net if target_kind == "module" else {k: v.clone() for k, v in net.state_dict().items()}

    def current():
        return dict(net.named_parameters()) if target_kind == "module" else target

    before = {k: bits(v.detach()) for k, v in current().items()}
    originals = {k: v.detach().clone() for k, v in current().items()}

    e1.apply_(target, 0.7)
    for key in e1.keys:
        t = current()[key].detach().reshape(-1)
        idx, vals = e1.entries(key)
        idx = idx.long()
        expected = (originals[key].reshape(-1)[idx].float() + 0.7 * vals.float()).to(dtype)
        assert torch.equal(bits(t[idx]), bits(expected))
        untouched = torch.ones(t.numel(), dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(bits(t[untouched]), bits(originals[key].reshape(-1)[untouched]))
    e2.apply_(target, 1.0)
    e2.restore_(target)
    e1.restore_(target)
    for key, b in before.items():
        assert torch.equal(bits(current()[key].detach()), b), key
    with pytest.raises(RuntimeError, match="without a matching apply_"):
        e1.restore_(target)


def test_stacked_apply_restore_lifo_on_a_module_through_forward():
    net, (e1, e2) = model_and_experts(torch.float32)
    x = torch.randn(4, 6)
    y0 = net(x)
    e1.apply_(net)
    y1 = net(x)
    e2.apply_(net, 0.5)
    assert not torch.equal(net(x), y1)
    e2.restore_(net)
    assert torch.equal(net(x), y1)
    e1.restore_(net)
    assert torch.equal(net(x), y0)


def test_apply_on_a_target_missing_a_key_changes_nothing():
    net, (e1, _) = model_and_experts(torch.float32)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    missing = e1.keys[-1]
    partial = {k: v for k, v in sd.items() if k != missing}
    snapshot = {k: v.clone() for k, v in partial.items()}
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        e1.apply_(partial)
    for k, v in partial.items():
        assert torch.equal(v, snapshot[k])


def test_dense_delta_equals_scattered_values():
    net, (e1, _) = model_and_experts(torch.float32)
    delta = e1.dense_delta(net.state_dict())
    for key in e1.keys:
        idx, vals = e1.entries(key)
        expected = torch.zeros(delta[key].numel())
        expected[idx.long()] = vals
        torch.testing.assert_close(delta[key].reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_safetensors_round_trip(tmp_path):
    net, (e1, _) = model_and_experts(torch.bfloat16)
    path = tmp_path / "experts" / "expert_00.safetensors"
    from freemerge_pl.io.export import read_task_module, save_task_module

    save_task_module(e1, path, metadata={"task": "mnist"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["expert_00.safetensors"]
    loaded = read_task_module(path)
    assert sorted(loaded.keys) == sorted(e1.keys)
    for key in e1.keys:
        (i0, v0), (i1, v1) = e1.entries(key), loaded.entries(key)
        assert i1.dtype == torch.int32 and v1.dtype == torch.bfloat16
        assert torch.equal(i0, i1) and torch.equal(bits(v0), bits(v1))
    assert loaded.nbytes == e1.nbytes
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v.clone() for k, v in net.state_dict().items()}
    e1.apply_(a)
    loaded.apply_(b)
    for k, value in a.items():
        assert torch.equal(bits(value), bits(b[k]))


def test_experts_are_buffers_that_follow_the_module():
    _, experts = model_and_experts(torch.float32)
    holder = nn.Module()
    holder.experts = nn.ModuleList(experts)
    sd = holder.state_dict()
    assert "experts.0.indices_0" in sd and "experts.1.values_2" in sd and "experts.0._extra_state" in sd
    assert not list(holder.parameters())
    holder.to(torch.float16)
    for e in experts:
        idx, vals = e.entries(e.keys[0])
        assert idx.dtype == torch.int32 and vals.dtype == torch.float16
    holder.to("meta")
    assert all(b.device.type == "meta" for b in holder.buffers())


def test_state_dict_round_trip_into_a_fresh_expert():
    _, (e1, _) = model_and_experts(torch.float32)
    fresh = SparseExpert({k: (torch.zeros_like(i), torch.zeros_like(v)) for k in e1.keys
                          for i, v in [e1.entries(k)]})
    fresh.load_state_dict(e1.state_dict())
    for key in e1.keys:
        assert torch.equal(fresh.entries(key)[0], e1.entries(key)[0])
        assert torch.equal(fresh.entries(key)[1], e1.entries(key)[1])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_density_outside_unit_interval(density):
    tvs = worked_example()
    with pytest.raises(HyperparameterError, match=r"free_merging\.expert_density=.* is outside its accepted range "
                                                  r"\(0, 1\]"):
        free(tvs, expert_density=density)


def test_density_one_keeps_everything():
    tvs = worked_example()
    out = free(tvs, expert_density=1.0)
    experts, mu = out.task_modules, torch.tensor(out.result.info["mu"], dtype=torch.float64)
    assert experts[0].nnz == 6
    assert torch.equal(mu, torch.zeros(2, dtype=torch.float64))  # −ln(1) = 0


def test_free_model_scope_experts_keep_every_tie_at_the_global_threshold():
    # |v| values 3, 2, 2, 2, 1, 1 over the model; d = 1/3 → ⌈2⌉ = 2 kept → threshold 2: all three 2s kept
    tvs = [{"a": torch.tensor([3.0, -2.0, 1.0]), "b": torch.tensor([2.0, 2.0, -1.0])}]
    experts = free(tvs, expert_density=1 / 3, expert_scope="model").task_modules[0]
    assert experts.entries("a")[0].tolist() == [0, 1] and experts.entries("b")[0].tolist() == [0, 1]
    per_tensor = free(tvs, expert_density=1 / 3).task_modules[0]  # ⌈1⌉ per tensor, first tie by index
    assert per_tensor.entries("a")[0].tolist() == [0] and per_tensor.entries("b")[0].tolist() == [0]


# ---------------------------------------------------------------------------------------------- compact storage
def _index_sets(numel: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random and adversarial sorted index sets of a tensor of ``numel`` entries."""
    sets = {"empty": torch.zeros(0, dtype=torch.long), "full": torch.arange(numel), "first": torch.tensor([0]),
            "last": torch.tensor([numel - 1]), "first_and_last": torch.tensor(sorted({0, numel - 1}))}
    for d in (0.001, 0.01, 0.1, 0.5):
        k = max(1, int(d * numel))
        sets[f"random_{d}"] = torch.randperm(numel, generator=g)[:k].sort().values
    # gaps on each side of the uint8 / uint16 escape boundaries (255/256, 65535/65536/65537, 2·65535)
    gaps = torch.tensor([1, 254, 255, 256, 257, 510, 511, 65534, 65535, 65536, 65537, 131070, 131071])
    edges = torch.cumsum(gaps, 0) - 1
    sets["escape_edges"] = edges[edges < numel]
    return sets


@pytest.mark.parametrize("shape", [(1,), (7,), (300,), (3, 70_000), (200_001,)])
def test_index_codes_round_trip_exactly_with_their_byte_count(shape):
    from freemerge_pl.merging.experts import INDEX_CODES, decode_indices, encode_indices, encoded_nbytes

    numel = math.prod(shape)
    g = torch.Generator().manual_seed(numel)
    for name, idx in _index_sets(numel, g).items():
        for code in INDEX_CODES:
            stream = encode_indices(idx, numel, code)
            back = decode_indices(stream, numel, code, idx.numel())
            assert back.dtype == torch.int32 and torch.equal(back.long(), idx), (name, code)
            assert stream.numel() * stream.element_size() == encoded_nbytes(idx, numel, code), (name, code)


def test_compact_expert_chooses_the_fewest_bytes_per_tensor_and_applies_bit_identically(tmp_path):
    from freemerge_pl.merging.experts import INDEX_CODES, encoded_nbytes

    g = torch.Generator().manual_seed(1)
    shapes = {"dense": [40, 30], "sparse": [300, 400], "wide": [2, 70_000], "bias": [30], "empty": [5, 5]}
    picks = {"dense": 0.6, "sparse": 0.01, "wide": 0.002, "bias": 0.1, "empty": 0.0}
    entries = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        idx = torch.randperm(n, generator=g)[:int(picks[key] * n)].sort().values
        entries[key] = (idx.int(), torch.randn(idx.numel(), generator=g).to(torch.bfloat16))
    flat = SparseExpert(entries, shapes)
    compact = SparseExpert(entries, shapes, "compact")
    for key, (idx, vals) in entries.items():
        sizes = {c: encoded_nbytes(idx, math.prod(shapes[key]), c) for c in INDEX_CODES}
        assert sizes[compact.index_code(key)] == min(sizes.values()), key
        i, v = compact.entries(key)
        assert torch.equal(i, idx) and torch.equal(bits(v), bits(vals))
    assert compact.index_code("dense") == "bitmap" and compact.index_code("sparse") == "delta8"
    assert compact.nbytes == sum(b.numel() * b.element_size() for b in compact.buffers()) < flat.nbytes
    target_a = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    target_b = {k: t.clone() for k, t in target_a.items()}
    flat.apply_(target_a, 0.3)
    compact.apply_(target_b, 0.3)
    for key in shapes:
        assert torch.equal(bits(target_a[key]), bits(target_b[key]))
    # save / load (one file, and the export path: save_task_modules → read_task_module)
    from freemerge_pl.io.export import read_task_module, save_task_module, save_task_modules

    save_task_module(compact, tmp_path / "e.safetensors")
    (written,) = save_task_modules([compact], {}, tmp_path / "export", names=["t"], method="free_merging")
    for loaded in (read_task_module(tmp_path / "e.safetensors"), read_task_module(written, {})):
        assert loaded.nbytes == compact.nbytes and loaded.keys == compact.keys
        for key in shapes:
            assert loaded.index_code(key) == compact.index_code(key)
            assert torch.equal(loaded.entries(key)[0], entries[key][0])
            assert torch.equal(bits(loaded.entries(key)[1]), bits(entries[key][1]))


def test_expert_files_without_index_codes_load_as_flat(tmp_path):
    """Files written before compact storage: ``extra_state`` with keys and shapes only, or no metadata."""
    import json

    from safetensors.torch import save_file

    from freemerge_pl.lightning.loading import read_task_module

    idx, vals = torch.tensor([1, 5, 6], dtype=torch.int32), torch.tensor([0.5, -1.0, 2.0])
    tensors = {"w::indices": idx, "w::values": vals}
    extra = json.dumps({"keys": ["w"], "shapes": {"w": [2, 4]}})
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"type": "SparseExpert", "extra_state": extra})
    save_file(tensors, str(tmp_path / "older.safetensors"), metadata={"type": "SparseExpert"})
    for module in (read_task_module(tmp_path / "old.safetensors", {}), read_task_module(tmp_path / "older.safetensors")):
        assert module.index_code("w") == "flat" and torch.equal(module.entries("w")[0], idx)
        target = {"w": torch.zeros(2, 4)}
        module.apply_(target)
        assert target["w"].reshape(-1)[[1, 5, 6]].tolist() == [0.5, -1.0, 2.0]


def test_a_damaged_index_stream_is_an_error_naming_the_file(tmp_path):
    from freemerge_pl.errors import FreeMergeError
    from freemerge_pl.io.export import read_task_module, save_task_modules

    idx = torch.arange(0, 3000, 7)
    expert = SparseExpert({"w": (idx.int(), torch.ones(idx.numel()))}, {"w": [3000]}, "compact")
    (path,) = save_task_modules([expert], {}, tmp_path, method="free_merging")
    from safetensors.torch import load_file, save_file

    from freemerge_pl.io import read_safetensors_header

    meta = read_safetensors_header(path)[0]
    tensors = load_file(str(path))
    tensors["w::indices"] = tensors["w::indices"][:-1]  # one code short: one entry fewer than values
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FreeMergeError, match=r"task_module_00\.safetensors.*holds 428 entries"):
        read_task_module(path, {})
    with pytest.raises(HyperparameterError, match="index_encoding='zip'"):
        SparseExpert({}, index_encoding="zip")


def test_default_expert_costs_at_most_one_percent_of_the_fp32_backbone_on_a_vit_block():
    """Issue 28 item 6, with FREE-Merging's defaults (d = 1 %, bfloat16 values, compact indices): one task's
    expert on a ViT-B/32 transformer block (qkv 2304×768, proj 768×768, fc1 3072×768, fc2 768×3072, biases and
    LayerNorms; 7.1 M float32 parameters) costs ≤ 1 % of the block's float32 bytes; the count is independent:
    ⌈d·n⌉ entries per tensor × (2 value bytes + at least 1 index byte)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,), "attn.proj.weight": (768, 768),
              "attn.proj.bias": (768,), "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
              "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,), "norm1.weight": (768,), "norm1.bias": (768,)}
    pre = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    backbone_bytes = sum(t.numel() * 4 for t in pre.values())
    entries = sum(math.ceil(0.01 * t.numel()) for t in pre.values())
    for expert in merge(pre, fts, "free_merging").task_modules:
        assert expert.nnz == entries
        assert 3 * entries <= expert.nbytes <= 0.01 * backbone_bytes
        assert all(expert.entries(k)[1].dtype == torch.bfloat16 for k in pre)


@pytest.mark.parametrize("dtype,limit", [("bfloat16", 0.01), ("float16", 0.01), (None, 0.021)])
def test_free_merging_storage_at_one_percent_density(dtype, limit):
    """Compact indices + 16-bit values: ≤ 1.0 % of the float32 backbone per task at d = 1 % (≈ 3.1 bytes an
    entry); float32 values with compact indices ≈ 5.1 bytes an entry."""
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(768, 192, generator=g), "b": torch.randn(192, 768, generator=g),
           "bias": torch.randn(768, generator=g)}
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    out = merge(pre, fts, "free_merging", expert_density=0.01, expert_dtype=dtype)
    flat = merge(pre, fts, "free_merging", expert_density=0.01, expert_dtype=dtype, expert_index_encoding="flat")
    backbone_bytes = sum(t.numel() * 4 for t in pre.values())
    for compact, plain in zip(out.task_modules, flat.task_modules):
        assert compact.nbytes / backbone_bytes <= limit
        assert compact.nbytes < plain.nbytes
        for key in pre:
            assert torch.equal(compact.entries(key)[0], plain.entries(key)[0])
            assert torch.equal(bits(compact.entries(key)[1]), bits(plain.entries(key)[1]))
