"""processor(...) takes transformers' processor keyword arguments (flat or per modality), and the audio of a
conversation is found by a public method that apply_chat_template and the training collator share."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import noise, tone

PROMPTS = ["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\nhello there friend<|im_end|>\n"]


def _first_token_is_padding(batch, row: int) -> bool:
    return batch["attention_mask"][row][0] == 0


def test_left_padding_is_the_default_and_both_argument_styles_change_it(processor):
    left = processor(text=PROMPTS)
    assert _first_token_is_padding(left, 0) and not _first_token_is_padding(left, 1)
    for kwargs in ({"padding_side": "right"}, {"text_kwargs": {"padding_side": "right"}}):
        right = processor(text=PROMPTS, **kwargs)
        assert right["attention_mask"][0][-1] == 0 and not _first_token_is_padding(right, 0), kwargs
        assert sorted(right["input_ids"][0]) == sorted(left["input_ids"][0])


def test_sampling_rate_flat_or_in_audio_kwargs_resamples_the_same_way(processor):
    clip = noise(8000)
    flat = processor(text="<|AUDIO|>", audio=clip, sampling_rate=8000, return_tensors="np")
    nested = processor(text="<|AUDIO|>", audio=clip, audio_kwargs={"sampling_rate": 8000}, return_tensors="np")
    assert flat["input_features"].shape == nested["input_features"].shape
    np.testing.assert_array_equal(flat["input_features"], nested["input_features"])
    # 8000 samples at 8 kHz last one second: 25 speech frames
    assert int(flat["speech_attention_mask"].sum()) == 25
    with pytest.raises(ValueError, match="passed two times"):
        processor(text="<|AUDIO|>", audio=clip, sampling_rate=8000, audio_kwargs={"sampling_rate": 8000})


def test_tokenizer_arguments_reach_the_tokenizer(processor):
    batch = processor(text=PROMPTS, max_length=4, truncation=True, return_tensors="np")
    assert batch["input_ids"].shape == (2, 4)
    assert processor(text=PROMPTS[0], return_tensors="pt")["input_ids"].dtype.is_floating_point is False


def test_unknown_argument_is_reported_and_ignored(processor):
    from transformers.testing_utils import CaptureLogger, LoggingLevel
    from transformers.utils import logging

    logger = logging.get_logger("transformers.processing_utils")
    # An earlier in-process test (the CLI's) may have lowered transformers' verbosity; the warning is what is tested.
    with LoggingLevel(logging.WARNING), CaptureLogger(logger) as captured:
        batch = processor(text=PROMPTS[0], samplingrate_misspelled=16000)
    assert "samplingrate_misspelled" in captured.out and "not a valid argument" in captured.out
    assert batch["input_ids"] == processor(text=PROMPTS[0])["input_ids"]


def test_call_has_no_image_or_video_parameters(processor):
    import inspect

    assert set(inspect.signature(type(processor).__call__).parameters) == {"self", "text", "audio", "kwargs"}
    # apply_chat_template passes images=None / videos=None; they are accepted as transformers' modality keywords
    assert processor(text=PROMPTS[0], images=None, videos=None)["input_ids"] == processor(text=PROMPTS[0])["input_ids"]


def test_audios_in_conversation_follows_the_placeholders(processor):
    first, second, reply = tone(0.5), tone(1.0, freq=220.0), tone(0.3)
    conversation = [
        {"role": "system", "content": [{"type": "audio", "audio": reply, "sampling_rate": 16000}]},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": first, "sampling_rate": 16000},
                {"type": "text", "text": "and"},
                {"type": "audio", "audio": second[::2], "sampling_rate": 8000},
            ],
        },
        {"role": "assistant", "content": [{"type": "audio", "audio": reply, "sampling_rate": 16000}]},
        {"role": "user", "content": "plain text"},
    ]
    waveforms = processor.audios_in_conversation(conversation)
    assert [len(w) for w in waveforms] == [8000, 16000]  # the system prompt's and the reply's audio are history text
    np.testing.assert_array_equal(waveforms[0], first)
    # a batch gives one flat list, numbered across the batch in error messages
    assert len(processor.audios_in_conversation([conversation, conversation])) == 4
    broken = [
        conversation,
        [{"role": "user", "content": [{"type": "audio", "audio": np.zeros(0, np.float32), "sampling_rate": 16000}]}],
    ]
    from fun_audio_chat.processing import AudioInputError

    with pytest.raises(AudioInputError, match="audio 2: audio is empty"):
        processor.audios_in_conversation(broken)

    # apply_chat_template loads exactly these, in this order
    rendered = processor.apply_chat_template(conversation[1:3], tokenize=True, return_dict=True, return_tensors="np")
    manual = processor.extract_features(waveforms, max_length=30 * 16000)
    np.testing.assert_array_equal(rendered["input_features"], manual["input_features"])


def test_audio_items_follow_the_loading_policy(processor, tmp_path):
    import soundfile as sf

    from fun_audio_chat.processing import AudioInputError, AudioLoadingPolicy

    path = tmp_path / "clip.wav"
    sf.write(path, tone(0.5), 16000)
    conversation = [{"role": "user", "content": [{"type": "audio", "path": str(path)}]}]
    assert len(processor.audios_in_conversation(conversation)[0]) == 8000
    processor.audio_loading_policy = AudioLoadingPolicy.in_memory_only()
    with pytest.raises(AudioInputError, match="local"):
        processor.audios_in_conversation(conversation)


def test_save_pretrained_to_a_path_object_writes_the_vocabulary_files(processor, tmp_path):
    """The released tokenizer ships vocab.json and merges.txt next to tokenizer.json; a pathlib.Path target too."""
    processor.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "vocab.json").is_file() and (tmp_path / "saved" / "merges.txt").is_file()
