"""The rule "generated speech ids -> real codes": ids from the config and the processor agree (tiny and released
layouts), delay/pad/unused ids are dropped, nothing after speech-EOS, across groups too; bad layouts are refused."""

from __future__ import annotations

import pytest

from fun_audio_chat import FunAudioChatConfig, SpeechCodeFilter, SpeechCodeLayout, real_speech_codes
from fun_audio_chat.tiny import tiny_config, tiny_processor


def test_the_layout_is_read_from_the_config_or_the_processor():
    tiny = SpeechCodeLayout.from_config(tiny_config())
    assert tiny == SpeechCodeLayout(num_codes=296, eos_token_id=297, bos_token_id=296, pad_token_id=299)
    assert SpeechCodeLayout.of(tiny_processor()) == tiny == SpeechCodeLayout.of(tiny_config().audio_config)
    released = SpeechCodeLayout.from_config(FunAudioChatConfig())
    assert (released.num_codes, released.bos_token_id, released.eos_token_id, released.pad_token_id) == (
        6561,
        6561,
        6562,
        6563,
    )


def test_delay_pad_and_unused_ids_are_dropped_and_eos_ends_the_speech():
    layout = SpeechCodeLayout.from_config(tiny_config())
    assert real_speech_codes([296] * 5, layout) == ([], False)  # a delay group: no sound, speech goes on
    assert real_speech_codes([0, 298, 295, 299, 7], layout) == ([0, 295, 7], False)  # 298 is unused, 299 pad
    assert real_speech_codes([3, 4, 297, 5, 6], layout) == ([3, 4], True)
    stream = SpeechCodeFilter(layout)
    groups = [(296,) * 5, (296,) * 5, (1, 2, 3, 4, 5), (6, 299, 299, 299, 299), (297,) * 5, (8, 9, 10, 11, 12)]
    assert [stream(group) for group in groups] == [[], [], [1, 2, 3, 4, 5], [6], [], []]
    assert stream.ended


def test_bad_layouts_and_sources_are_refused():
    with pytest.raises(ValueError, match="lies inside the real codes"):
        SpeechCodeLayout(num_codes=300, eos_token_id=297)
    with pytest.raises(ValueError, match="positive integer"):
        SpeechCodeLayout(num_codes=0, eos_token_id=None)
    with pytest.raises(TypeError, match="pass the FunAudioChatProcessor, the model, its config"):
        SpeechCodeLayout.of("tiny")
