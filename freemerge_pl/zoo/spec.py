"""``ZooSpec``: what one zoo is (its names, manifest format, sizes, recipe, build plan, writer, summary); the
recipe's shared parts (build environment, cache key) and where a zoo lives.

``freemerge_pl.zoo.cache`` builds, verifies and finds any zoo from its spec; ``freemerge_pl.zoo.vision`` and
``freemerge_pl.zoo.text`` each fill one in (``VISION_ZOO``, ``TEXT_ZOO``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from freemerge_pl.errors import ConfigError
from freemerge_pl.progress import usable_cpus

#: a zoo writer: ``write(staging, recipe, seed, progress, stages) -> manifest`` (``freemerge_pl.zoo.cache``)
Writer = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class ZooSpec:
    """One zoo. ``name``: how messages call it (``"zoo"``, ``"text zoo"``); ``module``: its package, which
    ``python -m`` runs (the rebuild hint) and whose logger reports its builds; ``format``: the manifest's
    ``format``; ``root_env`` / ``cache_dir``: its default root, ``$<root_env>/<size>-seed<seed>`` or
    ``<user cache>/freemerge_pl/<cache_dir>/<size>-seed<seed>``; ``sizes``: the recipe table per size;
    ``recipe(size, threads)``: the full recipe; ``plan(recipe)``: units of work per kind;
    ``prior(size, threads)``: expected seconds per unit; ``write``: the build (``Writer``);
    ``summary(manifest)``: the table ``python -m <module>`` prints."""

    name: str
    module: str
    format: str
    root_env: str
    cache_dir: str
    sizes: Mapping[str, Any]
    recipe: Callable[[str, int | None], dict[str, Any]]
    plan: Callable[[dict[str, Any]], dict[str, float]]
    prior: Callable[[str, int], dict[str, float]]
    write: Writer
    summary: Callable[[dict[str, Any]], str]

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(self.module)

    def check_size(self, size: str) -> None:
        if size not in self.sizes:
            raise ConfigError(f"unknown {self.name} size {size!r}; accepted: {sorted(self.sizes)}")

    def default_root(self, size: str = "default", seed: int = 0) -> Path:
        """``$<root_env>/<size>-seed<seed>`` if that variable is set, else the user cache directory's."""
        base = os.environ.get(self.root_env)
        if base:
            parent = Path(base).expanduser()
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            parent = Path(cache).expanduser() / "freemerge_pl" / self.cache_dir
        return parent / f"{size}-seed{seed}"

    def resolve_root(self, root: str | Path | None, size: str = "default", seed: int = 0) -> Path:
        return Path(root).expanduser().absolute() if root else self.default_root(size, seed).absolute()

    def rebuild_hint(self, root: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
        """How to rebuild the zoo at ``root``: the ``python -m`` command line (its size and seed when known)."""
        m = manifest or {}
        size, seed = m.get("size", "default"), m.get("seed", 0)
        return (f"rebuild the {self.name}: python -m {self.module} --size {size} --seed {seed} --root {Path(root)} "
                f"--rebuild (or delete {Path(root)})")


def build_threads() -> int:
    """CPU threads a build uses: ``$FREEMERGE_ZOO_THREADS`` or the CPUs this process may use (≤ 8)."""
    env = os.environ.get("FREEMERGE_ZOO_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"FREEMERGE_ZOO_THREADS={env!r} is not an integer (the zoo build's thread count)") from None
    return max(1, min(usable_cpus(), 8))


def build_environment(threads: int | None = None) -> dict[str, Any]:
    """What besides the hyperparameters changes a build's bits, hence its accuracies: the intra-op thread count
    (it changes how reductions and matrix products are split: a 1- and a 2-thread build of the default size
    differ by up to 2 points on a task), torch's major.minor version and the CPU kernels it dispatches to."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return {"threads": int(threads) if threads is not None else build_threads(), "torch": major_minor,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def recipe_hash(recipe: dict[str, Any], seed: int) -> str:
    """A zoo's cache key: SHA-256 of the recipe (environment included) and the seed."""
    blob = json.dumps({"recipe": recipe, "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


__all__ = ["Writer", "ZooSpec", "build_environment", "build_threads", "recipe_hash"]
