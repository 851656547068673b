"""The paper tables' reference rows as registry methods: ``pretrained`` (θ_pre bit for bit, no task modules, no
router) and ``individual`` (each task's fine-tuned model, bit-exact, through task modules), checked against an
independent loop over the fine-tuned checkpoints on the tiny zoo, and through export → ``load_merged``."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.io import save_merge
from freemerge_pl.io.export import read_export
from freemerge_pl.lightning.cli import main
from freemerge_pl.lightning.loading import load_merged
from freemerge_pl.merging import merge
from freemerge_pl.merging.engine import merge_task_vectors
from freemerge_pl.merging.methods.reference import FinetunedWeights, Individual
from freemerge_pl.zoo.vision import ZooTaskDataset, zoo_task_names
from tests.test_zoo import SEED, tiny_zoo  # noqa: F401  (the session's tiny zoo fixture)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (tells −0.0 from 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def checkpoints():
    """θ_pre and two θ_k in float32 and bfloat16, with signed zeros and values far below θ_pre's scale (where
    θ_pre + (θ_k − θ_pre) in float32 does not give θ_k back) and an integer buffer."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 5, generator=g), "z": torch.tensor([-0.0, 0.0, 1.0, 3e7]),
           "h": torch.randn(7, generator=g).bfloat16(), "ids": torch.arange(4)}
    fts = [{"w": torch.randn(6, 5, generator=g), "z": torch.tensor([0.0, -0.0, 1e-9, 1.0 + k]),
            "h": torch.randn(7, generator=g).bfloat16(), "ids": torch.arange(4)} for k in range(2)]
    return pre, fts


def test_pretrained_is_theta_pre_bit_for_bit_without_task_modules():
    pre, fts = checkpoints()
    out = merge(pre, fts, "pretrained")
    assert out.task_modules is None
    for key, value in pre.items():
        assert out.state_dict[key].dtype == value.dtype and torch.equal(bits(out.state_dict[key]), bits(value)), key


def test_individual_writes_each_theta_k_exactly_and_restores_theta_pre():
    pre, fts = checkpoints()
    out = merge(pre, fts, "individual")
    assert all(torch.equal(bits(out.state_dict[k]), bits(v)) for k, v in pre.items())  # backbone θ_pre
    # the naive θ_pre + v_k in float32 misses θ_k here (1e-9 next to 3e7): the module must copy, not add
    assert (pre["z"] + (fts[0]["z"] - pre["z"]))[3] != fts[0]["z"][3]
    backbone = {k: v.clone() for k, v in out.state_dict.items()}
    for module, ft in zip(out.task_modules, fts):
        assert isinstance(module, FinetunedWeights) and module.keys == ["w", "z", "h"]  # no integer buffer
        assert module.nbytes == sum(ft[k].numel() * ft[k].element_size() for k in module.keys)
        module.apply_(backbone)
        assert all(torch.equal(bits(backbone[k]), bits(ft[k])) for k in module.keys)
        module.restore_(backbone)
        assert all(torch.equal(bits(backbone[k]), bits(pre[k])) for k in pre)
    half = out.task_modules[0]
    half.apply_(backbone, 0.5)  # a weighted route blends toward θ_k: θ_pre + ½(θ_k − θ_pre), one rounding
    want = (pre["w"] + 0.5 * (fts[0]["w"] - pre["w"]))
    torch.testing.assert_close(backbone["w"], want, rtol=0, atol=1e-6)
    half.restore_(backbone)
    assert torch.equal(bits(backbone["w"]), bits(pre["w"]))


def test_reference_methods_refuse_a_prefilter_and_task_vectors_alone():
    pre, fts = checkpoints()
    for name in ("individual", "pretrained"):
        with pytest.raises(HyperparameterError, match=f"fr_filter_ratio=0.3 has nothing to filter: method '{name}'"):
            merge(pre, fts, name, fr_filter_ratio=0.3)
    with pytest.raises(ConfigError, match="fine-tuned checkpoints are not available"):
        merge_task_vectors(Individual(), [{"w": torch.ones(2)}])


def test_individual_export_round_trips_through_save_merge(tmp_path):
    pre, fts = checkpoints()
    out = merge(pre, fts, "individual", names=["a", "b"])
    save_merge(out, tmp_path / "m")
    export = read_export(tmp_path / "m")
    for mine, theirs in zip(export.task_modules, out.task_modules):
        assert isinstance(mine, FinetunedWeights) and mine.keys == theirs.keys
        assert all(torch.equal(bits(mine.tensor(k)), bits(theirs.tensor(k))) for k in theirs.keys)


def zoo_config(root, run_dir, method: str, tasks: list[str], **model) -> dict:
    """The tiny zoo (3 tasks) with the oracle protocol: each test sample runs its own task's module."""
    data_args = {"root": str(root), "size": "tiny", "seed": SEED}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(run_dir)},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.zoo_vit.ZooViTAdapter",
                              "init_args": {"root": str(root), "size": "tiny", "seed": SEED, "tasks": tasks}},
                  "method": method, "routing": "oracle", **model},
        "data": {"router_fraction": 0.01, "min_router_samples": 8, "batch_size": 64,
                 "tasks": [{"name": t, "dataset": "freemerge_pl.zoo.vision.ZooTaskDataset",
                            "dataset_args": {**data_args, "task": t}} for t in tasks]},
    }


@torch.no_grad()
def own_model_correct(root, tasks: list[str], state_dict_of) -> dict[str, tuple[int, int]]:
    """(correct, total) per task of a backbone holding ``state_dict_of(adapter, task)`` with the task's own head
    on its test split: a loop of its own, no merge, no routing, no Lightning."""
    adapter = ZooViTAdapter(root=str(root), size="tiny", seed=SEED, tasks=tasks)
    out = {}
    for task in tasks:
        backbone = adapter.build_backbone()
        backbone.load_state_dict(state_dict_of(adapter, task), strict=True)
        head = adapter.build_head(task)
        backbone.eval(), head.eval()
        correct = total = 0
        data = ZooTaskDataset(root=str(root), task=task, split="test", size="tiny", seed=SEED)
        for x, y in torch.utils.data.DataLoader(data, batch_size=64):
            correct += int((head(backbone(x)).argmax(-1) == y).sum())
            total += len(y)
        out[task] = (correct, total)
    return out


@pytest.mark.slow
def test_individual_and_pretrained_rows_equal_the_checkpoints_own_accuracy_on_the_tiny_zoo(tiny_zoo, tmp_path):  # noqa: F811
    tasks = zoo_task_names("tiny")[:3]
    want = {"individual": own_model_correct(tiny_zoo, tasks, lambda a, t: a.finetuned_state_dict(t)),
            "pretrained": own_model_correct(tiny_zoo, tasks, lambda a, t: a.pretrained_state_dict())}
    for method, counts in want.items():
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(zoo_config(tiny_zoo, tmp_path / method, method, tasks)))
        cli = main(["test", "--config", str(path)])
        results = cli.model.test_results
        for task, (correct, total) in counts.items():  # the same count of correct samples, exactly
            assert abs(results["tasks"][task]["accuracy"] - correct / total) < 0.5 / total, (method, task)
        if method == "pretrained":  # no task modules: no router built or trained, no routing accuracy
            assert cli.model.model.router is None and "routing_accuracy" not in results["avg"]
            continue
        assert cli.model.model.router is None or not bool(cli.model.router_trained)  # oracle: never trained
        # export → load_merged: the same modules, bit for bit, and the same test results
        cli.model.export(tmp_path / "export")
        loaded = load_merged(tmp_path / "export")
        for mine, theirs in zip(loaded.task_modules, cli.model.task_modules):
            assert isinstance(mine, FinetunedWeights)
            assert all(torch.equal(bits(mine.tensor(k)), bits(theirs.tensor(k))) for k in theirs.keys)
        Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False).test(loaded, datamodule=cli.datamodule, verbose=False)
        assert loaded.test_results["tasks"] == results["tasks"]
