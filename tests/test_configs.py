"""Every YAML in configs/ parses and instantiates; the tiny zoo config runs end to end (what CI runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from freemerge_pl.lightning.cli import main
from freemerge_pl.merging import list_methods

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_is_a_zoo_config_for_every_method():
    assert {p.stem for p in (REPO / "configs" / "zoo").glob("*.yaml")} >= set(list_methods())
    assert {p.stem for p in (REPO / "configs" / "text").glob("*.yaml")} >= set(list_methods())


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    from freemerge_pl.jobs.merge_job import MergeJobConfig

    if "base_model" in yaml.safe_load(path.read_text()):  # a job for `cli.py merge`: checked without the files
        config = MergeJobConfig.from_yaml(path)
        assert config.method().name in list_methods() and len(config.models) >= 2
        return
    monkeypatch.setenv("FREEMERGE_ZOO_ROOT", str(tmp_path / "zoo"))  # nothing may be built here
    monkeypatch.setenv("FREEMERGE_TEXT_ZOO_ROOT", str(tmp_path / "textzoo"))
    cli = main(["--config", str(path)], run=False)
    assert cli.model.method in list_methods()
    assert len(cli.datamodule.tasks) == (4 if "text" in path.relative_to(REPO).parts else 8)
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "textzoo").exists()


@pytest.mark.slow
def test_tiny_zoo_main_job_end_to_end(tmp_path):
    env = {**os.environ, "FREEMERGE_ZOO_ROOT": str(tmp_path / "zoo")}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "cli.py", "test", "--config", "configs/zoo/tiny/free_merging.yaml",
         "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| **avg** |" in proc.stdout
    results = json.loads((run / "results" / "results.json").read_text())
    assert len(results["tasks"]) == 8
    assert results["task_module_bytes"] > 0
    assert 0 <= results["avg"]["accuracy"] <= 1
