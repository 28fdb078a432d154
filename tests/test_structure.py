"""The package's shape: the core (algorithms and their values) never reaches for the edges (files,
reports, the command line), and no two modules import each other, directly or round a circle.

Every ``import`` in a module counts, also those inside functions (they run too); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import deepdot

PACKAGE = Path(deepdot.__file__).parent
CORE = ("scan", "mitigate", "attacks", "models", "training")
EDGES = ("io", "report", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> set[str]:
    """Modules a file imports when it runs (``from a import b`` may name the module ``a.b``)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name == "deepdot" or name.startswith("deepdot.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        targets = {resolve(i) for i in _runtime_imports(ast.parse(path.read_text()))}
        # importing a submodule runs its package's __init__ first: that is not an edge back
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def test_the_core_never_imports_io_report_or_the_cli():
    graph = _graph()
    bad = {
        module: sorted(t for t in targets if t.split(".")[1:2] and t.split(".")[1] in EDGES)
        for module, targets in graph.items()
        if module.split(".")[1:2] and module.split(".")[1] in CORE
    }
    assert {m: t for m, t in bad.items() if t} == {}
    assert "deepdot.scan.base" in graph and "deepdot.io.models" in graph  # the walk saw the package


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_structure_check_sees_a_cycle_when_there_is_one(tmp_path, monkeypatch):
    """The checks above must be able to fail: two modules importing each other are caught."""
    package = tmp_path / "deepdot"
    (package / "scan").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scan" / "__init__.py").write_text("")
    (package / "scan" / "a.py").write_text("from deepdot.scan import b\nfrom deepdot.io import files\n")
    (package / "scan" / "b.py").write_text("def f():\n    from deepdot.scan.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = _graph()
    assert "deepdot.scan.a" in graph["deepdot.scan.b"] and "deepdot.scan.b" in graph["deepdot.scan.a"]


def test_modules_stay_readable_in_one_sitting():
    """No module over ~350 lines, except the two format importers (a layer table each)."""
    importers = {"keras_h5.py", "onnx_import.py"}
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if p.name not in importers and (n := len(p.read_text().splitlines())) > 350
    }
    assert long == {}
