"""The checkpoint merge job (``cli.py merge --config merge.yaml``): mergekit-shaped config, checks before any
output, atomic publication with a manifest, support files, experts sidecar, resume after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError, HyperparameterError
from freemerge_pl.io import load_state_dict, sha256_file
from freemerge_pl.io.export import read_export
from freemerge_pl.jobs.merge_job import MergeJobConfig, parse_size, run_merge_job
from freemerge_pl.lightning.cli import main
from freemerge_pl.merging import merge
from tests.test_stream import as_dict, tiny_llama_dirs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    paths = tiny_llama_dirs(root)
    (paths[0] / "tokenizer.json").write_text('{"model": "tiny"}')
    return paths


def job(llama, out, **overrides):
    base, *fts = llama
    cfg = {"base_model": str(base), "models": [{"model": str(p), "name": f"t{i}"} for i, p in enumerate(fts)],
           "merge_method": "free_merging", "parameters": {"expert_density": 0.1}, "dtype": "bfloat16",
           "out_shard_size": 8000, "output_dir": str(out), **overrides}
    return cfg


def write(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_job_writes_a_complete_hf_directory_equal_to_the_in_memory_merge(llama, tmp_path):
    out = tmp_path / "merged"
    config = str(write(job(llama, out), tmp_path / "m.yaml"))
    report = main(["merge", "--config", config, "--progress", "false"]).result
    assert report["output"] == str(out) and not (tmp_path / ".merged.partial").exists()
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "generation_config.json",
            "merge_info.json", "task_module_00.safetensors"} <= names
    assert len([n for n in names if n.startswith("model-")]) >= 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    manifest = json.loads((out / "merge_info.json").read_text())
    assert set(manifest["files"]) == names - {"merge_info.json"}
    for name, rec in manifest["files"].items():
        assert rec["sha256"] == sha256_file(out / name) and rec["bytes"] == (out / name).stat().st_size
    base, *fts = llama
    pre = as_dict(base)
    want = merge(pre, [as_dict(p) for p in fts], "free_merging", names=["t0", "t1", "t2"], expert_density=0.1)
    got = load_state_dict(out)
    for key in pre:
        assert torch.equal(got[key], want.state_dict[key].to(torch.bfloat16)), key
    assert manifest["task_module_files"] == [f"task_module_{k:02d}.safetensors" for k in range(3)]
    export = read_export(out)  # the one export reader reads a merge job's output
    experts = dict(zip(export.task_names, export.task_modules))
    assert list(experts) == ["t0", "t1", "t2"]
    for mine, theirs in zip(experts.values(), want.task_modules):
        for key in theirs.keys:
            assert torch.equal(mine.entries(key)[0], theirs.entries(key)[0])
            assert torch.equal(mine.entries(key)[1].float(), theirs.entries(key)[1].float())
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    experts["t1"].apply_(model)  # the sidecar applies to the loaded model's parameters in place
    experts["t1"].restore_(model)
    assert torch.equal(model.model.embed_tokens.weight.data, got["model.embed_tokens.weight"].float())
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        run_merge_job(MergeJobConfig(**job(llama, out)), progress=False)
    run_merge_job(MergeJobConfig(**job(llama, out, merge_method="ties", parameters={})), overwrite=True,
                  progress=False)
    assert not list(out.glob("task_module_*"))  # the old export's experts do not survive a replacement


def test_dry_run_checks_and_writes_nothing(llama, tmp_path):
    out = tmp_path / "dry"
    report = main(["merge", "--config", str(write(job(llama, out), tmp_path / "m.yaml")), "--dry-run"]).result
    assert report["dry_run"] and report["merged_tensors"] == 21 and not out.exists()
    assert not any(tmp_path.glob(".dry*"))


def _copy_model(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file(edit(f.name, load_file(f)), dst / f.name, metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _first_shard_with(path: Path, key: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


@pytest.mark.parametrize("case", ["missing_shard", "missing_key", "shape", "dtype", "nan", "vocab"])
def test_bad_inputs_fail_before_any_output_naming_the_culprit(llama, tmp_path, case):
    _base, *fts = llama
    key = "model.layers.1.mlp.down_proj.weight"
    shard = _first_shard_with(fts[1], key)

    def edit(name, sd):
        if name != shard and case != "vocab":
            return sd
        if case == "missing_key":
            sd.pop(key)
        elif case == "shape":
            sd[key] = sd[key][:, :-1].contiguous()
        elif case == "dtype":
            sd[key] = sd[key].half()
        elif case == "nan":
            sd[key][3, 2] = float("nan")
        elif case == "vocab" and "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"],
                                                         torch.ones(2, sd["model.embed_tokens.weight"].shape[1])])
        return sd

    bad = _copy_model(fts[1], tmp_path / "bad", edit)
    if case == "missing_shard":
        (bad / shard).unlink()
    if case == "missing_key":  # a consistent checkpoint that lacks the key (index updated too)
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        del index["weight_map"][key]
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = job(llama, tmp_path / "out")
    cfg["models"][1] = {"model": str(bad), "name": "bad"}
    expected = {"missing_shard": (FreeMergeError, rf"model.safetensors.index.json.*{shard}.*does not exist"),
                "missing_key": (CheckpointMismatchError, rf"'bad'.*missing \['{key}'\]"),
                "shape": (CheckpointMismatchError, rf"'bad'.*{shard}.*key '{key}' has shape \(16, 31\)"),
                "dtype": (CheckpointMismatchError, rf"'bad'.*key '{key}' has dtype torch.float16.*mixed dtypes"),
                "nan": (FreeMergeError, rf"'bad'.*{shard}.*key '{key}'.*1 NaN/Inf"),
                "vocab": (CheckpointMismatchError, (r"vocabulary size differs.*'bad'.*embed_tokens.*66 rows, the "
                                                   r"base model 64.*vocab_mismatch: truncate_or_pad"))}[case]
    with pytest.raises(expected[0], match=expected[1]):
        run_merge_job(MergeJobConfig(**cfg), progress=False)
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / ".out.partial").glob("model*.safetensors"))
    if case == "vocab":
        ok = run_merge_job(MergeJobConfig(**{**cfg, "vocab_mismatch": "truncate_or_pad"}), progress=False)
        assert load_state_dict(ok["output"])["model.embed_tokens.weight"].shape == (64, 16)
    if case == "dtype":
        run_merge_job(MergeJobConfig(**{**cfg, "allow_mixed_dtypes": True}), progress=False)


@pytest.mark.parametrize("overrides, error, match", [
    ({"merge_method": "free_merging_released", "parameters": {"profile": "glue", "expert_density": 0.1}},
     HyperparameterError, r"expert_density=0.1 is ignored by profile='glue'"),
    ({"merge_method": "fr_merging", "parameters": {}, "fr_filter_ratio": 0.2}, HyperparameterError,
     r"fr_filter_ratio=0.2 would high-pass .* 'fr_merging' already filters"),
    ({"merge_method": "fr_merging_released", "parameters": {"key_pattern": "cross_attn"}}, ConfigError,
     r"key_pattern='cross_attn' .* matches none of the 21 merged tensors"),
    ({"merge_method": "ties", "parameters": {"density": 2.0}}, HyperparameterError, r"density=2.0"),
    ({"dtype": "int8"}, ConfigError, r"dtype='int8'; accepted: \['float32', 'float16', 'bfloat16'\]"),
    ({"out_shard_size": "5 parsecs"}, ConfigError, r"out_shard_size='5 parsecs' is not a size"),
    ({"device": "tpu:9"}, ConfigError, r"device='tpu:9'"),
])
def test_bad_settings_fail_before_any_output(llama, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_merge_job(MergeJobConfig(**job(llama, tmp_path / "out", **overrides)), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_unknown_config_keys_and_disk_space(llama, tmp_path, monkeypatch):
    cfg = write({**job(llama, tmp_path / "out"), "merge_methd": "ties"}, tmp_path / "m.yaml")
    with pytest.raises(ConfigError, match=r"^cli.py merge: .*merge_methd"):
        main(["merge", "--config", str(cfg)])
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ConfigError, match="not enough free disk space .* need about"):
        run_merge_job(MergeJobConfig(**job(llama, tmp_path / "out")), dry_run=True)


def test_cli_merge_errors_are_one_line_with_exit_status_2(llama, tmp_path, capsys):
    """Through ``cli_main``: a YAML key the job does not know, a value outside its type and a setting the
    method refuses each give one ``error:`` line naming it, status 2, and no output."""
    from freemerge_pl.lightning.cli import cli_main

    cases = [({"merge_methd": "ties"}, "merge_methd"), ({"dtype": "int8"}, "dtype"),
             ({"merge_method": "ties", "parameters": {"density": 2.0}}, "density=2.0")]
    for change, named in cases:
        cfg = write({**job(llama, tmp_path / "out"), **change}, tmp_path / "m.yaml")
        assert cli_main(["merge", "--config", str(cfg)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_options_override_the_yaml_and_resume_false_starts_over(llama, tmp_path):
    out = tmp_path / "cli_out"
    cfg = write(job(llama, tmp_path / "elsewhere"), tmp_path / "m.yaml")
    partial = tmp_path / ".cli_out.partial"
    partial.mkdir()
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"left by an interrupted run")
    report = main(["merge", "--config", str(cfg), "--output_dir", str(out), "--merge_method", "ties",
                   "--parameters", "{density: 0.5}", "--resume", "false", "--progress", "false"]).result
    assert report["output"] == str(out) and not (tmp_path / "elsewhere").exists() and not partial.exists()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == "ties" and info["hyperparameters"]["density"] == 0.5


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(1234) == 1234
    assert parse_size("1.5MB") == 1_500_000


def test_per_model_weights_reach_the_method(llama, tmp_path):
    cfg = job(llama, tmp_path / "w", merge_method="ties", parameters={"trim_scope": "tensor"})
    for i, m in enumerate(cfg["models"]):
        m["parameters"] = {"weight": [1.0, 2.0, 0.5][i]}
    run_merge_job(MergeJobConfig(**cfg), progress=False)
    info = json.loads((tmp_path / "w" / "merge_info.json").read_text())
    assert info["hyperparameters"]["weights"] == [1.0, 2.0, 0.5]


KILLED_RUN = """
import sys, time
from freemerge_pl import io
from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job
import yaml

real = io.ShardedSafetensorsSink.write

def slow(self, key, tensor, state=None):
    before = len(self.completed_keys())
    real(self, key, tensor, state)
    if len(self.completed_keys()) > before:
        print("shard done", flush=True)
        time.sleep(60)

io.ShardedSafetensorsSink.write = slow
run_merge_job(MergeJobConfig(**yaml.safe_load(open(sys.argv[1]))), progress=False)
"""


@pytest.mark.parametrize("method", ["dare", "free_merging"])
def test_sigkill_midway_then_rerun_gives_the_same_bytes(llama, tmp_path, method, caplog):
    """A job SIGKILLed after its first shard, rerun: the killed run's lock is taken over, the rerun says it
    resumes (in the log) and its whole output, merge_info.json included, equals an uninterrupted run's bytes
    (the manifest records nothing run-dependent: no timings, no resume details)."""
    params = {"drop_rate": 0.5} if method == "dare" else {"expert_density": 0.1}
    reference = run_merge_job(MergeJobConfig(**job(llama, tmp_path / "ref", merge_method=method, parameters=params)),
                              progress=False)
    cfg = write(job(llama, tmp_path / "out", merge_method=method, parameters=params), tmp_path / "m.yaml")
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(cfg)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "shard done"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / ".merge_progress.json").exists()
    assert (tmp_path / ".out.lock").exists()  # the killed run's lock file, recording its pid
    with caplog.at_level("INFO", logger="freemerge_pl"):
        report = run_merge_job(MergeJobConfig(**yaml.safe_load(cfg.read_text())), progress=False)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming: ")]
    n_done, n_all = map(int, re.match(r"resuming: (\d+) of (\d+) tensors", resumed[0]).groups())
    assert 0 < n_done < n_all == len(load_state_dict(tmp_path / "ref"))
    assert any(f"pid {proc.pid}" in r.getMessage() and "took over" in r.getMessage() for r in caplog.records)
    assert report["files"] == reference["files"]
    for name in report["files"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not (tmp_path / ".out.lock").exists() and not (tmp_path / ".out.partial").exists()


def test_a_pickled_checkpoint_needs_allow_pickle_named_as_the_job_setting(tmp_path, capsys):
    """A ``torch.save(module)`` fine-tune is refused before any output with a hint naming the job's own
    setting (``allow_pickle: true`` in the YAML, ``--allow_pickle true``), on one line with status 2 through
    ``cli.py``; with the setting it merges exactly as the same tensors saved as safetensors do."""
    from freemerge_pl.io import PickledObjectsError
    from freemerge_pl.lightning.cli import cli_main

    g = torch.Generator().manual_seed(0)
    base = {"weight": torch.randn(4, 4, generator=g), "bias": torch.randn(4, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    module = torch.nn.Linear(4, 4)
    module.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    torch.save(module, tmp_path / "ft.bin")
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    cfg = {"base_model": str(tmp_path / "base.safetensors"), "models": [{"model": str(tmp_path / "ft.bin"),
           "name": "ft"}], "merge_method": "task_arithmetic", "output_dir": str(tmp_path / "out")}
    with pytest.raises(PickledObjectsError, match=r"model 'ft' .*ft.bin holds pickled Python objects.*set "
                                                  r"allow_pickle: true in the job YAML \(--allow_pickle true"):
        run_merge_job(MergeJobConfig(**cfg), progress=False)
    assert cli_main(["merge", "--config", str(write(cfg, tmp_path / "m.yaml")), "--progress", "false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "allow_pickle: true in the job YAML" in err[0], err
    assert not (tmp_path / "out").exists()
    assert cli_main(["merge", "--config", str(tmp_path / "m.yaml"), "--allow_pickle", "true",
                     "--progress", "false"]) == 0
    run_merge_job(MergeJobConfig(**{**cfg, "models": [{"model": str(tmp_path / "ft.safetensors"), "name": "ft"}],
                                    "output_dir": str(tmp_path / "ref")}), progress=False)
    assert as_dict(tmp_path / "out").keys() == base.keys()
    for key, tensor in as_dict(tmp_path / "ref").items():
        assert torch.equal(as_dict(tmp_path / "out")[key], tensor), key
