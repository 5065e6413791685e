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

from .. import _lazy_exports

# Loaded on first use, so importing the package needs neither FastAPI (the `serve` extra) nor the engine's numpy.
_EXPORTS = {
    "engine": (
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
    ),
    "app": ("create_app",),
}
__getattr__, __dir__, __all__ = _lazy_exports.lazy_exports(__name__, _EXPORTS)
