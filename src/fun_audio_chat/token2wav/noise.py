"""The fixed random tables of CosyVoice 3 inference, regenerated with plain torch calls.

The official constructors reseed the global generator with ``noise_seed`` and then draw, in this order: the
flow's initial-noise table randn(1, mel, 15000); the initial weights of the token embedding (normal) and of the
speaker projection, then of the HiFT F0 predictor (uniform); a (1, H+1) phase table that has no effect; and the
vocoder's uniform source-noise table (1, 7 200 000, H+1). Replaying the same draws reproduces the tables bit for
bit; only the generator state right before the source-noise table is kept, and the table is drawn lazily up to
the length needed (uniform draws are sequential, so a shorter draw is a prefix of the long one).
"""

from __future__ import annotations

import torch

from .configuration_cosyvoice3 import CosyVoice3Config


def fixed_noise(config: CosyVoice3Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the flow's initial noise (1, mel, max_frames), the generator state for the source noise)."""
    flow, hift = config.flow, config.hift
    generator = torch.Generator().manual_seed(config.noise_seed)
    initial_noise = torch.randn(1, flow.mel_bins, flow.max_frames, generator=generator)
    torch.empty(flow.vocab_size, flow.mel_bins).normal_(generator=generator)
    for shape in [(flow.mel_bins, flow.speaker_embedding_dim), (flow.mel_bins,)]:
        torch.empty(shape).uniform_(generator=generator)
    channels = hift.f0_channels
    f0_shapes = [(channels, hift.mel_bins, hift.f0_lookahead + 1), (channels,)]
    f0_shapes += [(channels, channels, 3), (channels,)] * 4 + [(1, channels), (1,)]
    for shape in f0_shapes:
        torch.empty(shape).uniform_(generator=generator)
    torch.rand(1, hift.num_harmonics + 1, generator=generator)  # the phase table (no effect on the output)
    return initial_noise, generator.get_state()
