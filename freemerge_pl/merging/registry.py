"""Name → merge method registry: every method is a ``MergeMethod`` dataclass registered under its name.

The dataclass is the schema: its typed fields are the method's hyperparameters (YAML, ``--help``, the options
reference and validation come from them). The builtin methods' modules are imported by name on first use
(``importlib``), so this module imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging.method import MergeMethod


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its typed configuration class, reference, summary and needed context."""

    name: str
    cls: type[MergeMethod]
    reference: str
    summary: str
    needs: frozenset[str] = field(default_factory=frozenset)

    @property
    def produces_task_modules(self) -> bool:
        return self.cls.produces_task_modules

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameter name → default (the configuration class's fields)."""
        return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(self.cls)}

    def validate(self, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.hyperparameters))
        if unknown:
            hint = ""
            if "semantics" in unknown or "released_options" in unknown:
                hint = (f"; the released-code variants are their own methods now: "
                        f"'{self.name.replace('_released', '')}_released' with flat settings")
            raise HyperparameterError(
                f"method {self.name!r} has no hyperparameter(s) {unknown}; "
                f"accepted: {sorted(self.hyperparameters)}{hint}"
            )

    def build(self, params: dict[str, Any] | None = None) -> MergeMethod:
        """The method's checked configuration object from hyperparameters."""
        params = dict(params or {})
        self.validate(params)
        return self.cls(**params)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, reference: str, needs: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Register a ``MergeMethod`` dataclass under ``name`` (class decorator; sets its ``name``/``reference``).

    ``needs`` names context the method requires beyond task vectors (``data``); the data-dependent methods
    (Fisher, RegMean, AdaMerging, MTL) join the registry with ``needs=("data",)``.
    """

    def deco(cls: type) -> type:
        own_fields = isinstance(cls, type) and "__dataclass_fields__" in vars(cls)  # decorated itself
        if not (own_fields and issubclass(cls, MergeMethod)):
            raise TypeError(f"merge method {name!r}: register a MergeMethod dataclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        cls.name, cls.reference = name, reference
        summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        _REGISTRY[name] = MethodSpec(name, cls, reference, summary, frozenset(needs))
        return cls

    return deco


# Modules whose import fills the registry with the builtin methods.
_BUILTIN_MODULES: tuple[str, ...] = (
    "freemerge_pl.merging.methods.basic",
    "freemerge_pl.merging.methods.ties",
    "freemerge_pl.merging.methods.pcb",
    "freemerge_pl.merging.methods.tsv",
    "freemerge_pl.merging.methods.data_dependent",
    "freemerge_pl.merging.methods.emr",
    "freemerge_pl.merging.methods.fr",
    "freemerge_pl.merging.methods.released",
    "freemerge_pl.merging.methods.twin",
    "freemerge_pl.merging.methods.reference",
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
        stale = {_REGISTRY[name].cls.__module__ for name in added}
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


def build_method(method: str | MergeMethod, method_args: dict[str, Any] | None = None) -> MergeMethod:
    """A checked ``MergeMethod`` from a registry name plus hyperparameters, or a ready ``MergeMethod``."""
    if isinstance(method, MergeMethod):
        if method_args:
            raise ConfigError(f"method_args {sorted(method_args)} given with a configured method object "
                              f"{type(method).__name__}: set the fields on the object instead")
        return method
    return get_method(method).build(method_args)
