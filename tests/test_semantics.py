"""The released-code variants are their own methods (``fr_merging_released``/``free_merging_released``):
every setting typed and checked, a setting the chosen profile ignores is an error naming both."""

import re

import pytest
import torch

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import merge


def _models(K=3):
    g = torch.Generator().manual_seed(0)
    pre = {"blocks.0.attn.in_proj_weight": torch.randn(12, 8, generator=g),
           "blocks.0.attn.in_proj_bias": torch.randn(12, generator=g),
           "blocks.0.mlp.fc.weight": torch.randn(16, 8, generator=g),
           "ln.weight": torch.randn(8, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(K)]
    return pre, fts


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


@pytest.mark.parametrize("method, args, error, match", [
    ("fr_merging", {"semantics": "released_code"}, HyperparameterError, "fr_merging_released"),
    ("fr_merging_released", {"cutoff_mode": "bogus"}, HyperparameterError, "cutoff_mode"),
    ("free_merging_released", {"expert_scale": 2.0}, HyperparameterError, "expert_scale"),
    ("free_merging_released", {"profile": "xx"}, ConfigError,
     re.escape("free_merging_released.profile='xx'; accepted: ['vit', 'glue']")),
    ("free_merging_released", {"profile": "glue", "expert_density": 0.05}, HyperparameterError,
     r"expert_density=0.05 is ignored by profile='glue'.*'vit'"),
    ("fr_merging_released", {"profile": "glue", "key_pattern": "attn"}, HyperparameterError,
     "key_pattern='attn' is ignored by"),
    ("free_merging_released", {"glue_expert_scale": 5.0}, HyperparameterError,
     "glue_expert_scale=5.0 is ignored by profile='vit'"),
    ("free_merging", {"expert_scope": "xx"}, ConfigError,
     re.escape("free_merging.expert_scope='xx'; accepted: ['tensor', 'model']")),
    ("fr_merging", {"filter_ratio": float("nan")}, HyperparameterError,
     re.escape("fr_merging.filter_ratio=nan is outside its accepted range [0, 1)")),
    ("fr_merging", {"filter_ratio": "0.3"}, ConfigError, re.escape("fr_merging.filter_ratio='0.3' is not a number")),
    ("fr_merging_released", {"scaling": float("inf")}, HyperparameterError,
     re.escape("fr_merging_released.scaling=inf is outside its accepted range (-inf, inf)")),
    ("free_merging_released", {"key_pattern": 3}, ConfigError,
     re.escape("free_merging_released.key_pattern=3 is not a string")),
])
def test_every_setting_is_checked_and_named(method, args, error, match):
    pre, fts = _models()
    with pytest.raises(error, match=match):
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
