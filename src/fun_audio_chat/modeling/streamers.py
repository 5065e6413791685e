"""Streaming text and speech out of ``generate()``.

``generate(streamer=...)`` calls ``streamer.put(text_tokens)`` once per step (B text ids; the first call carries
the prompt, as in transformers) and, when the streamer has it, ``streamer.put_speech(codes, rows)`` with that
step's (n, k) speech group of each speaking row — on the step it is decoded, not at the end.
:class:`FunAudioChatIteratorStreamer` turns these calls into typed events for a consumer in another thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from queue import Queue

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class TextEvent:
    row: int
    token_id: int
    text: str | None  # newly printable text of this row (None without a tokenizer)


@dataclass(frozen=True)
class SpeechEvent:
    """One step's group of k speech ids of a row, as the Speech Refined Head wrote it: besides 25 Hz codes it may
    hold speech-BOS delay ids, pad and speech-EOS. Voice only its real codes
    (:func:`fun_audio_chat.speech_codes.real_speech_codes`; ``SpeechAudioStreamer`` and ``VoiceChat`` do)."""

    row: int
    codes: tuple[int, ...]


@dataclass(frozen=True)
class EndEvent:
    """The last event; ``error`` is set when ``generate()`` failed (iterating re-raises it)."""

    error: BaseException | None = None


class GenerationFailedError(RuntimeError):
    """Raised in a streamer's consumer when the ``generate()`` call feeding it failed; ``__cause__`` is why."""


class FunAudioChatIteratorStreamer(BaseStreamer):
    """Iterator of :class:`TextEvent`/:class:`SpeechEvent` then one :class:`EndEvent`.

    If ``generate()`` raises, the streamer ends with that error and the consumer's loop raises
    :class:`GenerationFailedError` (from the original error) instead of waiting forever.

    Example::

        streamer = FunAudioChatIteratorStreamer(processor.tokenizer)
        thread = Thread(target=model.generate, kwargs={**inputs, "streamer": streamer})
        thread.start()
        for event in streamer:
            ...

    Args:
        tokenizer: decodes text pieces incrementally per row (optional).
        skip_prompt: drop the prompt that generate() puts first.
        skip_special_tokens: passed to ``tokenizer.decode``.
        timeout: seconds to wait for the next event before ``queue.Empty`` is raised.
    """

    def __init__(self, tokenizer=None, skip_prompt: bool = True, skip_special_tokens: bool = True, timeout=None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.timeout = timeout
        self.queue: Queue = Queue()
        self._prompt_seen = False
        self._tokens: dict[int, list[int]] = {}
        self._printed: dict[int, int] = {}

    def _text_piece(self, row: int, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        tokens = self._tokens.setdefault(row, [])
        tokens.append(token_id)
        text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        printed = self._printed.get(row, 0)
        self._printed[row] = len(text)
        return text[printed:]

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        value = value.reshape(value.shape[0], -1) if value.dim() > 1 else value[:, None]
        for row, tokens in enumerate(value.tolist()):
            for token_id in tokens:
                self.queue.put(TextEvent(row=row, token_id=token_id, text=self._text_piece(row, token_id)))

    def put_speech(self, codes: torch.Tensor, rows: torch.Tensor) -> None:
        for row, group in zip(rows.tolist(), codes.tolist()):
            self.queue.put(SpeechEvent(row=row, codes=tuple(group)))

    def end(self) -> None:
        self.queue.put(EndEvent())

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (called by ``generate()`` when it raises)."""
        self.queue.put(EndEvent(error=error))

    @staticmethod
    def _raise_if_failed(event: EndEvent) -> None:
        if event.error is not None:
            raise GenerationFailedError(f"generate() failed: {event.error}") from event.error

    def __iter__(self):
        return self

    def __next__(self):
        event = self.queue.get(timeout=self.timeout)
        if isinstance(event, EndEvent):
            self._raise_if_failed(event)
            raise StopIteration
        return event

    def events(self):
        """All events including the final :class:`EndEvent` (for consumers that want to see it)."""
        while True:
            event = self.queue.get(timeout=self.timeout)
            if isinstance(event, EndEvent):
                self._raise_if_failed(event)
                yield event
                return
            yield event


__all__ = ["EndEvent", "FunAudioChatIteratorStreamer", "GenerationFailedError", "SpeechEvent", "TextEvent"]
