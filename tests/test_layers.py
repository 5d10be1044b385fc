"""The house rules of the package, read from its source with `ast` (every import, function-level ones too):
commands sit on top of libraries, no module pair needs each other, and no private name crosses a module."""

import ast
from pathlib import Path

import tomllib

from minillm.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "minillm"
COMMAND_LAYER = {"minillm.cli", *(module for module, _ in COMMANDS.values())}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, dict[str, set[str]]]:
    """module -> {imported module -> names taken from it}, for every module of the package under `root`."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in paths:
                        edges.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in paths:  # `from minillm import rundir`: the module itself
                        edges.setdefault(sub, set())
                    elif base in paths:
                        edges.setdefault(base, set()).add(alias.name)
        edges.pop(name, None)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    assert cycles(imports(PACKAGE)) == []


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(imports(pkg)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_libraries_never_import_the_command_layer():
    graph = imports(PACKAGE)
    assert COMMAND_LAYER <= set(graph), COMMAND_LAYER - set(graph)  # every command names a real module
    upward = {
        (module, target)
        for module, edges in graph.items()
        if module not in COMMAND_LAYER
        for target in edges
        if target in COMMAND_LAYER
    }
    assert upward == set()


def test_no_private_name_is_imported_from_another_module():
    crossing = {
        (module, f"{target}.{name}")
        for module, edges in imports(PACKAGE).items()
        for target, names in edges.items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert crossing == set()


def test_the_wheel_lists_every_package_folder():
    """pyproject.toml names its packages (conf/ is mapped in as minillm.conf): a new folder must be added there."""
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p.parent / "__init__.py", PACKAGE) for p in PACKAGE.rglob("__init__.py")}
    assert set(project["packages"]) == folders | {"minillm.conf"}
    assert project["package-dir"] == {"minillm.conf": "conf"}
