"""The router: feature sources, heads, confidence fallback, settings checks, single-task configs, routing reports."""

from pathlib import Path

import pytest
import torch
from freemerge_pl.callbacks import RoutingStats
from torch.nn import functional as F

from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.errors import ConfigError
from freemerge_pl.adapters.base import vit_prefix_features
from freemerge_pl.adapters.toy import ToyAdapter, ToyBackbone, make_toy_models
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.router import (
    Router,
    RouterConfig,
    fallback_routing,
    resolve_feature_source,
    routing_confusion_markdown,
)

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_models(tmp_path_factory.mktemp("toy_router"))


class TokenToyAdapter(ToyAdapter):
    """The toy family presented as a token model (its inputs are then no pixels)."""

    input_kind = "tokens"


class PrefixToyAdapter(ToyAdapter):
    """The toy family with a two-block prefix: block 1 = GELU(fc1 x), block 2 = fc2(...)."""

    def prefix_features(self, backbone, x, n_blocks):
        if not 0 <= n_blocks <= 2:
            raise ConfigError(f"model.router.split_block={n_blocks} is beyond the toy backbone's depth 2")
        h = F.gelu(backbone.fc1(x.float())) if n_blocks >= 1 else x.float()
        return backbone.fc2(h) if n_blocks == 2 else h


def datamodule(root, tasks=TASKS, **kw) -> MultiTaskDataModule:
    cfgs = [TaskConfig(name=t, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                       dataset_args={"root": str(root), "task": t}) for t in tasks]
    return MultiTaskDataModule(cfgs, router_fraction=kw.pop("router_fraction", 0.1), batch_size=64, **kw)


def built(adapter, dm, **kw) -> MergedModule:
    module = MergedModule(adapter, method_args={"expert_density": 0.2}, **kw)
    module.build(dm.router_dataset()[0][0][None])
    return module


def test_bad_settings_fail_with_named_errors(toy_root):
    with pytest.raises(ConfigError, match=r"model\.router\.head='knn'.*linear.*mlp.*ncm"):
        RouterConfig(head="knn")
    with pytest.raises(ConfigError, match=r"model\.router\.feature_source='pixels'"):
        RouterConfig(feature_source="pixels")
    with pytest.raises(ConfigError, match=r"model\.router\.split_block=0"):
        RouterConfig(feature_source="backbone_prefix", split_block=0)
    with pytest.raises(ConfigError, match=r"model\.router\.fallback_threshold=1\.5"):
        RouterConfig(fallback_threshold=1.5)
    with pytest.raises(ConfigError, match=r"model\.router\.fallback='mix'"):
        RouterConfig(fallback="mix")
    # a prefix asked of an adapter that cannot run one: at construction, naming the adapter's missing method
    with pytest.raises(ConfigError, match=r"ToyAdapter\.prefix_features"):
        MergedModule(ToyAdapter(str(toy_root)), router=RouterConfig(feature_source="backbone_prefix"))
    # pixel pooling on token ids: refused at construction
    with pytest.raises(ConfigError, match=r"feature_source='input'.*token ids"):
        MergedModule(TokenToyAdapter(str(toy_root)), router=RouterConfig(feature_source="input"))


def test_split_point_beyond_depth_fails_with_named_error(toy_root):
    from freemerge_pl.zoo.vision.build import build_vit

    vit = build_vit({"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                     "output_dim": 8}).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = vit.transformer(vit._embeds(x))[:, 0]
        torch.testing.assert_close(vit_prefix_features(vit, x, 2), full)
    with pytest.raises(ConfigError, match=r"model\.router\.split_block=3 is beyond the backbone's depth.*2 blocks"):
        vit_prefix_features(vit, x, 3)
    with pytest.raises(ConfigError, match="no open_clip VisionTransformer"):
        vit_prefix_features(ToyBackbone(), torch.randn(2, 16), 1)
    # through the module: the split point is checked when the backbone is built, before any router training
    dm = datamodule(toy_root)
    module = MergedModule(PrefixToyAdapter(str(toy_root)),
                          router=RouterConfig(feature_source="backbone_prefix", split_block=3))
    with pytest.raises(ConfigError, match=r"split_block=3 is beyond"):
        module.build(dm.router_dataset()[0][0][None])


def test_auto_feature_source_follows_the_adapters_inputs(toy_root):
    auto = RouterConfig()
    assert auto.feature_source == "auto"
    assert resolve_feature_source(auto, "image") == "backbone_prefix"
    assert resolve_feature_source(auto, "image", has_prefix=False) == "backbone"  # e.g. HF CLIP, timm
    assert resolve_feature_source(auto, "tokens") == "backbone"
    assert resolve_feature_source(auto, "other") == "input"
    with pytest.raises(ConfigError, match="input_kind='audio'"):
        resolve_feature_source(auto, "audio")
    from freemerge_pl.adapters.hf_text import HFSequenceClassificationAdapter
    from freemerge_pl.adapters.open_clip_adapter import OpenCLIPAdapter
    from freemerge_pl.adapters.peft_lora import PeftLoRAAdapter
    from freemerge_pl.adapters.zoo_vit import ZooViTAdapter

    assert ZooViTAdapter.input_kind == OpenCLIPAdapter.input_kind == "image"
    assert HFSequenceClassificationAdapter.input_kind == PeftLoRAAdapter.input_kind == "tokens"
    # a token adapter's default router reads the merged backbone's features, not the raw ids
    dm = datamodule(toy_root)
    module = built(TokenToyAdapter(str(toy_root)), dm)
    x = dm.router_dataset()[0][0][None]
    assert module.router_feature_source == "backbone" and module.router_reads_merged_backbone
    torch.testing.assert_close(module._router_features_raw(x), module.backbone(x))


def test_pretrained_and_prefix_sources_read_the_right_weights(toy_root):
    dm = datamodule(toy_root)
    adapter = PrefixToyAdapter(str(toy_root))
    x = torch.stack([dm.router_dataset()[i][0] for i in range(4)])
    pre = ToyBackbone(**adapter.manifest["config"])
    pre.load_state_dict(adapter.pretrained_state_dict())
    whole = built(adapter, dm, router=RouterConfig(feature_source="pretrained_backbone", split_block=0))
    torch.testing.assert_close(whole._router_features_raw(x), pre(x))
    assert not whole.router_reads_merged_backbone
    assert not any(k.startswith("_router_pretrained") for k in whole.state_dict())  # not saved: re-read
    one = built(adapter, dm, router=RouterConfig(feature_source="pretrained_backbone", split_block=1))
    torch.testing.assert_close(one._router_features_raw(x), F.gelu(pre.fc1(x)))
    merged = built(adapter, dm, router=RouterConfig(feature_source="backbone_prefix", split_block=1))
    torch.testing.assert_close(merged._router_features_raw(x), F.gelu(merged.backbone.fc1(x)))
    assert merged.router.mlp[0].normalized_shape == (adapter.manifest["config"]["hidden_dim"],)


def test_ncm_head_is_the_nearest_centred_task_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g) + 5.0  # a large common offset: centring matters
    ids = torch.arange(60) % 3
    feats[ids == 1, 0] += 6.0
    feats[ids == 2, 1] += 6.0
    router = Router(3, RouterConfig(head="ncm", ncm_temperature=0.1), 8)
    assert not router.trainable and not list(router.parameters())
    router.fit_means(feats, ids)
    queries = torch.randn(10, 8, generator=g) + 5.0
    centre = feats.mean(0)
    z = F.normalize(feats - centre, dim=1)
    means = torch.stack([F.normalize(z[ids == k].mean(0), dim=0) for k in range(3)])
    expected = F.normalize(queries - centre, dim=1) @ means.T / 0.1
    torch.testing.assert_close(router(queries), expected)
    assert (router(feats).argmax(1) == ids).float().mean() > 0.9
    with pytest.raises(ConfigError, match=r"no sample of task id\(s\) \[2\]"):
        router.fit_means(feats[ids < 2], ids[ids < 2])


@pytest.mark.parametrize("head", ["linear", "mlp", "ncm"])
def test_every_head_routes_the_separable_toy_tasks(toy_root, head):
    dm = datamodule(toy_root)
    module = built(ToyAdapter(str(toy_root)), dm, router=RouterConfig(head=head, epochs=50, lr=0.01))
    module.fit_router(dm.router_dataset())
    assert bool(module.router_trained)
    x = torch.cat([dm._test[t].x for t in TASKS])
    t = torch.cat([torch.full((len(dm._test[n].y),), i) for i, n in enumerate(TASKS)])
    dm.setup()
    assert (module.route(x)[0][:, 0] == t).float().mean() > 0.95


def _accuracy(module, dm, ids, weights) -> float:
    correct = total = 0
    for i, name in enumerate(TASKS):
        ds = dm._test[name]
        n = len(ds.y)
        sel = slice(i * n, (i + 1) * n)
        feats = module.features(ds.x, ids[sel], weights[sel])
        correct += int((module.head_outputs(feats, i).argmax(-1) == ds.y).sum())
        total += n
    return correct / total


def test_fallback_never_lowers_accuracy_below_the_backbone_with_a_random_router(toy_root):
    """A random router (untrained, its logits near uniform) with a confidence threshold falls back to the
    merged backbone alone on every sample, so routed FREE equals the backbone; without it, it is worse."""
    dm = datamodule(toy_root)
    dm.setup()
    module = built(ToyAdapter(str(toy_root)), dm, router=RouterConfig(fallback_threshold=0.6))
    x = torch.cat([dm._test[t].x for t in TASKS])
    with torch.no_grad():
        logits = module.router_logits(x)
    assert float(torch.softmax(logits, -1).amax(-1).max()) < 0.6  # the untrained router is unsure everywhere
    ids, weights = module.route(x)
    assert bool((weights == 0).all())
    alone = _accuracy(module, dm, ids, torch.zeros_like(weights))
    routed = _accuracy(module, dm, ids, weights)
    assert routed == alone
    torch.testing.assert_close(module.features(x, ids, weights), module.backbone(x), rtol=0, atol=0)
    random_ids = torch.randint(0, 3, (len(x), 1), generator=torch.Generator().manual_seed(0))
    unguarded = _accuracy(module, dm, random_ids, torch.ones(len(x), 1))
    assert unguarded < alone  # what the fallback protects against


@pytest.mark.parametrize("expert_path", ["weight_swap", "activation"])
def test_fallback_rows_mixed_with_routed_rows(toy_root, expert_path):
    """In one batch, weight-0 rows get the backbone alone and the others their expert (top-1), on both paths."""
    dm = datamodule(toy_root)
    dm.setup()
    module = built(ToyAdapter(str(toy_root)), dm, expert_path=expert_path)
    x = torch.cat([dm._test[t].x[:4] for t in TASKS])
    ids = torch.tensor([0, 1, 2] * 4)[:, None]
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0] * 3)[:, None]
    out = module.features(x, ids, weights)
    for i in range(len(x)):
        ref = module.features(x[i:i + 1], ids[i:i + 1]) if weights[i] else module.backbone(x[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_soft_fallback_mixes_the_top_experts():
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.2, 0.1, 0.0], [0.0, 0.3, 0.25]])
    ids, weights = torch.tensor([[0], [0], [1]]), torch.ones(3, 1)
    soft_ids, soft_w = fallback_routing(logits, ids, weights, 0.5, "soft")
    assert soft_ids.tolist()[0] == [0, 0] and soft_w.tolist()[0] == [1.0, 0.0]  # confident: unchanged
    assert soft_ids.tolist()[1] == [0, 1] and soft_ids.tolist()[2] == [1, 2]
    torch.testing.assert_close(soft_w[1], torch.softmax(torch.tensor([0.2, 0.1]), 0))
    torch.testing.assert_close(soft_w[2], torch.softmax(torch.tensor([0.3, 0.25]), 0))
    none_ids, none_w = fallback_routing(logits, ids, weights, 0.5, "none")
    assert torch.equal(none_ids, ids) and none_w.flatten().tolist() == [1.0, 0.0, 0.0]


def test_single_task_config_tests(toy_root, tmp_path):
    from lightning.pytorch import Trainer

    class OneTask(ToyAdapter):
        @property
        def task_names(self):
            return ["task1"]

    dm = datamodule(toy_root, tasks=("task1",))
    module = MergedModule(OneTask(str(toy_root)), method_args={"expert_density": 0.2})
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[RoutingStats(plot=False)])
    trainer.test(module, datamodule=dm, verbose=False)
    results = module.test_results
    n = len(dm._test["task1"].y)
    assert results["routing_confusion"] == [[n]]
    assert results["tasks"]["task1"]["routing_accuracy"] == 1.0
    assert (tmp_path / "results" / "routing_confusion.md").read_text().endswith("routing accuracy: 1.0000\n")


def test_routing_confusion_markdown_and_png(tmp_path):
    matrix = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    md = routing_confusion_markdown(matrix, ["a", "b", "c"])
    assert "| a | 8 | 2 | 0 | 0.800 |" in md and "| c | 0 | 5 | 5 | 0.500 |" in md
    assert md.endswith(f"routing accuracy: {22 / 30:.4f}\n")
    pytest.importorskip("matplotlib")
    from freemerge_pl.callbacks.routing import plot_routing_confusion

    fig = plot_routing_confusion(matrix, ["a", "b", "c"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_ncm_head_fits_under_lightning_fit(toy_root, tmp_path):
    """``head: ncm`` has no parameters to optimise: ``Trainer.fit`` fits the task means from the epoch's router
    features, the same means as ``fit_router`` on the router split (independently: the means of the centred,
    normalised features computed here), and marks the router trained."""
    from lightning.pytorch import Trainer

    dm = datamodule(toy_root)
    module = built(ToyAdapter(str(toy_root)), dm, router=RouterConfig(head="ncm"))
    assert not bool(module.router_trained)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert bool(module.router_trained)
    feats, ids = module.router_features(dm.router_dataset())
    mean = feats.float().mean(0)
    z = F.normalize(feats.float() - mean, dim=-1)
    want = torch.stack([F.normalize(z[ids == k].sum(0), dim=0) for k in range(len(TASKS))])
    torch.testing.assert_close(module.router.feature_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.router.class_means, want, rtol=1e-5, atol=1e-6)
