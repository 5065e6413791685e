"""SpeechAudioStreamer: audio chunks interleaved with generation events, equal to a push/finish session."""

from __future__ import annotations

import torch

from fun_audio_chat import EndEvent, FunAudioChatIteratorStreamer, SpeechEvent, TextEvent
from fun_audio_chat.token2wav import AudioEvent, SpeechAudioStreamer


def _groups(n_groups: int, seed: int):
    codes = torch.randint(0, 6561, (n_groups * 5,), generator=torch.Generator().manual_seed(seed)).tolist()
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
    events = list(SpeechAudioStreamer(streamer, tiny))
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
    events = list(SpeechAudioStreamer([SpeechEvent(row=0, codes=(1, 2, 3, 4, 5)), EndEvent()], tiny, chunked=True))
    assert isinstance(events[0], SpeechEvent) and isinstance(events[1], AudioEvent) and events[1].final
    assert events[1].audio.shape == (5 * 960,) and isinstance(events[2], EndEvent)
