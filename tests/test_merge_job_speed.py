"""The merge job's fast path (issue 27, item 1): ``cli.py merge`` starts without Lightning, the NaN/Inf check
runs on the tensors the merge pass reads (no second read of the inputs), shard digests come from the write,
the next key's inputs are read ahead and shards written behind, and none of it changes a byte of the output."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from freemerge_pl.errors import FreeMergeError, NonFiniteError
from freemerge_pl.io import checkpoints, files, open_checkpoint
from freemerge_pl.io.sink import ShardedSafetensorsSink
from freemerge_pl.jobs import stream
from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job
from freemerge_pl.jobs.stream import Prefetcher, stream_merge
from freemerge_pl.merging import build_method
from freemerge_pl.merging.source import StateDictSource, TensorInfo

REPO = Path(__file__).resolve().parents[1]
#: keys of several sizes, in safetensors' (sorted) order; sizes grow and shrink so that every allocation path runs
SHAPES = {"a.embed": (40, 24), "b.norm": (24,), "c.proj": (24, 24), "d.up": (64, 24), "e.down": (24, 64),
          "f.norm": (24,), "g.head": (40, 24)}
LAMBDA = 0.3


def bf16_models(root: Path, k: int = 3) -> list[Path]:
    """A bf16 base and ``k`` fine-tunes (base + seeded noise), one ``model.safetensors`` each."""
    g = torch.Generator().manual_seed(7)
    base = {n: (0.02 * torch.randn(s, generator=g)).bfloat16() for n, s in SHAPES.items()}
    dirs = []
    for i, name in enumerate(["base"] + [f"ft{j}" for j in range(k)]):
        sd = base if i == 0 else {n: (t.float() + 0.001 * torch.randn(t.shape, generator=g)).bfloat16()
                                  for n, t in base.items()}
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(root / name / "model.safetensors"))
        dirs.append(root / name)
    (root / "base" / "config.json").write_text('{"model_type": "llama"}')
    return dirs


def naive_task_arithmetic(dirs: list[Path]) -> dict[str, torch.Tensor]:
    """θ_pre + λ Σ_k (θ_k − θ_pre) in float32 per entry, rounded once to bf16: written out here from the files,
    with the sum in task order (as task arithmetic adds)."""
    pre = load_file(str(dirs[0] / "model.safetensors"))
    fts = [load_file(str(d / "model.safetensors")) for d in dirs[1:]]
    out = {}
    for key, p in pre.items():
        total = fts[0][key].float() - p.float()
        for ft in fts[1:]:
            total = total + (ft[key].float() - p.float())
        out[key] = (p.float() + total * LAMBDA).bfloat16()
    return out


def job(dirs, out, **overrides):
    return {"base_model": str(dirs[0]), "models": [str(d) for d in dirs[1:]], "merge_method": "task_arithmetic",
            "parameters": {"scaling": LAMBDA}, "dtype": "bfloat16", "out_shard_size": 4000,
            "output_dir": str(out), **overrides}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model*.safetensors*"))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bf16_models(tmp_path_factory.mktemp("bf16"))


def test_output_equals_a_naive_merge_with_prefetch_background_writes_and_low_memory(models, tmp_path):
    fast = run_merge_job(MergeJobConfig(**job(models, tmp_path / "fast", prefetch=True)), progress=False)
    slow = run_merge_job(MergeJobConfig(**job(models, tmp_path / "slow", low_memory=True)), progress=False)
    assert len(list((tmp_path / "fast").glob("model-*.safetensors"))) >= 3  # several shards
    got = {}
    for path in (tmp_path / "fast").glob("model-*.safetensors"):
        got.update(load_file(str(path)))
    want = naive_task_arithmetic(models)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key].view(torch.int16), want[key].view(torch.int16)), key
    assert shard_bytes(tmp_path / "fast") == shard_bytes(tmp_path / "slow")
    assert fast["files"] == slow["files"]
    # prefetch and low_memory decide nothing about the output: the manifests are equal too
    assert (tmp_path / "fast" / "merge_info.json").read_bytes() == (tmp_path / "slow" / "merge_info.json").read_bytes()


def test_a_resumed_run_with_prefetch_writes_the_same_bytes(models, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_merge_job(MergeJobConfig(**job(models, whole)), progress=False)
    out = tmp_path / "resumed"
    real = ShardedSafetensorsSink._finish
    calls = []

    def stop_after_two_shards(self, shard, state):
        real(self, shard, state)
        calls.append(shard.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two shards

    monkeypatch.setattr(ShardedSafetensorsSink, "_finish", stop_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        run_merge_job(MergeJobConfig(**job(models, out, prefetch=True)), progress=False)
    assert not out.exists() and len(list((tmp_path / ".resumed.partial").glob("model-*.safetensors"))) == 2
    monkeypatch.setattr(ShardedSafetensorsSink, "_finish", real)
    run_merge_job(MergeJobConfig(**job(models, out, prefetch=True)), progress=False)
    assert shard_bytes(out) == shard_bytes(whole)
    assert (out / "merge_info.json").read_bytes() == (whole / "merge_info.json").read_bytes()


@pytest.mark.parametrize("prefetch", [False, True])
def test_every_input_tensor_is_read_once_and_shards_are_not_hashed_again(models, tmp_path, monkeypatch, prefetch):
    reads, hashed = [], []
    real_get, real_sha = checkpoints.SafetensorsSource.get, files.sha256_file
    monkeypatch.setattr(checkpoints.SafetensorsSource, "get", lambda self, key: reads.append(key) or
                        real_get(self, key))
    monkeypatch.setattr(files, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or
                        real_sha(path, *a))
    out = tmp_path / "once"
    run_merge_job(MergeJobConfig(**job(models, out, prefetch=prefetch)), progress=False)
    assert sorted(reads) == sorted(list(SHAPES) * len(models))  # no separate NaN/Inf scan
    assert not [n for n in hashed if n.startswith("model-")]
    manifest = json.loads((out / "merge_info.json").read_text())
    for name, rec in manifest["files"].items():  # the digests taken while writing are the files' sha256
        assert rec["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_nan_in_a_late_key_stops_the_job_before_publishing(models, tmp_path, prefetch):
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(str(models[2] / "model.safetensors"))
    sd["g.head"][5, 3] = float("inf")
    save_file(sd, str(bad / "model.safetensors"))
    cfg = job(models, tmp_path / "out", prefetch=prefetch)
    cfg["models"][1] = {"model": str(bad), "name": "bad"}
    with pytest.raises(NonFiniteError, match=r"checkpoint 'bad' \(.*bad/model.safetensors\) key 'g.head' "
                                             r"\(shape \(40, 24\)\) holds 1 NaN/Inf"):
        run_merge_job(MergeJobConfig(**cfg), progress=False)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / ".out.partial").glob(".*.partial"))  # the shard in progress was dropped
    cfg["check_finite"] = False
    run_merge_job(MergeJobConfig(**cfg), progress=False)  # the check can be turned off
    assert (tmp_path / "out" / "merge_info.json").exists()


def test_prefetcher_serves_every_access_order_with_the_sources_tensors():
    g = torch.Generator().manual_seed(3)
    sds = [{f"k{i}": torch.randn(5 + i, generator=g) for i in range(6)} for _ in range(3)]
    sources = [StateDictSource(sd, name=f"s{j}") for j, sd in enumerate(sds)]
    order = [f"k{i}" for i in range(6)]
    accesses = ([(k, j) for k in order for j in range(3)]  # the merge pass
                + [(k, j) for k in order for j in (2, 0, 1, 1)]  # repeated gets of one key
                + [("k4", 0), ("k1", 2), ("k5", 1), ("k0", 0), ("k2", 1)])  # out of order
    prefetcher = Prefetcher(sources, order)
    wrapped = prefetcher.wrap()
    try:
        for key, j in accesses:
            assert torch.equal(wrapped[j].get(key), sds[j][key]), (key, j)
    finally:
        prefetcher.close()
    assert [s.name for s in wrapped] == ["s0", "s1", "s2"]


def test_prefetched_read_errors_reach_the_caller():
    class Broken(StateDictSource):
        def get(self, key):
            if key == "k1":
                raise FreeMergeError("checkpoint file x.safetensors (tensor 'k1') no longer exists")
            return super().get(key)

    sd = {"k0": torch.ones(2), "k1": torch.ones(2)}
    prefetcher = Prefetcher([Broken(sd)], ["k0", "k1"])
    (src,) = prefetcher.wrap()
    try:
        src.get("k0")  # starts reading k1 on the prefetch thread
        with pytest.raises(FreeMergeError, match="tensor 'k1'"):
            src.get("k1")
    finally:
        prefetcher.close()


def test_background_sink_raises_a_write_error_and_drops_the_partial_shard(tmp_path, monkeypatch):
    plan = [(f"t{i}", TensorInfo((100,), torch.float32)) for i in range(4)]
    sink = ShardedSafetensorsSink(tmp_path, plan, max_shard_bytes=10**6, background=True)
    failing = threading.Event()

    def append(self, data):
        if failing.is_set():
            raise OSError(28, "No space left on device")
        self._file.write(data)
        self._hash.update(data)

    monkeypatch.setattr(ShardedSafetensorsSink, "_append", append)
    sink.write("t0", torch.ones(100))
    failing.set()
    sink.write("t1", torch.ones(100))
    with pytest.raises(OSError, match="No space left"):
        sink.write("t2", torch.ones(100))
    sink.abort()
    assert not list(tmp_path.glob("*.safetensors*")) and not list(tmp_path.glob(".*.partial"))


def test_stream_merge_is_the_same_with_and_without_prefetch(models, tmp_path):
    method = build_method("ties", {"density": 0.3, "trim_scope": "tensor"})
    outs = []
    for prefetch, low_memory in ((True, False), (False, True)):
        d = tmp_path / f"p{prefetch}"
        stream_merge(open_checkpoint(models[0]), [open_checkpoint(m) for m in models[1:]], method, d,
                     max_shard_bytes=3000, prefetch=prefetch, low_memory=low_memory)
        outs.append(shard_bytes(d))
    assert outs[0] == outs[1] and len(outs[0]) >= 3


def _run_cli(args):
    """``python -X importtime cli.py merge ARGS`` (stderr lists every module imported)."""
    return subprocess.run([sys.executable, "-X", "importtime", str(REPO / "cli.py"), "merge", *args], check=False,
                          capture_output=True, text=True, env={**os.environ, "FREEMERGE_THREADS": "1"},
                          cwd=str(REPO), timeout=300)


def imported(stderr: str) -> set[str]:
    """The modules ``-X importtime`` says were imported."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_cli_merge_dry_run_imports_no_lightning_nor_adapters(models, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job(models, tmp_path / "out")))
    proc = _run_cli(["--config", str(cfg), "--dry-run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run OK" in proc.stderr and not (tmp_path / "out").exists()
    mods = imported(proc.stderr)
    assert "freemerge_pl.jobs.merge_job" in mods and "torch" in mods  # the listing is real
    heavy = {m for m in mods if m.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics",
                                                     "transformers", "timm", "open_clip", "torchvision")}
    heavy |= {m for m in mods if m.startswith(("freemerge_pl.adapters", "freemerge_pl.lightning",
                                               "freemerge_pl.callbacks"))}
    assert not heavy, sorted(heavy)[:10]


def test_cli_merge_help_and_errors_on_the_fast_path(models, tmp_path):
    from dataclasses import fields

    proc = _run_cli(["--help"])
    assert proc.returncode == 0
    for f in fields(MergeJobConfig):
        assert f"--{f.name}" in proc.stdout, f.name
    for option in ("--dry-run", "--resume", "--overwrite", "--config"):
        assert option in proc.stdout
    assert "resumes from its last complete shard" in " ".join(proc.stdout.split())
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job(models, tmp_path / "out")))
    for args, named in ((["--merge_methd", "ties"], "merge_methd"), (["--dtype", "int8"], "dtype"),
                        (["--parameters", "{scaling: .nan}"], "scaling")):
        proc = _run_cli(["--config", str(cfg), *args])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert proc.returncode == 2 and len(errors) == 1 and named in errors[0], proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_allocation_policy_restores_glibc_defaults():
    if stream._MALLOPT is None:
        pytest.skip("not glibc")
    calls = []
    real = stream._MALLOPT
    stream._MALLOPT = lambda param, value: calls.append((param, value)) or real(param, value)
    try:
        with stream.allocation_policy(low_memory=False):
            assert calls == [(stream._M_MMAP_MAX, 0), (stream._M_TRIM_THRESHOLD, 2**31 - 1)]
            x = torch.ones(1 << 20)  # served from the heap while the block runs
            del x
    finally:
        stream._MALLOPT = real
    assert calls[2:] == [(stream._M_MMAP_MAX, stream._DEFAULT_MMAP_MAX),
                         (stream._M_TRIM_THRESHOLD, stream._DEFAULT_TRIM_THRESHOLD)]
    calls.clear()
    stream._MALLOPT = lambda param, value: calls.append((param, value)) or real(param, value)
    try:
        with stream.allocation_policy(low_memory=False) as policy:
            calls.clear()
            policy.use(True)  # an outsized key: 32 MiB buffers and larger in their own mappings
            assert calls == [(stream._M_MMAP_MAX, stream._DEFAULT_MMAP_MAX), (stream._M_MMAP_THRESHOLD, 32 << 20)]
            policy.use(True)  # no change, no call
            assert len(calls) == 2
            policy.use(False)
            assert calls[2:] == [(stream._M_MMAP_MAX, 0), (stream._M_TRIM_THRESHOLD, 2**31 - 1)]
    finally:
        stream._MALLOPT = real


def test_vs_mergekit_launcher_reports_the_tools_own_peak_rss(tmp_path, monkeypatch):
    """A tool run started from this (big) process reported this process's RSS high-water mark, inherited
    across fork + exec; from the launcher it reports its own: ~100 MiB of bytes plus the interpreter."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import vs_mergekit

    ballast = b"x" * 600_000_000  # touched: this process holds > 570 MiB while the child runs
    run = vs_mergekit.run_child([sys.executable, "-c", "b = b'y' * 100_000_000"], tmp_path / "c.log",
                                dict(os.environ))
    assert len(ballast) and run["exit"] == 0
    assert 95 < run["peak_rss_mib"] < 300, run


def test_outsized_key_is_read_after_the_write_in_flight(tmp_path, monkeypatch):
    """The tensor in flight (the background writer) is written before an outsized key's inputs are read, so
    the two never overlap in memory; other keys' reads overlap the write."""
    import time

    from freemerge_pl.io.sink import ShardedSafetensorsSink
    from freemerge_pl.merging import build_method
    from freemerge_pl.merging.source import StateDictSource

    events = []
    real_append = ShardedSafetensorsSink._append

    def slow_append(self, data):
        if isinstance(data, memoryview):  # a tensor's bytes (the header prefix is bytes)
            time.sleep(0.05)
            events.append("written")
        real_append(self, data)

    monkeypatch.setattr(ShardedSafetensorsSink, "_append", slow_append)

    class Recording(StateDictSource):
        def get(self, key):
            events.append(f"read {key}")
            return super().get(key)

    g = torch.Generator().manual_seed(0)
    keys = [f"l{i}" for i in range(30)] + ["head"]  # head: above twice the 90th percentile
    pre = {k: torch.randn(100, 100 if k == "head" else 10, generator=g) for k in keys}
    fts = [{k: v + 0.1 for k, v in pre.items()} for _ in range(2)]
    stream.stream_merge(Recording(pre, "base"), [StateDictSource(f, f"f{i}") for i, f in enumerate(fts)],
                        build_method("task_arithmetic", {}), tmp_path / "out")
    before_head = events[:events.index("read head")]
    assert before_head.count("written") == len(keys) - 1  # l29's bytes too, waited for
    assert events.count("written") == len(keys)
    # without the wait, reads overtake the slow writes: l1 is read before l0's bytes are written
    assert events.index("read l1") < events.index("written")


def test_outsized_keys_are_those_over_twice_the_90th_percentile():
    sizes = {f"layer{i}": 1000 + i for i in range(18)} | {"embed": 2000, "head": 5000, "norm": 10}
    # sorted: 10, 1000..1017, 2000, 5000; the entry at int(0.9·21) = 18 is 1017: outsized means > 2034
    assert stream.outsized_keys(sizes) == {"head"}
    assert stream.outsized_keys({**sizes, "embed": 2035}) == {"embed", "head"}
    assert stream.outsized_keys({"a": 5, "b": 5}) == set() and stream.outsized_keys({}) == set()


def test_outsized_keys_are_computed_under_the_low_memory_policy(tmp_path, monkeypatch):
    """The fast policy (heap, no trim) switches to the outsized one (buffers of 32 MiB or more in their own
    mappings) for a vocabulary-sized key only, and back after it, each switch before the key's inputs are
    read; ``low_memory`` stays low throughout."""
    if stream._MALLOPT is None:
        pytest.skip("not glibc")
    from freemerge_pl.io.sink import ShardedSafetensorsSink
    from freemerge_pl.merging import build_method
    from freemerge_pl.merging.source import StateDictSource

    events = []
    monkeypatch.setattr(stream, "_use", lambda policy: events.append((policy,)))
    real_write = ShardedSafetensorsSink.write
    monkeypatch.setattr(ShardedSafetensorsSink, "write",
                        lambda self, key, t, state=None: events.append(key) or real_write(self, key, t, state))
    g = torch.Generator().manual_seed(0)
    keys = ["embed"] + [f"l{i}" for i in range(30)] + ["head"]  # 2 of 32 keys: above the 90th percentile
    pre = {k: torch.randn(100, 100 if k in ("embed", "head") else 10, generator=g) for k in keys}
    fts = [{k: v + 0.1 for k, v in pre.items()} for _ in range(2)]
    stream.stream_merge(StateDictSource(pre, "base"), [StateDictSource(f, f"f{i}") for i, f in enumerate(fts)],
                        build_method("task_arithmetic", {}), tmp_path / "out")
    layers = [f"l{i}" for i in range(30)]
    assert events == [("fast",), ("outsized",), "embed", ("fast",), *layers, ("outsized",), "head"]
    events.clear()
    stream.stream_merge(StateDictSource(pre, "base"), [StateDictSource(f, f"f{i}") for i, f in enumerate(fts)],
                        build_method("task_arithmetic", {}), tmp_path / "out2", low_memory=True)
    assert events == [("low",), "embed", *layers, "head"]
