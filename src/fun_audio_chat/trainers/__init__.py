"""Training utilities: SFT with ``Trainer``, LoRA presets, Core-Cocktail merging and the two-stage runner, and
multi-task DPO over text and speech.

Submodules load on first use (``merging`` needs only torch; ``sft``/``core_cocktail`` import
``transformers.Trainer``; ``lora`` needs ``peft``, part of the ``train`` extra).
"""

from __future__ import annotations

from .. import _lazy_exports

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
__getattr__, __dir__, __all__ = _lazy_exports.lazy_exports(__name__, _EXPORTS)
