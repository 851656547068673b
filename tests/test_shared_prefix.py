"""``router.shared_prefix``: the router's prefix of the merged backbone runs once and each sample's expert applies
after it. Checked against an independent reference: a plain open_clip forward of a copy of the backbone whose
weights are the merged ones plus the expert on the keys after the prefix only."""

import copy
import re

import pytest
import torch
from torch import nn

from freemerge_pl.errors import ConfigError
from freemerge_pl.adapters.base import ModelAdapter, OpenCLIPViTSplit
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.router import RouterConfig
from freemerge_pl.zoo.vision.build import build_vit
from freemerge_pl.zoo.vision.recipe import SIZES

CONFIG = dict(SIZES["tiny"]["backbone"], layers=3)
TASKS = ["a", "b", "c"]
SPLIT = 1


class TinyViTAdapter(OpenCLIPViTSplit, ModelAdapter):
    """Three synthetic fine-tunes of a seeded 3-block open_clip ViT, in memory."""

    input_kind = "image"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.pre = {k: v.clone() for k, v in build_vit(CONFIG).state_dict().items()}
        g = torch.Generator().manual_seed(1)
        self.fts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in self.pre.items()}
                    for t in TASKS}

    @property
    def task_names(self):
        return TASKS

    def pretrained_state_dict(self):
        return self.pre

    def finetuned_state_dict(self, task):
        return self.fts[task]

    def build_backbone(self):
        return build_vit(CONFIG).eval()

    def num_classes(self, task):
        return 4

    def build_head(self, task):
        torch.manual_seed(TASKS.index(task))
        return nn.Linear(CONFIG["output_dim"], 4)


def prefix_key(key: str) -> bool:
    """Keys of the modules run before block SPLIT: embeddings, ln_pre and the first SPLIT blocks."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return (int(m.group(1)) < SPLIT) if m else not key.startswith(("ln_post", "proj", "transformer"))


def reference(module: MergedModule, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sample through a copy of the backbone holding merged + its expert on the keys after the prefix."""
    merged = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    out = []
    for i in range(x.shape[0]):
        net = copy.deepcopy(module.backbone)
        module.task_modules[int(ids[i])].apply_(net, 1.0)
        net.load_state_dict({k: merged[k] if prefix_key(k) else v for k, v in net.state_dict().items()})
        with torch.no_grad():
            out.append(net(x[i:i + 1]))
    return torch.cat(out)


def built(shared: bool, **router) -> MergedModule:
    module = MergedModule(TinyViTAdapter(), method="free_merging", method_args={"expert_density": 0.05},
                          router=RouterConfig(split_block=SPLIT, shared_prefix=shared, **router))
    module.build(torch.zeros(1, 3, 32, 32))
    return module


@pytest.mark.parametrize("path", ["activation", "weight_swap"])
def test_experts_apply_after_the_shared_prefix_only(path):
    module = built(True)
    module.expert_path = path
    x = torch.randn(7, 3, 32, 32)
    ids = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    feats, got_ids, _ = module.routed_features(x, ids)
    assert torch.equal(got_ids[:, 0], ids)
    want = reference(module, x, ids)
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)
    # the experts do touch the prefix keys: applied there too, the features differ
    full = torch.cat([module.features(x[i:i + 1], ids[i:i + 1, None]) for i in range(len(ids))])
    assert (full - want).abs().max() > 1e-4
    # the backbone is whole again: no forward override left
    assert "forward" not in module.backbone.transformer.__dict__ and "_embeds" not in module.backbone.__dict__
    torch.testing.assert_close(module.backbone(x), module.features(x, None))


def test_the_router_reads_the_same_prefix_features_and_runs_it_once():
    module = built(True)
    x = torch.randn(9, 3, 32, 32)
    want_ids, _ = module.route(x)  # the router on prefix_features, as without sharing
    calls = [0]
    handle = module.backbone.transformer.resblocks[0].register_forward_hook(
        lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
    module.expert_path = "weight_swap"  # one pass per routed group: the first block still runs once
    _, ids, _ = module.routed_features(x)
    handle.remove()
    assert torch.equal(ids, want_ids)
    assert calls[0] == 1
    torch.testing.assert_close(module.routed_features(x)[0], reference(module, x, ids[:, 0]), rtol=1e-4, atol=1e-5)


def test_shared_prefix_settings_are_checked():
    with pytest.raises(ConfigError, match="shared_prefix=true needs feature_source 'backbone_prefix'"):
        RouterConfig(feature_source="backbone", shared_prefix=True)
    with pytest.raises(ConfigError, match="shared_prefix='yes' must be true or false"):
        RouterConfig(shared_prefix="yes")

    class NoSuffix(TinyViTAdapter):
        suffix = ModelAdapter.suffix

    with pytest.raises(ConfigError, match=r"shared_prefix=true needs NoSuffix\.suffix"):
        MergedModule(NoSuffix(), method="free_merging", router=RouterConfig(split_block=SPLIT, shared_prefix=True))
    with pytest.raises(ConfigError, match="split_block=5 is beyond the backbone's depth"):
        built(True, feature_source="backbone_prefix").adapter.suffix(built(False).backbone, 5).__enter__()


def test_prefix_pool_class_mean_std_reads_the_prefix_tokens():
    """``prefix_pool: class_mean_std``: the class token, the mean and the (population) standard deviation of the
    other tokens after the prefix, computed here from open_clip's own modules; the shared path routes the same."""
    module = built(False, prefix_pool="class_mean_std")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        h = module.backbone._embeds(x)
        for block in module.backbone.transformer.resblocks[:SPLIT]:
            h = block(h)
    tokens = h[:, 1:].double()
    want = torch.cat([h[:, 0].double(), tokens.mean(1), (tokens - tokens.mean(1, keepdim=True)).pow(2).mean(1).sqrt()],
                     dim=-1)
    got = module._router_features_raw(x)
    assert got.shape == (5, 3 * CONFIG["width"]) and module.router.mlp[0].normalized_shape == (3 * CONFIG["width"],)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    want_ids, _ = module.route(x)
    module.router_config = RouterConfig(split_block=SPLIT, shared_prefix=True, prefix_pool="class_mean_std")
    assert torch.equal(module.routed_features(x)[1], want_ids)


def test_prefix_pool_needs_prefix_states():
    class ClassTokenOnly(TinyViTAdapter):
        prefix_states = ModelAdapter.prefix_states

    with pytest.raises(ConfigError, match=r"prefix_pool='class_mean_std' needs ClassTokenOnly\.prefix_states"):
        MergedModule(ClassTokenOnly(), method="free_merging",
                     router=RouterConfig(split_block=SPLIT, prefix_pool="class_mean_std"))
    with pytest.raises(ConfigError, match=r"prefix_pool='max'; accepted: \['class_token', 'class_mean_std'\]"):
        RouterConfig(prefix_pool="max")
