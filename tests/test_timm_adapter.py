"""TimmViTAdapter on a tiny timm ViT (vit_tiny_patch16_224 with small img_size/depth), through cli.py."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from freemerge_pl.adapters.timm_vit import TimmViTAdapter
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.lightning.cli import main

timm = pytest.importorskip("timm")

MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
CLASSES = {"alpha": 3, "beta": 5}


def full_model(num_classes: int, **kw):
    return timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **{**KWARGS, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """θ_pre (an ImageNet-like 10-class model, .pth) and fine-tuned full models with their own heads: alpha as
    safetensors, beta as a DDP-style ``module.``-prefixed torch file."""
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    pre = full_model(10)
    torch.save(pre.state_dict(), root / "pre.pth")
    g = torch.Generator().manual_seed(1)
    fts, paths = {}, {}
    for task, c in CLASSES.items():
        model = full_model(c)
        sd = {k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict({**model.state_dict(), **sd})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        fts[task] = {k: v.clone() for k, v in model.state_dict().items()}
        if task == "alpha":
            paths[task] = root / "alpha.safetensors"
            save_file({k: v.contiguous() for k, v in fts[task].items()}, str(paths[task]))
        else:
            paths[task] = root / "beta.pt"
            torch.save({"module." + k: v for k, v in fts[task].items()}, paths[task])
    return {"root": root, "pre": pre.state_dict(), "fts": fts, "paths": paths}


def make_adapter(ckpt, **kw) -> TimmViTAdapter:
    args = {"model_name": MODEL, "pretrained": str(ckpt["root"] / "pre.pth"),
            "finetuned": {t: str(p) for t, p in ckpt["paths"].items()}, "model_kwargs": KWARGS}
    return TimmViTAdapter(**{**args, **kw})


def test_loaded_weights_equal_saved_and_heads_reproduce_the_models(ckpt):
    adapter = make_adapter(ckpt)
    backbone = adapter.build_backbone().eval()
    pre = adapter.pretrained_state_dict()
    assert list(pre) == list(backbone.state_dict()) and not any(k.startswith("head.") for k in pre)
    assert all(torch.equal(pre[k], ckpt["pre"][k]) for k in pre)
    x = torch.randn(4, 3, 32, 32)
    for task, c in CLASSES.items():
        sd = adapter.finetuned_state_dict(task)
        assert list(sd) == list(pre) and all(torch.equal(sd[k], ckpt["fts"][task][k]) for k in sd)
        assert adapter.num_classes(task) == c
        head = adapter.build_head(task)
        assert torch.equal(head.weight, ckpt["fts"][task]["head.weight"])
        backbone.load_state_dict(sd, strict=True)
        model = full_model(c).eval()
        model.load_state_dict(ckpt["fts"][task])
        with torch.no_grad():  # backbone features + the task's head == the whole fine-tuned model
            torch.testing.assert_close(head(backbone(x)), model(x), rtol=1e-5, atol=1e-5)
    assert adapter.checkpoint_paths()[0].endswith("pre.pth")


def test_separate_head_file(ckpt, tmp_path):
    head = tmp_path / "head_beta.safetensors"
    w, b = torch.randn(7, 32), torch.randn(7)
    save_file({"head.weight": w, "head.bias": b}, str(head))
    adapter = make_adapter(ckpt, heads={"beta": str(head)})
    assert adapter.num_classes("beta") == 7 and adapter.num_classes("alpha") == 3
    built = adapter.build_head("beta")
    assert torch.equal(built.weight, w) and torch.equal(built.bias, b)
    assert str(head) in adapter.checkpoint_paths()


def test_errors_name_file_and_task(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no model named"):
        make_adapter(ckpt, model_name="vit_nope_99")
    with pytest.raises(ConfigError, match=r"heads names task\(s\) \['gamma'\]"):
        make_adapter(ckpt, heads={"gamma": "h"})
    deeper = make_adapter(ckpt, model_kwargs={**KWARGS, "depth": 3})  # the files have 2 blocks
    with pytest.raises(CheckpointMismatchError, match=r"pre-trained checkpoint .*pre\.pth.*blocks\.2"):
        deeper.pretrained_state_dict()
    wider = make_adapter(ckpt, model_kwargs={**KWARGS, "mlp_ratio": 2.0})
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(alpha\).*alpha\.safetensors.*mlp\.fc1"):
        wider.finetuned_state_dict("alpha")
    bert = tmp_path / "bert.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.zeros(10, 32)}, str(bert))
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(beta\).*bert\.safetensors.*unexpected"):
        make_adapter(ckpt, finetuned={"alpha": str(ckpt["paths"]["alpha"]), "beta": str(bert)}
                     ).finetuned_state_dict("beta")
    bad_head = tmp_path / "head.safetensors"
    save_file({"weight": torch.zeros(3, 9)}, str(bad_head))
    with pytest.raises(CheckpointMismatchError, match=r"head \(alpha\).*head\.safetensors.*\(3, 9\)"):
        make_adapter(ckpt, heads={"alpha": str(bad_head)}).num_classes("alpha")
    headless = tmp_path / "headless.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt["pre"].items() if not k.startswith("head.")}, str(headless))
    with pytest.raises(CheckpointMismatchError, match=r"head \(alpha\).*headless\.safetensors.*head\.weight"):
        make_adapter(ckpt, finetuned={"alpha": str(headless)}).num_classes("alpha")
    missing = make_adapter(ckpt, finetuned={"alpha": str(tmp_path / "nope.pt")})
    with pytest.raises(FreeMergeError, match="nope.pt"):
        missing.prepare()
    with pytest.raises(FreeMergeError, match=r"fine-tuned \(alpha\) checkpoint .*nope\.pt does not exist"):
        missing.finetuned_state_dict("alpha")


class _Tensors(torch.utils.data.Dataset):
    """Images saved by the test (``.pt``): ``(x [3, 32, 32], y)`` pairs of one task and split."""

    def __init__(self, path: str, split: str = "train") -> None:
        data = torch.load(Path(path) / f"{split}.pt")
        self.x, self.y = data["x"], data["y"]
        self.num_classes = int(data["num_classes"])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _write_data(root: Path, classes: int) -> str:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(classes)
    for split in ("train", "test"):
        y = torch.arange(12) % classes
        torch.save({"x": torch.randn(12, 3, 32, 32, generator=g), "y": y, "num_classes": classes},
                   root / f"{split}.pt")
    return str(root)


@pytest.mark.slow
def test_merge_fit_router_and_test_through_cli(ckpt, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable",
                                   "init_args": {"print_table": False}}]},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.timm_vit.TimmViTAdapter",
                              "init_args": {"model_name": MODEL, "pretrained": str(ckpt["root"] / "pre.pth"),
                                            "finetuned": {t: str(p) for t, p in ckpt["paths"].items()},
                                            "model_kwargs": KWARGS}},
                  "method": "free_merging", "router": {"epochs": 2}},  # with task modules: a router to fit
        "data": {"router_fraction": 0.5, "min_router_samples": 2, "batch_size": 4,
                 "tasks": [{"name": t, "dataset": f"{__name__}._Tensors",
                            "dataset_args": {"path": _write_data(tmp_path / "data" / t, c)}}
                           for t, c in CLASSES.items()]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = main(["fit", "--config", str(path)]).model
        assert bool(module.router_trained)
        assert torch.equal(module.heads[list(module.heads)[1]].weight, ckpt["fts"]["beta"]["head.weight"])
        ckpt_path = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
        main(["test", "--config", str(path), "--ckpt_path", str(ckpt_path)])
    results = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert set(results["tasks"]) == set(CLASSES)
    assert all(0 <= r["accuracy"] <= 1 for r in results["tasks"].values())


def test_class_count_mismatch_fails_before_merging(ckpt, tmp_path, monkeypatch):
    import freemerge_pl.lightning.routed as module_lib  # merge() runs in the routed model's builder

    monkeypatch.setattr(module_lib, "merge", lambda *a, **k: pytest.fail("merged despite the mismatch"))
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path / "run")},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.timm_vit.TimmViTAdapter",
                              "init_args": {"model_name": MODEL, "pretrained": str(ckpt["root"] / "pre.pth"),
                                            "finetuned": {t: str(p) for t, p in ckpt["paths"].items()},
                                            "model_kwargs": KWARGS}}},
        "data": {"tasks": [{"name": t, "dataset": f"{__name__}._Tensors",
                            "dataset_args": {"path": _write_data(tmp_path / "data" / t, c + (t == "beta"))}}
                           for t, c in CLASSES.items()]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape("task 'beta': the head has 5 classes but the dataset has 6")):
        main(["test", "--config", str(path)])
