"""Conversations the engine tests send: the example clip (or its first seconds) and typed text."""

from __future__ import annotations

from fun_audio_chat.processing import example_audio_path, load_audio


def spoken(seconds: float | None = None) -> list[dict]:
    waveform = load_audio(example_audio_path())
    if seconds is not None:
        waveform = waveform[: int(seconds * 16000)]
    return [{"role": "user", "content": [{"type": "audio", "audio": waveform, "sampling_rate": 16000}]}]


def typed(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def submit_together(engine, requests):
    """Submit every request before waiting for any, so that they share the batch; returns their results."""
    handles = [engine.submit(request) for request in requests]
    return [handle.result() for handle in handles]
