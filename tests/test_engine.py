"""The engine's own contracts: exact model-wide order statistics, per-key random replay across passes,
typed method configs checked once, and the statistics passes holding one key at a time."""

import dataclasses
import math
import re
import typing

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import build_method, get_method, list_methods
from freemerge_pl.merging.engine import TaskVectorInputs, execute, merge_task_vectors
from freemerge_pl.merging.methods.ties import TIES
from freemerge_pl.merging.order_statistics import OrderStatistics, key_to_float, ordered_keys
from freemerge_pl.settings import Range


def test_ordered_keys_sort_like_the_floats():
    values = torch.tensor([-math.inf, -3.5, -1e-38, -0.0, 0.0, 1e-45, 2.0, 3.4e38, math.inf])
    keys = ordered_keys(values).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(keys, keys.sort().values) and len(set(keys.tolist())) == len(values)
    assert [key_to_float(int(k)) for k in keys] == values.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_statistics_equal_a_full_sort_over_chunks(seed):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, generator=g) * s for n, s in [(1000, 1.0), (1, 5.0), (3000, 1e-3), (77, 1e3)]]
    chunks.append(torch.tensor([0.5, 0.5, 0.5, -0.0, 0.0]))  # ties and both zeros
    everything = torch.cat(chunks).sort().values
    n = everything.numel()
    wanted = [0, 1, 17, n // 2, n - 3, n - 1]
    stats = OrderStatistics(2, lambda s, size: wanted if s == 0 else [-1, size, 0, 1, 2, 3])
    for _ in range(2):
        for c in chunks:
            stats.observe(0, c)
            stats.observe(1, c)
        if stats.pass_index == 0:
            stats.next_pass()
    result = stats.result()
    assert result[0].tolist() == [float(everything[i]) for i in wanted]
    assert result[1].tolist() == [-math.inf, math.inf] + [float(everything[i]) for i in range(4)]


@pytest.mark.parametrize("seed", [0, 1])
def test_order_statistics_of_magnitudes_equal_a_full_sort_of_abs(seed):
    # absolute=True reads |v| from v's bits (no |.| copy): the same order statistics as a sort of v.abs()
    g = torch.Generator().manual_seed(seed)
    chunks = [(torch.randn(n, generator=g) * s * 8).round() / 8 for n, s in [(2000, 1.0), (1, 5.0), (300, 1e-2)]]
    chunks.append(torch.tensor([-0.5, 0.5, -0.0, 0.0, -math.inf, 3.0]))  # ties across signs, both zeros, -inf
    everything = torch.cat(chunks).abs().sort().values
    n = everything.numel()
    wanted = [-1, 0, 1, 5, n // 3, n // 2, n - 2, n - 1, n]
    stats = OrderStatistics(1, lambda s, size: wanted, absolute=True)
    for _ in range(2):
        for c in chunks:
            stats.observe(0, c)
        if stats.pass_index == 0:
            stats.next_pass()
    want = [-math.inf] + [float(everything[i]) for i in wanted[1:-1]] + [math.inf]
    assert stats.result()[0].tolist() == want


def test_model_scope_ties_threshold_is_exact_on_ties():
    # 10 entries, density 0.3 → keep the 3 largest |v|; the 3rd largest (2.0) is tied: both kept
    tvs = [{"a": torch.tensor([2.0, -5.0, 1.0, 0.5]), "b": torch.tensor([[2.0, 0.1], [-3.0, 0.0], [0.2, 0.3]])}]
    out = merge_task_vectors(TIES(density=0.3, trim_scope="model"), tvs).delta
    assert out["a"].tolist() == [2.0, -5.0, 0.0, 0.0]
    assert out["b"].tolist() == [[2.0, 0.0], [-3.0, 0.0], [0.0, 0.0]]


class Recorder(TIES):
    """TIES that records which keys each statistics scan holds at a time."""

    def statistics(self, scan):
        self.seen = []
        scan(lambda x: self.seen.append((x.key, x.num_tasks)))
        return super().statistics(scan)


def test_random_draws_replay_identically_in_every_pass():
    g = torch.Generator().manual_seed(0)
    tvs = [{f"k{i}": torch.randn(5, 4, generator=g) for i in range(4)} for _ in range(3)]
    dare = build_method("dare", {"drop_rate": 0.5, "merge": "ties", "ties_density": 0.5, "trim_scope": "model"})
    two_pass = {}
    execute(dare, TaskVectorInputs(tvs), lambda k, x, d, s: two_pass.__setitem__(k, d), seed=7)
    # reference: draw once in key order, then TIES with one model-wide threshold per task
    gen = torch.Generator().manual_seed(7)
    from freemerge_pl.merging.ops import random_drop

    dropped = [{} for _ in tvs]
    for key in tvs[0]:
        for k, tv in enumerate(tvs):
            dropped[k][key] = random_drop(tv[key], 0.5, gen, True)
    want = merge_task_vectors(TIES(density=0.5, trim_scope="model", scaling=0.3), dropped).delta
    for key in want:
        assert torch.equal(two_pass[key], want[key]), key


def test_statistics_scan_sees_one_key_at_a_time():
    tvs = [{"a": torch.ones(3), "b": torch.ones(2, 2)} for _ in range(2)]
    method = Recorder(density=0.5)
    execute(method, TaskVectorInputs(tvs), lambda *a: None)
    assert method.seen == [("a", 2), ("b", 2)]


@pytest.mark.parametrize("name", list_methods())
def test_every_method_is_a_typed_config_that_yaml_builds(name):
    """jsonargparse (LightningCLI, the merge job's YAML) reads the method's annotations and defaults on its own
    and builds the same configuration; the YAML it dumps builds it again through the registry."""
    spec = get_method(name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(spec.cls, "method")
    cfg = parser.parse_args([])
    built = parser.instantiate(cfg).method if hasattr(parser, "instantiate") else \
        parser.instantiate_classes(cfg).method
    assert type(built) is spec.cls and built.name == name
    assert built.hyperparameters() == spec.build({}).hyperparameters()
    dumped = yaml.safe_load(parser.dump(cfg)).get("method") or {}
    assert spec.build(dumped).hyperparameters() == built.hyperparameters()
    assert spec.summary and spec.reference


def _range_of(annotation) -> Range | None:
    """The ``Range`` of ``Annotated[X, Range(...)]`` or ``Annotated[X, Range(...)] | None``; else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is typing.Annotated:
            return next((m for m in a.__metadata__ if isinstance(m, Range)), None)
    return None


def _outside(r: Range):
    """A value just outside the interval ``r``."""
    if math.isfinite(r.high):
        return r.high if r.high_open else r.high + 1
    if math.isfinite(r.low):
        return r.low if r.low_open else r.low - 1
    return math.inf


@pytest.mark.parametrize("name", list_methods())
def test_every_ranged_hyperparameter_is_checked_at_construction(name):
    spec = get_method(name)
    hints = typing.get_type_hints(spec.cls, include_extras=True)
    ranged = {f.name: _range_of(hints[f.name]) for f in dataclasses.fields(spec.cls)}
    for field_name, r in ranged.items():
        if r is None:
            continue
        value = _outside(r)
        message = f"{name}.{field_name}={value!r} is outside its accepted range {r}"
        with pytest.raises(HyperparameterError, match=re.escape(message)):
            spec.build({field_name: value})


def test_wrong_types_are_named_at_construction():
    with pytest.raises(ConfigError, match=re.escape("ties.trim_scope='layer'; accepted: ['model', 'tensor']")):
        TIES(trim_scope="layer")
    with pytest.raises(ConfigError, match=re.escape("ties.weights[0]='a' is not a number")):
        TIES(weights=["a"])
    with pytest.raises(HyperparameterError, match=re.escape("ties.weights[1]=nan is outside its accepted range")):
        TIES(weights=[1.0, math.nan])
    with pytest.raises(ConfigError, match=re.escape("dare.rescale=1 is not a bool")):
        build_method("dare", {"rescale": 1})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", [None, [0.5, -1.25, 0.3]])
def test_weighted_sum_block_by_block_equals_the_whole_vector_sum(monkeypatch, dtype, weights):
    """``KeyTensors.weighted_sum`` from checkpoints (blocks of v_k = fp32(θ_k) − fp32(θ_pre), never a whole fp32
    v_k) against the formula over whole tensors, bit for bit; ``consume`` sees each task's blocks once, in
    order, with their offsets, while the sum grows."""
    from freemerge_pl.merging import method as method_module
    from freemerge_pl.merging.engine import CheckpointInputs
    from freemerge_pl.merging.source import StateDictSource

    monkeypatch.setattr(method_module, "SUM_BLOCK", 100)  # 37 × 29 = 1073 entries: 11 blocks, the last short
    g = torch.Generator().manual_seed(3)
    pre = {"w": torch.randn(37, 29, generator=g).to(dtype)}
    fts = [{"w": (pre["w"].float() + 0.01 * torch.randn(37, 29, generator=g)).to(dtype)} for _ in range(3)]
    x = CheckpointInputs(StateDictSource(pre, "pre"), [StateDictSource(f, f"ft{i}") for i, f in enumerate(fts)]
                         ).load("w")
    vs = [f["w"].float() - pre["w"].float() for f in fts]
    want = vs[0].clone() if weights is None else vs[0] * weights[0]  # the whole-vector formula (fr_combine's)
    for k in (1, 2):
        want.add_(vs[k], alpha=1 if weights is None else weights[k])
    seen = []

    def consume(k, blocks):
        for s, c in blocks:
            seen.append((k, s, c.numel()))
            assert torch.equal(c, vs[k].reshape(-1)[s:s + c.numel()])
    got = x.weighted_sum(weights, consume)
    assert got.shape == (37, 29) and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert seen == [(k, s, min(100, 1073 - s)) for k in range(3) for s in range(0, 1073, 100)]
    assert torch.equal(x.weighted_sum(weights), got)  # without consume: only summed


@pytest.mark.parametrize("chunk,block", [(64, 16), (64, 1 << 17), (60, 16), (1 << 22, 1 << 17)])
def test_chunked_abs_sum_in_blocks_equals_one_sum_per_chunk(monkeypatch, chunk, block):
    """Σ|v| of a task vector computed block by block from checkpoints (blocks of |v| into one reused buffer,
    summed per chunk) equals one float32 ``abs().sum()`` per chunk of the whole vector, added in float64, bit
    for bit: the λ of FR-Merging are unchanged by the blocks."""
    from freemerge_pl.merging import topk
    from freemerge_pl.merging.engine import CheckpointInputs
    from freemerge_pl.merging.source import StateDictSource

    monkeypatch.setattr(topk, "_CHUNK", chunk)
    monkeypatch.setattr(topk, "SUM_BLOCK", block)
    g = torch.Generator().manual_seed(4)
    pre = {"w": torch.randn(41, 23, generator=g).bfloat16()}
    ft = {"w": (pre["w"].float() + 0.01 * torch.randn(41, 23, generator=g)).bfloat16()}
    x = CheckpointInputs(StateDictSource(pre, "pre"), [StateDictSource(ft, "ft")]).load("w")
    v = (ft["w"].float() - pre["w"].float()).reshape(-1)
    want = sum(float(v[s:s + chunk].abs().sum()) for s in range(0, v.numel(), chunk))
    assert topk.chunked_abs_sum(x.vector_chunks(0)) == want
    assert topk.chunked_abs_sum(topk.flat_chunks(v)) == want  # the in-memory path (no blocks)


def test_vector_chunks_at_indices_equals_the_whole_task_vector():
    """FREE's merge pass reads v_k at the cut's indices (kept by the statistics scan as a delta8 stream) with
    ``VectorChunks.at``: from checkpoints fp32(θ_k) − fp32(θ_pre) at those entries only, bit for bit the whole
    task vector's values there; in memory plain indexing."""
    from freemerge_pl.merging.engine import CheckpointInputs, TaskVectorInputs
    from freemerge_pl.merging.experts import decode_indices, encode_indices
    from freemerge_pl.merging.source import StateDictSource

    g = torch.Generator().manual_seed(9)
    pre = {"w": torch.randn(100, 100, generator=g).bfloat16()}
    ft = {"w": (pre["w"].float() + 0.01 * torch.randn(100, 100, generator=g)).bfloat16()}
    v = (ft["w"].float() - pre["w"].float()).reshape(-1)
    idx = torch.cat([torch.randperm(10_000, generator=g)[:137], torch.tensor([9_999])]).unique()
    back = decode_indices(encode_indices(idx, 10_000, "delta8"), 10_000, "delta8", idx.numel())
    assert torch.equal(back.long(), idx)
    x = CheckpointInputs(StateDictSource(pre, "pre"), [StateDictSource(ft, "ft")]).load("w")
    assert torch.equal(x.vector_chunks(0).at(idx).view(torch.int32), v[idx].view(torch.int32))
    y = TaskVectorInputs([{"w": v.reshape(100, 100)}]).load("w")
    assert torch.equal(y.vector_chunks(0).at(idx), v[idx])
