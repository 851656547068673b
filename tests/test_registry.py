"""The merge-method registry: builtin loading is all-or-nothing, duplicate names, the signature schema."""

import importlib
import sys
import textwrap

import pytest

from freemerge_pl.errors import ConfigError, HyperparameterError
from freemerge_pl.merging import baselines, registry
from freemerge_pl.merging.registry import MethodSpec, get_method, list_methods, register

FAKE_PACKAGE = "fm_fake_builtin"

OK_MODULE = """
from freemerge_pl.merging.registry import register

@register("fake_ok", reference="test")
def fake_ok(task_vectors, *, alpha: float = 1.0):
    '''A fake method that imports fine.'''
"""

BAD_MODULE = """
from freemerge_pl.merging.registry import register

@register("fake_bad_first", reference="test")
def fake_bad_first(task_vectors):
    '''Registered before the failure below.'''

{failure}

@register("fake_bad_second", reference="test")
def fake_bad_second(task_vectors):
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
    assert registry._REGISTRY["task_arithmetic"].fn is baselines.task_arithmetic

    fake_builtins("")  # the dependency is fixed: the next call loads everything
    names = list_methods()
    assert {"fake_ok", "fake_bad_first", "fake_bad_second", "task_arithmetic"} <= set(names)
    assert get_method("fake_ok").fn is sys.modules[f"{FAKE_PACKAGE}.ok"].fake_ok
    assert get_method("fake_ok").hyperparameters == {"alpha": 1.0}


def test_non_import_errors_propagate_unchanged_and_roll_back(fake_builtins):
    fake_builtins('raise RuntimeError("bad module body")')
    with pytest.raises(RuntimeError, match="bad module body"):
        list_methods()
    assert not [n for n in registry._REGISTRY if n.startswith("fake_")]


def test_duplicate_name_is_rejected_and_the_first_registration_kept():
    def impostor(task_vectors, *, scaling: float = 1.0):
        """Not task arithmetic."""

    with pytest.raises(ValueError, match="'task_arithmetic' is already registered"):
        register("task_arithmetic", reference="x")(impostor)
    assert get_method("task_arithmetic").fn is baselines.task_arithmetic


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown merge method 'nope'.*task_arithmetic"):
        get_method("nope")


def test_hyperparameters_are_the_keyword_only_arguments_less_context():
    def method(task_vectors, positional=2, *, density: float = 0.2, mode: str = "a", pretrained=None,
               data=None, generator=None):
        """Summary line.

        Details."""

    spec = MethodSpec("m", method, reference="ref", summary="Summary line.")
    assert spec.hyperparameters == {"density": 0.2, "mode": "a"}
    assert get_method("task_arithmetic").hyperparameters == {"scaling": 0.3}
    assert "generator" not in get_method("dare").hyperparameters
    assert get_method("task_arithmetic").summary.startswith("Task arithmetic")


def test_validate_accepts_known_and_names_unknown_hyperparameters():
    spec = get_method("task_arithmetic")
    spec.validate({})
    spec.validate({"scaling": 0.5})
    with pytest.raises(HyperparameterError, match=r"'task_arithmetic' has no hyperparameter\(s\) \['lambda_'\].*"
                                                  r"accepted: \['scaling'\]"):
        spec.validate({"scaling": 0.5, "lambda_": 1.0})
