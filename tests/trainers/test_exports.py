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


def test_dpo_names_keep_their_old_import_path():
    """The DPO config and loss formulas live in their own modules; ``trainers.dpo`` still re-exports them."""
    from fun_audio_chat.trainers import dpo, dpo_config, dpo_losses

    assert dpo.FunAudioChatDPOConfig is dpo_config.FunAudioChatDPOConfig
    for name in ("F_DIVERGENCE_TYPES", "LOG_PROB_LOSS_TYPES", "f_divergence_scores", "preference_loss"):
        assert getattr(dpo, name) is getattr(dpo_losses, name), name
        assert name in dpo.__all__
