"""The flow's velocity estimator: a diffusion transformer (DiT) over mel frames.

Each block is pre-norm with adaptive LayerNorm-zero modulation from the flow time; attention uses rotary
positions on the first head only (the released checkpoint's layout) and either full attention or chunk-causal
attention (frame ``i`` sees every frame before the end of its own chunk). For cached streaming, the keys and
values of committed chunks and the tail of projected inputs (for the causal position convolutions) are kept in
a :class:`DiTCache` per Euler step, so later chunks are computed without redoing earlier ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import CosyVoice3FlowConfig


class TimeEmbedding(nn.Module):
    """Flow time t in [0, 1] → a vector: 256-dim sinusoid of 1000·t, then Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_in = nn.Linear(frequency_dim, hidden_size)
        self.linear_out = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        step = math.log(10000) / (half - 1)
        frequencies = torch.exp(torch.arange(half, device=t.device).float() * -step)
        angles = 1000 * t.float().unsqueeze(1) * frequencies.unsqueeze(0)
        sinusoid = torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.linear_in.weight.dtype)
        return self.linear_out(F.silu(self.linear_in(sinusoid)))


class DiTAttention(nn.Module):
    def __init__(self, config: CosyVoice3FlowConfig):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner)
        self.k_proj = nn.Linear(config.hidden_size, inner)
        self.v_proj = nn.Linear(config.hidden_size, inner)
        self.o_proj = nn.Linear(inner, config.hidden_size)

    def _rotate_first_head(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The checkpoint was trained with rotary positions applied before the head split to the first head_dim
        # channels only, in interleaved pairs (2i, 2i+1): the other heads see no positions.
        rotated, rest = x[..., : self.head_dim], x[..., self.head_dim :]
        pairs = rotated.unflatten(-1, (-1, 2))
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return torch.cat([rotated * cos + turned * sin, rest], dim=-1)

    def forward(self, h, cos, sin, attention_mask, layer_cache=None, commit=0):
        batch, length, _ = h.shape
        q = self._rotate_first_head(self.q_proj(h), cos, sin)
        k = self._rotate_first_head(self.k_proj(h), cos, sin)
        v = self.v_proj(h)
        q, k, v = (y.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if layer_cache is not None:
            past_k, past_v = layer_cache
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        committed = None
        if commit:
            keep = k.shape[2] - length + commit
            committed = (k[:, :, :keep], v[:, :, :keep])
        return self.o_proj(out), committed


class DiTFeedForward(nn.Module):
    def __init__(self, config: CosyVoice3FlowConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.ff_mult * config.hidden_size)
        self.down_proj = nn.Linear(config.ff_mult * config.hidden_size, config.hidden_size)

    def forward(self, h):
        return self.down_proj(F.gelu(self.up_proj(h), approximate="tanh"))


def _modulated_norm(h, shift, scale):
    return F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, config: CosyVoice3FlowConfig):
        super().__init__()
        self.modulation = nn.Linear(config.hidden_size, 6 * config.hidden_size)
        self.attention = DiTAttention(config)
        self.feed_forward = DiTFeedForward(config)

    def forward(self, h, time, cos, sin, attention_mask, layer_cache=None, commit=0):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(F.silu(time)).chunk(6, dim=-1)
        attended, committed = self.attention(
            _modulated_norm(h, shift_a, scale_a), cos, sin, attention_mask, layer_cache, commit
        )
        h = h + gate_a[:, None] * attended
        h = h + gate_f[:, None] * self.feed_forward(_modulated_norm(h, shift_f, scale_f))
        return h, committed


class DiTCache:
    """What one Euler step of the estimator keeps about already committed frames (both CFG rows)."""

    def __init__(self, num_layers: int):
        self.length = 0
        self.input_tail = None
        self.layers: list = [(None, None)] * num_layers

    def memory_bytes(self) -> int:
        total = 0 if self.input_tail is None else self.input_tail.numel() * self.input_tail.element_size()
        for keys, values in self.layers:
            if keys is not None:
                total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        return total


class DiffusionTransformer(nn.Module):
    """Velocity estimator v(x, t | mu, speaker, cond) over (B, mel, T) tensors."""

    def __init__(self, config: CosyVoice3FlowConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.time_embedding = TimeEmbedding(d)
        self.input_projection = nn.Linear(4 * config.mel_bins, d)
        kernel, groups = config.position_conv_kernel, config.position_conv_groups
        self.position_convs = nn.ModuleList([nn.Conv1d(d, d, kernel, groups=groups) for _ in range(2)])
        self.register_buffer(
            "rotary_inv_freq",
            1.0 / (config.rope_base ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)),
        )
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.final_modulation = nn.Linear(d, 2 * d)
        self.output_projection = nn.Linear(d, config.mel_bins)

    @property
    def position_context(self) -> int:
        """Frames of projected input the two causal position convolutions look back."""
        return 2 * (self.config.position_conv_kernel - 1)

    def _position_embedding(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(1, 2)
        for conv in self.position_convs:
            x = F.mish(conv(F.pad(x, (conv.kernel_size[0] - 1, 0))))
        return x.transpose(1, 2)

    def _rotary(self, start: int, length: int, device, dtype):
        positions = torch.arange(start, start + length, device=device).float()
        angles = torch.outer(positions, self.rotary_inv_freq.float()).repeat_interleave(2, dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def attention_mask(batch, start, length, lengths, chunk_frames, device):
        """Boolean (B, 1, length, start + length) mask, or None for plain full attention."""
        if lengths is None and not chunk_frames:
            return None
        keys = torch.arange(start + length, device=device)
        allowed = torch.ones(batch, length, start + length, dtype=torch.bool, device=device)
        if chunk_frames:
            queries = torch.arange(start, start + length, device=device)
            allowed = allowed & (keys[None, :] < (queries[:, None] // chunk_frames + 1) * chunk_frames)[None]
        if lengths is not None:
            allowed = allowed & (keys[None, None, :] < lengths[:, None, None])
        return allowed[:, None]

    def forward(
        self, x, mu, t, speaker, cond, lengths=None, chunk_frames=None, cache: DiTCache | None = None, commit: int = 0
    ):
        """x, mu, cond (B, mel, T); t (B,); speaker (B, mel); lengths (B,) valid frames (absolute when cached).

        With ``cache``, x/mu/cond are the frames after ``cache.length``; the first ``commit`` of them are added
        to the cache (they must not change later: whole chunks under chunk-causal attention).
        """
        batch, _, length = x.shape
        start = cache.length if cache is not None else 0
        time = self.time_embedding(t)
        inputs = torch.cat([x, cond, mu, speaker[:, :, None].expand(-1, -1, length)], dim=1).transpose(1, 2)
        projected = self.input_projection(inputs)
        if cache is not None and cache.input_tail is not None:
            extended = torch.cat([cache.input_tail, projected], dim=1)
            h = projected + self._position_embedding(extended)[:, -length:]
        else:
            h = projected + self._position_embedding(projected)
        cos, sin = self._rotary(start, length, h.device, h.dtype)
        mask = self.attention_mask(batch, start, length, lengths, chunk_frames, h.device)
        new_layers = []
        for index, block in enumerate(self.blocks):
            layer_cache = cache.layers[index] if cache is not None else None
            h, committed = block(h, time, cos, sin, mask, layer_cache, commit)
            new_layers.append(committed)
        if cache is not None and commit:
            cache.layers = new_layers
            tail = (
                projected[:, :commit]
                if cache.input_tail is None
                else torch.cat([cache.input_tail, projected[:, :commit]], dim=1)
            )
            cache.input_tail = tail[:, -self.position_context :]
            cache.length = start + commit
        scale, shift = self.final_modulation(F.silu(time)).chunk(2, dim=-1)
        h = _modulated_norm(h, shift, scale)
        return self.output_projection(h).transpose(1, 2)
