"""Shared helpers for the processing tests (tiny processor, synthetic audio, oracle access)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORACLE = FIXTURES / "oracle"
PROCESSOR_FIXTURE = FIXTURES / "processor"


def tone(seconds: float, sampling_rate: int = 16000, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine (deterministic)."""
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def noise(num_samples: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(num_samples) * scale).astype(np.float32)


def load_oracle(case: str, name: str = "inputs.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(ORACLE / case / name))


@pytest.fixture
def processor():
    from fun_audio_chat.tiny import tiny_processor

    return tiny_processor()


@pytest.fixture(scope="session")
def oracle_model_a():
    """The oracle's tiny model A (the model is part of the package: a failing import is an error, never a skip)."""
    from fun_audio_chat import FunAudioChatForConditionalGeneration

    model = FunAudioChatForConditionalGeneration.from_pretrained(str(ORACLE / "model_a"))
    model.eval()
    return model
