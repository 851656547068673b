"""The user's documentation: docs/options.md is what docs/make_options.py generates from the typed settings
(a stale file fails), the generator reads types, defaults and descriptions correctly, and the README stays a
short guide whose first two commands are the install + main job and the test command (CI runs them), with
every local link pointing at a file that exists and every ``freemerge_pl`` path it names importable."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest

from freemerge_pl.settings import Range

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INSTALL = 'pip install -e ".[dev]" && python cli.py test --config configs/zoo/free_merging.yaml'
TESTS = "python -m pytest -q"


@pytest.fixture(scope="module")
def make_options():
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_generated_from_the_current_settings(make_options):
    expected = make_options.render()
    current = (ROOT / "docs" / "options.md").read_text()
    assert current == expected, "docs/options.md is stale: run python docs/make_options.py"


def test_options_md_covers_every_section_and_method(make_options):
    from freemerge_pl.merging import list_methods

    text = (ROOT / "docs" / "options.md").read_text()
    for _, title, path, _ in make_options.SECTIONS:
        assert f"## {title}" in text and f"`{path}`" in text
    headings = re.findall(r"^### `([a-z_]+)`", text, flags=re.MULTILINE)
    assert sorted(headings) == sorted(list_methods()) and len(headings) == len(set(headings))


@dataclass
class _Toy:
    """A toy setting holder.

    Args:
        ratio: the share removed.
        mode: how it is read.
        width, depth: the size of the thing.
    """

    ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.3
    mode: Literal["a", "b"] | None = None
    width: int = 4
    depth: int = 2
    tags: list[str] = field(default_factory=lambda: ["x"])
    seed: int = 0


class _Plain:
    """Settings through ``__init__``; ``scale`` multiplies everything. Nothing else is said."""

    def __init__(self, path: str, scale: float = 1.0, flag: bool = False, name: str | None = None) -> None:
        """Build it.

        Args:
            path: where it lives.
        """


def test_generator_reads_types_defaults_and_descriptions(make_options):
    rows = {s.name: s for s in make_options.settings_of(_Toy)}
    assert list(rows) == ["ratio", "mode", "width", "depth", "tags", "seed"]
    assert (rows["ratio"].type, rows["ratio"].default, rows["ratio"].description) == (
        "float in [0, 1)", "`0.3`", "the share removed.")
    assert (rows["mode"].type, rows["mode"].default) == ("one of 'a', 'b' or null", "`null`")
    assert rows["width"].description == rows["depth"].description == "the size of the thing."
    assert (rows["tags"].type, rows["tags"].default) == ("list[str]", '`["x"]`')
    assert rows["seed"].description == ""  # not documented: shown as "—" in the table
    assert "| `toy.seed` | int | `0` | — |" in make_options.table(list(rows.values()), "toy")

    plain = {s.name: s for s in make_options.settings_of(_Plain)}
    assert list(plain) == ["path", "scale", "flag", "name"]
    assert (plain["path"].default, plain["path"].description) == ("required", "where it lives.")
    # no Args entry: the docstring's sentence naming it
    assert plain["scale"].description == "Settings through ``__init__``; ``scale`` multiplies everything."
    assert (plain["flag"].type, plain["flag"].default) == ("bool", "`false`")
    assert (plain["name"].type, plain["name"].default) == ("str | null", "`null`")


def _readme_commands() -> list[str]:
    """The commands of the README's first fenced shell block, comments stripped."""
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert block, "README has no fenced command block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_is_a_short_guide_starting_with_the_ci_commands():
    assert len(README.read_text().splitlines()) <= 250
    assert _readme_commands()[:2] == [INSTALL, TESTS]


def test_readme_and_docs_links_point_at_files():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module or an attribute reachable from its longest importable prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_module_paths_in_readme_and_docs_exist():
    """Every ``freemerge_pl.<module>[.<name>]`` the README and docs name can be imported (the layout moves)."""
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.name == "options.md":  # generated from the code itself
            continue
        for dotted in sorted(set(re.findall(r"\bfreemerge_pl(?:\.[A-Za-z_]\w*)+", doc.read_text()))):
            assert _resolves(dotted), f"{doc.name} names {dotted}, which does not exist"
