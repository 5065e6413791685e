"""The speech side of one ``generate()`` call: per-row speech state around the Speech Refined Head's decoder.

:class:`SpeechDecoder` sizes a :class:`~.speech_head.SpeechHeadDecoder` from the prefill, runs one SRH group per
LLM step, keeps the group for rows that are speaking, builds the next fused LLM input and packs each row's codes.
The serving decoder (``continuous_batching.py``) also uses it, with rows joining and leaving between steps.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import GenerationConfig

from .speech_head import SpeechHeadDecoder, compile_static_group
from .speech_sampling import SpeechSamplingSettings, select_code, select_code_on_device

# Largest static SRH cache each head has been compiled for. As transformers does for the LLM's static cache, a
# shorter call reuses that size instead of recompiling the group for a new cache shape. Keyed weakly by the head,
# so it is not state of the module and goes away with it.
_LARGEST_STATIC_CAPACITY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SpeechDecoder:
    """Everything one ``generate()`` call keeps about speech, per row, and the SRH steps that use it.

    ``start`` sizes it from the prefill; ``decode_group`` runs the SRH for one LLM step (or the prefill);
    ``commit`` keeps the group for speaking rows; ``next_inputs_embeds`` builds the next LLM input; ``collect``
    packs each row's codes. The SRH cache covers one reply: a generate() call continuing from a returned LLM cache
    starts a fresh SRH context over the positions it feeds.

    With a ``compile_config`` the SRH cache is static and every LLM step's group after the prefill is one compiled
    call (:func:`~.speech_head.decode_static_group`): five sub-steps, code selection and cache writes. Sampled codes
    then come from uniform draws made once per group (``torch.rand`` on the default generator), so a seeded call
    repeats; they differ from the uncompiled path's ``torch.multinomial`` draws. Greedy codes are the same on both.
    """

    def __init__(self, model, generation_config: GenerationConfig, compile_config=None):
        self.model = model
        self.head = model.audio_invert_tower
        self.k = model.group_size
        self.settings = SpeechSamplingSettings.from_generation_config(generation_config)
        self.warpers = self.settings.warpers()
        self.compile_config = compile_config
        self.compiled_group = compile_static_group(compile_config) if compile_config is not None else None
        self.logits = [] if (generation_config.return_dict_in_generate and generation_config.output_logits) else None
        self.groups: list[torch.Tensor] = []  # per step (B, k)
        self.committed: list[torch.Tensor] = []  # per step (B,) bool
        self._pending_seen = None

    # ------------------------------------------------------------------------------------------ set-up
    def start(self, prompt_ids, prompt_embeds, attention_mask, new_positions: int, max_new_tokens: int) -> None:
        """Size the per-row state from the prefill: ``new_positions`` LLM positions are fed in this call."""
        model, k = self.model, self.k
        batch, device = prompt_embeds.shape[0], prompt_embeds.device
        total = k * (new_positions + max(max_new_tokens, 1) + 1)
        if self.compile_config is not None:
            total = max(total, _LARGEST_STATIC_CAPACITY.get(self.head, 0))
            _LARGEST_STATIC_CAPACITY[self.head] = total
        positions = torch.arange(total, device=device)[None, :].expand(batch, -1)
        sub_mask = None
        segment_mask = None if attention_mask is None else attention_mask[:, -new_positions:]
        if segment_mask is not None and not bool(segment_mask.all()):
            sub_mask = torch.ones(batch, total, dtype=segment_mask.dtype, device=device)
            sub_mask[:, : k * new_positions] = segment_mask.repeat_interleave(k, dim=1)
            # Left-padded rows count positions from their first real sub-position, as they would alone.
            padding = (k * (new_positions - segment_mask.sum(-1))).long()[:, None]
            positions = (positions - padding).clamp(min=0)
        if sub_mask is None and self.compile_config is not None:
            # One compiled group for padded and unpadded batches: the static decoder always masks by a tensor.
            sub_mask = torch.ones(batch, total, dtype=torch.long, device=device)
        self.decoder = SpeechHeadDecoder(
            self.head, positions.contiguous(), sub_mask, static=self.compile_config is not None
        )
        audio_config = model.config.audio_config
        self.previous_code = torch.full((batch,), audio_config.bos_token_id, dtype=torch.long, device=device)
        audio_bos = model.config.text_config.audio_bos_index
        if prompt_ids is not None and prompt_ids.shape[1] > 0:
            self.speaking = prompt_ids[:, -1] == audio_bos
        else:
            # A prompt given as embeddings speaks when it ends with the <|audio_bos|> embedding.
            bos_embedding = model.get_input_embeddings().weight[audio_bos].to(prompt_embeds.dtype)
            self.speaking = (prompt_embeds[:, -1] == bos_embedding).all(-1)
        self.has_group = torch.zeros(batch, dtype=torch.bool, device=device)
        self.last_group = torch.zeros(batch, k, dtype=torch.long, device=device)
        self.seen_codes = (
            torch.zeros(batch, audio_config.codebook_size, dtype=torch.bool, device=device)
            if self.settings.penalised
            else None
        )
        # Constants of every step, made once: the speech-EOS group and the <|audio_bos|> id.
        self._eos_group = torch.full((1, k), audio_config.eos_token_id, dtype=torch.long, device=device)
        self._audio_bos = audio_bos

    # The decoder's layout, under the names the row re-layout (and the serving decoder) reads.
    @property
    def sub_length(self) -> int:
        return self.decoder.length

    @property
    def total(self) -> int:
        return self.decoder.capacity

    @property
    def sub_attention_mask(self) -> torch.Tensor | None:
        return self.decoder.key_mask

    # -------------------------------------------------------------------------------------- SRH steps
    def _select_code(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The uncompiled path's code rule (the serving decoder overrides it per row group)."""
        return select_code(logits, seen, self.settings, self.warpers)

    def _uniforms(self, batch: int, device) -> torch.Tensor | None:
        """The compiled path's sampling draws of one group, (B, k), from the default generator."""
        return torch.rand(batch, self.k, device=device) if self.settings.do_sample else None

    def decode_group(self, states: torch.Tensor, text_embeds: torch.Tensor):
        """k autoregressive SRH sub-steps conditioned on the latest LLM states (B, n, H); returns (B, k) codes.

        At prefill (n > 1) every earlier sub-position enters the cache in one call with the speech-BOS
        embedding, as the official model does; the last k sub-positions are then decoded one by one.
        """
        conditioned = states + text_embeds.detach()
        decoder = self.decoder
        if decoder.static and states.shape[1] == 1:
            codes, logits, seen = decoder.decode_group(
                conditioned,
                self.previous_code,
                self.seen_codes,
                self.settings,
                self._uniforms(states.shape[0], states.device),
                self.compiled_group,
            )
            if self.logits is not None:
                self.logits.extend(logits.unbind(1))
            self.previous_code = codes[:, -1].contiguous()  # a strided view would recompile the group next step
            self._pending_seen = seen
            return codes
        return self._decode_group_by_sub_step(conditioned)

    def decode_dropped_group(self, states: torch.Tensor, text_embeds: torch.Tensor) -> None:
        """Run one SRH group whose result is dropped and leave no trace of it (cache, codes, logits).

        Under ``synced_gpus`` a rank whose reply has ended keeps stepping until every rank is done, because the
        head's sharded layers gather their weights from all ranks. Its groups overwrite the same k cache columns,
        so a finished rank never needs more room than its own reply, however long the others run.
        """
        previous_code, pending_seen, logits = self.previous_code, self._pending_seen, self.logits
        self.logits = None
        try:
            self.decode_group(states, text_embeds)
        finally:
            self.decoder.rewind(self.k)
            self.previous_code, self._pending_seen, self.logits = previous_code, pending_seen, logits

    def _decode_group_by_sub_step(self, conditioned: torch.Tensor) -> torch.Tensor:
        head, k, decoder = self.head, self.k, self.decoder
        sub_states = head.ungroup(conditioned)  # (B, n·k, H)
        leading = sub_states.shape[1] - (k - 1)
        seen = self.seen_codes
        uniforms = self._uniforms(sub_states.shape[0], sub_states.device) if decoder.static else None
        codes = []
        for sub_step in range(k):
            previous = head.code_embeddings(self.previous_code)[:, None, :]
            if sub_step == 0 and leading > 1:
                logits = decoder.prefill(sub_states[:, :leading] + previous)[:, -1].float()
            elif sub_step == 0:  # a decode step's first sub-position: no backbone forward (mask, rotary) per step
                logits = decoder.step(sub_states[:, :1] + previous)
            else:
                index = leading + sub_step - 1
                logits = decoder.step(sub_states[:, index : index + 1] + previous)
            if self.logits is not None:
                self.logits.append(logits)
            if decoder.static:
                uniform = None if uniforms is None else uniforms[:, sub_step]
                code = select_code_on_device(logits, seen, self.settings, uniform)
            else:
                code = self._select_code(logits, seen)
            if seen is not None:
                seen = seen.scatter(1, code[:, None], True)
            self.previous_code = code
            codes.append(code)
        self._pending_seen = seen
        return torch.stack(codes, dim=1)

    # ------------------------------------------------------------------------------------- bookkeeping
    def commit(self, group: torch.Tensor, commit_rows: torch.Tensor) -> torch.Tensor:
        """Keep the group for speaking rows; returns rows whose group carried speech-EOS."""
        speech_eos = self.model.config.audio_config.eos_token_id
        ends = (group == speech_eos).any(dim=1) & commit_rows
        group = torch.where(ends[:, None], self._eos_group, group)
        self.groups.append(group)
        self.committed.append(commit_rows)
        self.last_group = torch.where(commit_rows[:, None], group, self.last_group)
        self.has_group = self.has_group | commit_rows
        if self._pending_seen is not None:
            self.seen_codes = torch.where(commit_rows[:, None], self._pending_seen, self.seen_codes)
        self.speaking = self.speaking & ~ends
        return ends

    def stream(self, streamer) -> None:
        """Hand this step's committed groups to a streamer that takes speech (``put_speech``)."""
        if streamer is None or not hasattr(streamer, "put_speech"):
            return
        rows = self.committed[-1].nonzero(as_tuple=True)[0]
        if rows.numel():
            streamer.put_speech(self.groups[-1][rows].cpu(), rows.cpu())

    def next_inputs_embeds(self, text_embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """LLM input of the next step: (embed(text) + audio_tower(last group)) / 2 for speaking rows."""
        self.speaking = self.speaking | (tokens == self._audio_bos)
        fused_rows = self.speaking & self.has_group
        fused = (text_embeds + self.model.audio_tower(self.last_group).to(text_embeds.dtype)) / 2
        return torch.where(fused_rows[:, None, None], fused, text_embeds)

    def run_dropped_next_inputs_embeds(self) -> None:
        """The module call of :meth:`next_inputs_embeds` with its result dropped and no state change: a finished rank
        under ``synced_gpus`` makes it so that ZeRO-3's gathers of the discrete encoder find every rank."""
        self.model.audio_tower(self.last_group)

    # ------------------------------------------------------------------------ rows joining and leaving
    # Continuous batching (``continuous_batching.py``) admits and drops rows between LLM steps. A row's SRH state is
    # its cache columns, its per-column positions and mask, and the per-row tensors below; every row's context ends at
    # the same cache column, so rows of different lengths are left-padded, exactly as ``start`` lays out a left-padded
    # batch. These methods only run between ``commit`` and the next ``decode_group``.
    _ROW_TENSORS = ("previous_code", "speaking", "has_group", "last_group", "seen_codes")

    def row_padding(self) -> torch.Tensor:
        """(B,) SRH cache columns before each row's first real sub-position."""
        if self.sub_attention_mask is None:
            return torch.zeros(self.previous_code.shape[0], dtype=torch.long, device=self.previous_code.device)
        return (self.sub_attention_mask[:, : self.sub_length] == 0).sum(-1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in the new order); columns that every kept row pads are dropped."""
        self._relayout([(self, rows)])

    def merge(self, others: list[SpeechDecoder]) -> None:
        """Append the rows of ``others`` after this decoder's rows, each keeping its context and reserved room."""
        self._relayout([(self, None)] + [(other, None) for other in others])

    def _relayout(self, sources: list[tuple[SpeechDecoder, torch.Tensor | None]]) -> None:
        """Rebuild this decoder from rows of ``sources`` ((decoder, row indices or None for all)): right-aligned
        contexts, left padding masked, positions counted from each row's first real sub-position (as ``start``
        does), and room for the longest remaining reply of any source."""
        if any(source.compile_config is not None for source, _ in sources):
            raise NotImplementedError("rows cannot join or leave a compiled (static-cache) speech decoder")
        device = self.previous_code.device
        picked = []
        for source, rows in sources:
            if rows is None:
                rows = torch.arange(source.previous_code.shape[0], device=device)
            picked.append((source, rows, source.sub_length - source.row_padding()[rows]))
        real_lengths = torch.cat([lengths for _, _, lengths in picked])
        length = int(real_lengths.max()) if real_lengths.numel() else 0
        room = max(source.total - source.sub_length for source, _, _ in picked)
        total = length + room

        keys_per_layer, values_per_layer = [], []
        for index in range(len(self.decoder.cache.layers)):
            keys, values = [], []
            for source, rows, _ in picked:
                source_keys, source_values = source.decoder.filled_keys_values(index)
                take = min(source.sub_length, length)
                block_keys = source_keys[rows, :, source.sub_length - take :]
                block_values = source_values[rows, :, source.sub_length - take :]
                # Zeros, not uninitialized memory, under the masked columns: a NaN there would survive the mask.
                keys.append(nn.functional.pad(block_keys, (0, 0, length - take, 0)))
                values.append(nn.functional.pad(block_values, (0, 0, length - take, 0)))
            keys_per_layer.append(torch.cat(keys))
            values_per_layer.append(torch.cat(values))

        self.take_row_state([(source, rows) for source, rows, _ in picked])

        batch = real_lengths.shape[0]
        padding = (length - real_lengths)[:, None]
        columns = torch.arange(total, device=device)[None, :]
        positions = (columns - padding).clamp(min=0).expand(batch, -1).contiguous()
        key_mask = (columns >= padding).long().expand(batch, -1) if bool((padding > 0).any()) else None
        self.decoder = SpeechHeadDecoder(self.head, positions, key_mask, static=False)
        self.decoder.load(keys_per_layer, values_per_layer)

    def take_row_state(self, picked: list[tuple[SpeechDecoder, torch.Tensor]]) -> None:
        """This decoder's per-row tensors become those of the ``picked`` rows ((decoder, row indices) per source, in
        order); the SRH cache is the caller's to move (:meth:`_relayout`, or the serving decoder's slots)."""
        device = self.previous_code.device
        for name in self._ROW_TENSORS:
            parts = [getattr(source, name) for source, _ in picked]
            if all(part is None for part in parts):
                setattr(self, name, None)
                continue
            if name == "seen_codes":  # a source that did not track codes has seen none
                codebook = self.model.config.audio_config.codebook_size
                parts = [
                    torch.zeros(source.previous_code.shape[0], codebook, dtype=torch.bool, device=device)
                    if part is None
                    else part
                    for part, (source, _) in zip(parts, picked)
                ]
            setattr(self, name, torch.cat([part[rows] for part, (_, rows) in zip(parts, picked)]))
        self._pending_seen = None

    def collect(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        pad = self.model.config.audio_config.pad_token_id
        if not self.groups:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            return empty, empty.clone()
        groups = torch.stack(self.groups, dim=1)  # (B, T, k)
        committed = torch.stack(self.committed, dim=1)  # (B, T)
        counts = committed.sum(1)
        width = int(counts.max()) * k
        # Stable sort moves each row's committed groups to the front, in order.
        order = torch.sort((~committed).to(torch.int8), dim=1, stable=True).indices
        packed = torch.gather(groups, 1, order[..., None].expand(-1, -1, k)).reshape(batch, -1)[:, :width]
        mask = (torch.arange(width, device=device)[None, :] < (counts * k)[:, None]).long()
        return packed.masked_fill(mask == 0, pad), mask


__all__ = ["SpeechDecoder"]
