"""benchmarks/vs_mergekit.py's pure helpers (no mergekit, no child process): run order, the jobs each tool
gets, mergekit's deterministic rules recomputed by the script, the output comparison and the last line."""

import pytest
import torch

from benchmarks import vs_mergekit as vs
from freemerge_pl.jobs.merge_job import MergeJobConfig
from freemerge_pl.merging import merge


def test_runs_alternate_ours_theirs_theirs_ours():
    assert vs.alternating(3) == [(0, "ours"), (0, "mergekit"), (1, "mergekit"), (1, "ours"), (2, "ours"),
                                 (2, "mergekit")]


def test_last_line_names_the_worst_wall_ratio():
    line = vs.worst_line([{"wall_ratio": 0.61}, {"wall_ratio": 1.234}, {"wall_ratio": 0.9}])
    assert line == "project/mergekit wall time, worst shared method: 1.23"
    assert line.endswith("1.23") and vs.worst_line([]).endswith("n/a (no method ran with both tools)")


@pytest.mark.parametrize("method", vs.SHARED, ids=lambda m: m.name)
def test_each_shared_method_is_a_valid_job_for_both_tools(method, tmp_path):
    base, fts = tmp_path / "base", [tmp_path / f"ft{k}" for k in range(3)]
    ours = vs.our_job(method, base, fts, tmp_path / "out", 1000)
    config = MergeJobConfig(**ours)
    config.method()  # the settings are accepted by our method (typed checks)
    assert config.merge_method == method.ours and config.dtype == "bfloat16"
    assert config.names == ["ft0", "ft1", "ft2"]
    theirs = vs.mergekit_job(method, base, fts)
    assert theirs["merge_method"] == method.theirs
    assert (theirs["dtype"], theirs["out_dtype"]) == ("float32", "bfloat16")
    assert [m["model"] for m in theirs["models"]] == [str(p) for p in fts]
    assert all("weight" in m["parameters"] for m in theirs["models"])
    assert ("base_model" in theirs) == (method.theirs != "linear")


def _sd(values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_mergekit_ties_rule_keeps_exactly_int_dn_while_ours_keeps_every_tie():
    n = 10
    base = torch.zeros(n)
    v = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, -0.2, 0.3, 0.05])  # 5 entries tie at the top
    ties = vs.BY_NAME["ties"]
    density = ties.model_parameters["density"]  # 0.2: int(0.2·10) = 2 entries
    theirs = vs.mergekit_rule(ties, base, [v])
    kept = int((theirs != 0).sum())
    assert kept == int(density * n) == 2 and set(theirs[theirs != 0].tolist()) == {0.5}
    # the compared setting (trim_ties="exact_count") keeps mergekit's entries; the default keeps every tie
    ours = merge(_sd(base.tolist()), [_sd(v.tolist())], "ties", **ties.ours_parameters).state_dict["w"]
    assert ties.ours_parameters["trim_ties"] == "exact_count" and torch.equal(ours, theirs)
    default = {**ties.ours_parameters, "trim_ties": "keep_all"}
    ours = merge(_sd(base.tolist()), [_sd(v.tolist())], "ties", **default).state_dict["w"]
    assert int((ours != 0).sum()) == 5  # every entry tied at the threshold
    assert vs.threshold_ties(base, [v], density) == 5 - 2


def test_mergekit_ties_elects_and_averages_like_ours_without_ties():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=g)
    fts = [base + torch.randn(40, 30, generator=g) for _ in range(3)]  # distinct magnitudes: no ties
    ties = vs.BY_NAME["ties"]
    theirs = vs.mergekit_rule(ties, base, fts)
    ours = merge({"w": base}, [{"w": t} for t in fts], "ties", **ties.ours_parameters).state_dict["w"]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_mergekit_linear_rules_equal_ours_up_to_float_rounding(name):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 16, generator=g)
    fts = [base + 0.01 * torch.randn(64, 16, generator=g) for _ in range(3)]
    method = vs.BY_NAME[name]
    ours = merge({"w": base}, [{"w": t} for t in fts], method.ours, **method.ours_parameters).state_dict["w"]
    torch.testing.assert_close(vs.mergekit_rule(method, base, fts), ours, rtol=0, atol=1e-6)


def test_our_linear_is_mergekits_rule_bit_for_bit_on_bf16_models():
    """Our ``linear`` (from θ_k only) equals mergekit's recomputed rule exactly, in bfloat16 as the job writes it;
    the rule is checked against a float64 mean first (within one bf16 rounding)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 64, generator=g).bfloat16()
    fts = [(base.float() + 0.01 * torch.randn(256, 64, generator=g)).bfloat16() for _ in range(3)]
    method = vs.BY_NAME["linear"]
    theirs = vs.mergekit_rule(method, base, fts)
    exact = sum(t.double() for t in fts) / 3
    assert float((theirs.double() - exact).abs().max()) <= float(exact.abs().max()) * 2.0**-8
    ours = merge({"w": base}, [{"w": t} for t in fts], method.ours, **method.ours_parameters).state_dict["w"]
    assert torch.equal(ours, theirs)


def test_mergekit_breadcrumbs_rule_keeps_the_band_below_the_top_gamma():
    n = 1000
    magnitudes = torch.randperm(n, generator=torch.Generator().manual_seed(2)).float() + 1
    v = magnitudes * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    method = vs.BY_NAME["breadcrumbs"]
    got = vs.mergekit_rule(method, torch.zeros(n), [v])
    keep, top = int(0.09 * n), int(0.01 * n)
    ranks = sorted(range(n), key=lambda i: float(magnitudes[i]))  # ascending |v|
    want = set(ranks[n - keep - top: n - top])
    assert {i for i in range(n) if got[i] != 0} == want
    for i in want:
        assert float(got[i]) == pytest.approx(0.3 * float(v[i]))


def test_random_methods_have_no_recomputed_rule():
    assert all(vs.mergekit_rule(m, torch.zeros(3), [torch.ones(3)]) is None for m in vs.SHARED if m.random)


def test_compare_reports_max_difference_and_shares():
    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    ours = {"a": torch.tensor([1.0, 0.0, 0.0, 2.0]), "b": torch.tensor([0.0, 0.5])}
    theirs = {"a": torch.tensor([1.0, 0.25, 0.0, 2.0]), "b": torch.tensor([0.0, 0.0])}
    c = vs.compare(ours, theirs, base)
    assert c["max_abs_diff"] == 0.5 and c["differing_fraction"] == 2 / 6
    assert c["changed_fraction"] == {"ours": 3 / 6, "mergekit": 3 / 6}
    assert c["delta_std"]["ours"] == pytest.approx(((1 + 4 + 0.25) / 6) ** 0.5)
    assert "error" in vs.compare(ours, {"a": theirs["a"]}, base)


def test_compare_counts_differences_in_bf16_ulps_at_the_entry_scale():
    base = {"w": torch.tensor([1.0, 0.02])}
    ours = {"w": torch.tensor([1.0, 0.02])}
    # 1 ulp at 1.0, 2 ulps at 0.02 (in [2^-6, 2^-5): spacing 2^-13)
    theirs = {"w": torch.tensor([1.0 + 2**-7, 0.02 + 2 * 2**-13])}
    assert vs.compare(ours, theirs, base)["max_diff_bf16_ulps"] == pytest.approx(2.0)


def test_mergekit_is_skipped_with_a_reason_when_absent_and_install_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(vs.shutil, "which", lambda name: None)
    command, why = vs.find_mergekit(tmp_path / "venv", install=False)
    assert command is None and str(tmp_path / "venv") in why and "install disabled" in why
    script = tmp_path / "venv" / "bin" / "mergekit-yaml"
    script.parent.mkdir(parents=True)
    script.write_text("")
    assert vs.find_mergekit(tmp_path / "venv", install=False) == ([str(script)], f"venv {tmp_path / 'venv'}")
