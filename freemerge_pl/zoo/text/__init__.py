"""The text zoo: all-MiniLM-L6-v2 (from its PyPI wheel) fine-tuned on 4 text tasks built from installed text.

Tasks (``freemerge_pl.zoo.text.sources``): the language of a word (pyspellchecker's frequency lists), the
sentiment class of a word (the VADER lexicon), the Unicode general category of a character from its name
(stdlib ``unicodedata``) and the topic of the stdlib module a docstring line comes from. ``ensure_text_zoo``
builds the zoo once (deterministically for a thread count, part of its cache key) and checks every file
against its manifest before use; ``TextZooTaskDataset`` reads a split; ``freemerge_pl.adapters.text_zoo.
TextZooAdapter`` reads the checkpoints. ``python -m freemerge_pl.zoo.text --size default`` builds it (an
interrupted build resumes from its finished fine-tunes). It is the ``ZooSpec`` ``TEXT_ZOO`` over the shared
cache logic of ``freemerge_pl.zoo.cache``.
"""

from freemerge_pl.zoo.text.build import (
    TEXT_ZOO,
    build_text_zoo,
    default_text_zoo_root,
    ensure_text_zoo,
    resolve_text_zoo_root,
    verify_text_zoo,
)
from freemerge_pl.zoo.text.dataset import TextZooTaskDataset
from freemerge_pl.zoo.text.recipe import text_zoo_hash, text_zoo_recipe, text_zoo_task_names

#: the text zoo's ``ZooSpec`` (``freemerge_pl.zoo.cache`` builds, verifies and finds it)
SPEC = TEXT_ZOO

__all__ = [
    "SPEC",
    "TEXT_ZOO",
    "TextZooTaskDataset",
    "build_text_zoo",
    "default_text_zoo_root",
    "ensure_text_zoo",
    "resolve_text_zoo_root",
    "text_zoo_hash",
    "text_zoo_recipe",
    "text_zoo_task_names",
    "verify_text_zoo",
]
