"""The layout's two rules: no import circle among src's modules, and no command-line module imports another."""

from __future__ import annotations

import ast

from .conftest import PROJECT

SOURCE = PROJECT / "src"


def imports_of(tree: ast.Module) -> set[str]:
    """The src modules a module imports (`from .x import ...` and `from . import x`), at any depth."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
    return found


def command_line_modules(trees: dict[str, ast.Module]) -> set[str]:
    """Modules with an `if __name__ == "__main__":` block."""

    def is_main_guard(node) -> bool:
        return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)

    return {name for name, tree in trees.items() if any(is_main_guard(node) for node in tree.body)}


def test_no_circle_and_no_command_imports_another():
    trees = {path.stem: ast.parse(path.read_text()) for path in SOURCE.glob("*.py")}
    graph = {name: imports_of(tree) & set(trees) for name, tree in trees.items()}
    commands = command_line_modules(trees)
    assert {"benchmark", "eval", "lenpred", "reproduce", "plots"} <= commands
    assert {name: sorted(graph[name] & commands) for name in trees if graph[name] & commands} == {}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for following in graph[start]:
            if following == target or (following not in seen and reaches(following, target, seen | {following})):
                return True
        return False

    assert [name for name in trees if reaches(name, name, {name})] == []
