"""The streaming driver: lazy sources in, a resumable sharded safetensors sink out, one tensor at a time.

``stream_merge`` runs the same engine (``engine.execute``) as the in-memory ``merge``; with θ_pre's dtype
as the output dtype it writes exactly the tensors ``merge`` returns. Memory holds one key's K task
vectors (plus what a method keeps: expert entries, low-rank factors), never a whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from freemerge_pl.io import DEFAULT_SHARD_BYTES, ShardedSafetensorsSink
from freemerge_pl.merging.base import MergeResult
from freemerge_pl.merging.engine import (
    CheckpointInputs,
    add_pretrained_,
    all_finite,
    apply_key,
    check_prefilter,
    execute,
    prefilter_transform,
    raise_nonfinite,
)
from freemerge_pl.merging.method import KeyTensors, MergeMethod
from freemerge_pl.merging.source import TensorInfo, TensorSource

log = logging.getLogger("freemerge_pl.merge")


def _glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return None, None


_TRIM, _MALLOPT = _glibc()
# glibc's mallopt parameter numbers, and the defaults restored after a merge
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere). Tensors under
    glibc's mmap threshold (up to 32 MiB) come from the heap, where the long-lived expert entries pin freed
    chunks: without a trim per key, RSS grew by ~0.3 GiB of freed memory over a 1.45 B-parameter merge."""
    if _TRIM is not None:
        _TRIM(0)


#: glibc's largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): buffers of at least this size get
#: their own mappings while an outsized key is computed; the streaming kernels' 16 MiB chunks stay on the heap
_OUTSIZED_MMAP_THRESHOLD = 32 << 20
Policy = Literal["fast", "outsized", "low"]


def _use(policy: Policy) -> None:
    """Switch glibc's allocation parameters to ``policy`` (see ``allocation_policy``)."""
    if policy == "fast":
        _MALLOPT(_M_MMAP_MAX, 0)
        _MALLOPT(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        _MALLOPT(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _MALLOPT(_M_MMAP_THRESHOLD, 1 << 20 if policy == "low" else _OUTSIZED_MMAP_THRESHOLD)


class AllocationPolicy:
    """The policy in force (``allocation_policy``'s value); ``use(outsized)`` switches the fast policy to the
    outsized one and back between keys (``low_memory`` stays low)."""

    def __init__(self, low_memory: bool) -> None:
        self.low_memory = low_memory
        self.current: Policy = "low" if low_memory else "fast"

    def use(self, outsized: bool) -> None:
        policy: Policy = "low" if self.low_memory else "outsized" if outsized else "fast"
        if _MALLOPT is None or policy == self.current:
            return
        release_free_heap()  # what the other policy left free goes back before the next key's allocations
        _use(policy)
        self.current = policy


def outsized_keys(sizes: dict[str, int]) -> set[str]:
    """Keys more than twice as large as 90 % of the keys (a Llama's embedding and lm_head: 65.5 M entries
    against 11.5 M for its largest layer tensor): their large buffers get their own mappings (the outsized
    policy of ``allocation_policy``)."""
    if not sizes:
        return set()
    ordered = sorted(sizes.values())
    typical = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {k for k, n in sizes.items() if n > 2 * typical}


@contextmanager
def allocation_policy(low_memory: bool) -> Iterator[AllocationPolicy]:
    """How a streaming merge's tensors get their memory (glibc ``mallopt``; a no-op elsewhere), process-wide
    while the block runs; on leaving it glibc's defaults are restored and the free heap is given back.

    ``low_memory=False`` (fast): every allocation comes from the heap and freed memory stays there (no mmap,
    no trim), so the next key's buffers reuse pages already mapped. A fresh mapping is zero-filled by the
    kernel on first touch: with one mapping per large tensor (``low_memory``), page faults took about 40 %
    of a linear merge's CPU time (84 M parameters, bf16, 1 thread: 2.39 s CPU and 864 k minor faults
    against 1.43 s and 88 k this way). The heap is trimmed only before a key larger than the one before it
    (freed pages smaller keys left could not hold it). Outsized keys (``outsized_keys``: vocabulary-sized) are
    computed with buffers of 32 MiB or more in their own mappings (``AllocationPolicy.use``): on the heap, they
    landed in a heap fragmented by every key before, so the last key (a Llama's lm_head) set the peak RSS (645 M
    parameters: DARE-TIES 5.5 GiB against 2.0 GiB with the same key first). Measured on a 3-layer Llama with
    the full 32000-token vocabulary, bf16, 1 thread: peak RSS task arithmetic 1.96–1.98 → 1.59–1.60 GiB,
    TIES 4.25 → 3.89 GiB, DARE-TIES 2.0–2.8 (between identical runs) → 2.0 GiB, CPU time within noise; a
    1 MiB threshold there (``low_memory``'s) cost FREE-Merging 45 % more CPU (8 M page faults, its chunks).
    ``low_memory=True``: allocations of 1 MiB or more get their own mappings, returned to the OS when freed
    (glibc raises that threshold dynamically up to 32 MiB as large blocks are freed, after which the streaming
    kernels' 16 MiB chunk buffers came from the heap and fragmented it: measured on one 32000×2048 tensor,
    peak RSS 1.46 GiB with glibc's default, 1.26 GiB with this), and the heap is trimmed after every key
    (``release_free_heap``)."""
    policy = AllocationPolicy(low_memory)
    if _MALLOPT is None:
        yield policy
        return
    _use(policy.current)
    try:
        yield policy
    finally:
        _MALLOPT(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _MALLOPT(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        release_free_heap()


class Prefetcher:
    """Reads the next key's tensors of every source on one background thread while the current key is computed.

    ``order``: the keys in the order a pass asks for them. The first ``get`` of ``order[i]`` (from any
    source) starts reading ``order[i + 1]`` from every source; a ``get`` of a prefetched key takes its
    tensor (each once), any other ``get`` reads on the calling thread, as without prefetching. File reads
    and the NaN/Inf check release the GIL, so at one torch thread the read of key i + 1 overlaps the maths of
    key i (safetensors tensors are file mappings, ``SafetensorsSource``: their pages come in where first read,
    i.e. on this thread when the check runs here, else on the calling thread); memory holds one more key's
    inputs (in their stored dtype). The tensors are those ``source.get`` returns, byte for
    byte: a prefetched run computes the same output.

    ``finite_names`` (one name per source; None: no check): every tensor of a key in ``finite_keys`` is checked
    for NaN/Inf where it is read, on the prefetch thread for the keys read ahead, with the engine's error
    (``raise_nonfinite``: checkpoint name, file, key, count), raised by the ``get`` that asks for the key.
    """

    def __init__(self, sources: Sequence[TensorSource], order: Sequence[str] = (),
                 finite_names: Sequence[str] | None = None) -> None:
        self.sources = list(sources)
        self.finite_names = None if finite_names is None else list(finite_names)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.ahead: dict[str, Future] = {}  # key → future of [tensor, or None once taken, per source]
        self.last: str | None = None  # the key whose first get started the read ahead
        self.set_order(order)

    def set_order(self, order: Sequence[str], finite_keys: Sequence[str] | None = None) -> None:
        self.order = list(order)
        self.position = {k: i for i, k in enumerate(self.order)}
        self.finite_keys = set(self.order if finite_keys is None else finite_keys)

    def _one(self, index: int, key: str) -> Tensor:
        t = self.sources[index].get(key)
        if self.finite_names is not None and key in self.finite_keys and not all_finite(t):
            raise_nonfinite(self.finite_names[index], self.sources[index].info(key).file, key, t)
        return t

    def _read(self, key: str) -> list[Tensor | None]:
        return [self._one(i, key) for i in range(len(self.sources))]

    def get(self, index: int, key: str) -> Tensor:
        i = self.position.get(key)
        nxt = self.order[i + 1] if i is not None and i + 1 < len(self.order) else None
        for other in [k for k in self.ahead if k not in (key, nxt)]:  # asked out of order: drop it
            self.ahead.pop(other).cancel()
        if i is not None and key != self.last:
            self.last = key
            if nxt is not None and nxt not in self.ahead:
                self.ahead[nxt] = self.pool.submit(self._read, nxt)
        if key not in self.ahead:
            return self._one(index, key)
        tensors = self.ahead[key].result()  # a read error is raised here, as a direct read raises it
        t, tensors[index] = tensors[index], None
        if all(x is None for x in tensors):
            del self.ahead[key]
        return t if t is not None else self._one(index, key)  # taken already: read again

    def wrap(self) -> list[TensorSource]:
        """One source per source given, each ``get`` served through this prefetcher."""
        return [_PrefetchedSource(self, i) for i in range(len(self.sources))]

    def close(self) -> None:
        for future in self.ahead.values():
            future.cancel()
        self.ahead.clear()
        self.pool.shutdown(wait=True)


class _PrefetchedSource(TensorSource):
    def __init__(self, prefetcher: Prefetcher, index: int) -> None:
        self.prefetcher, self.index = prefetcher, index
        self.source = prefetcher.sources[index]
        self.name = self.source.name

    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def info(self, key: str) -> TensorInfo:
        return self.source.info(key)

    def get(self, key: str) -> Tensor:
        return self.prefetcher.get(self.index, key)


@dataclass
class StreamResult:
    """What a streaming merge wrote and computed: shard files, task modules (experts...) and info."""

    files: list[Path]
    result: MergeResult
    resumed_keys: int = 0
    digests: dict[str, str] = field(default_factory=dict)  # shard file name → sha256 computed while writing


def output_plan(inputs: CheckpointInputs, dtype: torch.dtype | None) -> list[tuple[str, TensorInfo]]:
    """Every output key with its shape and output dtype (floating tensors in ``dtype``, others as they are)."""
    plan = []
    for key in inputs.output_keys:
        info = inputs.pretrained.info(key)
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append((key, TensorInfo(tuple(info.shape), out_dtype, info.file)))
    return plan


def stream_merge(
    pretrained: TensorSource,
    finetuned: Sequence[TensorSource],
    method: MergeMethod,
    output_dir,
    *,
    names: Sequence[str] | None = None,
    exclude_keys: str | Sequence[str] | None = None,
    fr_filter_ratio: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    fingerprint: str = "",
    strict_dtypes: bool = True,
    check_finite: bool = True,
    low_memory: bool = False,
    prefetch: bool = False,
    progress: bool = False,
) -> StreamResult:
    """Merge checkpoints read tensor by tensor into sharded safetensors under ``output_dir``.

    Resumable: rerun with the same inputs, settings and ``fingerprint`` after an interruption and the
    complete shards are kept (verified by sha256), the rest written again, byte-identical to an
    uninterrupted run (logged: ``resuming: N of M tensors already written``; ``StreamResult.resumed_keys``).
    The index is written last (``close``), so a partial output never looks complete.
    ``dtype`` None keeps θ_pre's dtypes; ``device`` is where the maths runs (``cuda``: tensor by tensor).
    ``check_finite``: a NaN/Inf in a merged input tensor ends the run with an error naming checkpoint, file and
    key, checked on the tensors the merge pass reads (no separate read); the shard in progress is dropped.
    ``low_memory``: return freed memory to the OS after every key (``allocation_policy``): a lower peak RSS for
    more CPU time. ``prefetch``: read the next key's inputs while the current one is computed (``Prefetcher``).
    """
    check_prefilter(method, fr_filter_ratio)
    prefetcher = None
    if prefetch:  # the NaN/Inf check moves to where the tensors are read (the prefetch thread, mostly)
        labels = [pretrained.name, *(names if names is not None else [s.name for s in finetuned])]
        first = 1 if method.output_is_weights else 0  # such a method never reads θ_pre: none is read ahead
        prefetcher = Prefetcher([pretrained, *finetuned][first:], finite_names=labels[first:] if check_finite else None)
        wrapped = prefetcher.wrap()
        pretrained, finetuned = (pretrained, wrapped) if first else (wrapped[0], wrapped[1:])
    inputs = CheckpointInputs(pretrained, finetuned, names=names, exclude_keys=exclude_keys, device=device,
                              transform=prefilter_transform(fr_filter_ratio),
                              check_finite=check_finite and prefetcher is None, strict_dtypes=strict_dtypes)
    plan = output_plan(inputs, dtype)
    out_dtypes = {k: info.dtype for k, info in plan}
    sink = ShardedSafetensorsSink(output_dir, plan, max_shard_bytes=max_shard_bytes, fingerprint=fingerprint,
                                  background=True)  # written and hashed while the next key is computed
    done = sink.completed_keys()
    state = sink.resume_state() or {}
    if done:
        log.info("resuming: %d of %d tensors already written (complete shards of an interrupted run in %s, "
                 "verified by sha256)", len(done), len(plan), output_dir)

    if prefetcher is not None:  # the keys the merge pass reads, in its order
        prefetcher.set_order([k for k in inputs.keys if k not in set(done) or method.produces_task_modules],
                             finite_keys=inputs.keys)
    sizes = [info.numel for _, info in plan]
    grows = {k for (k, _), n, m in zip(plan, sizes, sizes[1:]) if m > n}  # the next key is larger
    outsized = outsized_keys({k: inputs.pretrained.info(k).numel for k in inputs.keys})
    following = {k: nxt for (k, _), (nxt, _) in pairwise(plan)}

    def emit(key: str, x: KeyTensors | None, delta: Tensor | None, rng_state: str | None) -> None:
        if x is None:
            tensor = apply_key(pretrained.get(key), None, out_dtypes[key])
        elif method.output_is_weights:  # θ_m itself (mergekit's linear): θ_pre is not read
            tensor = delta.to(out_dtypes[key])
        else:  # θ_pre + delta in fp32 (as ``apply_key``), accumulated into the delta: nothing else holds it
            tensor = add_pretrained_(delta, x.pretrained()).to(out_dtypes[key])
        sink.write(key, tensor.to("cpu"), {"rng": rng_state})
        del tensor
        if low_memory or key in grows:
            release_free_heap()
        if key in following:  # the next key's policy, before its inputs are read
            next_outsized = following[key] in outsized
            policy.use(next_outsized)
            # an outsized key's inputs are read once the tensor in flight is written, so the two never overlap
            # (FR at 645 M, 1 thread: peak RSS 1.57-1.62 GiB in 3 of 6 runs without the wait, 1.19-1.23 in 5 of 5)
            if next_outsized:
                sink.wait()

    try:
        with allocation_policy(low_memory) as policy:
            policy.use(bool(plan) and plan[0][0] in outsized)
            fin = execute(method, inputs, emit, seed=seed, skip_keys=done, resume_rng=state.get("rng"),
                          progress=progress, emit_weights=True)
    except BaseException:
        sink.abort()
        raise
    finally:
        if prefetcher is not None:
            prefetcher.close()
    sink.close()
    result = MergeResult({}, fin.task_modules, fin.info, fin.shared_modules)
    return StreamResult(sink.files, result, resumed_keys=len(done), digests=sink.digests)
