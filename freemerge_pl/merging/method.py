"""A merge method as a typed configuration plus per-tensor kernels (the engine's contract).

A method is a dataclass whose fields are its hyperparameters, typed for ``freemerge_pl.settings``: ``Literal``
for choices, ``Annotated[float, Range(...)]`` for ranges (the aliases below), so YAML, ``--help``, the options
reference and validation (``settings.check_fields``, once, at construction) come from one place; ``check``
adds the constraints across fields. It is registered by name (``registry.register``) and run by the engine
(``merge()``, the merge job, ``engine.merge_task_vectors``). It implements:

* ``statistics(scan)``: whatever it needs across tensors (λ, thresholds, rescalers). ``scan(fn)`` calls
  ``fn(x)`` for every key with that key's ``KeyTensors`` (one key's K task vectors at a time); a method may
  scan several times (e.g. an exact quantile: a coarse then a fine histogram pass). Default: none.
* ``merge_key(x, stats, ctx)``: one key's merged delta (``Tensor``) or a ``KeyOutput`` (delta + per-task
  pieces such as expert entries or low-rank factors).
* ``finalize(pieces, stats, ctx)``: task modules / shared modules / info from the collected pieces.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from freemerge_pl.errors import ConfigError
from freemerge_pl.merging.base import TaskModule
from freemerge_pl.merging.topk import SUM_BLOCK, flat_chunks
from freemerge_pl.settings import Range
from freemerge_pl.settings import check_fields as check_typed_fields

#: typed hyperparameters: the accepted range is part of the annotation (``settings.Range``)
Finite = Annotated[float, Range(-math.inf, math.inf, low_open=True, high_open=True)]
Positive = Annotated[float, Range(0, math.inf, low_open=True, high_open=True)]
NonNegative = Annotated[float, Range(0, math.inf, high_open=True)]
#: a share of entries kept (TIES/PCB density, FREE's expert density): (0, 1]
Density = Annotated[float, Range(0, 1, low_open=True)]
#: a probability or share that may be 0 but not 1 (drop rates, FR filter ratio): [0, 1)
Rate = Annotated[float, Range(0, 1, high_open=True)]
Unit = Annotated[float, Range(0, 1)]
Count = Annotated[int, Range(1, math.inf, integer=True)]

# ---------------------------------------------------------------------------------------- inputs of a key


class VectorChunks:
    """A task vector as ``(offset, flat float32 chunk)`` pairs, re-iterable (each iteration is one pass):
    ``flat_chunks``' chunks, or ``blocks(size)`` of another size (the same values; ``chunks(size)`` yields them,
    ``chunks(None)`` ``flat_chunks``' default). A block is valid until the next one is drawn: blocks computed
    from checkpoints (``SUM_BLOCK`` or smaller) share one buffer, so no page is faulted in per block."""

    def __init__(self, numel: int, chunks: Callable[[int | None], Iterator[tuple[int, Tensor]]],
                 at: Callable[[Tensor], Tensor] | None = None) -> None:
        self.numel = numel
        self._chunks = chunks
        self._at = at

    def at(self, idx: Tensor) -> Tensor:
        """The values at flat indices ``idx`` (the chunks' own values, computed at those entries only)."""
        return self._at(idx)

    @classmethod
    def of(cls, v: Tensor) -> VectorChunks:
        """Views of a task vector held in memory."""
        return cls(v.numel(), lambda size: flat_chunks(v, size), lambda idx: v.reshape(-1)[idx])

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        return self._chunks(None)

    def blocks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        return self._chunks(size)


class KeyTensors:
    """One key's inputs: θ_pre's tensor (lazily) and the K task vectors v_k in float32 on the merge device.

    ``vector(k)`` computes v_k on demand (from checkpoints: θ_k − θ_pre; re-read on every call unless the
    stack was built), ``vectors()`` iterates them, ``stacked()`` builds (and keeps) the ``[K, *shape]`` stack.
    Returned tensors must not be modified in place.
    """

    def __init__(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        loaders: Sequence[Callable[[], Tensor]],
        *,
        pretrained: Callable[[], Tensor] | None = None,
        pretrained_fp32: Callable[[], Tensor] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        chunk_loaders: Sequence[Callable[[], VectorChunks]] | None = None,
        finetuned: Sequence[Callable[[], Tensor]] | None = None,
    ) -> None:
        self.key = key
        self.shape = tuple(shape)
        self.dtype = dtype
        self._loaders = list(loaders)
        self._pretrained = pretrained
        self._pretrained_fp32 = pretrained_fp32
        self._transform = transform
        self._chunk_loaders = list(chunk_loaders) if chunk_loaders is not None and transform is None else None
        self._stack: Tensor | None = None
        self._finetuned = list(finetuned) if finetuned is not None else None

    @property
    def num_tasks(self) -> int:
        return len(self._loaders)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def vector(self, k: int) -> Tensor:
        if self._stack is not None:
            return self._stack[k]
        v = self._loaders[k]()
        return v if self._transform is None else self._transform(v)

    def vectors(self) -> Iterator[Tensor]:
        for k in range(self.num_tasks):
            yield self.vector(k)

    def vector_chunks(self, k: int) -> VectorChunks:
        """v_k as flat float32 chunks (``VectorChunks``: iterate it once per pass): from checkpoints, θ_k is
        read once and each chunk of θ_k − θ_pre is computed when reached, so a pass over a large tensor holds
        θ_k and one chunk instead of a float32 v_k; otherwise views of ``vector(k)``. The values equal
        ``vector(k)``'s element for element."""
        if self._computed:
            return self._chunk_loaders[k]()
        return VectorChunks.of(self.vector(k))

    @property
    def _computed(self) -> bool:
        """v_k is computed chunk by chunk from checkpoints (``vector_chunks``), not held in memory."""
        return self._stack is None and self._chunk_loaders is not None

    def weighted_sum(self, weights: Sequence[float] | None = None,
                     consume: Callable[[int, Iterator[tuple[int, Tensor]]], None] | None = None) -> Tensor:
        """``Σ_k w_k v_k`` in float32 (``weights`` None: ``Σ_k v_k``), accumulated block by block
        (``SUM_BLOCK``) as each v_k's blocks are computed (``vector_chunks``): from checkpoints no float32 v_k
        exists, and each block's work runs in cache (task vectors already in memory are one block). Elementwise
        the same float32 operations as over whole vectors (v_0 copied, or v_0·w_0; then ``add_`` of v_k, with
        ``alpha=w_k``), so the same values.

        ``consume(k, blocks)``: task k's ``(offset, block)`` iterator is handed to it, and the sum grows as it
        pulls the blocks (FREE's expert cut reads v_k in the same pass); what it leaves is drained. Without it
        the blocks are only summed."""
        out: list[Tensor] = []  # the sum, allocated on the first block's device
        size = SUM_BLOCK if self._computed else max(1, self.numel)  # a v_k in memory is one block

        def summed(k: int) -> Iterator[tuple[int, Tensor]]:
            w = None if weights is None else weights[k]
            for s, c in self.vector_chunks(k).blocks(size):
                c = c.reshape(-1)
                c = c if c.dtype == torch.float32 else c.to(torch.float32)
                if not out:
                    out.append(torch.empty(self.numel, dtype=torch.float32, device=c.device))
                part = out[0][s:s + c.numel()]
                if k == 0:
                    part.copy_(c) if w is None else torch.mul(c, w, out=part)
                else:
                    part.add_(c) if w is None else part.add_(c, alpha=w)
                yield s, c

        for k in range(self.num_tasks):
            blocks = summed(k)
            if consume is not None:
                consume(k, blocks)
            for _ in blocks:  # what ``consume`` left (all of it without one)
                pass
            del blocks  # θ_k freed before θ_{k+1} is read
        total = out[0] if out else torch.zeros(self.numel, dtype=torch.float32)
        return total.view(self.shape)

    def stacked(self) -> Tensor:
        if self._stack is None:
            self._stack = torch.stack(list(self.vectors()))
        return self._stack

    def pretrained(self) -> Tensor:
        if self._pretrained is None:
            raise RuntimeError(f"key {self.key!r}: θ_pre is not available to this merge")
        return self._pretrained()

    def finetuned(self, k: int) -> Tensor:
        """θ_k's tensor as its checkpoint stores it (its dtype; no pre-filter): for methods that use the
        checkpoints themselves (``individual``); only when the inputs are checkpoints."""
        if self._finetuned is None:
            raise ConfigError(f"key {self.key!r}: the fine-tuned checkpoints are not available to this merge "
                              f"(task vectors only); run the method on checkpoints (merge(), the merge job)")
        return self._finetuned[k]()

    def pretrained_fp32(self) -> Tensor:
        """θ_pre in float32 (computed once per key when the inputs are checkpoints)."""
        return self._pretrained_fp32() if self._pretrained_fp32 is not None else self.pretrained().float()


@dataclass
class KeyOutput:
    """A key's merged delta plus per-task pieces (``pieces[k]`` for task k; None when there are none)."""

    delta: Tensor
    pieces: Any = None


class Scan:
    """Runs a statistics pass: ``scan(fn)`` calls ``fn(x)`` for every merged key in order."""

    def __init__(self, keys: Sequence[str], load: Callable[[str], KeyTensors], ctx: Context,
                 progress: Callable[[Sequence[str], str], Any] | None = None) -> None:
        self.keys = list(keys)
        self._load = load
        self.ctx = ctx
        self._progress = progress
        self.passes = 0

    def __call__(self, fn: Callable[[KeyTensors], None], desc: str = "statistics") -> None:
        self.passes += 1
        keys = self._progress(self.keys, f"{desc} (pass {self.passes})") if self._progress else self.keys
        for key in keys:
            fn(self._load(key))


class Context:
    """What a kernel may use besides its inputs: the task count, seeded per-key random generators that
    replay identically in every pass, a memo (kept across merges when the caller gives a cache: tuning),
    and an ``info`` record."""

    def __init__(self, num_tasks: int, keys: Sequence[str], *, generator: torch.Generator | None = None,
                 cache: dict | None = None, device: torch.device | str | None = None) -> None:
        self.num_tasks = num_tasks
        self.keys = list(keys)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = generator
        self.cache = cache
        self.info: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._rng_states: dict[str, Tensor] = {}

    def rng(self, key: str) -> torch.Generator:
        """The run's generator, positioned where it was the first time ``key`` asked for it."""
        if self.generator is None:
            raise RuntimeError("this merge has no random generator")
        if key in self._rng_states:
            self.generator.set_state(self._rng_states[key])
        else:
            self._rng_states[key] = self.generator.get_state()
        return self.generator

    def rng_state(self) -> str | None:
        """The generator's current state, base64 (stored with a completed shard to resume from)."""
        if self.generator is None:
            return None
        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()

    def restore_rng(self, state: str | None) -> None:
        if state is not None and self.generator is not None:
            raw = bytearray(base64.b64decode(state))
            self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, remembered under ``key`` when a cache was given (else computed every time)."""
        if self.cache is None:
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass
class Finalized:
    task_modules: list[TaskModule] | None = None
    shared_modules: dict[str, nn.Module] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- typed configs


@dataclass
class MergeMethod:
    """Base of every merge method: a typed, checked configuration with per-tensor kernels."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    produces_task_modules: ClassVar[bool] = False
    #: the method applies the FR high-pass itself (so the ``fr_filter_ratio`` pre-filter would filter twice)
    filters_task_vectors: ClassVar[bool] = False
    #: the method draws random numbers (it gets a seeded generator)
    random: ClassVar[bool] = False
    #: the method reads the task vectors (False: it uses θ_pre or θ_k as stored, so a pre-filter is refused)
    uses_task_vectors: ClassVar[bool] = True
    #: ``merge_key`` returns θ_m's float32 tensor itself, not a delta from θ_pre (mergekit's ``linear``): the
    #: streaming job writes it without reading θ_pre; ``execute`` gives every other caller θ_m − θ_pre
    output_is_weights: ClassVar[bool] = False
    #: ``filter_ratio`` sizes what the filter keeps (larger filters less), not what it removes
    filter_ratio_keeps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a tuple is taken as a list (YAML and JSON give lists)
            if isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, list(getattr(self, f.name)))
        check_typed_fields(self, self.name or type(self).__name__)
        self.check()

    def check(self) -> None:
        """Constraints across fields, after each field was checked against its annotation (at construction);
        a range on a derived value uses ``Range(...).check(name, value)`` (the one message format)."""

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def statistics(self, scan: Scan) -> Any:
        return None

    def merge_key(self, x: KeyTensors, stats: Any, ctx: Context) -> Tensor | KeyOutput:
        """One key's delta: a tensor the engine owns (it may add θ_pre into it in place), so pieces that
        must outlive the key hold their own copies; with a cache (tuning) deltas are never modified."""
        raise NotImplementedError

    def finalize(self, pieces: dict[str, Any], stats: Any, ctx: Context) -> Finalized:
        return Finalized()

    def begin(self, ctx: Context) -> None:
        """Checks that need the merged keys, shapes or task count (before anything is read or written)."""
