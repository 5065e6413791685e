"""generate() for Fun-Audio-Chat: one 5 Hz LLM step emits a text token while the Speech Refined Head emits the
next k 25 Hz speech codes.

Data flow of one decoding step (all in :meth:`FunAudioChatGenerationMixin._sample`):

1. LLM step on the fused input -> text logits and the last hidden state ``h``.
2. SRH on ``h + embed(input text token)``: ``pre_matching`` ungroups it into k sub-positions, decoded
   autoregressively with the SRH's own KV cache (kept for the whole reply, like the official model); each
   sub-position adds the embedding of the previously sampled code.
3. Text token sampled with the usual logits processors; the speech codes with their own settings.
4. Rows that are speaking (they emitted ``<|audio_bos|>`` earlier and have not finished) keep the group; a group
   holding speech-EOS becomes all speech-EOS, that step's text token becomes ``<|audio_eos|>`` and the row stops.
5. Next LLM input: ``embed(text)`` for silent rows, ``(embed(text) + audio_tower(last group)) / 2`` for speaking rows.

All per-call state lives in :class:`SpeechDecodingState`; no module attributes are touched, so calls can
interleave and a training forward after ``generate()`` is unaffected. Every row keeps its own positions and
masks in the SRH, so a row of a left-padded batch decodes exactly as it would alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..transformers_compat import CACHE_NAME, cache_of
from .single_position import decode_one_position, fused_decode_weights, supports_single_position_decoding

# Speech-generation controls: generate() kwargs and GenerationConfig fields, with the official
# speech-to-speech defaults (sampled codes, temperature 0.8, top-p 0.9, no top-k, repetition penalty 1.2).
SPEECH_GENERATION_DEFAULTS = {
    "return_speech": True,
    "force_audio_bos": False,
    "speech_do_sample": True,
    "speech_temperature": 0.8,
    "speech_top_p": 0.9,
    "speech_top_k": 0,
    "speech_repetition_penalty": 1.2,
}


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


@dataclass
class FunAudioChatSingleStepOutput(BaseModelOutputWithPast):
    """What the decode loop reads from one LLM step (the cache field is named as transformers names it)."""

    logits: torch.FloatTensor | None = None


@dataclass
class SpeechSamplingSettings:
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    def warpers(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if not self.do_sample:
            return processors
        if self.temperature is not None and self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        return processors


class PreallocatedKVLayer(DynamicLayer):
    """A KV-cache layer with room for the whole reply reserved up front.

    The SRH appends one position per sub-step (5 per LLM step); growing by concatenation would copy the whole
    cache every time. Writing into a reserved buffer and handing attention a view of the filled part avoids that.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, head_dim)
        self._value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.keys = self._key_buffer[:, :, :0]
        self.values = self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"Speech head cache is full ({self.capacity} positions); this is a bug, please report it.")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class SpeechDecodingState:
    """Everything one generate() call keeps about speech, per row."""

    cache: Cache
    sub_attention_mask: torch.Tensor | None  # (B, k·(prompt+new)) preallocated; None when nothing is padded
    sub_attention_bias: torch.Tensor | None  # the same as an additive (B, 1, 1, ·) bias for one-position calls
    sub_positions: torch.Tensor  # (B, k·(prompt+new)) SRH position of every sub-position, per row
    sub_length: int  # sub-positions already in the SRH cache
    previous_code: torch.Tensor  # (B,) code sampled last (its embedding feeds the next sub-position)
    speaking: torch.Tensor  # (B,) bool
    has_group: torch.Tensor  # (B,) bool: a group was ever committed (fused LLM input needs one)
    last_group: torch.Tensor  # (B, k)
    seen_codes: torch.Tensor | None  # (B, codebook) bool: committed codes (repetition-penalty context)
    fused_weights: list | None = None  # stacked SRH projections for the one-position steps
    rotary_cos: torch.Tensor | None = None  # (B, k·(prompt+new), head_dim) rotary tables of every SRH position
    rotary_sin: torch.Tensor | None = None
    groups: list = field(default_factory=list)  # per step (B, k)
    committed: list = field(default_factory=list)  # per step (B,) bool


class FunAudioChatGenerationMixin:
    """Speech-aware ``generate``; mixed into :class:`FunAudioChatForConditionalGeneration`."""

    # ------------------------------------------------------------------------------ configuration
    def _init_speech_generation_config(self) -> None:
        """Give ``self.generation_config`` the speech fields, so ``generation_config.json`` carries them."""
        config = self.generation_config
        if config is None:
            return
        for name, value in SPEECH_GENERATION_DEFAULTS.items():
            if getattr(config, name, None) is None:
                setattr(config, name, value)
        # A config marked as derived from the model config drops unknown fields when it is read back.
        config._from_model_config = False

    def generate(self, inputs=None, generation_config: GenerationConfig | None = None, **kwargs):
        """Generate text and (unless ``return_speech=False``) 25 Hz speech codes.

        Speech controls (also read from ``generation_config``): ``return_speech``, ``force_audio_bos``,
        ``speech_do_sample``, ``speech_temperature``, ``speech_top_p``, ``speech_top_k``,
        ``speech_repetition_penalty``. Text sampling uses the standard fields.

        Returns:
            with speech and ``return_dict_in_generate=False``: the tuple ``(sequences, speech_ids)`` (the
            official return value); with ``return_dict_in_generate=True``: a :class:`FunAudioChatGenerateOutput`;
            without speech: what transformers' generate returns.
        """
        base = generation_config if generation_config is not None else self.generation_config
        generation_config = copy.deepcopy(base)
        for name, default in SPEECH_GENERATION_DEFAULTS.items():
            value = kwargs.pop(name, None)
            if value is None:
                value = getattr(generation_config, name, None)
            setattr(generation_config, name, default if value is None else value)
        if generation_config.return_speech and self.audio_invert_tower is None:
            raise ValueError(
                "return_speech=True needs the Speech Refined Head, but this model was built with "
                "audio_config.enable_audio_invert_tower=False; pass return_speech=False for text only."
            )
        # Apply generation kwargs to our copy so the speech flags and the standard fields travel together.
        kwargs = generation_config.update(**kwargs)
        if generation_config.use_cache is False:
            # The official config.json says use_cache=false (a training setting); decoding one 5 Hz step at a
            # time needs the LLM's KV cache, so generation always keeps one.
            generation_config.use_cache = True
        if generation_config.num_beams not in (None, 1):
            raise ValueError("Fun-Audio-Chat generation supports greedy decoding and sampling only (num_beams=1).")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise ValueError("Assisted generation is not supported by Fun-Audio-Chat generation.")
        output = super().generate(inputs, generation_config=generation_config, **kwargs)
        if generation_config.return_speech and not generation_config.return_dict_in_generate:
            return output.sequences, output.speech_ids
        return output

    def _check_context_length(self, prompt_length: int, max_new_tokens: int, return_speech: bool) -> None:
        total = prompt_length + max(max_new_tokens, 0)
        limit = self.config.text_config.max_position_embeddings
        if total > limit:
            raise ValueError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the LLM's "
                f"max_position_embeddings ({limit}); shorten the audio/conversation or lower max_new_tokens."
            )
        if return_speech:
            head_limit = self.audio_invert_tower.crq_transformer.config.max_position_embeddings
            if total * self.group_size > head_limit:
                raise ValueError(
                    f"the Speech Refined Head would need {total * self.group_size} positions (group size "
                    f"{self.group_size} x {total} tokens) but supports {head_limit}; shorten the conversation, lower "
                    "max_new_tokens, or generate text only (return_speech=False)."
                )

    # ------------------------------------------------------------------------------- speech head
    def _start_speech_state(self, input_ids, attention_mask, max_new_tokens: int, track_codes: bool):
        batch = input_ids.shape[0]
        k = self.group_size
        device = input_ids.device
        total = k * (input_ids.shape[1] + max_new_tokens + 1)
        sub_mask = sub_bias = None
        positions = torch.arange(total, device=device)[None, :].expand(batch, -1)
        if attention_mask is not None and not bool(attention_mask.all()):
            sub_mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
            sub_mask[:, : k * input_ids.shape[1]] = attention_mask.repeat_interleave(k, dim=1)
            # Left-padded rows count positions from their first real sub-position, as they would alone.
            padding = (k * (attention_mask.shape[1] - attention_mask.sum(-1))).long()[:, None]
            positions = (positions - padding).clamp(min=0)
            dtype = self.audio_invert_tower.input_matching.weight.dtype
            sub_bias = torch.zeros(batch, 1, 1, total, dtype=dtype, device=device)
            sub_bias = sub_bias.masked_fill(sub_mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        codebook = self.config.audio_config.codebook_size
        return SpeechDecodingState(
            cache=Cache(
                layers=[
                    PreallocatedKVLayer(total)
                    for _ in range(self.audio_invert_tower.crq_transformer.config.num_hidden_layers)
                ]
            ),
            sub_attention_mask=sub_mask,
            sub_attention_bias=sub_bias,
            sub_positions=positions.contiguous(),
            sub_length=0,
            previous_code=torch.full(
                (batch,), self.config.audio_config.bos_token_id, dtype=torch.long, device=device
            ),
            speaking=input_ids[:, -1] == self.config.text_config.audio_bos_index,
            has_group=torch.zeros(batch, dtype=torch.bool, device=device),
            last_group=torch.zeros(batch, k, dtype=torch.long, device=device),
            seen_codes=torch.zeros(batch, codebook, dtype=torch.bool, device=device) if track_codes else None,
            fused_weights=fused_decode_weights(self.audio_invert_tower.crq_transformer),
            **self._speech_head_rotary_tables(positions),
        )

    def _speech_head_rotary_tables(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rotary (cos, sin) of every SRH position of the reply, computed once instead of at every sub-step."""
        backbone = self.audio_invert_tower.crq_transformer
        probe = torch.empty(0, dtype=self.audio_invert_tower.input_matching.weight.dtype, device=positions.device)
        cos, sin = backbone.rotary_emb(probe, positions)
        return {"rotary_cos": cos, "rotary_sin": sin}

    def _speech_head_call(self, state: SpeechDecodingState, sub_inputs: torch.Tensor) -> torch.Tensor:
        """Run the SRH backbone on new sub-positions (B, n, H); returns the last position's logits (B, V)."""
        start, end = state.sub_length, state.sub_length + sub_inputs.shape[1]
        positions = state.sub_positions[:, start:end]
        head = self.audio_invert_tower
        if sub_inputs.shape[1] == 1:
            bias = None if state.sub_attention_bias is None else state.sub_attention_bias[..., :end]
            rotary = (state.rotary_cos[:, start:end], state.rotary_sin[:, start:end])
            logits = head.decode_position(sub_inputs, state.cache, positions, bias, state.fused_weights, rotary)
        else:
            mask = None if state.sub_attention_mask is None else state.sub_attention_mask[:, :end]
            _, logits = head.run_backbone(
                sub_inputs, attention_mask=mask, position_ids=positions, past_key_values=state.cache, use_cache=True
            )
            logits = logits[:, -1]
        state.sub_length = end
        return logits.float()

    def _select_speech_code(self, logits, state, seen, settings, warpers) -> torch.Tensor:
        if seen is not None:
            # Same rule as transformers' RepetitionPenaltyLogitsProcessor, over a per-row set of codes, so
            # rows with different histories (or none) in one batch never see each other's codes.
            penalised = torch.where(
                logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty
            )
            logits = torch.where(seen, penalised, logits)
        if settings.do_sample:
            scores = warpers(None, logits)
            return torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return torch.argmax(logits, dim=-1)

    def _decode_speech_group(
        self, state, states: torch.Tensor, text_embeds: torch.Tensor, settings, warpers, speech_logits_out
    ) -> torch.Tensor:
        """k autoregressive SRH sub-steps conditioned on the latest LLM states (B, n, H); returns (B, k) codes.

        At prefill (n > 1) every earlier sub-position enters the cache in one call with the speech-BOS
        embedding, as the official model does; the last k sub-positions are then decoded one by one.
        """
        head = self.audio_invert_tower
        k = self.group_size
        sub_states = head.ungroup(states + text_embeds)  # (B, n·k, H)
        leading = sub_states.shape[1] - (k - 1)
        seen = state.seen_codes.clone() if state.seen_codes is not None else None
        batch_rows = torch.arange(sub_states.shape[0], device=sub_states.device)
        codes = []
        for sub_step in range(k):
            previous = head.code_embeddings(state.previous_code)[:, None, :]
            if sub_step == 0:
                step_inputs = sub_states[:, :leading] + previous
            else:
                index = leading + sub_step - 1
                step_inputs = sub_states[:, index : index + 1] + previous
            logits = self._speech_head_call(state, step_inputs)
            if speech_logits_out is not None:
                speech_logits_out.append(logits)
            code = self._select_speech_code(logits, state, seen, settings, warpers)
            if seen is not None:
                seen[batch_rows, code] = True
            state.previous_code = code
            codes.append(code)
        return torch.stack(codes, dim=1), seen

    def _commit_speech_group(self, state, group, seen, commit_rows) -> torch.Tensor:
        """Keep the group for speaking rows; returns rows whose group carried speech-EOS."""
        speech_eos = self.config.audio_config.eos_token_id
        ends = (group == speech_eos).any(dim=1) & commit_rows
        group = torch.where(ends[:, None], torch.full_like(group, speech_eos), group)
        state.groups.append(group)
        state.committed.append(commit_rows)
        state.last_group = torch.where(commit_rows[:, None], group, state.last_group)
        state.has_group = state.has_group | commit_rows
        if seen is not None:
            state.seen_codes = torch.where(commit_rows[:, None], seen, state.seen_codes)
        state.speaking = state.speaking & ~ends
        return ends

    def _collect_speech(self, state: SpeechDecodingState, batch: int, device):
        k = self.group_size
        pad = self.config.audio_config.pad_token_id
        if not state.groups:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            return empty, empty.clone()
        groups = torch.stack(state.groups, dim=1)  # (B, T, k)
        committed = torch.stack(state.committed, dim=1)  # (B, T)
        counts = committed.sum(1)
        width = int(counts.max()) * k
        # Stable sort moves each row's committed groups to the front, in order.
        order = torch.sort((~committed).to(torch.int8), dim=1, stable=True).indices
        packed = torch.gather(groups, 1, order[..., None].expand(-1, -1, k)).reshape(batch, -1)[:, :width]
        mask = (torch.arange(width, device=device)[None, :] < (counts * k)[:, None]).long()
        return packed.masked_fill(mask == 0, pad), mask

    def _next_inputs_embeds(self, state, text_embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """LLM input of the next step: (embed(text) + audio_tower(last group)) / 2 for speaking rows."""
        state.speaking = state.speaking | (tokens == self.config.text_config.audio_bos_index)
        fused_rows = state.speaking & state.has_group
        fused = (text_embeds + self.audio_tower(state.last_group).to(text_embeds.dtype)) / 2
        return torch.where(fused_rows[:, None, None], fused, text_embeds)

    def _decode_llm_position(self, inputs_embeds: torch.Tensor, model_kwargs: dict, padded: bool):
        """One LLM decode step through :func:`decode_one_position` (same numbers as the full forward)."""
        backbone = self.language_model.model
        cache = cache_of(model_kwargs)
        position_ids = model_kwargs["position_ids"][:, -1:]
        bias = None
        if padded:
            mask = model_kwargs["attention_mask"]
            bias = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            bias = bias.masked_fill(mask == 0, torch.finfo(inputs_embeds.dtype).min)[:, None, None, :]
        cos, sin = backbone.rotary_emb(inputs_embeds, position_ids)
        hidden = decode_one_position(backbone, inputs_embeds, cache, cos, sin, bias)
        return FunAudioChatSingleStepOutput(
            logits=self.language_model.lm_head(hidden), last_hidden_state=hidden, **{CACHE_NAME: cache}
        )

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
        pad_token_id = generation_config._pad_token_tensor
        output_scores = generation_config.output_scores
        output_logits = generation_config.output_logits
        return_dict_in_generate = generation_config.return_dict_in_generate
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        do_sample = generation_config.do_sample
        scores = () if (return_dict_in_generate and output_scores) else None
        raw_logits = () if (return_dict_in_generate and output_logits) else None
        batch_size = input_ids.shape[0]
        unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
        if pad_token_id is not None:
            pad_token_id = pad_token_id.to(input_ids.device)

        # <fun_audio_chat: speech state and settings>
        return_speech = bool(generation_config.return_speech)
        audio_bos = self.config.text_config.audio_bos_index
        audio_eos = self.config.text_config.audio_eos_index
        force_audio_bos = bool(generation_config.force_audio_bos)
        if return_speech and stopping_criteria.max_length is None:
            # The speech head reserves its cache for the longest possible reply.
            raise ValueError("Speech generation needs a length limit: pass max_new_tokens (or max_length).")
        max_new_tokens = stopping_criteria.max_length - input_ids.shape[1] if stopping_criteria.max_length else 0
        self._check_context_length(input_ids.shape[1], max_new_tokens, return_speech)
        speech_settings = SpeechSamplingSettings(
            do_sample=bool(generation_config.speech_do_sample),
            temperature=generation_config.speech_temperature,
            top_p=generation_config.speech_top_p,
            top_k=generation_config.speech_top_k,
            repetition_penalty=generation_config.speech_repetition_penalty,
        )
        speech_warpers = speech_settings.warpers()
        speech_logits_out = [] if (return_dict_in_generate and output_logits and return_speech) else None
        state = (
            self._start_speech_state(
                input_ids,
                model_kwargs.get("attention_mask"),
                max(max_new_tokens, 1),
                track_codes=speech_settings.repetition_penalty not in (None, 1.0),
            )
            if return_speech
            else None
        )
        step_text_embeds = None  # embeddings of the text tokens this step's LLM input carries (SRH conditioning)
        # </fun_audio_chat>

        model_inputs = self.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
        outputs = self(**model_inputs, return_dict=True, return_last_hidden_state=True, compute_speech_logits=False)
        # <fun_audio_chat: the prompt's audio inputs are consumed by the prefill>
        for key in (
            "input_features", "feature_attention_mask", "feature_exist_mask", "speech_ids",
            "speech_attention_mask", "text_ids", "text_attention_mask",
        ):
            model_kwargs.pop(key, None)
        # <fun_audio_chat: decode steps skip the full forward's per-call bookkeeping when the cache allows it>
        single_position = supports_single_position_decoding(
            self.language_model.model, cache_of(outputs)
        ) and not (generation_config.output_attentions or generation_config.output_hidden_states)
        prompt_mask = model_kwargs.get("attention_mask")
        padded = prompt_mask is not None and not bool(prompt_mask.all())
        # </fun_audio_chat>
        step = 0
        this_peer_finished = False
        while not this_peer_finished:
            if step > 0 and single_position:
                outputs = self._decode_llm_position(next_embeds, model_kwargs, padded)
            elif step > 0:
                model_inputs = self.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
                model_inputs.pop("input_ids", None)
                model_inputs["inputs_embeds"] = next_embeds
                outputs = self(
                    **model_inputs, return_dict=True, return_last_hidden_state=True, compute_speech_logits=False
                )
            model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs)

            next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)

            # <fun_audio_chat: the SRH decodes this step's group before the text token is drawn (official RNG order)>
            if return_speech:
                hidden = outputs.last_hidden_state
                if step_text_embeds is None:
                    step_text_embeds = self.get_input_embeddings()(input_ids)
                text_embeds = step_text_embeds.detach()
                group, seen = self._decode_speech_group(
                    state, hidden, text_embeds, speech_settings, speech_warpers, speech_logits_out
                )
            # </fun_audio_chat>

            next_token_scores = logits_processor(input_ids, next_token_logits)
            if return_dict_in_generate:
                if output_scores:
                    scores += (next_token_scores,)
                if output_logits:
                    raw_logits += (next_token_logits,)

            if do_sample:
                probs = nn.functional.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            # <fun_audio_chat: force the reply to open with <|audio_bos|>>
            if step == 0 and force_audio_bos:
                next_tokens = torch.full_like(next_tokens, audio_bos)
            # </fun_audio_chat>

            was_unfinished = unfinished_sequences.bool()
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            # Stopping criteria see the text token before the <|audio_eos|> swap, as in the official model.
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores)

            # <fun_audio_chat: commit the group for speaking rows; speech-EOS ends the row's speech>
            if return_speech:
                ends = self._commit_speech_group(state, group, seen, state.speaking & was_unfinished)
                next_tokens = torch.where(ends, torch.full_like(next_tokens, audio_eos), next_tokens)
                input_ids[:, -1] = next_tokens
            # </fun_audio_chat>

            if streamer is not None:
                streamer.put(next_tokens.cpu())
                # <fun_audio_chat: speech groups reach the streamer on the step they are decoded>
                if return_speech and hasattr(streamer, "put_speech"):
                    rows = state.committed[-1].nonzero(as_tuple=True)[0]
                    if rows.numel():
                        streamer.put_speech(state.groups[-1][rows].cpu(), rows.cpu())
                # </fun_audio_chat>
            this_peer_finished = bool(unfinished_sequences.max() == 0)

            # <fun_audio_chat: next LLM input (fused for speaking rows) and SRH conditioning>
            step_text_embeds = self.get_input_embeddings()(next_tokens[:, None])
            next_embeds = (
                self._next_inputs_embeds(state, step_text_embeds, next_tokens) if return_speech else step_text_embeds
            )
            # </fun_audio_chat>
            step += 1
            del outputs

        if streamer is not None:
            streamer.end()

        if not return_speech:
            if return_dict_in_generate:
                return GenerateDecoderOnlyOutput(
                    sequences=input_ids,
                    scores=scores,
                    logits=raw_logits,
                    **{CACHE_NAME: cache_of(model_kwargs)},
                )
            return input_ids

        speech_ids, speech_attention_mask = self._collect_speech(state, batch_size, input_ids.device)
        return FunAudioChatGenerateOutput(
            sequences=input_ids,
            scores=scores,
            logits=raw_logits,
            **{CACHE_NAME: cache_of(model_kwargs) if return_dict_in_generate else None},
            speech_ids=speech_ids,
            speech_attention_mask=speech_attention_mask,
            speech_logits=tuple(speech_logits_out) if speech_logits_out is not None else None,
        )


__all__ = ["FunAudioChatGenerateOutput", "FunAudioChatGenerationMixin", "SPEECH_GENERATION_DEFAULTS"]
