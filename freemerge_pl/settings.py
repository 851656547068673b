"""Typed settings, checked once: the one checker behind every option of the package.

A setting is a dataclass field (or a keyword argument) whose annotation says what it accepts:
``Literal[...]`` for choices, ``Annotated[float, Range(0, 1, low_open=True)]`` for a numeric range,
``bool``/``int``/``float``/``str`` for a plain type. ``check_fields(obj, owner)`` reads the annotations of a
dataclass instance and raises one ``HyperparameterError``/``ConfigError`` in one message format naming
``owner.field``. jsonargparse (and so LightningCLI) reads the same annotations to build, check and document
the options from YAML, so a field is declared in one place only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from freemerge_pl.errors import ConfigError, HyperparameterError

__all__ = ["Annotated", "Range", "check_fields", "check_value", "describe"]


@dataclass(frozen=True)
class Range:
    """A numeric interval (closed unless ``low_open``/``high_open``); ``integer`` also asks for an int."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        ok_low = value > self.low if self.low_open else value >= self.low
        ok_high = value < self.high if self.high_open else value <= self.high
        return ok_low and ok_high

    def __str__(self) -> str:
        lb = "(" if self.low_open else "["
        hb = ")" if self.high_open else "]"

        def fmt(x: float) -> str:
            if math.isinf(x):
                return "inf" if x > 0 else "-inf"
            return f"{x:g}"

        return f"{lb}{fmt(self.low)}, {fmt(self.high)}{hb}"

    def check(self, name: str, value: Any) -> None:
        """Raise ``HyperparameterError`` (the package's one range message) unless ``value`` lies inside."""
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.integer and not (isinstance(value, int) and not isinstance(value, bool)):
            raise HyperparameterError(f"{name}={value!r} is not an integer; accepted range {self}")
        if not numeric or (isinstance(value, float) and math.isnan(value)) or not self.contains(value):
            raise HyperparameterError(f"{name}={value!r} is outside its accepted range {self}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def check_value(name: str, value: Any, annotation: Any) -> None:
    """Check one value against its annotation: ``Annotated`` ranges, ``Literal`` choices, optional (``None``)."""
    inner, optional = _strip_optional(annotation)
    if value is None and optional:
        return
    if get_origin(inner) is Annotated:
        base, *meta = get_args(inner)
        check_value(name, value, base)
        for m in meta:
            if isinstance(m, Range):
                m.check(name, value)
        return
    inner, optional = _strip_optional(inner)
    if value is None and optional:
        return
    if get_origin(inner) in (typing.Union, types.UnionType):  # X | Y: one of the arms accepts it
        for arm in get_args(inner):
            try:
                return check_value(name, value, arm)
            except (ConfigError, HyperparameterError):
                continue
        raise ConfigError(f"{name}={value!r} is not {describe(inner)}")
    if get_origin(inner) is dict or inner is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is not a mapping")
        return
    if isinstance(inner, type) and dataclasses.is_dataclass(inner) and not isinstance(value, inner):
        raise ConfigError(f"{name}={value!r} is not a {inner.__name__}")
    if get_origin(inner) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} is not a list")
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", item, (get_args(inner) or (Any,))[0])
        return
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if value not in choices or type(value) is not type(next((c for c in choices if c == value), value)):
            raise ConfigError(f"{name}={value!r}; accepted: {list(choices)}")
    elif inner is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a bool")
    elif inner is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}={value!r} is not an integer")
    elif inner is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}={value!r} is not a number")
    elif inner is str and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} is not a string")


def check_fields(obj: Any, owner: str = "") -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation (``owner.field`` in errors)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if f.name.startswith("_") or f.name not in hints:
            continue
        check_value(f"{owner}.{f.name}" if owner else f.name, getattr(obj, f.name), hints[f.name])


def describe(annotation: Any) -> str:
    """A short human-readable form of an annotation (``float in (0, 1]``, ``one of 'a', 'b'``) for docs."""
    inner, optional = _strip_optional(annotation)
    suffix = " or null" if optional else ""
    if get_origin(inner) is Annotated:
        base, *meta = get_args(inner)
        ranges = [str(m) for m in meta if isinstance(m, Range)]
        return describe(base) + (f" in {ranges[0]}" if ranges else "") + suffix
    if get_origin(inner) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(inner)) + suffix
    if get_origin(inner) in (typing.Union, types.UnionType):
        return " or ".join(describe(arm) for arm in get_args(inner)) + suffix
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return name + suffix
