"""Lazy tensor sources (read one tensor at a time) and sinks (write one tensor at a time).

A merge holds at most one key's tensors of every model in memory: the engine asks each source for
``get(key)`` when it needs it and hands every output tensor to a sink as soon as it is computed.

* ``TensorSource``: ``keys()`` (in checkpoint order), ``info(key)`` (shape, dtype, file: no data read),
  ``get(key)`` (a CPU tensor the caller may keep; never a view the caller could corrupt), ``name`` (for
  errors). ``StateDictSource`` wraps an in-memory state dict; ``freemerge_pl.io.open_checkpoint(path)`` opens
  the file-backed kinds.
* ``TensorSink``: ``write(key, tensor)`` in the order the keys were planned, then ``close()``.
  ``StateDictSink`` collects an in-memory state dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from freemerge_pl.errors import CheckpointMismatchError


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about one tensor without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource:
    """A checkpoint read lazily, tensor by tensor."""

    name: str = "<source>"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def _missing(self, key: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"checkpoint {self.name!r} has no tensor {key!r}")

    def close(self) -> None:
        """Release file handles (a no-op for in-memory sources)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StateDictSource(TensorSource):
    """An in-memory state dict as a source (``get`` returns the stored tensor itself: read-only use)."""

    def __init__(self, state_dict: Mapping[str, Tensor], name: str = "<state dict>") -> None:
        self.state_dict = state_dict
        self.name = name

    def keys(self) -> list[str]:
        return list(self.state_dict)

    def info(self, key: str) -> TensorInfo:
        if key not in self.state_dict:
            raise self._missing(key)
        t = self.state_dict[key]
        return TensorInfo(tuple(t.shape), t.dtype, self.name)

    def get(self, key: str) -> Tensor:
        if key not in self.state_dict:
            raise self._missing(key)
        return self.state_dict[key]

    def __contains__(self, key: str) -> bool:
        return key in self.state_dict


class TensorSink:
    """Receives output tensors one at a time, in the planned key order.

    ``state``: optional JSON-serialisable caller state (e.g. an RNG state) that a resumable sink journals
    with the write that completes a shard; other sinks ignore it.
    """

    def write(self, key: str, tensor: Tensor, state: dict | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the output (flush the last shard, write the index)."""


class StateDictSink(TensorSink):
    """Collects the written tensors into ``state_dict`` (in memory)."""

    def __init__(self) -> None:
        self.state_dict: dict[str, Tensor] = {}

    def write(self, key: str, tensor: Tensor, state: dict | None = None) -> None:
        self.state_dict[key] = tensor


def key_order(sources: Iterable[TensorSource]) -> list[str]:
    """The first source's keys (the output order)."""
    return list(next(iter(sources)).keys())
