"""The streaming engine over sharded safetensors equals the in-memory merge bit for bit, for every method."""

import pytest
import torch
from safetensors.torch import load_file

from freemerge_pl.io import load_state_dict, open_checkpoint
from freemerge_pl.jobs.stream import stream_merge
from freemerge_pl.merging import build_method, get_method, list_methods, merge

K = 3


def tiny_llama_dirs(root, K=K):
    """A tiny Llama base plus K fine-tunes (base + small seeded noise), each saved by transformers in 3 shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    shard = 12000  # bytes: 3 shards of this 29 kB model
    paths = [root / "base"]
    base.save_pretrained(paths[0], max_shard_size=shard, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    for k in range(K):
        model = LlamaForCausalLM(config)
        model.load_state_dict({n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.state_dict().items()})
        paths.append(root / f"ft{k}")
        model.save_pretrained(paths[-1], max_shard_size=shard, safe_serialization=True)
    return paths


def as_dict(path):
    src = open_checkpoint(path)
    return {k: src.get(k) for k in src}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    paths = tiny_llama_dirs(root)
    assert len(list(paths[0].glob("model-*.safetensors"))) == 3
    return paths


STREAM_ARGS = {"fr_merging_released": {"key_pattern": "proj"}, "free_merging_released": {"key_pattern": "proj",
                                                                                         "expert_density": 0.2}}
METHODS = [n for n in list_methods() if not get_method(n).needs]


@pytest.mark.parametrize("name", METHODS)
def test_stream_equals_in_memory_bit_for_bit(llama, tmp_path, name):
    base, *fts = llama
    method = build_method(name, STREAM_ARGS.get(name))
    pre, fts_sd = as_dict(base), [as_dict(p) for p in fts]  # the same inputs, in the sources' key order
    out = merge(pre, fts_sd, method, names=["a", "b", "c"], seed=5)
    streamed = stream_merge(open_checkpoint(base), [open_checkpoint(p) for p in fts], method, tmp_path / "out",
                            names=["a", "b", "c"], seed=5, max_shard_bytes=20_000)
    assert len([f for f in streamed.files if f.suffix == ".safetensors"]) > 1
    got = load_state_dict(tmp_path / "out")
    assert set(got) == set(pre)
    for key in pre:
        assert got[key].dtype == pre[key].dtype and torch.equal(got[key], out.state_dict[key]), key
    for name_, module in out.result.shared_modules.items():
        streamed_module = streamed.result.shared_modules[name_]
        for a, b in zip(streamed_module.state_dict().values(), module.state_dict().values()):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b), name_
    if out.task_modules:
        for mine, theirs in zip(streamed.result.task_modules, out.task_modules):
            assert mine.keys == theirs.keys
            for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
                assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_output_dtype_and_shards_load_with_transformers(llama, tmp_path):
    from transformers import LlamaForCausalLM

    base, *fts = llama
    stream_merge(open_checkpoint(base), [open_checkpoint(p) for p in fts], build_method("ties"), tmp_path / "o",
                 dtype=torch.bfloat16, max_shard_bytes=4_000)
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) > 3 and all(v.dtype == torch.bfloat16 for s in shards for v in load_file(s).values())
    import shutil

    shutil.copy(base / "config.json", tmp_path / "o" / "config.json")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "o", torch_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_nan_in_a_streamed_input_is_named_with_file_and_key(llama, tmp_path):
    from freemerge_pl.errors import NonFiniteError
    from freemerge_pl.merging.source import StateDictSource

    base, *fts = llama
    bad = as_dict(fts[2])
    bad["model.layers.0.mlp.up_proj.weight"][1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"checkpoint 'c' .*key 'model.layers.0.mlp.up_proj.weight'.*1 NaN/Inf"):
        stream_merge(open_checkpoint(base), [open_checkpoint(fts[0]), open_checkpoint(fts[1]),
                                            StateDictSource(bad, "c")], build_method("task_arithmetic"),
                     tmp_path / "o", names=["a", "b", "c"])
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_free_merging_chunk_by_chunk_equals_whole_tensors(llama, tmp_path, monkeypatch, scope):
    """Large tensors are read as θ_k plus one chunk of v_k at a time (statistics and merge pass). With a tiny
    chunk size every tensor here takes that path: the experts keep exactly the same entries as the whole-tensor
    computation, the values and the backbone agree to float32 rounding (Σ|v| is summed per chunk), and
    streaming bf16 checkpoints still equals the in-memory merge bit for bit."""
    from safetensors.torch import save_file

    from freemerge_pl.merging import topk

    base, *fts = llama
    pre, fts_sd = as_dict(base), [as_dict(p) for p in fts]
    method = build_method("free_merging", {"expert_scope": scope, "expert_density": 0.05})
    whole = merge(pre, fts_sd, method, names=["a", "b", "c"])
    monkeypatch.setattr(topk, "_CHUNK", 64)
    chunked = merge(pre, fts_sd, method, names=["a", "b", "c"])
    for key in pre:
        torch.testing.assert_close(chunked.state_dict[key], whole.state_dict[key], rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(chunked.task_modules, whole.task_modules):
        for key in theirs.keys:
            (i, v), (j, w) = mine.entries(key), theirs.entries(key)
            assert torch.equal(i, j), key
            torch.testing.assert_close(v, w, rtol=1e-5, atol=0)
    bf16 = [{k: t.bfloat16() for k, t in sd.items()} for sd in (pre, *fts_sd)]
    files = []
    for n, sd in enumerate(bf16):
        files.append(tmp_path / f"m{n}.safetensors")
        save_file(sd, files[-1])
    out = merge(bf16[0], bf16[1:], method, names=["a", "b", "c"])
    streamed = stream_merge(open_checkpoint(files[0]), [open_checkpoint(f) for f in files[1:]], method,
                            tmp_path / "out", names=["a", "b", "c"])
    got = load_state_dict(tmp_path / "out")
    for key in pre:
        assert torch.equal(got[key], out.state_dict[key]), key
    for mine, theirs in zip(streamed.result.task_modules, out.task_modules):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b)
