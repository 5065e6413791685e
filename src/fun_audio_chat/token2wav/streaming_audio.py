"""Audio while the model is still talking: a companion for ``FunAudioChatIteratorStreamer``.

:class:`SpeechAudioStreamer` wraps any iterable of generation events (``TextEvent``/``SpeechEvent``, optionally a
final ``EndEvent``), passes every event through, and after a ``SpeechEvent`` adds an :class:`AudioEvent` as soon
as the detokenizer's streaming session has new samples for that row. A ``SpeechEvent`` carries the raw group the
Speech Refined Head wrote; only its real codes reach the detokenizer (speech-BOS delay ids and pad dropped, nothing
after speech-EOS: :mod:`fun_audio_chat.speech_codes`, with the ids of the processor or model given as
``speech_codes``). When the events end, each row's session is finished and its tail comes out as a last
``AudioEvent(final=True)``. Example::

    streamer = FunAudioChatIteratorStreamer(processor.tokenizer)
    Thread(target=model.generate, kwargs={**inputs, "streamer": streamer}).start()
    for event in SpeechAudioStreamer(streamer, detokenizer, processor):
        if isinstance(event, AudioEvent):
            play(event.audio, event.sample_rate)

For one conversation turn with text, codes, audio and timings in one place, see
:class:`fun_audio_chat.VoiceChat`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..speech_codes import SpeechCodeFilter, SpeechCodeLayout


@dataclass(frozen=True)
class AudioEvent:
    row: int
    audio: torch.Tensor  # new 1-D float32 samples
    sample_rate: int
    final: bool = False  # the row's last piece


class SpeechAudioStreamer:
    """Pass generation events through and interleave :class:`AudioEvent`s rendered from the speech groups.

    Args:
        events: an iterable of events, e.g. a ``FunAudioChatIteratorStreamer``.
        detokenizer: a :class:`~fun_audio_chat.CosyVoice3Detokenizer`.
        speech_codes: where the speech ids come from: the ``FunAudioChatProcessor``, the model, its config or a
            :class:`~fun_audio_chat.speech_codes.SpeechCodeLayout` (tells real codes from BOS/EOS/pad ids).
        speaker_embedding: optional (1, 192) speaker for every row.
        chunked: use the cached chunk-causal stream (faster) instead of the official web-demo schedule.
    """

    def __init__(self, events: Iterable, detokenizer, speech_codes, speaker_embedding=None, chunked: bool = False):
        self.events = events
        self.detokenizer = detokenizer
        self.layout = SpeechCodeLayout.of(speech_codes)
        self.speaker_embedding = speaker_embedding
        self.chunked = chunked
        self.sessions: dict[int, object] = {}
        self.filters: dict[int, SpeechCodeFilter] = {}

    def _session(self, row: int):
        if row not in self.sessions:
            self.sessions[row] = self.detokenizer.streaming_session(self.speaker_embedding, chunked=self.chunked)
        return self.sessions[row]

    def _real_codes(self, row: int, group) -> list[int]:
        if row not in self.filters:
            self.filters[row] = SpeechCodeFilter(self.layout)
        return self.filters[row](group)

    def _finish(self) -> Iterator[AudioEvent]:
        for row in sorted(self.sessions):
            tail = self.sessions[row].finish()
            yield AudioEvent(row=row, audio=tail, sample_rate=self.detokenizer.sample_rate, final=True)
        self.sessions, self.filters = {}, {}

    def __iter__(self) -> Iterator:
        from ..modeling.streamers import EndEvent, SpeechEvent

        for event in self.events:
            if isinstance(event, EndEvent):
                yield from self._finish()
                yield event
                return
            yield event
            if isinstance(event, SpeechEvent):
                codes = self._real_codes(event.row, event.codes)
                session = self._session(event.row)  # a row that spoke only delay ids still gets its final event
                audio = session.push(codes) if codes else None
                if audio is not None and audio.numel():
                    yield AudioEvent(row=event.row, audio=audio, sample_rate=self.detokenizer.sample_rate)
        yield from self._finish()


__all__ = ["AudioEvent", "SpeechAudioStreamer"]
