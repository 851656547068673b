"""Every top-k, magnitude-threshold and order-statistic helper of the package (one module).

* counts and chunks: ``topk_count`` (⌈d·numel⌉), ``flat_chunks`` (4 Mi-entry views), ``chunked_abs_sum``;
* one tensor's top-k by |v|, chunk by chunk (FREE-Merging's experts, Eq. 4): ``topk_cut`` finds the cut
  ``(t, ties)`` and the sums of μ (a histogram over the float bits, then kthvalue of the few entries in and
  above the bucket of t); ``selection_entries`` / ``top_abs_sum`` apply a cut;
* exact order statistics over a whole model, one tensor at a time (``OrderStatistics``: two histogram passes
  over order-preserving integer keys, no approximation), ``magnitude_thresholds`` and ``model_thresholds``
  (model-scope TIES, DARE-TIES, AdaMerging++ and FREE thresholds from a statistics scan);
* per-row thresholds on stacked task vectors (TIES trim), the Breadcrumbs magnitude band and the released
  FREE-Merging code's per-row ``torch.topk`` selection.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------- counts and chunks


def topk_count(numel: int, density: float) -> int:
    """Number of entries an expert keeps in a tensor: ⌈d·numel⌉ (at least 1 for a non-empty tensor)."""
    return max(1, min(numel, math.ceil(density * numel - 1e-9))) if numel else 0


_CHUNK = 1 << 22  # elements per chunk (16 MiB of float32) of the large-tensor threshold and cut
SUM_BLOCK = 1 << 17
"""Elements per block of elementwise sums of task vectors (``KeyTensors.weighted_sum``): 512 KiB of float32, so
a block's conversion, subtraction and accumulation run in the core's cache (a 2048 × 5632 bf16 pair, 1 thread:
about 1.5 ns per entry against 3 in 16 MiB chunks and 7 over whole tensors)."""
BUCKETS = 1 << 16  # 16-bit halves of a float32's bits: the histograms' length


def flat_chunks(v: Tensor, size: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(offset, v.flatten()[offset:offset + size])`` over a tensor (views, not copies); ``size`` None:
    ``_CHUNK``."""
    flat = v.reshape(-1)
    size = size or _CHUNK
    for s in range(0, flat.numel(), size):
        yield s, flat[s:s + size]


def chunked_abs_sum(chunks: Iterable[tuple[int, Tensor]]) -> float:
    """Σ|v| over ``flat_chunks``-style chunks: one float32 sum per chunk, added in float64 (so the same
    value whether v is whole in memory or computed chunk by chunk from checkpoints).

    Chunks that can be had in smaller blocks (``VectorChunks.blocks``: θ_k − θ_pre computed on the fly) are
    built ``SUM_BLOCK`` entries at a time, each block's |v| written into one reused chunk-sized buffer that is
    summed when full: the same values summed as one tensor of the same length, so the same float32 sum, with
    each block's conversion, subtraction and abs in cache (about 1 ns an entry against 4)."""
    blocks = getattr(chunks, "blocks", None)
    size = _CHUNK
    step = min(SUM_BLOCK, size)
    if blocks is None or size % step:
        return sum(float(c.abs().sum()) for _, c in chunks)
    total, buf = 0.0, None
    for s, c in blocks(step):
        c = c.reshape(-1)
        if buf is None or buf.dtype != c.dtype:
            buf = torch.empty(min(size, chunks.numel), dtype=c.dtype, device=c.device)
        start, stop = s % size, s % size + c.numel()
        torch.abs(c, out=buf[start:stop])
        if stop == size or s + c.numel() == chunks.numel:  # a chunk complete (or the tensor's last, short one)
            total += float(buf[:stop].sum())
    return total


# -------------------------------------------------------------------------------------- one tensor's top-k


class TopkCut(NamedTuple):
    """One tensor's top-``count`` cut (``topk_cut``): keep the values above ``threshold`` plus the first
    ``ties`` (by index) equal to it; ``total``: Σ of every value and ``top``: Σ of the kept ones, each one
    float32 sum per chunk added in float64 (``chunked_abs_sum``'s and ``top_abs_sum``'s values). ``entries``
    (asked for with ``keep_entries``): ``selection_entries``' result for this cut, when the cut found it on the
    way (None otherwise: apply the cut with ``selection_entries``)."""

    threshold: float
    ties: int
    total: float
    top: float
    entries: tuple[Tensor, Tensor] | None = None


_RADIX_MIN = 1 << 16  # entries from which the histogram beats one kthvalue of them all (the same t either way)
HELD_ENTRIES = 1 << 26
"""Up to this many entries (256 MiB of float32: a Llama's 32000 × 2048 embedding) ``topk_cut(keep_entries=True)``
keeps a tensor's values between its reads: FREE's statistics scan holds one task's fp32 v_k of one key, less than
the merge pass holds for that key (Σλv and its transforms), instead of computing it twice."""


def topk_cut(chunks: Callable[[], Iterable[tuple[int, Tensor]]], numel: int, count: int, *,
             absolute: bool = True, keep_entries: bool = False) -> TopkCut:
    """The ``count``-th largest t of the values (``absolute``: their magnitudes) that ``chunks()`` yields
    (``flat_chunks``-style, ``numel`` entries in all), how many entries equal to t belong to the top ``count``
    (the first ones by index: enough to cut the same entries again later, ``selection_entries``), Σ of all the
    values and Σ of the top ``count``. Two reads of a multi-chunk tensor, holding one chunk's values at a time;
    one of a single chunk (its values are kept between the steps).

    Float32 tensors of ``_RADIX_MIN`` entries or more whose values are finite and ≥ +0: a histogram of the
    high 16 bits of the values (such floats order like their bit patterns) gives the bucket of the
    ``count``-th largest, so a value a (that bucket's lowest) with at least ``count`` entries ≥ a; t is the
    kthvalue of the entries ≥ a, which hold the top ``count``: t, the entries above t and their sum are those
    of the whole tensor (the same entries in the same order). If those entries would outgrow a chunk (a
    multi-chunk tensor with heavy ties), a histogram of the low 16 bits in that bucket pins t instead. Other
    tensors (small, another dtype, a negative value or -0.0, Inf/NaN): ``kthvalue`` of all the values.

    ``keep_entries``: on the histogram path the entries ≥ a are gathered with their flat indices and values, so
    the cut's ``selection_entries`` comes out of the same reads (``TopkCut.entries``; FREE's experts need no
    selection pass), and a tensor of at most ``HELD_ENTRIES`` entries keeps its chunks' values from the first
    read for the later steps instead of having ``chunks()`` compute them again (θ_k − θ_pre from checkpoints);
    held magnitudes take a from a sample (``_sampled_floor``), the histogram only if fewer than count are ≥ it."""
    kept: list[tuple[int, Tensor]] | None = [] if keep_entries and numel <= HELD_ENTRIES else None
    first = [True]

    def read() -> Iterator[tuple[int, Tensor]]:
        if kept is not None and not first[0]:
            yield from kept
            return
        for s, c in chunks():
            c = c.reshape(-1)
            if kept is not None:
                kept.append((s, c))
            yield s, c

    def pieces() -> Iterator[tuple[int, Tensor, Tensor]]:  # (offset, values, magnitudes)
        for s, c in read():
            yield s, c, (c.abs() if absolute else c)

    def mags() -> Iterator[Tensor]:
        return (m for _, _, m in pieces())

    total, hist, held, seen = 0.0, None, None, 0
    radix = count > 0 and numel >= _RADIX_MIN
    sampled = kept is not None and absolute  # held magnitudes: a sampled floor first, the histogram if it fails
    for piece in pieces():
        m = piece[2]
        seen += 1
        held = piece if seen == 1 else None
        part = float(m.sum())
        total += part
        if radix and not sampled:
            h = _high_histogram(m, absolute and math.isfinite(part))
            radix = h is not None
            hist = h if hist is None or h is None else hist.add_(h)
    first[0] = False
    picked = None
    if radix and sampled:
        usable = bool(kept) and kept[0][1].dtype == torch.float32 and math.isfinite(total)  # finite, ≥ +0
        floor = _sampled_floor([c for _, c in kept], count) if usable else None
        if floor is not None:
            picked = _picked(pieces(), floor)
            if sum(p[1].numel() for p in picked) < count:  # the sample ran high: fewer than count entries ≥ it
                picked = None
        if picked is None:
            for m in mags():
                h = _high_histogram(m, False)
                radix = radix and h is not None
                hist = h if hist is None or h is None else hist.add_(h)
    if not radix:
        values = [held[2]] if seen == 1 else list(mags())
        t, ties = math.inf, 0
        if count > 0:
            m = values[0] if len(values) == 1 else torch.cat(values)
            t = float(m.kthvalue(m.numel() - count + 1).values)
            ties = count - int(torch.count_nonzero(m > t))
        return TopkCut(t, ties, total, _top_sum(values, t, ties))
    if picked is None:
        at_least = hist.flip(0).cumsum(0).flip(0)  # [b]: how many values have high bits ≥ b
        high = int(torch.nonzero(at_least >= count).max())
        if seen > 1 and int(at_least[high]) > _CHUNK:
            t, ties = _low_bits_cut(mags, at_least, high, count)
            return TopkCut(t, ties, total, _top_sum(mags(), t, ties))
        floor = _bits_float(high << 16)
        found = [held] if seen == 1 else pieces()
        if keep_entries:  # per chunk, in index order: (offset, where, their magnitudes, their values)
            picked = _picked(found, floor)
            selected = [p[2] for p in picked]
        else:
            selected = [m[m >= floor] for _, _, m in found]
    else:
        selected = [p[2] for p in picked]
    pool = selected[0] if len(selected) == 1 else torch.cat(selected)
    t = float(pool.kthvalue(pool.numel() - count + 1).values)
    ties = count - sum(int(torch.count_nonzero(s > t)) for s in selected)
    entries = _selected(((s, hit, m, c) for s, hit, m, c in picked), t, ties) if keep_entries else None
    return TopkCut(t, ties, total, _top_sum(selected, t, ties), entries)


def _picked(pieces: Iterable[tuple[int, Tensor, Tensor]], floor: float) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """Per chunk, in index order, ``(offset, where, magnitudes, values)`` of the entries with magnitude ≥ floor."""
    return [(s, hit, m[hit], c[hit]) for s, c, m in pieces for hit in [torch.nonzero(m >= floor).flatten()]]


_SAMPLE_STRIDE = 64  # one entry in this many enters the sampled floor of ``topk_cut``
_SAMPLE_MIN = 256  # sampled entries expected above the count-th largest, at least


def _sampled_floor(values: Sequence[Tensor], count: int) -> float | None:
    """A magnitude a with (most likely) at least ``count`` entries ≥ a, from every ``stride``-th entry of each
    of ``values`` (flat float32 chunks, finite): the sample's magnitude of rank
    ``1.1·count/stride + 4`` from the top, below the sample's own estimate of the count-th largest (about 10 %
    more candidates than needed). The caller counts the entries ≥ a and falls back to the histogram when there
    are fewer than ``count``; None when the top ``count`` is too small a share for a sample to place it."""
    stride = min(_SAMPLE_STRIDE, count // _SAMPLE_MIN)
    if stride < 2:
        return None
    sample = torch.cat([v[::stride] for v in values]).abs_()
    rank = math.ceil(1.1 * count / stride) + 4
    if rank > sample.numel():
        return None
    return float(sample.kthvalue(sample.numel() - rank + 1).values)


def _bits_float(bits: int) -> float:
    """The float32 of a bit pattern in [0, 2^31)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _high_histogram(m: Tensor, finite: bool) -> Tensor | None:
    """Counts of the high 16 bits of float32 ``m`` (``BUCKETS`` of them); None when m is not float32 or holds
    a negative value, -0.0, Inf or NaN. ``finite``: m is ≥ 0 with a finite sum, so its bit patterns are in
    [0, 0x7F800000) already (no mask, no check)."""
    if m.dtype != torch.float32:
        return None
    bits = m.view(torch.int32)
    if finite:
        return torch.bincount(bits >> 16, minlength=BUCKETS)
    hist = torch.bincount((bits >> 16).bitwise_and_(BUCKETS - 1), minlength=BUCKETS)
    return None if int(hist[0x7F80:].sum()) else hist  # Inf/NaN (0x7F80...) or a sign bit set (0x8000...)


def _low_bits_cut(mags: Callable[[], Iterable[Tensor]], at_least: Tensor, high: int,
                  count: int) -> tuple[float, int]:
    """``(t, ties)`` from the counts of the low 16 bits of the values whose high bits are ``high`` (one more
    read, one chunk at a time); ``at_least[b]``: how many values have high bits ≥ b."""
    greater = int(at_least[high + 1])  # values in higher buckets (0x7F80 and up are empty)
    fine = torch.zeros(BUCKETS, dtype=torch.int64, device=at_least.device)
    for m in mags():
        bits = m.view(torch.int32)
        fine += torch.bincount(torch.bitwise_and(bits[(bits >> 16) == high], BUCKETS - 1), minlength=BUCKETS)
    fine_at_least = fine.flip(0).cumsum(0).flip(0)
    low = int(torch.nonzero(fine_at_least >= count - greater).max())
    greater += int(fine_at_least[low + 1]) if low + 1 < BUCKETS else 0
    return _bits_float((high << 16) | low), count - greater


def _top_sum(values: Iterable[Tensor], t: float, ties: int) -> float:
    """Σ of the kept values: per chunk the float32 sum of those above t, added in float64, plus ties × t."""
    return sum(float(m[m > t].sum()) for m in values) + ties * t


def top_abs_sum(chunks: Iterable[tuple[int, Tensor]], threshold: float, ties: int) -> float:
    """Σ|v| of the entries ``selection_entries`` keeps: those above ``threshold`` plus ``ties`` × threshold (every
    |v| ≥ threshold when ``ties`` is negative); one float32 sum per chunk, added in float64."""
    total = 0.0
    for _, c in chunks:
        m = c.abs()
        total += float(m[m >= threshold].sum()) if ties < 0 else float(m[m > threshold].sum())
    return total if ties < 0 else total + ties * threshold


def selection_entries(chunks: Iterable[tuple[int, Tensor]], threshold: float, ties: int, *,
                      absolute: bool = True) -> tuple[Tensor, Tensor]:
    """Sorted flat indices, and the values there, of the entries whose magnitude (``absolute``; else the value)
    is above ``threshold`` plus the first ``ties`` (by index) equal to it — every entry equal to it when
    ``ties`` is negative (a model-wide threshold keeps all ties); chunk by chunk (no full-size masks)."""
    def candidates() -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for s, c in chunks:
            c = c.reshape(-1)
            m = c.abs() if absolute else c
            hit = torch.nonzero(m >= threshold).flatten()
            yield s, hit, m[hit], c[hit]
    return _selected(candidates(), threshold, ties)


def _selected(candidates: Iterable[tuple[int, Tensor, Tensor, Tensor]], threshold: float,
              ties: int) -> tuple[Tensor, Tensor]:
    """``selection_entries``' result from each chunk's candidates, in index order: ``(offset, positions in the
    chunk, magnitudes there, values there)`` of (at least) every entry ≥ ``threshold``: those above it and the
    first ``ties`` equal to it (every candidate when ``ties`` is negative: each is ≥ ``threshold`` then)."""
    idx, vals = [], []
    budget = ties
    for s, hit, at, values in candidates:
        if ties >= 0:  # those above, and the first `budget` equal ones: a filter keeps the index order
            keep = at > threshold
            equal = torch.nonzero(at == threshold).flatten()[:max(budget, 0)]
            budget -= equal.numel()
            keep[equal] = True
            hit, values = hit[keep], values[keep]
        idx.append(hit + s)
        vals.append(values)
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx), torch.cat(vals)


# ---------------------------------------------------------------------------------- exact order statistics


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
            high = torch.bitwise_right_shift(keys, 16).bitwise_and_(BUCKETS - 1)
            if self.pass_index == 0:
                self.counts[stream] += torch.bincount(high, minlength=BUCKETS).cpu()
                self.sizes[stream] += keys.numel()
            else:
                for j, (_, bucket, _) in enumerate(self._targets[stream]):
                    if bucket < 0:
                        continue
                    low = torch.bitwise_and(keys[high == bucket], BUCKETS - 1)
                    self._fine[stream][j] += torch.bincount(low, minlength=BUCKETS).cpu()

    def _observe_absolute(self, stream: int, values: Tensor) -> None:
        """``observe`` of |values|: |v| has the bits of v without the sign bit, so its key is those bits with
        bit 31 set, its high half ``(bits >> 16 & 0x7FFF) | 0x8000`` and its low half ``bits & 0xFFFF``
        (the same counts as the keys of ``values.abs()``, in fewer passes)."""
        bits = values.contiguous().view(torch.int32)
        half = BUCKETS // 2
        high = torch.bitwise_right_shift(bits, 16).bitwise_and_(half - 1)  # key's high half − 0x8000
        if self.pass_index == 0:
            self.counts[stream, half:] += torch.bincount(high, minlength=half).cpu()
            self.sizes[stream] += bits.numel()
            return
        for j, (_, bucket, _) in enumerate(self._targets[stream]):
            if bucket < half:
                continue  # no |v| key is below 0x80000000 (and bucket −1: nothing to pin)
            low = torch.bitwise_and(bits[high == bucket - half], BUCKETS - 1)
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


def magnitude_thresholds(run: Callable[[Callable], None], values_of: Callable, num_streams: int,
                         count: Callable[[int], int]) -> Tensor:
    """Per stream, the ``count(n)``-th largest |value| (exact; float32 ``[S]``; +inf when count is 0)."""
    return run_order_statistics(run, values_of, num_streams, kth_largest_indices(count),
                                absolute=True)[:, 0].float()


def model_thresholds(scan, values_of: Callable, num_tasks: int, density: float,
                     desc: str = "threshold") -> Tensor:
    """Per task, the |v| threshold keeping the ⌈density·N⌉ largest entries of the whole model (exact; two
    passes of the statistics ``scan``; ``values_of(x)`` gives a key's K tensors; float32 [K])."""
    return magnitude_thresholds(lambda fn: scan(fn, desc), values_of, num_tasks,
                                lambda n: topk_count(n, density))


# ------------------------------------------------------------------------------- per-row thresholds, bands


def kth_largest_rows(values: Tensor, count: int) -> Tensor:
    """The ``count``-th largest value of each row of a ``[R, N]`` tensor (``inf`` when count is 0)."""
    n = values.shape[1]
    if count <= 0 or n == 0:
        return torch.full((values.shape[0],), math.inf, dtype=values.dtype, device=values.device)
    return values.kthvalue(n - count + 1, dim=1).values


def trim_thresholds(magnitudes: Tensor, density: float) -> Tensor:
    """Per row of ``[K, N]`` magnitudes: the threshold t keeping the ⌈density·N⌉ largest (``|v| >= t``)."""
    return kth_largest_rows(magnitudes, topk_count(magnitudes.shape[1], density))


def magnitude_trim(stacked: Tensor, density: float, thresholds: Tensor | None = None) -> Tensor:
    """TIES trim: keep the entries of each task with ``|v| >= threshold`` (per-tensor top ⌈d·N⌉ by default).

    Ties at the threshold are kept, so a task may keep a few more than ⌈d·N⌉ entries.
    """
    flat = stacked.reshape(stacked.shape[0], -1)
    mags = flat.abs()
    thr = trim_thresholds(mags, density) if thresholds is None else thresholds.to(flat.device, flat.dtype)
    return torch.where(mags >= thr[:, None], flat, 0.0).reshape(stacked.shape)


def exact_count_trim(stacked: Tensor, density: float) -> Tensor:
    """mergekit's TIES trim (``sparsify.magnitude``): keep exactly ``max(1, int(d·N))`` entries of each task,
    the first ones of ``torch.argsort(|v|.float(), descending=True)`` on the flattened tensor — the same torch
    call, one task at a time, so entries tied at the threshold are chosen as mergekit chooses them (that
    sort's order on ties is not the index order). O(N log N) per task."""
    flat = stacked.reshape(stacked.shape[0], -1)
    n = flat.shape[1]
    if density >= 1 or n == 0:
        return stacked
    keep = max(1, int(density * n))
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    for k in range(flat.shape[0]):
        mask[k, torch.argsort(flat[k].abs().float(), descending=True)[:keep]] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(stacked.shape)


def magnitude_band_mask(v: Tensor, drop_top: float, drop_bottom: float) -> Tensor:
    """Keep-mask removing the ⌊β·n⌋ largest and the ⌊γ·n⌋ smallest |v| of the tensor (ties by index: the
    order of a stable ascending sort of |v|). The two cut values are exact order statistics from the float
    bits (``abs_order_statistics``; ``kthvalue`` for other dtypes or non-finite values), then an index-ordered
    tie count: O(n), no sort."""
    flat = v.reshape(-1)
    n = flat.numel()
    n_top = math.floor(drop_top * n + 1e-9)
    n_bottom = math.floor(drop_bottom * n + 1e-9)
    mags = flat.abs()
    keep = torch.ones(n, dtype=torch.bool, device=v.device)
    if n_bottom == 0 and n_top == 0:
        return keep.reshape(v.shape)
    # the cuts sorted(|v|)[n_bottom − 1] and sorted(|v|)[n − n_top], with how many |v| are below / equal
    found = abs_order_statistics(flat, [max(n_bottom, 1) - 1, n - max(n_top, 1)])
    if found is not None:
        (bottom, below, equal), (top, top_below, _) = found
        if (n_bottom == 0 or n_bottom == below + equal) and (n_top == 0 or n_top == n - top_below):
            # no tie at a cut is split: the bands are |v| ≤ bottom and |v| ≥ top
            if n_bottom > 0:
                keep = mags > bottom
            if n_top > 0:
                keep &= mags < top
            return keep.reshape(v.shape)
        bottom, top = (torch.tensor(t, dtype=mags.dtype, device=mags.device) for t in (bottom, top))
    else:
        bottom = mags.kthvalue(n_bottom).values if n_bottom > 0 else None
        top = mags.kthvalue(n - n_top + 1).values if n_top > 0 else None
    if n_bottom > 0:  # the n_bottom first entries of the stable ascending order
        t = bottom
        below = mags < t
        keep &= ~below
        need = n_bottom - int(below.sum())
        keep[torch.nonzero(mags == t).flatten()[:need]] = False  # the first ties by index
    if n_top > 0:  # the n_top last entries of that order: among ties at the threshold, the highest indices
        t = top
        above = mags > t
        keep &= ~above
        need = n_top - int(above.sum())
        if need > 0:
            keep[torch.nonzero(mags == t).flatten()[-need:]] = False
    return keep.reshape(v.shape)


def released_expert_indices(v: Tensor, density: float, remove_density: float = 0.0) -> Tensor:
    """Sorted flat indices of the released expert's nonzero entries of ``v``.

    ``TaskVectorMiddleKeep``/``TaskVectorBREAD`` (task_vectors.py:238-258): along the last dimension,
    zero the top ``int(remove_density·W)`` entries by |v|, then keep the top ``int(density·W)`` of the
    rest (``torch.topk``, so ties break as there); 1-D tensors are one row; a 0-d tensor is kept whole.
    Selected entries whose value is 0 are left out (they change nothing in the released composition).
    """
    flat = v.reshape(-1)
    if v.dim() == 0:
        return torch.nonzero(flat != 0).flatten()
    width = v.shape[-1]
    if width == 0 or flat.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    magnitude = flat.abs().reshape(-1, width)
    n_remove = int(width * remove_density)
    if n_remove > 0:
        magnitude = magnitude.scatter(1, torch.topk(magnitude, n_remove, dim=1).indices, 0.0)
    n_keep = int(width * density)
    if n_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    cols = torch.topk(magnitude, n_keep, dim=1).indices
    rows = torch.arange(magnitude.shape[0], device=v.device)[:, None]
    indices = (rows * width + cols).reshape(-1)
    indices = indices[magnitude.reshape(-1)[indices] != 0]
    return indices.sort().values

