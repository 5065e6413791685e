"""generate() for Fun-Audio-Chat: one 5 Hz LLM step emits a text token while the Speech Refined Head emits the
next k 25 Hz speech codes.

Built on transformers' generation machinery the way ``models/csm/generation_csm.py`` is: speech controls are
resolved once in :meth:`FunAudioChatGenerationMixin._prepare_generation_config`, and
:meth:`FunAudioChatGenerationMixin._sample` is transformers' sampling loop (``_prefill``,
``_has_unfinished_sequences``, ``get_compiled_call`` for decode steps) with the speech additions fenced in
``# <fun_audio_chat>`` blocks. All per-call speech bookkeeping lives in one :class:`SpeechDecoder`.

Data flow of one decoding step:

1. LLM step on the fused input -> text logits and the last hidden state ``h``.
2. SRH on ``h + embed(input text token)``: ``pre_matching`` ungroups it into k sub-positions, decoded
   autoregressively with the SRH's own KV cache (kept for the whole reply, like the official model); each
   sub-position adds the embedding of the previously sampled code.
3. Text token sampled with the usual logits processors; the speech codes with their own settings.
4. Rows that are speaking (they emitted ``<|audio_bos|>`` earlier and have not finished) keep the group; a group
   holding speech-EOS becomes all speech-EOS, that step's text token becomes ``<|audio_eos|>`` and the row stops.
5. Next LLM input: ``embed(text)`` for silent rows, ``(embed(text) + audio_tower(last group)) / 2`` for speaking rows.

Compiled decoding follows transformers' convention: ``cache_implementation="static"`` plus a ``compile_config``
(on CPU with ``compile_config._compile_all_devices = True``) compiles the LLM decode step and, as one more graph,
the SRH's whole group of k sub-steps with their code selection (``speech_head.decode_static_group``), whose cache is
then static too. No module attributes hold per-call state, so calls can interleave and a training
forward after ``generate()`` is unaffected. Every row keeps its own positions and masks in the SRH, so a row of a
left-padded batch decodes exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    GenerationMode,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from ..configuration_fun_audio_chat import AUDIO_INPUT_NAMES, TRANSCRIPT_INPUT_NAMES
from ..framework_compat import keep_extra_generation_fields
from ..transformers_compat import CACHE_NAME, cache_of
from .compiled_decoding import warm_up_compiled_decoding
from .speech_decoding import SpeechDecoder
from .speech_sampling import SpeechSamplingSettings

# Speech-generation controls: generate() kwargs and GenerationConfig fields, with the official
# speech-to-speech defaults (sampled codes, temperature 0.8, top-p 0.9, no top-k, repetition penalty 1.2).
# ``return_speech`` defaults to whether the model has a Speech Refined Head.
SPEECH_GENERATION_DEFAULTS = {
    "return_speech": True,
    "force_audio_bos": False,
    "speech_do_sample": True,
    "speech_temperature": 0.8,
    "speech_top_p": 0.9,
    "speech_top_k": 0,
    "speech_repetition_penalty": 1.2,
}
# Inputs of the prompt's audio, consumed by the prefill.
_PROMPT_AUDIO_INPUTS = AUDIO_INPUT_NAMES + TRANSCRIPT_INPUT_NAMES
# The decoding loops that run the Speech Refined Head (our ``_sample``); a text reply may use any of transformers'.
SPEECH_DECODING_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
# Passed by generate() to _prepare_generation_config: transformers' other loops (beams, assisted) are reachable.
_ANY_TEXT_MODE = "_fun_audio_chat_any_text_mode"


@dataclass
class FunAudioChatGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of :meth:`FunAudioChatForConditionalGeneration.generate` with ``return_dict_in_generate=True``.

    Args:
        sequences: (B, prompt + new) text ids, as for any decoder-only model.
        speech_ids: (B, k·K) 25 Hz speech codes of each row's reply (speech BOS delay codes and the final
            EOS group included, as the official model returns them), right-padded with the speech pad id.
        speech_attention_mask: (B, k·K) 1 on each row's real codes.
        speech_logits: with ``output_logits=True``, the raw SRH logits of every sub-step, each (B, codebook).
    """

    speech_ids: torch.LongTensor | None = None
    speech_attention_mask: torch.LongTensor | None = None
    speech_logits: tuple[torch.FloatTensor, ...] | None = None


class FunAudioChatGenerationMixin:
    """Speech-aware ``generate``; mixed into :class:`FunAudioChatForConditionalGeneration`."""

    def warm_up_compiled_decoding(self, **kwargs) -> dict[int, float]:
        """Compile the decode graphs at start-up (and load/save torch's compile caches with ``cache_path``); see
        :func:`fun_audio_chat.modeling.compiled_decoding.warm_up_compiled_decoding`."""
        return warm_up_compiled_decoding(self, **kwargs)

    # ------------------------------------------------------------------------------ configuration
    def _speech_generation_defaults(self) -> dict[str, Any]:
        return {**SPEECH_GENERATION_DEFAULTS, "return_speech": getattr(self, "audio_invert_tower", None) is not None}

    def _init_speech_generation_config(self) -> None:
        """Give ``self.generation_config`` the speech fields, so ``generation_config.json`` carries them."""
        config = self.generation_config
        if config is None:
            return
        for name, value in self._speech_generation_defaults().items():
            if getattr(config, name, None) is None:
                setattr(config, name, value)
        if self.audio_invert_tower is None:
            config.return_speech = False
        # The official config.json says use_cache=false (a training setting) and generation configs derive from
        # it; generation always keeps the LLM cache (see _prepare_generation_config), so say so up front, or
        # transformers warns that cache_implementation has no effect.
        config.use_cache = True
        # A config marked as derived from the model config drops unknown fields when it is read back.
        keep_extra_generation_fields(config)

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        """transformers' preparation plus the speech controls: kwargs > ``generation_config`` > the model's
        generation config > defaults; unsupported generation modes and unusable speech settings are refused."""
        speech = {name: kwargs.pop(name) for name in SPEECH_GENERATION_DEFAULTS if name in kwargs}
        any_text_mode = kwargs.pop(_ANY_TEXT_MODE, False)
        asked_without_cache = kwargs.get("use_cache") is False
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for name, default in self._speech_generation_defaults().items():
            value = speech.get(name)
            if value is None:
                value = getattr(generation_config, name, None)
            setattr(generation_config, name, default if value is None else value)
        if generation_config.return_speech and self.audio_invert_tower is None:
            raise ValueError(
                "return_speech=True needs the Speech Refined Head, but this model was built with "
                "audio_config.enable_audio_invert_tower=False; pass return_speech=False for text only."
            )
        SpeechSamplingSettings.from_generation_config(generation_config).validate()
        # Refused here, before transformers looks up the Hub repositories that hold some modes; an assistant_model
        # (not visible here) is refused in _validate_generation_mode.
        mode = generation_config.get_generation_mode()
        if not any_text_mode and mode not in SPEECH_DECODING_MODES:
            # Continuous batching (fun_audio_chat.modeling.continuous_batching) decodes greedily or by sampling.
            raise ValueError(
                f"This decoder supports greedy decoding and sampling only, but these settings select {mode.value!r}; "
                "use model.generate(..., return_speech=False) for a text reply with that mode."
            )
        self._refuse_mode_without_speech(mode, generation_config)
        if generation_config.use_cache is False and self._runs_own_loop(generation_config):
            # Our loop decodes one 5 Hz step at a time on the LLM's KV cache, so it always keeps one; a plain text
            # reply honours the flag. A config saying use_cache=false is the official config.json's training
            # setting and is overridden; asking for it in the call is refused.
            if asked_without_cache:
                raise ValueError(
                    "use_cache=False is not supported with speech generation (return_speech=True or "
                    "force_audio_bos=True): the Speech Refined Head decodes one 5 Hz step at a time on the LLM's "
                    "KV cache. Drop use_cache=False, or pass return_speech=False for a text reply without a cache."
                )
            generation_config.use_cache = True
        return generation_config, model_kwargs

    @staticmethod
    def _runs_own_loop(generation_config: GenerationConfig) -> bool:
        """Whether decoding needs our ``_sample`` (speech, or a reply forced to open with <|audio_bos|>); otherwise
        a text reply runs transformers' own decoding loops."""
        return bool(generation_config.return_speech or generation_config.force_audio_bos)

    def _refuse_mode_without_speech(self, mode: GenerationMode, generation_config: GenerationConfig) -> None:
        if self._runs_own_loop(generation_config) and mode not in SPEECH_DECODING_MODES:
            raise ValueError(
                f"Speech generation (return_speech=True, force_audio_bos=True) supports greedy decoding and sampling "
                f"only, but these settings select {mode.value!r}: the Speech Refined Head decodes one group per "
                "accepted text token, which beams and assisted generation would reorder or discard. Pass "
                "return_speech=False (generation_mode='text') for a text reply with that mode, or unset "
                "num_beams/penalty_alpha/prompt_lookup_num_tokens/assistant_model."
            )

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        self._refuse_mode_without_speech(generation_mode, generation_config)
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _check_generate_inputs(self, inputs, kwargs: dict) -> None:
        """Bad prompts fail here with a message naming the fix, before anything indexes with them."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            self.check_input_ids(input_ids)
        features = kwargs.get("input_features")
        if features is not None and features.is_floating_point() and not bool(torch.isfinite(features).all()):
            raise ValueError(
                "input_features contain NaN or infinite values; check the audio (decoding or resampling failed) "
                "before generating."
            )

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse ids that are not a (batch, length) tensor of ids inside the LLM vocabulary."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(
                f"input_ids must be a (batch, length) tensor, got {shape}; add the batch dimension "
                "(input_ids[None]) or use the processor's return_tensors='pt' output."
            )
        vocab = self.config.text_config.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(
                f"input_ids hold ids outside the LLM vocabulary [0, {vocab}) (min {int(input_ids.min())}, max "
                f"{int(input_ids.max())}); tokenize with this model's tokenizer."
            )

    def generate(self, inputs=None, generation_config: GenerationConfig | None = None, **kwargs):
        """Generate text and (unless ``return_speech=False``) 25 Hz speech codes.

        Speech controls (also read from ``generation_config``): ``return_speech`` (default: whether the model has
        the Speech Refined Head), ``force_audio_bos``, ``speech_do_sample``, ``speech_temperature``,
        ``speech_top_p``, ``speech_top_k``, ``speech_repetition_penalty``. Text sampling uses the standard fields.

        Compiled decoding: ``cache_implementation="static"`` with a ``compile_config`` compiles the LLM decode step
        and the speech head's sub-step (set ``compile_config._compile_all_devices = True`` on CPU).

        Continuing a conversation: pass the full ids so far with the cache a previous call returned
        (``return_dict_in_generate=True``); only the new positions run. The text continues exactly as one
        uninterrupted run would; the speech head's context is per reply (it starts afresh over the new positions).

        Returns:
            with speech and ``return_dict_in_generate=False``: the tuple ``(sequences, speech_ids)`` (the
            official return value); with ``return_dict_in_generate=True``: a :class:`FunAudioChatGenerateOutput`;
            without speech: what transformers' generate returns.

        A streamer given here always ends: if generation fails, :class:`FunAudioChatIteratorStreamer` re-raises
        the error in its consumer; other streamers get ``end()``.
        """
        streamer = kwargs.get("streamer")
        if "generation_mode" in kwargs:
            self._apply_generation_mode(kwargs.pop("generation_mode"), kwargs)
        try:
            self._check_generate_inputs(inputs, kwargs)
            output = super().generate(inputs, generation_config=generation_config, **kwargs, **{_ANY_TEXT_MODE: True})
        except BaseException as error:
            if streamer is not None:
                if hasattr(streamer, "fail"):
                    streamer.fail(error)
                else:
                    streamer.end()
            raise
        return_dict = kwargs.get("return_dict_in_generate")
        if return_dict is None:
            return_dict = (generation_config or self.generation_config).return_dict_in_generate
        if isinstance(output, FunAudioChatGenerateOutput) and not return_dict:
            return output.sequences, output.speech_ids
        return output

    # ------------------------------------------------------------------------- prompt audio inputs
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values=None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """transformers' preparation; the prompt's audio inputs reach exactly the forwards whose positions hold
        <|AUDIO|> placeholders: the prefill, and an assistant model's first call (transformers marks that one as not
        the first iteration and would drop ``input_features``), never a later step of any decoding loop (ours, beam
        search, assisted decoding), which embeds its new tokens only."""
        # The cache arrives under the installed release's name (CACHE_NAME: past_key_values up to transformers
        # 5.23, cache from 5.24); both are declared, since generate() checks its kwargs against this signature.
        given_cache = cache if cache is not None else past_key_values
        if given_cache is not None:
            kwargs[CACHE_NAME] = given_cache
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # The teacher-forced speech head is a training output: no decoding loop reads it (ours runs the head itself).
        model_inputs.setdefault("compute_speech_logits", False)
        audio = {name: kwargs[name] for name in _PROMPT_AUDIO_INPUTS if kwargs.get(name) is not None}
        if not audio:
            return model_inputs
        ids = model_inputs.get("input_ids")
        runs_placeholders = (
            is_first_iteration
            or not kwargs.get("use_cache", True)
            or (ids is not None and bool((ids == self.config.audio_token_index).any()))
        )
        for name, value in audio.items():
            if runs_placeholders:
                model_inputs[name] = value
            else:
                model_inputs.pop(name, None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers' expansion to ``expand_size`` copies of every row (``num_return_sequences``, beams), except
        for the prompt's audio inputs: they hold one row per audio, not per batch row, so each batch row's audios
        are repeated as a block (copy c of row r keeps row r's audios, in order). Repeating each audio row instead
        would hand a row with two audios (or none) another row's audio."""
        audio = {}
        embeds = model_kwargs.get("inputs_embeds")
        prompt_given = embeds is not None or input_ids is not None
        if expand_size > 1 and prompt_given and torch.is_tensor(model_kwargs.get("speech_ids")):
            audio = {
                name: model_kwargs.pop(name) for name in _PROMPT_AUDIO_INPUTS if torch.is_tensor(model_kwargs.get(name))
            }
            if embeds is not None:
                slots = self.audio_placeholder_mask(embeds)
            else:
                slots = input_ids == self.config.audio_token_index
            audio = self._expand_audio_inputs(slots, audio, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(audio)
        return input_ids, model_kwargs

    def _expand_audio_inputs(self, audio_slots: torch.Tensor, audio: dict, expand_size: int) -> dict:
        """The per-audio tensors of ``audio`` reordered for ``expand_size`` copies of each prompt row, whose
        <|AUDIO|> positions ``audio_slots`` (B, L) marks."""
        speech_ids = audio["speech_ids"]
        speech_mask = audio.get("speech_attention_mask")
        frames = (
            speech_mask.sum(-1) if speech_mask is not None else torch.full_like(speech_ids[:, 0], speech_ids.shape[1])
        )
        groups = (frames + self.group_size - 1) // self.group_size
        slots_per_row = audio_slots.sum(-1).to(groups.device)
        if int(slots_per_row.sum()) != int(groups.sum()):
            # The forward refuses this prompt with a message naming the mismatch; keep the inputs as they are.
            return {name: value.repeat_interleave(expand_size, dim=0) for name, value in audio.items()}
        audio_starts = groups.cumsum(0) - groups
        row_of_audio = torch.searchsorted(slots_per_row.cumsum(0), audio_starts, right=True).tolist()
        audios_of_row = [[i for i, row in enumerate(row_of_audio) if row == r] for r in range(audio_slots.shape[0])]
        order = [i for audios in audios_of_row for _ in range(expand_size) for i in audios]
        exist = audio.get("feature_exist_mask")
        has_features = exist.bool().tolist() if exist is not None else [True] * speech_ids.shape[0]
        feature_row = [sum(has_features[:i]) for i in range(len(has_features))]
        feature_order = [feature_row[i] for i in order if has_features[i]]
        expanded = {}
        for name, value in audio.items():
            rows = feature_order if name in ("input_features", "feature_attention_mask") else order
            expanded[name] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
        return expanded

    def _apply_generation_mode(self, mode, kwargs: dict) -> None:
        """Map the output modality transformers' ``any-to-any`` pipeline asks for onto ``return_speech``."""
        if mode is None:
            return
        if mode not in ("text", "audio"):
            raise ValueError(
                f"generation_mode={mode!r} is not an output of Fun-Audio-Chat; use 'text' (text reply) or 'audio' "
                "(text plus 25 Hz speech codes)."
            )
        wants_speech = mode == "audio"
        if wants_speech and getattr(self, "audio_invert_tower", None) is None:
            raise ValueError(
                "generation_mode='audio' needs the Speech Refined Head, but this model was built with "
                "audio_config.enable_audio_invert_tower=False; use generation_mode='text' or load a checkpoint "
                "with the speech head."
            )
        if kwargs.get("return_speech") not in (None, wants_speech):
            raise ValueError(
                f"generation_mode={mode!r} contradicts return_speech={kwargs['return_speech']!r}; pass only one."
            )
        kwargs["return_speech"] = wants_speech

    def _check_context_length(
        self, prompt_length: int, max_new_tokens: int, return_speech: bool, cached_length: int = 0
    ) -> None:
        """Refuse a call whose prompt plus reply does not fit: the model's one rule (``context_fit``), which also
        sizes the Speech Refined Head cache that ``SpeechDecoder.start`` allocates."""
        self.context_fit(
            prompt_length, max(max_new_tokens, 0), speech=return_speech, cached_length=cached_length
        ).check()

    def _check_call_fits(self, input_ids, stopping_criteria, model_kwargs: dict, return_speech: bool) -> int:
        """:meth:`_check_context_length` for one decoding call; returns its ``max_new_tokens``. The prompt is the
        ``inputs_embeds`` when given (``input_ids`` then holds none, or the same positions), and a continued cache
        holds its first positions."""
        max_length = stopping_criteria.max_length
        max_new_tokens = max_length - input_ids.shape[1] if max_length else 0
        embeds = model_kwargs.get("inputs_embeds")
        prompt_length = embeds.shape[1] if embeds is not None else input_ids.shape[1]
        continued = cache_of(model_kwargs)
        cached_length = int(continued.get_seq_length()) if hasattr(continued, "get_seq_length") else 0
        self._check_context_length(prompt_length, max_new_tokens, return_speech, cached_length)
        return max_new_tokens

    # -------------------------------------------------------------------------------- decode loop
    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        """transformers' ``_sample`` with the speech head; additions are fenced ``<fun_audio_chat>`` blocks. A text
        reply (no speech, no forced <|audio_bos|>) runs transformers' own ``_sample``."""
        if not self._runs_own_loop(generation_config):
            self._check_call_fits(input_ids, stopping_criteria, model_kwargs, return_speech=False)
            return super()._sample(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        pad_token_id = generation_config._pad_token_tensor
        output_attentions = generation_config.output_attentions
        output_hidden_states = generation_config.output_hidden_states
        output_scores = generation_config.output_scores
        output_logits = generation_config.output_logits
        return_dict_in_generate = generation_config.return_dict_in_generate
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        do_sample = generation_config.do_sample

        scores = () if (return_dict_in_generate and output_scores) else None
        raw_logits = () if (return_dict_in_generate and output_logits) else None
        decoder_attentions = () if (return_dict_in_generate and output_attentions) else None
        decoder_hidden_states = () if (return_dict_in_generate and output_hidden_states) else None

        batch_size = input_ids.shape[0]
        this_peer_finished = False
        unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
        if pad_token_id is not None:
            pad_token_id = pad_token_id.to(input_ids.device)

        compiled = self._valid_auto_compile_criteria(model_kwargs, generation_config)
        model_forward = self.get_compiled_call(generation_config.compile_config) if compiled else self.__call__

        # <fun_audio_chat: speech settings; the LLM step also returns its last hidden state (SRH input)>
        return_speech = bool(generation_config.return_speech)
        audio_eos = self.config.text_config.audio_eos_index
        force_audio_bos = bool(generation_config.force_audio_bos)
        if return_speech and stopping_criteria.max_length is None:
            # The speech head reserves its cache for the longest possible reply.
            raise ValueError("Speech generation needs a length limit: pass max_new_tokens (or max_length).")
        max_new_tokens = self._check_call_fits(input_ids, stopping_criteria, model_kwargs, return_speech)
        model_kwargs["return_last_hidden_state"] = return_speech
        model_kwargs["compute_speech_logits"] = False
        speech = None
        if return_speech:
            compile_config = (generation_config.compile_config or self._default_compile_config()) if compiled else None
            speech = SpeechDecoder(self, generation_config, compile_config)
        prompt_embeds = model_kwargs.get("inputs_embeds")
        # </fun_audio_chat>

        outputs = self._prefill(input_ids, generation_config, model_kwargs)

        # <fun_audio_chat: the prompt's audio is consumed by the prefill; size the speech state from it>
        for key in _PROMPT_AUDIO_INPUTS:
            model_kwargs.pop(key, None)
        if return_speech:
            new_positions = outputs.last_hidden_state.shape[1]
            if prompt_embeds is not None:
                step_text_embeds = prompt_embeds[:, -new_positions:]
            else:
                step_text_embeds = self.get_input_embeddings()(input_ids[:, -new_positions:])
            speech.start(input_ids, step_text_embeds, model_kwargs.get("attention_mask"), new_positions, max_new_tokens)
        next_embeds = None
        # </fun_audio_chat>

        prefill_consumed = False
        step = 0
        while self._has_unfinished_sequences(this_peer_finished, synced_gpus, device=input_ids.device):
            if prefill_consumed:
                model_inputs = self.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
                # <fun_audio_chat: the LLM input is an embedding (fused with speech for speaking rows)>
                model_inputs["input_ids"] = None
                model_inputs["inputs_embeds"] = next_embeds
                # </fun_audio_chat>
                outputs = model_forward(**model_inputs, return_dict=True)
            prefill_consumed = True
            model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs)
            if synced_gpus and this_peer_finished:
                # <fun_audio_chat: a finished rank also runs the SRH group (output dropped): under ZeRO-3 / FSDP the
                # head's layers are sharded, and the running ranks wait in their gathers for every rank to join>
                if return_speech:
                    speech.decode_dropped_group(outputs.last_hidden_state, step_text_embeds)
                # Under ZeRO-3 every module is partitioned, so the finished rank also makes the running ranks' calls
                # that build the next step's input: the text embedding and the discrete encoder (outputs dropped).
                step_text_embeds = self.get_input_embeddings()(input_ids[:, -1:])
                if return_speech:
                    speech.run_dropped_next_inputs_embeds()
                # </fun_audio_chat>
                continue

            next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)

            # <fun_audio_chat: the SRH decodes this step's group before the text token is drawn (official RNG order)>
            if return_speech:
                group = speech.decode_group(outputs.last_hidden_state, step_text_embeds)
            # </fun_audio_chat>

            next_token_scores = logits_processor(input_ids, next_token_logits)
            if return_dict_in_generate:
                if output_scores:
                    scores += (next_token_scores,)
                if output_logits:
                    raw_logits += (next_token_logits,)
                if output_attentions:
                    decoder_attentions += (outputs.attentions,)
                if output_hidden_states:
                    decoder_hidden_states += (outputs.hidden_states,)

            if do_sample:
                probs = nn.functional.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            # <fun_audio_chat: force the reply to open with <|audio_bos|>>
            if step == 0 and force_audio_bos:
                next_tokens = torch.full_like(next_tokens, self.config.text_config.audio_bos_index)
            # </fun_audio_chat>

            was_unfinished = unfinished_sequences.bool()
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            # Stopping criteria see the text token before the <|audio_eos|> swap, as in the official model.
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores)

            # <fun_audio_chat: commit the group for speaking rows; speech-EOS ends the row's speech>
            if return_speech:
                ends = speech.commit(group, speech.speaking & was_unfinished)
                next_tokens = torch.where(ends, torch.full_like(next_tokens, audio_eos), next_tokens)
                input_ids[:, -1] = next_tokens
            # </fun_audio_chat>

            if streamer is not None:
                streamer.put(next_tokens.cpu())
                # <fun_audio_chat: speech groups reach the streamer on the step they are decoded>
                if return_speech:
                    speech.stream(streamer)
                # </fun_audio_chat>
            this_peer_finished = bool(unfinished_sequences.max() == 0)

            # <fun_audio_chat: next LLM input (fused for speaking rows) and SRH conditioning>
            step_text_embeds = self.get_input_embeddings()(next_tokens[:, None])
            next_embeds = (
                speech.next_inputs_embeds(step_text_embeds, next_tokens) if return_speech else step_text_embeds
            )
            step += 1
            # </fun_audio_chat>
            del outputs

        if streamer is not None:
            streamer.end()

        if not return_speech:
            if return_dict_in_generate:
                return GenerateDecoderOnlyOutput(
                    sequences=input_ids,
                    scores=scores,
                    logits=raw_logits,
                    attentions=decoder_attentions,
                    hidden_states=decoder_hidden_states,
                    **{CACHE_NAME: cache_of(model_kwargs)},
                )
            return input_ids

        # <fun_audio_chat: each row's committed speech codes>
        speech_ids, speech_attention_mask = speech.collect(batch_size, input_ids.device)
        return FunAudioChatGenerateOutput(
            sequences=input_ids,
            scores=scores,
            logits=raw_logits,
            attentions=decoder_attentions,
            hidden_states=decoder_hidden_states,
            **{CACHE_NAME: cache_of(model_kwargs) if return_dict_in_generate else None},
            speech_ids=speech_ids,
            speech_attention_mask=speech_attention_mask,
            speech_logits=tuple(speech.logits) if speech.logits is not None else None,
        )
        # </fun_audio_chat>


__all__ = ["FunAudioChatGenerateOutput", "FunAudioChatGenerationMixin", "SPEECH_GENERATION_DEFAULTS"]
