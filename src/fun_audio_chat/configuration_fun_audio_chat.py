# Copyright 2026 The fun_audio_chat authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Configurations of Fun-Audio-Chat.

The on-disk layout is the official one (``config.json`` of ``FunAudioLLM/Fun-Audio-Chat-8B``): a top-level
``funaudiochat`` config holding a Qwen3 ``text_config`` and a ``funaudiochat_audio_encoder`` ``audio_config``,
which itself holds the Speech Refined Head's Qwen3 backbone as ``crq_transformer_config``. Defaults are the 8B
values, so ``FunAudioChatConfig()`` describes the released model.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import auto_docstring

# Special text ids of the released tokenizer (docs/official-format.md#special-ids); used when a text_config does not carry them.
DEFAULT_AUDIO_BOS_INDEX = 151670
DEFAULT_AUDIO_EOS_INDEX = 151671
DEFAULT_SIL_INDEX = 151673
DEFAULT_AUDIO_TOKEN_INDEX = 151669
# Label value that losses skip (PyTorch's cross-entropy default); the one definition the package uses.
IGNORE_INDEX = -100
# The model's audio inputs besides input_ids/attention_mask (the continuous encoder's features and their masks, the
# discrete speech tokens and their mask): the processor returns them, generate's prefill consumes them, trainers batch
# them. One list, so a new input cannot be forgotten by one of them.
AUDIO_INPUT_NAMES = (
    "input_features",
    "feature_attention_mask",
    "feature_exist_mask",
    "speech_ids",
    "speech_attention_mask",
)
# The transcript of a spoken target (the speech head's text-side conditioning in training and in the prompt's audio).
TRANSCRIPT_INPUT_NAMES = ("text_ids", "text_attention_mask")
TRAINING_RECIPES = ("consistent", "official")

_SRH_BACKBONE_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}

_TEXT_MODEL_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "audio_bos_index": DEFAULT_AUDIO_BOS_INDEX,
    "audio_eos_index": DEFAULT_AUDIO_EOS_INDEX,
    "sil_index": DEFAULT_SIL_INDEX,
}


@auto_docstring(
    checkpoint="FunAudioLLM/Fun-Audio-Chat-8B",
    custom_intro=(
        "Configuration of the audio side of Fun-Audio-Chat (``audio_config``): the Whisper-style continuous encoder, "
        "the discrete speech-token encoder (DRSR grouping of ``group_size`` codes into one LLM position) and the "
        "Speech Refined Head. ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` are the speech-BOS, speech-EOS "
        "and speech-pad ids inside the codebook."
    ),
)
@strict
class FunAudioChatAudioEncoderConfig(PreTrainedConfig):
    r"""
    max_source_positions (`int`, *optional*, defaults to 1500):
        Longest mel sequence (after the convolutions) of one encoder window.
    n_window (`int`, *optional*, defaults to 100):
        Half the number of mel frames of one independent encoder chunk (chunks of ``2 * n_window`` frames).
    output_dim (`int`, *optional*, defaults to 4096):
        Width of the audio embeddings fed to the LLM; must equal the LLM hidden size.
    codebook_size (`int`, *optional*, defaults to 6565):
        Number of speech ids (6561 S3Tokenizer codes + 4 special ids in the release).
    group_size (`int`, *optional*, defaults to 5):
        DRSR group size k: 25 Hz speech codes per 5 Hz LLM position.
    continuous_features_mode (`str`, *optional*, defaults to `"replace"`):
        ``"replace"``: audio with continuous features uses them instead of its codes; ``"add"``: the sum of both.
    enable_audio_invert_tower (`bool`, *optional*, defaults to `True`):
        Build the Speech Refined Head; without it the model is speech-to-text only.
    crq_transformer_config (`dict | PreTrainedConfig`, *optional*):
        Qwen3 config of the Speech Refined Head's backbone.
    """

    model_type = "funaudiochat_audio_encoder"
    attribute_map = {
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
        "intermediate_size": "encoder_ffn_dim",
    }
    sub_configs_defaults = {
        "crq_transformer_config": SubConfigSpec(
            config_class=AutoConfig, model_type="qwen3", init_kwargs=_SRH_BACKBONE_DEFAULTS
        ),
    }

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280  # trf-ignore: TRF023 (the official config.json and Qwen2.5-Omni name it d_model)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_function: str = "gelu"
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    initializer_range: float = 0.02
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 4096
    codebook_size: int = 6565
    bos_token_id: int | None = 6561
    eos_token_id: int | None = 6562
    pad_token_id: int | None = 6563
    group_size: int = 5
    continuous_features_mode: str = "replace"
    enable_audio_invert_tower: bool = True
    crq_transformer_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_audio_config()

    def validate_audio_config(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"audio_config.group_size must be >= 1, got {self.group_size}.")
        if self.continuous_features_mode not in ("replace", "add"):
            raise ValueError(
                f"audio_config.continuous_features_mode must be 'replace' or 'add', got {self.continuous_features_mode!r}."
            )
        if self.d_model % self.encoder_attention_heads != 0:
            raise ValueError(
                f"audio_config.d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                f"({self.encoder_attention_heads})."
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None or not 0 <= value < self.codebook_size:
                raise ValueError(
                    f"audio_config.{name}={value} is outside the speech codebook [0, {self.codebook_size}); "
                    "speech special ids must be valid rows of the speech embedding table."
                )
        if len({self.bos_token_id, self.eos_token_id, self.pad_token_id}) != 3:
            raise ValueError("audio_config bos/eos/pad speech ids must be three different ids.")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # The official config.json spells the layer count both ways; keep both so it saves back unchanged.
        output["num_hidden_layers"] = self.encoder_layers
        return output


def refuse_missing_local_path(source: str | os.PathLike | None) -> None:
    """Raise ``OSError`` for a path that can only be local (absolute, ``./``, ``~``, more than one ``/``) and does not
    exist: transformers would report it as an invalid Hub repo id. ``None`` (transformers' ``from_pretrained(None,
    config=..., state_dict=...)``, which loads from the given state dict) names no path and passes."""
    if source is None:
        return
    text = os.fspath(source)
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not os.path.exists(os.path.expanduser(text)):
        raise OSError(f"{text}: no such directory (a local path, not a Hub repo id); check the path.")


@auto_docstring(
    checkpoint="FunAudioLLM/Fun-Audio-Chat-8B",
    custom_intro=(
        "Configuration of Fun-Audio-Chat (``FunAudioChatForConditionalGeneration``): a Qwen3 ``text_config`` (which "
        "keeps ``audio_bos_index``, ``audio_eos_index`` and ``sil_index``) and a ``FunAudioChatAudioEncoderConfig`` "
        "``audio_config``; ``audio_token_index`` is the id of the ``<|AUDIO|>`` placeholder."
    ),
)
@strict
class FunAudioChatConfig(PreTrainedConfig):
    r"""
    ignore_index (`int`, *optional*, defaults to -100):
        Label value the losses skip; kept because the official ``config.json`` carries it (the model always skips
        ``IGNORE_INDEX``).
    training_recipe (`str`, *optional*, defaults to `"consistent"`):
        What the training forward feeds (see ``docs/training.md``). ``"consistent"`` trains what ``generate()`` does:
        the pad tail of a reply's last speech group is a target (the speech pad id), and the Speech Refined Head
        gets generation's previous-code embeddings (speech-BOS over the prompt, the greedily decoded prompt codes
        before the reply) and text conditioning (the ``<|AUDIO|>`` embedding at audio without a transcript);
        user-audio features are never halved. ``"official"`` reproduces the official training forward bit for bit.
    halve_unpaired_audio_features (`bool`, *optional*, defaults to `False`):
        Older spelling of ``training_recipe="official"``; True selects it.
    """

    model_type = "funaudiochat"
    attribute_map = {"audio_token_id": "audio_token_index"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3", init_kwargs=_TEXT_MODEL_DEFAULTS),
        "audio_config": SubConfigSpec(config_class=FunAudioChatAudioEncoderConfig),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_token_index: int = DEFAULT_AUDIO_TOKEN_INDEX
    ignore_index: int = IGNORE_INDEX  # in the official config.json; the model always skips IGNORE_INDEX
    hidden_size: int | None = None
    training_recipe: str = "consistent"
    halve_unpaired_audio_features: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, default in (
            ("audio_bos_index", DEFAULT_AUDIO_BOS_INDEX),
            ("audio_eos_index", DEFAULT_AUDIO_EOS_INDEX),
            ("sil_index", DEFAULT_SIL_INDEX),
        ):
            if getattr(self.text_config, name, None) is None:
                setattr(self.text_config, name, default)
        if self.hidden_size is None:
            self.hidden_size = self.text_config.hidden_size
        self.validate_consistency()

    @property
    def uses_official_training_recipe(self) -> bool:
        """True when the training forward reproduces the official one (``training_recipe="official"`` or the
        older ``halve_unpaired_audio_features=True``)."""
        return self.training_recipe == "official" or bool(self.halve_unpaired_audio_features)

    def validate_consistency(self) -> None:
        text, audio = self.text_config, self.audio_config
        if self.training_recipe not in TRAINING_RECIPES:
            raise ValueError(
                f'training_recipe={self.training_recipe!r} is not one of {TRAINING_RECIPES}: "consistent" trains '
                'what generate() does, "official" reproduces the official training forward.'
            )
        if audio.output_dim != text.hidden_size:
            raise ValueError(
                f"audio_config.output_dim ({audio.output_dim}) must equal text_config.hidden_size "
                f"({text.hidden_size}): audio embeddings are written into the LLM input."
            )
        if self.hidden_size != text.hidden_size:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal text_config.hidden_size ({text.hidden_size})."
            )
        for name in ("audio_bos_index", "audio_eos_index", "sil_index"):
            value = getattr(text, name)
            if not 0 <= value < text.vocab_size:
                raise ValueError(f"text_config.{name}={value} is outside the text vocabulary [0, {text.vocab_size}).")
        if not 0 <= self.audio_token_index < text.vocab_size:
            raise ValueError(
                f"audio_token_index={self.audio_token_index} is outside the text vocabulary [0, {text.vocab_size})."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """``PreTrainedConfig.get_config_dict`` that names the two common mistakes instead of failing later: a local
        path that does not exist (not a bad Hub repo id) and a checkpoint of another model type, such as the Qwen3
        base LLM (not a hidden-size mismatch)."""
        source = os.fspath(pretrained_model_name_or_path)
        refuse_missing_local_path(source)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"{source} holds a {model_type!r} checkpoint, not Fun-Audio-Chat (model_type {cls.model_type!r}). "
                "A Qwen3 LLM loads with AutoModelForCausalLM; use it as the base of a Core-Cocktail merge."
            )
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Default-valued flags of ours are noise in an official-layout config.json.
        if not output.get("halve_unpaired_audio_features", False):
            output.pop("halve_unpaired_audio_features", None)
        if output.get("training_recipe") == "consistent":
            output.pop("training_recipe", None)
        return output


__all__ = ["IGNORE_INDEX", "FunAudioChatAudioEncoderConfig", "FunAudioChatConfig", "refuse_missing_local_path"]
