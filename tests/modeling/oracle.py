"""Helpers to read the official-implementation oracle cases in tests/fixtures/oracle."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "oracle"
CASE_MODEL = {"gen_speech_eos_b1": "model_b"}


def checkpoint_dir(case: str) -> Path:
    return ORACLE / CASE_MODEL.get(case, "model_a")


def meta(case: str) -> dict:
    return json.loads((ORACLE / case / "meta.json").read_text())


def inputs(case: str) -> dict[str, torch.Tensor]:
    return load_file(ORACLE / case / "inputs.safetensors")


def outputs(case: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    name = "outputs.safetensors" if variant is None else f"outputs_{variant}.safetensors"
    return load_file(ORACLE / case / name)


def variant_inputs(case: str, variant: str) -> dict[str, torch.Tensor]:
    keys = meta(case)["outputs"][variant]["input_keys"]
    all_inputs = inputs(case)
    return {k: all_inputs[k] for k in keys}


@lru_cache(maxsize=4)
def _load(case_model: str, attn: str):
    from fun_audio_chat import FunAudioChatForConditionalGeneration

    model = FunAudioChatForConditionalGeneration.from_pretrained(ORACLE / case_model, attn_implementation=attn)
    return model.eval()


def load_model(case: str, attn: str = "sdpa"):
    """A fresh-weights model is not needed: our forward/generate keep no state on modules (tested)."""
    return _load(CASE_MODEL.get(case, "model_a"), attn)
