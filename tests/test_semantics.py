"""The `semantics` preset of fr_merging / free_merging: paper by default, released_code on request."""

import pytest
import torch

from freemerge_pl.errors import HyperparameterError
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


def test_released_semantics_dispatches_to_the_released_functions():
    pre, fts = _models()
    tvs = task_vectors(pre, fts)
    fr = merge(pre, fts, "fr_merging", semantics="released_code")
    ref = released_fr_merge(tvs)
    for k in pre:
        torch.testing.assert_close(fr.state_dict[k], pre[k] + ref.delta[k], rtol=0, atol=0)
    free = merge(pre, fts, "free_merging", semantics="released_code",
                 released_options={"keep_first_task_bias_quirk": False})
    ref = released_free_merge(tvs, keep_first_task_bias_quirk=False)
    for k in pre:
        torch.testing.assert_close(free.state_dict[k], pre[k] + ref.delta[k], rtol=0, atol=0)
    for mine, theirs in zip(free.task_modules, ref.task_modules):
        for key in theirs.keys:
            assert torch.equal(mine.entries(key)[0], theirs.entries(key)[0])
            assert torch.equal(mine.entries(key)[1], theirs.entries(key)[1])


def test_paper_semantics_is_the_default_and_unchanged():
    pre, fts = _models()
    default = merge(pre, fts, "free_merging")
    explicit = merge(pre, fts, "free_merging", semantics="paper", filter_ratio=0.3, scaling=1.0)
    for k in pre:
        assert torch.equal(default.state_dict[k], explicit.state_dict[k])
    released = merge(pre, fts, "free_merging", semantics="released_code")
    assert not torch.equal(default.state_dict["blocks.0.attn.in_proj_weight"],
                           released.state_dict["blocks.0.attn.in_proj_weight"])
    # the released vit profile leaves keys outside attn|mlp at θ_pre
    assert torch.equal(released.state_dict["ln.weight"], pre["ln.weight"])


def test_semantics_errors():
    pre, fts = _models()
    with pytest.raises(HyperparameterError, match="semantics='nope'"):
        merge(pre, fts, "fr_merging", semantics="nope")
    with pytest.raises(HyperparameterError, match="released_options"):
        merge(pre, fts, "fr_merging", released_options={"align": True})
    with pytest.raises(HyperparameterError, match="expert_scale"):
        merge(pre, fts, "free_merging", semantics="released_code", expert_scale=2.0)
