"""Checkpoint reading and writing: safetensors, atomic (temp file + rename), sharded, with a JSON sidecar.

Larger-than-memory merges read and write one tensor at a time: ``open_checkpoint`` gives a lazy
``TensorSource`` (``SafetensorsSource``, ``TorchFileSource``, ``PickledModuleSource`` on request) and
``ShardedSafetensorsSink`` streams a sharded Hugging Face checkpoint to disk, resumable after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError, ConfigError, FreeMergeError
from freemerge_pl.merging.source import TensorInfo, TensorSink, TensorSource

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
    """Write one safetensors file atomically and deterministically (keys sorted, metadata sorted: the same
    tensors give the same bytes in every process, unlike ``save_file``, whose metadata order varies)."""
    path = Path(path)
    clean = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    entries = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in clean.items()]
    meta = {k: str(v) for k, v in sorted((metadata or {}).items())}

    _atomic_write(path, lambda tmp: write_safetensors(tmp, entries, meta, clean.values()))
    return path


def write_safetensors(filename, entries: list[tuple[str, TensorInfo]], metadata: Mapping[str, str],
                      tensors: Iterable[Tensor]) -> None:
    """Write a safetensors file: the header of ``entries`` (in order), then each tensor's bytes."""
    with open(filename, "wb") as f:
        f.write(safetensors_prefix(entries, metadata))
        for v in tensors:
            if v.numel():
                f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))


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
    return _greedy_split(((k, _nbytes(t)) for k, t in tensors.items()), max_shard_bytes)


def _greedy_split(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
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
    """Load a ``.safetensors`` file, a directory holding one or a sharded index, or a torch ``.pt/.bin``.

    A file that cannot be read raises ``FreeMergeError`` naming it (damaged, truncated, not a checkpoint);
    one holding pickled objects raises ``PickledObjectsError`` (see ``read_pickled_state_dict``)."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            weight_map = _read_weight_map(index)
            out: dict[str, Tensor] = {}
            for name in dict.fromkeys(weight_map.values()):
                out.update(_load_safetensors(path / name, device))
            return out
        single = path / "model.safetensors"
        if not single.exists():
            raise FreeMergeError(f"{path} holds neither model.safetensors nor {INDEX_NAME}")
        path = single
    if not path.exists():
        raise FreeMergeError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    return dict(_unwrap_state_dict(path, _torch_load(path, map_location=device)))


def _load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` whose errors name the file (missing, damaged or truncated)."""
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise FreeMergeError(f"checkpoint file {path} does not exist") from None
    except SafetensorError as err:
        raise _damaged(path, str(err)) from None
    except OSError as err:
        raise FreeMergeError(f"safetensors file {path} cannot be read: {err}") from err


# ------------------------------------------------------------------------------------------ verified files
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


# ------------------------------------------------------------------------------------------ lazy sources
#: safetensors dtype names (the header's ``dtype`` field) and their torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie: ``info.file``, absolute byte range ``[start, end)``."""

    info: TensorInfo
    start: int
    end: int


def _damaged(path, detail: str) -> FreeMergeError:
    return FreeMergeError(f"safetensors file {path} is damaged or truncated: {detail}")


def read_safetensors_header(path) -> tuple[dict[str, str], dict[str, _Entry]]:
    """``(metadata, key -> _Entry)`` of a safetensors file, keys in file (byte offset) order; reads no tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _damaged(path, f"{size} bytes, fewer than the 8-byte header length")
            n = struct.unpack("<Q", prefix)[0]
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise _damaged(path, f"the header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise FreeMergeError(f"checkpoint file {path} does not exist") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _damaged(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    entries = sorted((_parse_entry(path, k, v, 8 + n) for k, v in header.items()), key=lambda e: e[1].start)
    _check_layout(path, entries, 8 + n, size)
    return metadata, dict(entries)


def _parse_entry(path, key: str, spec: Any, base: int) -> tuple[str, _Entry]:
    """One header entry ``{dtype, shape, data_offsets}`` as ``(key, _Entry)``, offsets made absolute."""
    try:
        dtype_name, shape, (start, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)) and start <= end
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _damaged(path, f"tensor {key!r} has a malformed header entry {spec!r}")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise FreeMergeError(f"{path}: tensor {key!r} has dtype {dtype_name!r}, which is not supported "
                             f"(supported: {sorted(SAFETENSORS_DTYPES)})")
    info = TensorInfo(shape, SAFETENSORS_DTYPES[dtype_name], str(path))
    if end - start != info.nbytes:
        raise _damaged(path, f"tensor {key!r} ({dtype_name} {list(shape)}) needs {info.nbytes} bytes, "
                             f"its offsets span {end - start}")
    return key, _Entry(info, base + start, base + end)


def _check_layout(path, entries: list[tuple[str, _Entry]], base: int, size: int) -> None:
    """Tensors must tile the data area exactly (as safetensors checks): no gap, no overlap, no tail."""
    pos = base
    for key, e in entries:
        if e.start != pos:
            raise _damaged(path, f"tensor {key!r} starts at byte {e.start}, expected {pos}")
        pos = e.end
    if pos > size:
        raise _damaged(path, f"the header describes {pos} bytes, the file has only {size}")
    if pos < size:
        raise _damaged(path, f"{size - pos} unexpected bytes after the last tensor")


def _read_entry(key: str, e: _Entry) -> Tensor:
    """The tensor's bytes read with plain file reads into a fresh CPU tensor (no mapping stays behind)."""
    buf = torch.empty(e.end - e.start, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    try:
        with open(e.info.file, "rb", buffering=0) as f:
            f.seek(e.start)
            while got < len(view):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise FreeMergeError(f"checkpoint file {e.info.file} (tensor {key!r}) no longer exists") from None
    if got != len(view):
        raise _damaged(e.info.file, f"tensor {key!r} needs bytes {e.start}..{e.end}, the file ends first")
    return buf.view(e.info.dtype).reshape(e.info.shape)


def _read_weight_map(index: Path) -> dict[str, str]:
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
    shard holds but the index omits come last, as ``load_state_dict`` reads them too). ``get`` reads one
    tensor's byte range with plain file reads into a fresh tensor that owns its memory, so nothing of the
    file stays mapped. Measured on a 1 GiB file of 16 fp32 [4096, 4096] tensors (64 MiB each), reading every
    tensor in turn and dropping it: peak RSS grew by 67 MiB with these reads (and with a ``safe_open`` per
    call), by 131 MiB with ``safe_open`` + ``clone``, and by 1027 MiB (the whole file) with one ``safe_open``
    handle kept open.
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
        weight_map = _read_weight_map(index)
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
        self.name = str(path)
        self._sd = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}  # skip non-tensor extras

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def info(self, key: str) -> TensorInfo:
        if key not in self._sd:
            raise self._missing(key)
        t = self._sd[key]
        return TensorInfo(tuple(t.shape), t.dtype, self.name)

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


# ------------------------------------------------------------------------------------------ streaming sink
JOURNAL_NAME = ".merge_progress.json"
_JOURNAL_VERSION = 1
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def shard_names(count: int) -> list[str]:
    """HF shard file names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_prefix(entries: list[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    """The bytes before the data of a safetensors file holding ``entries`` in this order: the 8-byte header
    length and the JSON header, padded with spaces to a multiple of 8 bytes (as safetensors writes it)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, info in entries:
        n = info.nbytes
        header[key] = {"dtype": _SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class _Shard:
    """One planned output file: its name, its keys' range ``[begin, end)`` in the plan, its header and size."""

    name: str
    begin: int
    end: int
    prefix: bytes
    size: int


def _check_plan(plan: list[tuple[str, TensorInfo]]) -> None:
    """A plan must be non-empty, with unique keys and dtypes safetensors can store."""
    if not plan:
        raise FreeMergeError("ShardedSafetensorsSink: the plan holds no tensor")
    seen: set[str] = set()
    for key, info in plan:
        if key in seen or key == "__metadata__":
            raise FreeMergeError(f"ShardedSafetensorsSink: key {key!r} is duplicated or reserved in the plan")
        if info.dtype not in _SAFETENSORS_NAMES:
            raise FreeMergeError(f"ShardedSafetensorsSink: tensor {key!r} has dtype {info.dtype}, which "
                                 f"safetensors cannot store")
        seen.add(key)


def _fsync_dir(directory: Path) -> None:
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


def _write_json_durable(obj: Any, path: Path) -> None:
    """``write_json_atomic`` (keys in insertion order) whose temp file is fsynced before the rename."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)
    _fsync_dir(path.parent)


class ShardedSafetensorsSink(TensorSink):
    """Writes a (sharded) safetensors checkpoint one tensor at a time, resumable after an interruption.

    ``plan``: ``(key, TensorInfo)`` in output order; shards are its greedy order-preserving split by bytes
    (``shard_plan``), named as Hugging Face names them, each with ``{"format": "pt"}`` (plus ``metadata``)
    in its header. A shard's header is computed from the plan and written first into ``.<name>.partial``;
    tensors are appended as ``write`` delivers them (memory holds one tensor); the file is fsynced and
    renamed to ``<name>`` when its last tensor arrives, then the journal ``.merge_progress.json`` records
    the shard's size, sha256 and the ``state`` passed with that write. A new sink with the same
    ``fingerprint`` and plan keeps the verified leading shards: skip ``completed_keys()``, restore
    ``resume_state()``, write the rest. ``close()`` writes ``model.safetensors.index.json`` (several shards)
    and removes the journal; before it no index exists. Copying a 1 GiB file of 64 MiB tensors through
    ``SafetensorsSource`` and this sink (4 shards, ``t * 2`` per tensor) raised peak RSS by 131 MiB: the
    tensor read and the tensor written.
    """

    def __init__(self, directory, plan, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, fingerprint: str = "",
                 metadata: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.plan = [(str(k), TensorInfo(tuple(info.shape), info.dtype, info.file)) for k, info in plan]
        _check_plan(self.plan)
        self.fingerprint = str(fingerprint)
        self.metadata = self._header_metadata(metadata)
        self.max_shard_bytes = int(max_shard_bytes)
        self._keys = [k for k, _ in self.plan]
        self._infos = dict(self.plan)
        self._shards = self._layout()
        self._digest = self._plan_digest()
        self._file = None
        self._hash = None
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index would make this look complete
        self._records: list[dict[str, Any]] = self._recover()
        self._pos = self._shards[len(self._records) - 1].end if self._records else 0

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _header_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
        meta = dict(metadata or {})
        bad = {k: v for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise FreeMergeError(f"ShardedSafetensorsSink: safetensors metadata must map str to str, got {bad}")
        return dict(sorted({**meta, "format": "pt"}.items()))

    def _layout(self) -> list[_Shard]:
        groups = _greedy_split(((k, i.nbytes) for k, i in self.plan), self.max_shard_bytes)
        shards, begin = [], 0
        for name, keys in zip(shard_names(len(groups)), groups):
            entries = self.plan[begin:begin + len(keys)]
            prefix = safetensors_prefix(entries, self.metadata)
            size = len(prefix) + sum(i.nbytes for _, i in entries)
            shards.append(_Shard(name, begin, begin + len(keys), prefix, size))
            begin += len(keys)
        return shards

    def _plan_digest(self) -> str:
        spec = {"version": _JOURNAL_VERSION, "max_shard_bytes": self.max_shard_bytes, "metadata": self.metadata,
                "tensors": [[k, list(i.shape), _SAFETENSORS_NAMES[i.dtype]] for k, i in self.plan]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ resume
    def _recover(self) -> list[dict[str, Any]]:
        """The journal's verified leading shards; everything else of an earlier run is removed."""
        for partial in self.directory.glob(".model*.safetensors.partial"):
            partial.unlink(missing_ok=True)
        journal = self._load_journal()
        if journal is None:
            return []
        records = journal["shards"]
        same = journal.get("fingerprint") == self.fingerprint and journal.get("plan_digest") == self._digest
        kept: list[dict[str, Any]] = []
        if same:
            for shard, rec in zip(self._shards, records):
                if not self._verified(shard, rec):
                    break
                kept.append(rec)
        for rec in records[len(kept):]:
            self._remove_output(rec.get("name"))
        if kept:
            self._write_journal(kept)
        else:
            (self.directory / JOURNAL_NAME).unlink(missing_ok=True)
        return kept

    def _load_journal(self) -> dict[str, Any] | None:
        """The journal, or None when absent; an unreadable one is removed (the run starts over)."""
        path = self.directory / JOURNAL_NAME
        if not path.exists():
            return None
        try:
            journal = json.loads(path.read_text())
            ok = isinstance(journal, dict) and isinstance(journal.get("shards"), list)
            ok = ok and all(isinstance(r, dict) for r in journal["shards"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            return None
        return journal

    def _verified(self, shard: _Shard, rec: dict[str, Any]) -> bool:
        """The journal entry names this shard and its file still has the recorded size and sha256."""
        path = self.directory / shard.name
        return (rec.get("name") == shard.name and rec.get("size") == shard.size and path.is_file()
                and path.stat().st_size == shard.size and sha256_file(path) == rec.get("sha256"))

    def _remove_output(self, name: Any) -> None:
        """Remove a shard file an earlier run wrote (only plain shard names inside ``directory``)."""
        if isinstance(name, str) and _SHARD_NAME.fullmatch(name):
            (self.directory / name).unlink(missing_ok=True)

    def _write_journal(self, records: list[dict[str, Any]]) -> None:
        _write_json_durable({"version": _JOURNAL_VERSION, "fingerprint": self.fingerprint,
                             "plan_digest": self._digest, "shards": records}, self.directory / JOURNAL_NAME)

    def completed_keys(self) -> list[str]:
        """Keys of the shards already complete (kept from an earlier run or written since), in plan order."""
        return self._keys[:self._shards[len(self._records) - 1].end] if self._records else []

    def resume_state(self) -> Any:
        """The ``state`` passed with the write that completed the last complete shard (None if none)."""
        return self._records[-1].get("state") if self._records else None

    # ------------------------------------------------------------------ writing
    def _partial(self, shard: _Shard) -> Path:
        return self.directory / f".{shard.name}.partial"

    def _check(self, key: str, tensor: Tensor, state: Any) -> None:
        """``key`` is the next planned one, ``tensor`` matches its plan, ``state`` is JSON-serialisable."""
        if self._closed:
            raise FreeMergeError(f"ShardedSafetensorsSink({self.directory}) is closed; cannot write {key!r}")
        if self._pos >= len(self._keys):
            raise CheckpointMismatchError(f"{self.directory}: every planned tensor is written; got {key!r}")
        expected = self._keys[self._pos]
        if key != expected:
            where = "already written" if key in self._keys[:self._pos] else \
                "later in the plan" if key in self._infos else "not in the plan"
            raise CheckpointMismatchError(f"{self.directory}: expected tensor {expected!r} next (plan order), "
                                          f"got {key!r} ({where})")
        info = self._infos[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointMismatchError(
                f"{self.directory}: tensor {key!r}: the plan expects shape {info.shape} dtype {info.dtype}, "
                f"got shape {tuple(tensor.shape)} dtype {tensor.dtype}")
        try:
            json.dumps(state)
        except (TypeError, ValueError) as err:
            raise FreeMergeError(f"{self.directory}: the state written with {key!r} is not JSON-serialisable "
                                 f"({err})") from None

    def write(self, key: str, tensor: Tensor, state: Any = None) -> None:
        """Append ``tensor`` to the current shard; the shard is finished when its last tensor arrives, and
        ``state`` (JSON-serialisable) is then journalled with it."""
        self._check(key, tensor, state)
        shard = self._shards[len(self._records)]
        if self._file is None:
            self._file = open(self._partial(shard), "wb")  # noqa: SIM115 (kept open across writes)
            self._hash = hashlib.sha256()
            self._append(shard.prefix)
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._append(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1
        if self._pos == shard.end:
            self._finish(shard, state)

    def _append(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def _finish(self, shard: _Shard, state: Any) -> None:
        """fsync the partial file, rename it to its final name, journal it."""
        f, self._file = self._file, None
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
        f.close()
        if size != shard.size:  # cannot happen unless the plan and the writes disagree
            raise FreeMergeError(f"{self._partial(shard)}: wrote {size} bytes, the plan says {shard.size}")
        os.replace(self._partial(shard), self.directory / shard.name)
        _fsync_dir(self.directory)
        self._records.append({"name": shard.name, "size": size, "sha256": self._hash.hexdigest(), "state": state})
        self._write_journal(self._records)

    def abort(self) -> None:
        """Stop without finishing: the shard in progress is dropped; complete shards and the journal stay."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._partial(self._shards[len(self._records)]).unlink(missing_ok=True)
        self._closed = True

    def close(self) -> None:
        """Check that every shard is written, write the index (several shards), remove the journal."""
        if self._closed:
            return
        if self._pos != len(self._keys):
            raise FreeMergeError(f"{self.directory}: close() with {len(self._keys) - self._pos} planned tensor(s) "
                                 f"not written; the next one is {self._keys[self._pos]!r}")
        for shard in self._shards:
            path = self.directory / shard.name
            if not path.is_file() or path.stat().st_size != shard.size:
                raise FreeMergeError(f"shard {path} is missing or has the wrong size at close()")
        if len(self._shards) > 1:
            weight_map = {k: s.name for s in self._shards for k in self._keys[s.begin:s.end]}  # plan order
            total = sum(i.nbytes for _, i in self.plan)
            params = sum(i.numel for _, i in self.plan)
            _write_json_durable({"metadata": {"total_size": total, "total_parameters": params},
                                 "weight_map": weight_map}, self.directory / INDEX_NAME)
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)
        self._closed = True

    @property
    def files(self) -> list[Path]:
        """The output files: every shard, then the index when there are several shards."""
        names = [s.name for s in self._shards] + ([INDEX_NAME] if len(self._shards) > 1 else [])
        return [self.directory / n for n in names]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------ publishing
#: the manifest every published directory carries: the writer's record plus ``files`` (name -> bytes, sha256)
MANIFEST_NAME = "merge_info.json"
#: the files an export wrote before manifests listed them (recognised so such a directory can be replaced)
_LEGACY_EXPORT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                                 r"(task_module_\d+|shared_\w+|heads|router)\.safetensors|task_modules\.json|"
                                 r"merge_info\.json|\..+\.tmp")


def staging_dir(dest) -> Path:
    """The hidden sibling ``.<name>.partial`` in which ``dest`` is built before it is published."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.partial"


def file_records(directory, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": digest}}`` of files of ``directory``, names sorted."""
    directory = Path(directory)
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in sorted(names)}


def read_manifest(directory, manifest_name: str = MANIFEST_NAME) -> dict[str, Any] | None:
    """The manifest of ``directory`` as a dict; None when it is absent or is not a JSON object."""
    try:
        manifest = json.loads((Path(directory) / manifest_name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_own_export(directory, manifest_name: str = MANIFEST_NAME) -> bool:
    """Whether ``directory`` is a directory this package published: its manifest lists files and the directory
    holds nothing it does not list (or, written before manifests had ``files``, a manifest with ``method`` and
    only file names an export uses)."""
    manifest = read_manifest(directory, manifest_name)
    if manifest is None:
        return False
    present = {p.name for p in Path(directory).iterdir()} - {manifest_name}
    if isinstance(manifest.get("files"), dict):
        return present <= set(manifest["files"])
    return "method" in manifest and all(_LEGACY_EXPORT_FILE.fullmatch(n) for n in present)


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
    ``publish_directory`` inside the block. ``dest`` is checked first (``check_output_dir``); if the block
    raises, the staging directory is removed and ``dest`` is untouched. A staging directory left by a killed
    process is discarded at the next start (use ``publish_directory`` alone for a resumable build)."""
    dest = Path(dest)
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


def publish_directory(staging, dest, record: Mapping[str, Any], *, files: Iterable[str | Path] | None = None,
                      overwrite: bool = False, replace_export: bool = True,
                      manifest_name: str = MANIFEST_NAME) -> dict[str, Any]:
    """Publish the finished ``staging`` directory as ``dest``, whole; returns the manifest written.

    1. Every entry of ``staging`` not named in ``files`` is removed (leftovers of an interrupted run with other
       settings); ``files=None`` keeps every file. A listed file that is absent is an error.
    2. The manifest ``{**record, "files": {name: {"bytes", "sha256"}}}`` (every file left) is written last.
    3. ``dest`` is checked again (``check_output_dir``), moved aside to ``.<name>.old`` if it exists, the staging
       directory is renamed to ``dest`` and the old one removed (put back if that rename fails). Nothing ever
       mixes files of two exports: a kill before the renames leaves the previous ``dest`` byte-identical; a
       kill between them leaves no ``dest`` (the previous one in ``.<name>.old``, the new one complete in the
       staging directory), which readers report.
    """
    staging, dest = Path(staging), Path(dest)
    keep = None if files is None else {Path(f).name for f in files}
    for entry in list(staging.iterdir()):
        if entry.name == manifest_name or (keep is not None and entry.name not in keep):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        elif not entry.is_file() or entry.is_symlink():
            raise FreeMergeError(f"{entry} is not a plain file; a published directory holds files only")
    names = [p.name for p in staging.iterdir()]
    missing = sorted((keep or set()) - set(names))
    if missing:
        raise FreeMergeError(f"{staging}: file(s) {missing} to publish are missing")
    manifest = {**record, "files": file_records(staging, names)}
    write_json_atomic(manifest, staging / manifest_name)
    check_output_dir(dest, overwrite=overwrite, replace_export=replace_export, manifest_name=manifest_name)
    old = dest.parent / f".{dest.name}.old"
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
    _fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)
    return manifest
