"""Shared pieces of the voice tests: speech-like test clips and the tiny cloner (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest

FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "voices"


def voiced_clip(seconds: float, sample_rate: int = 16000, pitch: float = 140.0, seed: int = 0) -> np.ndarray:
    """A closed-form speech-like clip: a harmonic tone at ``pitch`` whose loudness rises and falls four times a
    second (syllables), plus a little noise drawn from ``seed``."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    harmonics = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 8))
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * harmonics * syllables + noise).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_cloner():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("kaldi_native_fbank")
    from fun_audio_chat.voices import tiny_voice_cloner

    return tiny_voice_cloner()


@pytest.fixture(scope="session")
def tiny_detokenizer():
    from fun_audio_chat.tiny import tiny_detokenizer

    return tiny_detokenizer()
