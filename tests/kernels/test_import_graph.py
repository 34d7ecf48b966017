"""seqmix.kernels has no import circle: the modules' imports (at module level and inside
functions) form a graph without cycles, read from the source with ``ast``."""

from __future__ import annotations

import ast
import pathlib

import seqmix.kernels

PACKAGE = "seqmix.kernels"
ROOT = pathlib.Path(seqmix.kernels.__file__).parent


def module_files(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, pathlib.Path]:
    """Dotted module name -> file of every module under ``root`` (packages by __init__)."""
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join((package, *parts))] = path
    return files


def import_graph(files: dict[str, pathlib.Path], package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports. ``from a import b`` counts as importing
    ``a.b`` when that is a module, else ``a``; importing a module does not count as importing
    its parent packages (Python runs those first, which is not a circle of this code)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                    for alias in node.names
                ]
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    """Two sibling modules that import each other, one of them lazily (the shape of the
    circle this check exists for)."""
    pkg = tmp_path / "pkg"
    (pkg / "family").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "family" / "__init__.py").write_text("from pkg.family.a import f\n")
    (pkg / "family" / "a.py").write_text("def f():\n    from pkg.family import b\n    return b\n")
    (pkg / "family" / "b.py").write_text("from . import a\n")
    graph = import_graph(module_files(pkg, "pkg"), "pkg")
    assert graph["pkg.family.a"] == {"pkg.family.b"}
    assert graph["pkg.family.b"] == {"pkg.family.a"}
    assert find_cycle(graph) in (
        ["pkg.family.a", "pkg.family.b", "pkg.family.a"],
        ["pkg.family.b", "pkg.family.a", "pkg.family.b"],
    )
    (pkg / "family" / "b.py").write_text("X = 1\n")
    assert find_cycle(import_graph(module_files(pkg, "pkg"), "pkg")) is None


def test_kernels_have_no_import_circle():
    files = module_files()
    graph = import_graph(files)
    # the graph is read from the real package: every family's backends are in it
    assert {f"{PACKAGE}.attention.triton.ops", f"{PACKAGE}.conv1d.tpu.step"} <= set(files)
    assert f"{PACKAGE}.attention.triton.blocks" in graph[f"{PACKAGE}.attention.triton.forward"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
