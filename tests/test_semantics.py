"""The released-code variants are their own methods (``fr_merging_released``/``free_merging_released``):
every setting typed and checked, a setting the chosen profile ignores is an error naming both."""

import pytest
import torch

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import merge, task_vectors
from freemerge_pl.merging.released import released_fr_merge, released_free_merge


def _models(K=3):
    g = torch.Generator().manual_seed(0)
    pre = {"blocks.0.attn.in_proj_weight": torch.randn(12, 8, generator=g),
           "blocks.0.attn.in_proj_bias": torch.randn(12, generator=g),
           "blocks.0.mlp.fc.weight": torch.randn(16, 8, generator=g),
           "ln.weight": torch.randn(8, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(K)]
    return pre, fts


def test_released_methods_through_merge_equal_the_released_functions():
    pre, fts = _models()
    tvs = task_vectors(pre, fts)
    fr = merge(pre, fts, "fr_merging_released")
    ref = released_fr_merge(tvs)
    for k in pre:
        torch.testing.assert_close(fr.state_dict[k], pre[k] + ref.delta[k], rtol=0, atol=0)
    free = merge(pre, fts, "free_merging_released", keep_first_task_bias_quirk=False)
    ref = released_free_merge(tvs, keep_first_task_bias_quirk=False)
    for k in pre:
        torch.testing.assert_close(free.state_dict[k], pre[k] + ref.delta[k], rtol=0, atol=0)
    for mine, theirs in zip(free.task_modules, ref.task_modules):
        for key in theirs.keys:
            assert torch.equal(mine.entries(key)[0], theirs.entries(key)[0])
            assert torch.equal(mine.entries(key)[1], theirs.entries(key)[1])


def test_paper_semantics_is_the_default_method():
    pre, fts = _models()
    default = merge(pre, fts, "free_merging")
    explicit = merge(pre, fts, "free_merging", filter_ratio=0.3, scaling=1.0)
    for k in pre:
        assert torch.equal(default.state_dict[k], explicit.state_dict[k])
    released = merge(pre, fts, "free_merging_released")
    assert not torch.equal(default.state_dict["blocks.0.attn.in_proj_weight"],
                           released.state_dict["blocks.0.attn.in_proj_weight"])
    # the released vit profile leaves keys outside attn|mlp at θ_pre
    assert torch.equal(released.state_dict["ln.weight"], pre["ln.weight"])


@pytest.mark.parametrize("method, args, match", [
    ("fr_merging", {"semantics": "released_code"}, "fr_merging_released"),
    ("fr_merging_released", {"cutoff_mode": "bogus"}, "cutoff_mode"),
    ("free_merging_released", {"expert_scale": 2.0}, "expert_scale"),
    ("free_merging_released", {"profile": "xx"}, "profile='xx' must be one of 'vit', 'glue'"),
    ("free_merging_released", {"profile": "glue", "expert_density": 0.05},
     r"expert_density=0.05 is ignored by profile='glue'.*'vit'"),
    ("fr_merging_released", {"profile": "glue", "key_pattern": "attn"}, "key_pattern='attn' is ignored by"),
    ("free_merging_released", {"glue_expert_scale": 5.0}, "glue_expert_scale=5.0 is ignored by profile='vit'"),
    ("free_merging", {"expert_scope": "xx"}, "expert_scope='xx' must be one of 'tensor', 'model'"),
    ("fr_merging", {"filter_ratio": float("nan")}, "filter_ratio=nan must be a finite float"),
    ("fr_merging", {"filter_ratio": "0.3"}, "filter_ratio=.0.3. must be a finite float"),
])
def test_every_setting_is_checked_and_named(method, args, match):
    pre, fts = _models()
    with pytest.raises(HyperparameterError, match=match):
        merge(pre, fts, method, **args)


def test_prefilter_on_a_filtering_method_is_an_error_naming_both():
    pre, fts = _models()
    for method in ("fr_merging", "free_merging", "fr_merging_released"):
        with pytest.raises(HyperparameterError, match=r"fr_filter_ratio=0.2 .*filter_ratio"):
            merge(pre, fts, method, fr_filter_ratio=0.2)


def test_key_pattern_matching_nothing_is_an_error():
    g = torch.Generator().manual_seed(1)
    pre = {"encoder.layer.0.attention.self.query.weight": torch.randn(6, 6, generator=g),
           "encoder.layer.0.output.dense.bias": torch.randn(6, generator=g)}
    fts = [{k: v + 0.1 for k, v in pre.items()} for _ in range(2)]
    with pytest.raises(ConfigError, match="key_pattern='attn|mlp'.*matches none of the 2 merged tensors"):
        merge(pre, fts, "fr_merging_released")
    out = merge(pre, fts, "fr_merging_released", key_pattern="attention|output")
    assert not torch.equal(out.state_dict["encoder.layer.0.output.dense.bias"],
                           pre["encoder.layer.0.output.dense.bias"])
