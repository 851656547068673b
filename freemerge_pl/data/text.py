"""Text classification/regression tasks on disk (CSV, TSV, JSONL, HF ``save_to_disk``), tokenised per item.

``TextTask`` is the dataset class a ``TaskConfig`` names. It reads one split's texts (one column, or two for a
sentence pair) and labels, checks the labels once, and tokenises each item when it is read (padding and
truncation to ``max_length``), so the default collate stacks items into a batch. An item is
``(x, label)`` with ``x`` a LongTensor ``[F, max_length]`` whose rows are ``TEXT_FIELDS`` in order
(``input_ids``, ``attention_mask``, and ``token_type_ids`` when the tokenizer produces them: BERT,
DeBERTa; not RoBERTa). One tensor per sample, not a dict, because MergedModule batches, indexes
(``x[sel]``) and moves inputs as tensors; ``unpack_text_inputs`` turns it back into model keyword arguments.

Layouts: ``path`` is a file, or a directory holding ``<split>.csv`` / ``<split>.tsv`` / ``<split>.jsonl``
(``format: auto`` picks by suffix), or a ``datasets`` ``save_to_disk`` directory (a ``DatasetDict``
with the split, or a single ``Dataset``; ``format: hf_disk``, or ``auto`` when ``dataset_dict.json`` or
``dataset_info.json`` is there). TSV is read without quote handling, as GLUE's own TSV files need.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from freemerge_pl.errors import ConfigError

#: the rows of a packed text input, in order (the last one only when the tokenizer produces it)
TEXT_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


@dataclass
class TextExamples:
    """One split read from disk: ``texts[i]`` is a tuple of one or two strings; ``labels[i]`` int or float."""

    texts: list[tuple[str, ...]]
    labels: list[int] | list[float]
    source: str
    label_names: list[str] | None = None


def pack_text_inputs(encoding: dict[str, Any]) -> Tensor:
    """A tokenizer's output (one example or a batch) as one LongTensor ``[(B,) F, L]`` of ``TEXT_FIELDS`` rows."""
    rows = [torch.as_tensor(encoding[k], dtype=torch.long) for k in TEXT_FIELDS if k in encoding]
    if len(rows) < 2 or "input_ids" not in encoding or "attention_mask" not in encoding:
        raise ConfigError(f"a text input needs input_ids and attention_mask; the tokenizer gave {sorted(encoding)}")
    return torch.stack(rows, dim=-2)


def unpack_text_inputs(x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """Model keyword arguments from a packed batch ``[B, F, L]``, a dict with input_ids/attention_mask, or bare
    token ids ``[B, L]`` (no padding: no attention mask)."""
    if isinstance(x, Tensor) and x.dim() == 2 and not x.is_floating_point():
        return {"input_ids": x}
    if isinstance(x, dict) or hasattr(x, "keys"):
        missing = [k for k in ("input_ids", "attention_mask") if k not in x]
        if missing:
            raise ConfigError(f"a text batch needs input_ids and attention_mask; missing {missing}")
        return {k: x[k] for k in TEXT_FIELDS if k in x}
    if x.dim() != 3 or not 2 <= x.shape[1] <= len(TEXT_FIELDS) or x.is_floating_point():
        raise ConfigError(f"a packed text batch is an integer tensor [batch, 2 or 3, length] (rows "
                          f"{list(TEXT_FIELDS)}) or token ids [batch, length]; got {x.dtype} {tuple(x.shape)}")
    return {k: x[:, i] for i, k in enumerate(TEXT_FIELDS[:x.shape[1]])}


# ---------------------------------------------------------------------------------------------- reading
def resolve_format(path: Path, split: str | None, fmt: str) -> tuple[Path, str]:
    """The file (or save_to_disk directory) to read and its format."""
    if fmt == "hf_disk" or (fmt == "auto" and path.is_dir() and (
            (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())):
        if not path.is_dir():
            raise ConfigError(f"TextTask: {path} is not a directory (format hf_disk reads a save_to_disk folder)")
        return path, "hf_disk"
    if path.is_dir():
        if split is None:
            raise ConfigError(f"TextTask: {path} is a directory; give split (reads <path>/<split>.csv|tsv|jsonl)")
        suffixes = [s for s, f in TABLE_SUFFIXES.items() if fmt in ("auto", f)]
        found = [path / f"{split}{s}" for s in suffixes if (path / f"{split}{s}").is_file()]
        if len(found) != 1:
            raise ConfigError(f"TextTask: expected exactly one of {[f'{split}{s}' for s in suffixes]} in {path}, "
                              f"found {[p.name for p in found]}")
        path = found[0]
    elif not path.is_file():
        raise ConfigError(f"TextTask: {path} does not exist")
    if fmt == "auto":
        if path.suffix not in TABLE_SUFFIXES:
            raise ConfigError(f"TextTask: cannot tell the format of {path} from its suffix; set format "
                              f"(one of csv, tsv, jsonl, hf_disk)")
        fmt = TABLE_SUFFIXES[path.suffix]
    return path, fmt


def read_table_rows(path: Path, fmt: Literal["csv", "tsv", "jsonl"]) -> list[dict[str, Any]]:
    """Rows of a CSV (header line), TSV (header line, no quoting, as GLUE's files) or JSONL file."""
    try:
        with path.open(newline="" if fmt != "jsonl" else None, encoding="utf-8") as f:
            if fmt == "jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ConfigError(f"TextTask: {path} line {n} is not JSON: {err}") from None
                return rows
            if fmt == "tsv":
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"TextTask: {path} cannot be read: {err}") from err


def read_examples(path: str, split: str | None, text_columns: list[str], label_column: str,
                  fmt: str = "auto") -> TextExamples:
    """Texts and raw labels of one split (labels not yet checked or mapped)."""
    where, fmt = resolve_format(Path(path), split, fmt)
    label_names = None
    if fmt == "hf_disk":
        import datasets

        ds = datasets.load_from_disk(str(where))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"TextTask: {where} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
            where = where / str(split)
        columns = list(ds.column_names)
        feature = ds.features.get(label_column)
        label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        get = ds.__getitem__
    else:
        rows = read_table_rows(where, fmt)
        columns = list(rows[0]) if rows else []

        def get(column: str) -> list[Any]:
            return [r.get(column) for r in rows]

    missing = [c for c in [*text_columns, label_column] if c not in columns]
    if missing:
        raise ConfigError(f"TextTask: {where} has no column(s) {missing}; its columns: {columns}")
    texts = list(zip(*(get(c) for c in text_columns)))
    if not texts:
        raise ConfigError(f"TextTask: {where} holds no examples")
    bad = next((i for i, t in enumerate(texts) if not all(isinstance(s, str) for s in t)), None)
    if bad is not None:
        raise ConfigError(f"TextTask: {where} row {bad}: text column(s) {text_columns} must hold strings, "
                          f"found {texts[bad]!r}")
    return TextExamples(texts, list(get(label_column)), str(where), label_names)


def class_labels(raw: list[Any], source: str, label_names: list[str] | None) -> list[int]:
    """Integer class labels: ints (or integral numbers/strings) kept, names mapped through ``label_names``."""
    index = {n: i for i, n in enumerate(label_names or [])}
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, str) and v in index:
            out.append(index[v])
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not (math.isfinite(f) and f == int(f)):
            hint = f"; label_names maps names to ids ({label_names})" if label_names else \
                "; give label_names to map label strings to class ids"
            raise ConfigError(f"TextTask: {source} row {i}: label {v!r} is not a class id{hint}")
        out.append(int(f))
    return out


def regression_labels(raw: list[Any], source: str) -> list[float]:
    out = []
    for i, v in enumerate(raw):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            raise ConfigError(f"TextTask: {source} row {i}: label {v!r} is not a finite number (regression task)")
        out.append(f)
    return out


@lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` (cached per path; never downloads)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist (give the pre-trained model's folder, "
                          f"which holds tokenizer.json / vocab files)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {path}: {err}") from err


# ---------------------------------------------------------------------------------------------- dataset
class TextTask(Dataset):
    """One GLUE-style task split: ``(packed tokens [F, max_length], label)`` items, tokenised when read.

    ``path``/``split``/``format``: where the split is (module docstring). ``text_columns``: one column, or
    two for a sentence pair (tokenised as a pair: ``<s> A </s></s> B </s>`` for RoBERTa). ``label_column``:
    class ids (or names mapped through ``label_names``), or numbers for ``label_type: regression`` (STS-B;
    items carry float32 labels and ``num_classes`` is 1, the head's one output). ``num_classes``: default
    the ``ClassLabel`` feature's size (HF datasets), else the largest label + 1 of this split. ``tokenizer``:
    a directory (the pre-trained model's) read with ``AutoTokenizer`` ``local_files_only``. Every label is
    checked here (a negative one, e.g. GLUE's unlabelled test splits' -1, is an error naming the file).
    Labels are 0-d tensors (int64 classes, float32 regression), so a router batch that mixes a regression
    task with classification tasks still collates (``torch.stack`` promotes; the router ignores labels).
    """

    def __init__(
        self,
        path: str,
        tokenizer: str,
        text_columns: list[str],
        split: str | None = None,
        label_column: str = "label",
        format: Literal["auto", "csv", "tsv", "jsonl", "hf_disk"] = "auto",
        max_length: int = 128,
        label_type: Literal["classification", "regression"] = "classification",
        num_classes: int | None = None,
        label_names: list[str] | None = None,
    ) -> None:
        if not 1 <= len(text_columns) <= 2:
            raise ConfigError(f"TextTask: text_columns={text_columns!r} must name one column or two (a pair)")
        if label_type not in ("classification", "regression"):
            raise ConfigError(f"TextTask: label_type={label_type!r}; accepted: classification, regression")
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"TextTask: max_length={max_length!r} must be a whole number ≥ 2")
        examples = read_examples(path, split, list(text_columns), label_column, format)
        self.source, self.split, self.texts = examples.source, split, examples.texts
        self.label_names = list(label_names) if label_names is not None else examples.label_names
        if label_type == "regression":
            if num_classes not in (None, 1):
                raise ConfigError(f"TextTask: {self.source}: a regression task has one output; num_classes="
                                  f"{num_classes} must be 1 or unset")
            self.labels: list[int] | list[float] = regression_labels(examples.labels, self.source)
            self.num_classes = 1
        else:
            labels = class_labels(examples.labels, self.source, self.label_names)
            if num_classes is None:
                num_classes = len(self.label_names) if self.label_names else max(labels) + 1
            wrong = next(((i, v) for i, v in enumerate(labels) if not 0 <= v < num_classes), None)
            if wrong is not None:
                extra = " (GLUE's test splits are unlabelled: evaluate on validation)" if wrong[1] < 0 else ""
                raise ConfigError(f"TextTask: {self.source} row {wrong[0]}: label {wrong[1]} is outside "
                                  f"[0, {num_classes}){extra}")
            self.labels, self.num_classes = labels, int(num_classes)
        self.label_type, self.max_length = label_type, max_length
        self.tokenizer_path = str(tokenizer)
        self.tokenizer = load_tokenizer(self.tokenizer_path)

    def __len__(self) -> int:
        return len(self.texts)

    def encode(self, texts: tuple[str, ...]) -> Tensor:
        """Packed ``[F, max_length]`` tokens of one example (padding and truncation to ``max_length``)."""
        enc = self.tokenizer(*texts, padding="max_length", truncation=True, max_length=self.max_length)
        return pack_text_inputs(enc)

    def __getitem__(self, index: int):
        dtype = torch.float32 if self.label_type == "regression" else torch.long
        return self.encode(self.texts[index]), torch.tensor(self.labels[index], dtype=dtype)

    def __repr__(self) -> str:
        return (f"TextTask(source={self.source!r}, {len(self)} examples, {self.label_type}, "
                f"num_classes={self.num_classes}, max_length={self.max_length})")


__all__ = ["TEXT_FIELDS", "TextExamples", "TextTask", "load_tokenizer", "pack_text_inputs", "read_examples",
           "unpack_text_inputs"]
