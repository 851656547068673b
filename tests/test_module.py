"""MergedModule end to end on the toy model family (no download): fit, test, checkpoints, DDP, protocols."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.lightning.cli import main
from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.routed import RoutedModel
from freemerge_pl.merging import list_methods, merge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_models(tmp_path_factory.mktemp("toy"))


def datamodule(root, tasks=("task0", "task1", "task2"), **kw) -> MultiTaskDataModule:
    cfgs = [TaskConfig(name=t, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                       dataset_args={"root": str(root), "task": t}) for t in tasks]
    return MultiTaskDataModule(cfgs, router_fraction=kw.pop("router_fraction", 0.1),
                               batch_size=kw.pop("batch_size", 32), **kw)


def trainer(tmp_path, **kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path),
                   enable_checkpointing=kw.pop("enable_checkpointing", False), **kw)


def config(root, run_dir, method="free_merging", method_args=None, **model) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(run_dir),
                    "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable",
                                   "init_args": {"print_table": False}}]},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                              "init_args": {"root": str(root)}},
                  "method": method, "method_args": method_args or {}, **model},
        "data": {"router_fraction": 0.1, "batch_size": 32,
                 "tasks": [{"name": t, "dataset": "freemerge_pl.adapters.toy.ToyTaskDataset",
                            "dataset_args": {"root": str(root), "task": t}} for t in ("task0", "task1", "task2")]},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def routed_model(adapter, x, **merge_args) -> tuple[RoutedModel, object]:
    """A RoutedModel assembled from a merge without Lightning (plain PyTorch), and the merge output."""
    names = list(adapter.task_names)
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in names],
                "free_merging", **merge_args)
    backbone = adapter.build_backbone()
    backbone.load_state_dict(out.state_dict)
    return RoutedModel(adapter, names, backbone, out.task_modules, example_input=x[:1]), out


def test_features_match_dense_per_task_model(toy_root):
    """Grouped in-place expert application equals running θ_m + e_k as a dense model per sample."""
    adapter = ToyAdapter(str(toy_root))
    x = torch.randn(10, 16)
    model, out = routed_model(adapter, x)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
    feats = model.features(x, ids[:, None])
    for k in range(3):
        dense = dict(out.state_dict)
        for key in out.task_modules[k].keys:
            dense[key] = out.state_dict[key] + out.task_modules[k].dense_delta(out.state_dict)[key]
        net = adapter.build_backbone()
        net.load_state_dict(dense)
        sel = ids == k
        torch.testing.assert_close(feats[sel], net(x[sel]), rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.features(x, ids[:, None])
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    # the routed forward of the plain module: oracle ids give the same features, the router its own ids
    routed, oracle_ids = model(x, ids)
    assert torch.equal(routed, feats) and torch.equal(oracle_ids, ids)
    pred = model.predict(x)
    logits_ids = model.router_logits(x).argmax(-1)
    assert torch.equal(pred["task"], logits_ids)
    for i in range(len(x)):
        head = model.head_outputs(model.features(x[i:i + 1], logits_ids[i:i + 1, None]), int(logits_ids[i]))
        probs = head.softmax(-1)[0]
        assert int(pred["prediction"][i]) == int(probs.argmax())
        torch.testing.assert_close(pred["confidence"][i], probs.max())


def test_top2_routing_combines_experts(toy_root):
    adapter = ToyAdapter(str(toy_root))
    x = torch.randn(4, 16)
    model, _ = routed_model(adapter, x)
    ids = torch.tensor([[0, 1]] * 4)
    w = torch.tensor([[0.75, 0.25]] * 4)
    feats = model.features(x, ids, w)
    sd = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    d0 = model.task_modules[0].dense_delta(sd)
    d1 = model.task_modules[1].dense_delta(sd)
    for key in d0:
        sd[key] = sd[key] + 0.75 * d0[key] + 0.25 * d1[key]
    net = adapter.build_backbone()
    net.load_state_dict(sd)
    torch.testing.assert_close(feats, net(x), rtol=1e-5, atol=1e-6)


def test_fit_trains_only_the_router(toy_root, tmp_path):
    module = MergedModule(ToyAdapter(str(toy_root)))
    dm = datamodule(toy_root)
    tr = trainer(tmp_path, max_epochs=2)
    dm.setup()
    module.build(dm.router_dataset()[0][0][None])
    frozen = {k: v.clone() for k, v in module.state_dict().items()
              if not k.startswith("model.router.") and isinstance(v, torch.Tensor)}
    router = {k: v.clone() for k, v in module.router.state_dict().items()}
    tr.fit(module, datamodule=dm)
    after = module.state_dict()
    for k, v in frozen.items():
        if k == "model.router_trained":
            continue
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, module.router.state_dict()[k]) for k, v in router.items())
    assert bool(module.router_trained)
    assert all(not p.requires_grad for n, p in module.named_parameters() if not n.startswith("model.router."))
    # one training loop: the router equals Router.fit on the router split's features, run outside Lightning
    # (router.epochs passes of its own, whatever the trainer's max_epochs), and Lightning counted its steps
    reference = MergedModule(ToyAdapter(str(toy_root)))
    reference.build(dm.router_dataset()[0][0][None])
    reference.model.fit_router(dm.router_dataset())
    for k, v in reference.router.state_dict().items():
        assert torch.equal(v, module.router.state_dict()[k]), k
    n = len(dm.router_dataset())
    assert tr.global_step == module.router_config.epochs * -(-n // 64) and tr.current_epoch == 1


def test_fit_then_test_from_checkpoint_routes_like_test_alone(toy_root, tmp_path):
    cfg = config(toy_root, tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    main(["fit", "--config", str(cfg_path)])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    main(["test", "--config", str(cfg_path), "--ckpt_path", str(ckpt)])
    from_ckpt = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    alone_cfg = config(toy_root, tmp_path / "alone")
    main(["test", "--config", str(write_config(tmp_path / "alone.yaml", alone_cfg))])
    alone = json.loads((tmp_path / "alone" / "results" / "results.json").read_text())
    assert from_ckpt["tasks"] == alone["tasks"] and from_ckpt["routing_confusion"] == alone["routing_confusion"]
    # In memory: fit then test with the same trainer/module.
    module = MergedModule(ToyAdapter(str(toy_root)))
    dm = datamodule(toy_root)
    tr = trainer(tmp_path / "mem", max_epochs=2)
    from lightning.pytorch import seed_everything

    seed_everything(0)
    tr.fit(module, datamodule=dm)
    tr.test(module, datamodule=dm, verbose=False)
    assert module.test_results["tasks"] == from_ckpt["tasks"]
    assert module.test_results["avg"]["routing_accuracy"] > 0.9


def test_fit_from_a_finished_fit_keeps_its_router(toy_root, tmp_path):
    cfg = config(toy_root, tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    main(["fit", "--config", str(cfg_path)])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    module = MergedModule(ToyAdapter(str(toy_root)))
    tr = trainer(tmp_path / "resume", max_epochs=5)
    tr.fit(module, datamodule=datamodule(toy_root), ckpt_path=str(ckpt))
    assert tr.global_step == saved["global_step"] > 0
    for k, v in module.router.state_dict().items():
        assert torch.equal(v, saved["state_dict"][f"model.router.{k}"])


def test_oracle_and_head_selection_identities(toy_root, tmp_path):
    dm = datamodule(toy_root)
    results = {}
    for routing in ("router", "oracle"):
        for heads in ("dataset", "routed"):
            module = MergedModule(ToyAdapter(str(toy_root)), routing=routing, head_selection=heads)
            trainer(tmp_path).test(module, datamodule=dm, verbose=False)
            results[routing, heads] = module.test_results
    # The toy router is perfect (distinct input clusters), so all four protocols agree.
    assert results["router", "dataset"]["avg"]["routing_accuracy"] == 1.0
    base = results["oracle", "dataset"]["tasks"]
    for key, res in results.items():
        assert {t: v["accuracy"] for t, v in res["tasks"].items()} == {t: v["accuracy"] for t, v in base.items()}, key

    # A router that always picks task 0: routed heads are wrong on other tasks, dataset heads are not.
    class Task0Router(MergedModule):
        def on_test_start(self):
            super().on_test_start()
            self.model.router_logits = lambda x: torch.eye(len(self.task_names))[[0] * x.shape[0]]

    scores = {}
    for heads in ("dataset", "routed"):
        module = Task0Router(ToyAdapter(str(toy_root)), head_selection=heads)
        trainer(tmp_path).test(module, datamodule=dm, verbose=False)
        scores[heads] = module.test_results["tasks"]
    assert scores["routed"]["task1"]["accuracy"] == 0.0 and scores["routed"]["task2"]["accuracy"] == 0.0
    assert scores["dataset"]["task1"]["accuracy"] > 0.2
    assert scores["routed"]["task0"]["accuracy"] == scores["dataset"]["task0"]["accuracy"]
    assert scores["routed"]["task1"]["routing_accuracy"] == 0.0


@pytest.mark.parametrize("method", list_methods())
def test_every_registry_method_runs_through_the_module(toy_root, tmp_path, method):
    # the released-code methods change only keys matching key_pattern (ViT's attn|mlp); the toy MLP's are fc*
    args = {"key_pattern": "fc"} if method.endswith("_released") else None
    if method.startswith("adamerging"):  # a few steps: the method's own tests check what training does
        args = {"steps": 5}
    elif method == "mtl":
        args = {"epochs": 1}
    cfg = config(toy_root, tmp_path / "run", method=method, method_args=args, routing="oracle")
    main(["test", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))])
    res = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert res["method"] == method
    assert set(res["tasks"]) == {"task0", "task1", "task2"}
    assert 0.0 <= res["avg"]["accuracy"] <= 1.0


def test_bad_configs_fail_before_heavy_work(toy_root, tmp_path):
    with pytest.raises(ConfigError, match="unknown merge method 'nope'"):
        MergedModule(ToyAdapter(str(toy_root)), method="nope")
    with pytest.raises(HyperparameterError, match="bogus"):
        MergedModule(ToyAdapter(str(toy_root)), method="free_merging", method_args={"bogus": 1})
    with pytest.raises(HyperparameterError, match=r"^model\.top_k=0 is outside its accepted range \[1, inf\]$"):
        MergedModule(ToyAdapter(str(toy_root)), top_k=0)
    with pytest.raises(ConfigError, match=r"^model\.routing='learned'; accepted: \['router', 'oracle'\]$"):
        MergedModule(ToyAdapter(str(toy_root)), routing="learned")
    with pytest.raises(HyperparameterError, match=r"^data\.router_fraction=0 is outside its accepted range \(0, 1\]$"):
        datamodule(toy_root, router_fraction=0)
    with pytest.raises(ConfigError, match=r"^data\.batch_size=2\.5 is not an integer$"):
        datamodule(toy_root, batch_size=2.5)

    class Spy(ToyAdapter):
        loaded = 0

        def finetuned_state_dict(self, task):
            Spy.loaded += 1
            return super().finetuned_state_dict(task)

    with pytest.raises(ConfigError, match="3 task.*2"):
        trainer(tmp_path).test(MergedModule(Spy(str(toy_root))), datamodule=datamodule(toy_root, tasks=("task0", "task1")))
    dm = datamodule(toy_root)
    dm.tasks[1].num_classes = 7
    with pytest.raises(ConfigError, match="task 'task1': the head has 3 classes but the dataset has 7"):
        trainer(tmp_path).test(MergedModule(Spy(str(toy_root))), datamodule=dm)
    assert Spy.loaded == 0


def test_export_subcommand_and_print_config(toy_root, tmp_path):
    cfg_path = write_config(tmp_path / "cfg.yaml", config(toy_root, tmp_path / "run"))
    out = tmp_path / "merged"
    main(["export", "--config", str(cfg_path), "--output_dir", str(out)])
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == "free_merging" and info["router_trained"] is True
    assert len(list(out.glob("task_module_*.safetensors"))) == 3
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "test", "--config", str(cfg_path),
                           "--print_config"], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["method"] == "free_merging"


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(toy_root, tmp_path):
    """Exact distributed evaluation on 2 CPU processes (gloo): every sample once, identical metrics."""
    results = {}
    for devices in (1, 2):
        run = tmp_path / f"run{devices}"
        cfg = config(toy_root, run)
        cfg["data"]["batch_size"] = 7  # uneven shards: 200 test samples, odd batches
        cfg_path = write_config(tmp_path / f"cfg{devices}.yaml", cfg)
        args = [sys.executable, str(REPO / "cli.py"), "test", "--config", str(cfg_path)]
        if devices == 2:
            args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((run / "results" / "results.json").read_text())
    assert results[1]["tasks"] == results[2]["tasks"]
    assert results[1]["routing_confusion"] == results[2]["routing_confusion"]
    assert sum(map(sum, results[2]["routing_confusion"])) == 600  # each of 3×200 test samples once


@pytest.mark.slow
def test_ddp_fit_trains_the_router_of_one_process(toy_root, tmp_path):
    """``fit`` on 2 CPU processes (gloo): every rank runs the one router loop on the whole router split (rank 0's
    weights broadcast), so the checkpoint holds the router a single process trains, after as many steps."""
    saved = {}
    for devices in (1, 2):
        run = tmp_path / f"run{devices}"
        cfg_path = write_config(tmp_path / f"cfg{devices}.yaml", config(toy_root, run))
        args = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(cfg_path)]
        if devices == 2:
            args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        saved[devices] = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert saved[1]["global_step"] == saved[2]["global_step"] > 0
    router = [k for k in saved[1]["state_dict"] if k.startswith("model.router.")]
    assert router and all(torch.equal(saved[1]["state_dict"][k], saved[2]["state_dict"][k]) for k in router)


def test_method_as_class_path_in_yaml_equals_the_registry_name(toy_root, tmp_path, capsys):
    by_name = config(toy_root, tmp_path / "a", method="ties", method_args={"density": 0.3, "trim_scope": "tensor"},
                     routing="oracle")
    by_class = config(toy_root, tmp_path / "b", routing="oracle")
    by_class["model"]["method"] = {"class_path": "TIES", "init_args": {"density": 0.3, "trim_scope": "tensor"}}
    del by_class["model"]["method_args"]
    a = main(["test", "--config", str(write_config(tmp_path / "a.yaml", by_name))]).model
    b = main(["test", "--config", str(write_config(tmp_path / "b.yaml", by_class))]).model
    assert b.method == "ties" and b.method_args["density"] == 0.3
    assert a.backbone_digest == b.backbone_digest
    bad = dict(by_class, model={**by_class["model"], "method": {"class_path": "TIES",
                                                                "init_args": {"trim_scope": "layer"}}})
    with pytest.raises(SystemExit):
        main(["test", "--config", str(write_config(tmp_path / "c.yaml", bad))])
    assert "trim_scope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["test", "--config", str(write_config(tmp_path / "a.yaml", by_name)), "--model.method.help", "TIES"])
    out = capsys.readouterr().out
    assert "--model.method.trim_scope {model,tensor}" in out and "default: 0.2" in out


def test_module_applies_the_experts_sidecar_of_a_merge_job(toy_root, tmp_path):
    from freemerge_pl.jobs.merge_job import MergeJobConfig, run_merge_job

    tasks = ["task0", "task1", "task2"]
    run_merge_job(MergeJobConfig(base_model=str(toy_root / "pretrained"),
                                 models=[{"model": str(toy_root / "finetuned" / t), "name": t} for t in tasks],
                                 merge_method="free_merging", parameters={"expert_density": 0.05},
                                 output_dir=str(tmp_path / "job")), progress=False)
    built = MergedModule(ToyAdapter(str(toy_root)), method="free_merging", method_args={"expert_density": 0.05})
    loaded = MergedModule(ToyAdapter(str(toy_root)), method="free_merging", method_args={"expert_density": 0.5})
    x = torch.randn(6, 16)  # the toy backbone takes 16-dim inputs
    for m in (built, loaded):
        m.build(x[:1])
    loaded.load_task_modules(tmp_path / "job")
    for task in range(3):
        ids = torch.full((6, 1), task)
        assert torch.equal(built.model.features(x, ids), loaded.model.features(x, ids))
    with pytest.raises(ConfigError, match="task modules for"):
        MergedModule(ToyAdapter(str(toy_root)), method="ties").load_task_modules(tmp_path / "job")


@pytest.mark.slow
def test_tiny_zoo_fit_then_test_routes_exactly_like_test_alone(tmp_path, monkeypatch):
    """The one router loop on the tiny zoo: ``fit`` then ``test --ckpt_path`` gives the router ``test`` alone
    trains (same seed, same data order), so the same routing confusion and the same scores."""
    monkeypatch.setenv("FREEMERGE_ZOO_ROOT", str(tmp_path / "zoo"))
    config = str(REPO / "configs" / "zoo" / "tiny" / "free_merging.yaml")

    def run(name: str, *args: str) -> dict:
        main([*args, "--config", config, "--trainer.default_root_dir", str(tmp_path / name),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
        return json.loads((tmp_path / name / "results" / "results.json").read_text())

    alone = run("alone", "test")
    main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "fit"),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    ckpt = next((tmp_path / "fit" / "checkpoints").glob("*.ckpt"))
    from_ckpt = run("from_ckpt", "test", "--ckpt_path", str(ckpt))
    assert from_ckpt["routing_confusion"] == alone["routing_confusion"]
    assert from_ckpt["tasks"] == alone["tasks"] and from_ckpt["avg"] == alone["avg"]
    assert 1 / 8 < alone["avg"]["routing_accuracy"] < 1.0  # above chance over 8 tasks, not a trivial router


@pytest.mark.parametrize("head_selection", ["dataset", "routed"])
def test_a_method_without_task_modules_has_no_router(toy_root, tmp_path, monkeypatch, head_selection):
    """Issue 28 item 4: TIES builds no task modules, so no router is built, trained or run (the encoder runs once
    per batch), no routing accuracy is reported, and each sample is scored with its dataset's head on the merged
    backbone (whatever ``routing``/``head_selection`` say): checked against that computation done by hand."""
    from freemerge_pl.callbacks import ResultsTable

    from freemerge_pl.lightning.router import Router

    def forbidden(*args, **kwargs):
        raise AssertionError("the router was trained or run for a method without task modules")

    monkeypatch.setattr(Router, "fit", forbidden)
    monkeypatch.setattr(Router, "forward", forbidden)
    monkeypatch.setattr(RoutedModel, "router_input", forbidden)
    adapter = ToyAdapter(str(toy_root))
    module = MergedModule(adapter, method="ties", head_selection=head_selection)
    dm = datamodule(toy_root)
    table = ResultsTable(dirpath=str(tmp_path / "results"))
    tr = trainer(tmp_path, callbacks=[table])
    tr.test(module, datamodule=dm, verbose=False)
    assert not module.model.routes and module.router is None
    assert not any(k.startswith("model.router.") for k in module.state_dict()) and not bool(module.router_trained)
    assert not any(p.requires_grad for p in module.parameters())  # nothing to train
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["routing_confusion"] is None and results["protocol"]["routing"] is None
    assert all(set(v) == {"accuracy"} for v in results["tasks"].values()) and set(results["avg"]) == {"accuracy"}
    assert "routing_accuracy" not in (tmp_path / "results" / "results.md").read_text()
    # independent: the merged backbone (TIES by hand through ``merge``) and each dataset's own fine-tuned head
    names = list(adapter.task_names)
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in names], "ties")
    backbone = adapter.build_backbone().eval()
    backbone.load_state_dict(out.state_dict)
    for name in names:
        data = dm._test[name]
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.tensor([int(data[i][1]) for i in range(len(data))])
        with torch.no_grad():
            expected = (adapter.build_head(name)(backbone(x)).argmax(-1) == y).float().mean().item()
        assert results["tasks"][name]["accuracy"] == pytest.approx(expected, abs=1e-6), name


def test_fit_of_a_method_without_task_modules_trains_nothing(toy_root, tmp_path, capsys):
    from freemerge_pl.lightning.cli import cli_main

    cfg = write_config(tmp_path / "cfg.yaml", config(toy_root, tmp_path / "run", method="task_arithmetic"))
    assert cli_main(["fit", "--config", str(cfg), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "nothing to train: task_arithmetic has no task modules, so no router" in err
    assert "router trained" not in err and not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_routed_model_without_task_modules_predicts_with_the_given_task(toy_root):
    """Plain PyTorch: no task modules, no router; ``forward`` gives the merged backbone's features, ``predict``
    needs the samples' task (no router to pick it) and uses that task's head."""
    adapter = ToyAdapter(str(toy_root))
    names = list(adapter.task_names)
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in names], "ties")
    backbone = adapter.build_backbone()
    backbone.load_state_dict(out.state_dict)
    model = RoutedModel(adapter, names, backbone, out.task_modules)  # no example input needed: no router
    assert out.task_modules in (None, []) and model.router is None and not model.routes
    x = torch.randn(5, 16)
    feats, ids = model(x)
    assert ids is None and torch.equal(feats, backbone(x))
    with pytest.raises(ConfigError, match="no task modules, so no router"):
        model.predict(x)
    got = model.predict(x, torch.full((5,), 2))
    assert torch.equal(got["task"], torch.full((5,), 2))
    with torch.no_grad():
        assert torch.equal(got["prediction"], adapter.build_head("task2")(backbone(x)).argmax(-1).float())


def test_results_table_labels_both_routing_accuracies():
    """The avg row's routing accuracy is the mean over tasks; the pooled share is printed beside it, labelled
    (tasks of unequal size: 9/10 and 10/20 → mean 0.7, pooled 19/30)."""
    from freemerge_pl.callbacks.results import results_markdown

    results = {"tasks": {"a": {"accuracy": 0.5, "routing_accuracy": 0.9},
                         "b": {"accuracy": 0.5, "routing_accuracy": 0.5}},
               "avg": {"accuracy": 0.5, "routing_accuracy": 0.7}, "routing_confusion": [[9, 1], [10, 10]],
               "protocol": {"routing": "router", "head_selection": "dataset"}}
    md = results_markdown(results)
    assert (f"routing accuracy (mean over tasks, the avg row): {0.7:.4f}; routing accuracy (pooled over all "
            f"samples): {19 / 30:.4f}") in md
    del results["routing_confusion"], results["tasks"]["a"]["routing_accuracy"], results["tasks"]["b"]["routing_accuracy"]
    del results["avg"]["routing_accuracy"]
    assert "routing accuracy" not in results_markdown(results)
