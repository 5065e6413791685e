"""Continuous audio encoder: a Whisper-large-v3 style encoder run on independent 2·n_window-frame chunks.

Each chunk gets its own convolutional front end and sinusoid positions starting at 0, and attention never
crosses a chunk boundary (block-diagonal attention). The chunk outputs of one clip are concatenated,
average-pooled by 2 (25 Hz), normalised and projected to the LLM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoid position table: [sin | cos] halves with geometric timescales."""
    if channels % 2:
        raise ValueError(f"sinusoid positions need an even width, got {channels}.")
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class SinusoidPositions(nn.Module):
    def __init__(self, length: int, channels: int):
        super().__init__()
        # Recomputed on load (not in checkpoints), like the official model.
        self.register_buffer("positional_embedding", sinusoid_table(length, channels), persistent=False)


class AudioSelfAttention(nn.Module):
    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        # hidden_states: (chunks, T, D); attention_bias: (chunks, 1, 1, T) additive key mask.
        chunks, length, _ = hidden_states.shape
        shape = (chunks, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            weights = torch.matmul(query * self.scaling, key.transpose(-1, -2)) + attention_bias
            weights = torch.softmax(weights.float(), dim=-1).to(query.dtype)
            weights = nn.functional.dropout(weights, p=dropout, training=self.training)
            context = torch.matmul(weights, value)
        else:
            context = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_bias, dropout_p=dropout, scale=self.scaling
            )
        # (chunks, heads, T, d) -> (chunks, T, heads·d): the transpose the official eager path forgets (SPEC Q1).
        context = context.transpose(1, 2).reshape(chunks, length, self.embed_dim)
        return self.out_proj(context)


class AudioEncoderLayer(nn.Module):
    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.self_attn = AudioSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        dropout = self.config.dropout if self.training else 0.0
        residual = hidden_states
        hidden_states = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_bias)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=dropout, training=self.training)
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        hidden_states = nn.functional.dropout(
            hidden_states, p=self.config.activation_dropout if self.training else 0.0, training=self.training
        )
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=dropout, training=self.training)
        if hidden_states.dtype == torch.float16:
            bound = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = hidden_states.clamp(-bound, bound)
        return hidden_states


class FunAudioChatAudioEncoder(nn.Module):
    """``continuous_audio_tower``: log-mel frames of each clip -> 25 Hz embeddings of width ``output_dim``."""

    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.chunk_frames = 2 * config.n_window
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = SinusoidPositions(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList([AudioEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.ln_post = nn.LayerNorm(config.d_model)
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.proj = nn.Linear(config.d_model, config.output_dim)
        # Stored in official checkpoints but never used by the model.
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)
        self.gradient_checkpointing = False

    @staticmethod
    def frames_after_conv(num_frames: torch.Tensor | int):
        return (num_frames - 1) // 2 + 1

    def forward(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Encode each clip.

        Args:
            input_features: (num_clips, num_mel_bins, frames), zero after each clip's valid frames.
            feature_lengths: (num_clips,) number of valid mel frames per clip.

        Returns:
            one tensor per clip of shape (ceil-pooled frames, output_dim) — 4 mel frames per output frame.
        """
        lengths = [int(n) for n in feature_lengths.tolist()]
        chunks, chunk_lengths, chunks_per_clip = [], [], []
        for clip, length in enumerate(lengths):
            pieces = input_features[clip, :, :length].split(self.chunk_frames, dim=-1)
            chunks.extend(pieces)
            chunk_lengths.extend(piece.shape[-1] for piece in pieces)
            chunks_per_clip.append(len(pieces))

        longest = max(chunk_lengths)
        batch = input_features.new_zeros(len(chunks), input_features.shape[1], longest)
        for index, piece in enumerate(chunks):
            batch[index, :, : piece.shape[-1]] = piece
        lengths_tensor = torch.tensor(chunk_lengths, device=input_features.device)
        frame_mask = torch.arange(longest, device=input_features.device)[None, :] < lengths_tensor[:, None]

        hidden = nn.functional.gelu(self.conv1(batch)) * frame_mask[:, None, :].to(batch.dtype)
        hidden = nn.functional.gelu(self.conv2(hidden)).transpose(1, 2)  # (chunks, T', D)
        out_lengths = self.frames_after_conv(lengths_tensor)
        hidden = hidden + self.positional_embedding.positional_embedding[: hidden.shape[1]].to(hidden.dtype)

        key_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_lengths[:, None]
        attention_bias = torch.zeros(key_mask.shape, dtype=hidden.dtype, device=hidden.device)
        attention_bias = attention_bias.masked_fill(~key_mask, torch.finfo(hidden.dtype).min)[:, None, None, :]

        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, attention_bias, use_reentrant=False)
            else:
                hidden = layer(hidden, attention_bias)

        outputs, start = [], 0
        out_lengths_list = out_lengths.tolist()
        for count in chunks_per_clip:
            frames = torch.cat(
                [hidden[i, : out_lengths_list[i]] for i in range(start, start + count)], dim=0
            )  # (T_clip, D)
            start += count
            if frames.shape[0] >= 2:
                frames = self.avg_pooler(frames.transpose(0, 1)[None])[0].transpose(0, 1)
            outputs.append(self.proj(self.ln_post(frames)))
        return outputs
