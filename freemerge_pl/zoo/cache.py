"""Any zoo's cache, from its ``ZooSpec``: find it, say why it is stale, build it (resumably), verify it.

A zoo directory holds ``manifest.json`` (the recipe with its build environment, ``recipe_hash``, per-task
results and ``files``: every file's size and sha256, ``freemerge_pl.io.file_records``) and the files it lists.
Before use every file is checked against it (``verify``: ``freemerge_pl.io.verify_manifest``, size always,
sha256 once per process and again when the file changes); a damaged file raises an error naming it and the
rebuild command.

A build writes into the staging directory ``freemerge_pl.io.staging_dir(dest)`` (``.<name>.partial`` next to
it) and publishes it with ``freemerge_pl.io.publish_directory`` (unlisted files removed, the manifest written
last, ``dest`` replaced by one rename): an interrupted build never leaves a half zoo. The staging directory survives an interruption: ``Stages`` records
there which stages finished (with their results) under the recipe hash, and the next build of the same recipe
reuses them (the pre-trained backbone, each finished fine-tune); another recipe starts it afresh.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import freemerge_pl.io as fio
from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.progress import format_seconds
from freemerge_pl.zoo.progress import BuildProgress, load_note, rough_duration
from freemerge_pl.zoo.spec import ZooSpec, recipe_hash
from freemerge_pl.zoo.training import deterministic

#: the manifest of every zoo directory
MANIFEST = "manifest.json"
#: the staging directory's record of finished stages (never published)
STAGES = ".stages.json"


# ----------------------------------------------------------------------------------------------- reading
def read_manifest(root: str | Path, spec: ZooSpec) -> dict[str, Any]:
    """The zoo's manifest (``freemerge_pl.io.read_manifest``); a missing or damaged one raises
    ``FreeMergeError`` naming it and the rebuild command."""
    return fio.read_manifest(root, MANIFEST, remedy=spec.rebuild_hint(root))


def verify(spec: ZooSpec, root: str | Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the zoo's files (``names``: relative paths; default all) against its manifest; returns the
    manifest. A damaged or missing file, or a manifest of another format, raises naming it and the rebuild."""
    root = Path(root)
    m = read_manifest(root, spec)
    hint = spec.rebuild_hint(root, m)
    if m.get("format") != spec.format or not isinstance(m.get("files"), dict):
        raise FreeMergeError(f"{root / MANIFEST} has format {m.get('format')!r}; this version reads "
                             f"{spec.format!r}; {hint}")
    fio.verify_manifest(root, m["files"], remedy=hint, names=names)
    return m


def task_entry(manifest: Mapping[str, Any], task: str, root: Path, what: str = "zoo") -> dict[str, Any]:
    """The manifest's record of ``task``; an unknown task raises ``ConfigError`` listing the zoo's tasks."""
    for t in manifest["tasks"]:
        if t["name"] == task:
            return t
    raise ConfigError(f"task {task!r} is not in the {what} at {root}; accepted: "
                      f"{[t['name'] for t in manifest['tasks']]}")


# ----------------------------------------------------------------------------------------------- staleness
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out if out else {prefix: d}


def recipe_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    """What differs between two recipes, as ``key: old -> new`` (at most ``limit`` entries)."""
    a, b = _flat(old if isinstance(old, dict) else {}), _flat(new)
    diff = [f"{k.rstrip('.')}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]
    return "; ".join(diff[:limit]) + (f"; {len(diff) - limit} more" if len(diff) > limit else "") if diff \
        else "same recipe, another seed or hash"


def stale_reason(spec: ZooSpec, root: Path, recipe: dict[str, Any], want_hash: str) -> str | None:
    """Why the zoo at ``root`` must be (re)built for ``recipe`` (hash ``want_hash``), or None if it is current:
    none there, an unreadable or older manifest, another recipe or build environment, or missing files."""
    if not (root / MANIFEST).exists():
        return f"no {spec.name} there yet"
    try:
        m = read_manifest(root, spec)
    except FreeMergeError as err:
        return str(err)
    if m.get("format") != spec.format:
        return f"its manifest has format {m.get('format')!r}, this version writes {spec.format!r}"
    if m.get("recipe_hash") != want_hash:
        return f"it was built with another recipe or build environment: {recipe_changes(m.get('recipe'), recipe)}"
    files = m.get("files")
    if not isinstance(files, dict):
        return "its manifest lists no files"
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        return f"{len(missing)} of its files are missing ({missing[0]}{', ...' if len(missing) > 1 else ''})"
    return None


# ----------------------------------------------------------------------------------------------- building
class Stages:
    """The finished stages of a build in its staging directory, each with its results (JSON), under the
    recipe hash: ``get(key)`` is the results of a finished stage (None if it has not finished), ``done(key,
    results)`` records one once its files are written. A staging directory of another recipe is emptied."""

    def __init__(self, staging: Path, want_hash: str) -> None:
        self.path = staging / STAGES
        self.hash = want_hash
        self.done_stages: dict[str, Any] = {}
        if staging.exists():
            try:
                record = json.loads(self.path.read_text())
                ok = isinstance(record, dict) and record.get("recipe_hash") == want_hash
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if ok:
                self.done_stages = dict(record.get("stages", {}))
            else:
                shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Any | None:
        return self.done_stages.get(key)

    def done(self, key: str, results: Any = True) -> None:
        self.done_stages[key] = results
        fio.write_json_atomic({"recipe_hash": self.hash, "stages": self.done_stages}, self.path)


def build_zoo(spec: ZooSpec, dest: str | Path, size: str = "default", seed: int = 0,
              reason: str | None = None) -> Path:
    """Build the zoo ``size``/``seed`` at ``dest`` (replacing an out-of-date one), resuming the finished stages
    of an interrupted build of the same recipe. Logs (the spec's logger, INFO) where and roughly how long first
    (and whether the machine is loaded), then a line per stage and one at least every
    ``$FREEMERGE_PROGRESS_SECONDS`` (10 s) with the elapsed time and the time left."""
    spec.check_size(size)
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise ConfigError(f"{spec.name} root {dest} exists, is not empty and holds no {MANIFEST}: refusing to "
                          f"replace it")
    recipe = spec.recipe(size, None)
    threads = recipe["environment"]["threads"]
    want = recipe_hash(recipe, seed)
    staging = fio.staging_dir(dest)
    stages = Stages(staging, want)
    progress = BuildProgress(spec.plan(recipe), spec.prior(size, threads), spec.log, name=spec.name,
                             threads=threads)
    resumed = f"; resuming {len(stages.done_stages)} finished stage(s) from {staging}" if stages.done_stages else ""
    spec.log.info("building the %s (size %s, seed %d) at %s%s; built once, later runs reuse it; expect %s on "
                  "%d thread%s on an idle machine%s (a progress line every %s)%s", spec.name, size, seed, dest,
                  f" ({reason})" if reason else "", rough_duration(progress.estimate_total_s()), threads,
                  "" if threads == 1 else "s", load_note(threads), f"{progress.interval_s:g} s", resumed)
    start = time.perf_counter()
    with deterministic(threads), progress:
        manifest = spec.write(staging, recipe, seed, progress, stages)
    manifest["build"]["seconds"] = round(time.perf_counter() - start, 2)
    fio.publish_directory(staging, dest, manifest, files=list(manifest["files"]), overwrite=True,
                          manifest_name=MANIFEST)  # drops the stage record; the manifest last; one rename
    spec.log.info("%s %s seed %d built at %s in %s", spec.name, size, seed, dest,
                  format_seconds(manifest["build"]["seconds"]))
    return dest


@contextlib.contextmanager
def _build_lock(dest: Path):
    """An exclusive lock next to ``dest`` (POSIX ``flock``), so concurrent processes build once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(dest.parent / f".{dest.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(spec: ZooSpec, root: str | Path | None = None, size: str = "default", seed: int = 0,
           rebuild: bool = False) -> Path:
    """The zoo directory, built first if it is missing, incomplete, or of another recipe or build environment
    (its recipe hash differs), or when ``rebuild`` (under the build lock, asking again inside it: another
    process may have built it meanwhile); then every file is checked against the manifest (``verify``): a
    damaged file raises an error naming it instead of giving wrong accuracies."""
    dest = spec.resolve_root(root, size, seed)
    recipe = spec.recipe(size, None)
    want = recipe_hash(recipe, seed)
    if rebuild or stale_reason(spec, dest, recipe, want) is not None:
        with _build_lock(dest):
            reason = "a rebuild was asked for" if rebuild else stale_reason(spec, dest, recipe, want)
            if reason is not None:
                build_zoo(spec, dest, size, seed, reason=reason)
    verify(spec, dest)
    return dest


__all__ = ["MANIFEST", "STAGES", "Stages", "build_zoo", "ensure", "read_manifest", "recipe_changes",
           "stale_reason", "task_entry", "verify"]
