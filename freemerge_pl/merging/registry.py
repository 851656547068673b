"""Name → merge method registry. The signature is the schema: keyword-only typed arguments with
defaults are a method's hyperparameters (YAML, --help and validation come from them)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
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


# Modules whose import fills the registry with the builtin methods.
_BUILTIN_MODULES: tuple[str, ...] = (
    "freemerge_pl.merging.baselines",
    "freemerge_pl.merging.emr",
    "freemerge_pl.merging.fr",
    "freemerge_pl.merging.twin",
)


def _forget_module(module_name: str) -> None:
    """Drop a module from ``sys.modules`` and from its parent package, so the next import re-runs it."""
    sys.modules.pop(module_name, None)
    parent_name, _, child = module_name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is not None and getattr(parent, child, None) is not None:
        with contextlib.suppress(AttributeError):
            delattr(parent, child)


def _load_builtin() -> None:
    """Import the builtin method modules (a no-op once imported).

    All or nothing: when an import fails partway, the registrations it made are rolled back and the
    modules that made them are forgotten, so the next call re-imports them and raises the real error
    again (not "already registered"); the original exception propagates unchanged.
    """
    registered_before = set(_REGISTRY)
    modules_before = set(sys.modules)
    try:
        for module_name in _BUILTIN_MODULES:
            importlib.import_module(module_name)
    except BaseException:
        added = [name for name in _REGISTRY if name not in registered_before]
        stale = {_REGISTRY[name].fn.__module__ for name in added}
        stale |= {m for m in _BUILTIN_MODULES if m in sys.modules and m not in modules_before}
        for name in added:
            del _REGISTRY[name]
        for module_name in stale:
            if module_name not in modules_before:  # never forget a module imported before this call
                _forget_module(module_name)
        raise


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
