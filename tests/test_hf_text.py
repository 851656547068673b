"""HFSequenceClassificationAdapter, TextTask and the GLUE metrics on tiny encoders saved by the test (no network)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
)

from freemerge_pl.adapters.hf_text import HFSequenceClassificationAdapter
from freemerge_pl.data.text import TextTask, pack_text_inputs
from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.lightning.cli import main
from freemerge_pl.lightning.metrics import GLUE_METRICS, glue_metrics, task_metrics
from freemerge_pl.merging import merge

REPO = Path(__file__).resolve().parents[1]
TABLE4 = sorted((REPO / "configs" / "paper").glob("table4_*.yaml"))
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "far", "mat", "away", "good", "bad", "movie", "film", "plot",
         "acting", "was", "is", "very", "not"]
#: task -> (num_labels, text columns, data format)
TASKS = {"sst2": (2, ["sentence"], "csv"), "mnli": (3, ["premise", "hypothesis"], "jsonl"),
         "stsb": (1, ["sentence1", "sentence2"], "hf_disk")}
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 40}
TYPE_ARGS = {
    "roberta": {**SIZES, "type_vocab_size": 1, "pad_token_id": 1},
    "bert": SIZES, "deberta-v2": SIZES,
    "electra": {**SIZES, "embedding_size": 16},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 40},
}


def tiny_tokenizer(directory: Path) -> RobertaTokenizerFast:
    """A byte-level BPE tokenizer trained on WORDS, wrapped as RobertaTokenizerFast and saved."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                               sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                               mask_token="<mask>")
    tok.save_pretrained(directory)
    return tok


def tiny_config(model_type: str, vocab_size: int, num_labels: int):
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, num_labels=num_labels, **TYPE_ARGS[model_type])


def fine_tune_like(pre_encoder: torch.nn.Module, config, seed: int) -> torch.nn.Module:
    """A sequence classifier whose encoder is the pre-trained one plus small noise and whose head is random."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    encoder = getattr(model, model.base_model_prefix)
    encoder.load_state_dict(pre_encoder.state_dict(), strict=False)  # the classifier model may lack the pooler
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def random_sentence(g: torch.Generator, n: int = 5) -> str:
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def write_task_data(root: Path, task: str, g: torch.Generator, sizes=(("train", 24), ("validation", 12))) -> Path:
    num_labels, columns, fmt = TASKS[task]
    out = root / task
    splits = {}
    for split, n in sizes:
        rows = []
        for _ in range(n):
            row = {c: random_sentence(g) for c in columns}
            row["label"] = (round(5 * torch.rand((), generator=g).item(), 3) if num_labels == 1
                            else int(torch.randint(num_labels, (), generator=g)))
            rows.append(row)
        splits[split] = rows
    out.mkdir(parents=True)
    for split, rows in splits.items():
        if fmt == "csv":
            lines = [",".join([*columns, "label"])] + [",".join([*(r[c] for c in columns), str(r["label"])])
                                                      for r in rows]
            (out / f"{split}.csv").write_text("\n".join(lines) + "\n")
        elif fmt == "jsonl":
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if fmt == "hf_disk":
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Tokenizer + pre-trained RoBERTa (AutoModel layout, and the hub's masked-LM layout), three fine-tuned
    sequence classifiers (sst2: 2 labels, mnli: 3 labels on pairs, stsb: regression) and their data."""
    root = tmp_path_factory.mktemp("hf_text")
    tok = tiny_tokenizer(root / "roberta-tiny")
    torch.manual_seed(0)
    base_config = tiny_config("roberta", len(tok), 2)
    pre = AutoModel.from_config(base_config).eval()
    pre.save_pretrained(root / "roberta-tiny")
    mlm = RobertaForMaskedLM(base_config)
    mlm.roberta.load_state_dict(pre.state_dict(), strict=False)
    mlm.save_pretrained(root / "roberta-tiny-mlm")
    tok.save_pretrained(root / "roberta-tiny-mlm")
    finetuned = {}
    g = torch.Generator().manual_seed(3)
    for i, (task, (num_labels, _, _)) in enumerate(TASKS.items()):
        model = fine_tune_like(pre, tiny_config("roberta", len(tok), num_labels), seed=10 + i)
        model.save_pretrained(root / "ckpt" / f"roberta-tiny_glue-{task}")
        finetuned[task] = model
        write_task_data(root / "data", task, g)
    return {"root": root, "tok": tok, "pre": pre, "finetuned": finetuned}


def adapter(zoo, pretrained="roberta-tiny", tasks=tuple(TASKS), **kw) -> HFSequenceClassificationAdapter:
    args = {"pretrained": str(zoo["root"] / pretrained), "tasks": list(tasks),
            "checkpoint_root": str(zoo["root"] / "ckpt"), "pattern": "roberta-tiny_glue-{task}"}
    return HFSequenceClassificationAdapter(**{**args, **kw})


def text_task(zoo, task: str, split: str = "validation", **kw) -> TextTask:
    num_labels, columns, _ = TASKS[task]
    args = {"path": str(zoo["root"] / "data" / task), "split": split, "text_columns": columns,
            "tokenizer": str(zoo["root"] / "roberta-tiny"), "max_length": 24,
            "label_type": "regression" if num_labels == 1 else "classification",
            **({} if num_labels == 1 else {"num_classes": num_labels})}
    return TextTask(**{**args, **kw})


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("pretrained", ["roberta-tiny", "roberta-tiny-mlm"])
def test_loaded_weights_equal_saved(zoo, pretrained):
    a = adapter(zoo, pretrained=pretrained)
    a.prepare()
    pre = a.pretrained_state_dict()
    expected = {f"roberta.{k}": v for k, v in zoo["pre"].state_dict().items() if not k.startswith("pooler.")}
    assert list(pre) == list(expected) == list(a.build_backbone().state_dict())
    assert all(torch.equal(pre[k], expected[k]) for k in expected)
    for task, model in zoo["finetuned"].items():
        ft = a.finetuned_state_dict(task)
        saved = {k: v for k, v in model.state_dict().items() if k.startswith("roberta.")}
        assert list(ft) == list(saved) and all(torch.equal(ft[k], saved[k]) for k in saved)
        head = a.build_head(task)
        assert {f"model.{k}": v for k, v in model.state_dict().items() if k.startswith("classifier.")}.keys() \
            == head.state_dict().keys()
        assert all(torch.equal(head.state_dict()[f"model.{k}"], v) for k, v in model.state_dict().items()
                   if k.startswith("classifier."))
        assert a.num_classes(task) == TASKS[task][0]
    assert len(a.checkpoint_paths()) == 4 and all(Path(p).is_file() for p in a.checkpoint_paths())


@pytest.mark.parametrize("model_type", list(TYPE_ARGS))
@pytest.mark.parametrize("num_labels", [3, 1])
def test_backbone_plus_head_reproduce_hf_logits(tmp_path, model_type, num_labels):
    """Unmerged fine-tuned encoder as the backbone + the task's head == AutoModelForSequenceClassification."""
    torch.manual_seed(0)
    config = tiny_config(model_type, 60, num_labels)
    pre = AutoModel.from_config(config).eval()
    pre.save_pretrained(tmp_path / "pre")
    fine_tune_like(pre, config, seed=1).save_pretrained(tmp_path / "task")
    a = HFSequenceClassificationAdapter(str(tmp_path / "pre"), finetuned={"task": str(tmp_path / "task")})
    a.prepare()
    backbone = a.build_backbone()
    backbone.load_state_dict(a.finetuned_state_dict("task"), strict=True)
    head = a.build_head("task")
    g = torch.Generator().manual_seed(2)
    enc = {"input_ids": torch.randint(3, 60, (4, 12), generator=g),
           "attention_mask": torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 12, [1] * 3 + [0] * 9])}
    if model_type in ("bert", "electra"):  # segment ids: the packed third row
        enc["token_type_ids"] = torch.tensor([[0] * 6 + [1] * 6] * 4)
    reference = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "task"), local_files_only=True)
    with torch.no_grad():
        expected = reference.eval()(**enc).logits
        packed = pack_text_inputs(enc)
        assert packed.shape == (4, len(enc), 12)
        got = head(backbone(packed))
        assert torch.equal(head(backbone(enc)), got)
    assert got.shape == (4, num_labels) and a.num_classes("task") == num_labels
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not any(k.startswith(backbone.prefix + ".") for k in head.state_dict())


# ------------------------------------------------------------------------------------------------ errors
def test_adapter_errors_name_task_and_file(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"task\(s\) \['qqp'\] have no directory"):
        HFSequenceClassificationAdapter("x", finetuned={"sst2": "y"}, tasks=["sst2", "qqp"])
    with pytest.raises(ConfigError, match="must contain"):
        adapter(zoo, pattern="roberta")
    missing = adapter(zoo, tasks=["sst2", "qqp"])
    with pytest.raises(FreeMergeError, match=r"fine-tuned \(qqp\).*roberta-tiny_glue-qqp does not exist"):
        missing.prepare()
    # a plain encoder saved where a sequence classifier is expected
    wrong = tmp_path / "wrong_arch"
    zoo["pre"].save_pretrained(wrong)
    a = adapter(zoo, finetuned={"rte": str(wrong)}, tasks=["sst2", "rte"])
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(rte\).*wrong_arch.*not a \*ForSequenceClass"):
        a.prepare()
    # another encoder size
    other = tmp_path / "other_size"
    config = AutoConfig.for_model("roberta", vocab_size=len(zoo["tok"]), num_labels=2,
                                  **{**TYPE_ARGS["roberta"], "hidden_size": 16})
    AutoModelForSequenceClassification.from_config(config).save_pretrained(other)
    a = adapter(zoo, finetuned={"cola": str(other)}, tasks=["sst2", "cola"])
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(cola\).*other_size.*hidden_size=16"):
        a.prepare()
    # a config that promises 3 labels over a file whose classifier has 2
    relabel = tmp_path / "relabel"
    zoo["finetuned"]["sst2"].save_pretrained(relabel)
    cfg = json.loads((relabel / "config.json").read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(3)}
    cfg["label2id"] = {f"L{i}": i for i in range(3)}
    (relabel / "config.json").write_text(json.dumps(cfg))
    a = adapter(zoo, finetuned={"sst2": str(relabel)}, tasks=["sst2"])
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned \(sst2\).*relabel.*num_labels=3"):
        a.build_head("sst2")


def test_class_count_mismatch_with_data_fails_before_merging(zoo, monkeypatch):
    from freemerge_pl.lightning.datamodule import MultiTaskDataModule, TaskConfig
    from freemerge_pl.lightning.module import MergedModule

    a = adapter(zoo, tasks=["sst2", "mnli"])
    data = [TaskConfig(name=t, dataset="freemerge_pl.data.text.TextTask",
                       dataset_args={"path": str(zoo["root"] / "data" / t), "text_columns": TASKS[t][1],
                                     "tokenizer": str(zoo["root"] / "roberta-tiny"), "num_classes": n},
                       train_args={"split": "train"}, test_args={"split": "validation"})
            for t, n in (("sst2", 2), ("mnli", 4))]
    dm = MultiTaskDataModule(data, batch_size=4)
    module = MergedModule(a, method="task_arithmetic")
    monkeypatch.setattr(a, "pretrained_state_dict", lambda: pytest.fail("read weights before the check"))
    with pytest.raises(ConfigError, match="task 'mnli': the head has 3 classes but the dataset has 4"):
        module._check_data(dm)


# ------------------------------------------------------------------------------------------------ data
def test_text_task_reads_csv_jsonl_hf_disk_and_tokenises(zoo):
    tok = zoo["tok"]
    for task, (num_labels, columns, fmt) in TASKS.items():
        ds = text_task(zoo, task)
        assert len(ds) == 12 and ds.num_classes == max(num_labels, 1)
        x, y = ds[5]
        texts = ds.texts[5]
        enc = tok(*texts, padding="max_length", truncation=True, max_length=24)
        assert x.dtype == torch.long and x.shape == (2, 24)
        assert x[0].tolist() == enc["input_ids"] and x[1].tolist() == enc["attention_mask"]
        if num_labels == 1:
            assert y.dtype == torch.float32 and ds.label_type == "regression"
        else:
            assert y.dtype == torch.int64 and 0 <= int(y) < num_labels
    # the stored values, read independently
    raw = [json.loads(line) for line in (zoo["root"] / "data" / "mnli" / "validation.jsonl").read_text().splitlines()]
    mnli = text_task(zoo, "mnli")
    assert mnli.texts == [(r["premise"], r["hypothesis"]) for r in raw] and mnli.labels == [r["label"] for r in raw]
    stsb = datasets.load_from_disk(str(zoo["root"] / "data" / "stsb"))["validation"]
    assert text_task(zoo, "stsb").labels == pytest.approx(list(stsb["label"]))
    batch = torch.utils.data.default_collate([mnli[i] for i in range(4)])
    assert batch[0].shape == (4, 2, 24) and batch[1].dtype == torch.int64


def test_text_task_label_names_tsv_and_classlabel(tmp_path, zoo):
    (tmp_path / "dev.tsv").write_text('premise\thypothesis\tlabel\nA "quoted\tb\tneutral\nc\td\tentailment\n')
    tok = str(zoo["root"] / "roberta-tiny")
    ds = TextTask(str(tmp_path), tok, ["premise", "hypothesis"], split="dev",
                  label_names=["entailment", "neutral", "contradiction"])
    assert ds.texts[0] == ('A "quoted', "b") and ds.labels == [1, 0] and ds.num_classes == 3
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos", "neutral"])})
    datasets.Dataset.from_dict({"sentence": ["a cat", "a dog"], "label": [0, 1]}, features=features) \
        .save_to_disk(str(tmp_path / "single"))
    single = TextTask(str(tmp_path / "single"), tok, ["sentence"])
    assert single.num_classes == 3 and single.label_names == ["neg", "pos", "neutral"]


def test_text_task_errors_name_the_file(zoo, tmp_path):
    tok = str(zoo["root"] / "roberta-tiny")
    sst2 = zoo["root"] / "data" / "sst2"
    with pytest.raises(ConfigError, match=r"sst2/validation.csv has no column\(s\) \['text'\]"):
        TextTask(str(sst2), tok, ["text"], split="validation")
    with pytest.raises(ConfigError, match=r"expected exactly one of .*test\.csv"):
        TextTask(str(sst2), tok, ["sentence"], split="test")
    (tmp_path / "test.csv").write_text("sentence,label\na cat,-1\n")
    with pytest.raises(ConfigError, match=r"test.csv row 0: label -1 is outside \[0, 2\).*unlabelled"):
        TextTask(str(tmp_path / "test.csv"), tok, ["sentence"], num_classes=2)
    (tmp_path / "names.csv").write_text("sentence,label\na cat,positive\n")
    with pytest.raises(ConfigError, match=r"names.csv row 0: label 'positive' is not a class id"):
        TextTask(str(tmp_path / "names.csv"), tok, ["sentence"])
    with pytest.raises(ConfigError, match="regression task has one output"):
        TextTask(str(sst2), tok, ["sentence"], split="train", label_type="regression", num_classes=2)
    with pytest.raises(ConfigError, match="splits .*'train'.*not 'test'"):
        TextTask(str(zoo["root"] / "data" / "stsb"), tok, ["sentence1", "sentence2"], split="test",
                 label_type="regression")
    with pytest.raises(ConfigError, match="tokenizer directory .*nowhere does not exist"):
        TextTask(str(sst2), str(tmp_path / "nowhere"), ["sentence"], split="train")


# ------------------------------------------------------------------------------------------------ metrics
def test_glue_metrics_equal_sklearn_and_scipy():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randint(3, (50,), generator=g), torch.randint(2, (50,), generator=g)  # 2 = foreign
    m = task_metrics(["accuracy", "f1", "macro_f1", "matthews"], 3)
    m.update(preds[:20], target[:20])
    m.update(preds[20:], target[20:])
    got = {k: float(v) for k, v in m.compute().items()}
    assert got["f1"] == pytest.approx(f1_score(target.numpy(), preds.numpy(), labels=[1], average="macro"))
    assert got["f1"] == pytest.approx(f1_score((target == 1).numpy(), (preds == 1).numpy()))
    assert got["macro_f1"] == pytest.approx(f1_score(target.numpy(), preds.numpy(), average="macro",
                                                     labels=[0, 1, 2]))
    assert got["matthews"] == pytest.approx(matthews_corrcoef(target.numpy(), preds.numpy()), abs=1e-6)
    assert got["accuracy"] == pytest.approx(accuracy_score(target.numpy(), preds.numpy()))
    x = torch.randn(40, generator=g)
    y = x + torch.randn(40, generator=g)
    r = task_metrics(["pearson_spearman", "pearson", "spearman"], 1)
    r.update(x[:15], y[:15])
    r.update(x[15:], y[15:])
    got = {k: float(v) for k, v in r.compute().items()}
    p, s = pearsonr(x.numpy(), y.numpy())[0], spearmanr(x.numpy(), y.numpy())[0]
    assert got["pearson"] == pytest.approx(p, abs=1e-5) and got["spearman"] == pytest.approx(s, abs=1e-5)
    assert got["pearson_spearman"] == pytest.approx((p + s) / 2, abs=1e-5)


def test_glue_metrics_names():
    assert glue_metrics("CoLA") == ["matthews"] and glue_metrics("STS-B")[0] == "pearson_spearman"
    assert glue_metrics("MRPC") == glue_metrics("qqp") == ["accuracy", "f1"]
    assert all(glue_metrics(t) == ["accuracy"] for t in ("SST-2", "MNLI", "QNLI", "RTE"))
    assert len(GLUE_METRICS) == 8
    with pytest.raises(ConfigError, match="not one of the 8 GLUE tasks"):
        glue_metrics("wnli")


# ------------------------------------------------------------------------------------------------ merging
def test_released_glue_profile_runs_on_roberta_encoder_keys(zoo):
    a = adapter(zoo)
    pre = a.pretrained_state_dict()
    fts = [a.finetuned_state_dict(t) for t in a.task_names]
    out = merge(pre, fts, "free_merging_released", names=a.task_names, profile="glue")
    assert list(out.state_dict) == list(pre)
    changed = [k for k in pre if not torch.equal(out.state_dict[k], pre[k])]
    assert changed == list(pre)  # profile glue merges every encoder key (2-D weights filtered)
    assert len(out.task_modules) == 3 and all(m.nbytes > 0 for m in out.task_modules)
    with pytest.raises(ConfigError, match="key_pattern='attn\\|mlp'.*matches none"):
        merge(pre, fts, "free_merging_released", names=a.task_names, profile="vit")


def _yaml(zoo, tmp_path: Path, method: str, method_args: dict, routing: str = "router") -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"adapter": {"class_path": "freemerge_pl.adapters.hf_text.HFSequenceClassificationAdapter",
                              "init_args": {"pretrained": str(zoo["root"] / "roberta-tiny"),
                                            "checkpoint_root": str(zoo["root"] / "ckpt"),
                                            "pattern": "roberta-tiny_glue-{task}", "tasks": list(TASKS)}},
                  "method": method, "method_args": method_args, "routing": routing,
                  "router": {"feature_source": "backbone", "epochs": 3, "hidden_dim": 16}},
        "data": {"router_fraction": 0.5, "min_router_samples": 4, "batch_size": 8, "seed": 0, "tasks": [
            {"name": t, "dataset": "freemerge_pl.data.text.TextTask",
             "dataset_args": {"path": str(zoo["root"] / "data" / t), "text_columns": TASKS[t][1],
                              "tokenizer": str(zoo["root"] / "roberta-tiny"), "max_length": 24,
                              "label_type": "regression" if TASKS[t][0] == 1 else "classification",
                              **({"num_classes": TASKS[t][0]} if TASKS[t][0] > 1 else {})},
             "train_args": {"split": "train"}, "test_args": {"split": "validation"},
             "metrics": glue_metrics("mrpc") if t == "sst2" else (glue_metrics(t) if t != "mnli" else ["accuracy"])}
            for t in TASKS]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_cli_test_matches_an_independent_evaluation(zoo, tmp_path):
    """task_arithmetic (no task modules, so routing cannot change features): the CLI's per-task metrics equal
    sklearn/scipy on the merged encoder + each task's head applied directly."""
    cli = main(["test", "--config", str(_yaml(zoo, tmp_path, "task_arithmetic", {"scaling": 0.5}))])
    results = cli.model.test_results["tasks"]
    a = adapter(zoo)
    out = merge(a.pretrained_state_dict(), [a.finetuned_state_dict(t) for t in a.task_names], "task_arithmetic",
                scaling=0.5)
    backbone = a.build_backbone()
    backbone.load_state_dict(out.state_dict)
    for task in TASKS:
        ds = text_task(zoo, task)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            logits = a.build_head(task)(backbone(x))
        if TASKS[task][0] == 1:
            p, y = logits[:, 0].numpy(), ds.labels
            assert results[task]["pearson"] == pytest.approx(pearsonr(p, y)[0], abs=1e-5)
            assert results[task]["pearson_spearman"] == pytest.approx(
                (pearsonr(p, y)[0] + spearmanr(p, y)[0]) / 2, abs=1e-5)
        else:
            p = logits.argmax(-1).numpy()
            assert results[task]["accuracy"] == pytest.approx(accuracy_score(ds.labels, p))
            if task == "sst2":
                assert results[task]["f1"] == pytest.approx(f1_score(ds.labels, p))
        assert "routing_accuracy" not in results[task]  # no task modules: nothing is routed (issue 28 item 4)


@pytest.mark.slow
def test_cli_merge_router_test_with_released_glue_profile(zoo, tmp_path):
    cfg = _yaml(zoo, tmp_path, "free_merging_released", {"profile": "glue"})
    cli = main(["test", "--config", str(cfg)])
    module = cli.model
    assert bool(module.router_trained) and len(module.task_modules) == 3
    results = module.test_results
    assert set(results["tasks"]) == set(TASKS)
    assert set(results["tasks"]["stsb"]) == {"pearson_spearman", "pearson", "spearman", "routing_accuracy"}
    assert all(math.isfinite(v) for r in results["tasks"].values() for v in r.values())


def test_cli_merge_exports_text_model(zoo, tmp_path):
    cfg = _yaml(zoo, tmp_path, "free_merging_released", {"profile": "glue"})
    out = tmp_path / "merged"
    main(["export", "--config", str(cfg), "--output_dir", str(out)])
    assert (out / "merge_info.json").is_file() and (out / "router.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ configs
def _make_table4():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_table4", REPO / "configs" / "paper" / "make_table4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table4_configs_are_what_the_script_writes():
    rendered = _make_table4().render_all()
    assert sorted(rendered) == [p.name for p in TABLE4]
    for path in TABLE4:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run configs/paper/make_table4.py"
    assert {p.stem.removeprefix("table4_roberta_glue_") for p in TABLE4} >= {
        "fr_merging", "free_merging", "fr_merging_released", "free_merging_released", "task_arithmetic", "ties",
        "weight_averaging", "breadcrumbs", "pcb", "emr", "twin"}


@pytest.mark.parametrize("path", TABLE4, ids=[p.stem for p in TABLE4])
def test_table4_config_parses_without_reading_files(path):
    cli = main(["--config", str(path)], run=False)  # CHECKPOINT_ROOT / DATA_ROOT do not exist here
    a = cli.model.adapter
    assert isinstance(a, HFSequenceClassificationAdapter)
    names = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE"]
    assert a.task_names == cli.datamodule.task_names == names
    assert [t.metrics for t in cli.datamodule.tasks] == [glue_metrics(n) for n in names]
    assert [t.dataset_args.get("label_type", "classification") for t in cli.datamodule.tasks] == \
        ["regression" if n == "STS-B" else "classification" for n in names]
    assert cli.model.router_config.feature_source == "auto"  # token ids: the pre-trained encoder's first layers
    assert cli.model.method == path.stem.removeprefix("table4_roberta_glue_")
    assert a.pretrained == "CHECKPOINT_ROOT/roberta-base"
    assert all(t.dataset_args["path"].startswith("DATA_ROOT/glue/") for t in cli.datamodule.tasks)
