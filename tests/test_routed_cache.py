"""The route cache (issue 28 item 2): a routed tune whose router reads candidate-independent features trains the
router once and computes each tune-val batch's route once; its results equal a tune that routes afresh."""

import pytest
import torch

from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.lightning.cli import FreeMergeTrainer
from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.routed import RoutedModel
from freemerge_pl.lightning.router import RouterConfig

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_models(tmp_path_factory.mktemp("toy_route_cache"))


def datamodule(root, **kw) -> MultiTaskDataModule:
    cfgs = [TaskConfig(name=t, dataset="freemerge_pl.adapters.toy.ToyTaskDataset",
                       dataset_args={"root": str(root), "task": t}) for t in TASKS]
    return MultiTaskDataModule(cfgs, router_fraction=0.1, batch_size=16, **kw)


def counting(monkeypatch) -> list[int]:
    """Counts the router's feature passes (``RoutedModel.router_input`` calls) by batch size."""
    calls: list[int] = []
    original = RoutedModel.router_input

    def router_input(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(RoutedModel, "router_input", router_input)
    return calls


def trained_model(root):
    """A toy merge whose router (``pretrained`` features: independent of the merge) is trained; and its data."""
    dm = datamodule(root)
    module = MergedModule(ToyAdapter(str(root)), method_args={"expert_density": 0.2},
                          router=RouterConfig(feature_source="pretrained"))
    module.build(dm.router_dataset()[0][0][None])
    module.model.fit_router(dm.router_dataset())
    return module.model, dm


def test_cached_logits_equal_fresh_ones_and_are_dropped_when_the_router_changes(toy_root, monkeypatch):
    model, dm = trained_model(toy_root)
    x = torch.stack([dm.router_dataset()[i][0] for i in range(8)])
    fresh = model.router_logits(x)
    calls = counting(monkeypatch)
    model.cache_routes = True
    first, second = model.router_logits(x), model.router_logits(x)
    assert calls == [8]  # the second call is a hit
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    model.router_logits(x[:4])  # another batch (other bytes, other shape): computed
    assert calls == [8, 4]
    # another merge candidate: the features do not read it, so the route is reused
    model.backbone.load_state_dict({k: v + 0.5 for k, v in model.backbone.state_dict().items()})
    assert torch.equal(model.router_logits(x), fresh) and calls == [8, 4]
    with torch.no_grad():
        for p in model.router.parameters():
            p.add_(0.1)  # weights changed in place, without fit/reset: the key (router digest) no longer matches
    changed = model.router_logits(x)
    assert calls == [8, 4, 8] and not torch.equal(changed, fresh)
    model.reset_router()
    assert not model.__dict__["_route_cache"]
    # a source that reads the merged weights is never cached
    model.router_config = RouterConfig(feature_source="backbone")
    model.reset_router()
    model.router_logits(x)
    model.router_logits(x)
    assert calls[-2:] == [8, 8]


def test_routed_tune_is_identical_with_and_without_the_route_cache(toy_root, tmp_path, monkeypatch):
    space = {"scaling": [0.5, 1.0], "expert_density": [0.1, 0.3]}
    reports, passes = {}, {}
    for cached in (False, True):
        dm = datamodule(toy_root, tune_fraction=0.5)
        module = MergedModule(ToyAdapter(str(toy_root)), router=RouterConfig(feature_source="pretrained"))
        monkeypatch.setattr(MergedModule, "cache_val_routes", cached)
        calls = counting(monkeypatch)
        trainer = FreeMergeTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False)
        reports[cached] = trainer.tune(module, dm, space, output_dir=str(tmp_path / f"tuned{int(cached)}"))
        passes[cached] = sum(calls)
        monkeypatch.undo()
    plain, cached = reports[False], reports[True]
    assert [c["params"] for c in plain["candidates"]] == [c["params"] for c in cached["candidates"]]
    for a, b in zip(plain["candidates"], cached["candidates"]):
        assert a["scores"]["tasks"] == b["scores"]["tasks"]
        assert a["scores"]["routing_confusion"] == b["scores"]["routing_confusion"]
    assert plain["best"]["params"] == cached["best"]["params"] and plain["best"]["score"] == cached["best"]["score"]
    tune_val = sum(plain["tune_samples"].values())
    router_split = sum(plain["router_samples"].values())
    # one example sizes the router's first layer; the router is trained once (one feature pass over the router
    # split) in both; the tune-val batches are routed once per candidate without the cache, once in all with it
    assert passes[False] == 1 + router_split + 4 * tune_val
    assert passes[True] == 1 + router_split + tune_val


def test_the_router_is_hashed_once_per_fit_reset_or_load_not_per_batch(toy_root, monkeypatch):
    """The route cache's key holds the router's digest: hashed once after a fit/reset/load and kept over any number
    of batches; a router changed in place (an optimiser step, load_state_dict, an edit) is hashed again, and a
    router that changed misses the cache while one restored to the same weights hits it."""
    from freemerge_pl.lightning import routed

    model, dm = trained_model(toy_root)
    model.cache_routes = True
    hashed: list[int] = []
    original = routed.state_digest

    def state_digest(module):
        hashed.append(id(module))
        return original(module)

    monkeypatch.setattr(routed, "state_digest", state_digest)
    data = dm.router_dataset()
    batches = [torch.stack([data[i][0] for i in range(s, s + 4)]) for s in range(0, 16, 4)]
    first = [model.router_logits(x) for x in batches]
    again = [model.router_logits(x) for x in batches]
    assert hashed == [id(model.router)]  # 8 batches, one hash
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    saved = {k: v.clone() for k, v in model.router.state_dict().items()}
    with torch.no_grad():
        model.router.mlp[-1].bias.add_(1.0)  # in place: the version moves, the digest is recomputed once
    calls = counting(monkeypatch)
    changed = [model.router_logits(x) for x in batches]
    assert len(hashed) == 2 and calls == [4, 4, 4, 4]  # another router: every batch misses
    assert not any(torch.equal(a, b) for a, b in zip(first, changed))
    model.router.load_state_dict(saved)  # back to the first weights: hashed again, and the first routes hit
    restored = [model.router_logits(x) for x in batches]
    assert len(hashed) == 3 and calls == [4, 4, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(first, restored))
    model.fit_router(dm.router_dataset())  # a fit forgets the digest: hashed once more, then kept
    for x in batches * 2:
        model.router_logits(x)
    assert len(hashed) == 4


def test_one_hashing_helper_gives_the_digests_written_before():
    """``state_digest`` (recorded in exports as ``backbone_digest``) and ``tensor_digest`` are unchanged by the
    shared helper: each equals sha256 written out by hand over the same bytes."""
    import hashlib

    from freemerge_pl.lightning.routed import state_digest, tensor_digest

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)).to(torch.bfloat16)
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(bytes(t.view(torch.int16).numpy().astype("<i2").tobytes()))
    assert state_digest(module) == h.hexdigest()
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    expected = hashlib.sha256(b"torch.float32(3, 2)" + x.contiguous().numpy().tobytes()).hexdigest()
    assert tensor_digest(x) == expected
