"""``fun_audio_chat.trainers`` loads its submodules lazily from a table of names: the table must not drift from
the submodules' ``__all__``."""

from __future__ import annotations

import importlib

import pytest

import fun_audio_chat.trainers as trainers


@pytest.mark.parametrize("module_name", sorted(trainers._EXPORTS))
def test_lazy_export_table_matches_the_modules_all(module_name):
    module = importlib.import_module(f"fun_audio_chat.trainers.{module_name}")
    exported = trainers._EXPORTS[module_name]
    assert len(set(exported)) == len(exported)
    missing = sorted(set(exported) - set(module.__all__))
    assert missing == [], f"trainers exports {missing} that {module_name}.__all__ does not list"
    for name in exported:
        assert getattr(trainers, name) is getattr(module, name)
    assert set(exported) <= set(trainers.__all__)


def test_every_exported_name_has_one_home():
    homes = [name for names in trainers._EXPORTS.values() for name in names]
    assert len(homes) == len(set(homes))
