"""Sizes and schedule knobs of the CosyVoice 3 token-to-waveform model (flow matching to mel, HiFT vocoder).

Plain dataclasses serialised to ``config.json``; the defaults are the released CosyVoice 3 sizes
(flow 332,257,088 parameters, HiFT 20,779,887). See ``docs/token2wav.md`` for what every stage computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class FlowConfig:
    """Tokens (25 Hz) to an 80-bin mel (50 Hz): embedding, pre-look-ahead convs, DiT estimator, Euler CFM."""

    vocab_size: int = 6561
    mel_bins: int = 80
    speaker_embedding_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_tokens: int = 3
    pre_lookahead_channels: int = 1024
    # DiT estimator
    hidden_size: int = 1024
    num_layers: int = 22
    num_heads: int = 16
    head_dim: int = 64
    ff_mult: int = 2
    position_conv_kernel: int = 31
    position_conv_groups: int = 16
    rope_base: float = 10000.0
    # chunk-causal attention for streaming (mel frames); the official static_chunk_size
    chunk_frames: int = 50
    # conditional flow matching
    num_steps: int = 10
    cfg_rate: float = 0.7
    max_frames: int = 15000  # length of the fixed initial-noise table (300 s of mel)


@dataclass
class HiFTConfig:
    """Mel (50 Hz) to a 24 kHz waveform: F0 predictor, harmonic-plus-noise source, causal HiFi-GAN, iSTFT."""

    mel_bins: int = 80
    base_channels: int = 512
    num_harmonics: int = 8  # overtones; the source uses num_harmonics + 1 sines
    sample_rate: int = 24000
    sine_amplitude: float = 0.1
    noise_std: float = 0.003
    voiced_threshold: float = 10.0
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    n_fft: int = 16
    hop_length: int = 4
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilations: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilations: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_lookahead: int = 4
    f0_channels: int = 512
    f0_lookahead: int = 3  # the F0 predictor's first conv has kernel f0_lookahead + 1
    max_samples: int = 7_200_000  # length of the fixed source-noise table (300 s)

    @property
    def samples_per_frame(self) -> int:
        total = self.hop_length
        for rate in self.upsample_rates:
            total *= rate
        return total


@dataclass
class CosyVoice3Config:
    """The whole detokenizer: flow + HiFT + the official offline and streaming schedules."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    noise_seed: int = 0
    # offline: 30 s segments, a last segment under 2 s is merged with the previous one and the pair halved
    segment_tokens: int = 750
    min_last_segment_tokens: int = 50
    # streaming (the official web demo): a call every hop tokens once hop + look-ahead are available; the token
    # list is trimmed every max_stream_tokens; the vocoder history restarts after max_stream_history trimmed tokens
    stream_hop_tokens: int = 15
    max_stream_tokens: int = 200
    max_stream_history_tokens: int = 500

    @property
    def sample_rate(self) -> int:
        return self.hift.sample_rate

    def to_dict(self) -> dict:
        return {"model_type": "cosyvoice3_token2wav", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> CosyVoice3Config:
        data = dict(data)
        data.pop("model_type", None)
        flow = FlowConfig(**data.pop("flow", {}))
        hift = HiFTConfig(**data.pop("hift", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"config.json has unknown token2wav keys {sorted(unknown)}; expected some of {sorted(known)}."
            )
        return cls(flow=flow, hift=hift, **data)


def tiny_token2wav_config() -> CosyVoice3Config:
    """The real structure at toy sizes (flow width 64, 2 DiT layers; vocoder width 16): for demos and tests."""
    flow = FlowConfig(pre_lookahead_channels=32, hidden_size=64, num_layers=2, num_heads=2, head_dim=32)
    hift = HiFTConfig(
        base_channels=16,
        f0_channels=16,
        resblock_kernel_sizes=[3],
        resblock_dilations=[[1, 3]],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilations=[[1], [1], [1]],
    )
    return CosyVoice3Config(flow=flow, hift=hift)
