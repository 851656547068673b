"""MergedModule end to end on the toy model family (no download): fit, test, checkpoints, DDP, protocols."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from freemerge_pl.lightning.cli import main
from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import list_methods, merge
from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.lightning.module import MergedModule

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


def test_features_match_dense_per_task_model(toy_root):
    """Grouped in-place expert application equals running θ_m + e_k as a dense model per sample."""
    adapter = ToyAdapter(str(toy_root))
    module = MergedModule(adapter, method="free_merging")
    x = torch.randn(10, 16)
    module.build(x[:1])
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
    feats = module.features(x, ids[:, None])
    names = adapter.task_names
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in names],
                "free_merging")
    for k in range(3):
        dense = dict(out.state_dict)
        for key in out.task_modules[k].keys:
            dense[key] = out.state_dict[key] + out.task_modules[k].dense_delta(out.state_dict)[key]
        net = adapter.build_backbone()
        net.load_state_dict(dense)
        sel = ids == k
        torch.testing.assert_close(feats[sel], net(x[sel]), rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    module.features(x, ids[:, None])
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())


def test_top2_routing_combines_experts(toy_root):
    adapter = ToyAdapter(str(toy_root))
    module = MergedModule(adapter, method="free_merging", top_k=2)
    x = torch.randn(4, 16)
    module.build(x[:1])
    ids = torch.tensor([[0, 1]] * 4)
    w = torch.tensor([[0.75, 0.25]] * 4)
    feats = module.features(x, ids, w)
    sd = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    d0 = module.task_modules[0].dense_delta(sd)
    d1 = module.task_modules[1].dense_delta(sd)
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
              if not k.startswith("router.") and isinstance(v, torch.Tensor)}
    router = {k: v.clone() for k, v in module.router.state_dict().items()}
    tr.fit(module, datamodule=dm)
    after = module.state_dict()
    for k, v in frozen.items():
        if k == "router_trained":
            continue
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, module.router.state_dict()[k]) for k, v in router.items())
    assert bool(module.router_trained)
    assert all(not p.requires_grad for n, p in module.named_parameters() if not n.startswith("router."))


def test_checkpoint_then_test_gives_identical_metrics(toy_root, tmp_path):
    cfg = config(toy_root, tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    main(["fit", "--config", str(cfg_path)])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    main(["test", "--config", str(cfg_path), "--ckpt_path", str(ckpt)])
    from_ckpt = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
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


def test_resume_continues_from_saved_router(toy_root, tmp_path):
    cfg = config(toy_root, tmp_path / "run")
    cfg["trainer"]["max_epochs"] = 1
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    main(["fit", "--config", str(cfg_path)])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    seen = {}

    class Probe(MergedModule):
        def on_train_start(self):
            seen["router"] = {k: v.clone() for k, v in self.router.state_dict().items()}
            seen["step"] = self.trainer.global_step

    cfg["trainer"]["max_epochs"] = 2
    cfg["model"]["adapter"]["init_args"]["root"] = str(toy_root)
    module = Probe(ToyAdapter(str(toy_root)))
    tr = trainer(tmp_path / "resume", max_epochs=2)
    tr.fit(module, datamodule=datamodule(toy_root), ckpt_path=str(ckpt))
    assert seen["step"] == saved["global_step"] > 0
    for k, v in seen["router"].items():
        assert torch.equal(v, saved["state_dict"][f"router.{k}"])


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
        def router_logits(self, x):
            logits = torch.zeros(x.shape[0], len(self.task_names))
            logits[:, 0] = 1.0
            return logits

    scores = {}
    for heads in ("dataset", "routed"):
        module = Task0Router(ToyAdapter(str(toy_root)), head_selection=heads, auto_fit_router=False)
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


def test_merge_subcommand_and_print_config(toy_root, tmp_path):
    cfg_path = write_config(tmp_path / "cfg.yaml", config(toy_root, tmp_path / "run"))
    out = tmp_path / "merged"
    main(["merge", "--config", str(cfg_path), "--output_dir", str(out)])
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
        assert torch.equal(built.features(x, ids), loaded.features(x, ids))
    with pytest.raises(ConfigError, match="task modules for"):
        MergedModule(ToyAdapter(str(toy_root)), method="ties").load_task_modules(tmp_path / "job")
