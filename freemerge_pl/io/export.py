"""The export format: one writer (``write_export``), one reader (``read_export``).

An export (``save_merge``, ``MergedModule.export``, the checkpoint merge job) is a directory published whole
(``freemerge_pl.io.files``) holding the backbone (``model.safetensors`` or HF shards plus their index), one
``task_module_<k>.safetensors`` per task, ``shared_<name>.safetensors`` per shared module, optional extra
files (``heads.safetensors``, ``router.safetensors``) and, written last, the manifest ``merge_info.json``: the
merge record, ``task_module_files`` and ``files`` (every file with its size and sha256).

A task-module file holds the module's ``to_tensors()`` and, as metadata, its class name (``type``) and its
``get_extra_state()`` as JSON (``extra_state``); ``read_task_module`` rebuilds it with the class's
``from_tensors(tensors, extra)``, looked up by that name in ``TASK_MODULE_TYPES``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io.checkpoints import DEFAULT_SHARD_BYTES, INDEX_NAME, read_weight_map, save_state_dict
from freemerge_pl.io.files import (
    MANIFEST_NAME,
    publish_directory,
    sha256_file,
    staged_directory,
    verify_published,
)
from freemerge_pl.io.safetensors_file import SINGLE_NAME, read_safetensors_header, save_safetensors_atomic
from freemerge_pl.merging.base import StateDict, resolve_tensor
from freemerge_pl.merging.experts import SparseExpert
from freemerge_pl.merging.merge import MergeOutput
from freemerge_pl.merging.methods.emr import EMRTaskModule, EMRUnified
from freemerge_pl.merging.methods.reference import FinetunedWeights
from freemerge_pl.merging.methods.twin import LowRankTaskModule

HEADS_FILE = "heads.safetensors"
ROUTER_FILE = "router.safetensors"
_TASK_MODULE_FILE = re.compile(r"task_module_(\d+)\.safetensors")
_SHARED_FILE = re.compile(r"shared_(\w+)\.safetensors")
#: the rebuild registry: class name (a task-module file's ``type`` metadata) -> class with ``from_tensors``
TASK_MODULE_TYPES: dict[str, type] = {c.__name__: c for c in (SparseExpert, EMRUnified, EMRTaskModule,
                                                              LowRankTaskModule, FinetunedWeights)}


def task_module_file(k: int) -> str:
    return f"task_module_{k:02d}.safetensors"


# ------------------------------------------------------------------------------------------ writing
def task_module_metadata(module: nn.Module) -> dict[str, str]:
    """The safetensors metadata that, with ``module.to_tensors()``, rebuilds ``module``: its class name and, as
    JSON, its ``get_extra_state()`` (tensor keys, shapes, kinds) when it defines one."""
    meta = {"type": type(module).__name__}
    if type(module).get_extra_state is not nn.Module.get_extra_state:
        meta["extra_state"] = json.dumps(module.get_extra_state(), sort_keys=True)
    return meta


def save_task_module(module: nn.Module, path, metadata: dict[str, str] | None = None) -> Path:
    """Write one task (or shared) module as safetensors, atomically: ``to_tensors()`` plus its metadata."""
    meta = {**(metadata or {}), **task_module_metadata(module)}
    return save_safetensors_atomic(module.to_tensors(), path, metadata=meta)


def save_task_modules(task_modules, shared_modules, directory, *, names=None, method: str = "") -> list[Path]:
    """Write ``task_module_<k>.safetensors`` per task and ``shared_<name>.safetensors`` (the metadata names the
    task, the method and what ``read_task_module`` needs to rebuild the module). Returns the files written."""
    directory = Path(directory)
    written = []
    for k, module in enumerate(task_modules):
        meta = {"task_index": str(k), "method": method, **({"task": str(names[k])} if names else {})}
        written.append(save_task_module(module, directory / task_module_file(k), meta))
    for name, module in (shared_modules or {}).items():
        written.append(save_task_module(module, directory / f"shared_{name}.safetensors",
                                        {"name": name, "method": method}))
    return written


def write_export(directory, state_dict: StateDict, task_modules, shared_modules, record: dict[str, Any], *,
                 names: Sequence[str] | None, method: str, inputs: Sequence[str | Path] = (),
                 extra_files: dict[str, StateDict] | None = None, max_shard_bytes: int | None = None,
                 overwrite: bool = False) -> list[Path]:
    """The one export writer (``save_merge``, ``MergedModule.export``): task modules, ``extra_files`` (name →
    tensors: heads, router), the backbone (sharded when large) and, last, the manifest ``merge_info.json``:
    ``record``, the inputs' sha256, ``task_module_files`` and ``files`` (every file: bytes, sha256).

    Everything is written into ``.<name>.partial`` beside ``directory`` and renamed into place whole
    (``staged_directory`` / ``publish_directory``): a previous export of ours there is replaced whole (none of
    its files survive), any other non-empty directory is refused unless ``overwrite``; an error or a kill
    midway leaves the previous export byte-identical. Returns the published files' paths.
    """
    directory = Path(directory)
    record = dict(record)
    record["inputs"] = [{"path": str(p), "sha256": sha256_file(p) if Path(p).is_file() else None}
                        for p in inputs]
    with staged_directory(directory, overwrite=overwrite) as staging:
        written = save_task_modules(task_modules, shared_modules, staging, names=names, method=method)
        record["task_module_files"] = [p.name for p in written]
        for name, tensors in (extra_files or {}).items():
            written.append(save_safetensors_atomic(tensors, staging / name))
        written += save_state_dict(state_dict, staging, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
        publish_directory(staging, directory, record, files=written, overwrite=overwrite)
    return [directory / p.name for p in written] + [directory / MANIFEST_NAME]


def save_merge(output: MergeOutput, directory, *, inputs: Sequence[str | Path] = (),
               max_shard_bytes: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write a ``merge()`` output with ``write_export``: the backbone (sharded when large), each task module,
    and ``merge_info.json`` (inputs + sha256, every file with its size and sha256)."""
    return write_export(directory, output.state_dict, output.task_modules or [], output.result.shared_modules,
                        output.record, names=output.record.get("names"), method=output.method, inputs=inputs,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)


# ------------------------------------------------------------------------------------------ reading
def read_task_module(path, shared: dict[str, nn.Module] | None = None) -> nn.Module:
    """The task (or shared) module a ``save_task_module`` file holds, rebuilt as the class that wrote it
    (``TASK_MODULE_TYPES``); an ``EMRTaskModule`` is bound to ``shared["emr_unified"]``. Files without a
    ``type`` (``SparseExpert.save`` before this layout) holding ``<key>::indices`` load as a SparseExpert."""
    path = Path(path)
    meta = read_safetensors_header(path)[0]
    tensors = load_file(str(path))
    kind = meta.get("type") or ("SparseExpert" if any(k.endswith("::indices") for k in tensors) else None)
    cls = TASK_MODULE_TYPES.get(kind)
    if cls is None:
        raise FreeMergeError(f"{path}: cannot rebuild the task module (type {kind!r} missing or unsupported; "
                             f"rebuildable types: {sorted(TASK_MODULE_TYPES)})")
    extra = json.loads(meta["extra_state"]) if "extra_state" in meta else None
    if extra is None and cls is not SparseExpert:  # a SparseExpert without it: flat indices (older files)
        raise FreeMergeError(f"{path}: the file lacks the metadata to rebuild a {kind} (no extra_state); export "
                             f"again with this version")
    try:
        module = cls.from_tensors(tensors, extra)
    except (KeyError, CheckpointMismatchError) as err:  # a missing tensor, an index stream that does not match
        raise FreeMergeError(f"{path}: cannot rebuild the {kind} (entry {err} missing or unsupported)") from None
    if isinstance(module, EMRTaskModule):
        module.bind((shared or {}).get("emr_unified"))
    return module


@dataclass
class MergedExport:
    """A verified export: the backbone state dict, the task modules (one per task, rebuilt as the classes that
    wrote them and ready to ``apply_``), shared modules, heads (``<task>.<param>``) and router weights (None
    when the export has none) and the manifest. ``freemerge_pl.load_merged(path, adapter)`` builds a
    ``MergedModule`` from it."""

    path: Path
    manifest: dict[str, Any]
    state_dict: dict[str, Tensor]
    task_names: list[str]
    task_modules: list[nn.Module] = field(default_factory=list)
    shared_modules: dict[str, nn.Module] = field(default_factory=dict)
    heads: dict[str, Tensor] | None = None
    router: dict[str, Tensor] | None = None


def verify_export(path) -> dict[str, Any]:
    """The manifest of the export at ``path``, after checking that every file it lists is present with the
    listed size and sha256 and that the directory holds no file it does not list (FreeMergeError otherwise,
    naming the file)."""
    return verify_published(path, manifest_name=MANIFEST_NAME, remedy="export again", what="export")


def _read_modules(path: Path, manifest: dict[str, Any]) -> tuple[list[str], list[nn.Module], dict[str, nn.Module]]:
    """Task names, task modules (in task order) and shared modules of a verified export."""
    files = manifest["files"]
    shared = {m.group(1): read_task_module(path / n, {}) for n in sorted(files) if (m := _SHARED_FILE.fullmatch(n))}
    indexed = sorted((int(m.group(1)), n) for n in files if (m := _TASK_MODULE_FILE.fullmatch(n)))
    if [k for k, _ in indexed] != list(range(len(indexed))):
        raise FreeMergeError(f"{path}: task module files {[n for _, n in indexed]} are not numbered 0..K-1")
    modules = [read_task_module(path / n, shared) for _, n in indexed]
    task_names = manifest.get("task_names") or manifest.get("names")
    if task_names is None:
        names = [read_safetensors_header(path / n)[0].get("task") for _, n in indexed]
        task_names = names if all(names) else [f"task{k}" for k in range(len(modules))]
    if modules and len(task_names) != len(modules):
        raise FreeMergeError(f"{path / MANIFEST_NAME} names {len(task_names)} tasks but the export holds "
                             f"{len(modules)} task module files")
    return list(task_names), modules, shared


def read_export(path) -> MergedExport:
    """Verify the export at ``path`` (``verify_export``) and read every part of it that its manifest lists.
    Exports of earlier versions (a merge job's ``task_modules.json`` beside its files) read the same."""
    path = Path(path)
    manifest = verify_export(path)
    files = set(manifest["files"])
    task_names, modules, shared = _read_modules(path, manifest)
    return MergedExport(path, manifest, _read_backbone(path, files), task_names, modules, shared,
                        _read_optional(path, files, HEADS_FILE), _read_optional(path, files, ROUTER_FILE))


def read_task_modules(path, task_names: Sequence[str], backbone: nn.Module | StateDict | None = None
                      ) -> tuple[list[nn.Module], dict[str, nn.Module]]:
    """The task modules and shared modules of the export (or merge-job output) at ``path``, verified against its
    manifest, for tasks ``task_names`` (same names, same order); with ``backbone``, every key a module changes
    must be one of its tensors. ``ConfigError`` naming the directory otherwise."""
    path = Path(path)
    names, modules, shared = _read_modules(path, verify_export(path))
    if not modules:
        raise ConfigError(f"{path} holds no task modules: the merge wrote none")
    if names != list(task_names):
        raise ConfigError(f"{path}: task modules for {names}, but this module's tasks are {list(task_names)} "
                          f"(same names, same order)")
    for name, module in zip(names, modules) if backbone is not None else ():
        for key in module.keys:
            try:
                resolve_tensor(backbone, key)
            except KeyError as err:
                raise ConfigError(f"{path}: the expert of task {name!r} changes {key!r}, which the backbone does "
                                  f"not have") from err
    return modules, shared


def _read_backbone(path: Path, files: set[str]) -> dict[str, Tensor]:
    if INDEX_NAME in files:
        shards = list(dict.fromkeys(read_weight_map(path / INDEX_NAME).values()))
        unlisted = [s for s in shards if s not in files]
        if unlisted:
            raise FreeMergeError(f"{path / INDEX_NAME} names shard(s) {unlisted} that {path / MANIFEST_NAME} does "
                                 f"not list")
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path / shard)))
        return out
    if SINGLE_NAME not in files:
        raise FreeMergeError(f"{path / MANIFEST_NAME} lists neither {SINGLE_NAME} nor {INDEX_NAME}: no backbone")
    return load_file(str(path / SINGLE_NAME))


def _read_optional(path: Path, files: set[str], name: str) -> dict[str, Tensor] | None:
    return load_file(str(path / name)) if name in files else None


__all__ = ["HEADS_FILE", "ROUTER_FILE", "TASK_MODULE_TYPES", "MergedExport", "read_export", "read_task_module",
           "read_task_modules", "save_merge", "save_task_module", "save_task_modules", "task_module_file",
           "task_module_metadata", "verify_export", "write_export"]
