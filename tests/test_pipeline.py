"""transformers' ``pipeline("any-to-any")`` on a Fun-Audio-Chat folder: text and spoken replies, as a user writes it.

The folder holds the tiny built-in model, its processor and a tiny detokenizer in ``token2wav/`` (what
``save_pretrained`` of each writes); the pipeline gets nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

from fun_audio_chat import FunAudioChatProcessor
from fun_audio_chat.processing import speech_ids_to_codes
from fun_audio_chat.tiny import TINY_SPEECH_CODES, tiny_detokenizer, tiny_model_and_processor

MAX_NEW_TOKENS = 8
# Greedy text and speech; the tiny random model is made to open its reply with <|audio_bos|> so that it speaks.
GENERATE = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "speech_do_sample": False, "force_audio_bos": True}


def _question(seed: int = 0) -> list[dict]:
    clip = (np.random.default_rng(seed).standard_normal(12000) * 0.1).astype(np.float32)
    return [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": clip, "sampling_rate": 16000}, {"type": "text", "text": "hello"}],
        }
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fun_audio_chat_folder")
    model, processor = tiny_model_and_processor(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tiny_detokenizer(seed=1).save_pretrained(folder / "token2wav")
    return folder


@pytest.fixture(scope="module")
def reference(folder):
    """What the same model, processor and detokenizer give when called by hand (greedy decoding)."""
    from fun_audio_chat import FunAudioChatForConditionalGeneration

    model = FunAudioChatForConditionalGeneration.from_pretrained(folder).eval()
    processor = FunAudioChatProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(
        _question(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        sequences, speech_ids = model.generate(**inputs, **GENERATE)
    prompt_length = inputs["input_ids"].shape[1]
    text = processor.tokenizer.decode(sequences[0, prompt_length:], skip_special_tokens=True)
    codes = speech_ids_to_codes(speech_ids, TINY_SPEECH_CODES, eos_token_id=processor.speech_eos_token_id)[0]
    return {"text": text, "codes": codes, "detokenizer": processor.detokenizer}


def test_text_reply(folder, reference):
    chat = pipeline("any-to-any", model=str(folder))
    out = chat(text=_question(), generate_kwargs=dict(GENERATE), return_full_text=False)
    assert out[0]["generated_text"] == reference["text"]


def test_spoken_reply_uses_the_folder_detokenizer(folder, reference):
    chat = pipeline("any-to-any", model=str(folder))
    assert chat.model.output_modalities == ("text", "audio")
    out = chat(text=_question(), generation_mode="audio", generate_kwargs=dict(GENERATE))
    audio = out[0]["generated_audio"]
    assert reference["codes"], "the tiny model should speak within a few steps"
    with torch.inference_mode():
        expected = reference["detokenizer"](reference["codes"]).numpy()
    assert audio.dtype == np.float32 and audio.ndim == 1
    np.testing.assert_allclose(audio, expected, atol=1e-6)


def test_a_detokenizer_passed_in_is_used(folder, reference):
    other = tiny_detokenizer(seed=7)
    processor = FunAudioChatProcessor.from_pretrained(folder, detokenizer=other)
    chat = pipeline("any-to-any", model=str(folder), processor=processor)
    out = chat(text=_question(), generation_mode="audio", generate_kwargs=dict(GENERATE))
    with torch.inference_mode():
        expected = other(reference["codes"]).numpy()
    np.testing.assert_allclose(out[0]["generated_audio"], expected, atol=1e-6)


def test_a_folder_without_detokenizer_names_the_fix(tmp_path):
    model, processor = tiny_model_and_processor(seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    chat = pipeline("any-to-any", model=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs a detokenizer.*token2wav"):
        chat(text=_question(), generation_mode="audio", generate_kwargs=dict(GENERATE))


def test_a_text_only_model_refuses_audio_replies(tmp_path):
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config, tiny_processor

    FunAudioChatForConditionalGeneration(
        tiny_config(audio_config={"enable_audio_invert_tower": False})
    ).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    chat = pipeline("any-to-any", model=str(tmp_path))
    assert chat.model.output_modalities == ("text",)
    with pytest.raises(ValueError, match="can only output the following modalities"):
        chat(text=_question(), generation_mode="audio")


def test_processor_saves_and_reloads_its_detokenizer(tmp_path):
    processor = FunAudioChatProcessor.from_pretrained(
        _save_processor(tmp_path / "a"), detokenizer=tiny_detokenizer(seed=2)
    )
    processor.save_pretrained(tmp_path / "b")
    reloaded = FunAudioChatProcessor.from_pretrained(tmp_path / "b")
    assert reloaded._detokenizer is None  # found, loaded on first use
    codes = list(range(12))
    with torch.inference_mode():
        assert torch.equal(reloaded.detokenizer(codes), processor.detokenizer(codes))


def _save_processor(folder):
    from fun_audio_chat.tiny import tiny_processor

    tiny_processor().save_pretrained(folder)
    return folder


def test_model_card_declares_the_pipeline_task():
    from fun_audio_chat.hub import model_card_text

    card = model_card_text("me/my-model")
    assert "\npipeline_tag: any-to-any\n" in card
    assert 'pipeline("any-to-any", model="me/my-model")' in card
