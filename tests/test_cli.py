"""The command line a newcomer meets: settings checked before any data or checkpoint is read, a package
error as one line with exit status 2, progress lines on a non-terminal stderr, no dependency noise, help
texts, resolved method defaults in dumped configs, and the thread count."""

import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from freemerge_pl.lightning.cli import cli_main, main, program_options
from freemerge_pl.lightning.datamodule import MultiTaskDataModule
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import get_method
from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.progress import Ticker, choose_threads, progress_line
from tests.test_module import REPO, config, write_config


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_models(tmp_path_factory.mktemp("toy_cli"))


@pytest.fixture
def no_reads(monkeypatch):
    """Any data set preparation or checkpoint read fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("data or checkpoints were read before the settings were checked")

    for name in ("prepare_data", "setup", "router_dataset"):
        monkeypatch.setattr(MultiTaskDataModule, name, forbidden)
    for name in ("prepare", "pretrained_state_dict", "finetuned_state_dict"):
        monkeypatch.setattr(ToyAdapter, name, forbidden)
    from freemerge_pl.adapters import zoo_vit

    monkeypatch.setattr(zoo_vit, "ensure_zoo", forbidden)  # the zoo is never built


def toy_config(toy_root, tmp_path, **data):
    cfg = config(toy_root, tmp_path / "run", method="free_merging")
    cfg["data"].update({"tune_fraction": 0.5, **data})
    del cfg["trainer"]["enable_progress_bar"]  # the default, as in the shipped configs
    return write_config(tmp_path / "cfg.yaml", cfg)


@pytest.mark.parametrize("override, match", [
    (["--model.method_args", "{filter_ratio: 1.5}"], r"model\.method_args.*filter_ratio=1\.5.*\[0\.0, 1\.0\)"),
    (["--model.method_args", '{filter_ratio: "nan"}'], r"model\.method_args.*filter_ratio='nan' must be a finite"),
    (["--model.method_args", "{filter_ratio: .nan}"], r"filter_ratio=nan must be a finite float"),
    (["--model.method_args", "{expert_scope: layer}"], r"expert_scope='layer' must be one of 'tensor', 'model'"),
    (["--model.router.lr", "-1"], r"model\.router\.lr=-1\.0 is outside"),
    (["--model.router", "{batch_size: 0}"], r"model\.router\.batch_size=0 must be a whole number ≥ 1"),
])
def test_bad_model_settings_fail_before_any_read(toy_root, tmp_path, no_reads, override, match):
    # a RouterConfig checks itself when jsonargparse builds it: then the parser reports it (a ValueError)
    with pytest.raises((HyperparameterError, ConfigError, ValueError), match=match):
        main(["validate", "--config", str(toy_config(toy_root, tmp_path)), *override])


def test_bad_data_settings_fail_before_any_read(toy_root, tmp_path, no_reads):
    cfg = yaml.safe_load(toy_config(toy_root, tmp_path).read_text())
    cases = [
        ({"metrics": ["acuracy"]}, r"data\.tasks\[1\] \('task1'\)\.metrics: unknown metric 'acuracy'"),
        ({"dataset_args": {"root": str(toy_root), "task": "task1", "colour": 1}},
         r"data\.tasks\[1\].*does not accept.*colour"),
        ({"dataset": "freemerge_pl.adapters.toy.NoSuchDataset"}, r"data\.tasks\[1\] \('task1'\)\.dataset: cannot"),
    ]
    for change, match in cases:
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        bad["data"]["tasks"][1].update(change)
        with pytest.raises(ConfigError, match=match):
            main(["test", "--config", str(write_config(tmp_path / "bad.yaml", bad))])


def test_every_tune_candidate_is_checked_before_any_read(toy_root, tmp_path, no_reads):
    cfg = str(toy_config(toy_root, tmp_path))
    with pytest.raises(ConfigError, match=r"--space.*candidate 2/2 \{'filter_ratio': 1\.5\}.*\[0\.0, 1\.0\)"):
        main(["tune", "--config", cfg, "--space", '{"filter_ratio": [0.3, 1.5]}'])
    with pytest.raises(ConfigError, match=r"candidate 1/2 \{'scaling': 'big'\}.*must be a finite float"):
        main(["tune", "--config", cfg, "--space", '{"scaling": ["big", 1.0]}'])
    with pytest.raises(ConfigError, match=r"--metric='f1' is not among the metrics of task\(s\)"):
        main(["tune", "--config", cfg, "--metric", "f1"])
    with pytest.raises(SystemExit):  # jsonargparse rejects a search outside its Literal, before anything runs
        main(["tune", "--config", cfg, "--search", "random"])


def test_zoo_config_is_checked_before_the_zoo_is_built(tmp_path, no_reads):
    with pytest.raises(HyperparameterError, match=r"model\.method_args.*filter_ratio=1\.5"):
        main(["validate", "--config", str(REPO / "configs/zoo/tiny/free_merging.yaml"),
              "--model.method_args", "{filter_ratio: 1.5}", "--trainer.default_root_dir", str(tmp_path)])


def test_a_package_error_is_one_line_with_exit_status_2(toy_root, tmp_path):
    """Through ``python cli.py``: one ``error:`` line naming the setting and the accepted range, no
    traceback, status 2."""
    cmd = [sys.executable, str(REPO / "cli.py"), "validate", "--config", str(toy_config(toy_root, tmp_path)),
           "--model.method_args", "{filter_ratio: 1.5}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FREEMERGE_DEBUG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: model.method_args"), proc.stderr
    assert "filter_ratio=1.5" in errors[0] and "accepted range [0.0, 1.0)" in errors[0]


def test_debug_shows_the_traceback(toy_root, tmp_path, capsys, monkeypatch):
    cfg = str(toy_config(toy_root, tmp_path))
    monkeypatch.delenv("FREEMERGE_DEBUG", raising=False)
    bad = ["validate", "--config", cfg, "--model.method_args", "{filter_ratio: 1.5}", "--threads", "1"]
    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: model.method_args")
    assert cli_main([*bad, "--debug"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("FREEMERGE_DEBUG", "1")
    assert cli_main(bad) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_progress_lines_on_a_non_terminal_stderr_and_no_tips(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FREEMERGE_PROGRESS_SECONDS", "0")  # a line per batch: the run is short
    assert cli_main(["test", "--config", str(toy_config(toy_root, tmp_path)), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    batches = [re.search(r"\d\d:\d\d:\d\d test: task (\d)/3 \((task\d)\), batch (\d+)/(\d+) · all batches: "
                         r"(\d+)/(\d+), elapsed \d+s, eta \d+s$", ln) for ln in lines]
    batches = [m.groups() for m in batches if m]
    # one line per batch (interval 0), in order: task 1's batches 1..B_1, then task 2's, ...; counted overall
    assert [b[0] for b in batches] == sorted(b[0] for b in batches) and {b[0] for b in batches} == {"1", "2", "3"}
    assert batches[0][1] == "task0" and batches[-1][1] == "task2"
    assert [int(b[4]) for b in batches] == list(range(1, len(batches) + 1))
    assert all(int(b[5]) == len(batches) for b in batches)
    for task in ("1", "2", "3"):
        seen = [(int(b[2]), int(b[3])) for b in batches if b[0] == task]
        assert [b for b, _ in seen] == list(range(1, seen[0][1] + 1))
    assert any(re.search(r"threads: 1 \(--threads\)", ln) for ln in lines)
    out = captured.out + captured.err
    assert "Tip" not in out and "deprecated" not in out and "━" not in out


def test_validate_prints_the_tune_val_score(toy_root, tmp_path, capsys):
    cfg = str(toy_config(toy_root, tmp_path))
    assert cli_main(["validate", "--config", cfg, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| task\d \| ([0-9.]+) \|", out, flags=re.MULTILINE)
    mean = re.search(r"tune-val mean accuracy ([0-9.]+)", out)
    assert len(rows) == 3 and mean, out
    assert float(mean.group(1)) == pytest.approx(sum(map(float, rows)) / 3, abs=1e-4)
    no_split = str(toy_config(toy_root, tmp_path, tune_fraction=0.0))
    with pytest.raises(ConfigError, match="data.tune_fraction > 0"):
        main(["validate", "--config", no_split])


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for sub in ("validate", "test", "tune", "merge"):
        m = re.search(rf"^    {sub} +(\S.*)$", top, flags=re.MULTILINE)
        assert m and len(m.group(1)) > 20, (sub, top)
    assert re.search(r"^    tune +.*\n +.*split \(never the test split\)\.$", top, flags=re.MULTILINE), top
    assert "--debug" in top and "--threads" in top
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    text = capsys.readouterr().out
    assert "<function" not in text
    assert "freemerge_pl.adapters.toy.ToyAdapter" in text and "freemerge_pl.adapters.zoo_vit.ZooViTAdapter" in text
    assert "--optimizer" not in text  # the router's optimiser is set by model.router, not here


def test_print_config_shows_the_method_defaults(toy_root, tmp_path, capsys):
    cfg = str(toy_config(toy_root, tmp_path))
    with pytest.raises(SystemExit):
        main(["test", "--config", cfg, "--model.method", "ties", "--model.method_args", "{density: 0.4}",
              "--print_config"])
    shown = yaml.safe_load(capsys.readouterr().out)["model"]["method_args"]
    expected = {**get_method("ties").hyperparameters, "density": 0.4}
    assert shown == expected and len(shown) > 1


def test_program_options_anywhere():
    assert program_options(["test", "--config", "a.yaml", "--threads", "3", "--debug"]) == \
        (["test", "--config", "a.yaml"], True, 3)
    assert program_options(["--threads=2", "tune"]) == (["tune"], False, 2)
    with pytest.raises(ConfigError, match="--threads 'many'"):
        program_options(["test", "--threads", "many"])


def test_choose_threads_precedence_and_load():
    env = {"FREEMERGE_THREADS": "3", "OMP_NUM_THREADS": "2"}
    assert choose_threads(5, env, cpus=8, load=0.0)[0] == 5
    assert choose_threads(None, env, cpus=8, load=0.0) == (3, "FREEMERGE_THREADS")
    assert choose_threads(None, {"OMP_NUM_THREADS": "2"}, cpus=8, load=0.0) == (2, "OMP_NUM_THREADS")
    for cpus, load in [(8, 0.0), (8, 2.6), (8, 7.4), (2, 9.0), (16, math.nan)]:
        n = choose_threads(None, {}, cpus=cpus, load=load)[0]
        assert n == max(1, cpus - (0 if math.isnan(load) else round(load)))
    with pytest.raises(ConfigError, match="FREEMERGE_THREADS='zero'"):
        choose_threads(None, {"FREEMERGE_THREADS": "zero"}, cpus=4, load=0.0)
    with pytest.raises(ConfigError, match="--threads=0"):
        choose_threads(0, {}, cpus=4, load=0.0)


def test_ticker_lines_every_interval_with_eta():
    now = [0.0]
    lines: list[str] = []
    ticker = Ticker("merge", 10, interval=5.0, log=lines.append, clock=lambda: now[0])
    for i in range(1, 11):
        now[0] = 2.0 * i  # 2 s per item
        ticker.update(i)
    # lines at t = 6, 12, 18 (≥ 5 s after the previous one), each with eta = elapsed / done · remaining
    assert lines == [progress_line("merge", 3, 10, 6.0), progress_line("merge", 6, 10, 12.0),
                     progress_line("merge", 9, 10, 18.0)]
    assert lines[0] == "merge: 3/10, elapsed 6s, eta 14s"
    ticker.finish(10)
    assert lines[-1] == "merge: 10/10, elapsed 20s, eta 0s"
