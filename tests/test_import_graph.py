"""The package's imports point one way: no cycles between its modules, and the model and processor classes do not
depend on the Hub helpers or the tiny fixtures.

The graph is read from the source with ``ast`` (every ``import`` statement, at module level or inside a function,
since a function-level import still ties two modules together). Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``, so a module depends on the packages above what it imports, except its own ancestors (a package's
submodules may be imported while the package initialises). Run as a script to print the graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "fun_audio_chat"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules its import statements name (the closest existing module of each name)."""
    files = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}

    def existing(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                names = [f"{base}.{alias.name}" for alias in node.names]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                name = node.args[0].value
                if name.startswith("."):  # importlib.import_module(".x", __name__) inside a package __init__
                    name = (module if is_package else module.rpartition(".")[0]) + name
                names = [name]
            for name in names:
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    target = existing(name)
                    if target is not None and target != module:
                        targets.add(target)
        graph[module] = targets
    # importing a.b.c runs the __init__ of a and a.b first (but a module's own ancestors are already running)
    for module, targets in graph.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for target in list(targets):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in ancestors and parent != module:
                    targets.add(parent)
        targets -= ancestors
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_model_and_processor_do_not_import_the_hub_or_tiny_helpers():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith((f"{PACKAGE}.modeling", f"{PACKAGE}.processing")):
            assert not targets & {f"{PACKAGE}.hub", f"{PACKAGE}.tiny"}, module


def test_processing_does_not_import_the_model_trainers_or_front_ends():
    graph = import_graph()
    upward = tuple(
        f"{PACKAGE}.{name}" for name in ("modeling", "token2wav", "trainers", "serving", "cli", "hub", "tiny")
    )
    for module, targets in graph.items():
        if module.startswith(f"{PACKAGE}.processing"):
            assert not [t for t in targets if t.startswith(upward)], module


ANCHOR_LIBRARIES = ("transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub")


def test_no_private_names_are_imported_from_the_anchor_libraries():
    """A private name of transformers/PEFT/TRL/… can change in any release; the package imports none of them."""
    found = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in ANCHOR_LIBRARIES:
                    found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    print("cycles:", find_cycles(graph) or "none")
