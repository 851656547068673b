"""The merge-method registry: builtin loading is all-or-nothing, duplicate names, MergeMethod dataclasses only,
the dataclass fields as the schema."""

import dataclasses
import importlib
import sys
import textwrap

import pytest

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import registry
from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.methods import basic
from freemerge_pl.merging.registry import MethodSpec, get_method, list_methods, register

FAKE_PACKAGE = "fm_fake_builtin"

OK_MODULE = """
from dataclasses import dataclass

from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import register

@register("fake_ok", reference="test")
@dataclass
class FakeOk(MergeMethod):
    '''A fake method that imports fine.'''

    alpha: float = 1.0
"""

BAD_MODULE = """
from dataclasses import dataclass

from freemerge_pl.merging.method import MergeMethod
from freemerge_pl.merging.registry import register

@register("fake_bad_first", reference="test")
@dataclass
class FakeBadFirst(MergeMethod):
    '''Registered before the failure below.'''

{failure}

@register("fake_bad_second", reference="test")
@dataclass
class FakeBadSecond(MergeMethod):
    '''Never reached while the module fails.'''
"""


def _forget_fakes() -> None:
    for name in [n for n in registry._REGISTRY if n.startswith("fake_")]:
        del registry._REGISTRY[name]
    for module_name in [m for m in sys.modules if m == FAKE_PACKAGE or m.startswith(FAKE_PACKAGE + ".")]:
        del sys.modules[module_name]


@pytest.fixture
def fake_builtins(tmp_path, monkeypatch):
    """A package with an importable method module and a failing one, appended to the builtin list."""
    package = tmp_path / FAKE_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ok.py").write_text(textwrap.dedent(OK_MODULE))

    def write_bad(failure: str) -> None:
        (package / "bad.py").write_text(textwrap.dedent(BAD_MODULE.format(failure=failure)))
        importlib.invalidate_caches()

    write_bad('raise ImportError("boom: a dependency is missing")')
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # bad.py is rewritten within the same second
    monkeypatch.syspath_prepend(str(tmp_path))
    list_methods()  # the real builtins are loaded before the fakes join the list
    monkeypatch.setattr(registry, "_BUILTIN_MODULES",
                        registry._BUILTIN_MODULES + (f"{FAKE_PACKAGE}.ok", f"{FAKE_PACKAGE}.bad"))
    _forget_fakes()
    yield write_bad
    _forget_fakes()


def test_failed_builtin_import_rolls_back_and_reraises_the_real_error(fake_builtins):
    builtin_before = set(registry._REGISTRY)
    for _ in range(2):  # the second call raises the same ImportError, not "already registered"
        with pytest.raises(ImportError, match="boom: a dependency is missing"):
            get_method("task_arithmetic")
        assert set(registry._REGISTRY) == builtin_before  # fake_ok and fake_bad_first rolled back
        assert f"{FAKE_PACKAGE}.ok" not in sys.modules and f"{FAKE_PACKAGE}.bad" not in sys.modules
        assert not hasattr(sys.modules[FAKE_PACKAGE], "ok")  # so the next call re-imports it
    # builtins that were loaded before the failing call are untouched
    assert registry._REGISTRY["task_arithmetic"].cls is basic.TaskArithmetic

    fake_builtins("")  # the dependency is fixed: the next call loads everything
    names = list_methods()
    assert {"fake_ok", "fake_bad_first", "fake_bad_second", "task_arithmetic"} <= set(names)
    assert get_method("fake_ok").cls is sys.modules[f"{FAKE_PACKAGE}.ok"].FakeOk
    assert get_method("fake_ok").hyperparameters == {"alpha": 1.0}


def test_non_import_errors_propagate_unchanged_and_roll_back(fake_builtins):
    fake_builtins('raise RuntimeError("bad module body")')
    with pytest.raises(RuntimeError, match="bad module body"):
        list_methods()
    assert not [n for n in registry._REGISTRY if n.startswith("fake_")]


def test_duplicate_name_is_rejected_and_the_first_registration_kept():
    @dataclasses.dataclass
    class Impostor(MergeMethod):
        """Not task arithmetic."""

        scaling: float = 1.0

    with pytest.raises(ValueError, match="'task_arithmetic' is already registered"):
        register("task_arithmetic", reference="x")(Impostor)
    assert get_method("task_arithmetic").cls is basic.TaskArithmetic
    assert Impostor.name == ""  # the refused class is left unnamed


def test_only_merge_method_dataclasses_register():
    def plain(task_vectors, *, scaling: float = 1.0):
        """A plain function is not a method."""

    class NotADataclass(MergeMethod):
        """No typed fields."""

    for candidate in (plain, NotADataclass):
        with pytest.raises(TypeError, match="register a MergeMethod dataclass"):
            register("fake_plain", reference="x")(candidate)
    assert "fake_plain" not in list_methods()


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown merge method 'nope'.*task_arithmetic"):
        get_method("nope")


def test_hyperparameters_are_the_dataclass_fields_with_their_defaults():
    @dataclasses.dataclass
    class Method(MergeMethod):
        """Summary line.

        Details."""

        density: float = 0.2
        mode: str = "a"
        weights: list = dataclasses.field(default_factory=lambda: [1.0, 2.0])

    spec = MethodSpec("m", Method, reference="ref", summary="Summary line.")
    assert spec.hyperparameters == {"density": 0.2, "mode": "a", "weights": [1.0, 2.0]}
    assert spec.build({"mode": "b"}).hyperparameters() == {"density": 0.2, "mode": "b", "weights": [1.0, 2.0]}
    assert get_method("task_arithmetic").hyperparameters == {"scaling": 0.3}
    assert "generator" not in get_method("dare").hyperparameters
    assert get_method("task_arithmetic").summary.startswith("Task arithmetic")
    assert get_method("fisher").needs == frozenset({"data"}) and not get_method("ties").needs
    assert get_method("free_merging").produces_task_modules and not get_method("ties").produces_task_modules


def test_validate_accepts_known_and_names_unknown_hyperparameters():
    spec = get_method("task_arithmetic")
    spec.validate({})
    spec.validate({"scaling": 0.5})
    with pytest.raises(HyperparameterError, match=r"'task_arithmetic' has no hyperparameter\(s\) \['lambda_'\].*"
                                                  r"accepted: \['scaling'\]"):
        spec.validate({"scaling": 0.5, "lambda_": 1.0})
