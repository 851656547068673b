"""Checkpoint reading and writing: safetensors, atomic (temp file + rename), sharded, with a JSON sidecar."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from freemerge_pl.errors import FreeMergeError

DEFAULT_SHARD_BYTES = 4 * 1024**3
INDEX_NAME = "model.safetensors.index.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp_path)`` then rename onto ``path``; on any error the temp file is removed."""
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


def save_safetensors_atomic(tensors: Mapping[str, Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file atomically (contiguous CPU copies; shared storage is fine)."""
    path = Path(path)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=dict(metadata or {})))
    return path


def write_json_atomic(obj: Any, path) -> Path:
    path = Path(path)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    _atomic_write(path, write)
    return path


def write_text_atomic(text: str, path) -> Path:
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def shard_plan(tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of keys into shards of at most ``max_shard_bytes`` each."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def save_state_dict(
    tensors: Mapping[str, Tensor],
    directory,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, Any] | None = None,
    sidecar_name: str = "merge_info.json",
) -> list[Path]:
    """Save a state dict under ``directory`` as ``model.safetensors`` (or shards plus the HF-style index)
    and a JSON sidecar with ``metadata``; every file is written atomically."""
    directory = Path(directory)
    plan = shard_plan(tensors, max_shard_bytes)
    written = []
    if len(plan) == 1:
        written.append(save_safetensors_atomic(tensors, directory / "model.safetensors"))
        (directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index would shadow the new file
    else:
        weight_map = {}
        for i, keys in enumerate(plan):
            name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            written.append(save_safetensors_atomic({k: tensors[k] for k in keys}, directory / name))
            weight_map.update({k: name for k in keys})
        total = sum(_nbytes(t) for t in tensors.values())
        written.append(write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map},
                                         directory / INDEX_NAME))
    if metadata is not None:
        written.append(write_json_atomic(dict(metadata), directory / sidecar_name))
    return written


def load_state_dict(path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a ``.safetensors`` file, a directory holding one or a sharded index, or a torch ``.pt/.bin``."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            out: dict[str, Tensor] = {}
            for name in dict.fromkeys(weight_map.values()):
                out.update(load_file(str(path / name), device=str(device)))
            return out
        single = path / "model.safetensors"
        if not single.exists():
            raise FreeMergeError(f"{path} holds neither model.safetensors nor {INDEX_NAME}")
        path = single
    if not path.exists():
        raise FreeMergeError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device=str(device))
    obj = torch.load(path, map_location=device, weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FreeMergeError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj
