"""Task vectors over state dicts: validation, v_k = θ_k − θ_pre in fp32, and applying a merged delta."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from freemerge_pl.errors import ConfigError, NonFiniteError
from freemerge_pl.merging.engine import CheckpointInputs, compile_patterns
from freemerge_pl.merging.source import StateDictSource

StateDict = dict[str, Tensor]


def is_mergeable(tensor: Tensor) -> bool:
    """Floating-point tensors are merged; integer/bool buffers are copied from θ_pre."""
    return tensor.is_floating_point()


def mergeable_keys(pretrained: StateDict, exclude_keys: str | Sequence[str] | None = None) -> list[str]:
    """Keys of ``pretrained`` that are floating point and not matched by ``exclude_keys`` (regexes)."""
    pattern = compile_patterns(exclude_keys)
    return [
        k for k, t in pretrained.items() if is_mergeable(t) and not (pattern is not None and pattern.search(k))
    ]


def validate_checkpoints(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    names: Sequence[str] | None = None,
    exclude_keys: str | Sequence[str] | None = None,
    check_finite: bool = True,
) -> list[str]:
    """Check keys, shapes, dtypes (the engine's ``CheckpointInputs`` checks) and finiteness; return the keys
    to merge. Keys matched by ``exclude_keys`` (e.g. task-specific heads) are neither compared nor merged.
    """
    if len(finetuned) == 0:
        raise ConfigError("no fine-tuned models were given: merging needs at least one")
    names = list(names) if names is not None else [f"finetuned[{i}]" for i in range(len(finetuned))]
    if len(names) != len(finetuned):
        raise ConfigError(f"{len(names)} names for {len(finetuned)} fine-tuned models")
    inputs = CheckpointInputs(StateDictSource(pretrained, "pretrained"),
                              [StateDictSource(sd, n) for sd, n in zip(finetuned, names)], names=names,
                              exclude_keys=exclude_keys)
    if check_finite:
        compared = sorted(set(inputs.output_keys) - set(inputs.excluded))
        for name, sd in [("pretrained", pretrained), *zip(names, finetuned)]:
            for k in compared:
                t = sd[k]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    n_bad = int((~torch.isfinite(t)).sum())
                    raise NonFiniteError(
                        f"checkpoint {name!r} key {k!r} (shape {tuple(t.shape)}) holds {n_bad} NaN/Inf value(s)"
                    )
    return inputs.keys


def task_vectors(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    names: Sequence[str] | None = None,
    exclude_keys: str | Sequence[str] | None = None,
) -> list[StateDict]:
    """Validate and return ``v_k = θ_k − θ_pre`` in float32 for every mergeable key."""
    keys = validate_checkpoints(pretrained, finetuned, names, exclude_keys)
    return [{k: sd[k].float() - pretrained[k].float() for k in keys} for sd in finetuned]


def apply_delta(pretrained: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    """Return ``θ_pre + scale·delta`` computed in fp32 and cast to θ_pre's dtypes; other keys copied."""
    out: StateDict = {}
    for k, t in pretrained.items():
        if k in delta:
            out[k] = (t.float() + scale * delta[k].to(device=t.device, dtype=torch.float32)).to(t.dtype)
        else:
            out[k] = t.clone()
    return out
