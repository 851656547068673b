"""Checkpoints: whole state dicts (``load_state_dict``/``save_state_dict``: one ``model.safetensors`` or
Hugging Face shards plus their index, or a torch ``.pt/.bin``) and lazy sources read one tensor at a time
(``open_checkpoint``: ``SafetensorsSource``, ``TorchFileSource``, ``PickledModuleSource`` on request)."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, FreeMergeError
from freemerge_pl.io.files import MANIFEST_NAME, write_json_atomic
from freemerge_pl.io.safetensors_file import (
    SINGLE_NAME,
    _Entry,
    _read_entry,
    load_safetensors,
    read_safetensors_header,
    save_safetensors_atomic,
)
from freemerge_pl.merging.source import TensorInfo, TensorSource

DEFAULT_SHARD_BYTES = 4 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def shard_plan(tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of keys into shards of at most ``max_shard_bytes`` each."""
    return greedy_split(((k, _nbytes(t)) for k, t in tensors.items()), max_shard_bytes)


def greedy_split(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """``shard_plan`` on ``(key, nbytes)`` pairs: a new shard starts when the next key would overflow."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, n in sizes:
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    """HF shard file names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def save_state_dict(
    tensors: Mapping[str, Tensor],
    directory,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, Any] | None = None,
    sidecar_name: str = MANIFEST_NAME,
) -> list[Path]:
    """Save a state dict under ``directory`` as ``model.safetensors`` (or shards plus the HF-style index)
    and a JSON sidecar with ``metadata``; every file is written atomically."""
    directory = Path(directory)
    plan = shard_plan(tensors, max_shard_bytes)
    written = []
    if len(plan) == 1:
        written.append(save_safetensors_atomic(tensors, directory / SINGLE_NAME))
        (directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index would shadow the new file
    else:
        weight_map = {}
        for name, keys in zip(shard_names(len(plan)), plan):
            written.append(save_safetensors_atomic({k: tensors[k] for k in keys}, directory / name))
            weight_map.update({k: name for k in keys})
        total = sum(_nbytes(t) for t in tensors.values())
        written.append(write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map},
                                         directory / INDEX_NAME))
    if metadata is not None:
        written.append(write_json_atomic(dict(metadata), directory / sidecar_name))
    return written


def load_state_dict(path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a ``.safetensors`` file, a directory holding one or a sharded index, or a torch ``.pt/.bin``.

    A file that cannot be read raises ``FreeMergeError`` naming it (damaged, truncated, not a checkpoint);
    one holding pickled objects raises ``PickledObjectsError`` (see ``read_pickled_state_dict``)."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            weight_map = read_weight_map(index)
            out: dict[str, Tensor] = {}
            for name in dict.fromkeys(weight_map.values()):
                out.update(load_safetensors(path / name, device))
            return out
        single = path / SINGLE_NAME
        if not single.exists():
            raise FreeMergeError(f"{path} holds neither model.safetensors nor {INDEX_NAME}")
        path = single
    if not path.exists():
        raise FreeMergeError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path, device)
    return dict(_unwrap_state_dict(path, _torch_load(path, map_location=device)))


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a Hugging Face sharded index, in file order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise FreeMergeError(f"sharded index {index} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FreeMergeError(f"sharded index {index}: weight_map must map tensor names to shard file names")
    return weight_map


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded HF index.

    Headers are parsed once here (keys: the index's ``weight_map`` order, then the file order; tensors a
    shard holds but the index omits come last, as ``load_state_dict`` reads them too). ``get`` maps one
    tensor's bytes privately (``safetensors_file._read_entry``: copy-on-write, no copy made, the mapping
    released with the tensor). Measured on a 1 GiB file of 16 fp32 [4096, 4096] tensors (64 MiB each), reading
    every tensor in turn and dropping it: peak RSS grew by 69 MiB this way, 67 MiB with plain file reads into
    fresh tensors (the previous reader: every byte copied, every page zero-filled first), by 131 MiB with
    ``safe_open`` + ``clone``, and by 1027 MiB (the whole file) with one ``safe_open`` handle kept open.
    """

    def __init__(self, path) -> None:
        path = Path(path)
        self.name = str(path)
        self._entries: dict[str, _Entry] = {}
        if path.is_dir():
            if (path / INDEX_NAME).exists():
                self._add_index(path / INDEX_NAME)
            elif (path / SINGLE_NAME).exists():
                self._entries.update(read_safetensors_header(path / SINGLE_NAME)[1])
            else:
                raise FreeMergeError(f"{path} holds neither {SINGLE_NAME} nor {INDEX_NAME}")
        else:
            self._entries.update(read_safetensors_header(path)[1])

    def _add_index(self, index: Path) -> None:
        weight_map = read_weight_map(index)
        shards: dict[str, dict[str, _Entry]] = {}
        for shard in dict.fromkeys(weight_map.values()):
            if not (index.parent / shard).is_file():
                raise FreeMergeError(f"sharded index {index} lists shard {shard!r}, which does not exist "
                                     f"({index.parent / shard})")
            shards[shard] = read_safetensors_header(index.parent / shard)[1]
        for key, shard in weight_map.items():
            if key not in shards[shard]:
                raise CheckpointMismatchError(f"sharded index {index} puts tensor {key!r} in shard {shard!r}, "
                                              f"which has no such tensor")
            self._entries[key] = shards[shard][key]
        for entries in shards.values():
            for key, e in entries.items():
                self._entries.setdefault(key, e)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def info(self, key: str) -> TensorInfo:
        if key not in self._entries:
            raise self._missing(key)
        return self._entries[key].info

    def get(self, key: str) -> Tensor:
        if key not in self._entries:
            raise self._missing(key)
        return _read_entry(key, self._entries[key])


class _DictSource(TensorSource):
    """A source over a loaded (possibly memory-mapped) dict of tensors; ``get`` returns a contiguous copy."""

    def __init__(self, path: Path, state_dict: Mapping[str, Any]) -> None:
        self.name = self.file = str(path)  # ``name`` may be relabelled (a role); ``file`` stays the path
        self._sd = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}  # skip non-tensor extras

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def info(self, key: str) -> TensorInfo:
        if key not in self._sd:
            raise self._missing(key)
        t = self._sd[key]
        return TensorInfo(tuple(t.shape), t.dtype, self.file)

    def get(self, key: str) -> Tensor:
        if key not in self._sd:
            raise self._missing(key)
        return self._sd[key].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        """Drop the tensors (and with them the file mapping); the source holds no keys afterwards."""
        self._sd = {}


class PickledObjectsError(FreeMergeError):
    """``weights_only`` loading refused the file: it holds pickled Python objects, not a plain state dict."""


def _unwrap_state_dict(path: Path, obj: Any) -> Mapping[str, Any]:
    """``obj['state_dict']`` for a ``{"state_dict": {...}}`` wrapper, else ``obj`` (which must be a dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FreeMergeError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def _is_weights_only_refusal(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err) or "Weights only" in str(err)


def _torch_load(path: Path, **kwargs) -> Any:
    """``torch.load(weights_only=True)`` whose errors name the file: missing, pickled objects, damaged."""
    try:
        return torch.load(path, weights_only=True, **{"map_location": "cpu", **kwargs})
    except FileNotFoundError:
        raise FreeMergeError(f"checkpoint file {path} does not exist") from None
    except Exception as err:
        if _is_weights_only_refusal(err):
            raise PickledObjectsError(
                f"{path} holds pickled Python objects (e.g. a whole module saved with torch.save(model)), "
                f"not a plain state dict; loading it would execute code from the file. Convert it to a "
                f"state dict, or pass allow_pickle=True for files you trust") from None
        raise FreeMergeError(f"{path} cannot be read as a torch checkpoint: it is damaged, truncated or not a "
                             f"torch file ({type(err).__name__}: {err})") from err


class TorchFileSource(_DictSource):
    """A ``.bin``/``.pt``/``.pth`` state dict: ``torch.load(mmap=True, weights_only=True)``, ``get`` clones.

    Only zip-format files (``torch.save`` since PyTorch 1.6) can be memory-mapped; a legacy (non-zip) file is
    read whole into memory. A ``{"state_dict": {...}}`` wrapper is unwrapped; non-tensor entries are skipped.
    The mapping stays open until ``close()``: pages ``get`` touched count in RSS (clean file pages the kernel
    may drop under pressure); reading every tensor of a 1 GiB ``.bin`` raised peak RSS by 1090 MiB.
    Prefer safetensors for larger-than-memory merges.
    """

    def __init__(self, path) -> None:
        path = Path(path)
        if not path.exists():
            raise FreeMergeError(f"checkpoint file {path} does not exist")
        mmap = zipfile.is_zipfile(path)  # legacy non-zip files cannot be memory-mapped: loaded whole
        super().__init__(path, _unwrap_state_dict(path, _torch_load(path, mmap=mmap)))


class PickledModuleSource(_DictSource):
    """A ``torch.save(module)`` file read with ``read_pickled_state_dict`` (EXECUTES CODE: trusted files only)."""

    def __init__(self, path, role: str = "checkpoint") -> None:
        path = Path(path)
        super().__init__(path, read_pickled_state_dict(path, role))


def open_checkpoint(path, *, allow_pickle: bool = False) -> TensorSource:
    """A lazy source for ``path``: ``SafetensorsSource`` (a ``.safetensors`` file or a directory),
    else ``TorchFileSource``; a pickled whole module only with ``allow_pickle=True`` (executes its code)."""
    path = Path(path)
    if not path.exists():
        raise FreeMergeError(f"checkpoint {path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        return SafetensorsSource(path)
    try:
        return TorchFileSource(path)
    except PickledObjectsError:
        if not allow_pickle:
            raise
    return PickledModuleSource(path)


def read_pickled_state_dict(path, role: str = "checkpoint") -> dict[str, Tensor]:
    """A state dict from a ``torch.save(module)`` (or pickled state dict) file; EXECUTES CODE FROM THE FILE.

    Only for trusted files the caller opted in to (``allow_pickle``); the classes the file was saved with must
    be importable. A module gives its ``state_dict()``; a ``{"state_dict": {...}}`` wrapper is unwrapped.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # executes code: opted in
    except (ImportError, AttributeError) as err:
        raise FreeMergeError(
            f"{role} checkpoint {path}: unpickling needs the classes it was saved with ({err}); run from "
            f"the task_vectors repository root or put it on PYTHONPATH") from err
    except FileNotFoundError:
        raise FreeMergeError(f"{role} checkpoint {path} does not exist") from None
    except Exception as err:  # truncated zip / pickle stream: RuntimeError, EOFError, UnpicklingError, ...
        raise FreeMergeError(f"{role} checkpoint {path} cannot be read: it is damaged, truncated or not a torch "
                             f"file ({type(err).__name__}: {err})") from err
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FreeMergeError(f"{role} checkpoint {path} holds a {type(obj).__name__}, not a module or state dict")
    return obj


