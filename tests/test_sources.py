"""Lazy checkpoint sources (safetensors file/dir/HF shards, torch files) and the resumable streaming sink."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from freemerge_pl.errors import CheckpointMismatchError, FreeMergeError
from freemerge_pl.io import (
    INDEX_NAME,
    JOURNAL_NAME,
    SafetensorsSource,
    ShardedSafetensorsSink,
    TorchFileSource,
    load_state_dict,
    open_checkpoint,
)
from freemerge_pl.merging.source import TensorInfo

SHARD_NAMES = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def mixed_state_dict():
    """One tensor of every supported dtype, plus a scalar and an empty tensor."""
    return {
        "embed.weight": torch.randn(10, 8),
        "blocks.0.weight": torch.randn(8, 8).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(8).half(),
        "blocks.1.weight": torch.randn(4, 8, dtype=torch.float64),
        "pos_ids": torch.arange(10),
        "counts": torch.arange(-3, 3, dtype=torch.int32),
        "small": torch.arange(-4, 4, dtype=torch.int8),
        "bytes": torch.arange(6, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "head.weight": torch.randn(3, 8),
    }


def plan_of(sd):
    return [(k, TensorInfo(tuple(t.shape), t.dtype)) for k, t in sd.items()]


def assert_source_matches(src, ref, file_order=None):
    """``src`` has exactly ``ref``'s keys (in ``file_order`` when given), infos and tensors."""
    assert sorted(src.keys()) == sorted(ref)
    if file_order is not None:
        assert src.keys() == list(file_order)
    for k, t in ref.items():
        info = src.info(k)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype, k
        got = src.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
        assert k in src


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).to(dtype)


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------- sources
def test_single_file_and_directory(tmp_path):
    sd = mixed_state_dict()
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    save_file(sd, str(path))
    ref = load_file(str(path))
    for src in (open_checkpoint(path), open_checkpoint(path.parent), open_checkpoint(str(path))):
        assert isinstance(src, SafetensorsSource)
        assert_source_matches(src, ref)
        assert src.info("head.weight").file == str(path)
    src = open_checkpoint(path)
    a = src.get("embed.weight")
    a.zero_()  # the caller owns the tensor: the next get is unaffected
    assert torch.equal(src.get("embed.weight"), sd["embed.weight"])


def test_keys_follow_byte_order(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.ones(3), "c": torch.zeros(1, dtype=torch.float64)}, str(path))
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    header.pop("__metadata__", None)
    assert open_checkpoint(path).keys() == sorted(header, key=lambda k: header[k]["data_offsets"][0])


def test_hf_sharded_directory(tmp_path):
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size=6000, safe_serialization=True)
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == SHARD_NAMES
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    ref = {}
    for name in SHARD_NAMES:
        ref.update(load_file(str(tmp_path / name)))
    src = open_checkpoint(tmp_path)
    assert_source_matches(src, ref, file_order=weight_map)
    assert all(src.info(k).dtype == torch.bfloat16 for k in src.keys())  # noqa: SIM118 (a source, not a dict)
    assert src.info("model.embed_tokens.weight").file == str(tmp_path / weight_map["model.embed_tokens.weight"])


@pytest.mark.parametrize("name, wrap", [("pytorch_model.bin", False), ("ckpt.pt", True), ("legacy.pth", False)])
def test_torch_files(tmp_path, name, wrap):
    sd = mixed_state_dict()
    path = tmp_path / name
    obj = {"state_dict": sd, "epoch": 3} if wrap else sd
    torch.save(obj, path, _use_new_zipfile_serialization=not name.startswith("legacy"))
    ref = torch.load(path, weights_only=True)
    ref = ref["state_dict"] if wrap else ref
    src = open_checkpoint(path)
    assert isinstance(src, TorchFileSource)
    assert_source_matches(src, ref, file_order=list(sd))
    t = src.get("embed.weight")
    t.add_(1)
    assert torch.equal(src.get("embed.weight"), sd["embed.weight"])


def test_pickled_module_only_on_request(tmp_path):
    path = tmp_path / "module.pt"
    module = torch.nn.Linear(4, 3)
    torch.save(module, path)
    with pytest.raises(FreeMergeError, match=rf"(?s){path}.*pickled.*allow_pickle"):
        open_checkpoint(path)
    src = open_checkpoint(path, allow_pickle=True)
    assert_source_matches(src, module.state_dict(), file_order=["weight", "bias"])


# ---------------------------------------------------------------------------------------------- errors
def test_missing_file_and_key(tmp_path):
    with pytest.raises(FreeMergeError, match=r"nope\.safetensors.*does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FreeMergeError, match="neither model.safetensors"):
        open_checkpoint(tmp_path)
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.bin")
    for src in (open_checkpoint(path), open_checkpoint(tmp_path / "a.bin")):
        with pytest.raises(CheckpointMismatchError, match=r"a\.(safetensors|bin).*'missing\.key'"):
            src.get("missing.key")
        with pytest.raises(CheckpointMismatchError, match=r"'missing\.key'"):
            src.info("missing.key")


def test_missing_shard_names_index_and_shard(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size=12000, safe_serialization=True)
    (tmp_path / SHARD_NAMES[1]).unlink()
    with pytest.raises(FreeMergeError, match=rf"{INDEX_NAME}.*{SHARD_NAMES[1]}.*does not exist"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [5, 40, -7])
def test_truncated_safetensors(tmp_path, keep):
    path = tmp_path / "t.safetensors"
    save_file(mixed_state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # inside the length, inside the header, inside the data
    with pytest.raises(FreeMergeError, match=rf"{path}.*damaged or truncated"):
        open_checkpoint(path)


def test_truncated_after_open_and_damaged_torch_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(path))
    src = open_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FreeMergeError, match=rf"{path}.*damaged or truncated.*'b'"):
        src.get("b")
    bad = tmp_path / "bad.bin"
    torch.save({"a": torch.zeros(4)}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(FreeMergeError, match=rf"{bad}.*damaged, truncated"):
        open_checkpoint(bad)


def test_tensors_are_private_mappings_of_their_bytes(tmp_path):
    """``get`` maps the tensor's bytes copy-on-write: the same values as the file (a misaligned fp32 tensor
    too: safetensors does not align, the tensor gets aligned memory), an in-place op changes neither the file
    nor the next ``get``, no file descriptor is held while the tensor lives, and the file is no longer mapped
    once the tensor is gone."""
    from freemerge_pl.io.safetensors_file import write_safetensors

    sd = {"h": torch.arange(6).to(torch.bfloat16), "x": torch.tensor([0.5, -2.0]),
          "mask": torch.tensor([True, False, True]), "w": torch.arange(4, dtype=torch.float32) / 3}
    # data bytes: h 0..12, x 12..20 (aligned: mapped), mask 20..23, w 23..39 (misaligned: copied)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, plan_of(sd), {}, sd.values())
    before = path.read_bytes()
    src = open_checkpoint(path)
    assert src._entries["w"].start % 4 != 0 and src._entries["x"].start % 4 == 0  # the layout under test
    assert_source_matches(src, sd)
    w, h = src.get("w"), src.get("h")
    assert w.data_ptr() % 4 == 0 and torch.equal(w, sd["w"])
    fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    h.add_(1)
    assert torch.equal(h, sd["h"] + 1)
    assert path.read_bytes() == before and torch.equal(src.get("h"), sd["h"])
    if fds is not None:
        assert set(os.listdir("/proc/self/fd")) == fds  # the mapping holds no descriptor
        maps = Path("/proc/self/maps")
        assert str(path) in maps.read_text()
        del w, h
        assert str(path) not in maps.read_text()


def test_unmappable_file_is_a_one_line_error(tmp_path, monkeypatch):
    """torch's mapping error (e.g. no read permission, which root cannot be denied in a test) becomes the
    one-line error naming the file and the tensor."""
    path = tmp_path / "p.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    src = open_checkpoint(path)

    def refuse(filename, shared, nbytes):
        raise RuntimeError(f"unable to open file <{filename}> in read-only mode: Permission denied (13)\nmore")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", refuse)
    with pytest.raises(FreeMergeError, match=rf"{path} \(tensor 'w'\) cannot be mapped: .*Permission denied \(13\)$"):
        src.get("w")


# ---------------------------------------------------------------------------------------------- sink
def write_all(sink, sd, skip=(), state_of=lambda k: None):
    for k, t in sd.items():
        if k not in skip:
            sink.write(k, t, state=state_of(k))


def test_sink_single_shard_equals_save_file(tmp_path):
    sd = mixed_state_dict()
    with ShardedSafetensorsSink(tmp_path / "out", plan_of(sd)) as sink:
        write_all(sink, sd)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    save_file(sd, str(tmp_path / "ref.safetensors"))
    got, ref = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert list(got) == list(ref) or sorted(got) == sorted(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert open_checkpoint(tmp_path / "out").keys() == list(sd)  # written in plan order


def test_sink_three_shards_load_with_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "out"
    sink = ShardedSafetensorsSink(out, plan_of(sd), max_shard_bytes=12000, metadata={"merged_by": "test"})
    write_all(sink, sd)
    assert not (out / INDEX_NAME).exists() and (out / JOURNAL_NAME).exists()  # not complete before close()
    sink.close()
    assert sorted(os.listdir(out)) == [*SHARD_NAMES, INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert list(index["weight_map"]) == list(sd)  # plan order, read back in it
    for name in SHARD_NAMES:
        part = load_file(str(out / name))
        assert all(index["weight_map"][k] == name and torch.equal(part[k], sd[k]) for k in part)
        with safe_open(str(out / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "merged_by": "test"}
    assert_source_matches(open_checkpoint(out), sd, file_order=list(sd))
    model.config.save_pretrained(out)
    loaded = LlamaForCausalLM.from_pretrained(out).state_dict()
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert load_state_dict(out).keys() == sd.keys()


def test_sink_streams_into_partial_files(tmp_path):
    sd = {f"w{i}": torch.full((4,), float(i)) for i in range(6)}
    sink = ShardedSafetensorsSink(tmp_path, plan_of(sd), max_shard_bytes=32)  # 2 tensors per shard
    sink.write("w0", sd["w0"])
    assert os.listdir(tmp_path) == [f".{SHARD_NAMES[0]}.partial"]
    sink.write("w1", sd["w1"], state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == [JOURNAL_NAME, SHARD_NAMES[0]]
    assert sink.completed_keys() == ["w0", "w1"] and sink.resume_state() == {"step": 2}
    with pytest.raises(FreeMergeError, match=r"4 planned tensor\(s\) not written.*'w2'"):
        sink.close()


def test_sink_order_shape_dtype_errors(tmp_path):
    sd = mixed_state_dict()
    sink = ShardedSafetensorsSink(tmp_path, plan_of(sd))
    with pytest.raises(CheckpointMismatchError, match=r"expected tensor 'embed.weight' next.*'head.weight'"):
        sink.write("head.weight", sd["head.weight"])
    with pytest.raises(CheckpointMismatchError, match=r"'embed.weight'.*\(10, 8\).*got shape \(8, 10\)"):
        sink.write("embed.weight", sd["embed.weight"].T)
    with pytest.raises(CheckpointMismatchError, match=r"'embed.weight'.*torch.float32.*got .*torch.float16"):
        sink.write("embed.weight", sd["embed.weight"].half())
    with pytest.raises(FreeMergeError, match="not JSON-serialisable"):
        sink.write("embed.weight", sd["embed.weight"], state={"rng": torch.zeros(1)})
    sink.write("embed.weight", sd["embed.weight"])
    with pytest.raises(CheckpointMismatchError, match=r"got 'embed.weight' \(already written\)"):
        sink.write("embed.weight", sd["embed.weight"])
    with pytest.raises(CheckpointMismatchError, match=r"got 'nope' \(not in the plan\)"):
        sink.write("nope", sd["embed.weight"])
    sink.abort()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------------------------------- resume
def big_state_dict():
    """Nine tensors, three shards at ``max_shard_bytes=200`` (three 64-byte tensors each)."""
    g = torch.Generator().manual_seed(1)
    return {f"layer.{i}.weight": torch.randn(32, generator=g).to(torch.bfloat16) if i % 2
            else torch.randn(16, generator=g) for i in range(9)}


def shards_plan(sd):
    """The plan and the shard size that gives three shards of three tensors."""
    return plan_of(sd), 200


def uninterrupted(tmp_path, sd, fingerprint="fp"):
    plan, size = shards_plan(sd)
    out = tmp_path / "clean"
    with ShardedSafetensorsSink(out, plan, max_shard_bytes=size, fingerprint=fingerprint) as sink:
        write_all(sink, sd, state_of=lambda k: {"after": k})
    return file_bytes(out)


def interrupted(out, sd, stop_after, fingerprint="fp", how="abandon"):
    """Write the first ``stop_after`` tensors, then abandon the sink without close() (or raise inside its
    ``with`` block, which aborts the shard in progress)."""
    plan, size = shards_plan(sd)
    if how == "abandon":
        sink = ShardedSafetensorsSink(out, plan, max_shard_bytes=size, fingerprint=fingerprint)
        for k, t in list(sd.items())[:stop_after]:
            sink.write(k, t, state={"after": k})
        return  # no close(), no abort(): the shard in progress stays behind as a .partial file
    with pytest.raises(RuntimeError, match="interrupted"), \
            ShardedSafetensorsSink(out, plan, max_shard_bytes=size, fingerprint=fingerprint) as sink:
        for k, t in list(sd.items())[:stop_after]:
            sink.write(k, t, state={"after": k})
        raise RuntimeError("interrupted")


def resume(out, sd, fingerprint="fp"):
    plan, size = shards_plan(sd)
    sink = ShardedSafetensorsSink(out, plan, max_shard_bytes=size, fingerprint=fingerprint)
    done = sink.completed_keys()
    state = sink.resume_state()
    write_all(sink, sd, skip=set(done), state_of=lambda k: {"after": k})
    sink.close()
    return done, state


@pytest.mark.parametrize("how", ["abandon", "raise"])
def test_resume_is_byte_identical(tmp_path, how):
    sd = big_state_dict()
    keys = list(sd)
    clean = uninterrupted(tmp_path, sd)
    assert sorted(clean) == [*SHARD_NAMES, INDEX_NAME]
    out = tmp_path / "run"
    interrupted(out, sd, stop_after=7, how=how)
    partial = [f".{SHARD_NAMES[2]}.partial"] if how == "abandon" else []
    assert sorted(os.listdir(out)) == sorted([JOURNAL_NAME, *SHARD_NAMES[:2], *partial])
    done, state = resume(out, sd)
    assert done == keys[:6] and state == {"after": keys[5]}
    assert file_bytes(out) == clean


def test_resume_after_every_shard_before_close(tmp_path):
    sd = big_state_dict()
    clean = uninterrupted(tmp_path, sd)
    out = tmp_path / "run"
    interrupted(out, sd, stop_after=len(sd))
    assert INDEX_NAME not in os.listdir(out)
    done, state = resume(out, sd)
    assert done == list(sd) and state == {"after": list(sd)[-1]}
    assert file_bytes(out) == clean


def test_other_fingerprint_starts_over(tmp_path):
    sd = big_state_dict()
    clean = uninterrupted(tmp_path, sd, fingerprint="new")
    out = tmp_path / "run"
    interrupted(out, sd, stop_after=4)
    assert (out / SHARD_NAMES[0]).exists()
    plan, size = shards_plan(sd)
    sink = ShardedSafetensorsSink(out, plan, max_shard_bytes=size, fingerprint="new")
    assert sink.completed_keys() == [] and sink.resume_state() is None
    assert os.listdir(out) == []  # the other run's shard and journal are gone
    write_all(sink, sd, state_of=lambda k: {"after": k})
    sink.close()
    assert file_bytes(out) == clean
    interrupted(out, sd, stop_after=4, fingerprint="new")
    smaller = ShardedSafetensorsSink(out, plan, max_shard_bytes=size - 8, fingerprint="new")  # another plan
    assert smaller.completed_keys() == []


@pytest.mark.parametrize("corrupt, kept", [(0, 0), (1, 3)])
def test_corrupted_shard_is_redone(tmp_path, corrupt, kept):
    sd = big_state_dict()
    clean = uninterrupted(tmp_path, sd)
    out = tmp_path / "run"
    interrupted(out, sd, stop_after=8)
    path = out / SHARD_NAMES[corrupt]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    done, _ = resume(out, sd)
    assert done == list(sd)[:kept]
    assert file_bytes(out) == clean


WRITER = textwrap.dedent("""
    import sys, time
    from safetensors.torch import load_file
    from freemerge_pl.io import ShardedSafetensorsSink
    from freemerge_pl.merging.source import TensorInfo

    sd = load_file(sys.argv[1])
    plan = [(k, TensorInfo(tuple(t.shape), t.dtype)) for k, t in sd.items()]
    sink = ShardedSafetensorsSink(sys.argv[2], plan, max_shard_bytes=200, fingerprint="fp")
    for k, t in sd.items():
        before = len(sink.completed_keys())
        sink.write(k, t, state={"after": k})
        if len(sink.completed_keys()) > before:
            print("shard", flush=True)
        time.sleep(0.3)
    sink.close()
    print("done", flush=True)
""")


def test_sigkill_midway_then_resume(tmp_path):
    save_file(big_state_dict(), str(tmp_path / "input.safetensors"))
    sd = load_file(str(tmp_path / "input.safetensors"))  # the data and order the writer sees
    clean = uninterrupted(tmp_path, sd)
    out = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "input.safetensors"), str(out)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "shard"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(out)
    assert JOURNAL_NAME in names and INDEX_NAME not in names
    done, state = resume(out, sd)
    assert len(done) >= 3 and state == {"after": done[-1]}
    assert file_bytes(out) == clean
