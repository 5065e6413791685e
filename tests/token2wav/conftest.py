"""Shared fixtures for the CosyVoice 3 token-to-waveform tests (oracle cases copied from the official code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cosyvoice3"
OFFICIAL_DIR = FIXTURES / "model"


def load_case(name: str) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    folder = FIXTURES / "cases" / name
    inputs = load_file(str(folder / "inputs.safetensors"))
    outputs = {k: v.float() for k, v in load_file(str(folder / "outputs.safetensors")).items()}
    return inputs, outputs, json.loads((folder / "meta.json").read_text())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="session")
def official_model():
    from fun_audio_chat import CosyVoice3Detokenizer

    model = CosyVoice3Detokenizer.from_pretrained(OFFICIAL_DIR)
    model.ensure_noise()
    return model


@pytest.fixture(scope="session")
def tiny():
    from fun_audio_chat.tiny import tiny_detokenizer

    return tiny_detokenizer()
