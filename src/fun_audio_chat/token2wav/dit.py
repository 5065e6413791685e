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

from .configuration_cosyvoice3 import CosyVoice3FlowConfig


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

    def forward(self, h, cos, sin, attention_mask, past=None):
        """Attention of ``h`` over ``past`` keys/values (B, heads, S, head_dim) or None, then its own frames;
        returns the output and this call's own (keys, values) for the caller to cache."""
        batch, length, _ = h.shape
        q = self._rotate_first_head(self.q_proj(h), cos, sin)
        k = self._rotate_first_head(self.k_proj(h), cos, sin)
        v = self.v_proj(h)
        q, k, v = (y.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), (k, v)


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

    def forward(self, h, time, cos, sin, attention_mask, past=None):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(F.silu(time)).chunk(6, dim=-1)
        attended, own_keys_values = self.attention(_modulated_norm(h, shift_a, scale_a), cos, sin, attention_mask, past)
        h = h + gate_a[:, None] * attended
        h = h + gate_f[:, None] * self.feed_forward(_modulated_norm(h, shift_f, scale_f))
        return h, own_keys_values


class DiTCache:
    """What one Euler step of the estimator keeps about one stream's committed frames: per layer the keys and
    values (2, heads, frames, head_dim) of both guidance rows (conditioned, unconditioned), and the last
    ``position_context`` frames of projected input (2, frames, hidden) for the causal position convolutions."""

    def __init__(self, num_layers: int):
        self.length = 0
        self.input_tail = None
        self.layers: list = [(None, None)] * num_layers

    def copy(self) -> DiTCache:
        """A cache sharing this one's tensors that can grow on its own (:meth:`append` never writes in place)."""
        other = DiTCache(0)
        other.length, other.input_tail, other.layers = self.length, self.input_tail, list(self.layers)
        return other

    def memory_bytes(self) -> int:
        total = 0 if self.input_tail is None else self.input_tail.numel() * self.input_tail.element_size()
        for keys, values in self.layers:
            if keys is not None:
                total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        return total

    def append(self, layer_keys_values: list, projected: torch.Tensor, context: int) -> None:
        """Add committed frames: each layer's (keys, values) (2, heads, n, head_dim) and their projected input
        (2, n, hidden), keeping ``context`` frames of input tail."""
        self.layers = [
            (keys, values)
            if past_keys is None
            else (torch.cat([past_keys, keys], 2), torch.cat([past_values, values], 2))
            for (past_keys, past_values), (keys, values) in zip(self.layers, layer_keys_values)
        ]
        tail = projected if self.input_tail is None else torch.cat([self.input_tail, projected], dim=1)
        self.input_tail = tail[:, -context:]
        self.length += projected.shape[1]


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

    def _rotary(self, positions: torch.Tensor, dtype):
        """cos, sin (..., head_dim) of the rotary angles at ``positions`` (any shape of frame indices)."""
        angles = positions.float()[..., None] * self.rotary_inv_freq.float()
        angles = angles.repeat_interleave(2, dim=-1)
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

    def _project(self, x, mu, speaker, cond):
        inputs = torch.cat([x, cond, mu, speaker[:, :, None].expand(-1, -1, x.shape[2])], dim=1).transpose(1, 2)
        return self.input_projection(inputs)

    def _output(self, h, time):
        scale, shift = self.final_modulation(F.silu(time)).chunk(2, dim=-1)
        return self.output_projection(_modulated_norm(h, shift, scale)).transpose(1, 2)

    def forward(self, x, mu, t, speaker, cond, lengths=None, chunk_frames=None, caches=None, commits=None):
        """x, mu, cond (B, mel, T); t (B,); speaker (B, mel); lengths (B,) valid frames of each row (padding after).

        Cached streaming: ``caches`` holds one :class:`DiTCache` per stream and the batch is the guidance batch
        of those streams (every stream's conditioned row, then every stream's unconditioned row: B = 2 ×
        streams); x/mu/cond hold each stream's frames after its ``cache.length``, right-padded, ``lengths`` (one
        per stream) how many are real, and attention is chunk-causal (``chunk_frames``) at absolute positions.
        The first ``commits[i]`` new frames of stream i are added to its cache (they must not change later:
        whole chunks)."""
        if caches is not None:
            return self._forward_cached(x, mu, t, speaker, cond, list(lengths), chunk_frames, caches, list(commits))
        batch, _, length = x.shape
        time = self.time_embedding(t)
        projected = self._project(x, mu, speaker, cond)
        h = projected + self._position_embedding(projected)
        cos, sin = self._rotary(torch.arange(length, device=h.device), h.dtype)
        mask = self.attention_mask(batch, 0, length, lengths, chunk_frames, h.device)
        for block in self.blocks:
            h, _ = block(h, time, cos, sin, mask)
        return self._output(h, time)

    def _forward_cached(self, x, mu, t, speaker, cond, lengths, chunk_frames, caches, commits):
        streams, width = len(caches), x.shape[2]
        if x.shape[0] != 2 * streams or len(lengths) != streams or len(commits) != streams:
            raise ValueError(
                f"{streams} cached streams need a guidance batch of {2 * streams} rows and one length "
                f"and commit each (got {x.shape[0]} rows, {len(lengths)} lengths, {len(commits)} commits)."
            )
        device = x.device
        starts = [cache.length for cache in caches]
        longest_past = max(starts)
        time = self.time_embedding(t)
        projected = self._project(x, mu, speaker, cond)
        # the causal position convolutions per stream on its own input tail: a shorter tail is not the same as
        # zero padding (the mish between the two convolutions turns zeros into non-zeros)
        position = torch.zeros_like(projected)
        for stream, (cache, length) in enumerate(zip(caches, lengths)):
            rows = [stream, streams + stream]
            own = projected[rows, :length]
            extended = own if cache.input_tail is None else torch.cat([cache.input_tail, own], dim=1)
            position[rows, :length] = self._position_embedding(extended)[:, -length:]
        h = projected + position
        # every stream's new frames sit at key column longest_past, after its past keys left-padded to that width;
        # key column c then holds absolute frame c - longest_past + start for every stream
        start = torch.tensor(starts, device=device)
        new_end = start + torch.tensor(lengths, device=device)
        queries = start[:, None] + torch.arange(width, device=device)  # (streams, width) absolute positions
        cos, sin = self._rotary(torch.cat([queries, queries]), h.dtype)
        keys = torch.arange(longest_past + width, device=device)[None] - longest_past + start[:, None]
        allowed = (keys >= 0) & (keys < new_end[:, None])
        if chunk_frames:
            allowed = allowed[:, None] & (keys[:, None] < ((queries // chunk_frames + 1) * chunk_frames)[..., None])
        else:
            allowed = allowed[:, None].expand(-1, width, -1)
        mask = torch.cat([allowed, allowed])[:, None]
        committed = [[] for _ in caches]
        for index, block in enumerate(self.blocks):
            h, (new_keys, new_values) = block(h, time, cos, sin, mask, self._padded_past(caches, index, longest_past))
            for stream, commit in enumerate(commits):
                if commit:
                    rows = [stream, streams + stream]
                    committed[stream].append((new_keys[rows, :, :commit], new_values[rows, :, :commit]))
        for stream, (cache, commit) in enumerate(zip(caches, commits)):
            if commit:
                cache.append(committed[stream], projected[[stream, streams + stream], :commit], self.position_context)
        return self._output(h, time)

    @staticmethod
    def _padded_past(caches, layer: int, width: int):
        """One layer's cached (keys, values) of every stream in the guidance batch layout, left-padded to
        ``width`` frames (padding is masked), or None when no stream has any."""
        if not width:
            return None
        if len(caches) == 1:
            return caches[0].layers[layer]
        reference = next(cache.layers[layer][0] for cache in caches if cache.length)
        streams = len(caches)
        heads, head_dim = reference.shape[1], reference.shape[3]
        keys = reference.new_zeros(2 * streams, heads, width, head_dim)
        values = reference.new_zeros(2 * streams, heads, width, head_dim)
        for stream, cache in enumerate(caches):
            if cache.length:
                past_keys, past_values = cache.layers[layer]
                keys[[stream, streams + stream], :, width - cache.length :] = past_keys
                values[[stream, streams + stream], :, width - cache.length :] = past_values
        return keys, values
