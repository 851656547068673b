"""The merge engine: one per-tensor core, several drivers (in-memory task vectors, in-memory checkpoints,
streaming checkpoints from lazy sources into a sink).

``execute`` runs a method's statistics passes (``MergeMethod.statistics``), then one merge pass over the
keys in output order, handing each key's delta to ``emit``; it never holds more than one key's K tensors
(plus what the method itself keeps: expert entries, low-rank factors). Every driver calls it, so the
in-memory ``merge()`` and the streaming merge compute bit-identical tensors from the same inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from freemerge_pl.errors import (
    CheckpointMismatchError,
    ConfigError,
    FreeMergeError,
    HyperparameterError,
    NonFiniteError,
)
from freemerge_pl.merging.base import MergeResult, StateDict
from freemerge_pl.merging.fourier import FILTER_RATIO_RANGE, highpass
from freemerge_pl.merging.method import (
    Context,
    Finalized,
    KeyOutput,
    KeyTensors,
    MergeMethod,
    Scan,
    VectorChunks,
)
from freemerge_pl.merging.source import TensorSource
from freemerge_pl.merging.topk import SUM_BLOCK, flat_chunks


def prefilter_transform(fr_filter_ratio: float, cutoff_mode: str = "fraction") -> Callable[[Tensor], Tensor] | None:
    """The FR high-pass as a pre-transform of every task vector (paper Table 8); None when off."""
    FILTER_RATIO_RANGE.check("fr_filter_ratio", fr_filter_ratio)
    if fr_filter_ratio == 0:
        return None
    return lambda v: highpass(v, fr_filter_ratio, cutoff_mode=cutoff_mode)


def check_prefilter(method: MergeMethod, fr_filter_ratio: float) -> None:
    """``fr_filter_ratio`` on a method that filters itself would filter twice: an error naming both."""
    if fr_filter_ratio and not method.uses_task_vectors:
        raise HyperparameterError(f"fr_filter_ratio={fr_filter_ratio} has nothing to filter: method {method.name!r} "
                                  f"uses no task vectors (θ_pre or each θ_k as stored); set it to 0")
    if fr_filter_ratio and method.filters_task_vectors:
        raise HyperparameterError(
            f"fr_filter_ratio={fr_filter_ratio} would high-pass the task vectors a second time: method "
            f"{method.name!r} already filters them (its filter_ratio); set one of the two")


# ---------------------------------------------------------------------------------------------- inputs


def compile_patterns(patterns: str | Sequence[str] | None) -> re.Pattern | None:
    """One regex searching for any of ``patterns`` (None when there are none)."""
    if not patterns:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    return re.compile("|".join(f"(?:{p})" for p in patterns))


class MergeInputs:
    """Where a merge reads from: the merged keys (in output order) and each key's ``KeyTensors``."""

    keys: list[str]
    output_keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    num_tasks: int

    def load(self, key: str) -> KeyTensors:
        raise NotImplementedError


class TaskVectorInputs(MergeInputs):
    """Precomputed task vectors (key → tensor per task) held in memory; ``dtypes`` default float32."""

    def __init__(self, task_vectors: Sequence[StateDict], *, device=None,
                 transform: Callable[[Tensor], Tensor] | None = None,
                 dtypes: dict[str, torch.dtype] | None = None) -> None:
        if len(task_vectors) == 0:
            raise FreeMergeError("no task vectors were given: merging needs at least one fine-tuned model")
        self.task_vectors = list(task_vectors)
        self.keys = list(self.task_vectors[0])
        self.output_keys = self.keys
        for i, tv in enumerate(self.task_vectors[1:], start=1):
            if set(tv) != set(self.keys):
                missing, extra = sorted(set(self.keys) - set(tv))[:5], sorted(set(tv) - set(self.keys))[:5]
                raise CheckpointMismatchError(f"task vector {i} keys differ from task vector 0's: "
                                              f"missing {missing}, unexpected {extra}")
        self.shapes = {k: tuple(self.task_vectors[0][k].shape) for k in self.keys}
        self.dtypes = {k: (dtypes or {}).get(k, torch.float32) for k in self.keys}
        self.num_tasks = len(self.task_vectors)
        self.device = device
        self.transform = transform

    def _loader(self, k: int, key: str) -> Callable[[], Tensor]:
        def load() -> Tensor:
            v = self.task_vectors[k][key]
            v = v if self.device is None else v.to(self.device)
            return v if v.dtype == torch.float64 else v.float()  # float64 inputs stay float64
        return load

    def load(self, key: str) -> KeyTensors:
        return KeyTensors(key, self.shapes[key], self.dtypes[key],
                          [self._loader(k, key) for k in range(self.num_tasks)], transform=self.transform)


class CheckpointInputs(MergeInputs):
    """θ_pre and θ_1..θ_K read lazily from sources; ``v_k = θ_k − θ_pre`` in float32 on ``device``.

    Checks keys, shapes and dtype kinds from the sources' metadata at construction (no tensor read);
    NaN/Inf are caught as each task vector is computed (``check_finite``), naming checkpoint and key.
    Integer/bool tensors and keys matched by ``exclude_keys`` are passed through from θ_pre.
    """

    def __init__(self, pretrained: TensorSource, finetuned: Sequence[TensorSource], *,
                 names: Sequence[str] | None = None, exclude_keys: str | Sequence[str] | None = None,
                 device=None, transform: Callable[[Tensor], Tensor] | None = None,
                 check_finite: bool = True, strict_dtypes: bool = False) -> None:
        if len(finetuned) == 0:
            raise ConfigError("no fine-tuned models were given: merging needs at least one")
        self.pretrained = pretrained
        self.finetuned = list(finetuned)
        self.names = list(names) if names is not None else [s.name for s in self.finetuned]
        if len(self.names) != len(self.finetuned):
            raise ConfigError(f"{len(self.names)} names for {len(self.finetuned)} fine-tuned models")
        self.device = device
        self.transform = transform
        self.check_finite = check_finite
        self._finite: set[tuple[str, int]] = set()  # (key, task) checked finite already (-1: θ_pre)
        self.num_tasks = len(self.finetuned)
        pattern = compile_patterns(exclude_keys)
        self.output_keys = list(pretrained.keys())
        self.excluded = [k for k in self.output_keys if pattern is not None and pattern.search(k)]
        kept = [k for k in self.output_keys if k not in set(self.excluded)]
        infos = {k: pretrained.info(k) for k in kept}
        self._check(kept, infos, pattern, strict_dtypes)
        self.keys = [k for k in kept if infos[k].dtype.is_floating_point]
        self.shapes = {k: infos[k].shape for k in self.keys}
        self.dtypes = {k: infos[k].dtype for k in self.keys}

    def _check(self, kept, infos, pattern, strict_dtypes: bool) -> None:
        ref = set(kept)
        for name, src in zip(self.names, self.finetuned):
            keys = {k for k in src if not (pattern is not None and pattern.search(k))}
            missing, extra = sorted(ref - keys), sorted(keys - ref)
            if missing or extra:
                raise CheckpointMismatchError(
                    f"checkpoint {name!r} does not match the pre-trained keys: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
            for k in kept:
                a, b = infos[k], src.info(k)
                where = f" ({b.file})" if b.file and b.file != name else ""
                if a.shape != b.shape:
                    raise CheckpointMismatchError(
                        f"checkpoint {name!r}{where} key {k!r} has shape {tuple(b.shape)}, "
                        f"the pre-trained model has {tuple(a.shape)}")
                kind_differs = a.dtype.is_floating_point != b.dtype.is_floating_point
                if kind_differs or (strict_dtypes and a.dtype != b.dtype):
                    why = (" (floating point and integer tensors cannot be merged)" if kind_differs else
                           " (mixed dtypes; cast the checkpoints or allow the mix)")
                    raise CheckpointMismatchError(f"checkpoint {name!r}{where} key {k!r} has dtype {b.dtype}, "
                                                  f"the pre-trained model has {a.dtype}{why}")

    def load(self, key: str) -> KeyTensors:
        cache: dict[str, Tensor] = {}

        def pre() -> Tensor:
            if "pre" not in cache:
                t = self.pretrained.get(key)
                t = t if self.device is None else t.to(self.device)
                if self.check_finite and (key, -1) not in self._finite and not all_finite(t):
                    raise_nonfinite(self.pretrained.name, self.pretrained.info(key).file, key, t)
                self._finite.add((key, -1))
                cache["pre"] = t
            return cache["pre"]

        def pre_fp32() -> Tensor:
            if "fp32" not in cache:
                cache["fp32"] = pre().float()
            return cache["fp32"]

        def theta(k: int) -> Tensor:
            t = self.finetuned[k].get(key)
            t = t if self.device is None else t.to(self.device)
            if self.check_finite and (key, k) not in self._finite and not all_finite(t):
                raise_nonfinite(self.names[k], self.finetuned[k].info(key).file, key, t)
            self._finite.add((key, k))
            return t

        def loader(k: int) -> Callable[[], Tensor]:
            def load() -> Tensor:
                base = pre()
                t = theta(k).to(base.device)
                if base.dtype in WIDEN_EXACTLY:  # fp32(θ_k) − fp32(θ_pre), θ_pre widened block by block
                    return blockwise_(t.to(torch.float32, copy=True), base, torch.Tensor.sub_)
                return t.float() - pre_fp32()
            return load

        def chunk_loader(k: int) -> Callable[[], VectorChunks]:
            def load() -> VectorChunks:
                base = pre()
                if base.dtype not in WIDEN_EXACTLY:  # float64 θ_pre: the whole-vector path
                    return VectorChunks.of(loader(k)())
                t, b = theta(k).to(base.device).reshape(-1), base.reshape(-1)

                def chunks(size: int | None):  # fp32(θ_k) − fp32(θ_pre) per chunk: the same values as ``loader``'s
                    small = size is not None and size <= SUM_BLOCK  # blocks: one buffer, valid until the next
                    buf = torch.empty(min(size, t.numel()), dtype=torch.float32, device=t.device) if small else None
                    for s, part in flat_chunks(t, size):
                        n = part.numel()
                        c = part.to(torch.float32, copy=True) if buf is None else buf[:n].copy_(part)
                        yield s, c.sub_(b[s:s + n])
                return VectorChunks(t.numel(), chunks,  # the same float32 operation at the given entries
                                    lambda idx: t[idx].to(torch.float32).sub_(b[idx]))
            return load

        return KeyTensors(key, self.shapes[key], self.dtypes[key], [loader(k) for k in range(self.num_tasks)],
                          pretrained=pre, pretrained_fp32=pre_fp32, transform=self.transform,
                          chunk_loaders=[chunk_loader(k) for k in range(self.num_tasks)],
                          finetuned=[lambda k=k: theta(k) for k in range(self.num_tasks)])


#: dtypes whose values float32 holds exactly: an in-place float32 op with such an operand widens it on the fly
WIDEN_EXACTLY = (torch.float32, torch.bfloat16, torch.float16)


_BLOCK = 1 << 22  # elements per block of the widening in-place ops (16 MiB of float32)


def blockwise_(out: Tensor, other: Tensor, op) -> Tensor:
    """``op(out, other)`` in place, in row blocks: an in-place op whose operand has another dtype casts the
    whole operand first (a float32 temporary of ``out``'s size); per block that temporary stays small."""
    if out.dim() == 0 or out.numel() <= _BLOCK:
        return op(out, other)
    rows = max(1, _BLOCK // max(1, out[0].numel()))
    for i in range(0, out.shape[0], rows):
        op(out[i:i + rows], other[i:i + rows])
    return out


def add_pretrained_(delta: Tensor, pretrained: Tensor) -> Tensor:
    """``delta += fp32(θ_pre)`` in place (``apply_key``'s sum), without an fp32 copy of a bf16/fp16 θ_pre."""
    return _with_pretrained_(delta, pretrained, torch.Tensor.add_)


def sub_pretrained_(weights: Tensor, pretrained: Tensor) -> Tensor:
    """``weights −= fp32(θ_pre)`` in place: the delta of a method that returns θ_m (``output_is_weights``)."""
    return _with_pretrained_(weights, pretrained, torch.Tensor.sub_)


def _with_pretrained_(out: Tensor, pretrained: Tensor, op) -> Tensor:
    pretrained = pretrained.to(out.device)
    if pretrained.dtype not in WIDEN_EXACTLY:
        return op(out, pretrained.float())
    return blockwise_(out, pretrained.reshape(out.shape), op)


def all_finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: one ``aminmax`` read (NaN propagates into both, ±Inf shows in one), no temporary;
    ``t.sum(dtype=float32)`` of a bf16 tensor made a float32 copy of it first."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def raise_nonfinite(name: str, file: str, key: str, t: Tensor) -> None:
    n_bad = int((~torch.isfinite(t)).sum())
    where = f" ({file})" if file and file != name else ""
    raise NonFiniteError(f"checkpoint {name!r}{where} key {key!r} (shape {tuple(t.shape)}) holds {n_bad} "
                         f"NaN/Inf value(s)")


# ---------------------------------------------------------------------------------------------- core


def _progress(enabled):
    """``progress`` of ``execute``: False/None (silent), True (a tqdm bar on a terminal, periodic lines
    otherwise), or a callable ``(keys, desc) ->
    iterable`` (e.g. ``freemerge_pl.progress.progress_iter``: periodic lines when stderr is not a terminal)."""
    if callable(enabled):
        return enabled
    if not enabled:
        return None
    from freemerge_pl.progress import progress_iter

    return lambda keys, desc: progress_iter(keys, desc, unit="tensor")


def preflight(method: MergeMethod, inputs: MergeInputs, *, generator: torch.Generator | None = None,
              cache: dict | None = None) -> Context:
    """The run's context, after the method's checks that need the keys, shapes and task count (``begin``);
    nothing is read."""
    ctx = Context(inputs.num_tasks, inputs.keys, generator=generator if method.random else None,
                  cache=cache, device=getattr(inputs, "device", None))
    ctx.shapes, ctx.dtypes = inputs.shapes, inputs.dtypes
    method.begin(ctx)
    return ctx


def execute(
    method: MergeMethod,
    inputs: MergeInputs,
    emit: Callable[[str, KeyTensors | None, Tensor | None, str | None], None],
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    cache: dict | None = None,
    progress: bool = False,
    skip_keys: Iterable[str] = (),
    resume_rng: str | None = None,
    emit_weights: bool = False,
) -> Finalized:
    """Run ``method`` over ``inputs``: statistics passes, then per key in ``inputs.output_keys`` order
    ``emit(key, x, delta, rng_state)`` (``x``/``delta`` None for a key passed through from θ_pre;
    ``rng_state`` the generator's state after the key, base64, for random methods, else None).

    ``skip_keys`` (resume): keys already written; they are not emitted, and are not computed at all
    unless the method builds task modules from them. ``resume_rng`` (a ``rng_state`` emitted by an earlier
    run) restores the generator before the first computed key when keys were skipped.
    ``emit_weights``: a method whose ``merge_key`` returns θ_m (``output_is_weights``) has it emitted as is (the
    caller writes it; θ_pre is not read); otherwise, and for every other method, ``delta`` is θ_m − θ_pre.
    """
    if method.random and generator is None:
        generator = torch.Generator(device=inputs.device or "cpu").manual_seed(seed)
    ctx = preflight(method, inputs, generator=generator, cache=cache)
    show = _progress(progress)
    stats = method.statistics(Scan(inputs.keys, inputs.load, ctx, show))
    skip = set(skip_keys)
    merged = set(inputs.keys)
    pieces: dict[str, Any] = {}
    restore_pending = bool(skip) and resume_rng is not None
    keys = show(inputs.output_keys, "merge") if show else inputs.output_keys
    for key in keys:
        if key not in merged:
            if key not in skip:
                emit(key, None, None, ctx.rng_state())
            continue
        if key in skip and not method.produces_task_modules:
            continue
        if restore_pending and key not in skip and key not in ctx._rng_states:
            ctx.restore_rng(resume_rng)
            restore_pending = False
        x = inputs.load(key)
        out = method.merge_key(x, stats, ctx)
        delta, piece = (out.delta, out.pieces) if isinstance(out, KeyOutput) else (out, None)
        if method.output_is_weights and not emit_weights:  # θ_m − fp32(θ_pre), θ_pre widened block by block
            delta = sub_pretrained_(delta, x.pretrained())
        if piece is not None:
            pieces[key] = piece
        if key not in skip:
            emit(key, x, delta, ctx.rng_state())
        del x, out, delta, piece  # not held while the next key is computed
    finalized = method.finalize(pieces, stats, ctx)
    finalized.info = {**ctx.info, **finalized.info}
    return finalized


# ---------------------------------------------------------------------------------------------- drivers


def merge_task_vectors(
    method: MergeMethod,
    task_vectors: Sequence[StateDict],
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    cache: dict | None = None,
    device=None,
    fr_filter_ratio: float = 0.0,
    dtypes: dict[str, torch.dtype] | None = None,
) -> MergeResult:
    """Run ``method`` on precomputed task vectors; the result's ``delta`` is key → fp32 tensor."""
    check_prefilter(method, fr_filter_ratio)
    inputs = TaskVectorInputs(task_vectors, device=device, transform=prefilter_transform(fr_filter_ratio),
                              dtypes=dtypes)
    delta: StateDict = {}

    def emit(key: str, x: KeyTensors | None, d: Tensor | None, rng_state: str | None) -> None:
        delta[key] = d

    fin = execute(method, inputs, emit, generator=generator, seed=seed, cache=cache)
    return MergeResult(delta, fin.task_modules, fin.info, fin.shared_modules)


def apply_key(pretrained: Tensor, delta: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """``θ_pre + delta`` in fp32, cast to ``dtype`` (θ_pre's by default); θ_pre itself when delta is None."""
    dtype = dtype or pretrained.dtype
    if delta is None:
        return pretrained.to(dtype) if pretrained.is_floating_point() else pretrained
    return (pretrained.float() + delta.to(device=pretrained.device, dtype=torch.float32)).to(dtype)
