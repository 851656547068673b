"""OpenCLIPAdapter on a tiny open_clip vision tower saved the task_vectors way; ImageFolderTask; paper configs."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from freemerge_pl.adapters.open_clip_adapter import NormalizedLinear, OpenCLIPAdapter
from freemerge_pl.data.image_folder import ImageFolderTask
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.lightning.cli import main
from freemerge_pl.merging import merge

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("vit_*.yaml"))  # the OpenCLIP ones (Table 2)
TINY = {"embed_dim": 16, "image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}
TASKS = ("alpha", "beta")
CLASSES = {"alpha": 3, "beta": 5}
CHANGED = re.compile("attn|mlp")


class _ImageEncoder(nn.Module):
    """Stands in for task_vectors' ImageEncoder (``self.model`` = a CLIP with a ``visual`` tower)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.visual = visual
        self.model.logit_scale = nn.Parameter(torch.tensor(4.6))


def _text_keys(g: torch.Generator) -> dict:
    """Non-visual keys a task_vectors ImageEncoder checkpoint also holds (dropped by the adapter)."""
    return {"model.token_embedding.weight": torch.randn(10, 8, generator=g),
            "model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g),
            "model.ln_final.weight": torch.ones(8), "model.logit_scale": torch.tensor(4.6)}


def tiny_adapter(**kw) -> OpenCLIPAdapter:
    args = {"pretrained": "missing/zeroshot.pt", "finetuned": {t: f"missing/{t}.pt" for t in TASKS},
            "heads": {t: f"missing/head_{t}.pt" for t in TASKS}, "model_name": "tiny", "model_config": TINY}
    return OpenCLIPAdapter(**{**args, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """θ_pre and two perturbed θ_k (every float tensor changed) as torch files (``model.visual.`` prefix and
    text keys) and as safetensors (``visual.`` prefix); heads as torch (with bias) / safetensors (without)."""
    root = tmp_path_factory.mktemp("openclip")
    torch.manual_seed(0)
    pre = {k: v.clone() for k, v in tiny_adapter().build_backbone().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in TASKS]
    paths = {"pt": {}, "st": {}}
    for tag, sd in [("zeroshot", pre), *zip(TASKS, fts)]:
        torch.save({**{"model.visual." + k: v for k, v in sd.items()}, **_text_keys(g)}, root / f"{tag}.pt")
        save_file({"visual." + k: v.contiguous() for k, v in sd.items()}, str(root / f"{tag}.safetensors"))
        paths["pt"][tag], paths["st"][tag] = str(root / f"{tag}.pt"), str(root / f"{tag}.safetensors")
    heads = {}
    for t in TASKS:
        w = torch.randn(CLASSES[t], TINY["embed_dim"], generator=g)
        if t == "alpha":
            torch.save({"weight": w, "bias": torch.randn(CLASSES[t], generator=g)}, root / f"head_{t}.pt")
            heads[t] = str(root / f"head_{t}.pt")
        else:
            save_file({"weight": w}, str(root / f"head_{t}.safetensors"))
            heads[t] = str(root / f"head_{t}.safetensors")
    return {"root": root, "pre": pre, "fts": fts, "paths": paths, "heads": heads}


def adapter_for(ckpt, kind="pt", **kw) -> OpenCLIPAdapter:
    p = ckpt["paths"][kind]
    return tiny_adapter(pretrained=p["zeroshot"], finetuned={t: p[t] for t in TASKS}, heads=ckpt["heads"], **kw)


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_loads_with_prefix_stripped_and_backbone_keys(ckpt, kind):
    adapter = adapter_for(ckpt, kind)
    backbone = adapter.build_backbone()
    pre = adapter.pretrained_state_dict()
    assert list(pre) == list(backbone.state_dict())
    assert all(torch.equal(pre[k], ckpt["pre"][k]) for k in pre)
    for t, ft in zip(TASKS, ckpt["fts"]):
        sd = adapter.finetuned_state_dict(t)
        assert list(sd) == list(pre) and all(torch.equal(sd[k], ft[k]) for k in sd)
    backbone.load_state_dict(pre, strict=True)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, TINY["embed_dim"])
    assert adapter.task_names == list(TASKS)
    assert adapter.checkpoint_paths()[0] == ckpt["paths"][kind]["zeroshot"]
    assert len(adapter.checkpoint_paths()) == 1 + 2 * len(TASKS)


def test_explicit_prefix_and_wrong_prefix(ckpt):
    assert list(adapter_for(ckpt, "st", key_prefix="visual.").pretrained_state_dict()) == \
        list(adapter_for(ckpt, "st").pretrained_state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"zeroshot\.pt.*missing under prefix 'visual\.'"):
        adapter_for(ckpt, "pt", key_prefix="visual.").pretrained_state_dict()


def test_heads(ckpt):
    adapter = adapter_for(ckpt)
    for t in TASKS:
        head = adapter.build_head(t)
        assert isinstance(head, NormalizedLinear)
        assert tuple(head.weight.shape) == (CLASSES[t], TINY["embed_dim"]) == (adapter.num_classes(t), 16)
        x = torch.randn(4, 16)
        torch.testing.assert_close(head(x), nn.functional.linear(x / x.norm(dim=-1, keepdim=True),
                                                                 head.weight, head.bias))
    assert torch.equal(adapter.build_head("beta").bias, torch.zeros(CLASSES["beta"]))  # file has no bias
    plain = adapter_for(ckpt, normalize_head_input=False).build_head("alpha")
    assert type(plain) is nn.Linear


def test_merge_free_merging_paper_semantics(ckpt):
    adapter = adapter_for(ckpt)
    out = merge(adapter.pretrained_state_dict(), [adapter.finetuned_state_dict(t) for t in TASKS],
                "free_merging", names=list(TASKS), exclude_keys=list(adapter.exclude_keys))
    backbone = adapter.build_backbone()
    backbone.load_state_dict(out.state_dict, strict=True)
    assert len(out.task_modules) == len(TASKS)
    assert not torch.equal(out.state_dict["ln_pre.weight"], ckpt["pre"]["ln_pre.weight"])  # paper: all keys


@pytest.mark.parametrize("method", ["fr_merging", "free_merging"])
def test_merge_released_code_changes_only_attn_mlp(ckpt, method):
    adapter = adapter_for(ckpt, "st")
    pre = adapter.pretrained_state_dict()
    extra = {"expert_density": 0.1} if method == "free_merging" else {}
    out = merge(pre, [adapter.finetuned_state_dict(t) for t in TASKS], f"{method}_released", names=list(TASKS),
                **extra)
    adapter.build_backbone().load_state_dict(out.state_dict, strict=True)
    changed = [k for k in pre if CHANGED.search(k)]
    assert changed and "transformer.resblocks.0.attn.in_proj_weight" in changed
    for key, value in out.state_dict.items():
        if CHANGED.search(key):
            assert not torch.equal(value, pre[key]), key
        else:  # LayerNorms, positional/class embedding, conv1, proj stay pre-trained
            assert torch.equal(value, pre[key]), key
    for module in out.task_modules or []:
        assert module.nnz > 0 and all(CHANGED.search(k) for k in module.keys)


def test_lazy_construction_and_prepare_lists_missing_files(tmp_path):
    adapter = tiny_adapter(pretrained=str(tmp_path / "nope.pt"))  # nothing is read here
    with pytest.raises(FreeMergeError, match="nope.pt"):
        adapter.prepare()
    with pytest.raises(FreeMergeError, match=r"pre-trained checkpoint .*nope\.pt does not exist"):
        adapter.pretrained_state_dict()


def test_config_errors():
    with pytest.raises(ConfigError, match="heads are given"):
        tiny_adapter(heads={"alpha": "h.pt"})
    with pytest.raises(ConfigError, match="no model config named"):
        OpenCLIPAdapter(pretrained="p", finetuned={"a": "a"}, heads={"a": "h"}, model_name="ViT-Nope-99")
    with pytest.raises(ConfigError, match="unknown vision config keys"):
        tiny_adapter(model_config={**TINY, "depth": 3})


def test_missing_key_and_shape_mismatch_name_file_and_key(ckpt, tmp_path):
    sd = {"model.visual." + k: v for k, v in ckpt["pre"].items()}
    dropped = "transformer.resblocks.1.mlp.c_fc.weight"
    bad = tmp_path / "dropped.pt"
    torch.save({k: v for k, v in sd.items() if k != "model.visual." + dropped}, bad)
    with pytest.raises(CheckpointMismatchError, match=rf"{bad}.*{re.escape(dropped)}"):
        tiny_adapter(pretrained=str(bad)).pretrained_state_dict()
    wrong = tmp_path / "wrong.safetensors"
    save_file({**sd, "model.visual.proj": torch.zeros(32, 7)}, str(wrong))
    with pytest.raises(CheckpointMismatchError, match=r"wrong\.safetensors.*'model\.visual\.proj'.*\(32, 7\).*\(32, 16\)"):
        tiny_adapter(pretrained=str(wrong)).pretrained_state_dict()
    head = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(3, 9)}, head)
    with pytest.raises(CheckpointMismatchError, match=r"head\.pt.*\(3, 9\)"):
        tiny_adapter(heads={"alpha": str(head), "beta": str(head)}).num_classes("alpha")


def test_pickled_module_needs_allow_pickle(ckpt, tmp_path):
    torch.manual_seed(0)
    encoder = _ImageEncoder(tiny_adapter().build_backbone())
    encoder.model.visual.load_state_dict(ckpt["pre"])
    path = tmp_path / "zeroshot_module.pt"
    torch.save(encoder, path)
    head_path = tmp_path / "head_module.pt"
    torch.save(NormalizedLinear(16, 3), head_path)
    with pytest.raises(FreeMergeError, match=rf"(?s){path}.*pickled.*torch\.load\(f, weights_only=False\)"):
        tiny_adapter(pretrained=str(path)).pretrained_state_dict()
    with pytest.raises(FreeMergeError, match=rf"(?s){head_path}.*allow_pickle"):
        tiny_adapter(heads={"alpha": str(head_path), "beta": str(head_path)}).num_classes("alpha")
    opted = tiny_adapter(pretrained=str(path), heads={"alpha": str(head_path), "beta": str(head_path)},
                         allow_pickle=True)
    sd = opted.pretrained_state_dict()
    assert list(sd) == list(ckpt["pre"]) and all(torch.equal(sd[k], ckpt["pre"][k]) for k in sd)
    assert opted.num_classes("alpha") == 3


def _image_folder(root: Path, classes: int, per_class: int = 3, size: int = 40) -> Path:
    g = torch.Generator().manual_seed(classes)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_task(tmp_path):
    root = _image_folder(tmp_path / "task", classes=3)
    ds = ImageFolderTask(str(root), split="test", image_size=32)
    assert len(ds) == 9 and ds.num_classes == 3 and ds.classes == ["class_0", "class_1", "class_2"]
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    reordered = ImageFolderTask(str(root), split="test", image_size=32, classes=["class_2", "class_0", "class_1"])
    assert reordered[0][1] == 1  # class_0 is label 1 there
    with pytest.raises(ConfigError, match=r"nope.*does not exist"):
        ImageFolderTask(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="class_9"):
        ImageFolderTask(str(root), classes=["class_0", "class_9"])


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.name for p in PAPER_CONFIGS])
def test_paper_config_parses_without_reading_files(path):
    cli = main(["--config", str(path)], run=False)  # the checkpoint/data paths do not exist here
    adapter = cli.model.adapter
    assert isinstance(adapter, OpenCLIPAdapter)
    assert adapter.task_names == cli.datamodule.task_names
    assert adapter.task_names == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert adapter.model_name in ("ViT-B-32", "ViT-L-14")
    assert adapter.model_name.replace("-", "").lower()[3:] in path.name.replace("_", "")
    assert cli.model.head_selection == "dataset" and cli.model.routing == "router"
    released = "released" in path.stem
    assert cli.model.method == ("free_merging" if "free" in path.stem else "fr_merging") + ("_released" * released)
    assert list(adapter.backbone_spec)[:2] == ["class_embedding", "positional_embedding"]


@pytest.mark.slow
def test_tiny_open_clip_end_to_end(ckpt, tmp_path):
    """Adapter + ImageFolderTask through MergedModule and a Trainer (oracle routing, dataset heads)."""
    from lightning.pytorch import Trainer

    from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
    from freemerge_pl.lightning.module import MergedModule

    tasks = [TaskConfig(name=t, dataset="freemerge_pl.data.image_folder.ImageFolderTask",
                        dataset_args={"root": str(_image_folder(tmp_path / t, CLASSES[t])), "image_size": 32})
             for t in TASKS]
    dm = MultiTaskDataModule(tasks, router_fraction=0.5, min_router_samples=2, batch_size=4)
    module = MergedModule(adapter_for(ckpt), method="free_merging_released",
                          routing="oracle")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.test(module, datamodule=dm, verbose=False)
    assert set(module.test_results["tasks"]) == set(TASKS)
    assert all(0 <= r["accuracy"] <= 1 for r in module.test_results["tasks"].values())


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_truncated_checkpoint_and_head_are_named(ckpt, tmp_path, kind):
    src = Path(ckpt["paths"][kind]["zeroshot"])
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(FreeMergeError, match=rf"{bad}.*(damaged|truncated)"):
        tiny_adapter(pretrained=str(bad)).pretrained_state_dict()
    head_src = Path(ckpt["heads"]["alpha" if kind == "pt" else "beta"])
    head = tmp_path / head_src.name
    head.write_bytes(head_src.read_bytes()[:-8])
    with pytest.raises(FreeMergeError, match=rf"{head}.*(damaged|truncated)"):
        tiny_adapter(heads={"alpha": str(head), "beta": str(head)}).num_classes("alpha")


def test_head_cache_is_refreshed_when_the_file_changes(tmp_path):
    """The in-memory head cache never serves a head file's old contents after the file was replaced."""
    path = tmp_path / "head.safetensors"
    first = torch.randn(3, TINY["embed_dim"])
    save_file({"weight": first}, str(path))
    adapter = tiny_adapter(heads={"alpha": str(path), "beta": str(path)})
    assert torch.equal(adapter.head_state_dict("alpha")["weight"], first)
    assert adapter.head_state_dict("alpha") is adapter.head_state_dict("alpha")  # cached while unchanged
    second = torch.randn(5, TINY["embed_dim"])
    save_file({"weight": second}, str(path))
    assert torch.equal(adapter.head_state_dict("alpha")["weight"], second)
    assert adapter.num_classes("alpha") == 5
    path.unlink()
    with pytest.raises(FreeMergeError, match=rf"head \(alpha\) checkpoint {path} does not exist"):
        adapter.head_state_dict("alpha")
