"""The package has no import cycle, lazy imports (inside functions) included."""
from __future__ import annotations

import ast
import typing as tp
from pathlib import Path

from helpers import REPO


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: runs only as a script, where the module is
    `__main__`, so its imports cannot close a cycle."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def nodes(tree: ast.AST) -> tp.Iterator[ast.AST]:
    """Every node of `tree` outside `if __name__ == "__main__":` blocks."""
    for child in ast.iter_child_nodes(tree):
        if not is_main_block(child):
            yield child
            yield from nodes(child)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that `path` imports anywhere in its code."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {module for module in found if module in modules and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> imported modules), or [] when none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for other in sorted(graph[module]):
            if cycle := visit(other, path + [module]):
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return []


def test_main_blocks_are_left_out() -> None:
    script = REPO / "demucs" / "api.py"
    code = script.read_text()
    assert 'if __name__ == "__main__":' in code and "from .separate import" in code
    assert "demucs.separate" not in imported(script, {"demucs.separate"})


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    files = sorted((REPO / "demucs").rglob("*.py"))
    modules = {module_name(path) for path in files}
    # A package imports its modules on demand: `demucs` itself is not a dependency.
    return {module_name(path): imported(path, modules) - {"demucs"} for path in files}


def reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    """The modules importing `module` loads, itself included."""
    seen = {module}
    todo = [module]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and graph["demucs.solver"] >= {"demucs.evaluate"}
    assert find_cycle(graph) == []


def test_model_repositories_do_not_import_inference() -> None:
    """Loading models and bags (`BagOfModels` in demucs.bag) needs no `apply_model`."""
    graph = import_graph()
    for module in ["demucs.bag", "demucs.repo", "demucs.pretrained", "demucs.states"]:
        assert "demucs.apply" not in reachable(graph, module), module
    assert "demucs.apply" in reachable(graph, "demucs.api")
