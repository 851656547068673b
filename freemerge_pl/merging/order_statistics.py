"""Exact order statistics over a whole model, one tensor at a time (``OrderStatistics``: two histogram passes
over order-preserving integer keys, no approximation; ``run_order_statistics`` over a statistics scan: the
model-scope thresholds of TIES, DARE-TIES, AdaMerging++, PCB and FREE, ``topk.model_thresholds``).

A float32 value's bit pattern, with the sign bit flipped for positives and every bit flipped for negatives,
is an unsigned 32-bit key in the same order as the floats. Pass 1 of ``OrderStatistics`` counts the keys' high
16 bits per stream; that locates, for every requested rank, the bucket holding it and the rank within the
bucket. Pass 2 counts the low 16 bits of the keys in those buckets only, which pins the exact key, i.e. the
exact float: ``sorted(values)[index]`` of the concatenation of everything observed, as ``torch.kthvalue``
would give. Memory: 2 × 65 536 counters per stream and rank, whatever the model size.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

BUCKETS = 1 << 16  # 16-bit halves of a float32's bits: the histograms' length
_ORDER_CHUNK = 1 << 24  # elements per step of OrderStatistics.observe


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

    def __init__(self, num_streams: int, indices: Callable[[int, int], Sequence[int]], *,
                 absolute: bool = False) -> None:
        self.num_streams = num_streams
        self.absolute = absolute  # observe |values| (their keys straight from the float bits, no |.| copy)
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
        for start in range(0, flat.numel(), _ORDER_CHUNK):
            if self.absolute:
                self._observe_absolute(stream, flat[start:start + _ORDER_CHUNK])
                continue
            keys = ordered_keys(flat[start:start + _ORDER_CHUNK])
            self._count(stream, keys, keys, 0)

    def _observe_absolute(self, stream: int, values: Tensor) -> None:
        """``observe`` of |values|: |v| has the bits of v without the sign bit, so its key is those bits with
        bit 31 set, its high half ``(bits & 0x7FFFFFFF) >> 16 | 0x8000`` and its low half ``bits & 0xFFFF``
        (the same counts as the keys of ``values.abs()``, in fewer passes)."""
        bits = values.contiguous().view(torch.int32)
        if bits.device.type == "cpu":
            magnitude = torch.from_numpy(np.bitwise_and(bits.numpy(), 0x7FFFFFFF))
        else:
            magnitude = torch.bitwise_and(bits, 0x7FFFFFFF)
        self._count(stream, bits, magnitude, BUCKETS // 2)

    def _count(self, stream: int, keys: Tensor, high_bits: Tensor, offset: int) -> None:
        """Pass 1: count the buckets ``high_bits >> 16`` (+ ``offset``: the keys' high halves); pass 2: the low
        halves of the ``keys`` in each target bucket. On the CPU the shift, the bucket compare and the
        selection go through NumPy (torch's bool-output compare and mask indexing are not vectorised on
        this build: pass 2 of 2 Mi entries 6.5 → 2.3 ms)."""
        cpu = keys.device.type == "cpu"
        if cpu:
            high_np = np.right_shift(high_bits.numpy().view(np.uint32), 16).view(np.int32)
            high = torch.from_numpy(high_np)
        else:
            high = torch.bitwise_right_shift(high_bits, 16).bitwise_and_(BUCKETS - 1)
        if self.pass_index == 0:
            self.counts[stream, offset:] += torch.bincount(high, minlength=BUCKETS - offset).cpu()
            self.sizes[stream] += keys.numel()
            return
        for j, (_, bucket, _) in enumerate(self._targets[stream]):
            if bucket < offset:
                continue  # bucket −1: nothing to pin; |v| keys are never below 0x80000000
            if cpu:
                low = torch.from_numpy(np.bitwise_and(keys.numpy()[high_np == bucket - offset], BUCKETS - 1))
            else:
                low = torch.bitwise_and(keys[high == bucket - offset], BUCKETS - 1)
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
        return torch.tensor([[value for value, _, _ in row] for row in self.located()], dtype=torch.float64)

    def located(self) -> list[list[tuple[float, int, int]]]:
        """Per stream and requested index: ``(value, below, equal)``, the order statistic and how many observed
        values are smaller than it and equal to it (by key: -0.0 below +0.0, unless ``absolute``; ±inf and
        (0, 0) for an index out of range): the counts come from the two histograms, no further pass."""
        rows = []
        for s in range(self.num_streams):
            cumulative = torch.cumsum(self.counts[s], 0)
            row = []
            for j, (index, bucket, rank) in enumerate(self._targets[s]):
                if bucket < 0:
                    row.append((-math.inf if index < 0 else math.inf, 0, 0))
                    continue
                fine = torch.cumsum(self._fine[s][j], 0)
                low = int(torch.searchsorted(fine, rank, right=True))
                below = (int(cumulative[bucket - 1]) if bucket > 0 else 0) + (int(fine[low - 1]) if low > 0 else 0)
                row.append((key_to_float((bucket << 16) | low), below, int(self._fine[s][j][low])))
            rows.append(row)
        return rows


def abs_order_statistics(values: Tensor, ranks: Sequence[int]) -> list[tuple[float, int, int]] | None:
    """``(sorted(|values|)[r], below, equal)`` for each rank r (0-based, ascending), with how many |values|
    are below it and equal to it (exact: ``OrderStatistics``, two passes over the float bits of one float32
    tensor, no sort or copy of |values|); None when ``values`` is not float32 or holds Inf/NaN (bit keys
    ``0xFF80`` and up), left to ``kthvalue``'s conventions."""
    if values.dtype != torch.float32:
        return None
    stats = OrderStatistics(1, lambda s, n: list(ranks), absolute=True)
    stats.observe(0, values)
    if int(stats.counts[0, 0xFF80:].sum()):
        return None
    stats.next_pass()
    stats.observe(0, values)
    return stats.located()[0]


def kth_largest_indices(count: Callable[[int], int]) -> Callable[[int, int], list[int]]:
    """Indices for "the ``count(n)``-th largest value" (ascending index n − count; none kept → +inf)."""

    def indices(stream: int, n: int) -> list[int]:
        c = count(n)
        return [n - c] if c > 0 else [n]

    return indices


def run_order_statistics(run: Callable[[Callable], None], values_of: Callable, num_streams: int,
                         indices: Callable[[int, int], Sequence[int]], *, absolute: bool = False) -> Tensor:
    """Exact order statistics over everything ``run(fn)`` visits (it calls ``fn(item)`` per item, e.g. per
    key of a model scan, or once for one tensor); ``values_of(item)`` gives each stream's values (``absolute``:
    of their magnitudes). Two runs. Returns float64 ``[S, J]``."""
    stats = OrderStatistics(num_streams, indices, absolute=absolute)

    def observe(item) -> None:
        for s, values in enumerate(values_of(item)):
            stats.observe(s, values)

    run(observe)
    stats.next_pass()
    run(observe)
    return stats.result()
