"""Compiled continuous batching: fixed cache slots, one write cursor per row, compiled graphs reused at every step.

The default serving decoder (``continuous_batching.py``) keeps its rows in dynamic caches that it re-lays out
(left-padded, right-aligned) whenever a row joins or leaves, so every step can have new cache shapes: nothing can
be compiled once and reused. Here every row owns a **slot**, a fixed row of preallocated key/value buffers:

* a row's context starts at column 0 of its slot, so its positions are its columns; each step writes the new
  key/value at the row's own cursor (:class:`SlotKVLayer`). Attention reads the leading columns that hold every
  row's cursor (an :class:`AttentionWindow`, a power of two wide), the columns past a row's cursor masked, so a
  step costs what the longest row has filled, not the whole slot. Rows of any lengths share a step without padding
  or re-layout;
* a joining row's prefill (done alone, uncompiled, as ``generate`` does) is copied into a free slot; a leaving
  row's slot is filled by the last row (one row's copy), so the running rows are always slots ``0..n-1``;
* a step of ``n`` rows runs on the first ``b`` slots, ``b`` the smallest **bucket** (1, 2, 4, ..., the slot
  count) that holds ``n``; the unused slots of a bucket compute on zeros and their results are dropped.
  :meth:`SlotDecoding.warm_up` runs every bucket with two window widths before the first request. With
  ``CompileConfig``'s default ``dynamic=None``, dynamo makes the batch size and the window width symbolic sizes
  once it has seen two of each, so the warm-up compiles three graphs per function (batch 1 with a static window,
  batch 1 with a symbolic one, then both symbolic) and no later step recompiles; ``dynamic=False`` compiles one
  graph per bucket and window width instead, the later widths at their first use.

The LLM step is the model's own forward through ``get_compiled_call`` (transformers' compiled call); the SRH
sub-step is :func:`slot_head_sub_step`. Code selection stays outside the graphs, per row group exactly as in the
uncompiled decoder (each row keeps its own speech sampling settings and random stream), so a greedy row's reply
equals ``generate`` on its prompt alone and a seeded row draws what it draws there.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import CompileConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from .speech_head import FunAudioChatSpeechHead


def visible_bias(cursor: torch.Tensor, columns: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, 1, window) additive attention mask of one step over the window's ``columns``: each row sees its
    columns up to its cursor."""
    hidden = columns[None, :] > cursor[:, None]
    bias = torch.zeros(hidden.shape, dtype=dtype, device=cursor.device)
    return bias.masked_fill(hidden, torch.finfo(dtype).min)[:, None, None, :]


class AttentionWindow:
    """The leading columns of a store that attention reads this step, as a tensor ``columns`` (``arange(width)``).

    Every row's cursor is inside the window, so attention costs what the longest row has filled (rounded up), not
    the whole slot. The width reaches the compiled graphs as this tensor's length: dynamo makes it a symbolic size
    after it has seen two widths (the warm-up shows it two), so a growing window never recompiles.
    """

    def __init__(self, capacity: int, device):
        self.capacity = capacity
        self._device = device
        self._columns: dict[int, torch.Tensor] = {}
        self.columns = self._arange(capacity)

    def _arange(self, width: int) -> torch.Tensor:
        columns = self._columns.get(width)
        if columns is None:
            # Always an inference tensor (decoding runs under inference_mode): a tensor made outside it has another
            # dispatch key set, which a compiled graph's guards would see as a new input and recompile for.
            with torch.inference_mode():
                columns = self._columns[width] = torch.arange(width, device=self._device)
        return columns

    def cover(self, needed: int) -> None:
        """Widen or narrow the window to the smallest power of two (at least 32) holding ``needed`` columns,
        capped at the capacity: few distinct widths, at most twice the columns needed."""
        width = 32
        while width < needed:
            width *= 2
        self.columns = self._arange(min(width, self.capacity))


class SlotKVLayer(CacheLayerMixin):
    """One attention layer's cache over slots: (slots, heads, capacity, head_dim) buffers and a (slots,) cursor.

    ``update`` takes one new position per row and writes it at that row's cursor; the caller moves the cursors
    (the LLM's follow the rows' lengths, the SRH's advance only for speaking rows). Attention gets the columns of
    the store's :class:`AttentionWindow`, which hold every row's cursor.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cursor: torch.Tensor, window: AttentionWindow):
        super().__init__()
        self.keys, self.values, self.cursor, self.window = keys, values, cursor, window
        self.dtype, self.device = keys.dtype, keys.device
        self.max_cache_len = keys.shape[2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are views of the store's, made before the first update."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"a slot cache takes one new position per row and step, got {key_states.shape[-2]}; "
                "prefill rows uncompiled and load them with SlotKVStore.load."
            )
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.keys[rows, :, self.cursor] = key_states[:, :, 0]
        self.values[rows, :, self.cursor] = value_states[:, :, 0]
        width = self.window.columns.shape[0]
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        # Rows have lengths of their own; callers of a slot cache pass positions and a 4D mask, so nothing reads
        # this as a length. The buffer length is the only value that is true of every row.
        return self.max_cache_len

    def get_max_length(self) -> int:
        return self.max_cache_len


class SlotKVStore:
    """The key/value buffers of one decoder stack (the LLM or the SRH backbone) for ``slots`` rows of up to
    ``capacity`` positions, and each slot's cursor (its next column)."""

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, *, capacity: int, dtype, device):
        shape = (slots, heads, capacity, head_dim)
        # Zeros, not empty memory: masked columns are multiplied by zero weights, and a NaN there would survive.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.cursor = torch.zeros(slots, dtype=torch.long, device=device)
        self.capacity = capacity
        self.window = AttentionWindow(capacity, device)
        self._caches: dict[int, Cache] = {}

    @classmethod
    def for_decoder(cls, config, slots: int, capacity: int, dtype, device) -> SlotKVStore:
        """Buffers sized from a decoder config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``)."""
        return cls(
            config.num_hidden_layers, slots, *_kv_heads_and_dim(config), capacity=capacity, dtype=dtype, device=device
        )

    def cache(self, rows: int) -> Cache:
        """A cache over the first ``rows`` slots (views of the buffers). The same object is returned for a size every
        time, so a compiled graph's guards on it keep holding."""
        cache = self._caches.get(rows)
        if cache is None:
            layers = [
                SlotKVLayer(keys[:rows], values[:rows], self.cursor[:rows], self.window)
                for keys, values in zip(self.keys, self.values)
            ]
            # The graphs write into these views in place: fixed addresses let CUDA graphs (mode="reduce-overhead")
            # keep them instead of copying them in and out at every replay, as transformers' StaticLayer does.
            for layer in layers:
                for tensor in (layer.keys, layer.values, layer.cursor):
                    torch._dynamo.mark_static_address(tensor)
            cache = self._caches[rows] = Cache(layers=layers)
        return cache

    def load(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy one row's filled cache, per layer (1, heads, n, head_dim), to columns ``0..n-1`` of ``slot``."""
        length = keys[0].shape[2] if keys else 0
        if length > self.capacity:
            raise ValueError(f"a row of {length} positions does not fit a slot of {self.capacity}.")
        for buffer, layer_keys in zip(self.keys, keys):
            buffer[slot, :, :length] = layer_keys[0]
        for buffer, layer_values in zip(self.values, values):
            buffer[slot, :, :length] = layer_values[0]
        self.cursor[slot] = length

    def move(self, targets: list[int], sources: list[int]) -> None:
        """Slot ``targets[i]`` takes the contents of slot ``sources[i]`` (all sources are read before any write)."""
        if not targets:
            return
        device = self.cursor.device
        target = torch.tensor(targets, dtype=torch.long, device=device)
        source = torch.tensor(sources, dtype=torch.long, device=device)
        for buffer in (*self.keys, *self.values):
            buffer.index_copy_(0, target, buffer.index_select(0, source))
        self.cursor.index_copy_(0, target, self.cursor.index_select(0, source))


def _kv_heads_and_dim(config) -> tuple[int, int]:
    heads = config.num_key_value_heads or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _srh_capacity(group_size: int, context: int) -> int:
    # as SpeechDecoder.start sizes a row's SRH cache: k sub-positions per LLM position, plus one group
    return group_size * (context + 1)


def slot_cache_bytes(model, context: int) -> int:
    """Bytes one slot of ``context`` LLM positions allocates: keys and values of every LLM layer, and of every
    Speech Refined Head layer for its sub-positions, in the model's dtype."""

    def per_position(config) -> int:
        heads, head_dim = _kv_heads_and_dim(config)
        return 2 * config.num_hidden_layers * heads * head_dim

    total = per_position(model.config.text_config) * context
    if getattr(model, "audio_invert_tower", None) is not None:
        srh_config = model.config.audio_config.crq_transformer_config
        total += per_position(srh_config) * _srh_capacity(model.group_size, context)
    return total * model.dtype.itemsize


def slot_head_sub_step(
    head: FunAudioChatSpeechHead, cache: Cache, sub_input: torch.Tensor, cursor: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """One SRH sub-position per slot (B, 1, H) written at each slot's cursor; returns float32 logits (B, V).

    A slot's SRH positions are its columns (its context starts at column 0), so the cursor is the position.
    """
    positions = cursor[:, None]
    backbone = head.crq_transformer
    rotary = backbone.rotary_emb(sub_input, positions)
    bias = visible_bias(cursor, columns, sub_input.dtype)
    logits = head.decode_step(sub_input, cache, positions, rotary, bias)
    return logits[:, -1].float()


def _buckets(slots: int) -> tuple[int, ...]:
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    sizes.append(slots)
    return tuple(sizes)


class SlotDecoding:
    """The slot caches of a model's LLM and SRH, and their compiled step functions (see the module docstring).

    Args:
        model: a :class:`~fun_audio_chat.FunAudioChatForConditionalGeneration` in eval mode.
        compile_config: transformers' ``CompileConfig`` (backend, mode); ``fullgraph`` is always on.
        slots: most rows decoded together.
        context: most LLM positions of one row (prompt + reply); the SRH slots hold the matching sub-positions.
    """

    def __init__(self, model, compile_config: CompileConfig | None, slots: int, context: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}.")
        if context < 2:
            raise ValueError(f"context must be >= 2 positions, got {context}.")
        self.model = model
        self.slots = slots
        self.context = context
        self.buckets = _buckets(slots)
        compile_config = copy.copy(compile_config) if compile_config is not None else CompileConfig()
        compile_config.fullgraph = True  # a graph break would mean Python work (and guards) in every step
        self.compile_config = compile_config
        dtype, device = model.dtype, model.device
        self.llm = SlotKVStore.for_decoder(model.config.text_config, slots, context, dtype, device)
        self.head = model.audio_invert_tower
        self.srh = None
        if self.head is not None:
            backbone_config = model.config.audio_config.crq_transformer_config
            capacity = _srh_capacity(model.group_size, context)
            self.srh = SlotKVStore.for_decoder(backbone_config, slots, capacity, dtype, device)
            self._head_step = torch.compile(slot_head_sub_step, **compile_config.to_dict())
        self._llm_step = model.get_compiled_call(compile_config)

    def bucket(self, rows: int) -> int:
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows do not fit {self.slots} slots.")

    def fit_error(self, prompt_length: int, max_new_tokens: int) -> str | None:
        """Why a row of this prompt and reply length does not fit a slot, or None."""
        needed = prompt_length + max_new_tokens
        if needed <= self.context:
            return None
        return (
            f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) = {needed} positions exceed the compiled "
            f"decoder's slot context of {self.context}; build it with a larger context or ask for fewer tokens."
        )

    # ------------------------------------------------------------------------------------------ steps
    def llm_step(self, inputs_embeds: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LLM step of rows ``0..n-1``: inputs (n, 1, H) at positions ``lengths`` (n,). Returns the float32
        last-position logits (n, V) and last hidden states (n, 1, H)."""
        rows = inputs_embeds.shape[0]
        size = self.bucket(rows)
        cursor = self.llm.cursor
        cursor[:rows] = lengths
        cursor[rows:size] = 0  # an unused slot of the bucket writes (and reads) only its column 0
        # One host read per step sizes both windows: the LLM writes at column `length` of each row, and a speaking
        # row's SRH writes its group at sub-columns k*length .. k*length + k-1 (its prefill filled k per position).
        longest = int(lengths.max()) + 1
        self.llm.window.cover(longest)
        if self.srh is not None:
            self.srh.window.cover(self.model.group_size * longest)
        embeds = inputs_embeds
        if size > rows:
            embeds = torch.cat([inputs_embeds, inputs_embeds.new_zeros(size - rows, *inputs_embeds.shape[1:])])
        output = self._llm_step(
            inputs_embeds=embeds,
            attention_mask=visible_bias(cursor[:size], self.llm.window.columns, embeds.dtype),
            position_ids=cursor[:size, None].clone(),
            past_key_values=self.llm.cache(size),
            use_cache=True,
            logits_to_keep=1,
            return_last_hidden_state=True,
            compute_speech_logits=False,
            return_dict=True,
        )
        return output.logits[:rows, -1].float(), output.last_hidden_state[:rows]

    def head_step(self, sub_input: torch.Tensor, speech_rows: torch.Tensor, rows: int) -> torch.Tensor:
        """One SRH sub-step of the speaking rows ``speech_rows`` (indices among rows ``0..rows-1``): inputs (m, 1, H).
        Returns their float32 logits (m, V); only their cursors advance."""
        size = self.bucket(rows)
        cursor = self.srh.cursor
        if speech_rows.numel() == size:  # every slot of the bucket speaks (rows are 0..n-1): nothing to scatter
            logits = self._head_step(self.head, self.srh.cache(size), sub_input, cursor[:size], self.srh.window.columns)
            cursor[:size] += 1
            return logits
        full = sub_input.new_zeros(size, *sub_input.shape[1:])
        full[speech_rows] = sub_input
        logits = self._head_step(self.head, self.srh.cache(size), full, cursor[:size], self.srh.window.columns)
        cursor[speech_rows] += 1
        return logits[speech_rows]

    # ------------------------------------------------------------------------------------------ warm-up
    def warm_up(self) -> dict[int, float]:
        """Compile the LLM step and the SRH sub-step for every bucket (on zeros, slots left free); returns seconds
        per bucket. Call it before the first row: a later first call of a bucket would stall every row for it."""
        model = self.model
        hidden = model.config.text_config.hidden_size
        timings = {}
        for size in self.buckets:
            start = time.perf_counter()
            zeros = torch.zeros(size, 1, hidden, dtype=model.dtype, device=model.device)
            # Two attention windows (rows of 1 and of 33 positions), so the window's width is a symbolic size in
            # every graph from here on and no later step recompiles for a longer reply.
            for length in (0, min(32, self.context - 1)):
                lengths = torch.full((size,), length, dtype=torch.long, device=model.device)
                self.llm_step(zeros, lengths)
                if self.srh is not None:
                    every = torch.arange(size, device=model.device)
                    sub_width = model.config.audio_config.output_dim
                    self.head_step(zeros.new_zeros(size, 1, sub_width), every, size)
                    self.srh.cursor.zero_()
            timings[size] = time.perf_counter() - start
        return timings


class SlotHeadDecoder:
    """What :class:`~.speech_decoding.SpeechDecoder` calls of its SRH decoder, on slots: ``step`` runs one
    sub-position of the batch's speaking rows through the compiled slot sub-step."""

    static = False  # SpeechDecoder then selects codes outside the graph, per row group

    def __init__(self, slots: SlotDecoding, speech_rows: torch.Tensor, rows: int):
        self.slots = slots
        self.speech_rows = speech_rows
        self.rows = rows

    def step(self, sub_input: torch.Tensor) -> torch.Tensor:
        return self.slots.head_step(sub_input, self.speech_rows, self.rows)

    def prefill(self, *args, **kwargs):
        raise RuntimeError("slot rows are prefilled uncompiled, before they join; a step never prefills.")


__all__ = [
    "SlotDecoding",
    "SlotHeadDecoder",
    "SlotKVLayer",
    "SlotKVStore",
    "slot_cache_bytes",
    "slot_head_sub_step",
    "visible_bias",
]
