"""Name → merge method registry. The signature is the schema: keyword-only typed arguments with
defaults are a method's hyperparameters (YAML, --help and validation come from them)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from freemerge_pl.errors import ConfigError, HyperparameterError


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, reference and hyperparameters (name → default)."""

    name: str
    fn: Callable[..., Any]
    reference: str
    summary: str
    needs: frozenset[str] = field(default_factory=frozenset)
    produces_task_modules: bool = False

    @property
    def hyperparameters(self) -> dict[str, Any]:
        sig = inspect.signature(self.fn)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _CONTEXT_ARGS
        }

    def validate(self, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.hyperparameters))
        if unknown:
            raise HyperparameterError(
                f"method {self.name!r} has no hyperparameter(s) {unknown}; "
                f"accepted: {sorted(self.hyperparameters)}"
            )


# Keyword arguments the driver supplies from context rather than from configuration.
_CONTEXT_ARGS = frozenset({"pretrained", "data", "generator"})

_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    reference: str,
    needs: tuple[str, ...] = (),
    produces_task_modules: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(task_vectors, *, hyperparameters...) -> MergeResult`` under ``name``.

    ``needs`` names context the method requires beyond task vectors (``pretrained``, ``data``); the
    data-dependent methods (Fisher, RegMean, AdaMerging) join the registry with ``needs=("data",)``.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = MethodSpec(name, fn, reference, summary, frozenset(needs), produces_task_modules)
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the modules fills the registry.
    from freemerge_pl.merging import baselines, fr  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (clear error listing the known names otherwise)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown merge method {name!r}; known methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)
