"""Training utilities: SFT with ``Trainer``, LoRA presets, Core-Cocktail merging and the two-stage runner, and
multi-task DPO over text and speech.

Submodules load on first use (``merging`` needs only torch; ``sft``/``core_cocktail`` import
``transformers.Trainer``; ``lora`` needs ``peft``, part of the ``train`` extra).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "merging": (
        "MergeResult",
        "PickleCheckpointError",
        "SafetensorsCheckpoint",
        "default_base_key_map",
        "merge_tensors",
        "merge_weights",
        "read_manifest",
        "recover_output_dir",
        "save_merged_model",
    ),
    "sft": ("FunAudioChatTrainer", "count_loss_items", "freeze_for_stage", "sft_training_arguments"),
    "core_cocktail": (
        "CoreCocktailCallback",
        "CoreCocktailLayout",
        "CoreCocktailResult",
        "ResumePoint",
        "core_cocktail_training_arguments",
        "find_resume_point",
        "load_weights_into",
        "run_core_cocktail",
    ),
    "lora": ("fun_audio_chat_lora_config", "lora_target_regex"),
    "dpo": ("FunAudioChatDPOTrainer",),
    "dpo_config": ("FunAudioChatDPOConfig",),
    "dpo_losses": ("LOG_PROB_LOSS_TYPES", "preference_loss"),
    "preference_data": (
        "FunAudioChatPreferenceCollator",
        "build_preference_example",
        "prepare_preference_dataset",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


__all__ = sorted(_WHERE)
