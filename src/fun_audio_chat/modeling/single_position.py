"""One new position through a Qwen3 decoder stack with its KV cache, without the per-call bookkeeping.

Generation decodes one position at a time: the LLM once per 5 Hz step and the Speech Refined Head k times per step.
A full ``Qwen3Model.forward`` rebuilds the attention mask, the rotary table and output containers on every call
and runs every norm as a hooked module; for a single query position that bookkeeping costs more than the matrix
products on a CPU. :func:`decode_one_position` computes exactly what the layers compute for that position (tested
bit for bit against the module path) and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer


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


def supports_single_position_decoding(backbone: nn.Module, cache) -> bool:
    """Qwen3-style layers (q/k norms) in a cache whose layers grow by ``update(key, value)``."""
    layers = getattr(backbone, "layers", None)
    if layers is None or getattr(cache, "layers", None) is None or len(cache.layers) < len(layers):
        return False
    if backbone.config._attn_implementation not in ("sdpa", "eager"):
        return False
    if any(not isinstance(layer, DynamicLayer) for layer in cache.layers):
        return False
    return all(hasattr(layer.self_attn, "q_norm") and hasattr(layer, "mlp") for layer in layers)


def decode_one_position(
    backbone: nn.Module,
    hidden: torch.Tensor,
    cache,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_bias: torch.Tensor | None = None,
    fused_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """(B, 1, H) input embeddings -> (B, 1, H) final-norm states; appends this position to ``cache``.

    ``cos``/``sin``: (B, 1, head_dim) rotary factors of the position; ``attention_bias``: additive (B, 1, 1, T)
    mask over the cached positions plus this one (None: attend to all); ``fused_weights``: see
    :func:`fused_decode_weights`.
    """
    config = backbone.config
    batch = hidden.shape[0]
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
        key, value = cache.layers[index].update(key, value)
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
    return _rms_norm(hidden, backbone.norm)
