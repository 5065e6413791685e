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


# ---------------------------------------------------------------------------------------------------------------
# private attributes of the frameworks: only in framework_compat

#: The frameworks whose internals only :mod:`fun_audio_chat.framework_compat` may touch.
FRAMEWORKS = ("transformers", "accelerate", "trl", "peft")
COMPAT_MODULE = f"{PACKAGE}.framework_compat"
#: Bases whose private class attributes and methods are transformers' documented way of defining a model, processor
#: or generation loop (``_no_split_modules``, ``_supports_sdpa``, ``_tied_weights_keys``, ``_init_weights``, the
#: ``_sample`` override of the CSM pattern): a subclass declaring or overriding them uses the model API, it does not
#: reach into a trainer's internals. Accessing a private name of another object is flagged for them too.
MODEL_DEFINITION_BASES = (
    "transformers.PreTrainedModel",
    "transformers.PretrainedConfig",
    "transformers.GenerationMixin",
    "transformers.ProcessorMixin",
    "transformers.FeatureExtractionMixin",
)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _framework_bindings(tree: ast.AST) -> dict[str, str]:
    """Local name -> the framework object it is bound to by an import anywhere in the file."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FRAMEWORKS:
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        alias.asname and alias.name or alias.name.split(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in FRAMEWORKS:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _resolve_object(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        try:
            return importlib.import_module(dotted)
        except ImportError:
            return None


_PRIVATE_NAMES_OF: dict[type, frozenset[str]] = {}
_SELF_PRIVATES_IN_FILE: dict[str, frozenset[str]] = {}


def _self_privates_in_file(filename: str) -> frozenset[str]:
    """The ``self._x`` names used anywhere in a framework source file (parsed once; a superset of one class's)."""
    if filename not in _SELF_PRIVATES_IN_FILE:
        names: set[str] = set()
        try:
            tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            tree = ast.Module(body=[], type_ignores=[])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if _is_private(node.attr):
                    names.add(node.attr)
        _SELF_PRIVATES_IN_FILE[filename] = frozenset(names)
    return _SELF_PRIVATES_IN_FILE[filename]


def _framework_private_names(cls: type) -> frozenset[str]:
    """Private names a framework class and its framework bases define: class attributes and methods, and the
    ``self._x`` attributes used in their source files."""
    if cls in _PRIVATE_NAMES_OF:
        return _PRIVATE_NAMES_OF[cls]
    names: set[str] = set()
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if klass.__module__.split(".")[0] not in FRAMEWORKS or module is None:
            continue
        names |= {name for name in vars(klass) if _is_private(name)}
        if getattr(module, "__file__", None):
            names |= _self_privates_in_file(module.__file__)
    _PRIVATE_NAMES_OF[cls] = frozenset(names)
    return _PRIVATE_NAMES_OF[cls]


def _framework_classes_by_module() -> dict[str, dict[str, set[str]]]:
    """module -> {class defined there: the framework classes among its bases, through the package's own classes}."""
    trees = {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in SOURCE.rglob("*.py")}
    bases_of: dict[str, dict[str, list]] = {}
    for module, tree in trees.items():
        bound = _framework_bindings(tree)
        bases_of[module] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found = []
                for base in node.bases:
                    root = base
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(base, ast.Name) and base.id in bound:
                        found.append(("framework", bound[base.id]))
                    elif isinstance(base, ast.Attribute) and isinstance(root, ast.Name) and root.id in bound:
                        found.append(("framework", bound[root.id] + "." + ast.unparse(base).split(".", 1)[1]))
                    elif isinstance(base, ast.Name):
                        found.append(("ours", base.id))
                bases_of[module][node.name] = found
    ours = {name: found for classes in bases_of.values() for name, found in classes.items()}
    resolved: dict[str, set[str]] = {}

    def framework_bases(name: str, seen: frozenset = frozenset()) -> set[str]:
        if name in resolved:
            return resolved[name]
        result: set[str] = set()
        for kind, base in ours.get(name, []):
            if kind == "framework":
                result.add(base)
            elif base in ours and base not in seen:
                result |= framework_bases(base, seen | {name})
        resolved[name] = result
        return result

    return {module: {name: framework_bases(name) for name in classes} for module, classes in bases_of.items()}


def private_framework_reaches() -> list[str]:
    """Every place outside framework_compat that touches a private name of transformers, accelerate, TRL or PEFT:

    * ``X._name`` where ``X`` (or the root of ``X.a.b``) is bound by an import from a framework;
    * in a class deriving from a framework class (directly or through the package's own classes): ``self._name``,
      ``cls._name`` or ``super()._name`` access, a ``def _name`` override or a ``_name = ...`` class attribute, when
      the framework classes define ``_name`` (see :data:`MODEL_DEFINITION_BASES` for the model-definition API);
    * ``obj._name`` on any other object, and ``getattr``/``hasattr``/``setattr``/``delattr`` with a constant
      ``"_name"``, when some framework class the package uses defines ``_name``.
    """
    classes_by_module = _framework_classes_by_module()
    model_definition = tuple(cls for cls in map(_resolve_object, MODEL_DEFINITION_BASES) if isinstance(cls, type))
    every_framework_private: set[str] = set()
    framework_class_objects: dict[str, type] = {}
    for classes in classes_by_module.values():
        for bases in classes.values():
            for dotted in bases:
                obj = _resolve_object(dotted)
                if isinstance(obj, type):
                    framework_class_objects[dotted] = obj
                    every_framework_private |= _framework_private_names(obj)
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = _module_name(path)
        if module == COMPAT_MODULE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = _framework_bindings(tree)
        for dotted in bound.values():
            obj = _resolve_object(dotted)
            if isinstance(obj, type) and obj.__module__.split(".")[0] in FRAMEWORKS:
                every_framework_private |= _framework_private_names(obj)
        relative = path.relative_to(SOURCE.parent)

        def where(node: ast.AST, relative=relative) -> str:
            return f"{relative}:{node.lineno}"

        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = classes_by_module[module].get(node.name, set())
            checked = [framework_class_objects[b] for b in bases if b in framework_class_objects]
            if not checked or any(issubclass(cls, model_definition) for cls in checked):
                continue
            private = frozenset().union(*(_framework_private_names(cls) for cls in checked))
            for inner in ast.walk(node):
                if isinstance(inner, ast.Attribute) and inner.attr in private:
                    target = inner.value
                    if (isinstance(target, ast.Name) and target.id in ("self", "cls")) or (
                        isinstance(target, ast.Call) and getattr(target.func, "id", None) == "super"
                    ):
                        found.append(f"{where(inner)}: {ast.unparse(inner)} (a private name of {sorted(bases)})")
            for statement in node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name in private:
                    found.append(f"{where(statement)}: overrides {statement.name} of {sorted(bases)}")
                elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
                    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                    for target in targets:
                        if isinstance(target, ast.Name) and target.id in private:
                            found.append(f"{where(statement)}: sets {target.id} of {sorted(bases)}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in bound:
                    found.append(f"{where(node)}: {ast.unparse(node)}")
                elif (
                    node.attr in every_framework_private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super")
                ):
                    found.append(f"{where(node)}: {ast.unparse(node)} (a framework's private name)")
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and node.args[1].value in every_framework_private
            ):
                found.append(f"{where(node)}: {ast.unparse(node)} (a framework's private name)")
    return sorted(set(found))


def test_framework_internals_are_reached_only_from_the_compat_module():
    """Every reach into a private name of transformers/accelerate/TRL/PEFT lives in framework_compat, which names the
    supported versions and has a test per workaround (tests/test_framework_compat.py)."""
    assert private_framework_reaches() == []


def test_the_private_reach_check_sees_each_kind_of_reach(tmp_path, monkeypatch):
    """The checker flags each kind of reach it claims to (so an empty report means something)."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "framework_compat.py").write_text("from accelerate import PartialState\nPartialState._shared_state\n")
    (package / "reaches.py").write_text(
        "from accelerate import PartialState\n"
        "from transformers import Trainer, PreTrainedModel\n"
        "import accelerate.state as acc\n"
        "PartialState._shared_state\n"
        "acc.AcceleratorState._reset_state()\n"
        "def f(trainer, model):\n"
        "    trainer._prepare_inputs({})\n"
        "    return getattr(model, '_no_split_modules', None)\n"
        "class T(Trainer):\n"
        "    _signature_columns = None\n"
        "    def _get_num_items_in_batch(self, batch, device):\n"
        "        return super()._get_num_items_in_batch(batch, device)\n"
        "    def own(self):\n"
        "        return self._own_helper, self.accelerator\n"
        "class U(T):\n"
        "    def _prepare_inputs(self, inputs):\n"
        "        return inputs\n"
        "class M(PreTrainedModel):\n"
        "    _no_split_modules = ['Layer']\n"
        "    def _init_weights(self, module):\n"
        "        return self._own\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", package)
    reaches = private_framework_reaches()
    flagged = {line.split(":")[1] for line in reaches}
    assert flagged == {"4", "5", "7", "8", "10", "11", "12", "16"}, reaches


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    print("cycles:", find_cycles(graph) or "none")
