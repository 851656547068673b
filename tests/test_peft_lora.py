"""PEFT LoRA adapters: full deltas against peft's own merge, merging in the delta space, LoRA write-back,
bad inputs named, and PeftLoRAAdapter through MergedModule and the CLI (tiny RoBERTa, adapters made by peft)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from freemerge_pl.adapters.peft_lora import (
    LoRAModelSource,
    PeftLoRAAdapter,
    non_target_pattern,
    read_lora_adapter,
)
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import load_state_dict
from freemerge_pl.jobs.lora import delta_to_lora, merge_lora_adapters, open_base, save_lora_adapter
from freemerge_pl.merging import SparseExpert, merge
from freemerge_pl.merging.engine import CheckpointInputs, execute
from freemerge_pl.merging.registry import build_method

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 24, "max_position_embeddings": 24}
#: task → (classes, LoraConfig arguments): plain; rsLoRA on three modules; patterns plus an embedding LoRA
ADAPTERS = {
    "alpha": (3, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}),
    "beta": (2, {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["query", "key", "intermediate.dense"]}),
    "gamma": (4, {"r": 4, "lora_alpha": 4, "target_modules": ["value", "word_embeddings"],
                  "rank_pattern": {"layer.1.attention.self.value": 2}, "alpha_pattern": {"word_embeddings": 12}}),
}


def _roberta(path, num_labels: int):
    return transformers.RobertaForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, ignore_mismatched_sizes=True, local_files_only=True)


def _make_adapter(base_dir: Path, out: Path, classes: int, lora_args: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    model = _roberta(base_dir, classes)
    config = peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **lora_args)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # non-trivial B factors and a head that differs from the base's
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**TINY, num_labels=2))
    base.save_pretrained(root / "base")
    dirs = {t: _make_adapter(root / "base", root / t, c, args, i + 1) for i, (t, (c, args)) in
            enumerate(ADAPTERS.items())}
    return {"root": root, "base": root / "base", "dirs": dirs, "pre": load_state_dict(root / "base")}


def peft_merged(base_dir: Path, adapter_dir: Path, classes: int) -> dict:
    """peft's own merge: PeftModel.from_pretrained(...).merge_and_unload().state_dict()."""
    model = peft.PeftModel.from_pretrained(_roberta(base_dir, classes), adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("task", list(ADAPTERS))
def test_deltas_equal_peft_merge_and_unload(lora, task):
    pre = lora["pre"]
    adapter = read_lora_adapter(lora["dirs"][task], {k: tuple(v.shape) for k, v in pre.items()})
    reference = peft_merged(lora["base"], lora["dirs"][task], ADAPTERS[task][0])
    deltas = adapter.deltas()
    changed = {k for k in pre if k.startswith("roberta.") and not torch.equal(reference[k], pre[k])}
    assert changed == set(deltas)
    for key, delta in deltas.items():
        torch.testing.assert_close(pre[key] + delta, reference[key], rtol=0, atol=1e-6)
    expected_layout = {k: "embedding" if "word_embeddings" in k else "linear" for k in deltas}
    assert adapter.layouts == expected_layout
    head = {k: v for k, v in adapter.saved_modules.items()}
    assert set(head) == {k for k in reference if k.startswith("classifier.")}
    for k, v in head.items():
        assert torch.equal(v, reference[k])


def test_scales_follow_rslora_and_patterns(lora):
    beta = read_lora_adapter(lora["dirs"]["beta"])
    assert {t.scale for t in beta.targets.values()} == {6 / math.sqrt(4)}
    gamma = read_lora_adapter(lora["dirs"]["gamma"]).targets
    assert gamma["roberta.encoder.layer.1.attention.self.value.weight"].rank == 2
    assert gamma["roberta.encoder.layer.1.attention.self.value.weight"].scale == 4 / 2
    assert gamma["roberta.encoder.layer.0.attention.self.value.weight"].scale == 4 / 4
    assert gamma["roberta.embeddings.word_embeddings.weight"].scale == 12 / 4


def test_fan_in_fan_out_gpt2(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=16, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "base")
    pre = load_state_dict(tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "ad")
    adapter = read_lora_adapter(tmp_path / "ad", {k: tuple(v.shape) for k, v in pre.items()})
    assert set(adapter.layouts.values()) == {"fan_in_fan_out"}
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", local_files_only=True)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "ad").merge_and_unload().state_dict()
    for key, delta in adapter.deltas().items():
        assert delta.shape == pre[key].shape
        torch.testing.assert_close(pre[key] + delta, reference[key], rtol=0, atol=1e-6)
    # written back at its own rank (base config from the adapter directory), peft reproduces the same weights
    save_lora_adapter(adapter.deltas(), tmp_path / "ad", tmp_path / "back", rank=3, alpha=7.0,
                      layouts=adapter.layouts)
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", local_files_only=True)
    again = peft.PeftModel.from_pretrained(base, tmp_path / "back").merge_and_unload().state_dict()
    for key in pre:
        torch.testing.assert_close(again[key], reference[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        PeftLoRAAdapter(str(tmp_path / "base"), {"t": str(tmp_path / "ad")}).build_backbone()
    with pytest.raises(ConfigError, match="also a LoRA target"):
        key = next(iter(adapter.targets))
        save_lora_adapter(adapter.deltas(), tmp_path / "ad", tmp_path / "bad", rank=3,
                          saved_modules={key: pre[key]})


def test_adapter_name_segments_and_bin_weights(lora, tmp_path):
    """Keys with the adapter name (``.lora_A.default.weight``) in an ``adapter_model.bin`` read the same."""
    src = lora["dirs"]["alpha"]
    out = tmp_path / "named"
    out.mkdir()
    shutil.copy(src / "adapter_config.json", out)
    tensors = load_file(src / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
               .replace("classifier.", "classifier.modules_to_save.default."): v for k, v in tensors.items()}
    assert renamed != tensors
    torch.save(renamed, out / "adapter_model.bin")
    a, b = read_lora_adapter(src), read_lora_adapter(out)
    assert a.deltas().keys() == b.deltas().keys()
    assert all(torch.equal(a.deltas()[k], b.deltas()[k]) for k in a.targets)
    assert a.saved_modules.keys() == b.saved_modules.keys()


def test_task_arithmetic_equals_pre_plus_scaled_sum(lora):
    pre = lora["pre"]
    dirs = [lora["dirs"]["alpha"], lora["dirs"]["beta"]]
    out = merge_lora_adapters(lora["base"], dirs, "task_arithmetic", scaling=0.3)
    deltas = [read_lora_adapter(d).deltas() for d in dirs]
    targets = set(deltas[0]) | set(deltas[1])
    assert set(out.merged_delta) == targets
    assert out.output.record["lora_targets"] == [k for k in pre if k in targets]
    for key, t in pre.items():
        if key in targets:
            expected = t + 0.3 * sum(d.get(key, torch.zeros_like(t)) for d in deltas)
            torch.testing.assert_close(out.state_dict[key], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(out.state_dict[key], t), key  # not a LoRA target: θ_pre, bit for bit
    assert out.names == ["alpha", "beta"]
    assert set(out.task_specific["beta"]) == {k for k in pre if k.startswith("classifier.")}


def test_free_merging_experts_come_from_the_deltas(lora):
    dirs = list(lora["dirs"].values())
    density = 0.05
    out = merge_lora_adapters(lora["base"], dirs, "free_merging", expert_density=density, expert_dtype="float32")
    deltas = [read_lora_adapter(d).deltas() for d in dirs]
    targets = list(out.merged_delta)
    assert len(out.task_modules) == 3
    for k, (expert, delta) in enumerate(zip(out.task_modules, deltas)):
        assert isinstance(expert, SparseExpert) and expert.keys == targets  # no expert on non-targets
        ratios = []
        for key in targets:
            v = delta.get(key, torch.zeros(out.state_dict[key].shape)).flatten()
            indices, values = expert.entries(key)
            if not v.any():  # a weight this adapter does not target: its expert holds no non-zero entry
                assert not values.any()
                continue
            count = math.ceil(density * v.numel() - 1e-9)
            assert set(indices.tolist()) == set(v.abs().topk(count).indices.tolist()), (k, key)
            ratios.append(values / v[indices.long()])
        ratios = torch.cat(ratios)  # e_k = μ_k · M(v_k, d): one μ per task over the model
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-5, atol=0)
    # the same merge through the checkpoint path: θ_k = θ_pre + ΔW_k, non-targets excluded (stay θ_pre)
    pre = {k: v for k, v in lora["pre"].items() if k.startswith("roberta.")}
    finetuned = [{k: pre[k] + d[k] if k in d else pre[k] for k in pre} for d in deltas]
    reference = merge(pre, finetuned, "free_merging", exclude_keys=[non_target_pattern(targets)],
                      expert_density=density)
    for key in pre:
        torch.testing.assert_close(out.state_dict[key], reference.state_dict[key], rtol=0, atol=1e-6)
    # and through lazy LoRAModelSource checkpoints (the streaming merge job's inputs)
    base = open_base(lora["base"])
    inputs = CheckpointInputs(base, [LoRAModelSource(base, a) for a in out.adapters],
                              exclude_keys=[non_target_pattern(targets)])
    assert inputs.keys == targets
    streamed = {}
    execute(build_method("free_merging", {"expert_density": density}), inputs,
            lambda key, x, d, rng: streamed.__setitem__(key, d))
    for key in pre:
        if key in targets:
            torch.testing.assert_close(streamed[key], out.merged_delta[key], rtol=0, atol=1e-6)
        else:
            assert streamed[key] is None


def _svd_approx(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize(("rank", "task"), [(8, "gamma"), (2, None)])
def test_write_back_loads_in_peft(lora, tmp_path, rank, task):
    """The merged delta as a rank-r LoRA: peft loads it, and its merged weights are θ_pre + the rank-r SVD of
    the merged delta (θ_m itself when r ≥ the delta's rank: two rank-4 adapters give rank ≤ 8); with ``task``
    that task's head comes along, else the base model's stays."""
    dirs = [lora["dirs"]["alpha"], lora["dirs"]["gamma"]]
    out = merge_lora_adapters(lora["base"], dirs, "task_arithmetic", scaling=0.5)
    written = out.save_lora(tmp_path / "merged_lora", rank=rank, alpha=2.0 * rank, task=task)
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == 2.0 * rank
    assert config["task_type"] == ("SEQ_CLS" if task else None)
    assert json.loads((written / "merge_info.json").read_text())["head_of_task"] == task
    merged = peft_merged(lora["base"], written, ADAPTERS[task][0] if task else 2)
    pre = lora["pre"]
    head = out.task_specific[task] if task else {k: v for k, v in pre.items() if k.startswith("classifier.")}
    assert {k: merged[k] for k in head}.keys() == head.keys()
    assert all(torch.equal(merged[k], v) for k, v in head.items())
    for key, delta in out.merged_delta.items():
        matrix = delta.T if out.layouts[key] == "embedding" else delta
        approx = _svd_approx(matrix, rank)
        approx = approx.T if out.layouts[key] == "embedding" else approx
        atol = 2e-6 * (1 + float(delta.abs().max()))  # float32 rounding of the factors' products
        torch.testing.assert_close(merged[key], pre[key] + approx, rtol=0, atol=atol)
        if rank == 8:
            torch.testing.assert_close(merged[key], out.state_dict[key], rtol=0, atol=atol)
    for key in pre:
        if key.startswith("roberta.") and key not in out.merged_delta:
            assert torch.equal(merged[key], pre[key])


def test_delta_to_lora_is_the_truncated_svd():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(12, 7, generator=g)
    for rank in (1, 3, 7, 9):
        a, b = delta_to_lora(delta, rank, scale=0.5)
        assert a.shape == (rank, 7) and b.shape == (12, rank)
        torch.testing.assert_close(0.5 * b @ a, _svd_approx(delta, rank), rtol=0, atol=1e-5)
    low = torch.randn(12, 2, generator=g) @ torch.randn(2, 7, generator=g)
    a, b = delta_to_lora(low, 4)
    torch.testing.assert_close(b @ a, low, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        delta_to_lora(torch.zeros(3), 1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(edit(tensors), str(path / "adapter_model.safetensors"))


def test_bad_inputs_are_named(lora, tmp_path):
    src, shapes = lora["dirs"]["alpha"], {k: tuple(v.shape) for k, v in lora["pre"].items()}
    no_config = _copy(src, tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(FreeMergeError, match=r"no_config has no adapter_config\.json"):
        read_lora_adapter(no_config)
    dora = _copy(src, tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    with pytest.raises(FreeMergeError, match=r"dora/adapter_config\.json: use_dora=True is not supported"):
        read_lora_adapter(dora)
    bias = _copy(src, tmp_path / "bias")
    _edit_config(bias, bias="all")
    with pytest.raises(FreeMergeError, match=r"bias='all' is not supported"):
        read_lora_adapter(bias)
    renamed = _copy(src, tmp_path / "renamed")
    _edit_weights(renamed, lambda t: {k.replace("layer.1.attention.self.query", "layer.1.attention.self.qry"): v
                                      for k, v in t.items()})
    with pytest.raises(CheckpointMismatchError, match=r"renamed/adapter_model\.safetensors module "
                                                       r"'roberta\.encoder\.layer\.1\.attention\.self\.qry'.*no weight"):
        read_lora_adapter(renamed, shapes)
    magnitude = _copy(src, tmp_path / "magnitude")
    _edit_weights(magnitude, lambda t: {**t, "base_model.model.roberta.encoder.layer.0.attention.self.query"
                                        ".lora_magnitude_vector": torch.ones(16)})
    with pytest.raises(FreeMergeError, match=r"lora_magnitude_vector.*DoRA"):
        read_lora_adapter(magnitude)
    wrong_rank = _copy(src, tmp_path / "wrong_rank")
    _edit_config(wrong_rank, r=3)
    with pytest.raises(FreeMergeError, match=r"do not have rank r=3"):
        read_lora_adapter(wrong_rank)


def test_adapter_of_another_base_is_refused_before_merging(lora, tmp_path):
    torch.manual_seed(0)
    other = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**{**TINY, "hidden_size": 8, "intermediate_size": 12}, num_labels=2))
    other.save_pretrained(tmp_path / "other_base")
    foreign = _make_adapter(tmp_path / "other_base", tmp_path / "foreign", 2, {"r": 2, "target_modules": ["query"]}, 5)
    with pytest.raises(CheckpointMismatchError, match=r"foreign/adapter_model\.safetensors module .*query'.*"
                                                       r"base weight has shape \(16, 16\)"):
        merge_lora_adapters(lora["base"], [lora["dirs"]["alpha"], foreign], "task_arithmetic")
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        merge_lora_adapters(lora["base"], [], "task_arithmetic")


# ---------------------------------------------------------------------------------------------- MergedModule


def test_adapter_reproduces_each_peft_model(lora):
    """θ_k of the adapter in its backbone + the task's head give the PEFT model's logits."""
    adapter = PeftLoRAAdapter(str(lora["base"]), {t: str(d) for t, d in lora["dirs"].items()})
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    for task, (classes, _) in ADAPTERS.items():
        assert adapter.num_classes(task) == classes
        backbone = adapter.build_backbone().eval()
        backbone.load_state_dict(adapter.finetuned_state_dict(task), strict=True)
        head = adapter.build_head(task).eval()
        reference = peft.PeftModel.from_pretrained(_roberta(lora["base"], classes), lora["dirs"][task]).eval()
        with torch.no_grad():
            torch.testing.assert_close(head(backbone(ids)), reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    (pattern,) = adapter.exclude_keys
    merged_keys = [k for k in adapter.pretrained_state_dict() if not __import__("re").search(pattern, k)]
    assert set(merged_keys) == set().union(*(adapter.adapter(t).targets for t in adapter.task_names))


class TokenTask(Dataset):
    """Token-id sequences from a task-specific slice of the vocabulary; the label is the first token mod C."""

    def __init__(self, task_index: int, num_classes: int, split: str = "train", n: int = 24, length: int = 8,
                 vocab: int = TINY["vocab_size"]) -> None:
        g = torch.Generator().manual_seed(100 * task_index + (split == "test"))
        width = (vocab - 2) // len(ADAPTERS)
        self.x = 2 + task_index * width + torch.randint(0, width, (n, length), generator=g)
        self.y = self.x[:, 0] % num_classes
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.slow
def test_cli_merge_router_test(lora, tmp_path):
    """PeftLoRAAdapter through ``cli.py test`` (merge, router fit, test): the merged backbone equals
    merge_lora_adapters' and every task is scored."""
    import yaml

    from freemerge_pl.lightning.cli import main

    tasks = list(ADAPTERS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.peft_lora.PeftLoRAAdapter",
                              "init_args": {"base_model": str(lora["base"]),
                                            "adapters": {t: str(lora["dirs"][t]) for t in tasks}}},
                  "method": "free_merging", "method_args": {"expert_density": 0.05},
                  "router": {"feature_source": "auto", "epochs": 5}},
        "data": {"router_fraction": 0.5, "min_router_samples": 4, "batch_size": 8,
                 "tasks": [{"name": t, "dataset": "tests.test_peft_lora.TokenTask",
                            "dataset_args": {"task_index": i, "num_classes": ADAPTERS[t][0]}}
                           for i, t in enumerate(tasks)]},
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["test", "--config", str(path)])
    module = cli.model
    assert set(module.test_results["tasks"]) == set(tasks)
    assert all(0 <= r["accuracy"] <= 1 for r in module.test_results["tasks"].values())
    reference = merge_lora_adapters(lora["base"], [lora["dirs"][t] for t in tasks], "free_merging",
                                    names=tasks, expert_density=0.05)
    for key, value in module.backbone.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict[key], rtol=0, atol=1e-6)
    assert [m.keys for m in module.task_modules] == [m.keys for m in reference.task_modules]
