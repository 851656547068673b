"""The command line a newcomer meets: settings checked before any data or checkpoint is read, a package
error as one line with exit status 2, progress lines on a non-terminal stderr, no dependency noise, help
texts, resolved method defaults in dumped configs, and the thread count."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.jobs.program import program_options
from freemerge_pl.lightning.cli import cli_main, main
from freemerge_pl.lightning.datamodule import MultiTaskDataModule
from freemerge_pl.merging import get_method
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
    (["--model.method_args", "{filter_ratio: 1.5}"],
     r"model\.method_args.*filter_ratio=1\.5 is outside its accepted range \[0, 1\)"),
    (["--model.method_args", '{filter_ratio: "nan"}'], r"filter_ratio='nan' is not a number"),
    (["--model.method_args", "{filter_ratio: .nan}"], r"filter_ratio=nan is outside its accepted range \[0, 1\)"),
    (["--model.method_args", "{expert_scope: layer}"], r"expert_scope='layer'; accepted: \['tensor', 'model'\]"),
    (["--model.router.lr", "-1"], r"model\.router\.lr=-1\.0 is outside"),
    (["--model.router", "{epochs: -1}"], r"model\.router\.epochs=-1 is outside its accepted range \[0, inf\]"),
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
    with pytest.raises(ConfigError, match=r"--space.*candidate 2/2 \{'filter_ratio': 1\.5\}.*\[0, 1\)"):
        main(["tune", "--config", cfg, "--space", '{"filter_ratio": [0.3, 1.5]}'])
    with pytest.raises(ConfigError, match=r"candidate 1/2 \{'scaling': 'big'\}.*scaling='big' is not a number"):
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
    assert "filter_ratio=1.5" in errors[0] and "accepted range [0, 1)" in errors[0]


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


def test_fit_and_test_say_where_their_outputs_went(toy_root, tmp_path, capsys):
    cfg = str(toy_config(toy_root, tmp_path))
    assert cli_main(["fit", "--config", cfg, "--threads", "1"]) == 0
    err = capsys.readouterr().err
    saved = re.search(r"checkpoint: (\S+\.ckpt) \(test it: ", err)
    assert saved, err[-2000:]
    ckpt = Path(saved.group(1))
    assert ckpt.is_file() and ckpt.parent == tmp_path / "run" / "checkpoints"
    assert cli_main(["test", "--config", cfg, "--ckpt_path", str(ckpt), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    said = re.search(r"results: (\S+), (\S+)$", err, flags=re.MULTILINE)
    assert said, err[-2000:]
    results = tmp_path / "run" / "results"
    assert [Path(p) for p in said.groups()] == [results / "results.json", results / "results.md"]
    assert json.loads((results / "results.json").read_text())["tasks"].keys() == {"task0", "task1", "task2"}


class _RunsCode:
    """Pickles as a call of ``os.system``: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_or_damaged_ckpt_path_is_one_line_exit_2(toy_root, tmp_path, capsys):
    """``test --ckpt_path``: a checkpoint that pickles a callable is refused before the code in it runs, and a
    truncated one is a one-line error naming it; both exit 2 like any other bad input."""
    import torch

    cfg = str(toy_config(toy_root, tmp_path))
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"routing": _RunsCode(marker)}}, evil)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}, "hyper_parameters": {}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, says in ((evil, "refused"), (truncated, "truncated or damaged"), (Path(cfg), ""),
                       (tmp_path / "missing.ckpt", "no such file")):
        assert cli_main(["test", "--config", cfg, "--ckpt_path", str(path), "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err), err
        assert err[-1].startswith(f"error: --ckpt_path {path}: ") and says in err[-1], err[-1]
    assert not marker.exists()  # the pickled call never ran
    import pickle

    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "control")))
    assert (tmp_path / "control").exists()  # control: plain unpickling runs it


def test_ctrl_c_exits_130_with_one_line(toy_root, tmp_path, capsys, monkeypatch):
    """Lightning turns a KeyboardInterrupt inside its loop into ``exit(1)`` (and ignores SIGINT from then
    on); ``cli.py`` exits 130, the shell's status for SIGINT, with one line, and gives Ctrl-C back."""
    from freemerge_pl.lightning.module import MergedModule

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MergedModule, "test_step", interrupted)
    assert cli_main(["test", "--config", str(toy_config(toy_root, tmp_path)), "--threads", "1"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (tmp_path / "run" / "results" / "results.json").exists()


def test_sigint_to_a_real_run_exits_130(toy_root, tmp_path):
    """A real SIGINT (Ctrl-C) to ``python cli.py fit`` once it runs: status 130 and one line, no traceback."""
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(toy_config(toy_root, tmp_path)),
           "--threads", "1"]
    env = {**os.environ, "FREEMERGE_PROGRESS_SECONDS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        first = proc.stderr.readline()  # the thread-count line: the program runs
        assert "threads:" in first, first
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, err[-3000:]
    finally:
        proc.kill()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err[-3000:]


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


SUBCOMMANDS = ("fit", "validate", "test", "predict", "tune", "export", "merge", "analyze")


def help_text(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """``--option`` → its description as argparse lays it out (on the option's line after two spaces, or on
    the indented lines below), jsonargparse's ``(type: ..., default: ...)`` included."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:  +(\S.*))?$", line)
        if m:
            names = re.findall(r"--[\w.\-]*\w", m.group(1))
            current = names[0] if names else m.group(1).split()[0]
            entries[current] = m.group(2) or ""
        elif current and re.match(r"^ {6,}\S", line):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


def test_help_lists_every_subcommand(capsys):
    top = help_text(capsys)
    for sub in SUBCOMMANDS:
        m = re.search(rf"^    {sub} +(\S.*)$", top, flags=re.MULTILINE)
        assert m and len(m.group(1)) > 20, (sub, top)
    assert re.search(r"^    tune +.*\n +.*split \(never the test split\)\.$", top, flags=re.MULTILINE), top
    assert "--debug" in top and "--threads" in top


def test_predict_writes_one_routed_line_per_test_sample(toy_root, tmp_path):
    """``predict``: every test sample of every task once, in order, with the routed task, the class and the
    confidence the routed model gives for it (compared with ``RoutedModel.predict`` on the same inputs)."""
    import torch

    out = tmp_path / "predictions.jsonl"
    cli = main(["predict", "--config", str(toy_config(toy_root, tmp_path)), "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    dm, model = cli.datamodule, cli.model
    assert bool(model.router_trained)  # trained on the router split first, as for ``test``
    names = dm.task_names
    assert [(r["dataset"], r["index"]) for r in rows] == [(t, i) for t in names for i in range(len(dm._test[t]))]
    correct = 0
    for task in names:
        mine = [r for r in rows if r["dataset"] == task]
        x = torch.stack([dm._test[task][i][0] for i in range(len(mine))])
        expected = model.model.predict(x)
        assert [r["routed_task"] for r in mine] == [names[i] for i in expected["task"].tolist()]
        assert [r["prediction"] for r in mine] == [int(p) for p in expected["prediction"].tolist()]
        assert [r["confidence"] for r in mine] == pytest.approx(expected["confidence"].tolist(), abs=1e-6)
        assert all(0 < r["confidence"] <= 1 for r in mine)
        correct += sum(r["routed_task"] == task for r in mine)
    assert correct / len(rows) > 0.5  # the toy tasks are separable: most samples route to their own task


def test_every_option_of_every_subcommand_has_a_description(capsys):
    """No option's description is only jsonargparse's ``(type: ...)``; no reST markup; group titles are
    whole first sentences of their docstrings (not cut at the docstring's first line break)."""
    for sub in SUBCOMMANDS:
        text = help_text(capsys, sub)
        entries = option_entries(text)
        assert len(entries) > 5, (sub, text)
        bare = sorted(o for o, d in entries.items() if not d or d.startswith(("(type:", "(required", "(default")))
        assert not bare, f"{sub}: options without a description: {bare}"
        assert "``" not in text and ":class:`" not in text and ":paramref:" not in text, sub
        assert "<function" not in text
        titles = re.findall(r"^(\S.*):$", text, flags=re.MULTILINE)
        assert titles, sub
        for title in titles:
            assert not title.endswith((" a", " the", " and", " of", " that", ",")), (sub, title)
    test = help_text(capsys, "test")
    assert "freemerge_pl.adapters.toy.ToyAdapter" in test and "freemerge_pl.adapters.zoo_vit.ZooViTAdapter" in test
    assert "--optimizer" not in test  # the router's optimiser is set by model.router, not here
    assert len(test.splitlines()) < 400  # was 575: the Trainer's rarely used options are accepted, not listed
    assert "--trainer.accelerator" in test and "--trainer.barebones" not in test


def test_unlisted_trainer_options_are_still_accepted(toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["test", "--config", str(toy_config(toy_root, tmp_path)), "--trainer.detect_anomaly", "true",
              "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["detect_anomaly"] is True


def test_merge_help_lists_the_job_fields_dry_run_and_resume(capsys):
    from dataclasses import fields

    from freemerge_pl.jobs.merge_job import MergeJobConfig

    text = help_text(capsys, "merge")
    entries = option_entries(text)
    for f in fields(MergeJobConfig):
        assert f"--{f.name}" in entries, f.name
    for option in ("--dry-run", "--resume", "--overwrite", "--config"):
        assert option in entries, option
    assert "resumes from its last complete shard" in " ".join(text.split())


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
