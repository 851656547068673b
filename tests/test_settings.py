"""``settings.check_value``/``check_fields``: the one typed-settings checker (methods, router, merge job)."""

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.settings import Range, check_fields, check_value


@dataclass
class Entry:
    path: str


@dataclass
class Job:
    size: int | str = 5
    params: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry | str] = field(default_factory=list)
    ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    dtype: Literal["float32", "bfloat16"] | None = None


@pytest.mark.parametrize("value", [3, "3GB"])
def test_a_union_accepts_any_arm(value):
    check_value("size", value, int | str)


@pytest.mark.parametrize("name, value, error, match", [
    ("size", 1.5, ConfigError, r"^job\.size=1\.5 is not int or str$"),
    ("params", [1], ConfigError, r"^job\.params=\[1\] is not a mapping$"),
    ("entries", [Entry("a"), 3], ConfigError, r"^job\.entries\[1\]=3 is not Entry or str$"),
    ("ratio", float("nan"), HyperparameterError, r"^job\.ratio=nan is outside its accepted range \[0, 1\)$"),
    ("ratio", 1.0, HyperparameterError, r"outside its accepted range \[0, 1\)"),
    ("dtype", "int8", ConfigError, r"^job\.dtype='int8'; accepted: \['float32', 'bfloat16'\]$"),
])
def test_each_bad_field_is_named_in_one_line(name, value, error, match):
    job = Job()
    setattr(job, name, value)
    with pytest.raises(error, match=match):
        check_fields(job, "job")


def test_good_fields_pass():
    check_fields(Job(size="5GB", params={"a": 1}, entries=[Entry("x"), "y"], ratio=0.5, dtype=None), "job")
    check_fields(Job(dtype="bfloat16"), "job")
