# Copyright 2026 The fun_audio_chat authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
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
from transformers.utils import auto_docstring


@auto_docstring(
    checkpoint="FunAudioLLM/Fun-Audio-Chat-8B",
    custom_intro=(
        "Flow of the CosyVoice 3 token-to-waveform model: 25 Hz tokens to an 80-bin mel at 50 Hz (embedding, "
        "pre-look-ahead convolutions, DiT estimator, Euler conditional flow matching)."
    ),
)
@strict
class CosyVoice3FlowConfig(PreTrainedConfig):
    r"""
    vocab_size (`int`, *optional*, defaults to 6561):
        Number of real speech codes the flow embeds (6561 for the released S3 tokenizer v3). Ids at or above it (the
        LLM's speech BOS/EOS/pad) are refused, never voiced.
    mel_bins (`int`, *optional*, defaults to 80):
        Mel channels.
    speaker_embedding_dim (`int`, *optional*, defaults to 192):
        Width of the CAM++ speaker embedding.
    token_mel_ratio (`int`, *optional*, defaults to 2):
        Mel frames per token.
    pre_lookahead_tokens (`int`, *optional*, defaults to 3):
        Look-ahead (in tokens) of the token convolutions.
    pre_lookahead_channels (`int`, *optional*, defaults to 1024):
        Width of the token convolutions.
    hidden_size (`int`, *optional*, defaults to 1024):
        Width of the DiT estimator.
    num_layers (`int`, *optional*, defaults to 22):
        DiT blocks.
    num_heads (`int`, *optional*, defaults to 16):
        Attention heads of each DiT block.
    head_dim (`int`, *optional*, defaults to 64):
        Width of one attention head.
    ff_mult (`int`, *optional*, defaults to 2):
        Feed-forward width of a DiT block as a multiple of `hidden_size`.
    position_conv_kernel (`int`, *optional*, defaults to 31):
        Kernel of the DiT's convolutional position embedding.
    position_conv_groups (`int`, *optional*, defaults to 16):
        Groups of the DiT's convolutional position embedding.
    rope_base (`float`, *optional*, defaults to 10000.0):
        Rotary base of the DiT attention.
    chunk_frames (`int`, *optional*, defaults to 50):
        Chunk of the chunk-causal attention used when streaming (the official `static_chunk_size`).
    num_steps (`int`, *optional*, defaults to 10):
        Euler steps of the conditional flow matching.
    cfg_rate (`float`, *optional*, defaults to 0.7):
        Classifier-free guidance rate.
    max_frames (`int`, *optional*, defaults to 15000):
        Length of the fixed initial-noise table (300 s of mel).
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


@auto_docstring(
    checkpoint="FunAudioLLM/Fun-Audio-Chat-8B",
    custom_intro=(
        "HiFT vocoder of the CosyVoice 3 token-to-waveform model: a 50 Hz mel to a 24 kHz waveform (F0 "
        "predictor, harmonic-plus-noise source, causal HiFi-GAN, inverse STFT)."
    ),
)
@strict
class CosyVoice3HiFTConfig(PreTrainedConfig):
    r"""
    mel_bins (`int`, *optional*, defaults to 80):
        Mel channels of the input.
    base_channels (`int`, *optional*, defaults to 512):
        Width of the first HiFi-GAN stage.
    num_harmonics (`int`, *optional*, defaults to 8):
        Overtones; the source uses `num_harmonics + 1` sines.
    sample_rate (`int`, *optional*, defaults to 24000):
        Output sample rate.
    sine_amplitude (`float`, *optional*, defaults to 0.1):
        Amplitude of the harmonic source's sines.
    noise_std (`float`, *optional*, defaults to 0.003):
        Standard deviation of the source noise.
    voiced_threshold (`float`, *optional*, defaults to 10.0):
        F0 (Hz) above which a frame is voiced.
    upsample_rates (`list[int]`, *optional*, defaults to [8, 5, 3]):
        Upsampling factor of each HiFi-GAN stage.
    upsample_kernel_sizes (`list[int]`, *optional*, defaults to [16, 11, 7]):
        Kernel of each upsampling convolution.
    n_fft (`int`, *optional*, defaults to 16):
        FFT size of the inverse STFT at the end.
    hop_length (`int`, *optional*, defaults to 4):
        Hop of the inverse STFT.
    resblock_kernel_sizes (`list[int]`, *optional*, defaults to [3, 7, 11]):
        Kernels of the residual blocks of each stage.
    resblock_dilations (`list[list[int]]`, *optional*, defaults to [[1, 3, 5], [1, 3, 5], [1, 3, 5]]):
        Dilations of those residual blocks.
    source_resblock_kernel_sizes (`list[int]`, *optional*, defaults to [7, 7, 11]):
        Kernels of the residual blocks applied to the source at each stage.
    source_resblock_dilations (`list[list[int]]`, *optional*, defaults to [[1, 3, 5], [1, 3, 5], [1, 3, 5]]):
        Dilations of those residual blocks.
    lrelu_slope (`float`, *optional*, defaults to 0.1):
        Leaky-ReLU slope.
    audio_limit (`float`, *optional*, defaults to 0.99):
        Output clipping.
    conv_pre_lookahead (`int`, *optional*, defaults to 4):
        Frames of look-ahead of the first convolution.
    f0_channels (`int`, *optional*, defaults to 512):
        Width of the F0 predictor.
    f0_lookahead (`int`, *optional*, defaults to 3):
        Look-ahead of the F0 predictor (its first convolution has kernel `f0_lookahead + 1`).
    max_samples (`int`, *optional*, defaults to 7200000):
        Length of the fixed source-noise table (300 s).
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


@auto_docstring(
    checkpoint="FunAudioLLM/Fun-Audio-Chat-8B",
    custom_intro=(
        "Configuration of `CosyVoice3Detokenizer`: the flow, the HiFT vocoder and the official offline and "
        "streaming schedules."
    ),
)
@strict
class CosyVoice3Config(PreTrainedConfig):
    r"""
    flow (`dict | CosyVoice3FlowConfig`, *optional*, defaults to None):
        The flow's configuration (or its dict).
    hift (`dict | CosyVoice3HiFTConfig`, *optional*, defaults to None):
        The vocoder's configuration (or its dict).
    noise_seed (`int`, *optional*, defaults to 0):
        Seed of the fixed noise tables the official constructors draw.
    segment_tokens (`int`, *optional*, defaults to 750):
        Offline schedule: segments of 30 s.
    min_last_segment_tokens (`int`, *optional*, defaults to 50):
        Offline schedule: a last segment under 2 s is merged with the previous one and the pair halved.
    stream_hop_tokens (`int`, *optional*, defaults to 15):
        Official web-demo streaming: a call every hop tokens once hop + look-ahead are available.
    max_stream_tokens (`int`, *optional*, defaults to 200):
        Streaming: the token list is trimmed every `max_stream_tokens`.
    max_stream_history_tokens (`int`, *optional*, defaults to 500):
        Streaming: the vocoder history restarts after this many trimmed tokens.
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
