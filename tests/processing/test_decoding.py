"""Decoding helpers: text with control tokens stripped, speech codes per row, detokenizer protocol, save_audio."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from fun_audio_chat.processing import SpeechDetokenizer, save_audio
from fun_audio_chat.token2wav.modeling_cosyvoice3 import split_segments

BOS, EOS, AUDIO_BOS, AUDIO_EOS, SIL, IM_END, PAD = 296, 297, 503, 504, 506, 502, 500


def test_decode_text_strips_control_tokens(processor):
    words = processor.tokenizer("It is sunny today.")["input_ids"]
    generated = [AUDIO_BOS, SIL] + words + [SIL, SIL, AUDIO_EOS, IM_END]
    assert processor.decode_text(generated) == "It is sunny today."
    # without skipping specials, the control run around the reply is still removed
    assert processor.decode_text(generated, skip_special_tokens=False) == "It is sunny today."
    # a left-padded batch (tensor) gives one string per row
    batch = torch.tensor([[PAD, PAD] + [AUDIO_BOS] + words + [IM_END], [AUDIO_BOS] + words + [AUDIO_EOS, IM_END, PAD]])
    assert processor.decode_text(batch) == ["It is sunny today."] * 2


def test_decode_text_keeps_tool_tags(processor):
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = processor.tokenizer(text)["input_ids"] + [IM_END]
    assert processor.decode_text(ids) == text


def test_decode_speech_drops_specials_and_stops_at_eos(processor):
    ids = torch.tensor(
        [
            [BOS] * 10 + [5, 6, 7, 8, 9] + [EOS] * 5 + [11, 12],  # codes after EOS are not speech
            [BOS] * 10 + [1, 2, 3, 295, 299] + [299] * 7,  # pad tail
        ]
    )
    assert processor.decode_speech(ids) == [[5, 6, 7, 8, 9], [1, 2, 3, 295]]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    assert processor.decode_speech(ids, speech_attention_mask=mask)[1] == [1, 2]
    assert processor.decode_speech(ids, lengths=[12, 13]) == [[5, 6], [1, 2, 3]]
    assert processor.decode_speech([BOS, 4, 298, 5]) == [[4, 5]]  # a single row; 298 is not a code


def test_speech_detokenizer_protocol():
    class SineVocoder:
        sampling_rate = 24000

        def __call__(self, codes):
            return np.zeros(len(codes) * 960, dtype=np.float32)

    assert isinstance(SineVocoder(), SpeechDetokenizer)
    assert not isinstance(object(), SpeechDetokenizer)


def test_the_native_detokenizer_follows_the_protocol():
    from fun_audio_chat.tiny import tiny_detokenizer

    assert isinstance(tiny_detokenizer(), SpeechDetokenizer)  # usable wherever the protocol is expected


def test_token2wav_segmentation_rule():
    assert split_segments(0) == []
    assert split_segments(100) == [(0, 100)]
    assert split_segments(1500) == [(0, 750), (750, 1500)]
    assert split_segments(1600) == [(0, 750), (750, 1500), (1500, 1600)]
    # last piece of 20 tokens (< 50): merged with the previous 750 and split in half
    assert split_segments(1520) == [(0, 750), (750, 1135), (1135, 1520)]


def test_save_audio_round_trip(tmp_path):
    wave = (0.25 * np.sin(np.linspace(0, 200, 24000))).astype(np.float32)
    path = save_audio(tmp_path / "sub" / "reply.wav", torch.from_numpy(wave), sampling_rate=24000)
    data, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and data.shape == (24000,)
    np.testing.assert_allclose(data, wave, atol=1e-4)
    flac = save_audio(tmp_path / "reply.flac", wave, sampling_rate=24000)
    assert sf.info(flac).format == "FLAC"
