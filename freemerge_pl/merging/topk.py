"""Every top-k and magnitude-threshold helper of the package (exact order statistics over a whole model:
``order_statistics``).

* counts and chunks: ``topk_count`` (⌈d·numel⌉), ``flat_chunks`` (4 Mi-entry views), ``chunked_abs_sum``;
* one tensor's top-k by |v|, chunk by chunk (FREE-Merging's experts, Eq. 4): ``topk_cut`` finds the cut
  ``(t, ties)`` and the sums of μ (a histogram over the float bits, then kthvalue of the few entries in and
  above the bucket of t), ``sampled_cut`` the same in one read when a sample places it; ``selection_entries``
  / ``top_abs_sum`` apply a cut;
* model-wide magnitude thresholds from a statistics scan (``magnitude_thresholds``, ``model_thresholds``:
  model-scope TIES, DARE-TIES, AdaMerging++ and FREE);
* per-row thresholds on stacked task vectors (TIES trim), the Breadcrumbs magnitude band and the released
  FREE-Merging code's per-row ``torch.topk`` selection.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from freemerge_pl.merging.ops import masked
from freemerge_pl.merging.order_statistics import (
    BUCKETS,
    abs_order_statistics,
    kth_largest_indices,
    run_order_statistics,
)

# --------------------------------------------------------------------------------------- counts and chunks


def topk_count(numel: int, density: float) -> int:
    """Number of entries an expert keeps in a tensor: ⌈d·numel⌉ (at least 1 for a non-empty tensor)."""
    return max(1, min(numel, math.ceil(density * numel - 1e-9))) if numel else 0


_CHUNK = 1 << 22  # elements per chunk (16 MiB of float32) of the large-tensor threshold and cut
SUM_BLOCK = 1 << 17
"""Elements per block of elementwise sums of task vectors (``KeyTensors.weighted_sum``): 512 KiB of float32, so
a block's conversion, subtraction and accumulation run in the core's cache (a 2048 × 5632 bf16 pair, 1 thread:
about 1.5 ns per entry against 3 in 16 MiB chunks and 7 over whole tensors)."""


def flat_chunks(v: Tensor, size: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(offset, v.flatten()[offset:offset + size])`` over a tensor (views, not copies); ``size`` None:
    ``_CHUNK``."""
    flat = v.reshape(-1)
    size = size or _CHUNK
    for s in range(0, flat.numel(), size):
        yield s, flat[s:s + size]


def chunked_abs_sum(chunks: Iterable[tuple[int, Tensor]],
                    visit: Callable[[int, Tensor], None] | None = None) -> float:
    """Σ|v| over ``flat_chunks``-style chunks: one float32 sum per chunk, added in float64 (so the same
    value whether v is whole in memory or computed chunk by chunk from checkpoints).

    Chunks that can be had in smaller blocks (``VectorChunks.blocks``: θ_k − θ_pre computed on the fly) are
    built ``SUM_BLOCK`` entries at a time, each block's |v| written into one reused chunk-sized buffer that is
    summed when full: the same values summed as one tensor of the same length, so the same float32 sum, with
    each block's conversion, subtraction and abs in cache (about 1 ns an entry against 4). ``visit(offset,
    magnitudes)`` is shown each block's (or chunk's) |v|, flat, while it is in cache (a view: copy what is kept)."""
    blocks = getattr(chunks, "blocks", None)
    size = _CHUNK
    step = min(SUM_BLOCK, size)
    total = 0.0
    if blocks is None or size % step:
        for s, c in chunks:
            m = c.abs().reshape(-1)
            if visit is not None:
                visit(s, m)
            total += float(m.sum())
        return total
    buf = None
    for s, c in blocks(step):
        c = c.reshape(-1)
        if buf is None or buf.dtype != c.dtype:
            buf = torch.empty(min(size, chunks.numel), dtype=c.dtype, device=c.device)
        start, stop = s % size, s % size + c.numel()
        torch.abs(c, out=buf[start:stop])
        if visit is not None:
            visit(s, buf[start:stop])
        if stop == size or s + c.numel() == chunks.numel:  # a chunk complete (or the tensor's last, short one)
            total += float(buf[:stop].sum())
    return total


# -------------------------------------------------------------------------------------- one tensor's top-k


class TopkCut(NamedTuple):
    """One tensor's top-``count`` cut (``topk_cut``): keep the values above ``threshold`` plus the first
    ``ties`` (by index) equal to it; ``total``: Σ of every value and ``top``: Σ of the kept ones, each one
    float32 sum per chunk added in float64 (``chunked_abs_sum``'s and ``top_abs_sum``'s values). ``indices``
    (asked for with ``keep_indices``): the sorted flat indices ``selection_entries`` gives for this cut, when
    the cut found them on the way (None otherwise: apply the cut with ``selection_entries``)."""

    threshold: float
    ties: int
    total: float
    top: float
    indices: Tensor | None = None


_RADIX_MIN = 1 << 16  # entries from which the histogram beats one kthvalue of them all (the same t either way)


def topk_cut(chunks: Callable[[], Iterable[tuple[int, Tensor]]], numel: int, count: int, *,
             absolute: bool = True, keep_indices: bool = False) -> TopkCut:
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

    ``keep_indices``: on the histogram path the entries ≥ a are gathered with their flat indices, so the cut's
    ``selection_entries`` indices come out of the same reads (``TopkCut.indices``). ``sampled_cut`` places a
    from a sample instead, in one read."""
    def pieces() -> Iterator[tuple[int, Tensor]]:  # (offset, magnitudes)
        for s, c in chunks():
            c = c.reshape(-1)
            yield s, (c.abs() if absolute else c)

    def mags() -> Iterator[Tensor]:
        return (m for _, m in pieces())

    total, hist, held, seen = 0.0, None, None, 0
    radix = count > 0 and numel >= _RADIX_MIN
    for piece in pieces():
        m = piece[1]
        seen += 1
        held = piece if seen == 1 else None
        part = float(m.sum())
        total += part
        if radix:
            h = _high_histogram(m, absolute and math.isfinite(part))
            radix = h is not None
            hist = h if hist is None or h is None else hist.add_(h)
    if not radix:
        values = [held[1]] if seen == 1 else list(mags())
        t, ties = math.inf, 0
        if count > 0:
            m = values[0] if len(values) == 1 else torch.cat(values)
            t = float(m.kthvalue(m.numel() - count + 1).values)
            ties = count - int(torch.count_nonzero(m > t))
        return TopkCut(t, ties, total, _top_sum(values, t, ties))
    at_least = hist.flip(0).cumsum(0).flip(0)  # [b]: how many values have high bits ≥ b
    high = int(torch.nonzero(at_least >= count).max())
    if seen > 1 and int(at_least[high]) > _CHUNK:
        t, ties = _low_bits_cut(mags, at_least, high, count)
        return TopkCut(t, ties, total, _top_sum(mags(), t, ties))
    floor = _bits_float(high << 16)
    found = [held] if seen == 1 else pieces()
    picked = [(s, hit, m[hit]) for s, m in found for hit in [positions_at_least(m, floor)]]
    return _cut([p[2] for p in picked], count, total, picked if keep_indices else None)


def positions_at_least(m: Tensor, floor: float) -> Tensor:
    """The sorted flat positions of ``m ≥ floor`` (m flat; floor compared in m's dtype, as torch compares with
    a Python number). A float32/64 m on the CPU goes through NumPy (the comparison and ``flatnonzero``: 48 µs
    for 128 Ki float32 entries with 1 % hits, 1 thread, where torch's comparison alone took 75 µs, its
    bool-output kernel unvectorised on this build, and the whole torch path 201 µs); otherwise
    ``torch.nonzero`` of the mask's 8-byte words, then of the bytes of the words that hold one (nonzero costs
    about 1 ns a position: 8× fewer for sparse masks)."""
    if m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64):
        a = m.detach().numpy()
        with np.errstate(over="ignore"):  # a floor beyond float32's range is ±inf there, as in torch
            bound = np.array(floor, dtype=a.dtype)
        return torch.from_numpy(np.flatnonzero(a >= bound)).long()
    mask = m >= floor
    if mask.numel() % 8:
        return torch.nonzero(mask).flatten()
    words = torch.nonzero(mask.view(torch.int64)).flatten()
    within = torch.nonzero(mask.view(-1, 8)[words])
    return words[within[:, 0]].mul_(8).add_(within[:, 1])


def _cut(selected: list[Tensor], count: int, total: float,
         picked: list[tuple[int, Tensor, Tensor]] | None = None) -> TopkCut:
    """The cut from ``selected``, per chunk (in chunk order) the magnitudes ≥ some a of which at least ``count``
    are ≥ a: t, ties and the sum of the top as over the whole chunks; with ``picked``, the ``(offset, where,
    magnitudes)`` of the same entries in index order (any grouping), its ``indices``."""
    pool = selected[0] if len(selected) == 1 else torch.cat(selected)
    t = float(pool.kthvalue(pool.numel() - count + 1).values)
    ties = count - sum(int(torch.count_nonzero(s > t)) for s in selected)
    indices = None if picked is None else _selected(((s, hit, m, None) for s, hit, m in picked), t, ties)[0]
    return TopkCut(t, ties, total, _top_sum(selected, t, ties), indices)


_SAMPLE_STRIDE = 64  # about one entry in this many enters the sampled floor of ``sampled_cut``
_SAMPLE_MIN = 256  # sampled entries expected above the count-th largest, at least
_SAMPLE_RUN = 32  # the sample takes runs of this many consecutive entries (a cache line or two of θ_k and θ_pre)


def sample_indices(numel: int, stride: int) -> Tensor:
    """``sampled_cut``'s sample: runs of ``_SAMPLE_RUN`` consecutive flat indices, one run starting every
    ``_SAMPLE_RUN·stride + 1`` entries (about one entry in ``stride``, reading about one cache line in
    ``stride`` instead of every other one; the + 1 moves the runs along the rows of a matrix)."""
    starts = torch.arange(0, max(numel - _SAMPLE_RUN + 1, 0), _SAMPLE_RUN * stride + 1)
    return (starts[:, None] + torch.arange(_SAMPLE_RUN)).reshape(-1)


def sampled_cut(v, count: int) -> TopkCut:
    """``topk_cut(keep_indices=True)`` of |v| (the same t, ties, sums and indices) for a task vector given as
    ``VectorChunks`` (re-iterable, with ``blocks`` and ``at``), in one read when a sample places the cut.

    The magnitudes at about one entry in ``stride = min(64, count // 256)`` (``sample_indices``, read with
    ``v.at``) give a floor a: the sample's magnitude of rank ``1.1·count·(sample size)/numel + 4`` from the top,
    below the sample's own estimate of the count-th largest (about 10 % more candidates than needed). The read
    that sums |v| (``chunked_abs_sum``) keeps each block's entries ≥ a while the block is in cache, and the cut
    comes from those candidates (``_cut``). When the sample misjudges (fewer than count entries ≥ a), the
    magnitudes are not float32 and finite, the tensor is small or the top ``count`` too small a share to
    sample: ``topk_cut``'s reads."""
    numel, stride = v.numel, min(_SAMPLE_STRIDE, count // _SAMPLE_MIN)
    idx = sample_indices(numel, stride) if stride >= 2 and numel >= _RADIX_MIN else None
    rank = 0 if idx is None else math.ceil(1.1 * count * idx.numel() / numel) + 4
    if idx is not None and rank <= idx.numel():
        sample = v.at(idx).abs_()
        if sample.dtype == torch.float32:
            floor = float(sample.kthvalue(sample.numel() - rank + 1).values)
            found: dict[int, list[tuple[int, Tensor, Tensor]]] = {}

            def visit(s: int, m: Tensor) -> None:
                hit = positions_at_least(m, floor)
                found.setdefault(s // _CHUNK, []).append((s, hit, m[hit]))

            total = chunked_abs_sum(v, visit)
            per_chunk = [found[c] for c in sorted(found)]
            picked = [p for blocks in per_chunk for p in blocks]
            if math.isfinite(total) and sum(p[1].numel() for p in picked) >= count:
                return _cut([torch.cat([p[2] for p in blocks]) for blocks in per_chunk], count, total, picked)
    return topk_cut(lambda: iter(v), numel, count, keep_indices=True)


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


def gather_blocks(blocks: Iterable[tuple[int, Tensor]], idx: Tensor) -> Tensor:
    """The values at the sorted flat indices ``idx`` of the ``(offset, block)`` pairs (in order, covering them),
    each taken from its block while it is in cache."""
    out = None
    for s, c in blocks:
        c = c.reshape(-1)
        if out is None:  # the first block: its dtype and device
            idx, out = idx.to(c.device), torch.empty(idx.numel(), dtype=c.dtype, device=c.device)
        lo, hi = torch.searchsorted(idx, torch.tensor([s, s + c.numel()], device=c.device)).tolist()
        if hi > lo:
            out[lo:hi] = c[idx[lo:hi] - s]
    return torch.empty(0) if out is None else out


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
            hit = positions_at_least(m, threshold)
            yield s, hit, m[hit], c[hit]
    return _selected(candidates(), threshold, ties)


def _selected(candidates: Iterable[tuple[int, Tensor, Tensor, Tensor | None]], threshold: float,
              ties: int) -> tuple[Tensor, Tensor | None]:
    """``selection_entries``' result from each chunk's candidates, in index order: ``(offset, positions in the
    chunk, magnitudes there, values there)`` of (at least) every entry ≥ ``threshold``: those above it and the
    first ``ties`` equal to it (every candidate when ``ties`` is negative: each is ≥ ``threshold`` then).
    Candidates without values (None) give the indices only (values None)."""
    idx, vals = [], []
    budget = ties
    for s, hit, at, values in candidates:
        if ties >= 0:  # those above, and the first `budget` equal ones: a filter keeps the index order
            keep = at > threshold
            equal = torch.nonzero(at == threshold).flatten()[:max(budget, 0)]
            budget -= equal.numel()
            keep[equal] = True
            hit, values = hit[keep], None if values is None else values[keep]
        idx.append(hit + s)
        vals.append(values)
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx), None if vals[0] is None else torch.cat(vals)


# ----------------------------------------------------------------------------- model-wide thresholds


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
    return masked(flat, mags >= thr[:, None]).reshape(stacked.shape)


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
    return masked(flat, mask).reshape(stacked.shape)


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

