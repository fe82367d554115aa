"""The house's rules, as docs/DESIGN.md states them: packages by concern in layers, each importing only its own package
and the layers below; no import circle; no command imports another; the scheduling package imports without torch; no
module over 350 lines and no function over 60 but the argument parsers."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import PROJECT

SOURCE = PROJECT / "src"
# package -> layer: a module imports from its own package and from lower layers only; the commands (src/NAME.py)
# sit on top. scheduling and engines share a layer and know nothing of each other.
LAYERS = {"common": 0, "scheduling": 1, "engines": 1, "predictors": 2, "running": 3}
COMMAND_LAYER = 4
MOST_MODULE_LINES = 350
MOST_FUNCTION_LINES = 60
ARGUMENT_PARSERS = {"parse_args"}


def module_trees() -> dict[str, ast.Module]:
    """Dotted name under src (`running.executor`, `benchmark`) -> its syntax tree."""
    return {
        ".".join(path.relative_to(SOURCE).with_suffix("").parts): ast.parse(path.read_text())
        for path in SOURCE.rglob("*.py")
        if path.name != "__init__.py"
    }


def imports_of(name: str, tree: ast.Module) -> set[str]:
    """The src modules a module imports by relative import, at any depth (a function's own imports too)."""
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            found.add(".".join(target))  # `from .x import name`
            found.update(".".join(target + [alias.name]) for alias in node.names)  # `from . import x`
    return found


def layer_of(name: str) -> int:
    return LAYERS[name.split(".")[0]] if "." in name else COMMAND_LAYER


def test_packages_import_only_their_own_and_lower_layers():
    trees = module_trees()
    assert set(LAYERS) == {name.split(".")[0] for name in trees if "." in name}
    upward = [
        f"{name} imports {target}"
        for name, tree in trees.items()
        for target in sorted(imports_of(name, tree) & set(trees))
        if target.split(".")[0] != name.split(".")[0] and layer_of(target) >= layer_of(name)
    ]
    assert upward == []


def test_no_circle_and_no_command_imports_another():
    trees = module_trees()
    graph = {name: imports_of(name, tree) & set(trees) for name, tree in trees.items()}
    commands = {name for name in trees if "." not in name}
    assert {"benchmark", "eval", "lenpred", "reproduce", "plots", "infer"} <= commands
    assert all(
        any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in trees[name].body)
        for name in commands
    )
    assert {name: sorted(graph[name] & commands) for name in trees if graph[name] & commands} == {}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for following in graph[start]:
            if following == target or (following not in seen and reaches(following, target, seen | {following})):
                return True
        return False

    assert [name for name in trees if reaches(name, name, {name})] == []


def test_the_scheduling_package_imports_without_torch():
    modules = sorted(name for name in module_trees() if name.startswith("scheduling."))
    code = "; ".join([f"import src.{name}" for name in modules] + ["import sys", "print('torch' in sys.modules)"])
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_no_module_or_function_is_too_long():
    too_long = []
    for name, tree in module_trees().items():
        lines = len((SOURCE / (name.replace(".", "/") + ".py")).read_text().splitlines())
        if lines > MOST_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in ARGUMENT_PARSERS:
                length = node.end_lineno - node.lineno + 1
                if length > MOST_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []
