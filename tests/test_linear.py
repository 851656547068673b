"""mergekit's ``linear``: Σ_k w_k θ_k / Σ_k w_k from the fine-tuned checkpoints, θ_pre never read when streamed."""

import pytest
import torch

from freemerge_pl.errors import HyperparameterError
from freemerge_pl.jobs.stream import stream_merge
from freemerge_pl.merging import build_method, merge
from freemerge_pl.merging.source import StateDictSource
from tests.test_stream import as_dict, tiny_llama_dirs


def test_hand_worked_example():
    pre = {"w": torch.tensor([100.0, -100.0])}  # never used: the result does not depend on θ_pre
    fts = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, 6.0])}]
    out = merge(pre, fts, "linear", weights=[1.0, 3.0])
    assert out.state_dict["w"].tolist() == [4.0, 5.0]  # (1 + 15) / 4, (2 + 18) / 4
    raw = merge(pre, fts, "linear", weights=[1.0, 3.0], normalize=False)
    assert raw.state_dict["w"].tolist() == [16.0, 20.0]
    assert raw.result.delta["w"].tolist() == [-84.0, 120.0]  # the delta every other consumer gets: θ_m − θ_pre


def bf16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return 2.0 ** (exponent - 8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_dirs(tmp_path_factory.mktemp("llama_linear"))


class CountingSource(StateDictSource):
    """A state-dict source that records which keys were read."""

    def __init__(self, sd, name):
        super().__init__(sd, name)
        self.read: list[str] = []

    def get(self, key):
        self.read.append(key)
        return super().get(key)


@pytest.mark.parametrize("prefetch", [False, True])
def test_streamed_linear_is_the_weighted_mean_rounded_once_and_reads_no_base(llama, tmp_path, prefetch):
    base, *fts = llama
    weights = [0.5, 2.0, 1.25]
    pre = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in as_dict(base).items()}
    sds = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in as_dict(p).items()} for p in fts]
    base_src = CountingSource(pre, "base")
    ft_srcs = [CountingSource(sd, n) for sd, n in zip(sds, "abc")]
    streamed = stream_merge(base_src, ft_srcs,
                            build_method("linear", {"weights": weights}), tmp_path / "out", names=list("abc"),
                            prefetch=prefetch)
    out = as_dict(tmp_path / "out")
    floating = [k for k, v in pre.items() if v.is_floating_point()]
    assert floating and not [k for k in base_src.read if k in floating]  # θ_pre's floating tensors: never read
    for src in ft_srcs:  # each fine-tuned tensor read exactly once
        assert sorted(k for k in src.read if k in floating) == sorted(floating), src.name
    for key in floating:
        exact = sum(w * sd[key].double() for w, sd in zip(weights, sds)) / sum(weights)  # independent, float64
        assert out[key].dtype == torch.bfloat16
        err = (out[key].double() - exact).abs()
        assert bool((err <= bf16_half_ulp(exact) * 1.001 + 1e-12).all()), key  # one rounding to bf16 only
    # in memory the same method gives the same tensors
    mem = merge(pre, sds, "linear", weights=weights, names=list("abc"))
    for key in floating:
        assert torch.equal(mem.state_dict[key], out[key])
    assert streamed.result.task_modules == [] or streamed.result.task_modules is None


def test_equal_weights_average_like_weight_averaging(llama):
    base, *fts = llama
    pre, sds = as_dict(base), [as_dict(p) for p in fts]
    lin = merge(pre, sds, "linear")
    avg = merge(pre, sds, "weight_averaging")
    for key, t in lin.state_dict.items():
        if t.is_floating_point():  # the same mean, computed from θ_k or as θ_pre + mean(v_k): fp32 rounding
            torch.testing.assert_close(t, avg.state_dict[key], rtol=0, atol=4 * torch.finfo(t.dtype).eps * (1 + t.abs().max().item()))


def test_weights_scale_free_when_normalized():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(5, 4, generator=g)}
    fts = [{"w": torch.randn(5, 4, generator=g)} for _ in range(3)]
    a = merge(pre, fts, "linear", weights=[1.0, 2.0, 4.0]).state_dict["w"]
    b = merge(pre, fts, "linear", weights=[0.25, 0.5, 1.0]).state_dict["w"]  # × 1/4: powers of two, exact
    assert torch.equal(a, b)


def test_bad_settings_are_refused():
    pre = {"w": torch.zeros(2)}
    fts = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(HyperparameterError, match="sum to 0"):
        merge(pre, fts, "linear", weights=[1.0, -1.0])
    with pytest.raises(HyperparameterError, match="2 task vectors"):
        merge(pre, fts, "linear", weights=[1.0, 2.0, 3.0])
    with pytest.raises(HyperparameterError, match="fr_filter_ratio"):
        merge(pre, fts, "linear", fr_filter_ratio=0.1)
    assert merge(pre, fts, "linear", weights=[1.0, -1.0], normalize=False).state_dict["w"].tolist() == [0.0, 0.0]


def test_merge_job_yaml_with_mergekit_weights(llama, tmp_path):
    """A mergekit-style job file: ``merge_method: linear`` with per-model ``weight``s, run through the job."""
    import yaml

    from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job

    base, *fts = llama
    job = {"base_model": str(base), "merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1, 1, 2])]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run_merge_job(MergeJobConfig.from_yaml(tmp_path / "job.yaml"), output_dir=str(tmp_path / "o"), progress=False)
    out, sds = as_dict(tmp_path / "o"), [as_dict(p) for p in fts]
    for key, t in out.items():
        if t.is_floating_point():
            exact = (sds[0][key].double() + sds[1][key].double() + 2 * sds[2][key].double()) / 4
            torch.testing.assert_close(t.double(), exact, rtol=2e-7, atol=1e-9)
