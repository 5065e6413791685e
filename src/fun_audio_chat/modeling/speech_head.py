"""Speech Refined Head (``audio_invert_tower``): ungroups each 5 Hz LLM state into k 25 Hz speech codes.

``pre_matching`` lifts one LLM state to k sub-position states; a small Qwen3 decoder (``crq_transformer``)
runs autoregressively over the 25 Hz sub-positions, each input being the sub-position state plus the
embedding of the previous speech code. Its output head is tied to the speech embedding table.

:class:`SpeechHeadDecoder` is the head's one autoregressive decoder (prefill, step, select), used by ``generate()``
and by the "consistent" training recipe; :func:`decode_static_group` is its compiled unit: the k sub-steps of one
LLM step with their code selection and cache writes, traced as one graph.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache, StaticLayer

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig
from ..transformers_compat import CACHE_NAME
from .speech_kv_cache import PreallocatedKVLayer
from .speech_sampling import SpeechSamplingSettings, select_code, select_code_on_device


class FunAudioChatSpeechHead(nn.Module):
    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.group_size = config.group_size
        hidden = config.output_dim
        backbone_config = config.crq_transformer_config
        # The backbone is fed embeddings only: build it with a one-row vocabulary and drop the table, so the
        # 8B model never allocates the unused (151936, 1024) matrix. The backbone keeps the config object itself
        # (not a copy), so transformers finds it as the audio config's sub-config: set_attn_implementation (a
        # string, or a dict naming "crq_transformer_config") reaches the backbone's attention layers.
        vocab_size, backbone_config.vocab_size = backbone_config.vocab_size, 1
        try:
            self.crq_transformer = AutoModel.from_config(backbone_config)
        finally:
            backbone_config.vocab_size = vocab_size
        del self.crq_transformer.embed_tokens
        backbone_width = backbone_config.hidden_size
        self.pre_matching = nn.Linear(hidden, hidden * self.group_size, bias=True)
        self.input_matching = nn.Linear(hidden, backbone_width, bias=False)
        self.output_matching = nn.Linear(backbone_width, hidden, bias=False)
        self.lm_head = SpeechCodeTable(hidden, config.codebook_size, bias=False)

    def ungroup(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) LLM-rate states -> (B, L·k, H) sub-position states; sub-position (p, j) is row p·k + j."""
        batch, length, hidden = states.shape
        return self.pre_matching(states).view(batch, length * self.group_size, hidden)

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings of speech codes: rows of the tied output table (= the speech embedding table)."""
        return self.lm_head(codes=codes)

    def run_backbone(
        self,
        sub_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """Backbone over (B, T, H) inputs (sub-position state + previous-code embedding); returns the
        backbone output and the speech logits (B, T, codebook)."""
        output = self.crq_transformer(
            inputs_embeds=self.input_matching(sub_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: past_key_values},
        )
        logits = self.lm_head(self.output_matching(output.last_hidden_state))
        return output, logits

    def decode_step(
        self,
        sub_state: torch.Tensor,
        cache,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new sub-position (B, 1, H) through the backbone's decoder layers with its KV cache; returns logits
        (B, 1, codebook).

        Generation runs this k times per LLM step. It calls transformers' own Qwen3 decoder layers and final norm
        (so attention implementations, adapters and offload hooks apply) but skips ``crq_transformer.forward``'s
        per-call mask and rotary construction: ``position_embeddings`` are this position's precomputed (cos, sin)
        and ``attention_mask`` an additive (B, 1, 1, T) key mask, or None when nothing is padded.
        """
        backbone = self.crq_transformer
        hidden = self.input_matching(sub_state)
        # islice, not backbone.layers[:n]: slicing a ModuleList builds a new ModuleList, at every sub-step.
        for layer in itertools.islice(backbone.layers, backbone.config.num_hidden_layers):
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=True,
                **{CACHE_NAME: cache},
            )
        return self.lm_head(self.output_matching(backbone.norm(hidden)))

    def forward(
        self,
        states: torch.Tensor,
        previous_code_embeddings: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over a whole sequence: states (B, L, H) -> speech logits (B, L·k, codebook).

        ``previous_code_embeddings`` (B, L·k, H) holds, at each sub-position, the embedding of the code that
        precedes its target in the 25 Hz stream.
        """
        sub_states = self.ungroup(states)
        if previous_code_embeddings is not None:
            sub_states = sub_states + previous_code_embeddings
        _, logits = self.run_backbone(sub_states, attention_mask=attention_mask, position_ids=position_ids)
        return logits


class SpeechCodeTable(nn.Linear):
    """The SRH's output layer, whose weight is also the speech-code embedding table (tied to the discrete encoder's
    ``embed_tokens``): ``table(hidden)`` gives code logits, ``table(codes=codes)`` the codes' embeddings.

    Both uses go through ``forward`` because whatever wraps a module's forward must also serve the lookup: DeepSpeed
    ZeRO-3 gathers a partitioned weight only for its own module's forward (a bare ``self.weight`` read between
    sub-steps finds an empty shard), and accelerate's offload hooks bring the weight in the same way.
    """

    def forward(self, hidden: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
        if codes is not None:
            return nn.functional.embedding(codes, self.weight)
        return super().forward(hidden)


class SpeechHeadDecoder:
    """KV-cached autoregressive decoding of the SRH backbone over a fixed layout of cache columns.

    Column ``c`` of the cache holds the sub-position at ``positions[:, c]``; where ``key_mask[:, c] == 0`` the
    column is hidden from every later query of that row (left padding, or a shorter row's unused prefix). The
    layout is fixed up front, so rotary tables and the additive mask are built once, not at every sub-step.

    * :meth:`prefill` runs several sub-positions in one backbone call and returns all their logits;
    * :meth:`step` runs one sub-position and returns its logits;
    * :meth:`select` picks codes from logits (greedy, or sampled with the speech settings);
    * :meth:`decode_group` runs the k sub-steps of one LLM step, feeding each the code just selected.

    ``static=True`` keeps the cache in fixed buffers whose write position is a tensor (transformers'
    ``StaticLayer``), so :func:`decode_static_group` traces a whole group without a graph break or guard on the
    length; attention then spans the whole buffer with the unwritten columns masked.
    """

    def __init__(
        self, head: FunAudioChatSpeechHead, positions: torch.Tensor, key_mask: torch.Tensor | None, static: bool
    ):
        self.head = head
        self.static = static
        self.positions = positions  # (B, T) long
        self.key_mask = key_mask  # (B, T) or None
        self.capacity = positions.shape[1]
        self.length = 0
        backbone = head.crq_transformer
        dtype = head.input_matching.weight.dtype
        layer_count = backbone.config.num_hidden_layers
        if static:
            self.cache = Cache(layers=[StaticLayer(self.capacity) for _ in range(layer_count)])
        else:
            self.cache = Cache(layers=[PreallocatedKVLayer(self.capacity) for _ in range(layer_count)])
        self.key_bias = None
        if key_mask is not None:
            bias = torch.zeros(positions.shape[0], 1, 1, self.capacity, dtype=dtype, device=positions.device)
            self.key_bias = bias.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        self.rotary = backbone.rotary_emb(probe, positions)  # (cos, sin) of every column, computed once

    def prefill(self, sub_inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, H) sub-position inputs into the next n columns in one call; returns their logits (B, n, V).

        ``attention_mask`` (B, n) replaces the layout's key mask for this call only: the training recipe prefills
        whole rows, then hides the columns past each row's own prompt from the sub-steps that follow.
        """
        start, end = self.length, self.length + sub_inputs.shape[1]
        mask = self.key_mask if attention_mask is None else attention_mask
        if mask is not None and not self.static and attention_mask is None:
            mask = mask[:, :end]  # a static cache hands attention the whole buffer, so the mask covers it all
        _, logits = self.head.run_backbone(
            sub_inputs,
            attention_mask=mask,
            position_ids=self.positions[:, start:end],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.length = end
        return logits

    def step(self, sub_input: torch.Tensor) -> torch.Tensor:
        """(B, 1, H) input of the next column; returns its logits (B, V) in float32."""
        if self.static:
            logits = _static_sub_step(self.head, self.cache, sub_input, self.positions, self.rotary, self.key_mask)
        else:
            start, end = self.length, self.length + 1
            bias = None if self.key_bias is None else self.key_bias[..., :end]
            rotary = (self.rotary[0][:, start:end], self.rotary[1][:, start:end])
            logits = self.head.decode_step(sub_input, self.cache, self.positions[:, start:end], rotary, bias)
            logits = logits[:, -1].float()
        self.length += 1
        return logits

    def select(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor | None,
        settings: SpeechSamplingSettings,
        uniform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, V) logits -> (B,) codes: the static decoder's on-device rule, else the default path's rule."""
        if self.static:
            return select_code_on_device(logits, seen, settings, uniform)
        return select_code(logits, seen, settings, settings.warpers())

    def decode_group(
        self,
        states: torch.Tensor,
        previous_code: torch.Tensor,
        seen: torch.Tensor | None,
        settings: SpeechSamplingSettings,
        uniforms: torch.Tensor | None = None,
        compiled_group=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The k sub-steps of one LLM step for a static decoder: ``states`` (B, 1, H) is the LLM state plus its
        text embedding. Returns codes (B, k), float32 logits (B, k, V) and the updated seen-codes set.

        ``compiled_group`` is :func:`decode_static_group` compiled (see :func:`compile_static_group`); without it
        the same function runs eagerly.
        """
        run = compiled_group or decode_static_group
        result = run(
            self.head,
            self.cache,
            states,
            previous_code,
            seen,
            uniforms,
            self.positions,
            self.rotary,
            self.key_mask,
            settings,
        )
        self.length += self.head.group_size
        return result

    def rewind(self, columns: int) -> None:
        """Forget the last ``columns`` columns; the next calls write over them."""
        self.length -= columns
        for layer in self.cache.layers:
            if self.static:
                layer.cumulative_length.sub_(columns)
            else:
                layer.truncate(self.length)

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Fill the first columns with given per-layer keys and values (B, heads, n, head_dim) (rows re-laid out)."""
        for layer, layer_keys, layer_values in zip(self.cache.layers, keys, values):
            layer.update(layer_keys, layer_values)
        self.length = keys[0].shape[2] if keys else 0

    def filled_keys_values(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled columns of one layer, (B, heads, length, head_dim) each."""
        layer = self.cache.layers[layer_index]
        return layer.keys[:, :, : self.length], layer.values[:, :, : self.length]


def _static_sub_step(head, cache, sub_input, positions, rotary, key_mask) -> torch.Tensor:
    """One sub-position into a static cache at its tensor cursor; returns float32 logits (B, V). No host sync."""
    cursor = cache.layers[0].cumulative_length.clone().view(1)
    capacity = positions.shape[1]
    columns = torch.arange(capacity, device=positions.device)
    visible = (columns <= cursor)[None, :]
    if key_mask is not None:
        visible = visible & (key_mask != 0)
    dtype = rotary[0].dtype
    bias = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
    bias = bias.masked_fill(~visible, torch.finfo(dtype).min)[:, None, None, :]
    step_positions = positions.index_select(1, cursor)
    step_rotary = (rotary[0].index_select(1, cursor), rotary[1].index_select(1, cursor))
    logits = head.decode_step(sub_input, cache, step_positions, step_rotary, bias)
    return logits[:, -1].float()


def decode_static_group(head, cache, states, previous_code, seen, uniforms, positions, rotary, key_mask, settings):
    """k SRH sub-steps of one LLM step on a static cache, with code selection: one graph for ``torch.compile``.

    ``states`` (B, 1, H) is the LLM's last state plus the step's text embedding; sub-step j feeds sub-position j
    of its ungrouped state plus the embedding of the code selected just before. ``uniforms`` (B, k) are the
    sampling draws (None when greedy). Returns codes (B, k), logits (B, k, V) and the updated seen-codes set.
    """
    sub_states = head.ungroup(states)
    codes, logits_per_step = [], []
    for sub_step in range(head.group_size):
        sub_input = sub_states[:, sub_step : sub_step + 1] + head.code_embeddings(previous_code)[:, None, :]
        logits = _static_sub_step(head, cache, sub_input, positions, rotary, key_mask)
        uniform = None if uniforms is None else uniforms[:, sub_step]
        code = select_code_on_device(logits, seen, settings, uniform)
        if seen is not None and settings.penalised:
            seen = seen.scatter(1, code[:, None], True)
        previous_code = code
        codes.append(code)
        logits_per_step.append(logits)
    return torch.stack(codes, dim=1), torch.stack(logits_per_step, dim=1), seen


def compile_static_group(compile_config=None):
    """:func:`decode_static_group` under ``torch.compile(fullgraph=True)`` with a ``CompileConfig``'s backend and
    mode; one compiled function per distinct setting, shared by every model (dynamo keys its graphs on the inputs)."""
    options = {} if compile_config is None else compile_config.to_dict()
    options["fullgraph"] = True
    key = tuple(sorted((name, repr(value)) for name, value in options.items()))
    compiled = _COMPILED_GROUPS.get(key)
    if compiled is None:
        compiled = _COMPILED_GROUPS[key] = torch.compile(decode_static_group, **options)
    return compiled


_COMPILED_GROUPS: dict[tuple, object] = {}

__all__ = ["FunAudioChatSpeechHead", "SpeechHeadDecoder", "compile_static_group", "decode_static_group"]
