"""Configurations of the CosyVoice 3 token-to-waveform model (flow matching to mel, HiFT vocoder).

transformers ``PreTrainedConfig`` classes: :class:`CosyVoice3Config` holds a :class:`CosyVoice3FlowConfig` (``flow``)
and a :class:`CosyVoice3HiFTConfig` (``hift``) plus the offline and streaming schedules. The defaults are the released
CosyVoice 3 sizes (flow 332,257,088 parameters, HiFT 20,779,887). ``config.json`` keeps the ``flow``/``hift`` keys of
folders converted before the move to transformers, so those folders load unchanged. See ``docs/token2wav.md`` for
what every stage computes.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class CosyVoice3FlowConfig(PreTrainedConfig):
    r"""Tokens (25 Hz) to an 80-bin mel (50 Hz): embedding, pre-look-ahead convs, DiT estimator, Euler CFM.

    Args:
        vocab_size: number of real speech codes the flow embeds (6561 for the released S3 tokenizer v3). Ids at or
            above it (speech BOS/EOS/pad of the LLM) are refused, never voiced.
        mel_bins: mel channels.
        speaker_embedding_dim: width of the CAM++ speaker embedding.
        token_mel_ratio: mel frames per token.
        pre_lookahead_tokens / pre_lookahead_channels: look-ahead of the token convolutions and their width.
        hidden_size / num_layers / num_heads / head_dim / ff_mult: the DiT estimator.
        position_conv_kernel / position_conv_groups: the DiT's convolutional position embedding.
        rope_base: rotary base of the DiT attention.
        chunk_frames: chunk of the chunk-causal attention used when streaming (the official ``static_chunk_size``).
        num_steps / cfg_rate: Euler steps of the conditional flow matching and the guidance rate.
        max_frames: length of the fixed initial-noise table (300 s of mel).
    """

    model_type = "cosyvoice3_flow"
    base_config_key = "flow"

    vocab_size: int = 6561
    mel_bins: int = 80
    speaker_embedding_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_tokens: int = 3
    pre_lookahead_channels: int = 1024
    hidden_size: int = 1024
    num_layers: int = 22
    num_heads: int = 16
    head_dim: int = 64
    ff_mult: int = 2
    position_conv_kernel: int = 31
    position_conv_groups: int = 16
    rope_base: float = 10000.0
    chunk_frames: int = 50
    num_steps: int = 10
    cfg_rate: float = 0.7
    max_frames: int = 15000

    def validate_architecture(self):
        if self.vocab_size < 1:
            raise ValueError(f"flow.vocab_size must be >= 1 (the number of real speech codes), got {self.vocab_size}.")
        if self.num_heads * self.head_dim < 1 or self.hidden_size < 1:
            raise ValueError("flow.hidden_size, num_heads and head_dim must be positive.")


@strict
class CosyVoice3HiFTConfig(PreTrainedConfig):
    r"""Mel (50 Hz) to a 24 kHz waveform: F0 predictor, harmonic-plus-noise source, causal HiFi-GAN, iSTFT.

    Args:
        mel_bins: mel channels of the input.
        base_channels: width of the first HiFi-GAN stage.
        num_harmonics: overtones; the source uses ``num_harmonics + 1`` sines.
        sample_rate: output sample rate.
        sine_amplitude / noise_std / voiced_threshold: the harmonic-plus-noise source.
        upsample_rates / upsample_kernel_sizes: the HiFi-GAN upsampling stages.
        n_fft / hop_length: the inverse STFT at the end.
        resblock_kernel_sizes / resblock_dilations: residual blocks of each stage.
        source_resblock_kernel_sizes / source_resblock_dilations: residual blocks applied to the source at each stage.
        lrelu_slope: leaky-ReLU slope.
        audio_limit: output clipping.
        conv_pre_lookahead: frames of look-ahead of the first convolution.
        f0_channels / f0_lookahead: the F0 predictor's width and look-ahead (its first conv has kernel
            ``f0_lookahead + 1``).
        max_samples: length of the fixed source-noise table (300 s).
    """

    model_type = "cosyvoice3_hift"
    base_config_key = "hift"

    mel_bins: int = 80
    base_channels: int = 512
    num_harmonics: int = 8
    sample_rate: int = 24000
    sine_amplitude: float = 0.1
    noise_std: float = 0.003
    voiced_threshold: float = 10.0
    upsample_rates: list[int] | tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: list[int] | tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_length: int = 4
    resblock_kernel_sizes: list[int] | tuple[int, ...] = (3, 7, 11)
    resblock_dilations: list | tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: list[int] | tuple[int, ...] = (7, 7, 11)
    source_resblock_dilations: list | tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_lookahead: int = 4
    f0_channels: int = 512
    f0_lookahead: int = 3
    max_samples: int = 7_200_000

    def __post_init__(self, **kwargs):
        # JSON has no tuples: keep one spelling (lists) whether the values came from defaults or from a file.
        for name in (
            "upsample_rates",
            "upsample_kernel_sizes",
            "resblock_kernel_sizes",
            "source_resblock_kernel_sizes",
        ):
            setattr(self, name, [int(value) for value in getattr(self, name)])
        for name in ("resblock_dilations", "source_resblock_dilations"):
            setattr(self, name, [[int(value) for value in inner] for inner in getattr(self, name)])
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("hift.upsample_rates and hift.upsample_kernel_sizes must have the same length.")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilations):
            raise ValueError("hift.resblock_kernel_sizes and hift.resblock_dilations must have the same length.")

    @property
    def samples_per_frame(self) -> int:
        total = self.hop_length
        for rate in self.upsample_rates:
            total *= rate
        return total


@strict
class CosyVoice3Config(PreTrainedConfig):
    r"""Configuration of :class:`~fun_audio_chat.CosyVoice3Detokenizer`: flow + HiFT + the official offline and
    streaming schedules.

    Args:
        flow: :class:`CosyVoice3FlowConfig` (or its dict).
        hift: :class:`CosyVoice3HiFTConfig` (or its dict).
        noise_seed: seed of the fixed noise tables the official constructors draw.
        segment_tokens / min_last_segment_tokens: offline schedule: 30 s segments; a last segment under 2 s is merged
            with the previous one and the pair halved.
        stream_hop_tokens / max_stream_tokens / max_stream_history_tokens: the official web-demo streaming
            schedule: a call every hop tokens once hop + look-ahead are available; the token list is trimmed every
            ``max_stream_tokens``; the vocoder history restarts after ``max_stream_history_tokens`` trimmed tokens.
    """

    model_type = "cosyvoice3_token2wav"
    sub_configs_defaults = {"flow": CosyVoice3FlowConfig, "hift": CosyVoice3HiFTConfig}

    flow: dict | PreTrainedConfig | None = None
    hift: dict | PreTrainedConfig | None = None
    noise_seed: int = 0
    segment_tokens: int = 750
    min_last_segment_tokens: int = 50
    stream_hop_tokens: int = 15
    max_stream_tokens: int = 200
    max_stream_history_tokens: int = 500

    @property
    def sample_rate(self) -> int:
        return self.hift.sample_rate


def tiny_token2wav_config() -> CosyVoice3Config:
    """The real structure at toy sizes (flow width 64, 2 DiT layers; vocoder width 16): for demos and tests."""
    flow = CosyVoice3FlowConfig(pre_lookahead_channels=32, hidden_size=64, num_layers=2, num_heads=2, head_dim=32)
    hift = CosyVoice3HiFTConfig(
        base_channels=16,
        f0_channels=16,
        resblock_kernel_sizes=[3],
        resblock_dilations=[[1, 3]],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilations=[[1], [1], [1]],
    )
    return CosyVoice3Config(flow=flow, hift=hift)


__all__ = ["CosyVoice3Config", "CosyVoice3FlowConfig", "CosyVoice3HiFTConfig", "tiny_token2wav_config"]
