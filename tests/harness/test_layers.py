"""The package layers point one way: lmview at the bottom, editors/ and circuits/ on it, bench/ on top.

Every import statement counts, including ones inside functions: a lazy import still ties two modules
together. Imports under ``if TYPE_CHECKING:`` count for the layering but not for cycles (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGES = ("lmview", "editors", "circuits", "bench")
# what each package must never import
FORBIDDEN = {"lmview": ("bench", "editors", "circuits"), "editors": ("bench",), "circuits": ("bench",)}
# modules allowed to break FORBIDDEN for now (none)
ALLOWED: set[str] = set()


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under root."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def imported_names(module: str, path: Path, runtime_only: bool = False) -> list[tuple[str, int]]:
    """(dotted name, line) of everything the file imports; `from a import b` gives both a and a.b."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module of the same tree it imports at run time: line}; a name resolves to the longest known
    module."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in imported_names(module, path, runtime_only=True):
            parts = name.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                          None)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def forbidden_imports(modules: dict[str, Path], forbidden: dict[str, tuple[str, ...]],
                      allowed: set[str] = frozenset()) -> list[str]:
    problems = []
    for module, path in modules.items():
        banned = forbidden.get(module.split(".")[0], ())
        if module in allowed:
            continue
        names = imported_names(module, path)
        for name, line in names:
            if name.split(".")[0] in banned and (name.rpartition(".")[0], line) not in names:
                problems.append(f"{path.relative_to(path.parents[len(module.split('.')) - 1])}:{line} "
                                f"imports {name}")
    return sorted(set(problems))


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


# --- the checks on the product code ---------------------------------------------------------

def test_lower_layers_never_import_the_harness():
    problems = forbidden_imports(module_files(REPO_ROOT), FORBIDDEN, ALLOWED)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_allow_list_names_only_modules_that_still_need_it():
    modules = module_files(REPO_ROOT)
    for module in ALLOWED:
        assert module in modules, f"{module} no longer exists: drop it from ALLOWED"
        assert forbidden_imports({module: modules[module]}, FORBIDDEN), f"{module} is clean now: drop it from ALLOWED"


def test_no_import_cycles():
    found = cycles(import_graph(module_files(REPO_ROOT)))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# --- the checker itself, on a made-up tree ----------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(tmp_path)


def test_checker_finds_a_lazy_import_cycle_and_a_relative_one(tmp_path):
    modules = _tree(tmp_path, {
        "lmview/__init__.py": "",
        "editors/__init__.py": "",
        "editors/a.py": "from editors.b import x\n",
        "editors/b.py": "def f():\n    from editors import a\n",  # lazy, and `from package import module`
        "editors/t.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from editors.u import U\n",
        "editors/u.py": "from editors.t import T\n",  # a cycle only through a type hint: not one
        "bench/__init__.py": "",
        "bench/c.py": "from . import d\n",
        "bench/d.py": "from .c import y\n",
        "circuits/__init__.py": "",
    })
    assert cycles(import_graph(modules)) == [["bench.c", "bench.d"], ["editors.a", "editors.b"]]


def test_checker_finds_forbidden_imports_and_honours_the_allow_list(tmp_path):
    modules = _tree(tmp_path, {
        "lmview/__init__.py": "",
        "lmview/m.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from editors.base import E\n",
        "editors/__init__.py": "",
        "editors/e.py": "import bench.data as data\n",
        "circuits/__init__.py": "",
        "circuits/r.py": "from bench.lre import R\n",
        "bench/__init__.py": "",
        "bench/data.py": "from editors.e import x\nfrom lmview.m import y\n",
    })
    assert forbidden_imports(modules, FORBIDDEN) == [
        "circuits/r.py:1 imports bench.lre",
        "editors/e.py:1 imports bench.data",
        "lmview/m.py:3 imports editors.base",
    ]
    assert forbidden_imports(modules, FORBIDDEN, {"circuits.r"}) == [
        "editors/e.py:1 imports bench.data",
        "lmview/m.py:3 imports editors.base",
    ]
    assert cycles(import_graph(modules)) == [["bench.data", "editors.e"]]  # a layering breach is also a cycle here
