"""The router: feature sources, heads, the one training loop, settings checks, single-task configs, routing reports."""

from pathlib import Path

import pytest
import torch
from freemerge_pl.callbacks import RoutingStats
from torch.nn import functional as F

from freemerge_pl.adapters.base import vit_prefix_features
from freemerge_pl.adapters.toy import ToyAdapter, ToyBackbone, make_toy_models
from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.routed import RoutedModel
from freemerge_pl.lightning.router import (
    BATCH_SIZE,
    SEED,
    WEIGHT_DECAY,
    Router,
    RouterConfig,
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


def routed(adapter, dm, split_block: int, **router) -> RoutedModel:
    """A RoutedModel with another prefix depth: a variant built directly (split_block is no setting)."""
    module = built(adapter, dm)
    return RoutedModel(adapter, module.task_names, module.backbone, list(module.task_modules),
                       router_config=RouterConfig(**router), example_input=dm.router_dataset()[0][0][None],
                       split_block=split_block)


def test_bad_settings_fail_with_named_errors(toy_root):
    with pytest.raises(ConfigError, match=r"^model\.router\.head='knn'; accepted: \['linear', 'mlp'\]$"):
        RouterConfig(head="knn")
    with pytest.raises(ConfigError, match=r"model\.router\.feature_source='pixels'"):
        RouterConfig(feature_source="pixels")
    with pytest.raises(HyperparameterError, match=r"^model\.router\.lr=0 is outside its accepted range \(0, inf\)$"):
        RouterConfig(lr=0)
    with pytest.raises(HyperparameterError, match=r"model\.router\.epochs=-1 is outside its accepted range \[0, inf\]"):
        RouterConfig(epochs=-1)
    with pytest.raises(ConfigError, match=r"model\.router\.hidden_dim=2\.5 is not an integer"):
        RouterConfig(hidden_dim=2.5)
    for removed in ("split_block", "fallback_threshold", "shared_prefix", "batch_size", "seed"):
        with pytest.raises(TypeError, match=removed):  # benchmark-only settings left the product API
            RouterConfig(**{removed: 1})
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
    module = MergedModule(PrefixToyAdapter(str(toy_root)), router=RouterConfig(feature_source="backbone_prefix"))
    with pytest.raises(ConfigError, match=r"split_block=3 is beyond"):
        module.build(dm.router_dataset()[0][0][None])


def test_auto_feature_source_follows_the_adapters_inputs(toy_root):
    auto = RouterConfig()
    assert auto.feature_source == "auto"
    assert resolve_feature_source(auto, "image") == "pretrained"
    assert resolve_feature_source(auto, "tokens") == "pretrained_backbone"  # the first blocks, token mean
    assert resolve_feature_source(auto, "tokens", has_prefix=False) == "pretrained"
    assert resolve_feature_source(auto, "other") == "input"
    with pytest.raises(ConfigError, match="input_kind='audio'"):
        resolve_feature_source(auto, "audio")
    from freemerge_pl.adapters.hf_text import HFSequenceClassificationAdapter
    from freemerge_pl.adapters.open_clip_adapter import OpenCLIPAdapter
    from freemerge_pl.adapters.peft_lora import PeftLoRAAdapter
    from freemerge_pl.adapters.zoo_vit import ZooViTAdapter

    assert ZooViTAdapter.input_kind == OpenCLIPAdapter.input_kind == "image"
    assert HFSequenceClassificationAdapter.input_kind == PeftLoRAAdapter.input_kind == "tokens"
    # a token adapter without a prefix: its default router reads the pre-trained backbone's pooled features (the
    # toy's: its output), not the raw ids and not the merge: another merge candidate routes alike
    dm = datamodule(toy_root)
    adapter = TokenToyAdapter(str(toy_root))
    module = built(adapter, dm)
    x = dm.router_dataset()[0][0][None]
    pre = ToyBackbone(**adapter.manifest["config"])
    pre.load_state_dict(adapter.pretrained_state_dict())
    assert module.model.feature_source == "pretrained" and not module.router_reads_merged_backbone
    torch.testing.assert_close(module.model.router_input(x), pre(x))
    assert not torch.allclose(module.model.router_input(x), module.backbone(x))


def test_vit_pooled_features_are_the_last_blocks_class_token_and_token_mean():
    """The open_clip ViT's ``pretrained`` features: after every block, the class token beside the mean of the
    patch tokens, written out here with the transformer's own forward (blocks, no ln_post / projection)."""
    from freemerge_pl.adapters.zoo_vit import ZooViTAdapter
    from freemerge_pl.zoo.vision.build import build_vit

    torch.manual_seed(0)
    vit = build_vit({"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                     "output_dim": 8}).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.transformer(vit._embeds(x))  # [B, 1 + 4 patches, width]
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
        pooled = ZooViTAdapter.pooled_features(ZooViTAdapter.__new__(ZooViTAdapter), vit, x)
    assert pooled.shape == (3, 32)
    torch.testing.assert_close(pooled, expected)


def test_pretrained_and_prefix_sources_read_the_right_weights(toy_root):
    dm = datamodule(toy_root)
    adapter = PrefixToyAdapter(str(toy_root))
    x = torch.stack([dm.router_dataset()[i][0] for i in range(4)])
    pre = ToyBackbone(**adapter.manifest["config"])
    pre.load_state_dict(adapter.pretrained_state_dict())
    whole = routed(adapter, dm, 0, feature_source="pretrained_backbone")
    torch.testing.assert_close(whole.router_input(x), pre(x))
    assert not whole.reads_merged_backbone
    assert not any(k.startswith("_pretrained") for k in whole.state_dict())  # not saved: re-read
    one = routed(adapter, dm, 1, feature_source="pretrained_backbone")
    torch.testing.assert_close(one.router_input(x), F.gelu(pre.fc1(x)))
    merged = routed(adapter, dm, 1, feature_source="backbone_prefix")
    torch.testing.assert_close(merged.router_input(x), F.gelu(merged.backbone.fc1(x)))
    assert merged.router.mlp[0].normalized_shape == (adapter.manifest["config"]["hidden_dim"],)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_every_head_routes_the_separable_toy_tasks(toy_root, head):
    dm = datamodule(toy_root)
    module = built(ToyAdapter(str(toy_root)), dm, router=RouterConfig(head=head, epochs=50, lr=0.01))
    module.fit_router(dm.router_dataset())
    assert bool(module.router_trained)
    x = torch.cat([dm._test[t].x for t in TASKS])
    t = torch.cat([torch.full((len(dm._test[n].y),), i) for i, n in enumerate(TASKS)])
    dm.setup()
    assert (module.model.route(x)[0][:, 0] == t).float().mean() > 0.95


def test_router_fit_is_a_plain_seeded_adamw_loop():
    """``Router.fit`` against the loop written out here: SEED-shuffled batches of BATCH_SIZE, AdamW(lr,
    WEIGHT_DECAY), cross-entropy, ``epochs`` passes; the initial weights are copied, so both start equal."""
    g = torch.Generator().manual_seed(1)
    feats, ids = torch.randn(150, 6, generator=g), torch.arange(150) % 3
    config = RouterConfig(head="mlp", epochs=3, lr=0.01, hidden_dim=8)
    router = Router(3, config, 6)
    ref = Router(3, config, 6)
    ref.load_state_dict(router.state_dict())
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=WEIGHT_DECAY)
    order = torch.Generator().manual_seed(SEED)
    for _ in range(3):  # per epoch a DataLoader draws its workers' base seed from the generator, then its
        torch.empty((), dtype=torch.int64).random_(generator=order)  # RandomSampler a permutation and an
        perm = torch.randperm(150, generator=order)  # (empty) remainder permutation
        torch.randperm(150, generator=order)
        for start in range(0, 150, BATCH_SIZE):
            rows = perm[start:start + BATCH_SIZE]
            opt.zero_grad()
            F.cross_entropy(ref(feats[rows]), ids[rows]).backward()
            opt.step()
    router.fit(feats, ids)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, router.state_dict()[k]), k
    assert not router.training


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
    assert (tmp_path / "results" / "routing_confusion.md").read_text().endswith(
        "routing accuracy (mean over tasks): 1.0000\nrouting accuracy (pooled over all samples): 1.0000\n")


def test_routing_confusion_markdown_and_png(tmp_path):
    matrix = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    md = routing_confusion_markdown(matrix, ["a", "b", "c"])
    assert "| a | 8 | 2 | 0 | 0.800 |" in md and "| c | 0 | 5 | 5 | 0.500 |" in md
    assert md.endswith(f"routing accuracy (mean over tasks): {22 / 30:.4f}\n"
                       f"routing accuracy (pooled over all samples): {22 / 30:.4f}\n")
    # tasks of unequal size: the mean over tasks (0.9 and 0.5) and the pooled share (19 of 30) differ, each labelled
    md = routing_confusion_markdown([[9, 1], [10, 10]], ["a", "b"])
    assert md.endswith(f"(mean over tasks): {0.7:.4f}\nrouting accuracy (pooled over all samples): {19 / 30:.4f}\n")
    pytest.importorskip("matplotlib")
    from freemerge_pl.callbacks.routing import plot_routing_confusion

    fig = plot_routing_confusion(matrix, ["a", "b", "c"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_pretrained_source_pools_the_unmasked_tokens_of_the_pretrained_encoder():
    """``feature_source: pretrained`` on a token adapter: the mean of θ_pre's last hidden states over the real
    tokens; checked against each text run alone, unpadded (padding must not move the features)."""
    from transformers import BertConfig, BertModel

    from freemerge_pl.adapters.hf_text import HFSequenceClassificationAdapter, TextEncoderBackbone

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    backbone = TextEncoderBackbone(BertModel(config), "bert", "pooler").eval()
    ids = torch.randint(1, 40, (3, 8))
    lengths = [8, 5, 2]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    packed = torch.stack([ids, mask], 1)
    adapter = HFSequenceClassificationAdapter.__new__(HFSequenceClassificationAdapter)  # no checkpoints needed
    with torch.no_grad():
        pooled = adapter.pooled_features(backbone, packed)
        for i, n in enumerate(lengths):
            alone = backbone.bert(input_ids=ids[i:i + 1, :n], return_dict=True).last_hidden_state[0]
            torch.testing.assert_close(pooled[i], alone.mean(0), atol=1e-5, rtol=1e-5)
        # the prefix (the auto source's features on θ_pre): the token mean after the first layer
        first = adapter.prefix_features(backbone, packed, 1)
        for i, n in enumerate(lengths):
            alone = backbone.bert(input_ids=ids[i:i + 1, :n], output_hidden_states=True).hidden_states[1][0]
            torch.testing.assert_close(first[i], alone.mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, backbone(packed))  # not the pooler output
    with pytest.raises(ConfigError, match="prefix of 3 layers is beyond the encoder's depth: BertModel has 2"):
        adapter.prefix_features(backbone, packed, 3)
    assert resolve_feature_source(RouterConfig(feature_source="pretrained"), "tokens") == "pretrained"
