"""Data-dependent baselines (issue 20): Fisher merging, RegMean, AdaMerging(++), MTL — maths against independent
computations, statistics under DDP equal to one process, and each method run through the CLI on the toy."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.errors import ConfigError
from freemerge_pl.lightning import activation_stats
from freemerge_pl.lightning.activation_stats import (
    CoefficientModel,
    collect_statistics,
    entropy_sum,
    train_coefficients,
)
from freemerge_pl.merging import build_method, merge
from freemerge_pl.merging.methods.data_dependent import (
    AdaMerging,
    AdaMergingPP,
    DataStatistics,
    FisherMerging,
    MultiTaskLearning,
    RegMean,
    scale_off_diagonal,
)

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_models(tmp_path_factory.mktemp("toy"), steps=60)


def toy_datamodule(root, tasks=TASKS):
    from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig

    dm = MultiTaskDataModule([TaskConfig(name=t, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                                         dataset_args={"root": str(root), "task": t}) for t in tasks],
                             router_fraction=0.1, batch_size=32)
    dm.setup()
    return dm


def toy_checkpoints(root):
    adapter = ToyAdapter(str(root))
    return adapter, adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in adapter.task_names]


def random_like_fisher(sd, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in sd.items() if v.is_floating_point()}


# ------------------------------------------------------------------------------------------ Fisher


def test_fisher_on_a_single_model_returns_that_model(toy_root):
    _, pre, fts = toy_checkpoints(toy_root)
    method = FisherMerging().with_data(DataStatistics({"fisher": [random_like_fisher(pre, 0)]}))
    out = merge(pre, fts[:1], method)
    for k, v in fts[0].items():
        assert torch.allclose(out.state_dict[k].float(), v.float(), atol=1e-6, rtol=0), k


def test_fisher_with_equal_fishers_is_averaging_and_otherwise_the_weighted_mean(toy_root):
    _, pre, fts = toy_checkpoints(toy_root)
    same = random_like_fisher(pre, 1)
    equal = merge(pre, fts, FisherMerging().with_data(DataStatistics({"fisher": [same] * 3})))
    avg = merge(pre, fts, "weight_averaging")
    for k in pre:
        assert torch.allclose(equal.state_dict[k].float(), avg.state_dict[k].float(), atol=1e-6), k
    fishers = [random_like_fisher(pre, s) for s in (2, 3, 4)]
    weighted = merge(pre, fts, FisherMerging(fisher_floor=1e-6).with_data(DataStatistics({"fisher": fishers})))
    for k in fishers[0]:  # Σ F_k θ_k / Σ F_k on the checkpoints themselves (not on task vectors)
        f = [fk[k] + 1e-6 for fk in fishers]
        want = sum(fi * ft[k] for fi, ft in zip(f, fts)) / sum(f)
        assert torch.allclose(weighted.state_dict[k], want, atol=1e-5), k
    assert not torch.allclose(weighted.state_dict["fc1.weight"], avg.state_dict["fc1.weight"], atol=1e-4)


@pytest.mark.parametrize("vmappable", [True, False])
def test_collected_fisher_is_the_mean_squared_per_sample_gradient(toy_root, monkeypatch, vmappable):
    """Also when vmap refuses the model (data-dependent control flow, as Hugging Face encoders' mask code):
    then the per-sample gradients are taken one sample at a time."""
    import freemerge_pl.lightning.activation_stats as stats_module

    if not vmappable:
        def refuse(fn, *args, **kwargs):
            def call(*a, **k):
                raise RuntimeError("vmap: It looks like you're attempting to use a Tensor in some data-dependent "
                                   "control flow")
            return call
        monkeypatch.setattr(stats_module, "vmap", refuse)
    adapter, pre, fts = toy_checkpoints(toy_root)
    dm = toy_datamodule(toy_root)
    method = FisherMerging(fisher_batches=2, batch_size=8, fisher_target="label")
    stats = collect_statistics(method, adapter, pre, fts, dm)
    assert stats.info["samples"] == 3 * 16
    # one task, by a plain loop: backward of each sample's log-likelihood of its label
    k, data = 1, dm.router_dataset().datasets[1]
    backbone = adapter.build_backbone()
    backbone.load_state_dict(fts[k])
    head = adapter.build_head("task1")
    want = {n: torch.zeros_like(p) for n, p in backbone.named_parameters()}
    for i in range(16):
        x, y, _ = data[i]
        backbone.zero_grad()
        torch.log_softmax(head(backbone(x[None])), -1)[0, y].backward()
        for n, p in backbone.named_parameters():
            want[n] += p.grad.square() / 16
    for n, value in want.items():
        assert torch.allclose(stats.get("fisher", n)[k], value, rtol=1e-4, atol=1e-9), n


def test_unbound_data_method_names_what_it_needs(toy_root):
    _, pre, fts = toy_checkpoints(toy_root)
    with pytest.raises(ConfigError, match="needs statistics from data"):
        merge(pre, fts, "fisher")
    with pytest.raises(ValueError, match="alpha"):
        build_method("regmean", {"alpha": 1.5})


# ------------------------------------------------------------------------------------------ RegMean


class LinearAdapter(ModelAdapter):
    """K linear-regression "fine-tuned models" y = W x (no bias), heads the identity."""

    def __init__(self, pretrained, weights) -> None:
        self.pre, self.weights = pretrained, weights

    @property
    def task_names(self):
        return [f"r{k}" for k in range(len(self.weights))]

    def pretrained_state_dict(self):
        return {"weight": self.pre.clone()}

    def finetuned_state_dict(self, task):
        return {"weight": self.weights[int(task[1:])].clone()}

    def build_backbone(self):
        return nn.Linear(self.pre.shape[1], self.pre.shape[0], bias=False)

    def build_head(self, task):
        return nn.Identity()

    def num_classes(self, task):
        return self.pre.shape[0]


class RouterSplit:
    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets

    def router_dataset(self):
        return ConcatDataset(self.datasets)


class Triples(Dataset):
    def __init__(self, x, y, t) -> None:
        self.x, self.y, self.t = x, y, t

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.t


def regression_problem(K=3, n=40, d=5, o=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) * (k + 1) + k for k in range(K)]
    ys = [x @ torch.randn(d, o, generator=g) + 0.1 * torch.randn(n, o, generator=g) for x in xs]
    weights = [torch.linalg.lstsq(x, y).solution.T.contiguous() for x, y in zip(xs, ys)]  # each task's LS fit
    return xs, ys, weights, torch.randn(o, d, generator=g)


def test_regmean_on_linear_regression_is_least_squares_on_the_concatenated_data():
    xs, ys, weights, pre = regression_problem()
    adapter = LinearAdapter(pre, weights)
    split = RouterSplit([Triples(x, y, k) for k, (x, y) in enumerate(zip(xs, ys))])
    method = RegMean(alpha=1.0, gram_batches=5, batch_size=8)  # 5 × 8 = all 40 samples of each task
    stats = collect_statistics(method, adapter, adapter.pretrained_state_dict(),
                               [adapter.finetuned_state_dict(t) for t in adapter.task_names], split)
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in adapter.task_names],
                method.with_data(stats))
    want = torch.linalg.lstsq(torch.cat(xs).double(), torch.cat(ys).double()).solution.T
    assert torch.allclose(out.state_dict["weight"].double(), want, rtol=1e-4, atol=1e-4)
    avg = torch.stack(weights).mean(0).double()
    assert not torch.allclose(avg, want, atol=1e-2)  # averaging is not the least-squares answer here
    # α < 1 shrinks the Grams' off-diagonal entries and gives another solution
    shrunk = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in adapter.task_names],
                   RegMean(alpha=0.5).with_data(stats)).state_dict["weight"]
    g = [scale_off_diagonal(stats.get("gram", "weight")[k].double(), 0.5) for k in range(3)]
    manual = torch.linalg.solve(sum(g), sum(gk @ w.double().T for gk, w in zip(g, weights))).T
    assert torch.allclose(shrunk.double(), manual, rtol=1e-4, atol=1e-5)


def test_regmean_averages_what_has_no_gram(toy_root):
    _, pre, fts = toy_checkpoints(toy_root)
    stats = DataStatistics({"gram": [{} for _ in fts]})
    out = merge(pre, fts, RegMean().with_data(stats))
    avg = merge(pre, fts, "weight_averaging")
    assert all(torch.allclose(out.state_dict[k], avg.state_dict[k], atol=1e-6) for k in pre)
    assert "fc1.weight" in out.result.info["averaged_keys"]


# ------------------------------------------------------------------------------------------ AdaMerging


def mean_entropy(backbone, heads, datasets) -> float:
    """Σ_k mean entropy of head k over all of task k's inputs (an independent full-data evaluation)."""
    total = 0.0
    with torch.no_grad():
        for k, ds in enumerate(datasets):
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            total += float(entropy_sum(heads[k](backbone(x)))) / len(ds)
    return total


@pytest.mark.parametrize("cls", [AdaMerging, AdaMergingPP])
def test_adamerging_lowers_entropy_and_trains_only_the_coefficients(toy_root, cls):
    adapter, pre, fts = toy_checkpoints(toy_root)
    dm = toy_datamodule(toy_root)
    datasets = activation_stats.task_datasets(dm)
    method = cls(steps=40, lr=0.05, batch_size=16)
    keys = [k for k in pre if pre[k].is_floating_point()]
    vectors = activation_stats.prepared_task_vectors(method, pre, fts, keys, 0.0, "cpu")
    backbone = adapter.build_backbone()
    backbone.load_state_dict(pre)
    model = CoefficientModel(backbone, pre, vectors, method.granularity, method.init)
    heads = [adapter.build_head(t).requires_grad_(False) for t in adapter.task_names]

    def entropy_now() -> float:
        merged = adapter.build_backbone()
        merged.load_state_dict({**pre, **{k: v.detach() for k, v in model.merged().items()}})
        return mean_entropy(merged, heads, datasets)

    before = entropy_now()
    train_coefficients(model, heads, datasets, method, "cpu")
    after = entropy_now()
    assert after < before - 1e-3
    assert not torch.allclose(model.coefficients.detach(), torch.full_like(model.coefficients, 0.3))
    assert model.coefficients.grad is not None and model.coefficients.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["coefficients"]
    for p in [*backbone.parameters(), *(q for h in heads for q in h.parameters())]:
        assert not p.requires_grad and p.grad is None
    # the engine's merge with these coefficients is the trained model's weights
    stats = DataStatistics(shared={"coefficients": model.per_key()})
    merged = merge(pre, fts, method.with_data(stats)).state_dict
    for k, v in model.merged().items():
        assert torch.allclose(merged[k], v.detach(), atol=1e-6), k


def test_adamerging_task_granularity_learns_one_coefficient_per_task(toy_root):
    adapter, pre, fts = toy_checkpoints(toy_root)
    stats = collect_statistics(AdaMerging(granularity="task", steps=5, lr=0.05), adapter, pre, fts,
                               toy_datamodule(toy_root))
    lams = [stats.get("coefficients", k) for k in ("fc1.weight", "fc2.bias")]
    assert lams[0].shape == (3,) and torch.equal(lams[0], lams[1])
    assert stats.info["steps"] == 5


# ------------------------------------------------------------------------------------------ MTL


def test_mtl_fine_tunes_the_backbone_jointly_and_lowers_the_training_loss(toy_root):
    adapter, pre, fts = toy_checkpoints(toy_root)
    dm = toy_datamodule(toy_root)
    method = MultiTaskLearning(epochs=10, lr=3e-3, batch_size=16)
    stats = collect_statistics(method, adapter, pre, fts, dm)
    out = merge(pre, fts, method.with_data(stats)).state_dict
    heads = [adapter.build_head(t) for t in adapter.task_names]

    def loss(sd) -> float:
        backbone = adapter.build_backbone()
        backbone.load_state_dict(sd)
        with torch.no_grad():
            total = 0.0
            for k, ds in enumerate(dm.router_dataset().datasets):
                x = torch.stack([ds[i][0] for i in range(len(ds))])
                y = torch.tensor([ds[i][1] for i in range(len(ds))])
                total += float(nn.functional.cross_entropy(heads[k](backbone(x)), y))
        return total

    assert loss(out) < 0.8 * loss(pre)
    assert stats.info["samples"] == 3 * 40 and stats.info["sample_passes"] == 10 * 3 * 40
    assert out["step"].dtype == torch.long
    train = collect_statistics(MultiTaskLearning(epochs=1, data_split="train", train_fraction=0.25), adapter, pre,
                               fts, dm)
    assert train.info["samples"] == 3 * 100  # a quarter of each 400-sample training split
    other = collect_statistics(MultiTaskLearning(epochs=1, data_split="train", train_fraction=0.25,
                                                 train_split_args={"split": "test"}), adapter, pre, fts, dm)
    assert other.info["samples"] == 3 * 50  # a quarter of each 200-sample split named by train_split_args
    with pytest.raises(ConfigError, match="train_split_args=.*ignored by data_split='router'"):
        MultiTaskLearning(train_split_args={"split": "train"})


# ------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_statistics(root) -> dict[str, dict[str, torch.Tensor]]:
    """Fisher and Gram statistics of the toy (first 21 training samples per task, odd batches of 7)."""
    from freemerge_pl.adapters.toy import ToyTaskDataset

    adapter, pre, fts = toy_checkpoints(root)
    split = RouterSplit([Triples(ToyTaskDataset(str(root), t).x[:30], ToyTaskDataset(str(root), t).y[:30], k)
                         for k, t in enumerate(TASKS)])
    result = {}
    for name, method in (("fisher", FisherMerging(fisher_batches=3, batch_size=7)),
                         ("gram", RegMean(gram_batches=3, batch_size=7))):
        stats = collect_statistics(method, adapter, pre, fts, split)
        result[name] = {k: stats.get(name, k) for k in stats.keys(name)}
    return result


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(toy_statistics(root), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch and the package (most of its time)
def test_ddp_two_processes_give_the_statistics_of_one(toy_root, tmp_path):
    single = toy_statistics(toy_root)
    out = str(tmp_path / "stats")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(toy_root), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    for name in ("fisher", "gram"):
        assert set(ranks[0][name]) == set(single[name]) and single[name]
        for k, want in single[name].items():
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)  # ranks agree bit for bit
            scale = float(want.abs().max())  # sums in another order: equal up to rounding of the largest terms
            assert torch.allclose(ranks[0][name][k], want, rtol=1e-5, atol=1e-6 * scale), (name, k)


# ------------------------------------------------------------------------------------------ CLI


METHOD_ARGS = {
    "fisher": {"fisher_batches": 2, "batch_size": 8},
    "regmean": {"gram_batches": 2, "batch_size": 8},
    "adamerging": {"steps": 10, "lr": 0.01},
    "adamerging_pp": {"steps": 10, "lr": 0.01, "density": 0.3},
    "mtl": {"epochs": 2, "lr": 1e-3},
}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_cli_test_runs_each_data_method_on_the_toy(toy_root, tmp_path, method):
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(run),
                    "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable",
                                   "init_args": {"print_table": False}}]},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter", "init_args": {"root": str(toy_root)}},
                  "method": method, "method_args": METHOD_ARGS[method], "routing": "oracle"},
        "data": {"router_fraction": 0.1, "batch_size": 32,
                 "tasks": [{"name": t, "dataset": "freemerge_pl.adapters.toy.ToyTaskDataset",
                            "dataset_args": {"root": str(toy_root), "task": t}} for t in TASKS]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from freemerge_pl.lightning.cli import main

    cli = main(["test", "--config", str(path)])
    res = json.loads((run / "results" / "results.json").read_text())
    assert res["method"] == method and res["method_args"] == METHOD_ARGS[method]
    assert set(res["tasks"]) == set(TASKS) and 0.0 <= res["avg"]["accuracy"] <= 1.0
    record = cli.model.merge_record["data_statistics"]
    assert record["seconds"] >= 0 and record["samples"] > 0 and record["world_size"] == 1


def test_task_id_datasets_feed_the_collectors_without_the_test_split(toy_root):
    from freemerge_pl.lightning.datamodule import TaskIdDataset

    dm = toy_datamodule(toy_root)
    datasets = activation_stats.task_datasets(dm)
    assert [type(d) for d in datasets] == [TaskIdDataset] * 3
    assert [len(d) for d in datasets] == [len(dm.router_indices[t]) for t in TASKS]
