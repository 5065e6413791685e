"""The two features of a voice prompt against independent references: the prompt mel against librosa (a fixture
made outside this project, see tests/fixtures/voices/make_prompt_mel_reference.py) and the speaker fbank against a
direct numpy rendering of Kaldi's fbank with torchaudio's defaults (what the official frontend calls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fun_audio_chat.voices import COSYVOICE3_MEL, MelSettings, prompt_mel

from .conftest import FIXTURES, voiced_clip


def test_prompt_mel_equals_the_librosa_reference():
    from safetensors.numpy import load_file

    reference = load_file(str(FIXTURES / "prompt_mel_reference.safetensors"))
    ours = prompt_mel(reference["signal"]).numpy()
    assert ours.shape == reference["mel"].shape == (30, 80)  # 0.6 s at 24 kHz: 14400 / 480 frames
    # float32 STFT vs the float64 reference: equal to 1e-3 relative (a wrong setting moves bins by > 0.5)
    np.testing.assert_allclose(ours, reference["mel"], rtol=1e-3, atol=1e-4)


def test_prompt_mel_uses_cosyvoice3_settings_and_fmax_matters():
    assert (COSYVOICE3_MEL.sample_rate, COSYVOICE3_MEL.n_fft, COSYVOICE3_MEL.hop_length) == (24000, 1920, 480)
    assert COSYVOICE3_MEL.fmax is None and COSYVOICE3_MEL.num_mels == 80
    clip = voiced_clip(1.0, 24000)
    full_band = prompt_mel(clip)
    assert full_band.shape == (50, 80) and full_band.dtype == torch.float32
    # CosyVoice 2's fmax 8000 would put every bin elsewhere: the difference is large, not rounding
    assert (prompt_mel(clip, MelSettings(fmax=8000)) - full_band).abs().max() > 0.5


def test_prompt_mel_refuses_audio_shorter_than_its_padding():
    with pytest.raises(ValueError, match="too short"):
        prompt_mel(np.zeros(100, dtype=np.float32))


def _kaldi_fbank_reference(waveform: np.ndarray, bins: int = 80, rate: int = 16000) -> np.ndarray:
    """Kaldi's fbank with torchaudio.compliance.kaldi.fbank's defaults and dither 0, in plain numpy (float64)."""
    length, shift, fft = 400, 160, 512
    count = 1 + (len(waveform) - length) // shift
    frames = np.stack([waveform[i * shift : i * shift + length] for i in range(count)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    emphasized = frames.copy()
    emphasized[:, 1:] -= 0.97 * frames[:, :-1]
    emphasized[:, 0] -= 0.97 * frames[:, 0]
    n = np.arange(length)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))) ** 0.85
    power = np.abs(np.fft.rfft(emphasized * povey, n=fft, axis=1)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(rate / 2)
    delta = (high - low) / (bins + 1)
    fft_mels = mel(np.arange(fft // 2) * rate / fft)
    weights = np.zeros((bins, fft // 2))
    for b in range(bins):
        left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        rising = (fft_mels - left) / (center - left)
        falling = (right - fft_mels) / (right - center)
        weights[b] = np.where((fft_mels > left) & (fft_mels < right), np.minimum(rising, falling), 0.0)
    energies = power[:, : fft // 2] @ weights.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def test_speaker_fbank_is_kaldis_fbank_minus_its_mean():
    pytest.importorskip("kaldi_native_fbank")
    from fun_audio_chat.voices import speaker_fbank

    clip = voiced_clip(1.0, 16000)
    ours = speaker_fbank(clip)
    reference = _kaldi_fbank_reference(clip)
    reference -= reference.mean(axis=0, keepdims=True)
    assert ours.shape == reference.shape == (1 + (16000 - 400) // 160, 80)
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    assert np.abs(ours.mean(axis=0)).max() < 1e-4


def test_speaker_fbank_has_no_dither_and_ignores_loudness():
    pytest.importorskip("kaldi_native_fbank")
    from fun_audio_chat.voices import speaker_fbank

    clip = voiced_clip(0.5, 16000)
    np.testing.assert_array_equal(speaker_fbank(clip), speaker_fbank(clip))  # kaldi-native-fbank dithers by default
    # a gain is a constant added to every log-mel frame, which the mean normalisation removes
    np.testing.assert_allclose(speaker_fbank(clip * 0.25), speaker_fbank(clip), atol=2e-3)
