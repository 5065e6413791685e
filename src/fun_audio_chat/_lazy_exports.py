"""Public names of a package that load on first access: the one implementation of the package's lazy exports.

``fun_audio_chat``, ``fun_audio_chat.trainers`` and ``fun_audio_chat.serving`` keep ``import`` light (no torch,
transformers, TRL or FastAPI until a class is used), so each lists which submodule defines each of its public names
and hands that table to :func:`lazy_exports`. The package's module ``__getattr__`` (PEP 562) then imports the
submodule when a name is first read (``package.Name`` or ``from package import Name``) and stores the value in the
package's namespace, so later reads are plain attribute reads. ``dir(package)`` and ``__all__`` list every name
before it is loaded, as they would for a package that imports eagerly.

transformers has a lazy-module class of its own, but it is private (``tests/test_import_graph.py`` allows no private
transformers name) and replaces the package object in ``sys.modules``; a module ``__getattr__`` needs neither.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]], *, before_import: Callable[[], None] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a package whose public names load on first access.

    Usage, at the end of a package's ``__init__.py``::

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"engine": ("ServingEngine",), "app": ("create_app",)})

    Args:
        package: the package's ``__name__``.
        exports: submodule, relative to the package (``"modeling.context_length"``) → the public names it defines.
        before_import: called before a submodule is imported for a name (the root package registers its Auto
            classes there, so a class read from it is already known to transformers).

    Raises:
        ValueError: a name is listed under two submodules (the package could only export one of them).
    """
    where: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in where:
                raise ValueError(
                    f"{package} exports {name!r} from both .{where[name]} and .{module}; list it under one of them."
                )
            where[name] = module

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if before_import is not None:
            before_import()
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later reads find it without calling __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)


__all__ = ["lazy_exports"]
