"""Persistence: files written whole, checkpoints, the streaming sink and the export format.

- ``freemerge_pl.io.files``: atomic file writes, sha256, and the one publish (staged directory → rename) /
  manifest / verify used by exports, the merge job and both zoos (its docstring documents the API).
- ``freemerge_pl.io.lock``: ``output_lock(dest)``, one writer per output directory (``OutputLockedError``
  for a second process; a killed run's lock is taken over).
- ``freemerge_pl.io.safetensors_file``: the safetensors format (header reading, deterministic writes).
- ``freemerge_pl.io.checkpoints``: ``load_state_dict``/``save_state_dict`` and lazy sources
  (``open_checkpoint``: ``SafetensorsSource``, ``TorchFileSource``, ``PickledModuleSource`` on request).
- ``freemerge_pl.io.sink``: ``ShardedSafetensorsSink``, a sharded HF checkpoint streamed to disk, resumable.
- ``freemerge_pl.io.export``: the export format, one writer (``write_export``/``save_merge``) and one reader
  (``read_export``; ``freemerge_pl.load_merged`` builds a module on top).

Imports only ``freemerge_pl.merging`` and the base modules.
"""

from freemerge_pl.io.checkpoints import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    PickledModuleSource,
    PickledObjectsError,
    SafetensorsSource,
    TorchFileSource,
    load_state_dict,
    open_checkpoint,
    read_pickled_state_dict,
    read_weight_map,
    save_state_dict,
    shard_names,
    shard_plan,
)
from freemerge_pl.io.export import (
    MergedExport,
    read_export,
    read_task_module,
    read_task_modules,
    save_merge,
    save_task_module,
    save_task_modules,
    verify_export,
    write_export,
)
from freemerge_pl.io.files import (
    MANIFEST_NAME,
    ZOO_MANIFEST_NAME,
    atomic_write,
    cached_sha256,
    check_output_dir,
    file_records,
    file_signature,
    is_own_export,
    publish_directory,
    read_manifest,
    sha256_file,
    staged_directory,
    staging_dir,
    verify_manifest,
    verify_published,
    write_json_atomic,
    write_text_atomic,
)
from freemerge_pl.io.lock import OutputLockedError, lock_path, output_lock
from freemerge_pl.io.safetensors_file import (
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    read_safetensors_header,
    safetensors_prefix,
    save_safetensors_atomic,
    write_safetensors,
)
from freemerge_pl.io.sink import JOURNAL_NAME, ShardedSafetensorsSink

__all__ = [
    "DEFAULT_SHARD_BYTES", "INDEX_NAME", "JOURNAL_NAME", "MANIFEST_NAME", "SAFETENSORS_DTYPES", "SINGLE_NAME",
    "ZOO_MANIFEST_NAME",
    "MergedExport", "OutputLockedError", "PickledModuleSource", "PickledObjectsError", "SafetensorsSource",
    "ShardedSafetensorsSink", "TorchFileSource", "atomic_write", "cached_sha256",
    "check_output_dir", "file_records", "file_signature", "is_own_export", "load_state_dict", "lock_path",
    "open_checkpoint", "output_lock", "publish_directory", "read_export", "read_manifest",
    "read_pickled_state_dict", "read_safetensors_header", "read_task_module", "read_task_modules",
    "read_weight_map", "safetensors_prefix", "save_merge", "save_safetensors_atomic", "save_state_dict",
    "save_task_module", "save_task_modules", "sha256_file", "shard_names", "shard_plan", "staged_directory",
    "staging_dir", "verify_export", "verify_manifest", "verify_published", "write_export", "write_json_atomic",
    "write_safetensors", "write_text_atomic",
]
