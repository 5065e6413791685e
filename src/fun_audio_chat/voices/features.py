"""The two spectral features a CosyVoice 3 voice prompt needs, computed as the official frontend computes them.

* :func:`prompt_mel` — the prompt mel the flow is conditioned on: CosyVoice 3's own feature extractor
  (``feat_extractor`` of ``cosyvoice3.yaml``: Matcha-TTS' ``mel_spectrogram`` with n_fft 1920, hop 480, window 1920,
  80 mel bins, fmin 0, **fmax null = Nyquist (12 kHz)**, ``center=False``) on 24 kHz audio. CosyVoice 2's yaml
  uses fmax 8000; CosyVoice 3's does not (its own TensorRT runtime says so too), and a prompt mel made with the
  wrong fmax puts every bin at another frequency than the flow was trained on.
  The recipe: reflect-pad (n_fft - hop) / 2 = 720 samples on both sides, a periodic Hann STFT without centering,
  magnitude ``sqrt(re² + im² + 1e-9)``, librosa's Slaney mel filters (area-normalised, Slaney mel scale; built here
  by transformers' ``mel_filter_bank``, which reproduces librosa), natural log of ``max(x, 1e-5)``.
  One frame per 480 samples: 50 frames per second, two per 25 Hz speech code.
* :func:`speaker_fbank` — the input of the CAM++ speaker encoder: Kaldi's 80-bin log-mel filterbank at 16 kHz with
  dither 0 (the official frontend calls ``torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0)``), minus its
  mean over time. Computed by ``kaldi-native-fbank`` (torchaudio cannot load next to torch >= 2.12) with Kaldi's
  defaults, which are torchaudio's: 25 ms Povey windows every 10 ms, pre-emphasis 0.97, DC removal, power spectrum,
  mel bins 20 Hz to Nyquist, log floored at float32 epsilon, edges snipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PROMPT_SAMPLE_RATE = 24000
# The CAM++ speaker encoder's own input rate (its Kaldi fbank: 400-sample windows every 160 samples), a fact of that
# model rather than of the chat model's audio input, though CosyVoice chose the same 16 kHz for both.
SPEAKER_SAMPLE_RATE = 16000
SPEAKER_FBANK_BINS = 80


@dataclass(frozen=True)
class MelSettings:
    """A Matcha-TTS style log-mel spectrogram (``feat_extractor`` of a CosyVoice yaml)."""

    sample_rate: int = PROMPT_SAMPLE_RATE
    n_fft: int = 1920
    hop_length: int = 480
    win_length: int = 1920
    num_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None  # None = Nyquist, as CosyVoice 3's yaml says (``fmax: null``)
    log_floor: float = 1e-5
    magnitude_epsilon: float = 1e-9


COSYVOICE3_MEL = MelSettings()


@lru_cache(maxsize=4)
def _mel_filters(settings: MelSettings) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=settings.n_fft // 2 + 1,
        num_mel_filters=settings.num_mels,
        min_frequency=settings.fmin,
        max_frequency=settings.fmax if settings.fmax is not None else settings.sample_rate / 2,
        sampling_rate=settings.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(np.ascontiguousarray(filters.T, dtype=np.float32))  # (num_mels, n_fft // 2 + 1)


def prompt_mel(waveform: np.ndarray | torch.Tensor, settings: MelSettings = COSYVOICE3_MEL) -> torch.Tensor:
    """Log-mel frames ``(T, num_mels)`` float32 of a mono waveform at ``settings.sample_rate`` (24 kHz), one frame
    per ``hop_length`` samples (``T = len(waveform) // hop_length`` for the CosyVoice 3 settings)."""
    samples = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).reshape(-1)
    padding = (settings.n_fft - settings.hop_length) // 2
    if samples.numel() <= padding:
        raise ValueError(
            f"audio of {samples.numel()} samples is too short for a mel spectrogram (needs more than {padding})."
        )
    padded = torch.nn.functional.pad(samples[None, None], (padding, padding), mode="reflect")[0, 0]
    window = torch.hann_window(settings.win_length, periodic=True, dtype=torch.float32)
    spectrum = torch.stft(
        padded,
        settings.n_fft,
        hop_length=settings.hop_length,
        win_length=settings.win_length,
        window=window,
        center=False,
        return_complex=True,
    )
    magnitude = torch.sqrt(spectrum.real.square() + spectrum.imag.square() + settings.magnitude_epsilon)
    mel = _mel_filters(settings) @ magnitude
    return torch.log(torch.clamp(mel, min=settings.log_floor)).T.contiguous()


def speaker_fbank(waveform: np.ndarray | torch.Tensor, sample_rate: int = SPEAKER_SAMPLE_RATE) -> np.ndarray:
    """Mean-normalised Kaldi log-mel filterbank ``(T, 80)`` float32 of a mono waveform in [-1, 1] at 16 kHz: the
    input of CosyVoice's CAM++ speaker encoder. ``T = 1 + (len - 400) // 160`` (25 ms windows every 10 ms)."""
    try:
        import kaldi_native_fbank as knf
    except ImportError as err:
        raise ImportError(
            "Speaker embeddings need the optional `kaldi-native-fbank` package (Kaldi's fbank, the speaker encoder's "
            'input): pip install "fun-audio-chat[voice-cloning]".'
        ) from err
    samples = np.ascontiguousarray(np.asarray(waveform, dtype=np.float32).reshape(-1))
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = float(sample_rate)
    options.frame_opts.dither = 0.0  # kaldi-native-fbank's default adds noise; the official frontend asks for none
    options.mel_opts.num_bins = SPEAKER_FBANK_BINS
    computer = knf.OnlineFbank(options)
    computer.accept_waveform(float(sample_rate), samples.tolist())
    computer.input_finished()
    if computer.num_frames_ready == 0:
        raise ValueError(f"audio of {samples.size} samples is shorter than one 25 ms fbank window.")
    frames = np.stack([computer.get_frame(index) for index in range(computer.num_frames_ready)]).astype(np.float32)
    return frames - frames.mean(axis=0, keepdims=True)


__all__ = [
    "COSYVOICE3_MEL",
    "PROMPT_SAMPLE_RATE",
    "SPEAKER_FBANK_BINS",
    "SPEAKER_SAMPLE_RATE",
    "MelSettings",
    "prompt_mel",
    "speaker_fbank",
]
