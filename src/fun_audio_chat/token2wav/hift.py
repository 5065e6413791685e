"""Mel (50 Hz) → 24 kHz waveform: the causal HiFT vocoder.

An F0 predictor drives a harmonic-plus-noise excitation; a causal HiFi-GAN decoder (nearest upsampling, causal
convolutions, Snake residual blocks, the excitation's STFT injected at every scale) predicts a log-magnitude
and phase spectrogram that an inverse STFT turns into audio (480 samples per mel frame).

Every convolution either looks only back (zeros on the left) or, for the two look-ahead convolutions, a fixed
number of frames ahead. Not finalizing, those look-ahead frames are consumed as context and the output stops
``f0_lookahead + conv_pre_lookahead + 1`` frames early, so a stream can be rendered piece by piece.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from .configuration_cosyvoice3 import CosyVoice3HiFTConfig


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left by (kernel − 1)·dilation, or, with ``lookahead``, reading that many frames
    ahead: zeros on the right when finalizing, the last real frames otherwise (then it emits fewer frames)."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation=1, lookahead=False):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.context = (kernel_size - 1) * dilation
        self.lookahead = lookahead

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        if not self.lookahead:
            x = F.pad(x, (self.context, 0))
        elif finalize:
            x = F.pad(x, (0, self.context))
        return super().forward(x)


def _normed(conv: nn.Conv1d) -> nn.Conv1d:
    return weight_norm(conv)


class Snake(nn.Module):
    """x + sin²(αx)/α with a learned per-channel α."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class CausalResBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList([_normed(CausalConv1d(channels, channels, kernel_size, d)) for d in dilations])
        self.convs2 = nn.ModuleList([_normed(CausalConv1d(channels, channels, kernel_size)) for _ in dilations])
        self.activations1 = nn.ModuleList([Snake(channels) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(channels) for _ in dilations])

    def forward(self, x):
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """Mel → F0 in Hz per frame: a look-ahead conv, four causal convs (ELU after each), a linear head, |·|."""

    def __init__(self, config: CosyVoice3HiFTConfig):
        super().__init__()
        c = config.f0_channels
        self.convs = nn.ModuleList(
            [_normed(CausalConv1d(config.mel_bins, c, config.f0_lookahead + 1, lookahead=True))]
            + [_normed(CausalConv1d(c, c, 3)) for _ in range(4)]
        )
        self.classifier = nn.Linear(c, 1)

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        h = mel
        for index, conv in enumerate(self.convs):
            h = F.elu(conv(h, finalize) if index == 0 else conv(h))
        return torch.abs(self.classifier(h.transpose(1, 2)).squeeze(-1))


class HarmonicSource(nn.Module):
    """F0 → excitation: sines at harmonics 1..H+1 with a phase that advances once per frame, fixed noise
    (stronger where unvoiced), merged by Linear(H+1 → 1) and tanh."""

    def __init__(self, config: CosyVoice3HiFTConfig):
        super().__init__()
        self.config = config
        self.merge = nn.Linear(config.num_harmonics + 1, 1)

    def frame_increments(self, f0: torch.Tensor) -> torch.Tensor:
        """(B, T) F0 → (B, T, H+1) per-frame phase increments in cycles per sample (the frame's own value)."""
        config, upsample = self.config, self.config.samples_per_frame
        harmonics = torch.arange(1, config.num_harmonics + 2, device=f0.device, dtype=f0.dtype)
        per_sample = f0.repeat_interleave(upsample, dim=1)[..., None] * harmonics
        cycles = (per_sample / config.sample_rate) % 1
        return F.interpolate(cycles.transpose(1, 2), scale_factor=1 / upsample, mode="linear").transpose(1, 2)

    def forward(self, f0: torch.Tensor, noise: torch.Tensor, phase_start: torch.Tensor | None = None):
        """f0 (B, T) in Hz, noise (1 or B, T·480, H+1) the fixed table at these samples, phase_start (B, H+1)
        float64 cycles accumulated before the first frame. Returns (source (B, 1, T·480), cycles at the end)."""
        config, upsample = self.config, self.config.samples_per_frame
        increments = self.frame_increments(f0)
        # the phase is a running sum in double precision (as torch's CPU cumsum accumulates), kept as a start
        # value so that a stream continues exactly where the previous piece ended
        running = increments.double()
        if phase_start is not None:
            running = torch.cat([phase_start[:, None], running], dim=1)
        accumulated = torch.cumsum(running, dim=1)
        if phase_start is not None:
            accumulated = accumulated[:, 1:]
        phase = accumulated.to(f0.dtype) * 2 * math.pi
        phase = (phase * upsample).repeat_interleave(upsample, dim=1)
        sines = config.sine_amplitude * torch.sin(phase)
        voiced = (f0 > config.voiced_threshold).to(f0.dtype).repeat_interleave(upsample, dim=1)[..., None]
        noise_amplitude = voiced * config.noise_std + (1 - voiced) * config.sine_amplitude / 3
        excitation = sines * voiced + noise_amplitude * noise.to(f0.dtype)
        source = torch.tanh(self.merge(excitation)).transpose(1, 2)
        end = accumulated[:, -1] if accumulated.shape[1] else (phase_start if phase_start is not None else None)
        return source, end


class HiFTGenerator(nn.Module):
    def __init__(self, config: CosyVoice3HiFTConfig):
        super().__init__()
        self.config = config
        self.f0_predictor = F0Predictor(config)
        self.source = HarmonicSource(config)
        channels = config.base_channels
        self.conv_pre = _normed(CausalConv1d(config.mel_bins, channels, config.conv_pre_lookahead + 1, lookahead=True))
        spectrum_channels = config.n_fft + 2
        self.upsample_convs = nn.ModuleList()
        self.source_downsamples = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        rates = config.upsample_rates
        for index, kernel in enumerate(config.upsample_kernel_sizes):
            out = channels // (2 ** (index + 1))
            self.upsample_convs.append(_normed(CausalConv1d(channels // (2**index), out, kernel)))
            stride = math.prod(rates[index + 1 :])
            self.source_downsamples.append(
                nn.Conv1d(spectrum_channels, out, 2 * stride if stride > 1 else 1, stride=stride)
            )
            self.source_resblocks.append(
                CausalResBlock(out, config.source_resblock_kernel_sizes[index], config.source_resblock_dilations[index])
            )
            for kernel_size, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilations):
                self.resblocks.append(CausalResBlock(out, kernel_size, dilations))
        self.conv_post = _normed(CausalConv1d(channels // (2 ** len(rates)), spectrum_channels, 7))
        window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)
        self.register_buffer("source_noise", torch.zeros(1, 0, config.num_harmonics + 1), persistent=False)
        self.source_noise_state: torch.Tensor | None = None  # generator state right before the noise table

    # -- fixed source noise -----------------------------------------------------------------------------------
    def noise(self, start: int, length: int) -> torch.Tensor:
        end = start + length
        if end > self.config.max_samples:
            raise ValueError(
                f"{end} samples exceed the vocoder's noise table ({self.config.max_samples}): "
                "split the codes into shorter pieces."
            )
        # one read of the table: a server's speech threads share this vocoder, and another thread may swap in a
        # table of another size between our check and our slice
        table = self.source_noise
        if end > table.shape[1]:
            if self.source_noise_state is None:
                raise RuntimeError("the vocoder's noise table was not initialised (call set_noise_state).")
            size = min(self.config.max_samples, max(end, 2 * table.shape[1], 240_000))
            generator = torch.Generator().set_state(self.source_noise_state)
            table = torch.rand(1, size, self.config.num_harmonics + 1, generator=generator).to(self.stft_window.device)
            if table.shape[1] > self.source_noise.shape[1]:
                self.source_noise = table
        return table[:, start:end]

    # -- pieces -----------------------------------------------------------------------------------------------
    def _stft(self, x):
        spec = torch.stft(
            x,
            self.config.n_fft,
            self.config.hop_length,
            self.config.n_fft,
            window=self.stft_window,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude, phase):
        magnitude = torch.clip(magnitude, max=1e2)
        spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(
            spectrum, self.config.n_fft, self.config.hop_length, self.config.n_fft, window=self.stft_window
        )

    def decode(self, mel, source, finalize=True):
        config = self.config
        spectrum = self._stft(source.squeeze(1))
        if not finalize:
            spectrum = spectrum[:, :, : -config.conv_pre_lookahead * config.samples_per_frame // config.hop_length]
        x = self.conv_pre(mel, finalize)
        kernels = len(config.resblock_kernel_sizes)
        last = len(self.upsample_convs) - 1
        for index, (rate, upsample) in enumerate(zip(config.upsample_rates, self.upsample_convs)):
            x = F.leaky_relu(x, config.lrelu_slope)
            x = upsample(x.repeat_interleave(rate, dim=2))
            if index == last:
                x = F.pad(x, (1, 0), mode="reflect")
            down = self.source_downsamples[index]
            injected = down(F.pad(spectrum, (down.stride[0] - 1, 0)))
            x = x + self.source_resblocks[index](injected)
            total = None
            for j in range(kernels):
                y = self.resblocks[index * kernels + j](x)
                total = y if total is None else total + y
            x = total / kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = config.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :bins]), torch.sin(x[:, bins:]))
        if not finalize:
            speech = speech[:, : -config.samples_per_frame]
        return torch.clamp(speech, -config.audio_limit, config.audio_limit)

    def forward(self, mel, finalize=True, frame_offset=0, f0_override=None, phase_start=None, trace=None):
        """mel (B, mel, T) → speech (B, samples): T·480 when finalizing, else (T − 8)·480 (look-ahead kept back).

        ``frame_offset`` is the absolute frame of ``mel[..., 0]`` (it selects the fixed noise), ``f0_override``
        (B, k) replaces the first k predicted F0 frames, ``phase_start`` continues the source phase.
        For a batch of streams, ``frame_offset`` may be a list (one per row) and ``f0_override`` a list of (1, k_i)
        tensors (or None); a row without ``phase_start`` continues from phase 0, which is what None means.
        """
        config = self.config
        with parametrize.cached():  # each weight-normalised kernel is computed once per call
            f0 = self.f0_predictor(mel, finalize)
            if isinstance(f0_override, (list, tuple)):
                f0 = torch.stack(
                    [
                        row if override is None else torch.cat([override[0].to(f0.dtype), row[override.shape[1] :]])
                        for row, override in zip(f0, f0_override)
                    ]
                )
            elif f0_override is not None and f0_override.shape[1]:
                f0 = torch.cat([f0_override.to(f0.dtype), f0[:, f0_override.shape[1] :]], dim=1)
            samples = f0.shape[1] * config.samples_per_frame
            if isinstance(frame_offset, (list, tuple)):
                noise = torch.cat([self.noise(offset * config.samples_per_frame, samples) for offset in frame_offset])
            else:
                noise = self.noise(frame_offset * config.samples_per_frame, samples)
            source, _ = self.source(f0, noise, phase_start)
            if trace is not None:
                trace.update(f0=f0, source=source)
            decoder_mel = mel if finalize else mel[:, :, : -config.f0_lookahead]
            return self.decode(decoder_mel, source, finalize), f0
