"""Continuous batching for Fun-Audio-Chat: replies join and leave a running batch at LLM step boundaries.

``generate()`` decodes a fixed batch from start to end, so a request that arrives meanwhile waits for the whole
batch. :class:`ContinuousBatchDecoder` keeps one running batch instead:

* :meth:`~ContinuousBatchDecoder.add` prefills a new reply alone (batch 1, exactly ``generate``'s prefill: the
  LLM over the prompt, then the Speech Refined Head over the prompt's sub-positions) and selects its first text
  token and speech group. The row waits, with its own caches, until the next :meth:`~ContinuousBatchDecoder.step`;
* :meth:`~ContinuousBatchDecoder.step` runs one LLM step and one SRH group for every row already in the batch,
  then merges the waiting rows in (their LLM and SRH caches left-padded to a common length, their positions kept),
  and returns one :class:`RowStep` per row: the waiting rows report their prefill step, the others the step just
  decoded. A finished or cancelled row leaves the batch at once.

Each row keeps its own positions and masks in both caches, its own text logits processors and stopping criteria
(built by transformers from its own generation settings) and its own speech sampling settings, so a row's greedy
reply equals ``generate`` on its prompt alone, whichever rows share the batch and whenever they joined.

Why not transformers' ``generation.continuous_batching`` (``ContinuousBatchingManager``, what ``transformers serve``
uses): it takes prompts as token-id lists and feeds the model ``input_ids`` only (no audio features, no fused
text+speech input embedding per step); its step (``model_runner._forward_process_and_sample``) reads the model's
``logits`` only, so the LLM's last hidden state never reaches a second autoregressive head; its
``PagedAttentionCache`` is sized from one decoder config, not the SRH's 5-positions-per-step cache; and a request's
result is a list of token ids, with no per-row speech state (speaking flag, last group, the ``<|audio_eos|>`` swap
that changes the next input).

Not thread-safe except :meth:`~ContinuousBatchDecoder.cancel`: one thread adds rows and steps.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

from ..framework_compat import prepare_generation_outside_generate
from ..transformers_compat import CACHE_NAME
from .generation_fun_audio_chat import _PROMPT_AUDIO_INPUTS
from .slot_batching import SlotDecoding, SlotHeadDecoder
from .speech_decoding import SpeechDecoder
from .speech_sampling import SpeechSamplingSettings


@dataclass(frozen=True)
class RowStep:
    """What one row produced in one step.

    Args:
        row_id: the id :meth:`ContinuousBatchDecoder.add` returned.
        token_id: the step's text token, as ``generate`` returns it (``<|audio_eos|>`` on the step whose speech
            group carried speech-EOS).
        speech_group: the row's raw speech group of this step (k codes; speech-BOS delay codes and the final EOS
            group included, as ``generate``'s ``speech_ids``), or None when the row is not speaking.
        finished: the reply ended with this step; the row has left the batch.
        finish_reason: ``"stop"`` (an end-of-reply token) or ``"length"`` (max_new_tokens or another stopping
            criterion) when finished, else None.
    """

    row_id: int
    token_id: int
    speech_group: torch.Tensor | None
    finished: bool
    finish_reason: str | None = None


class RowRandomStream:
    """A seeded row's own random stream: the state of the default generator of its device, swapped in around the
    row's draws. Its draws (SRH codes, then the text token, at every step) are then the draws of
    ``torch.manual_seed(seed); generate(...)`` on its prompt alone, whichever rows share the batch."""

    def __init__(self, seed: int, device: torch.device):
        self.device = torch.device(device)
        self.state = torch.Generator(device=self.device).manual_seed(seed).get_state()

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        shared = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(shared)


def _drawing_from(stream: RowRandomStream | None):
    return stream.active() if stream is not None else contextlib.nullcontext()


class RowSpeechDecoder(SpeechDecoder):
    """:class:`SpeechDecoder` whose rows each keep their own speech sampling settings (and random stream).

    Rows with equal settings are sampled together, with exactly ``SpeechDecoder``'s arithmetic on their slice of
    the logits, so a greedy row picks the codes it would pick alone; a seeded row is sampled alone, from its stream.
    """

    def __init__(self, model, generation_config: GenerationConfig, random_stream: RowRandomStream | None = None):
        super().__init__(model, generation_config, compile_config=None)
        self.logits = None  # per-step SRH logits are a generate() output; a long-lived batch keeps none
        self.row_settings = [self.settings]
        self.row_streams = [random_stream]
        self._groups = None

    def take_row_state(self, picked: list[tuple[RowSpeechDecoder, torch.Tensor]]) -> None:
        super().take_row_state(picked)
        self.row_settings = [source.row_settings[index] for source, rows in picked for index in rows.tolist()]
        self.row_streams = [source.row_streams[index] for source, rows in picked for index in rows.tolist()]
        self._groups = None

    def _sampling_groups(self) -> list[tuple]:
        """(settings, warpers, random stream, rows) per group of rows sampled together; rows None = all rows."""
        if self._groups is None:
            by_key: dict[tuple, list[int]] = {}
            for index, (settings, stream) in enumerate(zip(self.row_settings, self.row_streams)):
                by_key.setdefault((tuple(vars(settings).values()), id(stream)), []).append(index)
            device = self.previous_code.device
            self._groups = []
            for rows in by_key.values():
                settings, stream = self.row_settings[rows[0]], self.row_streams[rows[0]]
                selection = None if len(by_key) == 1 else torch.tensor(rows, dtype=torch.long, device=device)
                self._groups.append((settings, settings.warpers(), stream, selection))
        return self._groups

    def _select_code(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        codes = None
        for settings, warpers, stream, rows in self._sampling_groups():
            # SpeechDecoder._select_code reads the settings of the rows it is given.
            self.settings, self.warpers = settings, warpers
            group_seen = seen if (seen is None or rows is None) else seen[rows]
            if not self._penalised(settings):
                group_seen = None
            with _drawing_from(stream):
                if rows is None:
                    return super()._select_code(logits, group_seen)
                if codes is None:
                    codes = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
                codes[rows] = super()._select_code(logits[rows], group_seen)
        return codes

    @staticmethod
    def _penalised(settings: SpeechSamplingSettings) -> bool:
        return settings.repetition_penalty not in (None, 1.0)


@dataclass
class _Row:
    """Per-reply bookkeeping on the Python side (the tensors live in the batch)."""

    row_id: int
    generation_config: GenerationConfig
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    sequence: torch.Tensor  # (1, prompt + new) ids: what this row's processors and stopping criteria see
    return_speech: bool
    force_audio_bos: bool
    eos_token_ids: set[int] = field(default_factory=set)
    random_stream: RowRandomStream | None = None
    steps: int = 0


class _Batch:
    """Rows decoded together: the LLM cache (right-aligned, left-padded), each row's real context length (its next
    position), the next LLM input, the SRH conditioning of the next group, and the SRH state of the speaking rows
    (a sub-batch: ``speech_rows`` are their indices in this batch)."""

    def __init__(self, rows, llm_cache, lengths, next_embeds, step_text_embeds, speech):
        self.rows: list[_Row] = rows
        self.llm_cache: DynamicCache | None = llm_cache  # None on slots (compiled decoding keeps the cache)
        self.lengths: torch.Tensor = lengths  # (B,) long
        self.next_embeds: torch.Tensor = next_embeds  # (B, 1, H)
        self.step_text_embeds: torch.Tensor = step_text_embeds  # (B, 1, H)
        self.speech: RowSpeechDecoder | None = speech
        self.speech_rows = self._speech_rows()

    def _speech_rows(self) -> torch.Tensor:
        indices = [index for index, row in enumerate(self.rows) if row.return_speech]
        return torch.tensor(indices, dtype=torch.long, device=self.lengths.device)

    @property
    def cache_length(self) -> int:
        return self.llm_cache.get_seq_length()

    def attention_mask(self) -> torch.Tensor | None:
        """(B, T + 1) mask of this step's LLM call; None when no row is padded (what generate passes alone)."""
        length = self.cache_length
        if bool((self.lengths == length).all()):
            return None
        columns = torch.arange(length + 1, device=self.lengths.device)[None, :]
        return (columns >= (length - self.lengths)[:, None]).long()

    @classmethod
    def relayout(cls, sources: list[tuple[_Batch, torch.Tensor | None]], slots: SlotDecoding | None = None) -> _Batch:
        """One batch from rows of ``sources`` ((batch, row indices or None for all)); the LLM cache keeps only the
        columns some row needs, zero-filled and masked where a row is padded.

        With ``slots`` the caches are already in place (row ``i`` of the new batch in slot ``i``): only the per-row
        state is gathered, and the speaking rows' SRH decoder steps on the slots."""
        device = sources[0][0].lengths.device
        picked = [
            (batch, rows if rows is not None else torch.arange(len(batch.rows), device=device))
            for batch, rows in sources
        ]
        lengths = torch.cat([batch.lengths[rows] for batch, rows in picked])
        cache = None if slots is not None else cls._relayout_llm_cache(picked, lengths)
        row_lists = [[batch.rows[index] for index in rows.tolist()] for batch, rows in picked]
        # The speaking rows form a sub-batch of their own: each source's kept ones, in order.
        speech_sources = []
        for batch, rows in picked:
            if batch.speech is None:
                continue
            slot_of = {row: slot for slot, row in enumerate(batch.speech_rows.tolist())}
            kept = [slot_of[row] for row in rows.tolist() if row in slot_of]
            if kept:
                speech_sources.append((batch.speech, kept, len(slot_of)))
        speech = speech_sources[0][0] if speech_sources else None
        if slots is not None and speech is not None:
            speech.take_row_state(
                [(source, torch.tensor(kept, dtype=torch.long, device=device)) for source, kept, _ in speech_sources]
            )
        elif speech is not None:
            for source, kept, count in speech_sources:
                if kept != list(range(count)):
                    source.keep_rows(torch.tensor(kept, dtype=torch.long, device=device))
            if len(speech_sources) > 1:
                speech.merge([source for source, _, _ in speech_sources[1:]])
        batch = cls(
            rows=[row for row_list in row_lists for row in row_list],
            llm_cache=cache,
            lengths=lengths,
            next_embeds=torch.cat([batch.next_embeds[rows] for batch, rows in picked]),
            step_text_embeds=torch.cat([batch.step_text_embeds[rows] for batch, rows in picked]),
            speech=speech,
        )
        if slots is not None and speech is not None:
            speech.decoder = SlotHeadDecoder(slots, batch.speech_rows, len(batch.rows))
        return batch

    @staticmethod
    def _relayout_llm_cache(picked: list[tuple[_Batch, torch.Tensor]], lengths: torch.Tensor) -> DynamicCache:
        length = int(lengths.max())
        cache = DynamicCache()
        for index in range(len(picked[0][0].llm_cache.layers)):
            keys, values = [], []
            for batch, rows in picked:
                layer = batch.llm_cache.layers[index]
                if getattr(layer, "is_sliding", False):
                    raise NotImplementedError("continuous batching does not support sliding-window attention layers")
                take = min(batch.cache_length, length)
                keys.append(nn.functional.pad(layer.keys[rows, :, -take:], (0, 0, length - take, 0)))
                values.append(nn.functional.pad(layer.values[rows, :, -take:], (0, 0, length - take, 0)))
            cache.update(torch.cat(keys), torch.cat(values), index)
        return cache


class ContinuousBatchDecoder:
    """A running batch of replies that rows join and leave between LLM steps (see the module docstring).

    Usage (one decoding thread)::

        decoder = ContinuousBatchDecoder(model)
        row = decoder.add(processor.apply_chat_template(..., return_dict=True, return_tensors="pt"),
                          max_new_tokens=64, do_sample=False, speech_do_sample=False, force_audio_bos=True)
        while decoder.has_rows:
            for step in decoder.step():  # one RowStep per row
                ...  # stream step.token_id / step.speech_group; step.finished ends the reply

    Settings are ``generate()``'s (text sampling, ``eos_token_id``, ``max_new_tokens``, the speech controls
    ``return_speech``, ``force_audio_bos``, ``speech_do_sample``, ...), resolved per row by transformers' own
    preparation. Greedy rows reproduce ``generate`` token for token; a sampled row given a ``seed`` reproduces
    ``torch.manual_seed(seed); generate(...)``; other sampled rows draw from the global random stream.

    By default the caches are dynamic and re-laid out when rows join or leave. With a ``compile_config``, every row
    gets one of ``slots`` fixed cache slots of ``context`` LLM positions (prompt + reply) and the LLM step and the
    Speech Refined Head's sub-step run as compiled graphs, reused for every batch bucket (1, 2, 4, ..., ``slots``)
    and attention window (see ``slot_batching.py``); call :meth:`warm_up` before the first row to compile them. A
    row that does not fit is refused by :meth:`add`.
    """

    def __init__(self, model, compile_config=None, *, slots: int = 8, context: int | None = None):
        self.model = model
        self._slots = None
        if compile_config is not None:
            if context is None:
                raise ValueError(
                    "compiled continuous batching needs context= (the most LLM positions of one row: the longest "
                    "prompt plus reply to serve); every slot's cache is allocated for it up front."
                )
            self._slots = SlotDecoding(model, compile_config, slots, context)
        self._ids = itertools.count()
        self._batch: _Batch | None = None
        self._waiting: list[tuple[_Batch, RowStep]] = []  # prefilled rows and their first step
        self._cancelled: set[int] = set()
        self._cancel_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ state
    @property
    def has_rows(self) -> bool:
        """Rows are decoding or waiting to join."""
        return self._batch is not None or bool(self._waiting)

    @property
    def row_ids(self) -> list[int]:
        """Ids of the rows in the batch and of those waiting to join, in batch order."""
        ids = [row.row_id for row in self._batch.rows] if self._batch is not None else []
        return ids + [batch.rows[0].row_id for batch, _ in self._waiting]

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def compiled(self) -> bool:
        """The LLM step and the SRH sub-step run as compiled graphs on fixed cache slots."""
        return self._slots is not None

    def warm_up(self) -> dict[int, float]:
        """Compile the graphs of every batch bucket now (compiled decoding only); returns seconds per bucket."""
        if self._slots is None:
            raise RuntimeError("warm_up() compiles the slot graphs: build the decoder with a compile_config.")
        if self.has_rows:
            raise RuntimeError("warm up before the first row: warming up uses the free slots.")
        with torch.inference_mode():
            return self._slots.warm_up()

    def cancel(self, row_id: int) -> None:
        """Drop a row before the next step (callable from any thread); it produces nothing more."""
        with self._cancel_lock:
            self._cancelled.add(row_id)

    # ------------------------------------------------------------------------------------------ admission
    def add(
        self, inputs: Mapping, generation_config: GenerationConfig | None = None, seed: int | None = None, **kwargs
    ) -> int:
        """Prefill one prompt alone and queue it to join the batch at the next :meth:`step`; returns its row id.

        ``inputs``: the processor's output for one conversation (``input_ids`` of shape (1, L) plus its audio
        tensors; left padding is stripped). ``generation_config`` / ``kwargs``: ``generate()``'s settings, plus
        ``logits_processor`` / ``stopping_criteria`` lists as ``generate`` takes them. ``seed``: the row samples
        from its own random stream, drawing what ``torch.manual_seed(seed)`` then ``generate`` would draw alone
        (without it, sampled rows share the global stream). Invalid settings or prompts raise here, before the row
        touches the batch.
        """
        model = self.model
        custom_processors = kwargs.pop("logits_processor", None) or LogitsProcessorList()
        custom_criteria = kwargs.pop("stopping_criteria", None) or StoppingCriteriaList()
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        audio_inputs = {key: inputs.pop(key, None) for key in _PROMPT_AUDIO_INPUTS}
        audio_inputs = {key: value for key, value in audio_inputs.items() if value is not None}
        if inputs:
            raise ValueError(f"unexpected prompt inputs {sorted(inputs)}; pass the processor's output for one prompt.")
        model.check_input_ids(input_ids)
        if input_ids.shape[0] != 1:
            raise ValueError(f"add() takes one prompt (batch 1), got a batch of {input_ids.shape[0]}.")
        if attention_mask is not None:
            input_ids = input_ids[:, attention_mask[0].bool()]
        model._check_generate_inputs(input_ids, audio_inputs)

        device = model.device
        input_ids = input_ids.to(device)
        audio_inputs = {key: value.to(device) for key, value in audio_inputs.items()}
        prompt_length = input_ids.shape[1]
        prepared = prepare_generation_outside_generate(
            model, input_ids, audio_inputs, generation_config, kwargs, custom_processors, custom_criteria
        )
        config = prepared.config
        return_speech = bool(config.return_speech)
        if return_speech and config.max_length is None:
            raise ValueError("Speech generation needs a length limit: pass max_new_tokens (or max_length).")
        max_new_tokens = config.max_length - prompt_length if config.max_length is not None else 0
        model.context_fit(prompt_length, max_new_tokens, speech=return_speech).check()
        if self._slots is not None:
            reason = self._slots.fit_error(prompt_length, max_new_tokens)
            if reason is not None:
                raise ValueError(reason)
            if len(self) >= self._slots.slots:
                raise RuntimeError(
                    f"all {self._slots.slots} cache slots are taken; add the row after one leaves (or build the "
                    "decoder with more slots)."
                )
        row = _Row(
            row_id=next(self._ids),
            generation_config=config,
            logits_processor=prepared.logits_processor,
            stopping_criteria=prepared.stopping_criteria,
            sequence=input_ids,
            return_speech=return_speech,
            force_audio_bos=bool(config.force_audio_bos),
            eos_token_ids=prepared.eos_token_ids,
            random_stream=RowRandomStream(seed, device) if seed is not None else None,
        )

        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            output = model(
                input_ids=input_ids,
                position_ids=torch.arange(prompt_length, device=device)[None, :],
                use_cache=True,
                logits_to_keep=1,
                return_last_hidden_state=return_speech,
                compute_speech_logits=False,
                return_dict=True,
                **audio_inputs,
                **{CACHE_NAME: cache},
            )
            text_embeds = model.get_input_embeddings()(input_ids)
            speech = group = None
            if return_speech:
                speech = RowSpeechDecoder(model, config, row.random_stream)
                speech.start(input_ids, text_embeds, None, prompt_length, max_new_tokens)
                group = speech.decode_group(output.last_hidden_state, text_embeds)
            lengths = torch.full((1,), prompt_length, dtype=torch.long, device=device)
            batch = _Batch([row], cache, lengths, None, None, speech)
            (first_step,) = self._advance(batch, output.logits[:, -1].float(), group)
        self._waiting.append((batch, first_step))
        return row.row_id

    # ------------------------------------------------------------------------------------------ decoding
    def step(self) -> list[RowStep]:
        """One step of every row in the batch, then the waiting rows join; one :class:`RowStep` per row."""
        self._drop_cancelled()
        steps: list[RowStep] = []
        batch = self._batch
        if batch is not None:
            with torch.inference_mode():
                logits, last_hidden_state = self._llm_step(batch)
                batch.lengths = batch.lengths + 1
                group = None
                if batch.speech is not None:
                    rows = batch.speech_rows
                    group = batch.speech.decode_group(last_hidden_state[rows], batch.step_text_embeds[rows])
                steps = self._advance(batch, logits, group)
        waiting, self._waiting = self._waiting, []
        with torch.inference_mode():
            parts = [(batch, [step.finished for step in steps])] if batch is not None else []
            parts += [(row_batch, [first.finished]) for row_batch, first in waiting]
            self._regroup(parts)
        return steps + [first for _, first in waiting]

    def _llm_step(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One LLM step of every row: float32 last-position logits (B, V) and last hidden states (B, 1, H)."""
        if self._slots is not None:
            return self._slots.llm_step(batch.next_embeds, batch.lengths)
        output = self.model(
            inputs_embeds=batch.next_embeds,
            attention_mask=batch.attention_mask(),
            position_ids=batch.lengths[:, None],
            use_cache=True,
            logits_to_keep=1,
            return_last_hidden_state=batch.speech is not None,
            compute_speech_logits=False,
            return_dict=True,
            **{CACHE_NAME: batch.llm_cache},
        )
        return output.logits[:, -1].float(), output.last_hidden_state

    def _advance(self, batch: _Batch, logits: torch.Tensor, group: torch.Tensor | None) -> list[RowStep]:
        """Select each row's text token from the step's logits (and keep the speech group decoded for it), the way
        ``generate``'s loop does, and prepare the batch's next LLM input."""
        model = self.model
        text_config = model.config.text_config
        tokens, finished, reasons = [], [], []
        for index, row in enumerate(batch.rows):
            scores = row.logits_processor(row.sequence, logits[index : index + 1])
            if row.generation_config.do_sample:
                with _drawing_from(row.random_stream):
                    token = torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1)[:, 0]
            else:
                token = torch.argmax(scores, dim=-1)  # (1,)
            if row.steps == 0 and row.force_audio_bos:
                token = torch.full_like(token, text_config.audio_bos_index)
            row.sequence = torch.cat([row.sequence, token[:, None]], dim=-1)
            # Stopping criteria see the text token before the <|audio_eos|> swap, as in generate.
            done = bool(row.stopping_criteria(row.sequence, None).any())
            finished.append(done)
            reasons.append(("stop" if int(token) in row.eos_token_ids else "length") if done else None)
            row.steps += 1
            tokens.append(token.reshape(()))
        tokens = torch.stack(tokens)

        committed: dict[int, torch.Tensor] = {}
        speech = batch.speech
        if speech is not None:
            rows = batch.speech_rows
            commit_rows = speech.speaking.clone()
            ends = speech.commit(group, commit_rows)
            speech_tokens = torch.where(
                ends, torch.full_like(ends, text_config.audio_eos_index, dtype=torch.long), tokens[rows]
            )
            tokens[rows] = speech_tokens
            kept = speech.groups[-1]
            # one host copy of the row flags, not one sync per row
            for slot, (index, commits) in enumerate(zip(rows.tolist(), commit_rows.tolist())):
                if commits:
                    committed[index] = kept[slot].clone()
            # A long-lived batch hands groups out as RowSteps instead of collecting them for a final output.
            speech.groups.clear()
            speech.committed.clear()
        for index, row in enumerate(batch.rows):
            row.sequence[0, -1] = tokens[index]

        step_text_embeds = model.get_input_embeddings()(tokens[:, None])
        next_embeds = step_text_embeds
        if speech is not None:
            rows = batch.speech_rows
            next_embeds = step_text_embeds.clone()
            next_embeds[rows] = speech.next_inputs_embeds(step_text_embeds[rows], tokens[rows])
        batch.step_text_embeds, batch.next_embeds = step_text_embeds, next_embeds
        token_ids = tokens.tolist()  # one host copy for every row
        return [
            RowStep(row.row_id, token_ids[index], committed.get(index), finished[index], reasons[index])
            for index, row in enumerate(batch.rows)
        ]

    # ------------------------------------------------------------------------------------------ layout
    def _drop_cancelled(self) -> None:
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        self._waiting = [(batch, first) for batch, first in self._waiting if batch.rows[0].row_id not in cancelled]
        if self._batch is not None:
            gone = [row.row_id in cancelled for row in self._batch.rows]
            if any(gone):
                with torch.inference_mode():
                    self._regroup([(self._batch, gone)])

    def _regroup(self, parts: list[tuple[_Batch, list[bool]]]) -> None:
        """The running batch becomes the rows of ``parts`` not flagged as leaving, in order (on slots: the running
        rows keep their slots except that the last ones fill the holes, and joining rows come after them)."""
        sources = []
        for batch, leaving in parts:
            keep = [index for index, gone in enumerate(leaving) if not gone]
            if not keep:
                continue
            if len(keep) == len(leaving):
                sources.append((batch, None))
            else:
                if self._slots is not None and batch is self._batch:
                    keep = self._fill_slot_holes(keep)
                sources.append((batch, torch.tensor(keep, dtype=torch.long, device=batch.lengths.device)))
        if not sources:
            self._batch = None
        elif len(sources) == 1 and sources[0][1] is None and sources[0][0] is self._batch:
            pass  # nothing joins or leaves: keep the caches as they are
        elif len(sources) == 1 and sources[0][1] is None and self._slots is None:
            self._batch = sources[0][0]  # one prefilled row alone: its own caches are the batch's
        elif self._slots is not None:
            self._load_joining_rows(sources)
            self._batch = _Batch.relayout(sources, slots=self._slots)
        else:
            self._batch = _Batch.relayout(sources)

    def _fill_slot_holes(self, keep: list[int]) -> list[int]:
        """The running rows' order after some leave: the last kept rows move into the freed slots below them, so
        only they are copied. Returns the old row index of each new slot."""
        count = len(keep)
        movers = iter(index for index in keep if index >= count)
        kept = set(keep)
        order = [slot if slot in kept else next(movers) for slot in range(count)]
        moves = [(slot, index) for slot, index in enumerate(order) if slot != index]
        targets, sources = [slot for slot, _ in moves], [index for _, index in moves]
        self._slots.llm.move(targets, sources)
        if self._slots.srh is not None:
            self._slots.srh.move(targets, sources)
        return order

    def _load_joining_rows(self, sources: list[tuple[_Batch, torch.Tensor | None]]) -> None:
        """Copy each joining row's prefilled caches into the slot its position in the new batch names."""
        slot = 0
        for batch, rows in sources:
            count = len(batch.rows) if rows is None else rows.numel()
            if batch is not self._batch:  # a prefilled row (its own dynamic caches), joining now
                layers = batch.llm_cache.layers
                self._slots.llm.load(slot, [layer.keys for layer in layers], [layer.values for layer in layers])
                if self._slots.srh is not None:
                    if batch.speech is None:
                        self._slots.srh.cursor[slot] = 0  # a text-only row never advances its SRH slot
                    else:
                        decoder = batch.speech.decoder
                        if decoder.length != self.model.group_size * int(batch.lengths[0]):
                            # the SRH attention window is sized from the LLM length on this rule (k per position)
                            raise RuntimeError(
                                f"a joining row's SRH cache holds {decoder.length} sub-positions, not "
                                f"{self.model.group_size} per LLM position; this is a bug, please report it."
                            )
                        filled = [decoder.filled_keys_values(index) for index in range(len(decoder.cache.layers))]
                        self._slots.srh.load(slot, [keys for keys, _ in filled], [values for _, values in filled])
            slot += count


__all__ = ["ContinuousBatchDecoder", "RowRandomStream", "RowSpeechDecoder", "RowStep"]
