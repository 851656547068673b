"""Load a published merge back as a ready ``MergedModule``: ``freemerge_pl.load_merged``.

The export format, its one writer and its one reader live in ``freemerge_pl.io.export``: an export is a
directory published whole with ``merge_info.json`` written last, whose ``files`` entry lists every file with
its size and sha256; ``read_export`` checks all of them before any tensor is read (a missing, truncated or
changed file, a file the manifest does not list and an export never completed are errors naming the file).
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any

from freemerge_pl.errors import ConfigError, FreeMergeError
from freemerge_pl.io.export import (
    HEADS_FILE,
    ROUTER_FILE,
    MergedExport,
    read_export,
    read_task_module,
    verify_export,
)
from freemerge_pl.io.files import MANIFEST_NAME

#: settings earlier versions saved with an export and this one no longer has, with the value this version
#: behaves as (a saved value equal to it is dropped; any other value is refused: the export needs that version)
REMOVED_SETTINGS: dict[str, Any] = {
    "expert_path": None, "auto_fit_router": None, "metric_suffix": None,  # no effect on the loaded numbers
    "router.split_block": 3, "router.pool_size": 8, "router.weight_decay": 1e-4, "router.batch_size": 64,
    "router.seed": 0, "router.ncm_temperature": 0.05, "router.fallback_threshold": 0.0, "router.fallback": "none",
    "router.prefix_pool": "class_token", "router.shared_prefix": False,
}


def drop_removed_settings(saved: dict[str, Any], where: str) -> dict[str, Any]:
    """``saved`` without the settings of ``REMOVED_SETTINGS``; one that was set to another value is an error
    naming it (loading would silently change what the export computes)."""
    saved = dict(saved)
    router = dict(saved["router"]) if isinstance(saved.get("router"), dict) else None
    for name, same in REMOVED_SETTINGS.items():
        scope, key = (router, name[len("router."):]) if name.startswith("router.") else (saved, name)
        if scope is None or key not in scope:
            continue
        value = scope.pop(key)
        if same is not None and value != same:
            raise ConfigError(f"{where} was written with model.{name}={value!r}, a setting this version no longer "
                              f"has (it behaves as {same!r}); load it with the version that wrote it")
    if router is not None:
        if router.get("head") == "ncm":
            raise ConfigError(f"{where} was written with model.router.head='ncm', which this version no longer "
                              f"has; load it with the version that wrote it")
        saved["router"] = router
    return saved


def legacy_auto_source(adapter: ModelAdapter) -> str:
    """The router feature source ``auto`` meant before exports recorded the resolved one (exports written since
    record it, so a saved ``auto`` comes from an earlier version): token ids → the whole merged backbone, images →
    its first ``SPLIT_BLOCK`` blocks (the whole backbone when it is no deeper, or without ``prefix_features``),
    other inputs → ``input``. The exported router's weights were trained on those features. The depth is read
    from the backbone's architecture built on the meta device (no weights allocated, initialised or read)."""
    import torch

    from freemerge_pl.adapters.base import has_prefix_features
    from freemerge_pl.lightning.router import SPLIT_BLOCK

    kind = getattr(adapter, "input_kind", "other")
    if kind == "tokens":
        return "backbone"
    if kind != "image":
        return "input"
    if not has_prefix_features(adapter):
        return "backbone"
    with torch.device("meta"):
        architecture = adapter.build_backbone()
    depth = adapter.backbone_depth(architecture)
    return "backbone" if depth is not None and depth <= SPLIT_BLOCK else "backbone_prefix"


if TYPE_CHECKING:
    from freemerge_pl.adapters.base import ModelAdapter
    from freemerge_pl.lightning.module import MergedModule


def describe_adapter(record: dict[str, Any] | None) -> str:
    """``module.Class(init args as JSON)`` of an adapter record (``ModelAdapter.adapter_record``)."""
    if record is None:
        return "an adapter that records no class path and arguments"
    return f"{record.get('class_path')}({json.dumps(record.get('init_args'), sort_keys=True)})"


def adapter_from_record(record: dict[str, Any], where: str) -> ModelAdapter:
    """The adapter an export's ``module.adapter`` names, built with its recorded ``init_args``; the class must be
    a ``ModelAdapter`` subclass (anything else is refused, not called)."""
    from freemerge_pl.adapters.base import ModelAdapter

    path = str(record.get("class_path") or "")
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}: the export's adapter module.adapter.class_path={path!r} cannot be imported "
                          f"({err}); pass the adapter: load_merged(path, adapter)") from None
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise ConfigError(f"{where}: module.adapter.class_path={path!r} is no ModelAdapter subclass; refused")
    try:
        return cls(**(record.get("init_args") or {}))
    except TypeError as err:
        raise ConfigError(f"{where}: cannot rebuild the adapter {describe_adapter(record)}: {err}") from None


def module_from_export(export: MergedExport, adapter: ModelAdapter, **module_args: Any) -> MergedModule:
    """A ``MergedModule`` (eval mode) holding ``export``, built from ``adapter`` without merging;
    ``module_args`` override the exported module settings (e.g. ``routing="oracle"``). An export that records
    its adapter (``module.adapter``) accepts only that one: another class or other arguments are a
    ``ConfigError`` naming both."""
    from freemerge_pl.lightning.module import MergedModule, state_digest
    from freemerge_pl.lightning.router import RouterConfig

    m = export.manifest
    saved = drop_removed_settings(m.get("module") or {}, str(export.path / MANIFEST_NAME))
    recorded = saved.pop("adapter", None)
    if recorded is not None and adapter.adapter_record() != recorded:
        raise ConfigError(f"{export.path / MANIFEST_NAME} was exported with the adapter {describe_adapter(recorded)}, "
                          f"but load_merged got {describe_adapter(adapter.adapter_record())}: pass the same "
                          f"adapter, or none (load_merged(path) rebuilds the recorded one)")
    router_in = saved.pop("router_in_features", None)
    if router_in is None and export.router is not None and "mlp.0.weight" in export.router:
        router_in = int(export.router["mlp.0.weight"].shape[0])
    if router_in is None and export.task_modules:  # without task modules there is no router to size
        raise ConfigError(f"{export.path / MANIFEST_NAME} does not record the router's input width (written by "
                          f"save_merge or a merge job, not MergedModule.export): use load_merged(path) without "
                          f"an adapter, or MergedModule.load_task_modules(path) on a built module")
    if list(adapter.task_names) != export.task_names:
        raise ConfigError(f"{export.path}: the export holds tasks {export.task_names}, the adapter "
                          f"{list(adapter.task_names)} (same names, same order)")
    if isinstance(saved.get("router"), dict):
        if saved["router"].get("feature_source") == "auto":  # an earlier version's export: its meaning then
            saved["router"] = {**saved["router"], "feature_source": legacy_auto_source(adapter)}
        saved["router"] = RouterConfig(**saved["router"])
    saved.setdefault("method_args", m.get("hyperparameters"))
    saved.setdefault("fr_filter_ratio", m.get("fr_filter_ratio", 0.0))
    saved.setdefault("merge_seed", m.get("seed", 0))
    module = MergedModule(adapter, method=m["method"], **{**saved, **module_args})
    module.load_merge(export.state_dict, export.task_modules, export.shared_modules, heads=export.heads,
                      router=export.router, router_in_features=router_in)
    if m.get("backbone_digest") and state_digest(module.backbone) != m["backbone_digest"]:
        raise FreeMergeError(f"{export.path}: the backbone built by {type(adapter).__name__} with the exported "
                             f"weights does not reproduce the exported backbone digest")
    module.merge_record = {k: v for k, v in m.items() if k != "files"}
    return module.eval()


def load_merged(path, adapter: ModelAdapter | None = None, **module_args: Any) -> MergedExport | MergedModule:
    """Load the export at ``path`` after verifying it against its manifest (every listed file present with its
    size and sha256, no unlisted file, the export complete); errors name the file at fault.

    An export written by ``MergedModule.export`` / ``cli.py export`` records the adapter it was built with
    (``module.adapter``: class path and init args). For it, ``load_merged(path)`` returns a ready
    ``MergedModule`` in eval mode built from that adapter (rebuilt without being told: it reads the
    checkpoints, e.g. the zoo, the export came from and no other), without merging, whose router (when the
    export has a trained one) routes as the exported module's did; ``module_args`` override its settings
    (e.g. ``routing="oracle"``). Passing ``adapter`` is optional there, and one of another class or with
    other arguments is a ``ConfigError`` naming both.

    Exports that record no adapter (``save_merge``, the merge job, earlier versions) return a ``MergedExport``
    (backbone state dict, task modules, shared modules, heads, router weights, manifest) without
    ``adapter``, and a ``MergedModule`` with it::

        from freemerge_pl import load_merged

        model = load_merged("merged")                      # written by MergedModule.export / cli.py export
        features, task_ids = model(x)                      # routes x, applies each sample's task module
        logits = model.head_outputs(features[task_ids == 0], 0)
        # or evaluate it: FreeMergeTrainer(...).test(model, datamodule=dm)
    """
    export = read_export(path)
    recorded = (export.manifest.get("module") or {}).get("adapter")
    if adapter is None and recorded is not None:
        adapter = adapter_from_record(recorded, str(export.path / MANIFEST_NAME))
    return export if adapter is None else module_from_export(export, adapter, **module_args)


__all__ = ["HEADS_FILE", "REMOVED_SETTINGS", "ROUTER_FILE", "MergedExport", "adapter_from_record", "describe_adapter",
           "drop_removed_settings", "legacy_auto_source", "load_merged", "module_from_export", "read_export",
           "read_task_module", "verify_export"]
