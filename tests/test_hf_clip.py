"""HFCLIPAdapter on tiny CLIP directories saved with save_pretrained (FusionBench layout), through cli.py."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from freemerge_pl.adapters.hf_clip import PROJECTION_KEY, HFCLIPAdapter
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.lightning.cli import main

transformers = pytest.importorskip("transformers")

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
CLASSES = {"alpha": ["cat", "dog", "bird"], "beta": ["red", "green"]}
TEMPLATES = {"alpha": ["a photo of a {c}.", "a {c} in the wild.", "the {c}!"], "beta": ["{c}"]}
TASKS = ["alpha", "beta", "PCAM"]  # PCAM: class names and template from the shipped package data


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: the 256 base symbols of a byte-level BPE vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(directory: Path):
    """A real CLIP BPE tokenizer with a tiny vocabulary (every byte, alone and word-final, plus 3 merges)."""
    chars = _byte_chars()
    merges = ["p h", "o t", "ph ot"]
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges),
                                         "<|startoftext|>", "<|endoftext|>"])}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(str(directory))
    return tokenizer, vocab


def clip_config(vocab: dict, **vision):
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": len(vocab), "max_position_embeddings": 80, "eos_token_id": eos, "bos_token_id": bos,
            "pad_token_id": eos}
    return transformers.CLIPConfig(text_config=text, vision_config={**VISION, **vision}, projection_dim=16)


def save_finetuned(clip, directory: Path, seed: int, *, config=None, layout: str = "saved") -> dict:
    """A CLIPVisionModel with the pre-trained vision tower plus noise on every tensor, saved with save_pretrained;
    returns its state dict with ``vision_model.`` keys. ``layout``: ``saved`` (as this transformers writes it:
    version 5 drops the ``vision_model.`` prefix), ``prefixed`` (model.safetensors with ``vision_model.`` keys,
    as transformers 4 and FusionBench's files) or ``bin`` (pytorch_model.bin, unprefixed keys)."""
    vision = transformers.CLIPVisionModel(config or clip.config.vision_config)
    tower = getattr(vision, "vision_model", vision)  # transformers 4 / 5
    if config is None:
        tower.load_state_dict(clip.vision_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vision.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    vision.save_pretrained(str(directory))
    sd = {k: v.clone().contiguous() for k, v in tower.state_dict().items()}
    if layout == "prefixed":
        save_file({"vision_model." + k: v for k, v in sd.items()}, str(directory / "model.safetensors"))
    elif layout == "bin":
        (directory / "model.safetensors").unlink()
        torch.save(sd, directory / "pytorch_model.bin")
    return {"vision_model." + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hfclip")
    pre = root / "clip-vit-base-patch32"
    tokenizer, vocab = write_tokenizer(pre)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(clip_config(vocab)).eval()
    clip.save_pretrained(str(pre))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(str(pre))
    dirs = {"alpha": root / "ft_alpha", "beta": root / "ft_beta", "PCAM": root / "clip-vit-base-patch32_pcam"}
    layouts = {"alpha": "prefixed", "beta": "bin", "PCAM": "saved"}
    fts = {t: save_finetuned(clip, d, seed=i + 1, layout=layouts[t]) for i, (t, d) in enumerate(dirs.items())}
    return {"root": root, "pre": pre, "clip": clip, "tokenizer": tokenizer, "vocab": vocab, "dirs": dirs,
            "fts": fts}


def make_adapter(tiny, cache: Path, **kw) -> HFCLIPAdapter:
    args = {"pretrained": str(tiny["pre"]), "tasks": TASKS,
            "finetuned": {t: str(tiny["dirs"][t]) for t in ("alpha", "beta")}, "checkpoint_root": str(tiny["root"]),
            "class_names": CLASSES, "templates": TEMPLATES, "head_cache_dir": str(cache)}
    return HFCLIPAdapter(**{**args, **kw})


def independent_head(tiny, names: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP's zero-shot classifier computed the way FusionBench's HFCLIPClassifier does, one class at a time."""
    clip, tokenizer = tiny["clip"], tiny["tokenizer"]
    rows = []
    with torch.no_grad():
        for name in names:
            inputs = tokenizer([t.replace("{c}", name) for t in templates], padding=True, return_tensors="pt")
            out = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
            rows.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1))
    return torch.stack(rows) * clip.logit_scale.exp()


def test_loaded_weights_equal_saved_ones(tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path)
    assert adapter.task_names == TASKS
    assert adapter.task_dirs["PCAM"] == str(tiny["dirs"]["PCAM"])  # found with the FusionBench name pattern
    pre = adapter.pretrained_state_dict()
    backbone = adapter.build_backbone()
    assert list(pre) == list(backbone.state_dict())
    saved = tiny["clip"].state_dict()
    assert all(torch.equal(pre[k], saved[k]) for k in pre)
    for task in TASKS:
        sd = adapter.finetuned_state_dict(task)
        assert list(sd) == list(pre)
        ft = tiny["fts"][task]
        assert all(torch.equal(sd[k], ft[k]) for k in sd if k != PROJECTION_KEY)
        assert not torch.equal(sd["vision_model.encoder.layers.0.mlp.fc1.weight"],
                               pre["vision_model.encoder.layers.0.mlp.fc1.weight"])
        assert torch.equal(sd[PROJECTION_KEY], saved[PROJECTION_KEY])  # not fine-tuned: θ_pre's
    assert any(re.search(p, PROJECTION_KEY) for p in adapter.exclude_keys)
    assert adapter.num_classes("PCAM") == 2 and adapter.class_names("PCAM")[0] == "lymph node"
    assert str(tiny["dirs"]["beta"] / "pytorch_model.bin") in adapter.checkpoint_paths()


def test_backbone_and_single_template_head_reproduce_clip_logits(tiny, tmp_path):
    """With one template, head(backbone(x)) is exactly CLIPModel's logits_per_image for the class prompts."""
    adapter = make_adapter(tiny, tmp_path)
    backbone = adapter.build_backbone().eval()
    backbone.load_state_dict(adapter.pretrained_state_dict(), strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = CLASSES["beta"]  # template "{c}"
    inputs = tiny["tokenizer"](prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = tiny["clip"](input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=pixels).logits_per_image
        image = tiny["clip"].get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        got = adapter.build_head("beta")(backbone(pixels))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone(pixels), F.normalize(image, dim=-1), rtol=1e-5, atol=1e-6)


def test_zero_shot_heads_equal_independent_computation(tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path, text_batch_size=2)  # batches cut across classes
    for task in TASKS:
        head = adapter.build_head(task)
        assert head.bias is None and tuple(head.weight.shape) == (adapter.num_classes(task), 16)
        expected = independent_head(tiny, adapter.class_names(task), adapter.templates(task))
        torch.testing.assert_close(head.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    pcam = adapter.templates("PCAM")
    assert pcam == ["this is a photo of {c}"]


def test_head_cache_is_reused_verified_and_keyed(tiny, tmp_path, monkeypatch):
    first = make_adapter(tiny, tmp_path)
    first.prepare()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == len(TASKS)
    expected = first.head_weight("alpha")

    def no_compute(self, tasks):
        raise AssertionError(f"recomputed {tasks}")

    second = make_adapter(tiny, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(HFCLIPAdapter, "compute_head_weights", no_compute)
        assert torch.equal(second.head_weight("alpha"), expected)
    # a damaged cache file is detected by its recorded sha256 and recomputed
    cached = next(tmp_path.glob("alpha-*.safetensors"))
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"alpha.*(sha256|damaged)"):
        again = make_adapter(tiny, tmp_path).head_weight("alpha")
    torch.testing.assert_close(again, expected)
    # other templates: another key, another entry; the old one is still valid
    changed = make_adapter(tiny, tmp_path, templates={**TEMPLATES, "alpha": ["a {c}."]})
    other = changed.head_weight("alpha")
    assert len(list(tmp_path.glob("alpha-*.safetensors"))) == 2
    torch.testing.assert_close(other, independent_head(tiny, CLASSES["alpha"], ["a {c}."]), rtol=1e-5, atol=1e-5)


def test_configuration_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"'gamma'.*class_names\['gamma'\]"):
        HFCLIPAdapter(pretrained="p", finetuned={"gamma": "g"})
    with pytest.raises(ConfigError, match=r"exactly once"):
        make_adapter(tiny, tmp_path, templates={"alpha": ["a photo"]})
    with pytest.raises(ConfigError, match=r"'PCAM'.*checkpoint_root"):
        make_adapter(tiny, tmp_path, checkpoint_root=None)
    with pytest.raises(ConfigError, match=r"not in tasks"):
        make_adapter(tiny, tmp_path, tasks=["alpha"])
    with pytest.raises(ConfigError, match=r"distinct"):
        make_adapter(tiny, tmp_path, class_names={**CLASSES, "beta": ["red", "red"]})


def test_wrong_architecture_missing_dir_and_config_mismatch_name_file_and_task(tiny, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    adapter = make_adapter(tiny, tmp_path / "cache", finetuned={"alpha": str(bert), "beta": str(tiny["dirs"]["beta"])})
    with pytest.raises(CheckpointMismatchError, match=rf"fine-tuned \(alpha\).*{re.escape(str(bert))}.*'bert'"):
        adapter.prepare()
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(alpha\).*'bert'"):
        adapter.finetuned_state_dict("alpha")

    missing = make_adapter(tiny, tmp_path / "cache", finetuned={"alpha": str(tmp_path / "nope"),
                                                                 "beta": str(tiny["dirs"]["beta"])})
    with pytest.raises(FreeMergeError, match="nope"):
        missing.prepare()
    with pytest.raises(FreeMergeError, match=r"fine-tuned \(alpha\).*nope.*does not exist"):
        missing.finetuned_state_dict("alpha")

    for field, value in (("image_size", 64), ("hidden_size", 48)):
        other = tmp_path / f"other_{field}"
        heads = {"num_attention_heads": 2} if field == "hidden_size" else {}
        config = transformers.CLIPVisionConfig(**{**VISION, field: value, **heads})
        save_finetuned(tiny["clip"], other, seed=9, config=config)
        bad = make_adapter(tiny, tmp_path / "cache", finetuned={"alpha": str(tiny["dirs"]["alpha"]),
                                                                 "beta": str(other)})
        with pytest.raises(CheckpointMismatchError,
                           match=rf"fine-tuned \(beta\).*other_{field}/config\.json.*{field}={value}"):
            bad.finetuned_state_dict("beta")

    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny["dirs"]["alpha"] / "config.json").read_text())
    with pytest.raises(FreeMergeError, match=r"fine-tuned \(beta\).*no_weights holds no model weights"):
        make_adapter(tiny, tmp_path / "cache", finetuned={"alpha": str(tiny["dirs"]["alpha"]),
                                                           "beta": str(empty)}).prepare()


def image_folder(root: Path, classes: int, per_class: int = 3) -> Path:
    g = torch.Generator().manual_seed(classes + per_class)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(36, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def cli_config(tiny, tmp_path, data_classes: dict[str, int] | None = None) -> Path:
    counts = data_classes or {"alpha": 3, "beta": 2, "PCAM": 2}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "freemerge_pl.callbacks.ResultsTable",
                                   "init_args": {"print_table": False}}]},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.hf_clip.HFCLIPAdapter",
                              "init_args": {"pretrained": str(tiny["pre"]), "tasks": TASKS,
                                            "finetuned": {t: str(tiny["dirs"][t]) for t in ("alpha", "beta")},
                                            "checkpoint_root": str(tiny["root"]), "class_names": CLASSES,
                                            "templates": TEMPLATES, "head_cache_dir": str(tmp_path / "heads")}},
                  "method": "free_merging", "method_args": {"expert_density": 0.05},
                  "router": {"feature_source": "input", "epochs": 2}},
        "data": {"router_fraction": 0.5, "min_router_samples": 2, "batch_size": 4, "num_workers": 0,
                 "tasks": [{"name": t, "dataset": "freemerge_pl.data.image_folder.ImageFolderTask",
                            "dataset_args": {"root": str(image_folder(tmp_path / "data" / t, n)),
                                             "preprocessor_config": str(tiny["pre"])}}
                           for t, n in counts.items()]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_merge_fit_router_and_test_through_cli(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = cli_config(tiny, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = main(["fit", "--config", str(path)])
    module = fitted.model
    assert bool(module.router_trained) and len(module.task_modules) == len(TASKS)
    adapter = module.adapter
    for i, task in enumerate(TASKS):  # the module's heads are the adapter's zero-shot heads
        assert torch.equal(module.heads[list(module.heads)[i]].weight, adapter.head_weight(task))
    assert torch.equal(module.backbone.state_dict()[PROJECTION_KEY], tiny["clip"].state_dict()[PROJECTION_KEY])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    results = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert set(results["tasks"]) == set(TASKS)
    assert all(0 <= r["accuracy"] <= 1 for r in results["tasks"].values())


def test_class_count_mismatch_fails_before_merging(tiny, tmp_path, monkeypatch):
    import freemerge_pl.lightning.routed as module_lib  # merge() runs in the routed model's builder

    def no_merge(*args, **kwargs):
        raise AssertionError("merged despite the class-count mismatch")

    monkeypatch.setattr(module_lib, "merge", no_merge)
    path = cli_config(tiny, tmp_path, data_classes={"alpha": 4, "beta": 2, "PCAM": 2})
    with pytest.raises(ConfigError, match=r"'alpha'.*3 classes.*4"):
        main(["test", "--config", str(path)])


def test_table2_configs_are_current_and_parse_without_reading_files():
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_table2", repo / "configs" / "paper" / "make_table2.py")
    make_table2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table2)
    assert make_table2.main(["--check"]) == 0, "run python configs/paper/make_table2.py"
    files = sorted((repo / "configs" / "paper").glob("table2_hf_clip_*.yaml"))
    from freemerge_pl.merging import list_methods

    assert {p.stem.split("_", 5)[-1] for p in files} == set(list_methods()) and len(files) == 2 * len(list_methods())
    for name, directory in (("vit_b32_free_merging", "clip-vit-base-patch32"),
                            ("vit_l14_ties", "clip-vit-large-patch14")):
        cli = main(["--config", str(repo / "configs" / "paper" / f"table2_hf_clip_{name}.yaml")], run=False)
        adapter = cli.model.adapter
        assert isinstance(adapter, HFCLIPAdapter) and adapter.task_names == cli.datamodule.task_names
        assert adapter.task_dirs["Cars"] == f"CHECKPOINT_ROOT/{directory}_stanford-cars"
        assert adapter.num_classes("Cars") == 196 and cli.model.head_selection == "dataset"
