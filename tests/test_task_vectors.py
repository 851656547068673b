"""Task vectors over state dicts, checkpoint validation, and the in-memory merge driver."""

import pytest
import torch

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, HyperparameterError, NonFiniteError
from freemerge_pl.merging import apply_delta, merge, task_vectors, validate_checkpoints
from freemerge_pl.merging.task_vectors import mergeable_keys


def checkpoints(dtype=torch.float32, n=2):
    pre = {
        "blocks.0.weight": torch.randn(4, 3).to(dtype),
        "blocks.0.bias": torch.randn(4).to(dtype),
        "pos_ids": torch.arange(5),
        "mask": torch.tensor([True, False]),
    }
    fts = []
    for _ in range(n):
        ft = {k: v.clone() for k, v in pre.items()}
        ft["blocks.0.weight"] = (pre["blocks.0.weight"].float() + torch.randn(4, 3)).to(dtype)
        ft["blocks.0.bias"] = (pre["blocks.0.bias"].float() + torch.randn(4)).to(dtype)
        fts.append(ft)
    return pre, fts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_vectors_are_fp32_differences_of_float_tensors(dtype):
    pre, fts = checkpoints(dtype)
    tvs = task_vectors(pre, fts)
    assert len(tvs) == 2
    for tv, ft in zip(tvs, fts):
        assert set(tv) == {"blocks.0.weight", "blocks.0.bias"}  # integer/bool buffers are not merged
        for k, v in tv.items():
            assert v.dtype == torch.float32
            assert torch.equal(v, ft[k].float() - pre[k].float())


def test_apply_delta_in_fp32_cast_to_pretrained_dtype():
    pre, _ = checkpoints(torch.bfloat16)
    delta = {"blocks.0.weight": torch.full((4, 3), 1e-3), "blocks.0.bias": torch.full((4,), 0.25)}
    out = apply_delta(pre, delta, scale=2.0)
    for k, d in delta.items():
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], (pre[k].float() + 2.0 * d).to(torch.bfloat16))
    assert torch.equal(out["pos_ids"], pre["pos_ids"]) and out["pos_ids"].data_ptr() != pre["pos_ids"].data_ptr()
    assert torch.equal(out["mask"], pre["mask"])


def test_exclude_keys_are_neither_compared_nor_merged():
    pre, fts = checkpoints()
    pre["head.weight"] = torch.randn(3, 4)
    fts[0]["head.weight"] = torch.randn(7, 4)  # task-specific heads differ in shape
    fts[1]["head.weight"] = torch.randn(2, 4)
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        task_vectors(pre, fts)
    tvs = task_vectors(pre, fts, exclude_keys=[r"^head\."])
    assert all("head.weight" not in tv for tv in tvs)
    assert mergeable_keys(pre, r"^head\.") == ["blocks.0.weight", "blocks.0.bias"]


def test_empty_model_list():
    pre, _ = checkpoints()
    with pytest.raises(ConfigError, match="no fine-tuned models"):
        task_vectors(pre, [])
    with pytest.raises(ConfigError, match="no fine-tuned models"):
        merge(pre, [], "fr_merging")


def test_names_count_mismatch():
    pre, fts = checkpoints()
    with pytest.raises(ConfigError, match="1 names for 2 fine-tuned models"):
        task_vectors(pre, fts, names=["only_one"])


def test_missing_and_unexpected_keys_name_checkpoint_and_key():
    pre, fts = checkpoints()
    del fts[1]["blocks.0.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        task_vectors(pre, fts, names=["cars", "dtd"])
    msg = str(err.value)
    assert "'dtd'" in msg and "missing ['blocks.0.bias']" in msg
    pre, fts = checkpoints()
    fts[0]["extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError, match=r"'finetuned\[0\]'.*unexpected \['extra.weight'\]"):
        task_vectors(pre, fts)


def test_shape_mismatch_names_checkpoint_key_and_shapes():
    pre, fts = checkpoints()
    fts[1]["blocks.0.weight"] = torch.randn(4, 5)
    with pytest.raises(CheckpointMismatchError) as err:
        merge(pre, fts, "fr_merging", names=["cars", "dtd"])
    msg = str(err.value)
    assert "'dtd'" in msg and "'blocks.0.weight'" in msg and "(4, 5)" in msg and "(4, 3)" in msg


def test_float_versus_integer_dtype_mismatch():
    pre, fts = checkpoints()
    fts[0]["pos_ids"] = torch.arange(5).float()
    with pytest.raises(CheckpointMismatchError, match=r"'finetuned\[0\]' key 'pos_ids' has dtype torch.float32"):
        task_vectors(pre, fts)
    pre, fts = checkpoints()
    fts[1]["blocks.0.weight"] = fts[1]["blocks.0.weight"].half()  # fp16 vs fp32 is compatible
    assert len(task_vectors(pre, fts)) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_checkpoint_key_and_shape(bad):
    pre, fts = checkpoints()
    fts[1]["blocks.0.bias"][2] = bad
    with pytest.raises(NonFiniteError) as err:
        task_vectors(pre, fts, names=["cars", "dtd"])
    msg = str(err.value)
    assert "'dtd'" in msg and "'blocks.0.bias'" in msg and "(4,)" in msg and "1 NaN/Inf" in msg
    pre, fts = checkpoints(torch.bfloat16)
    pre["blocks.0.weight"][0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"'pretrained' key 'blocks.0.weight' \(shape \(4, 3\)\)"):
        merge(pre, fts, "fr_merging")


def test_non_finite_in_excluded_key_is_ignored_and_check_can_be_skipped():
    pre, fts = checkpoints()
    pre["head.weight"] = torch.full((2, 2), float("nan"))
    for ft in fts:
        ft["head.weight"] = torch.zeros(2, 2)
    assert validate_checkpoints(pre, fts, exclude_keys=r"^head\.") == ["blocks.0.weight", "blocks.0.bias"]
    fts[0]["blocks.0.weight"][0, 0] = float("nan")
    assert len(validate_checkpoints(pre, fts, exclude_keys="head", check_finite=False)) == 2


def test_merge_copies_excluded_heads_from_pretrained():
    pre, fts = checkpoints()
    pre["head.weight"], pre["head.bias"] = torch.randn(3, 4), torch.randn(3)
    for i, ft in enumerate(fts):
        ft["head.weight"], ft["head.bias"] = torch.randn(3 + 2 * i, 4), torch.randn(3 + 2 * i)
    out = merge(pre, fts, "fr_merging", exclude_keys=r"^head\.", filter_ratio=0.0)
    assert torch.equal(out.state_dict["head.weight"], pre["head.weight"])
    assert torch.equal(out.state_dict["head.bias"], pre["head.bias"])
    assert torch.equal(out.state_dict["pos_ids"], pre["pos_ids"])
    # the merged keys follow Eq. 3 with r = 0: θ_pre + Σ λ_k v_k, λ from the merged keys only
    tvs = [{k: ft[k] - pre[k] for k in ("blocks.0.weight", "blocks.0.bias")} for ft in fts]
    means = [torch.cat([v.reshape(-1) for v in tv.values()]).abs().mean() for tv in tvs]
    lam = [m / sum(means) for m in means]
    for k in ("blocks.0.weight", "blocks.0.bias"):
        expected = pre[k] + sum(lk * tv[k] for lk, tv in zip(lam, tvs))
        torch.testing.assert_close(out.state_dict[k], expected, rtol=1e-6, atol=1e-6)
    assert out.record["exclude_keys"] == r"^head\." and out.record["method"] == "fr_merging"


def test_unknown_hyperparameter_and_unknown_method():
    pre, fts = checkpoints()
    with pytest.raises(HyperparameterError, match=r"'fr_merging' has no hyperparameter\(s\) \['filter_ration'\]"):
        merge(pre, fts, "fr_merging", filter_ration=0.3)
    with pytest.raises(ConfigError, match="unknown merge method 'fr_mergin'.*fr_merging"):
        merge(pre, fts, "fr_mergin")


def test_merge_record_and_determinism():
    pre, fts = checkpoints()
    a = merge(pre, fts, "free_merging", filter_ratio=0.3, expert_density=0.25, names=["x", "y"])
    b = merge(pre, fts, "free_merging", filter_ratio=0.3, expert_density=0.25, names=["x", "y"])
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])
    rec = a.record
    assert rec["hyperparameters"]["filter_ratio"] == 0.3 and rec["hyperparameters"]["expert_density"] == 0.25
    assert rec["hyperparameters"]["cutoff_mode"] == "fraction"  # defaults are recorded too
    assert rec["names"] == ["x", "y"] and len(rec["info"]["lambdas"]) == 2
