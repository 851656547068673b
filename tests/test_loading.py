"""``load_merged``: an export is read back only as its manifest lists it (sizes, sha256, no stray file, complete),
and gives a model that computes what the exported module computed."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from freemerge_pl import load_merged
from freemerge_pl.adapters.toy import ToyAdapter, make_toy_models
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io.export import save_merge
from freemerge_pl.lightning.cli import main
from freemerge_pl.lightning.loading import MergedExport, adapter_from_record, module_from_export, read_export
from freemerge_pl.lightning.module import MergedModule
from freemerge_pl.lightning.router import RouterConfig
from freemerge_pl.merging import merge


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_models(tmp_path_factory.mktemp("toy"), steps=60)


def tiny_export(path: Path, method: str = "free_merging") -> Path:
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(16, 12, generator=g), "b": torch.randn(12, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    save_merge(merge(pre, fts, method, names=["a", "b", "c"]), path)
    return path


def test_a_sound_export_loads(tmp_path):
    export = load_merged(tiny_export(tmp_path / "m"))
    assert isinstance(export, MergedExport) and export.task_names == ["a", "b", "c"]
    assert len(export.task_modules) == 3 and set(export.state_dict) == {"w", "b"}


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "missing"])
def test_a_damaged_file_is_named(tmp_path, damage):
    out = tiny_export(tmp_path / "m")
    victim = out / "task_module_01.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "corrupted":  # same size, one byte of a value changed
        data[-1] ^= 0x55
        victim.write_bytes(bytes(data))
        match = rf"{victim} is damaged: its sha256 .* differs .*corrupted.*export again"
    elif damage == "truncated":
        victim.write_bytes(bytes(data[:-4]))
        match = rf"{victim} is damaged or truncated: {len(data) - 4} bytes, its manifest records {len(data)}"
    else:
        victim.unlink()
        match = rf"{victim} is missing \(listed in the manifest of {out}\)"
    with pytest.raises(FreeMergeError, match=match):
        load_merged(out)


def test_an_unlisted_task_module_or_an_incomplete_export_is_an_error(tmp_path):
    out = tiny_export(tmp_path / "m")
    stray = out / "task_module_03.safetensors"
    stray.write_bytes((out / "task_module_00.safetensors").read_bytes())
    with pytest.raises(FreeMergeError, match=rf"{stray} is not listed in"):
        load_merged(out)
    stray.unlink()
    (out / "merge_info.json").rename(tmp_path / "kept.json")
    with pytest.raises(FreeMergeError, match=r"merge_info.json is missing: .* not a complete export"):
        load_merged(out)
    (tmp_path / "kept.json").write_text(json.dumps({"method": "free_merging"}))  # an old export: no file list
    (tmp_path / "kept.json").rename(out / "merge_info.json")
    with pytest.raises(FreeMergeError, match="lists no files"):
        load_merged(out)
    out.rename(tmp_path / ".m.partial")  # killed before the rename: only the staging directory exists
    with pytest.raises(FreeMergeError, match=r"export .*m is incomplete: only .*\.m\.partial exists"):
        load_merged(out)


@pytest.mark.parametrize("method", ["free_merging", "emr", "twin"])
def test_task_modules_come_back_as_they_were(tmp_path, method):
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(16, 12, generator=g), "b": torch.randn(12, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, method, names=["a", "b", "c"])
    save_merge(out, tmp_path / "m")
    export = load_merged(tmp_path / "m")
    assert [type(m) for m in export.task_modules] == [type(m) for m in out.task_modules]
    for mine, theirs in zip(export.task_modules, out.task_modules):
        assert mine.keys == theirs.keys
        want, got = theirs.dense_delta(out.state_dict), mine.dense_delta(export.state_dict)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def _module(toy_root, method="free_merging", **kw) -> MergedModule:
    router = RouterConfig(epochs=3, hidden_dim=16)
    return MergedModule(ToyAdapter(str(toy_root)), method=method, router=router, **kw)


def _toy_inputs(toy_root, n=8) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    xs = [load_file(str(toy_root / "data" / f"task{k}.safetensors"))["test_x"][:n] for k in range(3)]
    return torch.cat(xs), torch.arange(3).repeat_interleave(n)


@pytest.mark.parametrize("method", ["free_merging", "emr"])
def test_the_loaded_model_computes_what_the_exported_module_computed(toy_root, tmp_path, method):
    x, t = _toy_inputs(toy_root)
    module = _module(toy_root, method)
    module.build(x[:1])
    module.fit_router([(xi, 0, ti) for xi, ti in zip(x, t)])
    module.export(tmp_path / "m")
    loaded = load_merged(tmp_path / "m", ToyAdapter(str(toy_root)))
    assert isinstance(loaded, MergedModule) and bool(loaded.router_trained)
    assert loaded.task_names == module.task_names and loaded.backbone_digest == module.backbone_digest
    torch.testing.assert_close(loaded.router_logits(x), module.router_logits(x), rtol=0, atol=0)
    (f1, ids1), (f2, ids2) = module(x), loaded(x)
    assert torch.equal(ids1, ids2) and torch.equal(f1, f2) and len(ids1.unique()) > 1
    for k in range(3):
        assert torch.equal(module.head_outputs(f1, k), loaded.head_outputs(f2, k))
    # the experts really are applied: an oracle pass differs from the bare backbone
    assert not torch.equal(loaded.features(x, t[:, None]), loaded.backbone(x))


def test_an_untrained_router_is_not_exported_and_the_loaded_module_knows(toy_root, tmp_path):
    x, _ = _toy_inputs(toy_root, 2)
    module = _module(toy_root)
    module.build(x[:1])
    module.export(tmp_path / "m")
    assert not (tmp_path / "m" / "router.safetensors").exists()
    loaded = load_merged(tmp_path / "m", ToyAdapter(str(toy_root)), routing="oracle")
    assert not bool(loaded.router_trained) and loaded.routing == "oracle"
    with pytest.raises(ConfigError, match=r"exported with the adapter freemerge_pl\.adapters\.toy\.ToyAdapter\(.*"
                                          r"but load_merged got tests\.test_loading\._TwoTasks\("):
        load_merged(tmp_path / "m", _TwoTasks(str(toy_root)))
    export = read_export(tmp_path / "m")
    del export.manifest["module"]["adapter"]  # an export that records no adapter: the task names are compared
    with pytest.raises(ConfigError, match=r"the export holds tasks \['task0', 'task1', 'task2'\]"):
        module_from_export(export, _TwoTasks(str(toy_root)))


class _TwoTasks(ToyAdapter):
    @property
    def task_names(self):
        return ["task0", "task1"]


def test_cli_merge_refuses_a_foreign_directory_then_overwrites_and_loads(toy_root, tmp_path):
    tasks = ["task0", "task1", "task2"]
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                       "default_root_dir": str(tmp_path / "run")},
           "model": {"adapter": {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                                 "init_args": {"root": str(toy_root)}},
                     "method": "free_merging", "router": {"epochs": 2, "hidden_dim": 16}},
           "data": {"router_fraction": 0.05, "batch_size": 32,
                    "tasks": [{"name": t, "dataset": "freemerge_pl.adapters.toy.ToyTaskDataset",
                               "dataset_args": {"root": str(toy_root), "task": t}} for t in tasks]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("do not lose")
    with pytest.raises(ConfigError, match=rf"output directory {out} already exists; pass --overwrite"):
        main(["export", "--config", str(path), "--output_dir", str(out)])
    assert (out / "thesis.tex").read_text() == "do not lose"
    cli = main(["export", "--config", str(path), "--output_dir", str(out), "--overwrite", "true"])
    assert not (out / "thesis.tex").exists()
    loaded = load_merged(out, ToyAdapter(str(toy_root)))
    x, _ = _toy_inputs(toy_root, 4)
    (f1, ids1), (f2, ids2) = cli.model(x), loaded(x)
    assert torch.equal(ids1, ids2) and torch.equal(f1, f2)


def test_settings_an_earlier_version_saved_are_dropped_when_they_change_nothing():
    from freemerge_pl.lightning.loading import drop_removed_settings

    old = {"routing": "router", "expert_path": "auto", "metric_suffix": "",
           "router": {"feature_source": "auto", "epochs": 20, "split_block": 3, "batch_size": 64,
                      "shared_prefix": False, "fallback": "none", "head": "mlp"}}
    assert drop_removed_settings(old, "m/merge_info.json") == {
        "routing": "router", "router": {"feature_source": "auto", "epochs": 20, "head": "mlp"}}
    assert old["router"]["split_block"] == 3  # the caller's record is left as it was
    for router, named in (({"shared_prefix": True}, "router.shared_prefix=True"),
                          ({"split_block": 2}, "router.split_block=2"), ({"head": "ncm"}, "head='ncm'")):
        with pytest.raises(ConfigError, match=rf"m/merge_info.json.*{named.replace('.', '[.]')}"):
            drop_removed_settings({"router": router}, "m/merge_info.json")


def test_an_export_knows_its_adapter(toy_root, tmp_path):
    """Issue 28 item 7: the manifest records the adapter's class path and init args; ``load_merged(dir)`` rebuilds
    it and gives a module that computes what the exported one computed; another adapter is an error naming both."""
    x, _ = _toy_inputs(toy_root)
    module = _module(toy_root)
    module.build(x[:1])
    module.fit_router([(xi, 0, ti) for xi, ti in zip(*_toy_inputs(toy_root))])
    module.export(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "merge_info.json").read_text())
    assert manifest["module"]["adapter"] == {"class_path": "freemerge_pl.adapters.toy.ToyAdapter",
                                             "init_args": {"root": str(toy_root)}}
    loaded = load_merged(tmp_path / "m")
    assert isinstance(loaded, MergedModule) and type(loaded.adapter) is ToyAdapter
    assert loaded.adapter.root == toy_root and bool(loaded.router_trained)
    (f1, ids1), (f2, ids2) = module(x), loaded(x)
    assert torch.equal(ids1, ids2) and torch.equal(f1, f2)
    assert isinstance(load_merged(tmp_path / "m", ToyAdapter(str(toy_root))), MergedModule)  # the same one: fine
    other = tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match=rf"ToyAdapter\(\{{\"root\": \"{toy_root}\"\}}\), but load_merged got "
                                          rf"freemerge_pl\.adapters\.toy\.ToyAdapter\(\{{\"root\": \"{other}\"\}}\)"):
        load_merged(tmp_path / "m", ToyAdapter(str(other)))
    # exports that record no adapter (save_merge, the merge job) still load as a MergedExport
    assert isinstance(load_merged(tiny_export(tmp_path / "plain")), MergedExport)


def test_a_recorded_adapter_that_is_no_adapter_is_refused_not_called(tmp_path):
    marker = tmp_path / "ran"
    for path in ("os.system", "subprocess.run", "freemerge_pl.adapters.base.ModelAdapterX"):
        with pytest.raises(ConfigError, match=rf"class_path='{path}'"):
            adapter_from_record({"class_path": path, "init_args": {"command": f"touch {marker}"}}, "m.json")
    assert not marker.exists()


@pytest.mark.slow
def test_a_tiny_zoo_export_rebuilds_its_zoo_adapter_and_no_other(tmp_path, monkeypatch):
    """``load_merged(dir)`` on a tiny-zoo export reads the recorded zoo (its root) and builds no other (the issue:
    ``load_merged(dir, ZooViTAdapter())`` started building the default zoo); the default adapter is refused."""
    from freemerge_pl.adapters import zoo_vit
    from freemerge_pl.zoo.vision.build import ensure_zoo
    from freemerge_pl.zoo.vision.recipe import zoo_task_names

    zoo = ensure_zoo(tmp_path / "tiny", size="tiny", seed=0)
    tasks = zoo_task_names("tiny")[:3]
    module = MergedModule(zoo_vit.ZooViTAdapter(root=str(zoo), size="tiny", tasks=tasks), method="task_arithmetic")
    module.build()
    module.export(tmp_path / "m")
    roots = []
    real = zoo_vit.ensure_zoo
    monkeypatch.setattr(zoo_vit, "ensure_zoo", lambda root, *a, **k: roots.append(root) or real(root, *a, **k))
    with pytest.raises(ConfigError, match=r"ZooViTAdapter\(.*\"size\": \"tiny\".*but load_merged got .*"
                                          r"ZooViTAdapter\(.*\"size\": \"default\""):
        load_merged(tmp_path / "m", zoo_vit.ZooViTAdapter())
    assert roots == []  # refused before any zoo was looked at
    loaded = load_merged(tmp_path / "m")
    assert isinstance(loaded.adapter, zoo_vit.ZooViTAdapter) and loaded.adapter.zoo_root == zoo
    assert loaded.task_names == tasks and roots and set(roots) == {str(zoo)}
    assert loaded.backbone_digest == module.backbone_digest


class _Images(ToyAdapter):
    input_kind = "image"


class _ImagesWithPrefix(_Images):
    depth = 6

    def prefix_features(self, backbone, x, n_blocks):
        return x

    def backbone_depth(self, backbone):
        return self.depth

    def build_backbone(self):
        return torch.nn.Identity()


class _Tokens(ToyAdapter):
    input_kind = "tokens"


class _ImagesWithBlocks(_Images):
    """Depth read from the built backbone's blocks (as ``vit_depth`` does); records where each build's weights
    were allocated."""

    blocks = 5

    def __init__(self, root):
        super().__init__(root)
        self.built_on: list[str] = []

    def prefix_features(self, backbone, x, n_blocks):
        return x

    def build_backbone(self):
        backbone = torch.nn.Sequential(*(torch.nn.Linear(512, 512) for _ in range(self.blocks)))
        self.built_on.append(backbone[0].weight.device.type)
        return backbone

    def backbone_depth(self, backbone):
        return len(backbone)


def test_legacy_auto_source_reads_the_depth_without_allocating_a_backbone(toy_root):
    """The depth an earlier version's ``auto`` depended on comes from the architecture built on the meta device: no
    weights allocated or initialised; the answer is the one the real backbone's depth gives."""
    from freemerge_pl.lightning.loading import legacy_auto_source
    from freemerge_pl.lightning.router import SPLIT_BLOCK

    for blocks in (SPLIT_BLOCK - 1, SPLIT_BLOCK, SPLIT_BLOCK + 1, 12):
        adapter = _ImagesWithBlocks(str(toy_root))
        adapter.blocks = blocks
        source = legacy_auto_source(adapter)
        assert adapter.built_on == ["meta"]
        assert source == ("backbone" if blocks <= SPLIT_BLOCK else "backbone_prefix")  # the earlier rule


def test_an_earlier_versions_auto_router_loads_with_the_source_it_was_trained_on(toy_root, tmp_path):
    """Exports now record the resolved feature source; a saved ``auto`` is an earlier version's, whose meaning was:
    tokens → the whole merged backbone, images → its first 3 blocks (whole when no deeper / no prefix API)."""
    from freemerge_pl.lightning.loading import legacy_auto_source

    root = str(toy_root)
    assert legacy_auto_source(ToyAdapter(root)) == "input"
    assert legacy_auto_source(_Tokens(root)) == "backbone"
    assert legacy_auto_source(_Images(root)) == "backbone"
    deep, shallow = _ImagesWithPrefix(root), _ImagesWithPrefix(root)
    shallow.depth = 3
    assert legacy_auto_source(deep) == "backbone_prefix" and legacy_auto_source(shallow) == "backbone"
    # an export whose manifest says ``auto`` (as earlier versions wrote) loads and routes as the exported module
    x, t = _toy_inputs(toy_root)
    module = _module(toy_root)
    module.build(x[:1])
    module.fit_router([(xi, 0, ti) for xi, ti in zip(x, t)])
    module.export(tmp_path / "m")
    path = tmp_path / "m" / "merge_info.json"
    manifest = json.loads(path.read_text())
    assert manifest["module"]["router"]["feature_source"] == "input"  # recorded resolved
    manifest["module"]["router"]["feature_source"] = "auto"
    path.write_text(json.dumps(manifest))
    loaded = load_merged(tmp_path / "m")
    assert loaded.model.feature_source == "input"
    torch.testing.assert_close(loaded.router_logits(x), module.router_logits(x), rtol=0, atol=0)
