"""The trainers' one way to the model inside its wrappers (DataParallel/DDP-style containers, torch.compile, PEFT)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from fun_audio_chat.tiny import tiny_model_and_processor
from fun_audio_chat.trainers.unwrapping import unwrap_model


def test_unwrap_model_reaches_the_fun_audio_chat_model_or_stops_at_the_peft_model():
    model, _ = tiny_model_and_processor(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = torch.compile(torch.nn.DataParallel(peft_model))  # the order accelerate wraps in
    assert unwrap_model(wrapped) is model
    assert unwrap_model(wrapped, through_peft=False) is peft_model
    assert unwrap_model(model) is model
