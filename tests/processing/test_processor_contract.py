"""The processor behaviours transformers' own processor test mixin checks for every in-tree processor, written as our
tests: a chat template chosen by the user survives saving, the processor's audio defaults are the feature
extractor's settings, and sub-processors' init-time defaults reach their calls."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fun_audio_chat.processing import CHAT_TEMPLATE, FunAudioChatProcessor

from .conftest import noise

PROMPT = "<|im_start|>user\n<|AUDIO|><|im_end|>\n<|im_start|>assistant\n"


def _reload(processor, folder):
    processor.save_pretrained(str(folder))
    return FunAudioChatProcessor.from_pretrained(str(folder))


def test_a_chat_template_set_by_the_user_survives_saving(processor, tmp_path):
    processor.chat_template = "{{ messages[0]['content'] }}"
    reloaded = _reload(processor, tmp_path / "single")
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.tokenizer.chat_template == processor.chat_template
    assert json.loads((tmp_path / "single" / "processor_config.json").read_text())["keep_chat_template"] is True

    processor.chat_template = {"default": "a", "secondary": "b"}
    assert _reload(processor, tmp_path / "named").chat_template == {"default": "a", "secondary": "b"}


def test_the_built_in_template_saves_without_the_flag(processor, tmp_path):
    reloaded = _reload(processor, tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert "keep_chat_template" not in json.loads((tmp_path / "processor_config.json").read_text())


def test_audio_defaults_are_the_feature_extractor_settings(processor):
    """``feature_extractor(clip, **merged audio kwargs)`` equals ``processor(audio=clip)`` (30 s window, official)."""
    clip = noise(1100, seed=1)
    merged = processor._merge_kwargs(
        processor.valid_processor_kwargs, tokenizer_init_kwargs=processor.tokenizer.init_kwargs, return_tensors="pt"
    )["audio_kwargs"]
    direct = processor.feature_extractor(clip, sampling_rate=16000, **merged)
    ours = processor(audio=clip, **merged)
    assert ours["input_features"].shape == direct["input_features"].shape == (1, 128, 3000)
    torch.testing.assert_close(ours["input_features"], direct["input_features"])
    assert ours["feature_attention_mask"].sum() == math.ceil(1100 / 160)


def test_longest_padding_keeps_the_same_valid_frames(processor):
    clips = [noise(20000, seed=2), noise(9000, seed=3)]
    windowed = processor(text=[PROMPT, PROMPT], audio=clips, sampling_rate=16000, return_tensors="np")
    compact = processor(
        text=[PROMPT, PROMPT],
        audio=clips,
        sampling_rate=16000,
        return_tensors="np",
        audio_kwargs={"padding": "longest"},
    )
    assert windowed["input_features"].shape[-1] == 3000
    assert compact["input_features"].shape[-1] == math.ceil(20000 / 160)
    for row, clip in enumerate(clips):
        valid = math.ceil(len(clip) / 160)
        np.testing.assert_array_equal(
            compact["input_features"][row, :, :valid], windowed["input_features"][row, :, :valid]
        )
    np.testing.assert_array_equal(compact["feature_attention_mask"].sum(-1), windowed["feature_attention_mask"].sum(-1))
    with pytest.raises(ValueError, match='audio padding=False is not supported.*"longest"'):
        processor(text=PROMPT, audio=clips[0], sampling_rate=16000, audio_kwargs={"padding": False})


def test_tokenizer_init_defaults_reach_the_text(processor, tmp_path):
    """A tokenizer built with ``padding="max_length", max_length=N`` pads the processor's text to N, as transformers'
    ``_merge_kwargs`` does for every in-tree processor; call-time arguments still win."""
    from transformers import AutoTokenizer

    processor.tokenizer.save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), padding="max_length", max_length=300)
    custom = FunAudioChatProcessor(processor.feature_extractor, tokenizer, processor.speech_tokenizer)
    clip = noise(16000, seed=4)
    inputs = custom(text=PROMPT, audio=clip, sampling_rate=16000, return_tensors="pt")
    assert inputs["input_ids"].shape[-1] == 300
    assert int(inputs["attention_mask"].sum()) < 300
    assert inputs["input_ids"][0, 0] == processor.text_pad_token_id  # still left padding
    shorter = custom(text=PROMPT, audio=clip, sampling_rate=16000, return_tensors="pt", max_length=120)
    assert shorter["input_ids"].shape[-1] == 120


def test_audio_defaults_only_say_what_the_feature_extractor_does_not(processor):
    """The processor's own audio defaults differ from the feature extractor's (the rest comes from it), and its
    frame mask is the feature extractor's, under the official name ``feature_attention_mask``."""
    import inspect

    call_defaults = inspect.signature(processor.feature_extractor.__call__).parameters
    for name, value in processor.audio_kwargs.items():
        assert name not in call_defaults or call_defaults[name].default != value, name
    clip = noise(5000, seed=6)
    direct = processor.feature_extractor(clip, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
    ours = processor(audio=clip, sampling_rate=16000, return_tensors="np")
    np.testing.assert_array_equal(ours["feature_attention_mask"], direct["attention_mask"])
