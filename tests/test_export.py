"""Exports: every kind of task module (sparse experts, EMR masks, Twin factors) and shared module is written;
an export is published whole (staging directory, manifest last, rename), never mixed with another."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freemerge_pl import io as fio
from freemerge_pl.errors import ConfigError
from freemerge_pl.io.export import save_merge
from freemerge_pl.lightning.loading import load_merged
from freemerge_pl.merging import merge


@pytest.mark.parametrize("method", ["free_merging", "emr", "twin"])
def test_save_merge_writes_every_task_module(tmp_path, method):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, method)
    save_merge(out, tmp_path)
    info = json.loads((tmp_path / "merge_info.json").read_text())
    assert info["task_module_files"][:3] == [f"task_module_{k:02d}.safetensors" for k in range(3)]
    for k, module in enumerate(out.task_modules):
        saved = load_file(str(tmp_path / f"task_module_{k:02d}.safetensors"))
        assert saved and all(torch.equal(t, t) for t in saved.values())
        expected = {n: t for n, t in module.state_dict().items() if isinstance(t, torch.Tensor)}
        if hasattr(module, "index_code"):  # a SparseExpert: its buffers, named by key
            expected = {f"{key}::{part}": expected[f"{part}_{j}"] for j, key in enumerate(module.keys)
                        for part in ("indices", "values")}
        assert set(saved) == set(expected)
        for n, t in expected.items():
            assert torch.equal(saved[n], t)
    for name, module in out.result.shared_modules.items():
        saved = load_file(str(tmp_path / f"shared_{name}.safetensors"))
        for n, t in module.state_dict().items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(saved[n], t)
    if method == "emr":
        assert (tmp_path / "shared_emr_unified.safetensors").exists()


# ------------------------------------------------------------------ publishing: whole, atomic, with a manifest


def tiny_merge(method, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    return merge(pre, fts, method, names=["a", "b", "c"], **kw)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_manifest_is_exact(directory: Path) -> dict:
    """The manifest lists exactly the files present, each with its true size and sha256."""
    info = json.loads((directory / "merge_info.json").read_text())
    assert set(info["files"]) == {p.name for p in directory.iterdir()} - {"merge_info.json"}
    for name, rec in info["files"].items():
        data = (directory / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    return info


def test_export_of_another_method_replaces_the_previous_export_whole(tmp_path):
    out = tmp_path / "merged"
    save_merge(tiny_merge("free_merging", expert_density=0.2), out)
    assert len(list(out.glob("task_module_*.safetensors"))) == 3
    assert_manifest_is_exact(out)
    ties = tiny_merge("ties")
    written = save_merge(ties, out)  # no overwrite needed: the directory holds an export of ours
    info = assert_manifest_is_exact(out)
    assert info["method"] == "ties" and not list(out.glob("task_module_*")) and info["task_module_files"] == []
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or .old left
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], ties.state_dict[k]) for k in ties.state_dict)


def test_an_export_written_before_manifests_is_replaced_whole(tmp_path):
    """The user's case: a FREE-Merging export of the old layout (no file list, a leftover .tmp) then TIES."""
    out = tmp_path / "merged"
    out.mkdir()
    for k in range(8):
        (out / f"task_module_{k:02d}.safetensors").write_bytes(b"old")
    (out / "model.safetensors").write_bytes(b"old")
    (out / ".model.safetensors.abc.tmp").write_bytes(b"half")
    (out / "merge_info.json").write_text(json.dumps({"method": "free_merging"}))
    save_merge(tiny_merge("ties"), out)
    assert_manifest_is_exact(out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "merge_info.json"}


def test_a_foreign_non_empty_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"output directory {out} already exists; pass --overwrite"):
        save_merge(tiny_merge("ties"), out)
    assert snapshot(out) == {"notes.txt": b"keep me"} and not list(tmp_path.glob(".mine*"))
    # an export of ours with a file added by hand is not ours any more either
    save_merge(tiny_merge("ties"), tmp_path / "exp")
    (tmp_path / "exp" / "README").write_text("x")
    with pytest.raises(ConfigError, match=r"exp already exists"):
        save_merge(tiny_merge("ties"), tmp_path / "exp")
    save_merge(tiny_merge("ties"), out, overwrite=True)
    assert_manifest_is_exact(out)
    assert not (out / "notes.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"output path .*file exists and is not a directory"):
        save_merge(tiny_merge("ties"), tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("previous", [True, False])
def test_an_error_midway_leaves_the_previous_export_byte_identical_or_none(tmp_path, monkeypatch, previous):
    out = tmp_path / "merged"
    if previous:
        save_merge(tiny_merge("free_merging", expert_density=0.2), out)
    before = snapshot(out) if previous else None
    real, calls = fio.safetensors_file.write_safetensors, []

    def failing(*args, **kwargs):  # the third file dies half written
        calls.append(1)
        if len(calls) == 3:
            Path(args[0]).write_bytes(b"half")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fio.safetensors_file, "write_safetensors", failing)
    with pytest.raises(KeyboardInterrupt):
        save_merge(tiny_merge("emr"), out)
    assert len(calls) == 3
    if previous:
        assert snapshot(out) == before
        assert load_merged(out).manifest["method"] == "free_merging"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["merged"] if previous else [])  # no staging left
    monkeypatch.setattr(fio.safetensors_file, "write_safetensors", real)
    # a failure of the final rename puts the previous export back
    real_replace = os.replace

    def fail_publish(src, dst):
        if Path(src).name == ".merged.partial":
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_publish)
    with pytest.raises(OSError, match="disk gone"):
        save_merge(tiny_merge("ties"), out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (snapshot(out) == before) if previous else not out.exists()


KILLED_EXPORT = """
import sys, time
from freemerge_pl.io import safetensors_file
from freemerge_pl.io.export import save_merge
from freemerge_pl.merging import merge
import torch

real = safetensors_file.write_safetensors
calls = []

def slow(*args, **kwargs):
    calls.append(1)
    real(*args, **kwargs)
    if len(calls) == 2:
        print("file written", flush=True)
        time.sleep(60)

safetensors_file.write_safetensors = slow
g = torch.Generator().manual_seed(1)
pre = {"w": torch.randn(8, 6, generator=g)}
save_merge(merge(pre, [{"w": pre["w"] + torch.randn(8, 6, generator=g)} for _ in range(3)], "emr"), sys.argv[1])
"""


def test_sigkill_during_an_export_leaves_the_previous_export_intact(tmp_path):
    out = tmp_path / "merged"
    save_merge(tiny_merge("free_merging", expert_density=0.2), out)
    before = snapshot(out)
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_EXPORT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "file written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == before and (tmp_path / ".merged.partial").is_dir()
    assert load_merged(out).manifest["method"] == "free_merging"
    save_merge(tiny_merge("ties"), out)  # the next export discards the dead one's staging directory
    assert_manifest_is_exact(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------ run directories: results carry their config
def _toy_cli_config(toy_root: Path, run: Path, **data) -> dict:
    tasks = ["task0", "task1", "task2"]
    return {"seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                        "default_root_dir": str(run),
                        "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable",
                                       "init_args": {"print_table": False}}]},
            "model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                                  "init_args": {"root": str(toy_root)}},
                      "method": "task_arithmetic", "routing": "oracle"},
            "data": {"router_fraction": 0.05, "batch_size": 64,
                     "tasks": [{"name": t, "dataset": "freemerge_pl.adapters.toy.ToyTaskDataset",
                                "dataset_args": {"root": str(toy_root), "task": t}, **data} for t in tasks]}}


def test_a_failed_run_never_leaves_the_previous_results_beside_its_config(tmp_path):
    import yaml

    from freemerge_pl.adapters.toy import make_toy_models
    from freemerge_pl.lightning.cli import main

    toy = make_toy_models(tmp_path / "toy", steps=20, n_train=100, n_test=40)
    run = tmp_path / "run"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_toy_cli_config(toy, run)))
    main(["test", "--config", str(good)])
    results = json.loads((run / "results" / "results.json").read_text())
    on_disk = (run / "config.yaml").read_text()
    assert results["config"]["sha256"] == hashlib.sha256(on_disk.encode()).hexdigest()
    assert results["config"]["file_matches"] is True and results["config"]["file"] == str(run / "config.yaml")
    assert yaml.safe_load(results["config"]["yaml"]) == yaml.safe_load(on_disk)
    bad = tmp_path / "bad.yaml"  # fails in the model's setup, after LightningCLI rewrote config.yaml
    bad.write_text(yaml.safe_dump(_toy_cli_config(toy, run, num_classes=7)))
    with pytest.raises(ConfigError, match="has 3 classes but the dataset has 7"):
        main(["test", "--config", str(bad)])
    new_config = (run / "config.yaml").read_text()
    assert "num_classes: 7" in new_config
    assert not (run / "results" / "results.json").exists() and not (run / "results" / "results.md").exists()
    stale = json.loads((run / "results" / "results.stale.json").read_text())
    assert stale["tasks"] == results["tasks"] and stale["config"]["yaml"] == on_disk != new_config
