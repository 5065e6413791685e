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
"""FunAudioChatForConditionalGeneration: audio merged into a Qwen3 LLM, plus the Speech Refined Head.

Parameter names equal the official state dict (docs/official-format.md#state-dict), so official ``model.safetensors`` files load as they are.
The forward here is the training / scoring path (teacher-forced SRH); generation lives in ``generation_fun_audio_chat.py``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import auto_docstring, can_return_tuple

from ..configuration_fun_audio_chat import IGNORE_INDEX, FunAudioChatConfig, refuse_missing_local_path
from ..transformers_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_of, pop_cache_argument
from .audio_encoder import FunAudioChatAudioEncoder
from .context_length import ContextFit, context_fit
from .generation_fun_audio_chat import FunAudioChatGenerationMixin
from .speech_encoder import FunAudioChatDiscreteEncoder
from .speech_head import FunAudioChatSpeechHead, SpeechHeadDecoder
from .speech_sampling import GREEDY_SPEECH


@auto_docstring(
    custom_intro="""
    Forward output: the causal-LM fields (`loss` = `text_loss + speech_loss`, text `logits`, the LLM cache,
    `hidden_states`, `attentions`) plus the speech stream's. `gather_sequence_log_probs` turns a logits/targets pair
    into per-row summed log-probabilities (preference training scores answers that way). The cache field is named as
    the installed transformers names it (see `fun_audio_chat.transformers_compat`); `output.past_key_values` reads it
    on every supported release.
    """
)
@dataclass
class FunAudioChatOutputWithPast(CausalLMOutputWithPast):
    r"""
    text_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Text stream cross-entropy, when `labels` are given.
    speech_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Speech stream cross-entropy, when `labels` are given.
    speech_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length * group_size, codebook_size)`, *optional*):
        Speech Refined Head logits from the teacher-forced head.
    shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        When `labels` are given, the text targets the loss used, aligned with `logits` (`logits[:, t]` predicts
        `shift_labels[:, t]`; -100 where nothing is scored).
    speech_shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length * group_size)`, *optional*):
        Likewise the speech targets, aligned with `speech_logits`.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
        Final (post-norm) LLM states, when `return_last_hidden_state=True`.
    """

    text_loss: torch.FloatTensor | None = None
    speech_loss: torch.FloatTensor | None = None
    speech_logits: torch.FloatTensor | None = None
    shift_labels: torch.LongTensor | None = None
    speech_shift_labels: torch.LongTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class MergedAudioInputs:
    """Everything the forward derives from the audio inputs for one batch.

    The layout fields (placeholders, groups, padded speech ids, transcripts) are all the label builders need;
    the embeddings are filled in by :meth:`FunAudioChatForConditionalGeneration.merge_audio` only.
    """

    audio_slots: torch.Tensor  # (B, L) bool: <|AUDIO|> positions
    groups_per_audio: torch.Tensor  # (N,) 5 Hz positions each audio row fills
    padded_speech_ids: torch.Tensor  # (N, S) with S a multiple of k
    padded_speech_mask: torch.Tensor  # (N, S)
    transcript_ids: torch.Tensor | None  # (N, S/k) with pad/eos mapped to <|sil|>
    inputs_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None  # SRH conditioning: token embeddings, transcripts at <|AUDIO|> slots


@auto_docstring
class FunAudioChatPreTrainedModel(PreTrainedModel):
    config_class = FunAudioChatConfig
    config: FunAudioChatConfig
    # trf-ignore: TRF002 (official state-dict keys carry no prefix and the model has no single base model to strip)
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    # No _no_split_modules of our own: post_init collects the LLM's, the audio encoder's and the speech head's layer
    # classes from those submodels.
    _skip_keys_device_placement = [CACHE_NAME, LEGACY_CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # Stored by the official code although it deletes the module; dropped quietly on load.
    _keys_to_ignore_on_load_unexpected = [r"audio_invert_tower\.crq_transformer\.embed_tokens\.weight"]

    #: Kept in full precision when the LLM is loaded quantized (``quantization_config``): the audio encoders, the
    #: Speech Refined Head, the speech embeddings (tied to the SRH output) and the LLM output head. Used as the
    #: quantizer's ``modules_to_not_convert`` unless the caller sets one.
    _modules_not_quantized = ["continuous_audio_tower", "audio_tower", "audio_invert_tower", "language_model.lm_head"]


@auto_docstring(
    custom_intro="""
    Fun-Audio-Chat: audio merged into a Qwen3 LLM (continuous Whisper-style features and 25 Hz speech codes grouped
    five to one LLM position), plus the Speech Refined Head that decodes five speech codes per LLM step.
    """
)
class FunAudioChatForConditionalGeneration(FunAudioChatGenerationMixin, FunAudioChatPreTrainedModel, GenerationMixin):
    # The SRH output head is the speech embedding table (official `tie_weights` always ties it); the LLM head
    # follows text_config.tie_word_embeddings (False for the release).
    _srh_tied_weights = {"audio_invert_tower.lm_head.weight": "audio_tower.embed_tokens.weight"}
    _tied_weights_keys = dict(_srh_tied_weights)

    def __init__(self, config: FunAudioChatConfig):
        super().__init__(config)
        audio_config = config.audio_config
        self.continuous_audio_tower = FunAudioChatAudioEncoder(audio_config)
        self.audio_tower = FunAudioChatDiscreteEncoder(audio_config)
        self.audio_invert_tower = (
            FunAudioChatSpeechHead(audio_config) if audio_config.enable_audio_invert_tower else None
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self._init_speech_generation_config()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` restricted to safetensors (pickle checkpoints are refused), with the
        speech generation fields added to a generation config that lacks them (official checkpoints).

        Hub kernels are off unless asked for (``use_kernels=True``): transformers >= 5.25 turns them on by default,
        swapping the LLM's and the speech head's RMSNorm/SiLU/rotary for kernels fetched from the Hub at load time
        on CUDA. Off, a load needs no network, decoding keeps the numerics the parity tests pin, and compiled
        decoding compiles plain torch modules (docs/architecture.md#hub-kernels)."""
        kwargs.setdefault("use_kernels", False)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Fun-Audio-Chat loads safetensors checkpoints only; pickle (.bin) files are refused.")
        refuse_missing_local_path(pretrained_model_name_or_path)
        kwargs["use_safetensors"] = True
        kwargs["quantization_config"] = cls._keep_audio_parts_unquantized(kwargs.get("quantization_config"))
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            folder = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(folder) and any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(folder)):
                raise OSError(
                    f"{folder} holds only pickle weights (.bin/.pt); Fun-Audio-Chat refuses to unpickle checkpoints. "
                    "Convert them to model.safetensors (safetensors.torch.save_file) from a trusted environment."
                ) from error
            raise
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._init_speech_generation_config()
        model.continuous_audio_tower.freeze_unused_parameters()
        return loaded

    @classmethod
    def _keep_audio_parts_unquantized(cls, quantization_config):
        """A copy of ``quantization_config`` that leaves :attr:`_modules_not_quantized` unquantized, unless the
        caller chose the modules to skip (``modules_to_not_convert``, or bitsandbytes' ``llm_int8_skip_modules``)."""
        if quantization_config is None:
            return None
        if isinstance(quantization_config, dict):
            quantization_config = dict(quantization_config)
            if quantization_config.get("modules_to_not_convert") is None:
                quantization_config["modules_to_not_convert"] = list(cls._modules_not_quantized)
            return quantization_config
        quantization_config = copy.copy(quantization_config)
        for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
            if hasattr(quantization_config, field):
                if getattr(quantization_config, field) is None:
                    setattr(quantization_config, field, list(cls._modules_not_quantized))
                break
        return quantization_config

    # ----------------------------------------------------------------------------------------- plumbing
    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        if not all_submodels and self.audio_invert_tower is not None:
            tied.update(self._srh_tied_weights)
        return tied

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """What ``generate`` can reply with (transformers' ``any-to-any`` pipeline checks its ``generation_mode``
        against it): text, and audio (25 Hz speech codes) when the model has the Speech Refined Head."""
        return ("text", "audio") if self.audio_invert_tower is not None else ("text",)

    @property
    def group_size(self) -> int:
        return self.config.audio_config.group_size

    def context_fit(
        self, prompt_length: int, max_new_tokens: int, speech: bool | None = None, cached_length: int = 0
    ) -> ContextFit:
        """Whether a prompt of ``prompt_length`` ids plus ``max_new_tokens`` steps fits this model, and the longest
        prompt that would (``.max_prompt_length``); ``.check()`` raises a ``ValueError`` naming the fix.

        ``speech`` (default: whether the model has the Speech Refined Head) adds the head's budget;
        ``cached_length`` is the number of prompt positions held by a continued cache. ``generate`` and the server
        both refuse requests with this rule (see :mod:`fun_audio_chat.modeling.context_length`)."""
        head = self.audio_invert_tower
        speech = head is not None if speech is None else speech
        if speech and head is None:
            raise ValueError("speech=True needs the Speech Refined Head, which this model was built without.")
        return context_fit(
            prompt_length=int(prompt_length),
            max_new_tokens=int(max_new_tokens),
            llm_limit=int(self.config.text_config.max_position_embeddings),
            group_size=self.group_size,
            speech_head_limit=int(head.crq_transformer.config.max_position_embeddings) if speech else None,
            cached_length=int(cached_length),
        )

    @property
    def text_pad_id(self) -> int:
        text = self.config.text_config
        pad = text.pad_token_id
        if pad is None:
            pad = text.eos_token_id
        return pad[0] if isinstance(pad, (list, tuple)) else pad

    def _text_end_ids(self) -> list[int]:
        eos = self.config.text_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return [i for i in {*eos, self.text_pad_id} if i is not None]

    # ------------------------------------------------------------------------------------ audio merging
    def _check_audio_inputs(self, input_ids, speech_ids, speech_attention_mask, input_features, feature_exist_mask):
        codebook = self.config.audio_config.codebook_size
        if speech_ids.dim() != 2:
            raise ValueError(f"speech_ids must be (num_audios, length), got shape {tuple(speech_ids.shape)}.")
        if speech_ids.numel() and (speech_ids.min() < 0 or speech_ids.max() >= codebook):
            raise ValueError(
                f"speech_ids contain ids outside the speech codebook [0, {codebook}) "
                f"(min {int(speech_ids.min())}, max {int(speech_ids.max())}); use the speech tokenizer's ids."
            )
        if speech_attention_mask is not None and speech_attention_mask.shape != speech_ids.shape:
            raise ValueError(
                f"speech_attention_mask shape {tuple(speech_attention_mask.shape)} does not match speech_ids "
                f"{tuple(speech_ids.shape)}."
            )
        if feature_exist_mask is not None and feature_exist_mask.shape[0] != speech_ids.shape[0]:
            raise ValueError(
                f"feature_exist_mask has {feature_exist_mask.shape[0]} rows but speech_ids has "
                f"{speech_ids.shape[0]} audio rows; there must be one entry per audio."
            )
        if input_features is None and feature_exist_mask is not None and bool(feature_exist_mask.any()):
            # Without them the audio tower would embed those audios' speech ids alone (all pad ids for user audio).
            raise ValueError(
                f"feature_exist_mask marks {int(feature_exist_mask.sum())} audio(s) as having continuous features "
                "but no input_features were given; pass the processor's input_features and feature_attention_mask."
            )
        if input_features is not None:
            expected = speech_ids.shape[0] if feature_exist_mask is None else int(feature_exist_mask.sum())
            if input_features.shape[0] != expected:
                raise ValueError(
                    f"input_features has {input_features.shape[0]} audio rows but {expected} audios are marked as "
                    "having continuous features (feature_exist_mask); pass one feature row per such audio."
                )
            if input_features.shape[1] != self.config.audio_config.num_mel_bins:
                raise ValueError(
                    f"input_features must have {self.config.audio_config.num_mel_bins} mel bins, got "
                    f"{input_features.shape[1]}."
                )

    def _pad_to_group(self, speech_ids, speech_attention_mask):
        remainder = (-speech_ids.shape[1]) % self.group_size
        pad_id = self.config.audio_config.pad_token_id
        if speech_attention_mask is None:
            speech_attention_mask = torch.ones_like(speech_ids)
        if remainder:
            speech_ids = nn.functional.pad(speech_ids, (0, remainder), value=pad_id)
            speech_attention_mask = nn.functional.pad(speech_attention_mask, (0, remainder), value=0)
        return speech_ids, speech_attention_mask

    def encode_audio(
        self,
        speech_ids: torch.Tensor,
        speech_attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
    ):
        """5 Hz audio embeddings (N, S/k, H) of each audio row, with the padded speech ids and mask."""
        speech_ids, speech_mask = self._pad_to_group(speech_ids, speech_attention_mask)
        continuous = None
        if input_features is not None and input_features.shape[0] > 0:
            if feature_attention_mask is None:
                feature_lengths = torch.full(
                    (input_features.shape[0],), input_features.shape[-1], device=input_features.device
                )
            else:
                feature_lengths = feature_attention_mask.sum(-1)
            if (feature_lengths <= 0).any():
                raise ValueError("feature_attention_mask marks an audio with no valid frames; drop the empty audio.")
            encoded = self.continuous_audio_tower(input_features.to(self.dtype), feature_lengths)
            length = speech_ids.shape[1]
            continuous = encoded[0].new_zeros(len(encoded), length, encoded[0].shape[-1])
            for row, frames in enumerate(encoded):
                kept = min(frames.shape[0], length)
                continuous[row, :kept] = frames[:kept]
        grouped = self.audio_tower(speech_ids, continuous, feature_exist_mask)
        return grouped, speech_ids, speech_mask

    def _transcript_ids(self, text_ids: torch.Tensor, groups: int) -> torch.Tensor:
        """Transcripts left-aligned on the 5 Hz grid: cut or padded to ``groups``, pad/eos mapped to <|sil|>."""
        if text_ids.shape[1] >= groups:
            text_ids = text_ids[:, :groups]
        else:
            text_ids = nn.functional.pad(text_ids, (0, groups - text_ids.shape[1]), value=self.text_pad_id)
        silence = self.config.text_config.sil_index
        ends = torch.tensor(self._text_end_ids(), device=text_ids.device)
        return torch.where(torch.isin(text_ids, ends), torch.full_like(text_ids, silence), text_ids)

    def audio_layout(
        self,
        input_ids: torch.Tensor,
        speech_ids: torch.Tensor,
        speech_attention_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        audio_slots: torch.Tensor | None = None,
    ) -> MergedAudioInputs:
        """Where each audio goes in ``input_ids`` (no network runs): enough to build the labels. ``audio_slots``
        (B, L) marks the <|AUDIO|> positions when the prompt is given as embeddings (``input_ids`` then unused)."""
        speech_ids, speech_mask = self._pad_to_group(speech_ids, speech_attention_mask)
        groups_per_audio = (speech_mask.sum(-1) + self.group_size - 1) // self.group_size
        if audio_slots is None:
            audio_slots = input_ids == self.config.audio_token_index
        n_slots, n_groups = int(audio_slots.sum()), int(groups_per_audio.sum())
        if n_slots != n_groups:
            raise ValueError(
                f"input_ids hold {n_slots} <|AUDIO|> placeholders but the audios fill {n_groups} positions "
                f"(ceil(valid speech frames / {self.group_size}) per audio, from speech_attention_mask); build the "
                "prompt with the processor so each audio gets exactly that many placeholders."
            )
        groups = speech_ids.shape[1] // self.group_size
        transcript_ids = self._transcript_ids(text_ids, groups) if text_ids is not None else None
        return MergedAudioInputs(
            audio_slots=audio_slots,
            groups_per_audio=groups_per_audio,
            padded_speech_ids=speech_ids,
            padded_speech_mask=speech_mask,
            transcript_ids=transcript_ids,
        )

    def audio_placeholder_mask(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L) True where ``inputs_embeds`` holds the <|AUDIO|> token's embedding (a prompt given as embeddings)."""
        placeholder = self.get_input_embeddings()(
            torch.tensor(self.config.audio_token_index, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)

    def merge_audio(
        self,
        input_ids: torch.Tensor,
        speech_ids: torch.Tensor,
        speech_attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> MergedAudioInputs:
        """LLM input embeddings with audio written into the <|AUDIO|> placeholders.

        The prompt is ``input_ids``, or ``inputs_embeds`` (then ``input_ids`` may be None): as for transformers'
        multimodal models, the placeholders are then the positions holding the <|AUDIO|> token's embedding."""
        self._check_audio_inputs(input_ids, speech_ids, speech_attention_mask, input_features, feature_exist_mask)
        embed = self.get_input_embeddings()
        audio_slots = None
        if inputs_embeds is not None:
            audio_slots = self.audio_placeholder_mask(inputs_embeds)
        layout = self.audio_layout(input_ids, speech_ids, speech_attention_mask, text_ids, audio_slots)
        token_embeds = inputs_embeds if inputs_embeds is not None else embed(input_ids)
        audio_embeds, _, _ = self.encode_audio(
            speech_ids, speech_attention_mask, input_features, feature_attention_mask, feature_exist_mask
        )
        groups = layout.padded_speech_ids.shape[1] // self.group_size
        keep = torch.arange(groups, device=token_embeds.device)[None, :] < layout.groups_per_audio[:, None]
        text_embeds = token_embeds
        if layout.transcript_ids is not None:
            has_text = (
                text_attention_mask.bool().view(-1)
                if text_attention_mask is not None
                else torch.ones(layout.transcript_ids.shape[0], dtype=torch.bool, device=token_embeds.device)
            )
            text_features = embed(layout.transcript_ids) * has_text[:, None, None].to(token_embeds.dtype)
            averaged = (text_features + audio_embeds) / 2
            official = self.config.uses_official_training_recipe
            if official:
                audio_embeds = averaged
            else:
                audio_embeds = torch.where(has_text[:, None, None], averaged, audio_embeds)
            # SRH text conditioning at the audio slots: the official forward uses zeros for audio without a
            # transcript; generate() uses the <|AUDIO|> token embedding there (the prompt's own tokens).
            conditioning = text_features
            if not official:
                placeholder = embed(torch.full_like(layout.transcript_ids, self.config.audio_token_index))
                conditioning = torch.where(has_text[:, None, None], text_features, placeholder)
            text_embeds = token_embeds.masked_scatter(layout.audio_slots[..., None], conditioning[keep])

        slots = layout.audio_slots[..., None]
        layout.inputs_embeds = token_embeds.masked_scatter(slots, audio_embeds[keep].to(token_embeds.dtype))
        layout.text_embeds = text_embeds
        return layout

    def count_loss_targets(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        **_,
    ) -> tuple[int, int]:
        """``(text, speech)`` numbers of targets the training losses average over, without running the model.

        Uses the forward's own label builders, so gradient-accumulation normalisation can never drift from them.
        """
        if labels is None:
            return 0, 0
        has_audio = speech_ids is not None and bool((input_ids == self.config.audio_token_index).any())
        if not has_audio:
            text_labels = labels.masked_fill(labels == self.config.audio_token_index, IGNORE_INDEX)
            return int((text_labels[:, 1:] != IGNORE_INDEX).sum()), 0
        layout = self.audio_layout(input_ids, speech_ids, speech_attention_mask, text_ids)
        text_labels = self.build_text_labels(labels, layout, text_attention_mask)
        n_text = int((text_labels[:, 1:] != IGNORE_INDEX).sum())
        if self.audio_invert_tower is None:
            return n_text, 0
        speech_labels = self.build_speech_labels(labels, layout)
        return n_text, int((speech_labels[:, self.group_size :] != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------------------------------- labels
    def build_text_labels(self, labels, merged: MergedAudioInputs, text_attention_mask=None) -> torch.Tensor:
        """LM targets: placeholders never predict themselves; the 5 Hz transcript is written into them."""
        text_labels = labels.masked_fill(labels == self.config.audio_token_index, IGNORE_INDEX)
        if merged.transcript_ids is None:
            return text_labels
        groups = merged.transcript_ids.shape[1]
        group_valid = merged.padded_speech_mask[:, :: self.group_size].bool()
        if text_attention_mask is not None:
            group_valid = group_valid & text_attention_mask.bool().view(-1, 1)
        per_group = merged.transcript_ids.masked_fill(~group_valid, IGNORE_INDEX)
        keep = torch.arange(groups, device=labels.device)[None, :] < merged.groups_per_audio[:, None]
        scattered = text_labels.masked_scatter(merged.audio_slots, per_group[keep])
        return torch.where(labels == IGNORE_INDEX, labels, scattered)

    def build_speech_labels(self, labels, merged: MergedAudioInputs) -> torch.Tensor:
        """(B, L·k) speech targets of each LLM position's group; EOS groups at <|audio_eos|> positions.

        The sub-positions that pad an audio's last group to k codes are ignored by the official recipe; the
        consistent recipe makes them targets (the speech pad id), since generation emits that group whole.
        """
        k = self.group_size
        batch, length = labels.shape
        rows = merged.padded_speech_ids.shape[0]
        tail_value = IGNORE_INDEX
        # CODEPATH: training_recipe="consistent" (default; checkpoints trained by this library) scores the pad tail
        # of a reply's last speech group; "official" (the released Fun-Audio-Chat-8B's recipe) does not.
        if not self.config.uses_official_training_recipe:
            tail_value = self.config.audio_config.pad_token_id
        per_group = merged.padded_speech_ids.masked_fill(merged.padded_speech_mask == 0, tail_value)
        per_group = per_group.view(rows, -1, k)
        keep = torch.arange(per_group.shape[1], device=labels.device)[None, :] < merged.groups_per_audio[:, None]
        speech_labels = labels.new_full((batch, length, k), IGNORE_INDEX)
        speech_labels = speech_labels.masked_scatter(merged.audio_slots[..., None], per_group[keep])
        speech_labels = speech_labels.masked_fill((labels == IGNORE_INDEX)[..., None], IGNORE_INDEX)
        audio_eos = self.config.text_config.audio_eos_index
        speech_labels = speech_labels.masked_fill(
            (labels == audio_eos)[..., None], self.config.audio_config.eos_token_id
        )
        return speech_labels.view(batch, length * k)

    def teacher_forcing_embeddings(self, speech_labels: torch.Tensor) -> torch.Tensor:
        """Embedding of the code preceding each sub-position's target in the 25 Hz stream (B, L·k, H)."""
        return self.audio_invert_tower.code_embeddings(self.teacher_forcing_codes(speech_labels))

    def teacher_forcing_codes(self, speech_labels: torch.Tensor) -> torch.Tensor:
        """Id of the code preceding each sub-position's target in the 25 Hz stream (B, L·k); the speech pad id
        where the official recipe has no code."""
        codes = speech_labels.masked_fill(speech_labels == IGNORE_INDEX, self.config.audio_config.pad_token_id)
        return torch.roll(codes, shifts=-(self.group_size - 1), dims=1)

    def reply_start_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) position of the labelled <|audio_bos|> that opens each row's spoken reply (L when there is none):
        everything before it is the prompt ``generate()`` would prefill."""
        opens = labels == self.config.text_config.audio_bos_index
        length = labels.shape[1]
        index = torch.arange(length, device=labels.device).expand_as(labels)
        return torch.where(opens, index, torch.full_like(index, length)).min(dim=1).values

    @torch.no_grad()
    def generation_previous_codes(
        self,
        states: torch.Tensor,
        speech_labels: torch.Tensor,
        labels: torch.Tensor,
        sub_mask: torch.Tensor | None = None,
        sub_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Previous-code ids (B, L·k) the SRH sees in ``generate()`` at batch 1 with greedy speech codes.

        Over the prompt (before the reply's <|audio_bos|> at position P) generation prefills every sub-position
        up to (P-1, 0) with speech-BOS, then decodes the last k-1 prompt sub-positions one by one, each fed the
        code just decoded; the last of those codes is the previous code of the reply's first sub-position.
        Those k codes are decoded here greedily (no repetition penalty) with the current weights. The reply
        itself keeps teacher forcing.
        """
        k = self.group_size
        codes = self.teacher_forcing_codes(speech_labels)
        batch, total = codes.shape
        starts = self.reply_start_positions(labels)
        index = torch.arange(total, device=codes.device)
        # sub-positions up to (P-1, 0) are prefilled with speech-BOS (the whole row when there is no reply)
        prefilled = torch.where(starts < labels.shape[1], k * (starts - 1) + 1, torch.full_like(starts, total))
        codes = codes.masked_fill(index[None, :] < prefilled[:, None], self.config.audio_config.bos_token_id)
        decoding = (starts > 0) & (starts < labels.shape[1])
        if not bool(decoding.any()):
            return codes
        # Decode as generation does: in eval mode (no dropout, and a KV cache even with activation checkpointing).
        modes = [(module, module.training) for module in self.audio_invert_tower.modules()]
        self.audio_invert_tower.eval()
        try:
            return self._decode_prompt_codes(codes, states, starts, prefilled, decoding, sub_mask, sub_positions)
        finally:
            for module, mode in modes:
                module.training = mode

    def _decode_prompt_codes(self, codes, states, starts, prefilled, decoding, sub_mask, sub_positions):
        """The k greedy SRH sub-steps of each row's last prompt position, written into ``codes`` (see above), with
        the head's own decoder (the one ``generate()`` uses)."""
        k = self.group_size
        batch, total = codes.shape
        device = codes.device
        rows = torch.arange(batch, device=device)
        head = self.audio_invert_tower
        width = int(prefilled[decoding].max())
        sub_states = head.ungroup(states[:, : int(starts[decoding].max())])
        prefix_mask = torch.ones(batch, width, dtype=torch.long, device=device)
        if sub_mask is not None:
            prefix_mask = prefix_mask * sub_mask[:, :width].long()
        # Cache columns: the prefix, then one per decoded sub-step, each at the row's own target sub-position.
        step_targets = (prefilled[:, None] + torch.arange(k - 1, device=device)[None, :]).clamp(max=total - 1)
        if sub_positions is None:
            positions = torch.cat([torch.arange(width, device=device).expand(batch, -1), step_targets], dim=1)
        else:
            positions = torch.cat([sub_positions[:, :width], sub_positions.gather(1, step_targets)], dim=1)
        # Rows with a shorter prompt must not see the prefix entries past their own (P-1, 0): mask them out.
        own_prefix = prefix_mask * (torch.arange(width, device=device)[None, :] < prefilled[:, None]).long()
        key_mask = torch.cat([own_prefix, torch.ones_like(step_targets)], dim=1)
        decoder = SpeechHeadDecoder(head, positions, key_mask, static=False)
        logits = decoder.prefill(sub_states[:, :width] + head.code_embeddings(codes[:, :width]), prefix_mask)
        last = (prefilled - 1).clamp(min=0, max=width - 1)
        decoded = decoder.select(logits[rows, last].float(), None, GREEDY_SPEECH)
        for sub_step in range(1, k + 1):
            target = (prefilled + sub_step - 1).clamp(max=total - 1)
            codes[decoding, target[decoding]] = decoded[decoding]
            if sub_step == k:
                break
            step_states = sub_states[rows, target.clamp(max=sub_states.shape[1] - 1)][:, None]
            logits = decoder.step(step_states + head.code_embeddings(decoded)[:, None])
            decoded = decoder.select(logits, None, GREEDY_SPEECH)
        return codes

    def teacher_forced_speech_logits(
        self,
        hidden: torch.Tensor,
        text_embeds: torch.Tensor,
        speech_labels: torch.Tensor | None,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SRH logits (B, L·k, codebook) over a whole sequence, fed as ``config.training_recipe`` says."""
        head = self.audio_invert_tower
        states = hidden + text_embeds.detach()
        sub_mask, sub_positions = self.speech_head_positions(attention_mask, position_ids)
        previous = None
        if speech_labels is not None:
            # CODEPATH: training_recipe="official" (the released Fun-Audio-Chat-8B's recipe) teacher-forces the
            # previous codes; "consistent" (default) feeds what generate() feeds.
            if self.config.uses_official_training_recipe or labels is None:
                previous = self.teacher_forcing_embeddings(speech_labels)
            else:
                codes = self.generation_previous_codes(states, speech_labels, labels, sub_mask, sub_positions)
                previous = head.code_embeddings(codes)
        return head(states, previous, attention_mask=sub_mask, position_ids=sub_positions)

    def speech_head_positions(self, attention_mask, position_ids):
        """SRH mask and positions at 25 Hz from the LLM's: sub-position (p, j) sits at k·pos(p) + j."""
        k = self.group_size
        sub_mask = attention_mask.repeat_interleave(k, dim=1) if attention_mask is not None else None
        sub_positions = None
        if position_ids is not None:
            offsets = torch.arange(k, device=position_ids.device)
            sub_positions = (position_ids[..., None] * k + offsets).flatten(-2)
            if sub_mask is not None:
                sub_positions = sub_positions.masked_fill(sub_mask == 0, 0)
        return sub_mask, sub_positions

    def _input_embeddings(self, input_ids, inputs_embeds, audio: dict, decode_step: bool = False):
        """(LLM input embeddings, text embeddings the SRH is conditioned on, the audio merge or None); ``audio`` holds
        :meth:`merge_audio`'s audio arguments. ``decode_step`` (one new position on a cache) skips the id check: it
        reads values (a host sync, and a graph break in transformers' compiled decode step) once per token, for an id
        the model chose itself after generate() checked the prompt."""
        speech_ids = audio["speech_ids"]
        merged = None
        text_embeds = None
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None and not decode_step:
            self.check_input_ids(input_ids)
        if inputs_embeds is None:
            # CODEPATH: every Fun-Audio-Chat checkpoint; prompts with <|AUDIO|> spans merge their audio, text-only
            # prompts (and decode steps) embed their tokens.
            if speech_ids is not None and bool((input_ids == self.config.audio_token_index).any()):
                merged = self.merge_audio(input_ids, **audio)
                inputs_embeds, text_embeds = merged.inputs_embeds, merged.text_embeds
            else:
                if input_ids.shape[1] > 1 and (input_ids == self.config.audio_token_index).any():
                    raise ValueError(
                        "input_ids contain <|AUDIO|> placeholders but no speech_ids were given; pass the "
                        "processor's audio outputs (speech_ids, input_features, ...) with the prompt."
                    )
                inputs_embeds = self.get_input_embeddings()(input_ids)
                text_embeds = inputs_embeds
        elif speech_ids is not None and bool(self.audio_placeholder_mask(inputs_embeds).any()):
            # A prompt given as embeddings with its audio (transformers' multimodal contract): the audio fills the
            # positions holding the <|AUDIO|> embedding, exactly as for the same prompt given as ids.
            merged = self.merge_audio(None, **audio, inputs_embeds=inputs_embeds)
            inputs_embeds, text_embeds = merged.inputs_embeds, merged.text_embeds

        return inputs_embeds, text_embeds, merged

    def _shifted_targets(self, labels, merged, text_attention_mask, keep):
        """(next-token text targets of the kept positions, speech labels, next-group speech targets); the speech ones
        are None without audio in the batch or without the SRH."""
        text_labels = labels if merged is None else self.build_text_labels(labels, merged, text_attention_mask)
        # The shifted targets are an output (DPO scores logits against them); the loss takes them as they are
        # (shift_labels=), so they are shifted here only and scored exactly where they are returned.
        next_labels = nn.functional.pad(text_labels, (0, 1), value=IGNORE_INDEX)
        shift_labels = next_labels[:, 1:][:, keep]  # trf-ignore: TRF053
        speech_labels = speech_shift_labels = None
        if merged is not None and self.audio_invert_tower is not None:
            speech_labels = self.build_speech_labels(labels, merged)
            k = self.group_size
            speech_shift_labels = nn.functional.pad(speech_labels, (0, k), value=IGNORE_INDEX)[:, k:]
        return shift_labels, speech_labels, speech_shift_labels

    def _teacher_forced_speech(
        self,
        hidden,
        text_embeds,
        labels,
        speech_labels,
        speech_shift_labels,
        attention_mask,
        position_ids,
        speech_counts,
        return_loss,
    ):
        """(teacher-forced speech logits, speech loss or None)."""
        if self.audio_invert_tower is None:
            raise ValueError("This model has no Speech Refined Head (audio_config.enable_audio_invert_tower=False).")
        speech_logits = self.teacher_forced_speech_logits(
            hidden, text_embeds, speech_labels, labels, attention_mask, position_ids
        )
        speech_loss = None
        # (only when the loss is wanted: the check is a device-to-host sync)
        if return_loss and speech_shift_labels is not None and bool((speech_shift_labels != IGNORE_INDEX).any()):
            speech_loss = self.speech_loss(speech_logits, speech_shift_labels, speech_counts)
        if return_loss and speech_loss is None and labels is not None:
            # No speech target in this batch: a zero loss still connects the SRH to the graph, so every
            # process runs its backward (sharded engines gather and reduce its parameters on all ranks).
            speech_loss = speech_logits.float().sum() * 0.0
        return speech_logits, speech_loss

    # ------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
        speech_ids: torch.LongTensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_ids: torch.LongTensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | dict | None = None,
        compute_speech_logits: bool | None = None,
        return_last_hidden_state: bool = False,
        return_loss: bool = True,
        **kwargs,
    ) -> FunAudioChatOutputWithPast | tuple:
        r"""
        input_features (`torch.FloatTensor` of shape `(num_feature_audios, num_mel_bins, frames)`, *optional*):
            Log-mel features of the audios that have continuous features (rows where `feature_exist_mask` is True).
        feature_attention_mask (`torch.Tensor` of shape `(num_feature_audios, frames)`, *optional*):
            Valid mel frames.
        feature_exist_mask (`torch.Tensor` of shape `(num_audios,)`, *optional*):
            Which audios have continuous features (user audio).
        speech_ids (`torch.LongTensor` of shape `(num_audios, speech_length)`, *optional*):
            25 Hz speech codes of every audio, in the order of the `<|AUDIO|>` spans of `input_ids` (user audio: all
            speech-pad ids).
        speech_attention_mask (`torch.Tensor` of shape `(num_audios, speech_length)`, *optional*):
            Valid positions of `speech_ids`.
        text_ids (`torch.LongTensor` of shape `(num_audios, text_length)`, *optional*):
            Per-audio transcripts (training).
        text_attention_mask (`torch.Tensor` of shape `(num_audios,)`, *optional*):
            False for the audio rows without a transcript.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            LM labels (-100 on the prompt, `input_ids` on the assistant span); unshifted.
        num_items_in_batch (`int`, `torch.Tensor` or `dict`, *optional*):
            Token counts for loss normalisation under gradient accumulation: an int/tensor for the text stream, or
            `{"text": n, "speech": m}` for both.
        compute_speech_logits (`bool`, *optional*):
            Run the teacher-forced Speech Refined Head (default: whenever the model has one).
        return_last_hidden_state (`bool`, *optional*, defaults to `False`):
            Also return the final LLM states (used by generation).
        return_loss (`bool`, *optional*, defaults to `True`):
            With `labels`, compute the text and speech losses. `False` returns only the targets (`shift_labels`,
            `speech_shift_labels`), for callers that score the logits themselves (DPO): it saves a log-softmax over
            each vocabulary.
        """
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        # The inner Qwen3's output capture resolves output_attentions / output_hidden_states (they reach it through
        # kwargs); our config decides when the caller does not, or it would read its own text_config.
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag) is None:
                kwargs[flag] = getattr(self.config, flag)
        audio = {
            "speech_ids": speech_ids,
            "speech_attention_mask": speech_attention_mask,
            "input_features": input_features,
            "feature_attention_mask": feature_attention_mask,
            "feature_exist_mask": feature_exist_mask,
            "text_ids": text_ids,
            "text_attention_mask": text_attention_mask,
        }
        new_positions = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        decode_step = new_positions == 1 and past_key_values is not None
        inputs_embeds, text_embeds, merged = self._input_embeddings(input_ids, inputs_embeds, audio, decode_step)

        llm_output = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: past_key_values},
            **kwargs,
        )
        hidden = llm_output.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.language_model.lm_head(hidden[:, keep, :])

        text_counts, speech_counts = num_items_in_batch, None
        if isinstance(num_items_in_batch, dict):
            text_counts, speech_counts = num_items_in_batch.get("text"), num_items_in_batch.get("speech")

        text_loss = speech_loss = loss = None
        speech_labels = shift_labels = speech_shift_labels = None
        if labels is not None:
            shift_labels, speech_labels, speech_shift_labels = self._shifted_targets(
                labels, merged, text_attention_mask, keep
            )
            if return_loss:
                text_loss = self.loss_function(
                    logits=logits,
                    labels=None,
                    shift_labels=shift_labels.contiguous(),
                    vocab_size=self.config.text_config.vocab_size,
                    num_items_in_batch=text_counts,
                )

        if compute_speech_logits is None:
            compute_speech_logits = self.audio_invert_tower is not None and text_embeds is not None
        speech_logits = None
        if compute_speech_logits:
            speech_logits, speech_loss = self._teacher_forced_speech(
                hidden,
                text_embeds,
                labels,
                speech_labels,
                speech_shift_labels,
                attention_mask,
                position_ids,
                speech_counts,
                return_loss,
            )

        if text_loss is not None:
            loss = text_loss if speech_loss is None else text_loss + speech_loss

        output = FunAudioChatOutputWithPast(
            loss=loss,
            text_loss=text_loss,
            speech_loss=speech_loss,
            logits=logits,
            speech_logits=speech_logits,
            shift_labels=shift_labels,
            speech_shift_labels=speech_shift_labels,
            hidden_states=llm_output.hidden_states,
            attentions=llm_output.attentions,
            last_hidden_state=hidden if return_last_hidden_state else None,
            **{CACHE_NAME: cache_of(llm_output)},
        )
        return output

    def sequence_log_probs(self, include_speech: bool = True, **inputs) -> dict[str, torch.Tensor]:
        """Per-row summed log-probabilities of the labelled reply, text and speech streams separately.

        Takes the training inputs (with ``labels``) and runs :meth:`forward`: the text stream is scored exactly where
        the training loss is (transcript at 5 Hz in the <|AUDIO|> slots), the speech stream on the SRH's
        teacher-forced targets. Returns ``{"text": (B,), "speech": (B,), "text_tokens": (B,), "speech_tokens":
        (B,)}``; with ``include_speech=False`` the SRH is not run and the speech entries are zeros.
        """
        outputs = self(
            **inputs, compute_speech_logits=None if include_speech else False, use_cache=False, return_loss=False
        )
        return gather_stream_log_probs(
            outputs.logits, outputs.shift_labels, outputs.speech_logits, outputs.speech_shift_labels
        )

    def _merged_for_labels(self, inputs) -> MergedAudioInputs | None:
        if inputs.get("speech_ids") is None or inputs.get("input_ids") is None:
            return None
        return self.merge_audio(
            inputs["input_ids"],
            inputs["speech_ids"],
            inputs.get("speech_attention_mask"),
            inputs.get("input_features"),
            inputs.get("feature_attention_mask"),
            inputs.get("feature_exist_mask"),
            inputs.get("text_ids"),
            inputs.get("text_attention_mask"),
        )

    def speech_loss(self, speech_logits, targets, num_items=None) -> torch.Tensor:
        flat_logits = speech_logits.float().reshape(-1, speech_logits.shape[-1])
        flat_targets = targets.reshape(-1).to(flat_logits.device)
        if num_items is None:
            return nn.functional.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
        total = nn.functional.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if torch.is_tensor(num_items):
            num_items = num_items.to(total.device)
        return total / num_items


def gather_sequence_log_probs(logits: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` per row: the sum over positions of ``log_softmax(logits)[target]`` (in float32) and the
    number of targets, for targets aligned with the logits (``shift_labels``; -100 is not scored)."""
    valid = shift_labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1), valid.sum(-1)


def gather_stream_log_probs(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    speech_logits: torch.Tensor | None = None,
    speech_shift_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row ``{"text", "speech", "text_tokens", "speech_tokens"}`` from the fields of a forward output with
    ``labels`` (``logits``, ``shift_labels``, ``speech_logits``, ``speech_shift_labels``); the speech entries are
    zeros when the forward scored no speech stream."""
    if shift_labels is None:
        raise ValueError("gather_stream_log_probs needs the shift_labels of a forward run with labels.")
    text, text_tokens = gather_sequence_log_probs(logits, shift_labels)
    if speech_logits is None or speech_shift_labels is None:
        return {
            "text": text,
            "speech": torch.zeros_like(text),
            "text_tokens": text_tokens,
            "speech_tokens": torch.zeros_like(text_tokens),
        }
    speech, speech_tokens = gather_sequence_log_probs(speech_logits, speech_shift_labels)
    return {"text": text, "speech": speech, "text_tokens": text_tokens, "speech_tokens": speech_tokens}


__all__ = [
    "FunAudioChatForConditionalGeneration",
    "FunAudioChatOutputWithPast",
    "FunAudioChatPreTrainedModel",
    "gather_sequence_log_probs",
    "gather_stream_log_probs",
]
