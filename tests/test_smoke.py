import torch

from freemerge_pl.merging import list_methods, merge


def test_registry_has_fr_and_free():
    assert {"fr_merging", "free_merging"} <= set(list_methods())


def test_free_merge_zero_ratio_is_lambda_weighted_sum():
    pre = {"w": torch.randn(6, 8), "n": torch.arange(3)}
    fts = [{"w": pre["w"] + torch.randn(6, 8), "n": pre["n"]} for _ in range(3)]
    out = merge(pre, fts, "fr_merging", filter_ratio=0.0)
    vs = [ft["w"] - pre["w"] for ft in fts]
    e = torch.tensor([v.abs().mean() for v in vs])
    lam = e / e.sum()
    ref = pre["w"] + sum(l * v for l, v in zip(lam, vs))
    torch.testing.assert_close(out.state_dict["w"], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.state_dict["n"], pre["n"])
