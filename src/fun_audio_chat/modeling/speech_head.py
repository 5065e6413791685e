"""Speech Refined Head (``audio_invert_tower``): ungroups each 5 Hz LLM state into k 25 Hz speech codes.

``pre_matching`` lifts one LLM state to k sub-position states; a small Qwen3 decoder (``crq_transformer``)
runs autoregressively over the 25 Hz sub-positions, each input being the sub-position state plus the
embedding of the previous speech code. Its output head is tied to the speech embedding table.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig


def _rms_norm(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Qwen3 RMSNorm (statistics in fp32) as one fused op."""
    if hidden.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return nn.functional.rms_norm(hidden, (hidden.shape[-1],), norm.weight, eps=norm.variance_epsilon)
    normed = nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def fused_decode_weights(backbone: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the q/k/v and the gate/up projection weights stacked into one matrix each.

    One matrix product instead of three (and two) per layer and sub-step. Only for plain bias-free Linear
    projections: wrapped ones (e.g. LoRA adapters) must run as modules, so then this returns None.
    """
    fused = []
    for layer in backbone.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)
        if any(type(p) is not nn.Linear or p.bias is not None for p in projections):
            return None
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        fused.append((qkv, gate_up))
    return fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class FunAudioChatSpeechHead(nn.Module):
    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.group_size = config.group_size
        hidden = config.output_dim
        backbone_config = copy.deepcopy(config.crq_transformer_config)
        backbone_config._attn_implementation = config.crq_transformer_config._attn_implementation
        # The backbone is fed embeddings only: build it with a one-row vocabulary and drop the table, so the
        # 8B model never allocates the unused (151936, 1024) matrix.
        backbone_config.vocab_size = 1
        self.crq_transformer = AutoModel.from_config(backbone_config)
        del self.crq_transformer.embed_tokens
        backbone_width = backbone_config.hidden_size
        self.pre_matching = nn.Linear(hidden, hidden * self.group_size, bias=True)
        self.input_matching = nn.Linear(hidden, backbone_width, bias=False)
        self.output_matching = nn.Linear(backbone_width, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, config.codebook_size, bias=False)

    def ungroup(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) LLM-rate states -> (B, L·k, H) sub-position states; sub-position (p, j) is row p·k + j."""
        batch, length, hidden = states.shape
        return self.pre_matching(states).view(batch, length * self.group_size, hidden)

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings of speech codes: rows of the tied output table (= the speech embedding table)."""
        return nn.functional.embedding(codes, self.lm_head.weight)

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
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        logits = self.lm_head(self.output_matching(output.last_hidden_state))
        return output, logits

    def decode_position(
        self,
        sub_state: torch.Tensor,
        past_key_values,
        position_ids: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        fused_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One new sub-position (B, 1, H) through the backbone with its KV cache; returns logits (B, codebook).

        ``fused_weights`` (from :func:`fused_decode_weights`, built once per generate call) replaces the
        separate q/k/v and gate/up products by one each; ``rotary`` passes this position's precomputed
        (cos, sin), each (B, 1, head_dim).

        Generation runs this k times per LLM step. It computes what ``crq_transformer`` computes for a single
        query position, minus the per-call work a full forward repeats every time (mask construction,
        output containers, module hooks around every norm): on this small decoder that bookkeeping cost more
        than the matrix products.
        """
        backbone = self.crq_transformer
        config = backbone.config
        hidden = self.input_matching(sub_state)
        batch = hidden.shape[0]
        cos, sin = rotary if rotary is not None else backbone.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        eager = config._attn_implementation == "eager"
        for index, layer in enumerate(backbone.layers[: config.num_hidden_layers]):
            attention = layer.self_attn
            head_dim = attention.head_dim
            residual = hidden
            normed = _rms_norm(hidden, layer.input_layernorm)
            if fused_weights is None:
                query, key, value = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
            else:
                query, key, value = nn.functional.linear(normed, fused_weights[index][0]).split(
                    (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features),
                    dim=-1,
                )
            query = _rms_norm(query.view(batch, 1, -1, head_dim), attention.q_norm).transpose(1, 2)
            key = _rms_norm(key.view(batch, 1, -1, head_dim), attention.k_norm).transpose(1, 2)
            value = value.view(batch, 1, -1, head_dim).transpose(1, 2)
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
            key, value = past_key_values.layers[index].update(key, value)
            if eager:
                groups = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
                weights = torch.matmul(query, key.transpose(-1, -2)) * attention.scaling
                if attention_bias is not None:
                    weights = weights + attention_bias
                context = torch.matmul(torch.softmax(weights.float(), dim=-1).to(query.dtype), value)
            else:
                context = nn.functional.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_bias, scale=attention.scaling, enable_gqa=True
                )
            hidden = residual + attention.o_proj(context.transpose(1, 2).reshape(batch, 1, -1))
            residual = hidden
            normed = _rms_norm(hidden, layer.post_attention_layernorm)
            mlp = layer.mlp
            if fused_weights is None:
                gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
            else:
                gate, up = nn.functional.linear(normed, fused_weights[index][1]).chunk(2, dim=-1)
            hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
        hidden = _rms_norm(hidden, backbone.norm)
        return self.lm_head(self.output_matching(hidden))[:, -1]

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
