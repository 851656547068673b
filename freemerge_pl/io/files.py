"""Files written whole: atomic writes, sha256, and directories published whole with one manifest.

The one publish/verify/manifest of the package (exports, the merge job, both zoos)::

    from freemerge_pl.io import ZOO_MANIFEST_NAME, publish_directory, staged_directory, verify_published

    with staged_directory(dest, manifest_name=ZOO_MANIFEST_NAME) as staging:  # ``.<name>.partial`` beside dest
        ...write files (nested paths are fine) into staging...
        manifest = publish_directory(staging, dest, record, manifest_name=ZOO_MANIFEST_NAME)
    manifest = verify_published(dest, manifest_name=ZOO_MANIFEST_NAME, remedy="rebuild it")

- ``staged_directory(dest)``: ``output_lock(dest)`` taken (``freemerge_pl.io.lock``: one writer per output;
  another process is refused at once), ``dest`` checked (``check_output_dir``: absent, empty, a directory this
  package published, or ``overwrite``), then a fresh staging directory; on an error it is removed, ``dest``
  untouched. A resumable build (the merge job) skips it: it holds ``output_lock(dest)`` for its whole run,
  writes into ``staging_dir(dest)`` itself (kept across interruptions) and calls ``check_output_dir`` +
  ``publish_directory`` when done.
- ``publish_directory(staging, dest, record, files=None)``: files not named in ``files`` are removed (None keeps
  all), the manifest ``{**record, "files": {relative path: {"bytes", "sha256"}}}`` is written last (a ``files``
  table already in ``record`` is kept as it is), then ``dest`` is replaced by one rename.
- ``read_manifest(directory)``: the manifest as a dict; a missing or damaged one raises ``FreeMergeError``
  naming it (``remedy`` appended). ``verify_manifest(root, files)`` checks listed files (size, sha256 cached per
  process); ``verify_published(dest)`` checks a whole published directory (complete, every file listed and
  intact, no unlisted file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io.lock import output_lock

#: the manifest every published export and merge-job output carries
MANIFEST_NAME = "merge_info.json"
#: the manifest of both zoos (pass ``manifest_name=ZOO_MANIFEST_NAME``; the name zoos already built carry)
ZOO_MANIFEST_NAME = "manifest.json"
#: the files an export wrote before manifests listed them (recognised so such a directory can be replaced)
_LEGACY_EXPORT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                                 r"(task_module_\d+|shared_\w+|heads|router)\.safetensors|task_modules\.json|"
                                 r"merge_info\.json|\..+\.tmp")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------ atomic files
def atomic_write(path, write) -> None:
    """Run ``write(tmp_path)`` then rename onto ``path``; on any error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise




def write_json_atomic(obj: Any, path) -> Path:
    path = Path(path)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_write(path, write)
    return path


def write_text_atomic(text: str, path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (skipped where the platform cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durable(obj: Any, path: Path) -> None:
    """``write_json_atomic`` (keys in insertion order) whose temp file is fsynced before the rename."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------ digests
def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: per-process memo of file digests: resolved path -> (stat signature, sha256)
_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file's bytes may have changed: size, mtime, ctime, inode, device."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def file_signature(path) -> tuple:
    """A value that changes whenever the file (or any file of the directory) at ``path`` may have changed: its
    size, mtime, ctime and inode; for a directory, those of every file in it. For invalidating caches."""
    path = Path(path)
    if path.is_dir():
        return tuple((p.relative_to(path).as_posix(), _signature(p.stat())) for p in sorted(path.rglob("*"))
                     if p.is_file())
    return _signature(path.stat())


def cached_sha256(path) -> str:
    """``sha256_file(path)``, memoised per process until the file's size, mtime, ctime or inode changes."""
    path = Path(path)
    key, stamp = str(path.resolve()), _signature(path.stat())
    seen = _DIGESTS.get(key)
    if seen is None or seen[0] != stamp:
        seen = (stamp, sha256_file(path))
        _DIGESTS[key] = seen
    return seen[1]


# ------------------------------------------------------------------------------------------ manifests
def file_records(directory, names: Iterable[str],
                 digests: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": digest}}`` of files of ``directory`` (relative paths), names sorted;
    ``digests``: the sha256 of files hashed as they were written (by name), which are not read again."""
    directory, digests = Path(directory), digests or {}
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": digests.get(n) or sha256_file(directory / n)}
            for n in sorted(names)}


def verify_manifest(root, files: Mapping[str, Mapping[str, Any]], *, remedy: str,
                    names: Iterable[str] | None = None) -> None:
    """Check files of ``root`` against a manifest's file table ``{relative path: {"bytes", "sha256"}}`` (the
    layout ``file_records`` writes): every call compares the size; the sha256 is computed the first time this
    process sees the file and again whenever its size, mtime, ctime or inode changed (``cached_sha256``).
    ``names`` restricts the check to those entries. A missing, resized or modified file raises
    ``FreeMergeError`` naming it, with ``remedy`` (how to rebuild) appended."""
    root = Path(root)
    for name in (sorted(files) if names is None else names):
        record = files.get(name)
        path = root / name
        if not isinstance(record, Mapping) or not {"bytes", "sha256"} <= set(record):
            raise FreeMergeError(f"{path}: the manifest of {root} has no size and sha256 for this file; {remedy}")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FreeMergeError(f"{path} is missing (listed in the manifest of {root}); {remedy}") from None
        if st.st_size != record["bytes"]:
            raise FreeMergeError(f"{path} is damaged or truncated: {st.st_size} bytes, its manifest records "
                                 f"{record['bytes']}; {remedy}")
        digest = cached_sha256(path)
        if digest != record["sha256"]:
            raise FreeMergeError(f"{path} is damaged: its sha256 {digest[:16]}… differs from the "
                                 f"{str(record['sha256'])[:16]}… its manifest records (modified or corrupted after "
                                 f"it was written); {remedy}")


def read_manifest(directory, manifest_name: str = MANIFEST_NAME, *, remedy: str = "write it again") -> dict[str, Any]:
    """The manifest of ``directory`` as a dict; ``FreeMergeError`` naming it when it is missing, not valid JSON
    or not a JSON object (``remedy`` appended)."""
    path = Path(directory) / manifest_name
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FreeMergeError(f"{path} does not exist; {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FreeMergeError(f"{path} is damaged (not valid JSON: {err}); {remedy}") from None
    if not isinstance(manifest, dict):
        raise FreeMergeError(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object); {remedy}")
    return manifest


def _tree(directory: Path, skip: str | None = None) -> set[str]:
    """Relative posix paths of every file under ``directory`` (``skip``: a top-level name left out)."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if not p.is_dir() and p.relative_to(directory).as_posix() != skip}


def is_own_export(directory, manifest_name: str = MANIFEST_NAME) -> bool:
    """Whether ``directory`` is a directory this package published: its manifest lists files and the directory
    holds nothing it does not list (or, written before manifests had ``files``, a manifest with ``method`` and
    only file names an export uses)."""
    try:
        manifest = read_manifest(directory, manifest_name)
    except FreeMergeError:
        return False
    present = _tree(Path(directory), manifest_name)
    if isinstance(manifest.get("files"), dict):
        return present <= set(manifest["files"])
    return "method" in manifest and all(_LEGACY_EXPORT_FILE.fullmatch(n) for n in present)


# ------------------------------------------------------------------------------------------ publishing
def staging_dir(dest) -> Path:
    """The hidden sibling ``.<name>.partial`` in which ``dest`` is built before it is published."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.partial"


def _old_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def check_output_dir(dest, *, overwrite: bool = False, replace_export: bool = True,
                     manifest_name: str = MANIFEST_NAME) -> None:
    """Raise ConfigError unless ``dest`` may be (re)placed: it is absent or empty, or ``overwrite`` is set, or
    ``replace_export`` is set and it holds a previous export of ours (``is_own_export``). Never replaces the
    current working directory, one above it, or the home directory."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise ConfigError(f"output path {dest} exists and is not a directory; choose another output directory")
    if not any(dest.iterdir()):
        return
    here = Path.cwd().resolve()
    if dest.resolve() in (here, *here.parents, Path.home().resolve()):
        raise ConfigError(f"output directory {dest} is the working directory, one above it or the home "
                          f"directory; an export replaces its output directory whole, choose a new one")
    ours = is_own_export(dest, manifest_name)
    if overwrite or (ours and replace_export):
        return
    why = ("it holds a previous export" if ours else
           f"it is not empty and is not an export of freemerge_pl (no {manifest_name} listing its files)")
    raise ConfigError(f"output directory {dest} already exists; pass --overwrite to replace it whole "
                      f"(overwrite=True in Python): {why}")


@contextmanager
def staged_directory(dest, *, overwrite: bool = False, replace_export: bool = True,
                     manifest_name: str = MANIFEST_NAME) -> Iterator[Path]:
    """A fresh, empty staging directory (``staging_dir(dest)``) to build ``dest`` in; publish it with
    ``publish_directory`` inside the block. The block runs under ``output_lock(dest)`` (another process writing
    ``dest`` is refused with ``OutputLockedError``), ``dest`` is checked first (``check_output_dir``); if the
    block raises, the staging directory is removed and ``dest`` is untouched. A staging directory left by a
    killed process is discarded at the next start (a resumable build takes ``output_lock`` itself and calls
    ``publish_directory`` alone)."""
    dest = Path(dest)
    with output_lock(dest):
        check_output_dir(dest, overwrite=overwrite, replace_export=replace_export, manifest_name=manifest_name)
        staging = staging_dir(dest)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _relative(staging: Path, f: str | Path) -> str:
    """``f`` relative to ``staging``: an absolute path or one spelled through ``staging`` (a relative staging
    directory's files, e.g. ``.out.partial/model.safetensors``) is made relative; others already are."""
    p = Path(f)
    if p.is_absolute():
        return Path(os.path.relpath(p, os.path.abspath(staging))).as_posix()
    if p.parts[:len(staging.parts)] == staging.parts:
        return Path(*p.parts[len(staging.parts):]).as_posix()
    return p.as_posix()


def _prune(staging: Path, keep: set[str] | None, manifest_name: str) -> list[str]:
    """Remove from ``staging`` the manifest and every file not in ``keep`` (None: keep all), then empty
    directories; a symlink or special file is an error. Returns the files left, relative paths sorted."""
    left = []
    for entry in sorted(staging.rglob("*"), reverse=True):  # children before their directory
        rel = entry.relative_to(staging).as_posix()
        plain = not entry.is_symlink() and (entry.is_file() or entry.is_dir())
        if plain and entry.is_dir():
            if not any(entry.iterdir()):
                entry.rmdir()
        elif rel == manifest_name or (keep is not None and rel not in keep):
            entry.unlink()
        elif not plain:
            raise FreeMergeError(f"{entry} is not a plain file; a published directory holds files only")
        else:
            left.append(rel)
    return sorted(left)


def publish_directory(staging, dest, record: Mapping[str, Any], *, files: Iterable[str | Path] | None = None,
                      overwrite: bool = False, replace_export: bool = True,
                      manifest_name: str = MANIFEST_NAME, digests: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Publish the finished ``staging`` directory as ``dest``, whole; returns the manifest written.

    1. Every file of ``staging`` not named in ``files`` (paths inside ``staging``, absolute or relative) is
       removed (leftovers of an interrupted run with other settings); ``files=None`` keeps every file. A
       listed file that is absent is an error.
    2. The manifest ``{**record, "files": {relative path: {"bytes", "sha256"}}}`` (every file left; a ``files``
       table ``record`` already holds is kept) is written last; ``digests`` (relative path → sha256 of a file
       hashed while it was written) spares reading those files again.
    3. ``dest`` is checked again (``check_output_dir``), moved aside to ``.<name>.old`` if it exists, the staging
       directory is renamed to ``dest`` and the old one removed (put back if that rename fails). Nothing ever
       mixes files of two exports: a kill before the renames leaves the previous ``dest`` byte-identical; a
       kill between them leaves no ``dest`` (the previous one in ``.<name>.old``, the new one complete in the
       staging directory), which readers report (``verify_published``).
    """
    staging, dest = Path(staging), Path(dest)
    keep = None if files is None else {_relative(staging, f) for f in files}
    names = _prune(staging, keep, manifest_name)
    missing = sorted((keep or set()) - set(names))
    if missing:
        raise FreeMergeError(f"{staging}: file(s) {missing} to publish are missing")
    table = record.get("files")
    manifest = {**record, "files": table if isinstance(table, Mapping) else file_records(staging, names, digests)}
    write_json_atomic(manifest, staging / manifest_name)
    check_output_dir(dest, overwrite=overwrite, replace_export=replace_export, manifest_name=manifest_name)
    old = _old_dir(dest)
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except BaseException:
        if old.exists() and not dest.exists():  # put the previous export back
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def verify_published(path, *, manifest_name: str = MANIFEST_NAME, remedy: str = "export again",
                     names: Iterable[str] | None = None, what: str = "export") -> dict[str, Any]:
    """The manifest of the directory ``publish_directory`` published at ``path``, after checking that it is
    complete (not only a staging or moved-aside directory), that every file its manifest lists is present with
    the listed size and sha256 (``names``: only those) and that it holds no file the manifest does not list;
    ``FreeMergeError`` naming the file otherwise (``remedy`` appended)."""
    path = Path(path)
    if not path.is_dir():
        partial, old = staging_dir(path), _old_dir(path)
        if old.exists():
            raise FreeMergeError(f"{what} {path} is missing: it was being replaced when the process stopped; the "
                                 f"previous one is in {old}, the new one in {partial}")
        if partial.exists():
            raise FreeMergeError(f"{what} {path} is incomplete: only {partial} exists (its write was interrupted); "
                                 f"{remedy}")
        raise FreeMergeError(f"{what} directory {path} does not exist")
    manifest_path = path / manifest_name
    if not manifest_path.is_file():
        raise FreeMergeError(f"{manifest_path} is missing: {path} is not a complete {what} (the manifest is "
                             f"written last)")
    manifest = read_manifest(path, manifest_name, remedy=remedy)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FreeMergeError(f"{manifest_path} lists no files (written before manifests listed their files with "
                             f"sha256); {remedy}")
    for name in files:
        parts = Path(name).parts if isinstance(name, str) else ("..",)
        if not parts or Path(name).is_absolute() or any(p == ".." or p.startswith(".") for p in parts):
            raise FreeMergeError(f"{manifest_path} lists {name!r}, which is not a file of the {what}")
    verify_manifest(path, files, remedy=remedy, names=names)
    unlisted = sorted(_tree(path, manifest_name) - set(files))
    if unlisted:
        raise FreeMergeError(f"{path / unlisted[0]} is not listed in {manifest_path} (unlisted: {unlisted}): the "
                             f"directory holds files of another {what} or was changed; {remedy}")
    return manifest
