"""Hyperparameter choice on tune-val: analytic optimum, test split untouched, reuse of FFTs, YAML round trip."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from freemerge_pl.adapters.toy import make_toy_models
from freemerge_pl.jobs.tune import CandidateMerger, grid_candidates, tune
from freemerge_pl.lightning.cli import main
from freemerge_pl.merging import merge
from tests.test_module import REPO, config, write_config


def test_grid_candidates_is_the_product():
    cands = grid_candidates({"a": [1, 2], "b": [0.1, 0.2, 0.3]})
    assert len(cands) == 6 and cands[0] == {"a": 1, "b": 0.1} and cands[-1] == {"a": 2, "b": 0.3}


def test_tune_finds_the_analytic_task_arithmetic_optimum():
    """Two linear regression tasks y = W_k x, x ~ N(0, Σ_k): the expected loss of W = W_pre + λ(v1 + v2) is
    Σ_k tr((W − W_k) Σ_k (W − W_k)ᵀ), minimised at λ* = Σ_k tr(V Σ_k v_kᵀ) / Σ_k tr(V Σ_k Vᵀ), V = v1 + v2."""
    g = torch.Generator().manual_seed(3)
    d = 6
    w_pre = torch.randn(d, d, generator=g, dtype=torch.float64)
    vs = [torch.randn(d, d, generator=g, dtype=torch.float64) * s for s in (1.0, 0.4)]
    covs = []
    for k in range(2):
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        covs.append(a @ a.T + (0.5 + 3 * k) * torch.eye(d, dtype=torch.float64))
    V = vs[0] + vs[1]
    lam_star = float(sum(torch.trace(V @ c @ v.T) for v, c in zip(vs, covs))
                     / sum(torch.trace(V @ c @ V.T) for c in covs))
    pre = {"w": w_pre.float()}
    fts = [{"w": (w_pre + v).float()} for v in vs]

    def evaluate(state_dict, result):
        W = state_dict["w"].double()
        loss = sum(torch.trace((W - (w_pre + v)) @ c @ (W - (w_pre + v)).T) for v, c in zip(vs, covs))
        return {"tasks": {"loss": {"neg_loss": -float(loss)}}}

    step = 0.05
    grid = [round(i * step, 4) for i in range(41)]
    merger = CandidateMerger(pre, fts, "task_arithmetic")
    report = tune(grid_candidates({"scaling": grid}), merger, evaluate,
                  lambda s: s["tasks"]["loss"]["neg_loss"], progress=False)
    assert 0 < lam_star < 2
    assert abs(report["best"]["params"]["scaling"] - lam_star) <= step / 2 + 1e-9


def test_fr_grid_reuses_one_forward_fft_per_tensor(monkeypatch):
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(8, 12, generator=g), "b": torch.randn(6, 2, 3, generator=g), "c": torch.randn(5, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    merger = CandidateMerger(pre, fts, "free_merging")
    candidates = grid_candidates({"scaling": [0.5, 1.0, 1.5, 2.0, 3.0], "filter_ratio": [0.1, 0.3, 0.5, 0.6]})
    counts = {"forward": 0, "inverse": 0}
    rfft, irfft = torch.fft.rfft, torch.fft.irfft  # the real transforms (the band is complex, per ratio)

    def counting_rfft(*a, **k):
        counts["forward"] += 1
        return rfft(*a, **k)

    def counting_irfft(*a, **k):
        counts["inverse"] += 1
        return irfft(*a, **k)

    monkeypatch.setattr(torch.fft, "rfft", counting_rfft)
    monkeypatch.setattr(torch.fft, "irfft", counting_irfft)
    results = [merger.merge(c) for c in candidates]
    monkeypatch.undo()
    n_2d = 2  # "a" and "b" (viewed as 6×6); the 1-D "c" is not filtered
    assert counts["forward"] == n_2d
    assert counts["inverse"] <= 4 * n_2d
    # The reuse changes nothing: every candidate equals a full merge, bit for bit.
    for cand, (sd, res) in zip(candidates, results):
        ref = merge(pre, fts, "free_merging", **cand)
        for k in pre:
            assert torch.equal(sd[k], ref.state_dict[k]), (cand, k)
        for mine, theirs in zip(res.task_modules, ref.task_modules):
            for key in theirs.keys:
                assert torch.equal(mine.entries(key)[1], theirs.entries(key)[1])


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_models(tmp_path_factory.mktemp("toy_tune"))


def test_tune_never_touches_the_test_split_and_yaml_reproduces(toy_root, tmp_path, monkeypatch):
    from freemerge_pl.lightning.datamodule import MultiTaskDataModule

    def forbidden(self):
        raise AssertionError("the test split was read during tune")

    monkeypatch.setattr(MultiTaskDataModule, "test_dataloader", forbidden)
    cfg = config(toy_root, tmp_path / "run", method="task_arithmetic")
    cfg["data"]["tune_fraction"] = 0.5
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "tuned"
    # another run's results and config in the run's directory: tune writes into its output_dir only
    others = {tmp_path / "run" / "results" / "results.json": '{"tasks": {}}', tmp_path / "run" / "config.yaml": "x: 1\n"}
    for path, text in others.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    cli = main(["tune", "--config", str(cfg_path), "--output_dir", str(out),
                "--space", json.dumps({"scaling": [0.1, 0.3, 0.6, 1.0]})])
    report = json.loads((out / "tune_report.json").read_text())
    assert len(report["candidates"]) == 4
    assert {p: p.read_text() for p in others} == others
    assert not list((tmp_path / "run" / "results").glob("*.stale.*"))
    dm = cli.datamodule
    for t in dm.task_names:
        tune_idx, router_idx = set(dm.tune_indices[t]), set(dm.router_indices[t])
        assert tune_idx and router_idx and not tune_idx & router_idx
        tune_x = {tuple(dm._train[t][i][0].tolist()) for i in tune_idx}
        test_ds = dm._make(dm.tasks[dm.task_names.index(t)], dm.tasks[0].test_args)
        assert not tune_x & {tuple(test_ds[i][0].tolist()) for i in range(len(test_ds))}
    monkeypatch.undo()
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    assert tuned["model"]["method_args"]["scaling"] == report["best"]["params"]["scaling"]
    cli = main(["validate", "--config", str(out / "tuned.yaml")])
    assert cli.model.val_results["avg"]["accuracy"] == pytest.approx(report["best"]["score"], abs=1e-12)
    main(["test", "--config", str(out / "tuned.yaml")])


def test_tune_without_tune_split_is_a_clear_error(toy_root, tmp_path):
    from freemerge_pl.errors import ConfigError

    cfg_path = write_config(tmp_path / "cfg.yaml", config(toy_root, tmp_path / "run"))
    with pytest.raises(ConfigError, match="tune_fraction"):
        main(["tune", "--config", str(cfg_path)])


def test_optuna_search_has_the_grid_interface(toy_root, tmp_path):
    pytest.importorskip("optuna")
    cfg = config(toy_root, tmp_path / "run", method="task_arithmetic")
    cfg["data"]["tune_fraction"] = 0.5
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "tuned"
    space = {"scaling": [0.1, 0.3, 0.6, 1.0]}
    main(["tune", "--config", str(cfg_path), "--output_dir", str(out), "--search", "optuna", "--n_trials", "6",
          "--space", json.dumps(space)])
    report = json.loads((out / "tune_report.json").read_text())
    assert report["search"] == "optuna" and len(report["candidates"]) == 6
    assert all(c["params"]["scaling"] in space["scaling"] for c in report["candidates"])
    assert report["best"]["score"] == max(c["score"] for c in report["candidates"])
    grid = main(["tune", "--config", str(cfg_path), "--output_dir", str(tmp_path / "grid"),
                 "--space", json.dumps(space)]).trainer.tune_report
    by_value = {c["params"]["scaling"]: c["score"] for c in grid["candidates"]}
    for c in report["candidates"]:  # the same candidate scores the same whichever search proposed it
        assert c["score"] == by_value[c["params"]["scaling"]]


@pytest.mark.slow
def test_tune_under_ddp_equals_single_process(toy_root, tmp_path):
    """`cli.py tune` on 2 CPU processes (gloo) scores every candidate exactly as one process does: each
    tune-val sample is counted once (the counts are checked) and the chosen candidate and YAML agree."""
    reports, yamls = {}, {}
    space = json.dumps({"filter_ratio": [0.1, 0.5], "scaling": [1.0, 2.0]})
    for devices in (1, 2):
        # free_merging: routed (a method without task modules routes nothing, so has no routing confusion)
        cfg = config(toy_root, tmp_path / f"run{devices}", method="free_merging")
        cfg["data"]["tune_fraction"] = 0.5
        cfg["data"]["batch_size"] = 7  # 40 router images per task, 20 of them tune-val: uneven DDP shards
        out = tmp_path / f"tuned{devices}"
        args = [sys.executable, str(REPO / "cli.py"), "tune", "--config",
                str(write_config(tmp_path / f"cfg{devices}.yaml", cfg)), "--output_dir", str(out), "--space", space]
        if devices == 2:
            args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[devices] = json.loads((out / "tune_report.json").read_text())
        yamls[devices] = yaml.safe_load((out / "tuned.yaml").read_text())
    one, two = reports[1], reports[2]
    assert len(one["candidates"]) == len(two["candidates"]) == 4
    for a, b in zip(one["candidates"], two["candidates"]):
        assert a["params"] == b["params"]
        assert a["scores"]["tasks"] == b["scores"]["tasks"]
        assert a["scores"]["routing_confusion"] == b["scores"]["routing_confusion"]
        assert sum(map(sum, b["scores"]["routing_confusion"])) == 60  # each tune-val image scored once
    assert one["best"]["params"] == two["best"]["params"]
    assert yamls[1]["model"]["method_args"] == yamls[2]["model"]["method_args"]
    assert one["tune_samples"] == two["tune_samples"] and sum(one["tune_samples"].values()) == 60


def test_tune_reports_one_line_per_candidate_and_no_bars(toy_root, tmp_path, capsys):
    """`cli.py tune` on a non-terminal stderr: one progress display, the candidate lines (i/N, elapsed, eta,
    params → score), and the scores in them are the report's."""
    from freemerge_pl.lightning.cli import cli_main

    cfg = config(toy_root, tmp_path / "run", method="task_arithmetic")
    cfg["data"]["tune_fraction"] = 0.5
    del cfg["trainer"]["enable_progress_bar"]
    out = tmp_path / "tuned"
    assert cli_main(["tune", "--config", str(write_config(tmp_path / "cfg.yaml", cfg)), "--output_dir", str(out),
                     "--space", json.dumps({"scaling": [0.2, 0.6]}), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "tune_report.json").read_text())
    lines = [ln for ln in err.splitlines() if "tune candidates:" in ln]
    assert len(lines) == 2, err
    for i, (line, row) in enumerate(zip(lines, report["candidates"])):
        assert f"tune candidates: {i + 1}/2, elapsed " in line and ", eta " in line
        assert line.endswith(f"{row['params']} → {row['score']:.4f}")
    assert "it/s" not in err and "━" not in err and "validate: task" not in err


def test_tune_val_comes_from_the_tasks_own_validation_split(toy_root, recwarn):
    """A task with a validation split (``val_args``) tunes on it whole and keeps its router split; one without
    falls back to a share of the router split, with a warning; the record says which kind each task used."""
    from freemerge_pl.errors import ConfigError
    from freemerge_pl.jobs.tune import tune_val_record
    from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig

    def task(name, **kw):
        return TaskConfig(name=name, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                          dataset_args={"root": str(toy_root), "task": name}, **kw)

    dm = MultiTaskDataModule([task("task0", val_args={"split": "test"}), task("task1")], router_fraction=0.1,
                             tune_fraction=0.5)
    dm.setup()
    assert dm.tune_val_sources == {"task0": "validation split", "task1": "router split"}
    assert len(dm.router_indices["task0"]) == 40 and len(dm.router_indices["task1"]) == 20
    val = dm.tune_dataset("task0")
    assert len(val) == len(dm._test["task0"]) and torch.equal(val[3][0], dm._test["task0"][3][0])
    held = dm.tune_dataset("task1")
    assert set(dm.tune_indices["task1"]).isdisjoint(dm.router_indices["task1"]) and len(held) == 20
    assert any("task1" in str(w.message) and "router split" in str(w.message) for w in recwarn.list)
    assert not any("'task0'" in str(w.message) for w in recwarn.list)
    assert tune_val_record(dm) == {"task0": {"source": "validation split", "samples": 200},
                                   "task1": {"source": "router split", "samples": 20}}
    with pytest.raises(ConfigError, match=r"val_args"):
        MultiTaskDataModule([task("task0", val_args={"fold": 1})], tune_fraction=0.5)


def test_a_router_split_declared_held_out_is_tune_val_without_a_warning(toy_root, recwarn, monkeypatch):
    """A dataset class that lists its training split in ``held_out_splits`` (the zoos' ``router`` split: no
    fine-tuned model trained on it) gives a ``held-out router split`` tune-val, without the memorisation warning."""
    from freemerge_pl.adapters.toy import ToyTaskDataset
    from freemerge_pl.jobs.tune import tune_val_record
    from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig

    monkeypatch.setattr(ToyTaskDataset, "held_out_splits", ("test",), raising=False)

    def task(name, split):
        return TaskConfig(name=name, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                          dataset_args={"root": str(toy_root), "task": name}, train_args={"split": split})

    dm = MultiTaskDataModule([task("task0", "test"), task("task1", "train")], router_fraction=0.1, tune_fraction=0.5)
    dm.setup()
    assert dm.tune_val_sources == {"task0": "held-out router split", "task1": "router split"}
    assert tune_val_record(dm)["task0"] == {"source": "held-out router split", "samples": 10}
    warned = [str(w.message) for w in recwarn.list if "tune-val is a share of the router split" in str(w.message)]
    assert len(warned) == 1 and "'task1'" in warned[0]
