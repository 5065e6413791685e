"""Continuous audio encoder (``continuous_audio_tower``): transformers' ``Qwen2_5OmniAudioEncoder``.

The official encoder is, parameter for parameter, the Qwen2.5-Omni audio encoder: a Whisper-large-v3 style stack
run on independent 2·n_window-frame chunks (each with its own convolutional front end and sinusoid positions from
0, attention never crossing a chunk boundary), the chunk outputs of a clip concatenated, average-pooled by 2 (25 Hz),
normalised and projected to the LLM width. This thin subclass keeps transformers' modules, state-dict names and
attention implementations (the config's ``_attn_implementation`` selects eager / SDPA / flash attention) and adds
two things the model needs:

* a batched interface: padded ``(clips, mel, frames)`` features plus per-clip lengths in, one tensor per clip out;
* the official pooling of a clip that is a single frame after the convolutions: it is kept as it is (pooling
  by 2 would drop it), so a very short clip still yields one embedding.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig


class FunAudioChatAudioEncoder(Qwen2_5OmniAudioEncoder):
    """``continuous_audio_tower``: log-mel frames of each clip -> 25 Hz embeddings of width ``output_dim``.

    ``audio_bos_eos_token`` is stored in official checkpoints but never used by the model; it is created frozen
    (``requires_grad=False``) so it never sits in an optimizer without receiving a gradient (DDP with gradient
    checkpointing would otherwise trip over it).
    """

    config_class = FunAudioChatAudioEncoderConfig

    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__(config)
        self.freeze_unused_parameters()

    def freeze_unused_parameters(self) -> None:
        """Freeze the stored-but-unused ``audio_bos_eos_token`` (loading replaces parameters: call it again then)."""
        self.audio_bos_eos_token.weight.requires_grad_(False)

    @staticmethod
    def frames_after_conv(num_frames: torch.Tensor | int):
        return (num_frames - 1) // 2 + 1

    def forward(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Encode each clip.

        Args:
            input_features: (num_clips, num_mel_bins, frames), zero after each clip's valid frames.
            feature_lengths: (num_clips,) number of valid mel frames per clip.

        Returns:
            one tensor per clip of shape (frames after the convolutions // 2, output_dim), 4 mel frames per output
            frame; a clip of one frame after the convolutions keeps that frame.
        """
        lengths = [int(n) for n in feature_lengths.tolist()]
        # transformers' encoder takes the clips' valid frames concatenated along time.
        flat = torch.cat([input_features[clip, :, :length] for clip, length in enumerate(lengths)], dim=-1)
        feature_lens = torch.tensor(lengths, dtype=torch.long, device=input_features.device)
        # transformers' forward pools with indices computed inline (there is no pooling step to override), and that
        # pooling drops a one-frame clip: take the last layer's states and pool here. (A forward hook on the last
        # layer would hold fewer states, but two threads encoding at once would read each other's.)
        encoded = super().forward(flat, feature_lens=feature_lens, output_hidden_states=True)
        frames_per_clip = self.frames_after_conv(feature_lens).tolist()
        outputs = []
        for frames in encoded.hidden_states[-1].split(frames_per_clip, dim=0):
            if frames.shape[0] >= 2:
                frames = self.avg_pooler(frames.transpose(0, 1)[None])[0].transpose(0, 1)
            outputs.append(self.proj(self.ln_post(frames)))
        return outputs


__all__ = ["FunAudioChatAudioEncoder"]
