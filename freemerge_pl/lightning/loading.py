"""Load a published merge back as a ready ``MergedModule``: ``freemerge_pl.load_merged``.

The export format, its one writer and its one reader live in ``freemerge_pl.io.export``: an export is a
directory published whole with ``merge_info.json`` written last, whose ``files`` entry lists every file with
its size and sha256; ``read_export`` checks all of them before any tensor is read (a missing, truncated or
changed file, a file the manifest does not list and an export never completed are errors naming the file).
"""

from __future__ import annotations

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


if TYPE_CHECKING:
    from freemerge_pl.adapters.base import ModelAdapter
    from freemerge_pl.lightning.module import MergedModule


def module_from_export(export: MergedExport, adapter: ModelAdapter, **module_args: Any) -> MergedModule:
    """A ``MergedModule`` (eval mode) holding ``export``, built from ``adapter`` without merging;
    ``module_args`` override the exported module settings (e.g. ``routing="oracle"``)."""
    from freemerge_pl.lightning.module import MergedModule, state_digest
    from freemerge_pl.lightning.router import RouterConfig

    m = export.manifest
    saved = drop_removed_settings(m.get("module") or {}, str(export.path / MANIFEST_NAME))
    router_in = saved.pop("router_in_features", None)
    if router_in is None and export.router is not None and "mlp.0.weight" in export.router:
        router_in = int(export.router["mlp.0.weight"].shape[0])
    if router_in is None:
        raise ConfigError(f"{export.path / MANIFEST_NAME} does not record the router's input width (written by "
                          f"save_merge or a merge job, not MergedModule.export): use load_merged(path) without "
                          f"an adapter, or MergedModule.load_task_modules(path) on a built module")
    if list(adapter.task_names) != export.task_names:
        raise ConfigError(f"{export.path}: the export holds tasks {export.task_names}, the adapter "
                          f"{list(adapter.task_names)} (same names, same order)")
    if isinstance(saved.get("router"), dict):
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

    Without ``adapter``: a ``MergedExport`` (backbone state dict, task modules, shared modules, heads, router
    weights, manifest). With the adapter the export was made with: a ready ``MergedModule`` in eval mode,
    built without merging, whose router (when the export has a trained one) routes as the exported module's
    did; ``module_args`` override its settings (e.g. ``routing="oracle"``)::

        from freemerge_pl import load_merged
        from freemerge_pl.adapters.toy import ToyAdapter

        model = load_merged("merged", ToyAdapter("toy"))   # written by MergedModule.export / cli.py export
        features, task_ids = model(x)                      # routes x, applies each sample's task module
        logits = model.head_outputs(features[task_ids == 0], 0)
        # or evaluate it: FreeMergeTrainer(...).test(model, datamodule=dm)
    """
    export = read_export(path)
    return export if adapter is None else module_from_export(export, adapter, **module_args)


__all__ = ["HEADS_FILE", "REMOVED_SETTINGS", "ROUTER_FILE", "MergedExport", "drop_removed_settings", "load_merged", "module_from_export", "read_export",
           "read_task_module", "verify_export"]
