"""Name → merge method registry. The signature is the schema: keyword-only typed arguments with
defaults are a method's hyperparameters (YAML, --help and validation come from them)."""

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


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its typed configuration class (or a plain function), reference and summary."""

    name: str
    fn: Callable[..., Any]
    reference: str
    summary: str
    needs: frozenset[str] = field(default_factory=frozenset)
    produces_task_modules: bool = False
    cls: type | None = None

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameter name → default (the config class's fields, or a function's keyword-only arguments)."""
        if self.cls is not None:
            return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(self.cls)}
        sig = inspect.signature(self.fn)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _CONTEXT_ARGS
        }

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

    def build(self, params: dict[str, Any] | None = None):
        """The method's checked configuration object (``MergeMethod``) from hyperparameters."""
        params = dict(params or {})
        self.validate(params)
        if self.cls is not None:
            return self.cls(**params)
        from freemerge_pl.merging.method import FunctionMethod

        return FunctionMethod(self, params)


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
    """Register a ``MergeMethod`` dataclass (or a plain ``fn(task_vectors, *, hyperparameters...) ->
    MergeResult``, which the engine runs on whole in-memory task vectors) under ``name``.

    ``needs`` names context the method requires beyond task vectors (``pretrained``, ``data``); the
    data-dependent methods (Fisher, RegMean, AdaMerging) join the registry with ``needs=("data",)``.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        if isinstance(fn, type):
            fn.name, fn.reference = name, reference
            _REGISTRY[name] = MethodSpec(name, functional(fn), reference, summary, frozenset(needs),
                                         fn.produces_task_modules, cls=fn)
        else:
            _REGISTRY[name] = MethodSpec(name, fn, reference, summary, frozenset(needs), produces_task_modules)
        return fn

    return deco


# Modules whose import fills the registry with the builtin methods.
_BUILTIN_MODULES: tuple[str, ...] = (
    "freemerge_pl.merging.baselines",
    "freemerge_pl.merging.data_dependent",
    "freemerge_pl.merging.emr",
    "freemerge_pl.merging.fr",
    "freemerge_pl.merging.released",
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


def functional(cls: type) -> Callable[..., Any]:
    """``fn(task_vectors, *, generator=None, **hyperparameters) -> MergeResult`` for a method class: the
    engine run on in-memory task vectors (one function object per class)."""
    if "_functional" in cls.__dict__:
        return cls.__dict__["_functional"]

    def fn(task_vectors, *, generator=None, dtypes=None, **hyperparameters):
        from freemerge_pl.merging.engine import merge_task_vectors

        return merge_task_vectors(cls(**hyperparameters), task_vectors, generator=generator, dtypes=dtypes)

    fn.__name__ = fn.__qualname__ = getattr(cls, "name", "") or cls.__name__
    fn.__doc__ = cls.__doc__
    fn.__module__ = cls.__module__
    cls._functional = fn
    return fn


def build_method(method, method_args: dict[str, Any] | None = None):
    """A checked ``MergeMethod`` from a registry name plus hyperparameters, or a ready ``MergeMethod``."""
    from freemerge_pl.merging.method import MergeMethod

    if isinstance(method, MergeMethod):
        if method_args:
            raise ConfigError(f"method_args {sorted(method_args)} given with a configured method object "
                              f"{type(method).__name__}: set the fields on the object instead")
        return method
    return get_method(method).build(method_args)
