"""Checkpoint I/O: atomic safetensors writes, sharding with an index, load paths, the merge sidecar."""

import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import freemerge_pl
import freemerge_pl.io as fio
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io import (
    INDEX_NAME,
    load_state_dict,
    save_safetensors_atomic,
    save_state_dict,
    sha256_file,
    write_json_atomic,
)
from freemerge_pl.io.export import read_task_module, save_merge, save_task_module
from freemerge_pl.merging import SparseExpert, merge


def small_state_dict():
    return {
        "embed.weight": torch.randn(10, 8),
        "blocks.0.weight": torch.randn(8, 8).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(8).half(),
        "pos_ids": torch.arange(10),
        "head.weight": torch.randn(3, 8),
    }


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_atomic_save_round_trip_and_permissions(tmp_path):
    sd = small_state_dict()
    tied = {"a": sd["embed.weight"], "b": sd["embed.weight"]}  # shared storage is fine
    path = save_safetensors_atomic({**sd, **tied}, tmp_path / "sub" / "m.safetensors", metadata={"k": "v"})
    assert_same(load_file(str(path)), {**sd, **tied})
    assert sorted(os.listdir(path.parent)) == ["m.safetensors"]
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IRGRP  # not mkstemp's private 0600


def _crashing_save_file(filename, *args):
    with open(filename, "wb") as f:
        f.write(b"partial safetensors header")
    raise OSError("disk full (simulated)")


def test_crash_while_saving_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fio.safetensors_file, "write_safetensors", _crashing_save_file)
    dest = tmp_path / "model.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic(small_state_dict(), dest)
    assert os.listdir(tmp_path) == []


def test_crash_while_saving_keeps_existing_destination(tmp_path, monkeypatch):
    dest = tmp_path / "model.safetensors"
    save_safetensors_atomic(small_state_dict(), dest)
    before = dest.read_bytes()
    monkeypatch.setattr(fio.safetensors_file, "write_safetensors", _crashing_save_file)
    with pytest.raises(OSError):
        save_safetensors_atomic({"x": torch.zeros(3)}, dest)
    assert dest.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    # the same holds for experts and for whole merges (each file goes through the atomic writer)
    expert = SparseExpert({"w": (torch.tensor([1], dtype=torch.int32), torch.tensor([0.5]))})
    with pytest.raises(OSError):
        save_task_module(expert, tmp_path / "expert_00.safetensors")
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_crash_while_writing_json_keeps_existing_file(tmp_path, monkeypatch):
    dest = write_json_atomic({"a": 1}, tmp_path / "info.json")

    def crash(obj, f, **kwargs):
        f.write('{"a": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(fio.files.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic({"a": 2}, dest)
    monkeypatch.undo()
    assert json.loads(dest.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["info.json"]


def test_sharded_save_round_trips_and_writes_the_index(tmp_path):
    sd = small_state_dict()
    max_bytes = 300
    written = save_state_dict(sd, tmp_path, max_shard_bytes=max_bytes)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for name in shards:
        part = load_file(str(tmp_path / name))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= max_bytes or len(part) == 1  # a single tensor larger than a shard gets its own
        assert all(index["weight_map"][k] == name for k in part)
    assert {p.name for p in written} == set(shards) | {INDEX_NAME}
    assert_same(load_state_dict(tmp_path), sd)


def test_unsharded_save_after_sharded_save_is_what_loads(tmp_path):
    save_state_dict(small_state_dict(), tmp_path, max_shard_bytes=300)
    fresh = small_state_dict()
    save_state_dict(fresh, tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()
    assert_same(load_state_dict(tmp_path), fresh)
    assert_same(load_state_dict(tmp_path / "model.safetensors"), fresh)


def test_load_paths(tmp_path):
    sd = small_state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    assert_same(load_state_dict(tmp_path / "ckpt.pt"), sd)
    torch.save(sd, tmp_path / "plain.bin")
    assert_same(load_state_dict(tmp_path / "plain.bin"), sd)
    with pytest.raises(FreeMergeError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FreeMergeError, match="neither model.safetensors nor"):
        load_state_dict(tmp_path / "empty")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FreeMergeError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_save_merge_writes_backbone_experts_and_sidecar(tmp_path):
    pre = {"w": torch.randn(8, 6), "b": torch.randn(6), "pos_ids": torch.arange(4)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape) if v.is_floating_point() else v) for k, v in pre.items()}
           for _ in range(2)]
    inputs = []
    for name, sd in [("pre", pre), ("cars", fts[0]), ("dtd", fts[1])]:
        inputs.append(save_safetensors_atomic(sd, tmp_path / "inputs" / f"{name}.safetensors"))
    loaded = [load_state_dict(p) for p in inputs]
    out = merge(loaded[0], loaded[1:], "free_merging", names=["cars", "dtd"], filter_ratio=0.2,
                expert_density=0.1)
    dest = tmp_path / "merged"
    written = save_merge(out, dest, inputs=inputs, max_shard_bytes=150)
    info = json.loads((dest / "merge_info.json").read_text())
    assert info["method"] == "free_merging"
    assert info["hyperparameters"]["filter_ratio"] == 0.2 and info["hyperparameters"]["expert_density"] == 0.1
    assert info["package_version"] == freemerge_pl.__version__
    assert info["names"] == ["cars", "dtd"]
    for rec, path in zip(info["inputs"], inputs):
        assert rec["path"] == str(path)
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert info["task_module_files"] == ["task_module_00.safetensors", "task_module_01.safetensors"]
    assert_same(load_state_dict(dest), out.state_dict)
    assert (dest / INDEX_NAME).exists()  # 150-byte shards: the backbone is sharded
    for k, name in enumerate(info["task_module_files"]):
        expert = read_task_module(dest / name)
        for key in expert.keys:
            assert torch.equal(expert.entries(key)[1], out.task_modules[k].entries(key)[1])
    assert all(p.exists() for p in written)
    assert not [p for p in dest.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("kind", ["safetensors", "zip_pt", "legacy_pt", "empty_pt"])
def test_damaged_files_are_named(tmp_path, kind):
    """A truncated checkpoint raises FreeMergeError naming the file and saying it is damaged or truncated
    (not safetensors' bare SafetensorError, torch's RuntimeError/EOFError or struct.error)."""
    sd = small_state_dict()
    path = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.pt")
    if kind == "safetensors":
        save_safetensors_atomic(sd, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=kind != "legacy_pt")
    os.truncate(path, 0 if kind == "empty_pt" else path.stat().st_size // 2)
    with pytest.raises(FreeMergeError, match=rf"{path}.*(damaged|truncated)"):
        load_state_dict(path)
    with pytest.raises(FreeMergeError, match=rf"{path}.*(damaged|truncated)"):
        fio.open_checkpoint(path)


def test_truncated_shard_is_named(tmp_path):
    save_state_dict(small_state_dict(), tmp_path, max_shard_bytes=100)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 4)
    with pytest.raises(FreeMergeError, match=rf"{shard} is damaged or truncated"):
        load_state_dict(tmp_path)


def test_pickled_objects_are_refused_with_their_own_error(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(fio.PickledObjectsError, match=rf"{path} holds pickled Python objects"):
        load_state_dict(path)


def test_verify_manifest(tmp_path, monkeypatch):
    for name, text in (("a.txt", "alpha"), ("sub/b.txt", "beta")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    table = fio.file_records(tmp_path, ["a.txt", "sub/b.txt"])
    assert table["sub/b.txt"] == {"bytes": 4, "sha256": hashlib.sha256(b"beta").hexdigest()}
    fio.verify_manifest(tmp_path, table, remedy="rebuild it")
    # same size, other bytes: found by the sha256 (the file is new to this process's memo)
    (tmp_path / "sub" / "b.txt").write_text("BETA")
    os.utime(tmp_path / "sub" / "b.txt", ns=(0, 10**9))
    with pytest.raises(FreeMergeError, match=r"sub/b\.txt is damaged: its sha256 .* differs.*; rebuild it"):
        fio.verify_manifest(tmp_path, table, remedy="rebuild it")
    fio.verify_manifest(tmp_path, table, remedy="rebuild it", names=["a.txt"])  # a subset only
    with pytest.raises(FreeMergeError, match=r"a\.txt is damaged or truncated: 3 bytes, its manifest records 5"):
        (tmp_path / "a.txt").write_text("alp")
        fio.verify_manifest(tmp_path, table, remedy="rebuild it", names=["a.txt"])
    (tmp_path / "a.txt").unlink()
    with pytest.raises(FreeMergeError, match=r"a\.txt is missing .*; rebuild it"):
        fio.verify_manifest(tmp_path, table, remedy="rebuild it", names=["a.txt"])
    with pytest.raises(FreeMergeError, match=r"c\.txt: the manifest .* has no size and sha256"):
        fio.verify_manifest(tmp_path, table, remedy="rebuild it", names=["c.txt"])


# ------------------------------------------------------------------------------------------ one publish
def test_a_nested_directory_is_published_whole_with_its_manifest_and_verified(tmp_path):
    """The zoos' shape: nested files, their own manifest name; unlisted leftovers are dropped at publish."""
    dest = tmp_path / "zoo"
    with fio.staged_directory(dest, manifest_name="manifest.json") as staging:
        (staging / "tasks" / "a").mkdir(parents=True)
        (staging / "tasks" / "a" / "w.bin").write_bytes(b"\x00\x01\x02")
        (staging / "top.json").write_text("{}")
        (staging / "leftover").mkdir()
        (staging / "leftover" / "old.bin").write_bytes(b"old")
        manifest = fio.publish_directory(staging, dest, {"format": 3}, manifest_name="manifest.json",
                                         files=["tasks/a/w.bin", staging / "top.json"])
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "manifest.json", "tasks/a/w.bin", "top.json"]
    assert manifest["files"] == {"tasks/a/w.bin": {"bytes": 3, "sha256": hashlib.sha256(b"\x00\x01\x02").hexdigest()},
                                 "top.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    assert json.loads((dest / "manifest.json").read_text()) == manifest and manifest["format"] == 3
    assert fio.read_manifest(dest, "manifest.json") == manifest
    assert fio.verify_published(dest, manifest_name="manifest.json", remedy="rebuild") == manifest
    (dest / "tasks" / "a" / "stray.bin").write_bytes(b"x")
    with pytest.raises(FreeMergeError, match=r"tasks/a/stray\.bin is not listed in .*manifest\.json.*; rebuild"):
        fio.verify_published(dest, manifest_name="manifest.json", remedy="rebuild")
    (dest / "tasks" / "a" / "stray.bin").unlink()
    # a directory this package published is replaced whole; a table the writer computed itself is kept as is
    with fio.staged_directory(dest, manifest_name="manifest.json") as staging:
        (staging / "b.txt").write_text("b")
        table = {"b.txt": {"bytes": 1, "sha256": hashlib.sha256(b"b").hexdigest()}}
        fio.publish_directory(staging, dest, {"files": table}, manifest_name="manifest.json")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt", "manifest.json"]
    assert fio.read_manifest(dest, "manifest.json") == {"files": table}
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]  # no staging or moved-aside directory left


def test_read_manifest_raises_naming_the_file(tmp_path):
    with pytest.raises(FreeMergeError, match=rf"{tmp_path / 'manifest.json'} does not exist; build it"):
        fio.read_manifest(tmp_path, "manifest.json", remedy="build it")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FreeMergeError, match=r"manifest\.json is damaged \(not valid JSON"):
        fio.read_manifest(tmp_path, "manifest.json")
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FreeMergeError, match=r"manifest\.json is damaged \(a JSON list, not an object\)"):
        fio.read_manifest(tmp_path, "manifest.json")
    assert not fio.is_own_export(tmp_path, "manifest.json")
    with pytest.raises(ConfigError, match="not an export of freemerge_pl"):
        fio.check_output_dir(tmp_path, manifest_name="manifest.json")


def test_a_merge_job_output_of_the_previous_layout_reads_back(tmp_path):
    """Before this layout a merge job also wrote ``task_modules.json`` (names, types, files) and no
    ``task_names`` in its manifest: ``read_export`` ignores the sidecar and takes the names from the files."""
    g = torch.Generator().manual_seed(3)
    pre = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    out = merge(pre, fts, "free_merging", names=["x", "y"], expert_density=0.25)
    staging = tmp_path / "staging"
    files = fio.save_task_modules(out.task_modules, {}, staging, names=["x", "y"], method="free_merging")
    files += fio.save_state_dict(out.state_dict, staging)
    files.append(write_json_atomic({"method": "free_merging", "names": ["x", "y"], "types": ["SparseExpert"] * 2,
                                    "files": [p.name for p in files[:2]], "shared": []},
                                   staging / "task_modules.json"))
    fio.publish_directory(staging, tmp_path / "job", {"method": "free_merging", "config": {}}, files=files)
    export = fio.read_export(tmp_path / "job")
    assert export.task_names == ["x", "y"]
    assert_same(export.state_dict, out.state_dict)
    for mine, theirs in zip(export.task_modules, out.task_modules):
        assert type(mine) is SparseExpert and mine.keys == theirs.keys
        for key in theirs.keys:
            assert torch.equal(mine.entries(key)[0].long(), theirs.entries(key)[0].long())
            assert torch.equal(mine.entries(key)[1], theirs.entries(key)[1])
