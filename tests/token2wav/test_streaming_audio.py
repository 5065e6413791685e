"""SpeechAudioStreamer: audio chunks interleaved with generation events, equal to a push/finish session fed the
real codes only."""

from __future__ import annotations

import pytest
import torch

from fun_audio_chat import EndEvent, FunAudioChatIteratorStreamer, SpeechEvent, TextEvent
from fun_audio_chat.speech_codes import SpeechCodeLayout
from fun_audio_chat.tiny import TINY_SPEECH_CODES, tiny_config
from fun_audio_chat.token2wav import AudioEvent, SpeechAudioStreamer

LAYOUT = SpeechCodeLayout.from_config(tiny_config())
BOS, EOS, PAD = LAYOUT.bos_token_id, LAYOUT.eos_token_id, LAYOUT.pad_token_id


def _groups(n_groups: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, TINY_SPEECH_CODES, (n_groups * 5,), generator=generator).tolist()
    return [tuple(codes[i : i + 5]) for i in range(0, len(codes), 5)]


def test_audio_events_follow_speech_groups_per_row(tiny):
    rows = {0: _groups(8, 0), 1: _groups(5, 1)}
    streamer = FunAudioChatIteratorStreamer()
    for step in range(8):
        streamer.queue.put(TextEvent(row=0, token_id=step, text=None))
        for row, groups in rows.items():
            if step < len(groups):
                streamer.queue.put(SpeechEvent(row=row, codes=groups[step]))
    streamer.end()
    events = list(SpeechAudioStreamer(streamer, tiny, LAYOUT))
    assert sum(isinstance(e, TextEvent) for e in events) == 8 and sum(isinstance(e, SpeechEvent) for e in events) == 13
    for row, groups in rows.items():
        audio = [e for e in events if isinstance(e, AudioEvent) and e.row == row]
        assert audio[-1].final and all(not e.final for e in audio[:-1])
        session = tiny.streaming_session()
        expected = torch.cat([session.push(list(g)) for g in groups] + [session.finish()])
        assert torch.equal(torch.cat([e.audio for e in audio]), expected)
        assert expected.shape == (len(groups) * 5 * 960,)
    # row 0's first chunk arrives right after the speech group that completed 15 + 3 codes (the 4th group)
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioEvent) and e.row == 0)
    speech_before = [e for e in events[:first_audio] if isinstance(e, SpeechEvent) and e.row == 0]
    assert len(speech_before) == 4


def test_end_event_is_passed_after_the_tails(tiny):
    events = list(
        SpeechAudioStreamer([SpeechEvent(row=0, codes=(1, 2, 3, 4, 5)), EndEvent()], tiny, LAYOUT, chunked=True)
    )
    assert isinstance(events[0], SpeechEvent) and isinstance(events[1], AudioEvent) and events[1].final
    assert events[1].audio.shape == (5 * 960,) and isinstance(events[2], EndEvent)


def test_delay_pad_and_eos_ids_never_reach_the_detokenizer(tiny):
    """A spoken reply as a fitted model writes it: two groups of speech-BOS delay ids, codes, a pad tail, then
    speech-EOS (and anything after it) — only the codes are voiced."""
    codes = _groups(5, 7)
    raw = [(BOS,) * 5, (BOS,) * 5, *codes[:4], codes[4][:2] + (PAD,) * 3, (EOS,) * 5, (1, 2, 3, 4, 5)]
    events = list(SpeechAudioStreamer([SpeechEvent(row=0, codes=group) for group in raw], tiny, LAYOUT))
    audio = torch.cat([e.audio for e in events if isinstance(e, AudioEvent)])
    real = [c for group in codes[:4] for c in group] + list(codes[4][:2])
    session = tiny.streaming_session()
    assert torch.equal(audio, torch.cat([session.push(real), session.finish()]))
    assert audio.shape == (len(real) * 960,)
    # a row that only wrote delay ids still ends with a (silent) final event
    events = list(SpeechAudioStreamer([SpeechEvent(row=2, codes=(BOS,) * 5), EndEvent()], tiny, LAYOUT))
    assert [type(e) for e in events] == [SpeechEvent, AudioEvent, EndEvent] and events[1].final
    assert events[1].audio.numel() == 0


def test_the_layout_comes_from_the_processor_or_model():
    from fun_audio_chat.tiny import tiny_processor

    assert SpeechCodeLayout.of(tiny_processor()) == LAYOUT
    with pytest.raises(TypeError, match="pass the FunAudioChatProcessor, the model, its config"):
        SpeechAudioStreamer([], None, torch.zeros(1, 192))  # the old positional speaker embedding
