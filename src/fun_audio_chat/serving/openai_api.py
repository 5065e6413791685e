"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (audio in, text and audio out, streamed or not),
``GET /v1/models``.

Requests follow OpenAI's chat completions with audio: user content parts ``{"type": "text"}`` and
``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``, ``modalities: ["text", "audio"]``,
``audio: {"voice", "format"}``, ``stream``, ``temperature`` (0 = greedy text *and* speech codes), ``top_p``,
``seed``, ``max_tokens`` / ``max_completion_tokens``, ``tools`` / ``tool_choice``. Replies carry
``message.content`` (text mode) or ``message.audio.{id, data, transcript, expires_at}`` (audio mode), tool calls as
``message.tool_calls``; streamed replies are server-sent events whose deltas carry ``content`` or
``audio.transcript`` pieces and base64 ``audio.data`` pieces (raw 16-bit PCM at the detokenizer's rate).

``audio.voice`` picks one of the voices the server registered (``GET /v1/voices``; ``serve --voice``); OpenAI's own
voice names select the default voice, any other unknown name is a 400 that lists the voices there are.

Differences from OpenAI: ``n`` must be 1;
``stop``, ``logprobs``, penalties and ``response_format`` other than text are refused; earlier assistant audio is
referred to by its ``audio.id`` (this server keeps the transcripts of its recent replies) or given as text.
Unknown fields are refused (400) rather than ignored, so a typo never silently changes a reply.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..processing import TARGET_SAMPLING_RATE, StreamingToolCallParser
from ..speech_codes import SPEECH_FRAME_RATE
from ..voices.registry import UnknownVoiceError, VoiceRegistry
from .audio import (
    OUTPUT_FORMATS,
    STREAM_OUTPUT_FORMATS,
    AudioRequestError,
    decode_input_audio,
    encode_audio,
    to_pcm16,
)
from .engine import AudioDelta, TextDelta, TurnCancelled, TurnDone, TurnFailed, TurnRequest

AUDIO_EXPIRY_SECONDS = 3600


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse(
            {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


# ------------------------------------------------------------------------------------------------ schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# messages: one model per role and per content part, so the request schema (and /docs) says what is accepted
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class InputAudio(_Strict):
    data: str = Field(description="the clip's file bytes (wav, flac, mp3, ogg ...), base64-encoded")
    format: str | None = Field(default=None, description="the clip's container: wav, flac, mp3, ogg ...")


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


UserContentPart = Annotated[TextPart | InputAudioPart, Field(discriminator="type")]
AssistantContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | Annotated[list[UserContentPart], Field(min_length=1)]
    name: str | None = None


class AssistantAudioReference(_Strict):
    id: str = Field(description="the audio.id of an earlier reply of this server")


class ToolCallFunction(_Strict):
    name: str
    arguments: str = "{}"


class AssistantToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[AssistantContentPart] | None = None
    name: str | None = None
    audio: AssistantAudioReference | None = None
    tool_calls: list[AssistantToolCall] | None = None
    refusal: str | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class AudioOutputOptions(_Strict):
    voice: str | dict | None = None
    format: str = "wav"


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutputOptions | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = None
    user: str | None = None
    # known OpenAI fields this model cannot honour: refused when set to anything but their neutral value
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ tool calls
def well_formed_calls(parser: StreamingToolCallParser) -> list[dict]:
    """The calls an OpenAI client can run; a block that is not a call stays in the content (the parser's policy)."""
    return [call for call in parser.calls if call.get("arguments") is not None]


def _openai_tool_calls(calls: list[dict], with_index: bool = False) -> list[dict]:
    out = []
    for index, call in enumerate(calls):
        entry = {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        }
        if with_index:
            entry["index"] = index
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ the API
class ChatCompletionsAPI:
    """Turns OpenAI requests into :class:`~fun_audio_chat.serving.engine.TurnRequest` s and engine events into
    OpenAI responses."""

    def __init__(
        self,
        engine,
        model_id: str,
        metrics=None,
        *,
        default_max_tokens: int = 256,
        max_audio_seconds: float = 120.0,
        remembered_replies: int = 1024,
        voices: VoiceRegistry | None = None,
    ):
        self.engine = engine
        self.voices = voices if voices is not None else VoiceRegistry()
        self.model_id = model_id
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.max_audio_seconds = max_audio_seconds
        self.created = int(time.time())
        self._transcripts: OrderedDict[str, str] = OrderedDict()  # audio id -> transcript, for later turns
        self._remembered = remembered_replies

    # ------------------------------------------------------------------ request → turn
    @staticmethod
    def _text(content) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        return "\n".join(part.text if isinstance(part, TextPart) else part.refusal for part in content)

    def _user_content(self, content, where: str) -> list[dict]:
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        items = []
        for index, part in enumerate(content):
            if isinstance(part, TextPart):
                items.append({"type": "text", "text": part.text})
                continue
            at = f"{where}[{index}].input_audio"
            try:
                waveform = decode_input_audio(
                    part.input_audio.data,
                    part.input_audio.format,
                    where=at,
                    processor=self.engine.processor,
                    max_seconds=self.max_audio_seconds,
                )
            except AudioRequestError as err:
                raise APIError(400, str(err), at, "invalid_audio") from err
            items.append({"type": "audio", "audio": waveform, "sampling_rate": TARGET_SAMPLING_RATE})
        return items

    def _messages(self, messages: list) -> list[dict]:
        """The conversation in the processor's chat format (the request's shapes were checked by its schema)."""
        out = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if isinstance(message, SystemMessage):
                if index != 0:
                    raise APIError(400, f"{where}: the system message must be the first message.", where)
                out.append({"role": "system", "content": self._text(message.content)})
            elif isinstance(message, UserMessage):
                out.append({"role": "user", "content": self._user_content(message.content, f"{where}.content")})
            elif isinstance(message, ToolMessage):
                out.append({"role": "tool", "content": self._text(message.content)})
            else:
                text = self._text(message.content)
                if message.audio is not None:
                    transcript = self._transcripts.get(message.audio.id)
                    if transcript is None:
                        raise APIError(
                            400,
                            f"{where}.audio.id {message.audio.id!r} is not a recent reply of this server (expired or "
                            "unknown); send the reply's transcript as 'content' instead.",
                            f"{where}.audio",
                        )
                    text = text or transcript
                entry: dict[str, Any] = {"role": "assistant", "content": text}
                if message.tool_calls:
                    entry["tool_calls"] = [
                        {"type": "function", "function": call.function.model_dump()} for call in message.tool_calls
                    ]
                out.append(entry)
        if not any(message["role"] == "user" for message in out):
            raise APIError(400, "messages: the conversation needs at least one user message.", "messages")
        return out

    def _turn(self, body: ChatCompletionRequest) -> tuple[TurnRequest, str | None]:
        """The engine request and the output audio format (None for text replies)."""
        if body.model != self.model_id:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.model_id!r} (GET /v1/models).",
                "model",
                "model_not_found",
            )
        refused = {
            "n": body.n not in (None, 1),
            "stop": body.stop not in (None, [], ""),
            "logprobs": bool(body.logprobs) or body.top_logprobs not in (None, 0),
            "presence_penalty": body.presence_penalty not in (None, 0),
            "frequency_penalty": body.frequency_penalty not in (None, 0),
            "logit_bias": bool(body.logit_bias),
            "response_format": body.response_format not in (None, {"type": "text"}),
        }
        for name, is_set in refused.items():
            if is_set:
                raise APIError(400, f"{name} is not supported by this server; remove it from the request.", name)
        modalities = body.modalities or ["text"]
        speech = "audio" in modalities
        audio_format = None
        if speech:
            if not self.engine.can_speak:
                raise APIError(
                    400,
                    "this server has no speech detokenizer, so it cannot answer with audio; ask for "
                    "modalities ['text'] (or start the server with --detokenizer).",
                    "modalities",
                )
            allowed = STREAM_OUTPUT_FORMATS if body.stream else OUTPUT_FORMATS
            audio_format = (body.audio.format if body.audio else None) or allowed[0]
            if body.stream and body.audio is None:
                audio_format = "pcm16"
            if audio_format not in allowed:
                mode = "streamed" if body.stream else "non-streamed"
                raise APIError(
                    400,
                    f"audio.format {audio_format!r} is not available for {mode} replies; use one of "
                    f"{', '.join(allowed)}.",
                    "audio.format",
                )
        elif body.audio is not None:
            raise APIError(400, "audio options were given but modalities does not include 'audio'.", "audio")
        voice = self._voice(body.audio.voice) if speech and body.audio is not None else None
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        choice = body.tool_choice
        if choice not in (None, "auto", "none"):
            raise APIError(
                400, "tool_choice must be 'auto' or 'none': this model cannot be forced to call a tool.", "tool_choice"
            )
        if choice == "none":
            tools = None
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        temperature = 1.0 if body.temperature is None else body.temperature
        request = TurnRequest(
            messages=self._messages(body.messages),
            speech=speech,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            tools=tools,
            voice=voice,
        )
        return request, audio_format

    def _voice(self, requested):
        """The voice object for ``audio.voice`` (a name, or OpenAI's ``{"id": name}``); None = the default voice."""
        if isinstance(requested, dict):
            requested = requested.get("id")
        if requested is not None and not isinstance(requested, str):
            raise APIError(400, "audio.voice must be a voice name (GET /v1/voices lists them).", "audio.voice")
        try:
            return self.voices.resolve(requested)
        except UnknownVoiceError as err:
            raise APIError(400, f"audio.voice: {err}", "audio.voice", "voice_not_found") from err

    # ------------------------------------------------------------------ responses
    def _remember(self, audio_id: str, transcript: str) -> None:
        self._transcripts[audio_id] = transcript
        while len(self._transcripts) > self._remembered:
            self._transcripts.popitem(last=False)

    @staticmethod
    def _usage(metrics) -> dict:
        return {
            "prompt_tokens": metrics.prompt_tokens,
            "completion_tokens": metrics.completion_tokens,
            "total_tokens": metrics.prompt_tokens + metrics.completion_tokens,
        }

    @staticmethod
    def _error_for(error: BaseException) -> APIError:
        if isinstance(error, APIError):
            return error
        if isinstance(error, TurnCancelled):
            return APIError(499, str(error), code="cancelled")
        if isinstance(error, ValueError):
            return APIError(400, str(error), code="invalid_request")
        return APIError(500, f"the reply could not be generated: {error}", code="generation_failed")

    async def _wait(self, handle, request: Request):
        """The next event of ``handle``; cancels the turn (and raises) when the client goes away."""
        while True:
            event = await handle.next_event(timeout=0.25)
            if event is not None:
                return event
            if await request.is_disconnected():
                handle.cancel()
                raise APIError(499, "the client closed the connection", code="cancelled")

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        turn, audio_format = await run_in_threadpool(self._turn, body)
        handle = self.engine.submit(turn)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        try:
            first = await self._wait(handle, request)
        except BaseException:  # the client left (or the task was cancelled) before the turn started
            handle.cancel()
            raise
        if isinstance(first, TurnFailed):
            raise self._error_for(first.error)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._sse(handle, first, completion_id, turn, audio_format, include_usage),
                media_type="text/event-stream",
                headers=self._stream_headers(audio_format),
            )
        try:
            event = first
            while not isinstance(event, (TurnDone, TurnFailed)):
                event = await self._wait(handle, request)
        finally:
            if not handle.finished.is_set():
                handle.cancel()
        if isinstance(event, TurnFailed):
            raise self._error_for(event.error)
        return JSONResponse(self._completion(completion_id, turn, event.result, audio_format))

    def _stream_headers(self, audio_format: str | None) -> dict:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if audio_format:
            headers["X-Audio-Sample-Rate"] = str(self.engine.sample_rate)  # of the raw pcm16 pieces
        return headers

    def _completion(self, completion_id: str, turn: TurnRequest, result, audio_format: str | None) -> dict:
        parser = StreamingToolCallParser()
        parser.feed(result.text)
        parser.finish()
        text = parser.take_content()
        message: dict[str, Any] = {"role": "assistant", "content": None if audio_format else text, "refusal": None}
        if audio_format:
            audio_id = "audio_" + secrets.token_hex(12)
            data = encode_audio(result.audio, result.sample_rate, audio_format)
            message["audio"] = {
                "id": audio_id,
                "data": base64.b64encode(data).decode("ascii"),
                "expires_at": int(time.time()) + AUDIO_EXPIRY_SECONDS,
                "transcript": text,
            }
            self._remember(audio_id, text)
        finish_reason = result.finish_reason if result.finish_reason != "cancelled" else "stop"
        calls = well_formed_calls(parser)
        if calls:
            message["tool_calls"] = _openai_tool_calls(calls)
            finish_reason = "tool_calls"
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": self._usage(result.metrics),
        }

    def _chunk(self, completion_id: str, delta: dict | None, finish_reason: str | None = None, **extra) -> str:
        choices = (
            [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def _sse(self, handle, first, completion_id: str, turn: TurnRequest, audio_format, include_usage: bool):
        parser = StreamingToolCallParser()
        audio_id = "audio_" + secrets.token_hex(12) if audio_format else None
        transcript: list[str] = []

        def text_delta(piece: str) -> dict:
            transcript.append(piece)
            return {"audio": {"id": audio_id, "transcript": piece}} if audio_format else {"content": piece}

        try:
            yield self._chunk(completion_id, {"role": "assistant", "content": None if audio_format else ""})
            event = first
            while True:
                if isinstance(event, TextDelta):
                    parser.feed(event.text)
                    shown = parser.take_content()
                    if shown:
                        yield self._chunk(completion_id, text_delta(shown))
                elif isinstance(event, AudioDelta):
                    data = base64.b64encode(to_pcm16(event.samples)).decode("ascii")
                    yield self._chunk(completion_id, {"audio": {"id": audio_id, "data": data}})
                elif isinstance(event, TurnFailed):
                    error = self._error_for(event.error)
                    yield f"data: {json.dumps({'error': {'message': error.message, 'code': error.code}})}\n\n"
                    break
                elif isinstance(event, TurnDone):
                    parser.finish()
                    rest = parser.take_content()
                    if rest:
                        yield self._chunk(completion_id, text_delta(rest))
                    finish_reason = event.result.finish_reason
                    calls = well_formed_calls(parser)
                    if calls:
                        yield self._chunk(completion_id, {"tool_calls": _openai_tool_calls(calls, True)})
                        finish_reason = "tool_calls"
                    last = (
                        {"audio": {"id": audio_id, "expires_at": int(time.time()) + AUDIO_EXPIRY_SECONDS}}
                        if audio_format
                        else {}
                    )
                    yield self._chunk(completion_id, last, finish_reason)
                    if audio_format:
                        self._remember(audio_id, "".join(transcript))
                    if include_usage:
                        yield self._chunk(completion_id, None, usage=self._usage(event.result.metrics))
                    break
                event = await handle.next_event()
            yield "data: [DONE]\n\n"
        finally:
            if not handle.finished.is_set():
                handle.cancel()  # the client went away mid-stream: free its row

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def list_voices(self) -> dict:
        """The voices ``audio.voice`` can name, ``default`` first."""
        data = []
        for name in self.voices.names:
            voice = None if name == "default" else self.voices.get(name)
            seconds = voice.prompt_tokens / SPEECH_FRAME_RATE if voice is not None else 0.0
            data.append({"id": name, "object": "voice", "default": voice is None, "prompt_seconds": seconds})
        return {"object": "list", "data": data}

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "fun-audio-chat"}

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/v1/models", self.models, methods=["GET"])
        router.add_api_route("/v1/voices", self.list_voices, methods=["GET"])

        async def model(model_id: str):
            if model_id != self.model_id:
                raise APIError(
                    404,
                    f"model {model_id!r} is not served here; this server serves {self.model_id!r}.",
                    "model",
                    "model_not_found",
                )
            return self._model_card()

        router.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"])
        return router


__all__ = ["APIError", "ChatCompletionRequest", "ChatCompletionsAPI", "ChatMessage", "well_formed_calls"]
