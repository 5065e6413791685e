"""``fun-audio-chat serve``: a voice chat page and an OpenAI-compatible audio API over one model instance.

* :mod:`.engine` — :class:`ServingEngine`: continuous batching of turns and batched speech synthesis, streamed;
* :mod:`.openai_api` — ``/v1/chat/completions`` and ``/v1/models`` (schemas, SSE streaming, tool calls);
* :mod:`.realtime` — OpenAI's Realtime API over a WebSocket at ``/v1/realtime`` (sessions, turns, barge-in);
* :mod:`.realtime_events` — the Realtime API's client events (pydantic) and their value checks;
* :mod:`.vad` — server-side turn detection for it (silero-vad);
* :mod:`.audio` — inline base64 audio in, wav / flac / pcm16 out;
* :mod:`.metrics` — per-turn latency and real-time-factor metrics (``/metrics``);
* :mod:`.app` — :func:`create_app`, the FastAPI application (needs ``pip install "fun-audio-chat[serve]"``);
* ``static/`` — the voice page.
"""

from .engine import (
    AudioDelta,
    ServingEngine,
    TextDelta,
    TurnCancelled,
    TurnDone,
    TurnFailed,
    TurnHandle,
    TurnMetrics,
    TurnRequest,
    TurnResult,
)


def __getattr__(name):
    if name == "create_app":  # imported on use: FastAPI is an optional dependency
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AudioDelta",
    "ServingEngine",
    "TextDelta",
    "TurnCancelled",
    "TurnDone",
    "TurnFailed",
    "TurnHandle",
    "TurnMetrics",
    "TurnRequest",
    "TurnResult",
    "create_app",
]
