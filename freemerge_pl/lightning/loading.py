"""Load a published merge back, trusting only what its manifest lists: ``freemerge_pl.load_merged``.

An export (``MergedModule.export``, ``save_merge``, ``cli.py merge``, the checkpoint merge job) is a
directory published whole with ``merge_info.json`` written last; its ``files`` entry lists every file with
its size and sha256. ``verify_export`` checks all of them before any tensor is read: a missing, truncated or
changed file, a file the manifest does not list (e.g. a task module of another export) and an export that
was never completed (only ``.<name>.partial`` exists) are errors naming the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.io import (
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_NAME,
    _read_weight_map,
    read_manifest,
    read_safetensors_header,
    staging_dir,
    verify_manifest,
)

if TYPE_CHECKING:
    from freemerge_pl.adapters.base import ModelAdapter
    from freemerge_pl.lightning.module import MergedModule

_TASK_MODULE_FILE = re.compile(r"task_module_(\d+)\.safetensors")
_SHARED_FILE = re.compile(r"shared_(\w+)\.safetensors")
HEADS_FILE = "heads.safetensors"
ROUTER_FILE = "router.safetensors"


def verify_export(path) -> dict[str, Any]:
    """The manifest of the export at ``path``, after checking that every file it lists is present with the
    listed size and sha256 and that the directory holds no file it does not list (FreeMergeError otherwise,
    naming the file)."""
    path = Path(path)
    if not path.is_dir():
        partial, old = staging_dir(path), path.parent / f".{path.name}.old"
        if old.exists():
            raise FreeMergeError(f"export {path} is missing: it was being replaced when the process stopped; the "
                                 f"previous export is in {old}, the new one in {partial}")
        if partial.exists():
            raise FreeMergeError(f"export {path} is incomplete: only {partial} exists (its write was interrupted); "
                                 f"export again")
        raise FreeMergeError(f"export directory {path} does not exist")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FreeMergeError(f"{manifest_path} is missing: {path} is not a complete export (the manifest is "
                             f"written last)")
    manifest = read_manifest(path)
    files = manifest.get("files") if manifest is not None else None
    if not isinstance(files, dict):
        raise FreeMergeError(f"{manifest_path} lists no files (unreadable, or written before exports listed "
                             f"their files with sha256); export again")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise FreeMergeError(f"{manifest_path} lists {name!r}, which is not a file name of the export")
    verify_manifest(path, files, remedy="export again")
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME and p.name not in files)
    if unlisted:
        raise FreeMergeError(f"{path / unlisted[0]} is not listed in {manifest_path} (unlisted: {unlisted}): the "
                             f"directory holds files of another export or was changed; export again")
    return manifest


@dataclass
class MergedExport:
    """A verified export: the backbone state dict, the task modules (one per task, rebuilt as the classes that
    wrote them and ready to ``apply_``), shared modules, heads (``<task>.<param>``) and router weights (None
    when the export has none) and the manifest."""

    path: Path
    manifest: dict[str, Any]
    state_dict: dict[str, Tensor]
    task_names: list[str]
    task_modules: list[nn.Module] = field(default_factory=list)
    shared_modules: dict[str, nn.Module] = field(default_factory=dict)
    heads: dict[str, Tensor] | None = None
    router: dict[str, Tensor] | None = None

    def to_module(self, adapter: ModelAdapter, **module_args: Any) -> MergedModule:
        """A ``MergedModule`` (eval mode) holding this export, built from ``adapter`` without merging;
        ``module_args`` override the exported module settings (e.g. ``routing="oracle"``)."""
        from freemerge_pl.lightning.module import MergedModule, state_digest
        from freemerge_pl.lightning.router import RouterConfig

        m = self.manifest
        saved = dict(m.get("module") or {})
        router_in = saved.pop("router_in_features", None)
        if router_in is None and self.router is not None and "mlp.0.weight" in self.router:
            router_in = int(self.router["mlp.0.weight"].shape[0])
        if router_in is None:
            raise ConfigError(f"{self.path / MANIFEST_NAME} does not record the router's input width (written by "
                              f"save_merge or a merge job, not MergedModule.export): use load_merged(path) without "
                              f"an adapter, or MergedModule.load_task_modules(path) on a built module")
        if list(adapter.task_names) != self.task_names:
            raise ConfigError(f"{self.path}: the export holds tasks {self.task_names}, the adapter "
                              f"{list(adapter.task_names)} (same names, same order)")
        if isinstance(saved.get("router"), dict):
            saved["router"] = RouterConfig(**saved["router"])
        saved.setdefault("method_args", m.get("hyperparameters"))
        saved.setdefault("fr_filter_ratio", m.get("fr_filter_ratio", 0.0))
        saved.setdefault("merge_seed", m.get("seed", 0))
        module = MergedModule(adapter, method=m["method"], **{**saved, **module_args})
        module.load_merge(self.state_dict, self.task_modules, self.shared_modules, heads=self.heads,
                          router=self.router, router_in_features=router_in)
        if m.get("backbone_digest") and state_digest(module.backbone) != m["backbone_digest"]:
            raise FreeMergeError(f"{self.path}: the backbone built by {type(adapter).__name__} with the exported "
                                 f"weights does not reproduce the exported backbone digest")
        module.merge_record = {k: v for k, v in m.items() if k != "files"}
        return module.eval()


def read_export(path) -> MergedExport:
    """Verify the export at ``path`` (``verify_export``) and read every part of it that its manifest lists."""
    path = Path(path)
    manifest = verify_export(path)
    files = set(manifest["files"])
    shared = {}
    for name in sorted(files):
        match = _SHARED_FILE.fullmatch(name)
        if match:
            shared[match.group(1)] = read_task_module(path / name, {})
    indexed = sorted((int(mt.group(1)), n) for n in files if (mt := _TASK_MODULE_FILE.fullmatch(n)))
    if [k for k, _ in indexed] != list(range(len(indexed))):
        raise FreeMergeError(f"{path}: task module files {[n for _, n in indexed]} are not numbered 0..K-1")
    modules, names = [], []
    for k, name in indexed:
        modules.append(read_task_module(path / name, shared))
        names.append(read_safetensors_header(path / name)[0].get("task"))
    task_names = manifest.get("task_names") or manifest.get("names")
    if task_names is None:
        task_names = names if all(names) else [f"task{k}" for k in range(len(modules))]
    if modules and len(task_names) != len(modules):
        raise FreeMergeError(f"{path / MANIFEST_NAME} names {len(task_names)} tasks but the export holds "
                             f"{len(modules)} task module files")
    return MergedExport(path, manifest, _read_backbone(path, files), list(task_names), modules, shared,
                        _read_optional(path, files, HEADS_FILE), _read_optional(path, files, ROUTER_FILE))


def _read_backbone(path: Path, files: set[str]) -> dict[str, Tensor]:
    if INDEX_NAME in files:
        shards = list(dict.fromkeys(_read_weight_map(path / INDEX_NAME).values()))
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


def read_task_module(path, shared: dict[str, nn.Module]) -> nn.Module:
    """The task (or shared) module a ``save_task_modules`` file holds, rebuilt as the class that wrote it
    (SparseExpert, EMRTaskModule bound to ``shared["emr_unified"]``, LowRankTaskModule, EMRUnified)."""
    path = Path(path)
    meta = read_safetensors_header(path)[0]
    kind = meta.get("type")
    tensors = load_file(str(path))
    extra = json.loads(meta["extra_state"]) if "extra_state" in meta else None
    try:
        return _REBUILD[kind](tensors, extra, shared)
    except KeyError as err:
        what = f"type {kind!r}" if kind not in _REBUILD else f"entry {err}"
        raise FreeMergeError(f"{path}: cannot rebuild the task module ({what} missing or unsupported; "
                             f"rebuildable types: {sorted(_REBUILD)})") from None
    except TypeError as err:  # extra_state absent where it is needed
        raise FreeMergeError(f"{path}: the file lacks the metadata to rebuild a {kind} ({err}); export again "
                             f"with this version") from None


def _sparse_expert(tensors, extra, shared):
    from freemerge_pl.merging.experts import SparseExpert

    try:  # extra None or without index codes: flat indices (files written before compact storage)
        return SparseExpert.from_state_dict(tensors, extra)
    except CheckpointMismatchError as err:  # an unknown index code, a stream that does not match its values
        raise KeyError(str(err)) from None  # read_task_module names the file


def _emr_unified(tensors, extra, shared):
    from freemerge_pl.merging.emr import EMRUnified

    return EMRUnified({k: tensors[f"tau_{j}"] for j, k in enumerate(extra["keys"])})


def _emr_task_module(tensors, extra, shared):
    from freemerge_pl.merging.emr import EMRTaskModule
    from freemerge_pl.merging.ops import unpackbits

    shapes = extra["shapes"]
    masks = {k: unpackbits(tensors[f"mask_{j}"], math.prod(shapes[k])).reshape(shapes[k])
             for j, k in enumerate(extra["keys"])}
    return EMRTaskModule(masks, float(tensors["rescaler"]), shared.get("emr_unified"))


def _low_rank(tensors, extra, shared):
    from freemerge_pl.merging.twin import LowRankTaskModule

    factors, dense = {}, {}
    for j, k in enumerate(extra["keys"]):
        if extra["kinds"][k] == "lowrank":
            factors[k] = (tensors[f"us_{j}"], tensors[f"vh_{j}"])
        else:
            dense[k] = tensors[f"dense_{j}"]
    module = LowRankTaskModule(factors, dense, {k: extra["shapes"][k] for k in factors})
    if module.keys != list(extra["keys"]):  # the constructor numbers low-rank keys first, as when saved
        raise KeyError(f"key order {extra['keys'][:3]}...")
    return module


_REBUILD = {"SparseExpert": _sparse_expert, "EMRUnified": _emr_unified, "EMRTaskModule": _emr_task_module,
            "LowRankTaskModule": _low_rank}


def load_merged(path, adapter: ModelAdapter | None = None, **module_args: Any) -> MergedExport | MergedModule:
    """Load the export at ``path`` after verifying it against its manifest (every listed file present with its
    size and sha256, no unlisted file, the export complete); errors name the file at fault.

    Without ``adapter``: a ``MergedExport`` (backbone state dict, task modules, shared modules, heads, router
    weights, manifest). With the adapter the export was made with: a ready ``MergedModule`` in eval mode,
    built without merging, whose router (when the export has a trained one) routes as the exported module's
    did; ``module_args`` override its settings (e.g. ``routing="oracle"``)::

        from freemerge_pl import load_merged
        from freemerge_pl.adapters.toy import ToyAdapter

        model = load_merged("merged", ToyAdapter("toy"))   # written by MergedModule.export / cli.py merge
        features, task_ids = model(x)                      # routes x, applies each sample's task module
        logits = model.head_outputs(features[task_ids == 0], 0)
        # or evaluate it: FreeMergeTrainer(...).test(model, datamodule=dm)
    """
    export = read_export(path)
    return export if adapter is None else export.to_module(adapter, **module_args)
