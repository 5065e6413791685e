"""OpenAI's Realtime API (GA event names) over a WebSocket at ``/v1/realtime``, on the same :class:`ServingEngine`
as the HTTP API.

One :class:`RealtimeSession` per connection keeps the session settings, the input audio buffer, the conversation
(its items) and at most one response in progress. Audio in and out is 16-bit little-endian mono PCM at 24 kHz
(``{"type": "audio/pcm", "rate": 24000}``, the only format); input audio is resampled to the model's 16 kHz with a
streaming soxr resampler, reply audio to 24 kHz when the detokenizer's rate differs.

Client events: ``session.update``, ``input_audio_buffer.append`` / ``commit`` / ``clear``,
``conversation.item.create`` (user ``input_text`` / ``input_audio``, system ``input_text``, assistant
``output_text`` / ``output_audio`` transcripts, ``function_call``, ``function_call_output``),
``conversation.item.truncate``, ``conversation.item.delete``, ``response.create``, ``response.cancel``.

Server events: ``session.created`` / ``session.updated``, ``input_audio_buffer.speech_started`` /
``speech_stopped`` / ``committed`` / ``cleared``, ``conversation.item.added`` / ``done`` / ``truncated`` /
``deleted``, ``response.created``, ``response.output_item.added`` / ``done``, ``response.content_part.added`` /
``done``, ``response.output_audio.delta`` / ``done``, ``response.output_audio_transcript.delta`` / ``done``,
``response.output_text.delta`` / ``done``, ``response.function_call_arguments.delta`` / ``done``,
``response.done`` and ``error``.

Turn detection (``audio.input.turn_detection``): ``server_vad`` (the default, as in OpenAI's API) scores the input
with silero-vad (:mod:`.vad`); a detected end of speech commits the buffer and, with ``create_response``, starts a
reply. Speech during a reply cancels it when ``interrupt_response`` is on (barge-in, ``response.done`` with status
``cancelled`` and reason ``turn_detected``). ``null`` means manual turns: ``commit`` + ``response.create``.

Truncation: an interrupted or truncated assistant item keeps the audio actually sent (up to ``audio_end_ms``) and
the text the server had streamed by the time it had streamed that much audio. The model writes its text a little
ahead of its speech, so the kept transcript may hold a few words the listener did not hear yet.

Bad input never ends the session: invalid JSON, unknown event types or fields, bad base64, an oversized event, a
full input buffer each get an ``error`` event naming the problem and the fix. A client that sends nothing for
``idle_timeout_seconds`` (while no reply is streaming) gets an ``error`` and a normal close; a client that stops
reading (its outgoing events pile up) is closed with code 1008; a vanished client's reply is cancelled in the
engine at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError

from ..processing import TARGET_SAMPLING_RATE, StreamingToolCallParser
from .audio import to_pcm16
from .engine import AudioDelta, TextDelta, TurnDone, TurnFailed, TurnRequest
from .openai_api import well_formed_calls
from .realtime_events import (
    CLIENT_EVENTS,
    AudioOutputConfig,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemTruncate,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ItemIn,
    RealtimeError,
    ResponseCancel,
    ResponseCreate,
    ResponseParams,
    ServerVAD,
    SessionUpdate,
    decode_pcm16,
    tool_choice_from,
    turn_detection_from,
    validation_message,
)

logger = logging.getLogger("fun_audio_chat.serving")

PCM_RATE = 24000  # the Realtime API's PCM rate, in and out
# Input audio is resampled once, to the model's TARGET_SAMPLING_RATE; silero-vad takes that same 16 kHz
# (vad.SAMPLE_RATE), so the detector is fed the buffer's own samples and its positions are buffer positions.
MIN_COMMIT_MS = 100  # a shorter buffer is refused on commit, as OpenAI does


@dataclass
class RealtimeLimits:
    """Bounds that keep one client from exhausting the server.

    Args:
        max_event_bytes: largest client event (JSON text) accepted; larger ones get an ``error``. Keep it below the
            WebSocket server's own frame limit (uvicorn: 16 MiB), which closes the connection instead.
        max_buffer_seconds: most audio the input buffer holds; appends beyond it get an ``error`` and are dropped.
        max_items: most items in a conversation.
        idle_timeout_seconds: a client that sends nothing for this long (while no reply streams) is closed.
        max_pending_events: server events waiting for a client that does not read them; beyond it, the
            connection is closed (code 1008).
        max_output_tokens: the reply length used for ``max_output_tokens: "inf"`` (the session default).
    """

    max_event_bytes: int = 15 * 2**20
    max_buffer_seconds: float = 120.0
    max_items: int = 1000
    idle_timeout_seconds: float = 300.0
    max_pending_events: int = 10000
    max_output_tokens: int = 256


# ------------------------------------------------------------------------------------------------ helpers
def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass
class SessionSettings:
    instructions: str = ""
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    max_output_tokens: int | str = "inf"
    turn_detection: ServerVAD | None = None
    voice: str = "default"
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"


@dataclass
class Item:
    """One conversation item. Audio of user items is kept at 16 kHz (what the model takes)."""

    id: str
    type: str  # message, function_call, function_call_output
    role: str | None = None
    parts: list[dict] = field(default_factory=list)  # {"type": "input_text", "text"} / {"type": "input_audio", ...}
    status: str = "completed"
    # assistant messages
    text_pieces: list[tuple[float, str]] = field(default_factory=list)  # (audio ms sent when streamed, text)
    audio_ms: float = 0.0
    has_audio: bool = False
    # function calls
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    @property
    def text(self) -> str:
        return "".join(piece for _, piece in self.text_pieces)

    def truncate(self, audio_end_ms: float) -> None:
        self.audio_ms = min(self.audio_ms, audio_end_ms)
        self.text_pieces = [(at, piece) for at, piece in self.text_pieces if at <= audio_end_ms]

    def to_openai(self) -> dict:
        """The item as OpenAI's ``ConversationItem`` (audio bytes are never echoed)."""
        out: dict[str, Any] = {"id": self.id, "object": "realtime.item", "type": self.type, "status": self.status}
        if self.type == "message":
            out["role"] = self.role
            if self.role == "assistant":
                kind = "output_audio" if self.has_audio else "output_text"
                out["content"] = [
                    {"type": kind, "transcript": self.text} if self.has_audio else {"type": kind, "text": self.text}
                ]
            else:
                out["content"] = [
                    {"type": "input_audio", "transcript": None}
                    if part["type"] == "input_audio"
                    else {"type": "input_text", "text": part["text"]}
                    for part in self.parts
                ]
        elif self.type == "function_call":
            out.update(call_id=self.call_id, name=self.name, arguments=self.arguments or "")
        else:
            out.update(call_id=self.call_id, output=self.output or "")
        return out


@dataclass
class _Response:
    id: str
    handle: Any
    speech: bool
    modalities: list[str]
    max_output_tokens: int | str
    metadata: dict | None
    voice: str
    turn_end_at: float  # end of the user's speech (server VAD) or arrival of the client's request
    vad_wait: float | None
    trigger_at: float  # speech_stopped detection or the client's commit / response.create
    submitted_at: float
    output: list[Item] = field(default_factory=list)
    message: Item | None = None
    samples_sent: int = 0
    first_audio_sent_at: float | None = None
    cancel_reason: str | None = None
    task: asyncio.Task | None = None
    resampler: Any = None

    @property
    def audio_ms_sent(self) -> float:
        return self.samples_sent * 1000.0 / PCM_RATE


# ------------------------------------------------------------------------------------------------ the session
class RealtimeSession:
    """One Realtime connection (see the module docstring). ``await session.run()`` serves it until it closes."""

    def __init__(
        self, websocket, engine, *, model_id: str, metrics=None, limits: RealtimeLimits | None = None, voices=None
    ):
        from ..voices.registry import VoiceRegistry

        self.websocket = websocket
        self.voices = voices if voices is not None else VoiceRegistry()
        self.engine = engine
        self.model_id = model_id
        self.metrics = metrics
        self.limits = limits or RealtimeLimits()
        self.id = _new_id("sess")
        self.settings = SessionSettings(output_modalities=["audio"] if engine.can_speak else ["text"])
        from .vad import vad_available

        if vad_available():
            self.settings.turn_detection = ServerVAD(type="server_vad")
        self.items: list[Item] = []
        self.response: _Response | None = None
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._closing = False
        self._stop = asyncio.Event()  # set when the server ends the session on its own
        # input audio: 24 kHz PCM → 16 kHz stream; the buffer holds 16 kHz samples of the stream
        self._resampler = self._new_input_resampler()
        self._stream_samples = 0  # 16 kHz samples produced so far (the clock of audio_start_ms / audio_end_ms)
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0  # stream sample of the buffer's first sample
        self._buffer_samples = 0
        self._detector = None
        self._detector_origin = 0  # stream sample where the detector's sample 0 lies
        self._speech_item_id: str | None = None

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _new_input_resampler():
        import soxr

        return soxr.ResampleStream(PCM_RATE, TARGET_SAMPLING_RATE, 1, dtype="float32", quality="HQ")

    def send(self, event_type: str, **payload) -> None:
        if self._closing:
            return
        if self._outbox.qsize() >= self.limits.max_pending_events:
            # the client does not read: drop what it would never read and close (this also ends the receive loop)
            logger.warning("realtime session %s: the client does not read its events; closing", self.id)
            self._closing = True
            while not self._outbox.empty():
                self._outbox.get_nowait()
            self._outbox.put_nowait(("close", 1008, "too many unread events: the client does not read them"))
            self._stop.set()
            return
        self._outbox.put_nowait({"type": event_type, "event_id": _new_id("event"), **payload})

    def send_error(self, message: str, code: str, param: str | None = None, event_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.count_realtime_error()
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
        error["event_id"] = event_id
        self.send("error", error=error)

    async def _write_loop(self) -> None:
        while True:
            event = await self._outbox.get()
            if event is None:
                return
            if isinstance(event, tuple):  # ("close", code, reason)
                with contextlib.suppress(Exception):
                    await self.websocket.close(code=event[1], reason=event[2])
                return
            try:
                await self.websocket.send_text(json.dumps(event, ensure_ascii=False))
            except Exception:  # noqa: BLE001 - the client is gone; the receive loop sees the disconnect
                self._closing = True
                return

    def session_object(self) -> dict:
        s = self.settings
        vad = s.turn_detection.model_dump(exclude={"idle_timeout_ms"}) if s.turn_detection else None
        audio_format = {"type": "audio/pcm", "rate": PCM_RATE}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model_id,
            "instructions": s.instructions,
            "output_modalities": list(s.output_modalities),
            "max_output_tokens": s.max_output_tokens,
            "tools": [dict(tool) for tool in s.tools],
            "tool_choice": s.tool_choice,
            "audio": {
                "input": {
                    "format": audio_format,
                    "turn_detection": vad,
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": audio_format, "voice": s.voice, "speed": 1.0},
            },
        }

    # ------------------------------------------------------------------ connection
    async def run(self) -> None:
        websocket = self.websocket
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        if self.metrics is not None:
            self.metrics.realtime_session_opened()
        writer = asyncio.create_task(self._write_loop())
        receiver: asyncio.Future | None = None
        stopper = asyncio.ensure_future(self._stop.wait())
        idle = False
        try:
            requested_model = websocket.query_params.get("model")
            if requested_model is not None and requested_model != self.model_id:
                self.send_error(
                    f"model {requested_model!r} is not served here; this server serves {self.model_id!r} "
                    "(connect with model=" + repr(self.model_id) + ").",
                    "model_not_found",
                    "model",
                )
                return
            self.send("session.created", session=self.session_object())
            while not self._closing:
                # one receive call stays pending across idle checks: cancelling a receive could lose a frame
                if receiver is None:
                    receiver = asyncio.ensure_future(websocket.receive())
                done, _ = await asyncio.wait(
                    {receiver, stopper}, timeout=self.limits.idle_timeout_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    return
                if not done:
                    if self.response is not None:
                        continue  # the client is listening to a reply
                    idle = True
                    self.send_error(
                        f"no client events for {self.limits.idle_timeout_seconds:g} s; closing the idle session.",
                        "idle_timeout",
                    )
                    return
                message, receiver = receiver.result(), None
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    self.send_error(
                        "binary frames are not part of the Realtime API; send JSON events as text frames.",
                        "invalid_frame",
                    )
                    continue
                await self.handle_text(text)
        except Exception as err:  # noqa: BLE001 - a disconnect mid-send, or a bug: end this session only
            if type(err).__name__ != "WebSocketDisconnect":
                logger.exception("realtime session %s failed", self.id)
        finally:
            stopper.cancel()
            if receiver is not None:
                receiver.cancel()
            await self._cancel_response("client_gone")
            self._closing = True
            if not writer.done():
                self._outbox.put_nowait(("close", 1000, "idle timeout" if idle else "session closed"))
                with contextlib.suppress(Exception):
                    # let the last events and the close frame out; a client that stopped reading gets no such wait
                    await asyncio.wait_for(writer, 0.5 if self._stop.is_set() else 5.0)
                writer.cancel()
            if self.metrics is not None:
                self.metrics.realtime_session_closed(idle=idle)

    async def _cancel_response(self, reason: str) -> None:
        response = self.response
        if response is None:
            return
        self.cancel_response(reason)
        if response.task is not None:
            with contextlib.suppress(BaseException):
                await response.task

    # ------------------------------------------------------------------ events in
    async def handle_text(self, text: str) -> None:
        """Parse, validate and run one client event; any problem becomes an ``error`` event."""
        event_id = None
        try:
            if len(text) > self.limits.max_event_bytes:
                raise RealtimeError(
                    f"event of {len(text)} bytes is larger than this server's limit of {self.limits.max_event_bytes} "
                    "bytes; send audio in smaller appends (100 ms of 24 kHz PCM16 is 6.4 kB of base64).",
                    "event_too_large",
                )
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise RealtimeError(
                    f"the event is not valid JSON ({err}); send one JSON object per text frame.", "invalid_json"
                ) from err
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                raise RealtimeError('an event must be a JSON object with a string "type".', "invalid_event", "type")
            event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
            kind = data["type"]
            model = CLIENT_EVENTS.get(kind)
            if model is None:
                raise RealtimeError(
                    f"unknown event type {kind[:100]!r}; this server handles {', '.join(CLIENT_EVENTS)}.",
                    "unknown_event_type",
                    "type",
                )
            try:
                event = model.model_validate(data)
            except ValidationError as err:
                message, param = validation_message(kind, err)
                raise RealtimeError(message, "invalid_request", param) from err
            handler = getattr(self, "on_" + kind.replace(".", "_"))
            await handler(event)
        except RealtimeError as err:
            self.send_error(err.message, err.code, err.param, event_id)

    # session ---------------------------------------------------------------------------------
    async def on_session_update(self, event: SessionUpdate) -> None:
        config = event.session
        settings = SessionSettings(**vars(self.settings))  # validate everything before changing anything
        given = config.model_fields_set
        if "model" in given and config.model not in (None, self.model_id):
            raise RealtimeError(
                f"session.model {config.model!r} is not served here; this server serves {self.model_id!r}.",
                "model_not_found",
                "session.model",
            )
        if "instructions" in given:
            settings.instructions = config.instructions or ""
        if config.output_modalities is not None:
            settings.output_modalities = self._modalities(config.output_modalities, "session.output_modalities")
        if "max_output_tokens" in given:
            settings.max_output_tokens = self._max_tokens(config.max_output_tokens, "session.max_output_tokens")
        if config.tools is not None:
            settings.tools = [tool.model_dump(exclude_none=True) for tool in config.tools]
        if "tool_choice" in given:
            settings.tool_choice = tool_choice_from(config.tool_choice)
        audio = config.audio
        detection_changed = False
        if audio is not None and audio.input is not None and "turn_detection" in audio.input.model_fields_set:
            settings.turn_detection = turn_detection_from(audio.input.turn_detection)
            detection_changed = True
        if audio is not None and audio.output is not None and audio.output.voice is not None:
            self._voice(audio.output.voice, "session.audio.output.voice")
            settings.voice = audio.output.voice
        if detection_changed and settings.turn_detection is not None:
            await self._load_detector(settings.turn_detection)
        elif detection_changed:
            self._detector = None
        self.settings = settings
        self.send("session.updated", session=self.session_object())

    def _modalities(self, modalities: list[str], where: str) -> list[str]:
        if "audio" in modalities and not self.engine.can_speak:
            raise RealtimeError(
                "this server has no speech detokenizer, so it cannot answer with audio; use output_modalities "
                "['text'] (or start the server with --detokenizer).",
                "audio_unavailable",
                where,
            )
        return list(modalities)

    def _voice(self, name: str, where: str):
        """The registered voice called ``name`` (None for the default voice); unknown names become an error event
        that lists the voices there are."""
        from ..voices.registry import UnknownVoiceError

        try:
            return self.voices.resolve(name)
        except UnknownVoiceError as err:
            raise RealtimeError(f"{where}: {err}", "voice_not_found", where) from err

    @staticmethod
    def _max_tokens(value, where: str) -> int | str:
        if value is None or value == "inf":
            return "inf"
        if not 1 <= value <= 4096:
            raise RealtimeError(f"{where} must be between 1 and 4096 or 'inf', got {value}.", "invalid_request", where)
        return value

    async def _load_detector(self, config: ServerVAD) -> None:
        from .vad import SpeechTurnDetector, VADUnavailableError

        try:
            detector = await asyncio.to_thread(
                SpeechTurnDetector, threshold=config.threshold, silence_duration_ms=config.silence_duration_ms
            )
        except VADUnavailableError as err:
            raise RealtimeError(str(err), "vad_unavailable", "session.audio.input.turn_detection") from err
        self._detector = detector
        self._detector_origin = self._stream_samples  # positions count the resampler's output
        self._speech_item_id = None

    # input audio buffer ----------------------------------------------------------------------
    @property
    def _max_buffer_samples(self) -> int:
        return int(self.limits.max_buffer_seconds * TARGET_SAMPLING_RATE)

    async def on_input_audio_buffer_append(self, event: InputAudioBufferAppend) -> None:
        arrived = time.perf_counter()
        samples = decode_pcm16(event.audio, "audio")
        if self._buffer_samples + len(samples) * TARGET_SAMPLING_RATE // PCM_RATE > self._max_buffer_samples:
            raise RealtimeError(
                f"the input audio buffer is full ({self.limits.max_buffer_seconds:g} s); commit or clear it "
                "(input_audio_buffer.commit / clear) before appending more. This append was dropped.",
                "input_audio_buffer_full",
            )
        chunk = self._resampler.resample_chunk(samples)
        self._add_to_buffer(chunk)
        if self.settings.turn_detection is not None:
            if self._detector is None:
                await self._load_detector(self.settings.turn_detection)
            await self._detect_turns(chunk, arrived)

    def _add_to_buffer(self, chunk: np.ndarray) -> None:
        if len(chunk):
            self._buffer.append(np.asarray(chunk, dtype=np.float32))
            self._buffer_samples += len(chunk)
        self._stream_samples += len(chunk)

    def _buffer_audio(self, end: int | None = None) -> np.ndarray:
        """The buffered audio up to stream sample ``end`` (all of it by default), and drop it from the buffer."""
        audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, dtype=np.float32)
        cut = len(audio) if end is None else max(0, min(len(audio), end - self._buffer_start))
        taken, rest = audio[:cut], audio[cut:]
        self._buffer = [rest] if len(rest) else []
        self._buffer_start += cut
        self._buffer_samples = len(rest)
        return taken

    def _drop_buffer_before(self, start: int) -> None:
        if start > self._buffer_start:
            self._buffer_audio(start)

    async def _detect_turns(self, chunk: np.ndarray, arrived: float) -> None:
        from .vad import SpeechStarted

        config = self.settings.turn_detection
        detector = self._detector
        events = await detector.feed_async(chunk, arrived) if len(chunk) else []
        if self._detector is not detector:  # turned off or replaced meanwhile
            return
        prefix = config.prefix_padding_ms * TARGET_SAMPLING_RATE // 1000
        for vad_event in events:
            position = self._detector_origin + vad_event.sample
            if isinstance(vad_event, SpeechStarted):
                self._drop_buffer_before(position - prefix)
                self._speech_item_id = _new_id("item")
                self.send(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=position * 1000 // TARGET_SAMPLING_RATE,
                    item_id=self._speech_item_id,
                )
                if config.interrupt_response and self.response is not None:
                    self.cancel_response("turn_detected")
            else:
                item_id = self._speech_item_id or _new_id("item")
                self._speech_item_id = None
                self.send(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=position * 1000 // TARGET_SAMPLING_RATE,
                    item_id=item_id,
                )
                audio = self._buffer_audio(position)
                if len(audio) < MIN_COMMIT_MS * TARGET_SAMPLING_RATE // 1000:
                    continue  # a click, not a turn (possible with prefix_padding_ms near 0)
                self._commit_audio(audio, item_id)
                await self._settle_cancelled_response()
                if config.create_response and self.response is None:
                    self._start_response(
                        None,
                        turn_end_at=vad_event.at,
                        vad_wait=vad_event.detected_at - vad_event.at,
                        trigger_at=vad_event.detected_at,
                    )
        if not self._detector.in_speech:
            # outside speech only the prefix padding can still become part of a turn: keep the buffer bounded
            self._drop_buffer_before(self._stream_samples - prefix - 1024)

    def _commit_audio(self, audio: np.ndarray, item_id: str | None = None) -> Item | None:
        if len(audio) < MIN_COMMIT_MS * TARGET_SAMPLING_RATE // 1000:
            raise RealtimeError(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, got "
                f"{len(audio) * 1000 / TARGET_SAMPLING_RATE:.0f} ms; append more audio before committing.",
                "input_audio_buffer_commit_empty",
            )
        from ..processing import AudioInputError

        try:
            # checked against the model's own length rules
            self.engine.processor.load_audio((audio, TARGET_SAMPLING_RATE), name="input audio buffer")
        except AudioInputError as err:
            raise RealtimeError(str(err), "invalid_audio") from err
        item = Item(id=item_id or _new_id("item"), type="message", role="user")
        item.parts.append({"type": "input_audio", "audio": audio})
        previous = self.items[-1].id if self.items else None
        self.send("input_audio_buffer.committed", item_id=item.id, previous_item_id=previous)
        self._add_item(item, previous)
        return item

    async def on_input_audio_buffer_commit(self, event: InputAudioBufferCommit) -> None:
        self._add_to_buffer(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self._resampler = self._new_input_resampler()
        if self._detector is not None:
            self._detector.reset()
            self._detector_origin = self._stream_samples
        self._speech_item_id = None
        self._commit_audio(self._buffer_audio())

    async def on_input_audio_buffer_clear(self, event: InputAudioBufferClear) -> None:
        self._buffer_audio()
        if self._detector is not None:
            self._detector.reset()
            self._detector_origin = self._stream_samples
        self._speech_item_id = None
        self.send("input_audio_buffer.cleared")

    # conversation ----------------------------------------------------------------------------
    def _find(self, item_id: str) -> int:
        for index, item in enumerate(self.items):
            if item.id == item_id:
                return index
        raise RealtimeError(f"no conversation item with id {item_id!r}.", "item_not_found", "item_id")

    def _add_item(self, item: Item, previous_item_id: str | None = None) -> None:
        if len(self.items) >= self.limits.max_items:
            raise RealtimeError(
                f"the conversation has {len(self.items)} items, this server's limit; delete old items "
                "(conversation.item.delete) or start a new session.",
                "conversation_full",
            )
        if previous_item_id is None or (self.items and previous_item_id == self.items[-1].id):
            self.items.append(item)
            previous = self.items[-2].id if len(self.items) > 1 else None
        elif previous_item_id == "root":
            self.items.insert(0, item)
            previous = None
        else:
            index = self._find(previous_item_id)
            self.items.insert(index + 1, item)
            previous = previous_item_id
        self.send("conversation.item.added", item=item.to_openai(), previous_item_id=previous)
        if item.status == "completed":
            self.send("conversation.item.done", item=item.to_openai(), previous_item_id=previous)

    async def on_conversation_item_create(self, event: ConversationItemCreate) -> None:
        spec = event.item
        if spec.id is not None and any(item.id == spec.id for item in self.items):
            raise RealtimeError(f"an item with id {spec.id!r} already exists.", "item_id_taken", "item.id")
        if event.previous_item_id not in (None, "root"):
            self._find(event.previous_item_id)
        item = Item(id=spec.id or _new_id("item"), type=spec.type)
        if spec.type == "function_call_output":
            if spec.call_id is None or spec.output is None:
                raise RealtimeError(
                    "a function_call_output item needs 'call_id' (from the function_call item) and 'output'.",
                    "invalid_request",
                    "item",
                )
            item.call_id, item.output = spec.call_id, spec.output
        elif spec.type == "function_call":
            if not spec.name or spec.call_id is None:
                raise RealtimeError("a function_call item needs 'name' and 'call_id'.", "invalid_request", "item")
            item.call_id, item.name, item.arguments = spec.call_id, spec.name, spec.arguments or "{}"
        else:
            if spec.role is None or not spec.content:
                raise RealtimeError("a message item needs a 'role' and non-empty 'content'.", "invalid_request", "item")
            item.role = spec.role
            item.parts = await asyncio.to_thread(self._message_parts, spec)
            if spec.role == "assistant":
                text = "".join(part["text"] for part in item.parts)
                item.text_pieces = [(0.0, text)]
        self._add_item(item, event.previous_item_id)

    def _message_parts(self, spec: ItemIn) -> list[dict]:
        allowed = {
            "user": ("input_text", "input_audio"),
            "system": ("input_text",),
            "assistant": ("output_text", "output_audio", "text"),
        }[spec.role]
        parts = []
        for index, part in enumerate(spec.content):
            where = f"item.content[{index}]"
            if part.type not in allowed:
                raise RealtimeError(
                    f"{where}: a {spec.role} message takes content of type {' or '.join(allowed)}, got {part.type!r}.",
                    "invalid_request",
                    where,
                )
            if part.type == "input_audio":
                if not part.audio:
                    raise RealtimeError(f"{where}.audio is empty; send base64 PCM16 at 24 kHz.", "invalid_audio", where)
                from ..processing import AudioInputError, resample

                samples = decode_pcm16(part.audio, f"{where}.audio")
                if len(samples) > self.limits.max_buffer_seconds * PCM_RATE:
                    raise RealtimeError(
                        f"{where}.audio lasts {len(samples) / PCM_RATE:.1f} s, longer than this server's limit of "
                        f"{self.limits.max_buffer_seconds:g} s.",
                        "invalid_audio",
                        where,
                    )
                audio = resample(samples, PCM_RATE, TARGET_SAMPLING_RATE)
                try:
                    self.engine.processor.load_audio((audio, TARGET_SAMPLING_RATE), name=f"{where}.audio")
                except AudioInputError as err:
                    raise RealtimeError(str(err), "invalid_audio", where) from err
                parts.append({"type": "input_audio", "audio": audio})
            else:
                text = part.text if part.text is not None else part.transcript
                if text is None:
                    raise RealtimeError(f"{where} needs 'text'.", "invalid_request", where)
                parts.append({"type": "input_text", "text": text})
        return parts

    async def on_conversation_item_truncate(self, event: ConversationItemTruncate) -> None:
        item = self.items[self._find(event.item_id)]
        if item.type != "message" or item.role != "assistant" or not item.has_audio:
            raise RealtimeError(
                f"item {event.item_id!r} is not an assistant message with audio; only those can be truncated.",
                "invalid_request",
                "item_id",
            )
        if event.content_index != 0:
            raise RealtimeError("content_index must be 0 (assistant items have one part).", "invalid_request")
        if self.response is not None and self.response.message is item:
            self.cancel_response("client_cancelled")
        if event.audio_end_ms > item.audio_ms + 1:
            raise RealtimeError(
                f"audio_end_ms {event.audio_end_ms} is beyond the item's audio ({item.audio_ms:.0f} ms).",
                "invalid_request",
                "audio_end_ms",
            )
        item.truncate(event.audio_end_ms)
        self.send("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=event.audio_end_ms)

    async def on_conversation_item_delete(self, event: ConversationItemDelete) -> None:
        index = self._find(event.item_id)
        if self.response is not None and self.items[index] in self.response.output:
            raise RealtimeError(
                "this item belongs to the response in progress; cancel it (response.cancel) before deleting.",
                "item_in_use",
                "item_id",
            )
        del self.items[index]
        self.send("conversation.item.deleted", item_id=event.item_id)

    # responses -------------------------------------------------------------------------------
    async def _settle_cancelled_response(self) -> None:
        """Let a response that is already cancelled send its ``response.done`` before a new one starts (a cancel
        followed at once by a new turn must not meet 'a response is in progress')."""
        response = self.response
        if response is not None and response.cancel_reason is not None and response.task is not None:
            with contextlib.suppress(BaseException):
                await response.task

    async def on_response_create(self, event: ResponseCreate) -> None:
        now = time.perf_counter()
        await self._settle_cancelled_response()
        if self.response is not None:
            raise RealtimeError(
                f"a response ({self.response.id}) is in progress; wait for its response.done or cancel it.",
                "conversation_already_has_active_response",
            )
        self._start_response(event.response, turn_end_at=now, vad_wait=None, trigger_at=now)

    async def on_response_cancel(self, event: ResponseCancel) -> None:
        response = self.response
        if response is None or (event.response_id is not None and event.response_id != response.id):
            raise RealtimeError("there is no response in progress to cancel.", "response_cancel_not_active")
        self.cancel_response("client_cancelled")

    def cancel_response(self, reason: str) -> None:
        response = self.response
        if response is None or response.cancel_reason is not None:
            return
        response.cancel_reason = reason
        response.handle.cancel()  # frees its row in the engine at the next decoding step
        if response.task is not None:
            response.task.cancel()

    def _messages(self, instructions: str) -> list[dict]:
        """The conversation in the processor's chat format (one leading system message)."""
        system = [instructions] if instructions else []
        messages: list[dict] = []
        for item in self.items:
            if item.type == "message" and item.role == "system":
                system.append("\n".join(part["text"] for part in item.parts))
            elif item.type == "message" and item.role == "user":
                content = [
                    {"type": "audio", "audio": part["audio"], "sampling_rate": TARGET_SAMPLING_RATE}
                    if part["type"] == "input_audio"
                    else {"type": "text", "text": part["text"]}
                    for part in item.parts
                ]
                messages.append({"role": "user", "content": content})
            elif item.type == "message":
                messages.append({"role": "assistant", "content": item.text})
            elif item.type == "function_call":
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": ""})
                call = {"type": "function", "function": {"name": item.name, "arguments": item.arguments or "{}"}}
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "tool", "content": item.output or ""})
        if not any(message["role"] == "user" for message in messages):
            raise RealtimeError(
                "the conversation has no user input yet; append and commit audio or create a user message item "
                "before response.create.",
                "conversation_empty",
            )
        if system:
            messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
        return messages

    def _start_response(self, params: ResponseParams | None, *, turn_end_at, vad_wait, trigger_at) -> None:
        settings = self.settings
        params = params or ResponseParams()
        given = params.model_fields_set
        modalities = (
            self._modalities(params.output_modalities, "response.output_modalities")
            if params.output_modalities is not None
            else settings.output_modalities
        )
        max_tokens = (
            self._max_tokens(params.max_output_tokens, "response.max_output_tokens")
            if "max_output_tokens" in given
            else settings.max_output_tokens
        )
        tools = (
            [tool.model_dump(exclude_none=True) for tool in params.tools]
            if params.tools is not None
            else settings.tools
        )
        choice = tool_choice_from(params.tool_choice) if "tool_choice" in given else settings.tool_choice
        voice = settings.voice
        if params.audio is not None:
            try:
                output = AudioOutputConfig.model_validate(params.audio.get("output") or {})
            except ValidationError as err:
                message, param = validation_message("response.create", err)
                raise RealtimeError(message, "invalid_request", f"response.audio.output.{param}") from err
            voice = output.voice or voice
        voice_object = self._voice(voice, "response.audio.output.voice") if "audio" in modalities else None
        instructions = params.instructions if params.instructions is not None else settings.instructions
        messages = self._messages(instructions)
        speech = "audio" in modalities
        chat_tools = (
            [
                {
                    "type": "function",
                    "function": {key: value for key, value in tool.items() if key != "type"},
                }
                for tool in tools
            ]
            if tools and choice != "none"
            else None
        )
        request = TurnRequest(
            messages=messages,
            speech=speech,
            max_new_tokens=self.limits.max_output_tokens if max_tokens == "inf" else int(max_tokens),
            temperature=0.0,
            tools=chat_tools,
            voice=voice_object,
        )
        try:
            handle = self.engine.submit(request)
        except RuntimeError as err:
            raise RealtimeError(f"the server cannot take a response now: {err}", "server_unavailable") from err
        response = _Response(
            id=_new_id("resp"),
            handle=handle,
            speech=speech,
            modalities=list(modalities),
            max_output_tokens=max_tokens,
            metadata=params.metadata,
            voice=voice,
            turn_end_at=turn_end_at,
            vad_wait=vad_wait,
            trigger_at=trigger_at,
            submitted_at=handle.submitted_at,
        )
        rate = self.engine.sample_rate
        if speech and rate is not None and rate != PCM_RATE:
            import soxr

            response.resampler = soxr.ResampleStream(rate, PCM_RATE, 1, dtype="float32", quality="HQ")
        self.response = response
        self.send("response.created", response=self._response_object(response, "in_progress"))
        response.task = asyncio.create_task(self._stream(response))

    def _response_object(self, response: _Response, status: str, details=None, usage=None) -> dict:
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": [item.to_openai() for item in response.output],
            "conversation_id": self.id.replace("sess_", "conv_"),
            "output_modalities": response.modalities,
            "max_output_tokens": response.max_output_tokens,
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": PCM_RATE}, "voice": response.voice}},
            "usage": usage,
            "metadata": response.metadata,
        }

    def _open_message(self, response: _Response) -> Item:
        if response.message is not None:
            return response.message
        item = Item(id=_new_id("item"), type="message", role="assistant", status="in_progress")
        item.has_audio = response.speech
        response.message = item
        response.output.append(item)
        index = len(response.output) - 1
        previous = self.items[-1].id if self.items else None
        self.send("response.output_item.added", response_id=response.id, output_index=index, item=item.to_openai())
        self.items.append(item)
        self.send("conversation.item.added", item=item.to_openai(), previous_item_id=previous)
        part = {"type": "output_audio", "transcript": ""} if response.speech else {"type": "output_text", "text": ""}
        self.send(
            "response.content_part.added",
            response_id=response.id,
            item_id=item.id,
            output_index=index,
            content_index=0,
            part=part,
        )
        return item

    def _where(self, response: _Response, item: Item) -> dict:
        return {
            "response_id": response.id,
            "item_id": item.id,
            "output_index": response.output.index(item),
            "content_index": 0,
        }

    def _say(self, response: _Response, text: str) -> None:
        if not text:
            return
        item = self._open_message(response)
        item.text_pieces.append((response.audio_ms_sent, text))
        kind = "response.output_audio_transcript.delta" if response.speech else "response.output_text.delta"
        self.send(kind, **self._where(response, item), delta=text)

    def _play(self, response: _Response, samples: np.ndarray, last: bool = False) -> None:
        if response.resampler is not None:
            samples = response.resampler.resample_chunk(np.asarray(samples, dtype=np.float32), last=last)
        if not len(samples):
            return
        item = self._open_message(response)
        response.samples_sent += len(samples)
        item.audio_ms = response.audio_ms_sent
        data = base64.b64encode(to_pcm16(samples)).decode("ascii")
        self.send("response.output_audio.delta", **self._where(response, item), delta=data)
        if response.first_audio_sent_at is None:
            response.first_audio_sent_at = time.perf_counter()

    def _call(self, response: _Response, call: dict) -> None:
        item = Item(
            id=_new_id("item"),
            type="function_call",
            call_id=_new_id("call"),
            name=call["name"],
            arguments=json.dumps(call["arguments"], ensure_ascii=False),
            status="in_progress",
        )
        response.output.append(item)
        index = len(response.output) - 1
        previous = self.items[-1].id if self.items else None
        shown = item.to_openai() | {"arguments": ""}
        self.send("response.output_item.added", response_id=response.id, output_index=index, item=shown)
        self.items.append(item)
        self.send("conversation.item.added", item=shown, previous_item_id=previous)
        where = {"response_id": response.id, "item_id": item.id, "output_index": index, "call_id": item.call_id}
        self.send("response.function_call_arguments.delta", **where, delta=item.arguments)
        self.send("response.function_call_arguments.done", **where, name=item.name, arguments=item.arguments)
        item.status = "completed"
        self.send("response.output_item.done", response_id=response.id, output_index=index, item=item.to_openai())
        self.send("conversation.item.done", item=item.to_openai(), previous_item_id=previous)

    async def _stream(self, response: _Response) -> None:
        """Engine events → server events, until the turn ends or the response is cancelled."""
        parser = StreamingToolCallParser()  # streamed text -> what is said and the <tool_call> blocks
        handle = response.handle
        status, details, error = "completed", None, None
        calls_sent = 0

        def new_calls():
            nonlocal calls_sent
            calls = well_formed_calls(parser)
            for call in calls[calls_sent:]:
                self._call(response, call)
            calls_sent = len(calls)

        try:
            while True:
                event = await handle.next_event()
                if isinstance(event, TextDelta):
                    parser.feed(event.text)
                    self._say(response, parser.take_content())
                    new_calls()
                elif isinstance(event, AudioDelta):
                    if response.speech:
                        self._play(response, event.samples)
                elif isinstance(event, TurnDone):
                    parser.finish()
                    self._say(response, parser.take_content())
                    new_calls()
                    if response.resampler is not None:
                        self._play(response, np.zeros(0, dtype=np.float32), last=True)
                    reason = event.result.finish_reason
                    if reason == "length":
                        status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
                    elif reason == "cancelled":
                        status, details = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
                    break
                elif isinstance(event, TurnFailed):
                    status = "failed"
                    error = event.error
                    message = str(error) or type(error).__name__
                    details = {
                        "type": "failed",
                        "error": {"type": "server_error", "code": "generation_failed", "message": message},
                    }
                    self.send_error(f"the response could not be generated: {message}", "generation_failed")
                    break
        except asyncio.CancelledError:
            # cancelled by barge-in, response.cancel, truncate or the socket closing: end it now, without waiting
            # for the engine (its row stops at the next decoding step)
            status = "cancelled"
            details = {"type": "cancelled", "reason": response.cancel_reason or "client_cancelled"}
        except Exception as err:  # noqa: BLE001 - a bug here must not leave the session with a stuck response
            logger.exception("realtime response %s failed", response.id)
            status, error = "failed", err
            details = {"type": "failed", "error": {"type": "server_error", "code": "internal", "message": str(err)}}
        finally:
            if not handle.finished.is_set() and status != "completed":
                handle.cancel()
        try:
            self._finish(response, status, details, error)
        finally:
            if self.response is response:  # whatever happens, the session takes a next response
                self.response = None

    def _finish(self, response: _Response, status: str, details, error) -> None:
        item = response.message
        if item is not None:
            item.status = "completed" if status == "completed" else "incomplete"
            where = self._where(response, item)
            if response.speech:
                self.send("response.output_audio.done", **where)
                self.send("response.output_audio_transcript.done", **where, transcript=item.text)
                part = {"type": "output_audio", "transcript": item.text}
            else:
                self.send("response.output_text.done", **where, text=item.text)
                part = {"type": "output_text", "text": item.text}
            self.send("response.content_part.done", **where, part=part)
            self.send(
                "response.output_item.done",
                response_id=response.id,
                output_index=where["output_index"],
                item=item.to_openai(),
            )
            self.send("conversation.item.done", item=item.to_openai())
        handle = response.handle
        # a cancelled turn has no result yet: count what the engine had decoded so far
        prompt_tokens = handle.metrics.prompt_tokens
        output_tokens = handle.metrics.completion_tokens or (len(handle.turn.token_ids) if handle.turn else 0)
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        }
        self.send("response.done", response=self._response_object(response, status, details, usage))
        if self.response is response:
            self.response = None
        if self.metrics is not None:
            self.metrics.record_realtime_turn(status, self._latency(response))

    @staticmethod
    def _latency(response: _Response) -> dict[str, float | None]:
        engine_metrics = response.handle.metrics
        prefill = engine_metrics.prefill_seconds
        first_speech = engine_metrics.first_speech_seconds if response.speech else None
        first_audio = engine_metrics.first_audio_seconds if response.speech else None
        return {
            "vad_wait": response.vad_wait,
            "turn_end_to_submit": response.submitted_at - response.trigger_at,
            "queue_prefill": prefill,
            "first_speech_group": _between(prefill, first_speech),
            "first_audio_chunk": _between(first_speech, first_audio),
            "turn_end_to_first_audio": (
                response.first_audio_sent_at - response.turn_end_at
                if response.first_audio_sent_at is not None
                else None
            ),
        }


def _between(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


class RealtimeAPI:
    """The ``/v1/realtime`` WebSocket route over one engine."""

    def __init__(self, engine, model_id: str, metrics=None, limits: RealtimeLimits | None = None, voices=None):
        self.engine = engine
        self.model_id = model_id
        self.metrics = metrics
        self.limits = limits or RealtimeLimits()
        self.voices = voices
        self.sessions: set[RealtimeSession] = set()

    async def serve(self, websocket) -> None:
        session = RealtimeSession(
            websocket, self.engine, model_id=self.model_id, metrics=self.metrics, limits=self.limits, voices=self.voices
        )
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def router(self):
        async def realtime(websocket: WebSocket):  # FastAPI injects the socket by this annotation
            await self.serve(websocket)

        router = APIRouter()
        router.add_api_websocket_route("/v1/realtime", realtime)
        return router


__all__ = [
    "CLIENT_EVENTS",
    "RealtimeAPI",
    "RealtimeError",
    "RealtimeLimits",
    "RealtimeSession",
    "decode_pcm16",
]
