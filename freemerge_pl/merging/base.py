"""Result types shared by every merge method: the backbone delta and optional per-task modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from freemerge_pl.errors import CheckpointMismatchError

StateDict = dict[str, Tensor]


class KeyedBuffers:
    """Mixin (list it before ``nn.Module``/``TaskModule``) for a module holding one tensor per key as buffers
    ``<buffer_prefix><j>`` in key order (state-dict names stay valid for any key): ``keys``, ``tensor(key)`` and
    the key order as extra state, checked on load (``check_saved_keys``, naming ``saved_as``)."""

    buffer_prefix: ClassVar[str] = ""
    saved_as: ClassVar[str] = ""

    def _register_keyed(self, tensors: StateDict | None) -> None:
        self._keys: list[str] = []
        for key, t in (tensors or {}).items():
            self.register_buffer(f"{self.buffer_prefix}{len(self._keys)}", t)
            self._keys.append(key)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def tensor(self, key: str) -> Tensor:
        """The buffer of ``key``."""
        return getattr(self, f"{self.buffer_prefix}{self._keys.index(key)}")

    def get_extra_state(self):
        return {"keys": self._keys}

    def set_extra_state(self, state) -> None:
        check_saved_keys(state["keys"], self._keys, self.saved_as)


def check_saved_keys(saved: list[str], keys: list[str], what: str) -> None:
    """A checkpoint's recorded keys must be this module's, in order: else an error naming ``what``."""
    if list(saved) != keys:
        raise CheckpointMismatchError(f"{what} checkpoint keys {saved[:3]}... differ from this module's {keys[:3]}...")


def resolve_tensor(target: nn.Module | StateDict, key: str) -> Tensor:
    """The parameter or buffer ``key`` of a module (or the entry of a state dict), as a tensor."""
    if isinstance(target, dict):
        if key not in target:
            raise KeyError(f"key {key!r} is not in the target state dict")
        return target[key]
    try:
        return target.get_parameter(key).data
    except AttributeError:
        try:
            return target.get_buffer(key)
        except AttributeError as err:
            raise KeyError(f"module {type(target).__name__} has no parameter or buffer {key!r}") from err


class TaskModule(nn.Module):
    """A task-specific module applied in place on top of the merged backbone at inference.

    Subclasses hold their data as buffers (they follow ``.to(device)`` and are saved in checkpoints)
    and implement ``apply_`` / ``restore_``; restoring returns the target bit-identical.
    Several modules may be applied in a row; restore them in the reverse order.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: list[tuple[Tensor, Any]] = []

    def apply_(self, target: nn.Module | StateDict, weight: float = 1.0) -> None:
        raise NotImplementedError

    def restore_(self, target: nn.Module | StateDict) -> None:
        raise NotImplementedError

    @property
    def keys(self) -> list[str]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of storage the module adds (buffers only)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_delta(self, backbone: StateDict) -> StateDict:
        """The change ``apply_(weight=1)`` makes to ``backbone`` (a reference path, for tests and export)."""
        work = {k: backbone[k].clone() for k in self.keys}
        self.apply_(work, 1.0)
        return {k: work[k].float() - backbone[k].float() for k in self.keys}


class DenseDeltaTaskModule(TaskModule):
    """A task module that adds a dense change per key: ``t ← t + w·change(key)`` (fp32, one rounding),
    saving each touched tensor whole for a bit-exact ``restore_``. Subclasses implement ``change``."""

    def change(self, key: str, device: torch.device) -> Tensor:
        raise NotImplementedError

    def apply_(self, target: nn.Module | StateDict, weight: float = 1.0) -> None:
        tensors = [resolve_tensor(target, key) for key in self.keys]  # fail before any write
        saved = []
        for key, t in zip(self.keys, tensors):
            old = t.clone()
            t.copy_((t.float() + weight * self.change(key, t.device)).to(t.dtype))
            saved.append((t, old))
        self._saved.append(saved)

    def restore_(self, target: nn.Module | StateDict) -> None:
        if not self._saved:
            raise RuntimeError("restore_ called without a matching apply_")
        for t, old in reversed(self._saved.pop()):
            t.copy_(old)


@dataclass
class MergeResult:
    """What a merge method returns: the backbone is ``θ_pre + delta``; ``task_modules`` (one per task,
    or None) are applied on top of it per routed input; ``info`` records derived quantities (λ, μ...)."""

    delta: StateDict
    task_modules: list[TaskModule] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    shared_modules: dict[str, nn.Module] = field(default_factory=dict)


def stack(task_vectors: list[StateDict], key: str) -> Tensor:
    """The K task vectors of one key stacked on a new leading dimension (fp32)."""
    return torch.stack([tv[key].float() for tv in task_vectors])
