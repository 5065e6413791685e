"""The lazy public names of ``fun_audio_chat``, ``fun_audio_chat.trainers`` and ``fun_audio_chat.serving``
(``fun_audio_chat._lazy_exports``): nothing loads on import, a name loads its submodule on first read and is then
a plain attribute, ``dir()`` and ``__all__`` list every name up front, and every listed name exists."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from fun_audio_chat._lazy_exports import lazy_exports

PACKAGES = ("fun_audio_chat", "fun_audio_chat.trainers", "fun_audio_chat.serving")


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package ``toy_lazy`` exporting ``Widget`` from ``.widgets`` and ``helper`` from ``.deep.tools``; its
    ``IMPORTED`` list records each submodule as it runs and ``CALLS`` each ``before_import`` call."""
    root = tmp_path / "toy_lazy"
    (root / "deep").mkdir(parents=True)
    (root / "__init__.py").write_text(
        textwrap.dedent(
            """
            from fun_audio_chat._lazy_exports import lazy_exports

            IMPORTED = []
            CALLS = []
            __getattr__, __dir__, __all__ = lazy_exports(
                __name__,
                {"widgets": ("Widget",), "deep.tools": ("helper",)},
                before_import=lambda: CALLS.append("before"),
            )
            """
        )
    )
    (root / "widgets.py").write_text("from . import IMPORTED\nIMPORTED.append('widgets')\nclass Widget: pass\n")
    (root / "deep" / "__init__.py").write_text("")
    (root / "deep" / "tools.py").write_text("from .. import IMPORTED\nIMPORTED.append('tools')\ndef helper(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("toy_lazy")
    for name in [name for name in sys.modules if name == "toy_lazy" or name.startswith("toy_lazy.")]:
        del sys.modules[name]


def test_a_name_loads_its_submodule_on_first_read_only(toy_package):
    assert toy_package.IMPORTED == [] and "toy_lazy.widgets" not in sys.modules
    assert toy_package.__all__ == ["Widget", "helper"]
    assert {"Widget", "helper", "IMPORTED"} <= set(dir(toy_package))

    widget = toy_package.Widget
    assert widget is sys.modules["toy_lazy.widgets"].Widget
    assert toy_package.IMPORTED == ["widgets"] and toy_package.CALLS == ["before"]
    assert "Widget" in vars(toy_package)  # cached: the next read does not go through __getattr__
    assert toy_package.Widget is widget and toy_package.CALLS == ["before"]

    from toy_lazy import helper  # a nested submodule, through `from ... import`

    assert helper is sys.modules["toy_lazy.deep.tools"].helper
    assert toy_package.IMPORTED == ["widgets", "tools"] and toy_package.CALLS == ["before", "before"]


def test_an_unknown_name_is_an_attribute_error_naming_the_package(toy_package):
    with pytest.raises(AttributeError, match="module 'toy_lazy' has no attribute 'Gadget'"):
        _ = toy_package.Gadget
    assert not hasattr(toy_package, "widgets_typo")
    assert toy_package.IMPORTED == [] and toy_package.CALLS == []


def test_a_name_listed_under_two_submodules_is_refused():
    with pytest.raises(ValueError, match=r"exports 'Thing' from both \.one and \.two"):
        lazy_exports("somewhere", {"one": ("Thing",), "two": ("Other", "Thing")})


def test_importing_the_packages_loads_none_of_their_submodules():
    code = f"""
import json, sys
import {", ".join(PACKAGES)}
loaded = sorted(m for m in sys.modules if m.startswith("fun_audio_chat.") and m not in {PACKAGES!r})
print(json.dumps({{"loaded": loaded, "heavy": [m for m in ("torch", "transformers", "fastapi") if m in sys.modules]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"loaded": ["fun_audio_chat._lazy_exports"], "heavy": []}


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_its_submodules_object(package):
    module = importlib.import_module(package)
    table = module._EXPORTS
    assert module.__all__ == sorted(name for names in table.values() for name in names)
    for submodule, names in table.items():
        home = importlib.import_module(f"{package}.{submodule}")
        for name in names:
            assert getattr(module, name) is getattr(home, name), (submodule, name)
    assert set(module.__all__) <= set(dir(module))
