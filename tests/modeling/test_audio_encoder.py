"""The continuous audio encoder: each clip of a batch encodes as it does alone, and a clip that is one frame after
the convolutions keeps its one embedding (the official pooling; transformers' own pooling would drop it)."""

from __future__ import annotations

import torch

from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.tiny import tiny_config


def _encoder():
    torch.manual_seed(0)
    return FunAudioChatForConditionalGeneration(tiny_config()).eval().continuous_audio_tower


def _features(encoder, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, encoder.config.num_mel_bins, frames, generator=generator)


def test_a_batch_of_clips_equals_each_clip_alone_and_a_one_frame_clip_keeps_its_embedding():
    encoder = _encoder()
    clips = [_features(encoder, 37, 0), _features(encoder, 2, 1), _features(encoder, 8, 2)]
    lengths = torch.tensor([clip.shape[-1] for clip in clips])
    padded = torch.zeros(len(clips), encoder.config.num_mel_bins, int(lengths.max()))
    for row, clip in enumerate(clips):
        padded[row, :, : clip.shape[-1]] = clip[0]
    with torch.no_grad():
        batched = encoder(padded, lengths)
        alone = [encoder(clip, torch.tensor([clip.shape[-1]]))[0] for clip in clips]
    # 37 mel frames -> 19 after the convolutions -> 9 pooled (the last odd frame dropped, as officially); 2 -> 1 -> 1
    # kept; 8 -> 4 -> 2
    assert [tuple(out.shape) for out in batched] == [
        (9, encoder.config.output_dim),
        (1, encoder.config.output_dim),
        (2, encoder.config.output_dim),
    ]
    for got, expected in zip(batched, alone):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
