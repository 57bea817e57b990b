"""The shape of the installed package: no import cycle, and every module used by the method or its trainer."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO_ROOT

from peft_cc.cli import COMMANDS

PACKAGE = REPO_ROOT / "peft_cc"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """The `peft_cc` modules that `path` imports, anywhere but under `if TYPE_CHECKING:`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            if node.module:
                targets = [".".join([*base, node.module])]
            else:  # `from . import name`: the submodule `name`
                targets = [".".join([*base, alias.name]) for alias in node.names]
            found.update(target for target in targets if target.startswith("peft_cc"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("peft_cc"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {module}


def _graph() -> dict[str, set[str]]:
    """Each module's imports of other modules of the package (importing `a.b.c` runs `a.b` first, too)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {target for target in _imports(path) if target in modules} for name, path in modules.items()}
    for name in graph:
        parent = name.rpartition(".")[0]
        if parent in graph and parent != "peft_cc":
            graph[name].add(parent)
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(module) :], module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            if target != "peft_cc":  # a submodule importing its package's __init__ is not a cycle of modules
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_every_module_is_reached_from_the_package_or_its_commands():
    """What `import peft_cc` (and its lazily imported trainer) or an installed command loads: nothing else ships."""
    graph = _graph()
    commands = [f"peft_cc.scripts.{name}" for name in COMMANDS]  # `peft-cc NAME` imports them by name
    roots = ["peft_cc", "peft_cc.sft_trainer", "peft_cc.cli", "peft_cc.lm_eval.__main__", *commands]
    reached, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert sorted(set(graph) - reached) == []
