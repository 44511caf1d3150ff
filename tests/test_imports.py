"""No import cycle among nanods' modules, imports inside functions included.

A cycle that only a function-level import closes still works today, but it binds the two modules
to each other: each can break the other's import order with one edit. So every import counts.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from conftest import SOURCE


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Imports(ast.NodeVisitor):
    """The package's modules that one module imports, at module level or inside functions.

    `if TYPE_CHECKING:` blocks are skipped: they never run, and type hints may point both ways.
    `import nanods.a.b` counts as nanods.a.b alone: Python finishes a parent package before any of
    its submodules starts, so the parents it imports first cannot close a cycle.
    """

    def __init__(self, name: str, is_package: bool, modules: set[str]) -> None:
        self.package = name if is_package else name.rpartition(".")[0]
        self.modules, self.found = modules, set()

    def _add(self, name: str) -> None:
        while name and name not in self.modules:  # nanods.x.attr -> nanods.x
            name = name.rpartition(".")[0]
        if name:
            self.found.add(name)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)) == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # from . import x, from ..a import b
            package = self.package
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        for alias in node.names:  # `from nanods import registry` imports the submodule
            self._add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every .py file under root (a package folder)."""
    files = {_module(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        visitor = _Imports(name, path.name == "__init__.py", set(files))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph[name] = visitor.found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], each module importing the next; None when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()  # graph[m]: what must come before m
    except graphlib.CycleError as e:
        return e.args[1][::-1]  # graphlib lists each module before the one importing it
    return None


def test_nanods_has_no_import_cycle():
    cycle = find_cycle(import_graph(SOURCE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_closed_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from pkg import c\n",
        "sub/c.py": "",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nelse:\n    from .sub import c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text, encoding="utf-8")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.sub.c"}
    assert find_cycle(graph) is None  # the TYPE_CHECKING import of pkg.a does not count
    (package / "sub/c.py").write_text("import pkg.a\n", encoding="utf-8")
    graph = import_graph(package)
    cycle = find_cycle(graph)
    assert set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c", "pkg.sub.c"} and cycle[0] == cycle[-1]
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:]))  # each imports the next


@pytest.mark.parametrize("source,expected", [("from .. import a", "pkg.a"), ("from ..sub import c", "pkg.sub.c"),
                                             ("import pkg.sub.c.thing", "pkg.sub.c")])
def test_relative_and_dotted_imports_resolve_to_modules(source, expected, tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "sub/c.py"):
        (package / name).write_text("", encoding="utf-8")
    (package / "sub/b.py").write_text(source + "\n", encoding="utf-8")
    assert import_graph(package)["pkg.sub.b"] == {expected}
