"""The package's layers, checked on its source with ``ast``: imports run one way (adapters/lightning/jobs/zoo/
data → io → merging → the base modules), and no import cycle exists among ``freemerge_pl`` modules, imports
inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "freemerge_pl"
#: ``freemerge_pl.callbacks`` lives in the top-level ``callbacks/`` folder (pyproject's package-dir)
CALLBACKS = Path(__file__).resolve().parents[1] / "callbacks"

#: rank of each layer: a module may import modules of its own rank or below, never above
BASE = ("freemerge_pl._version", "freemerge_pl.errors", "freemerge_pl.settings", "freemerge_pl.progress")
RANKS = {"base": 0, "merging": 1, "io": 2, "top": 3}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("merging", "io"):
        return parts[1]
    return "top"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every ``freemerge_pl`` module ``module`` imports, at any depth of its code (``from a import b`` counts
    as importing ``a`` and, when ``a.b`` is a module, ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # ``import a.b.c`` imports a, a.b and a.b.c; count the deepest known one
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path = PACKAGE, callbacks: Path | None = CALLBACKS) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    if callbacks is not None:
        files |= {"freemerge_pl." + module_name(p, callbacks): p for p in callbacks.rglob("*.py")}
    known = set(files)
    return {m: imported_modules(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py", known)
            for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in sorted(graph.items()):
        if m == "freemerge_pl":
            continue  # the package root's lazy ``load_merged`` sits above every layer
        for t in sorted(targets):
            if RANKS[layer(t)] > RANKS[layer(m)] or t == "freemerge_pl":
                bad.append(f"{m} imports {t}")
    return bad


def test_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "freemerge_pl"
    (pkg / "merging").mkdir(parents=True)
    (pkg / "io").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "merging" / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "merging" / "a.py").write_text("def f():\n    from freemerge_pl.merging import b\n")
    (pkg / "merging" / "b.py").write_text("from . import a\n")
    (pkg / "merging" / "c.py").write_text("import freemerge_pl.io.d\n")
    (pkg / "io" / "d.py").write_text("from freemerge_pl.merging.c import x\n")
    graph = import_graph(pkg, callbacks=None)
    assert graph["freemerge_pl.merging.a"] == {"freemerge_pl.merging", "freemerge_pl.merging.b"}
    assert ["freemerge_pl.merging.a", "freemerge_pl.merging.b"] in cycles(graph)
    assert ["freemerge_pl.io.d", "freemerge_pl.merging.c"] in cycles(graph)
    assert "freemerge_pl.merging.c imports freemerge_pl.io.d" in upward_imports(graph)
    assert not any(s.startswith("freemerge_pl.io.d") for s in upward_imports(graph))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_imports_run_one_way(graph):
    assert upward_imports(graph) == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
