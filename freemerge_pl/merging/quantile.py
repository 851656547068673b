"""Exact order statistics over a whole model, one tensor at a time (two histogram passes, no approximation).

A float32 value's bit pattern, with the sign bit flipped for positives and every bit flipped for negatives,
is an unsigned 32-bit key in the same order as the floats. Pass 1 counts the keys' high 16 bits per stream;
that locates, for every requested rank, the bucket holding it and the rank within the bucket. Pass 2 counts
the low 16 bits of the keys in those buckets only, which pins the exact key, i.e. the exact float:
``sorted(values)[index]`` of the concatenation of everything observed, as ``torch.kthvalue`` would give.
Memory: 2 × 65 536 counters per stream and rank, whatever the model size.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

BUCKETS = 1 << 16
_CHUNK = 1 << 24


def ordered_keys(values: Tensor) -> Tensor:
    """float32 → int32 whose unsigned reading sorts like the floats (``-0.0`` just below ``+0.0``)."""
    bits = values.contiguous().view(torch.int32)
    flip = torch.bitwise_or(torch.bitwise_right_shift(bits, 31), torch.iinfo(torch.int32).min)
    return torch.bitwise_xor(bits, flip)


def key_to_float(key: int) -> float:
    """Inverse of ``ordered_keys`` for one unsigned key in [0, 2^32)."""
    bits = key ^ 0x80000000 if key >= 0x80000000 else key ^ 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


class OrderStatistics:
    """``sorted(stream_s)[i]`` for every stream s and requested index i, exact, over two passes.

    ``indices(s, n)`` gives stream s's ascending indices once its size n is known (after pass 1).
    Call ``observe(s, values)`` for every value of every stream in each pass, ``next_pass()`` between the
    passes, then ``result()`` → a float64 ``[S, J]`` tensor (``-inf`` for an index below 0, ``+inf`` for
    one ≥ n: "keep everything" / "keep nothing" thresholds).
    """

    def __init__(self, num_streams: int, indices: Callable[[int, int], Sequence[int]]) -> None:
        self.num_streams = num_streams
        self._indices = indices
        self.counts = torch.zeros(num_streams, BUCKETS, dtype=torch.int64)
        self.sizes = [0] * num_streams
        self.pass_index = 0
        self._targets: list[list[tuple[int, int, int]]] = []  # per stream: (index, bucket, rank in bucket)
        self._fine: list[Tensor] = []

    def observe(self, stream: int, values: Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.dtype != torch.float32:
            raise TypeError(f"OrderStatistics takes float32 values, got {flat.dtype}")
        for start in range(0, flat.numel(), _CHUNK):
            keys = ordered_keys(flat[start:start + _CHUNK])
            high = torch.bitwise_and(torch.bitwise_right_shift(keys, 16), BUCKETS - 1)
            if self.pass_index == 0:
                self.counts[stream] += torch.bincount(high, minlength=BUCKETS).cpu()
                self.sizes[stream] += keys.numel()
            else:
                for j, (_, bucket, _) in enumerate(self._targets[stream]):
                    if bucket < 0:
                        continue
                    low = torch.bitwise_and(keys[high == bucket], BUCKETS - 1)
                    self._fine[stream][j] += torch.bincount(low, minlength=BUCKETS).cpu()

    def next_pass(self) -> None:
        """Locate every requested rank's bucket (end of pass 1)."""
        if self.pass_index != 0:
            raise RuntimeError("OrderStatistics takes exactly two passes")
        self.pass_index = 1
        for s in range(self.num_streams):
            cumulative = torch.cumsum(self.counts[s], 0)
            targets = []
            for index in self._indices(s, self.sizes[s]):
                if index < 0 or index >= self.sizes[s]:
                    targets.append((index, -1, 0))
                    continue
                bucket = int(torch.searchsorted(cumulative, index, right=True))
                below = int(cumulative[bucket - 1]) if bucket > 0 else 0
                targets.append((index, bucket, index - below))
            self._targets.append(targets)
            self._fine.append(torch.zeros(len(targets), BUCKETS, dtype=torch.int64))

    def result(self) -> Tensor:
        """The requested order statistics, float64 ``[S, J]`` (J = indices per stream)."""
        rows = []
        for s in range(self.num_streams):
            row = []
            for j, (index, bucket, rank) in enumerate(self._targets[s]):
                if bucket < 0:
                    row.append(-math.inf if index < 0 else math.inf)
                    continue
                low = int(torch.searchsorted(torch.cumsum(self._fine[s][j], 0), rank, right=True))
                row.append(key_to_float((bucket << 16) | low))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64)


def kth_largest_indices(count: Callable[[int], int]) -> Callable[[int, int], list[int]]:
    """Indices for "the ``count(n)``-th largest value" (ascending index n − count; none kept → +inf)."""

    def indices(stream: int, n: int) -> list[int]:
        c = count(n)
        return [n - c] if c > 0 else [n]

    return indices


def run_order_statistics(run: Callable[[Callable], None], values_of: Callable, num_streams: int,
                         indices: Callable[[int, int], Sequence[int]]) -> Tensor:
    """Exact order statistics over everything ``run(fn)`` visits (it calls ``fn(item)`` per item, e.g. per
    key of a model scan, or once for one tensor); ``values_of(item)`` gives each stream's values. Two runs.
    Returns float64 ``[S, J]``."""
    stats = OrderStatistics(num_streams, indices)

    def observe(item) -> None:
        for s, values in enumerate(values_of(item)):
            stats.observe(s, values)

    run(observe)
    stats.next_pass()
    run(observe)
    return stats.result()


def magnitude_thresholds(run: Callable[[Callable], None], values_of: Callable, num_streams: int,
                         count: Callable[[int], int]) -> Tensor:
    """Per stream, the ``count(n)``-th largest |value| (exact; float32 ``[S]``; +inf when count is 0)."""
    return run_order_statistics(run, lambda item: [v.abs() for v in values_of(item)], num_streams,
                                kth_largest_indices(count))[:, 0].float()
