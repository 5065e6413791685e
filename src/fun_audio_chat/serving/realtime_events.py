"""The Realtime API's client events as pydantic models, and the checks of their values: what a client may send to
``/v1/realtime`` (:mod:`.realtime`) and how a malformed event is explained back in one line.

Every model refuses unknown fields, so a typo never silently changes a session; values this server does not support
(e.g. input transcription) are refused with what to send instead.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RealtimeError(Exception):
    """Becomes an ``error`` event; the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


# ------------------------------------------------------------------------------------------------ client events
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AudioFormat(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = 24000


class ServerVAD(_Strict):
    type: Literal["server_vad"]
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=0, le=10000)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: None = None  # OpenAI's "reply after this much silence" is not offered here


class AudioInputConfig(_Strict):
    format: AudioFormat | None = None
    turn_detection: dict[str, Any] | None = None  # validated by _turn_detection for a clearer message
    transcription: None = None  # input transcription events are not produced by this server
    noise_reduction: None = None


class AudioOutputConfig(_Strict):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: Literal[1.0] | None = None


class SessionAudioConfig(_Strict):
    input: AudioInputConfig | None = None
    output: AudioOutputConfig | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class SessionConfig(_Strict):
    type: Literal["realtime"]
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1, max_length=1)
    max_output_tokens: int | Literal["inf"] | None = None
    audio: SessionAudioConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # accepted OpenAI settings that change nothing here
    parallel_tool_calls: bool | None = None
    tracing: Any = None
    truncation: Any = None
    include: list[str] | None = None


class _ClientEvent(_Strict):
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ContentPart(_Strict):
    type: Literal["input_text", "input_audio", "output_text", "output_audio", "text"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class ItemIn(_Strict):
    id: str | None = Field(None, min_length=1, max_length=64)
    type: Literal["message", "function_call", "function_call_output"]
    object: Literal["realtime.item"] | None = None
    status: Literal["completed", "incomplete", "in_progress"] | None = None
    role: Literal["user", "system", "assistant"] | None = None
    content: list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ConversationItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: ItemIn


class ConversationItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseParams(_Strict):
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1, max_length=1)
    max_output_tokens: int | Literal["inf"] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    conversation: Literal["auto"] | None = None
    metadata: dict[str, str] | None = None
    audio: dict[str, Any] | None = None  # {"output": {"voice", "format"}}: checked like the session's


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


CLIENT_EVENTS: dict[str, type[_ClientEvent]] = {
    "session.update": SessionUpdate,
    "input_audio_buffer.append": InputAudioBufferAppend,
    "input_audio_buffer.commit": InputAudioBufferCommit,
    "input_audio_buffer.clear": InputAudioBufferClear,
    "conversation.item.create": ConversationItemCreate,
    "conversation.item.truncate": ConversationItemTruncate,
    "conversation.item.delete": ConversationItemDelete,
    "response.create": ResponseCreate,
    "response.cancel": ResponseCancel,
}


def validation_message(event_type: str, err: ValidationError) -> tuple[str, str | None]:
    """A one-line message (and the parameter) for the first problem pydantic found in a client event."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or None
    if first.get("type") == "extra_forbidden":
        return (
            f"{event_type}: unknown field {where!r}; this server refuses fields it does not know, so a typo "
            "never silently changes the session (see docs/serve.md, 'Realtime API').",
            where,
        )
    if first.get("type") == "missing":
        return f"{event_type}: missing required field {where!r}.", where
    if first.get("type") == "none_required":
        return (
            f"{event_type}: {where!r} is not supported by this server (no input transcription, noise reduction or "
            "idle-timeout replies); leave it out or set it to null.",
            where,
        )
    return f"{event_type}: {where or 'event'}: {first.get('msg', 'invalid value')}.", where


def decode_pcm16(data: str, where: str) -> np.ndarray:
    """Base64 PCM16 (little-endian mono) → float32 samples in [-1, 1]."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RealtimeError(
            f"{where} is not valid base64 ({err}); send 16-bit PCM at 24 kHz, base64-encoded.", "invalid_base64", where
        ) from err
    if len(raw) % 2:
        raise RealtimeError(
            f"{where} holds {len(raw)} bytes, an odd number: 16-bit PCM needs 2 bytes per sample.",
            "invalid_audio",
            where,
        )
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def turn_detection_from(value: dict[str, Any] | None) -> ServerVAD | None:
    if value is None:
        return None
    kind = value.get("type")
    if kind != "server_vad":
        raise RealtimeError(
            f"audio.input.turn_detection type {kind!r} is not supported; use 'server_vad' or null (manual turns).",
            "unsupported_turn_detection",
            "session.audio.input.turn_detection",
        )
    try:
        return ServerVAD.model_validate(value)
    except ValidationError as err:
        message, param = validation_message("session.update", err)
        raise RealtimeError(message, "invalid_request", f"session.audio.input.turn_detection.{param}") from err


def tool_choice_from(choice) -> str:
    if choice in (None, "auto"):
        return "auto"
    if choice == "none":
        return "none"
    raise RealtimeError(
        f"tool_choice {choice!r} is not supported: this model cannot be forced to call a tool; use 'auto' or 'none'.",
        "unsupported_tool_choice",
        "tool_choice",
    )
