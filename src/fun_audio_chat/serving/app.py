"""The FastAPI application of ``fun-audio-chat serve``: the voice page at ``/``, the OpenAI-compatible API under
``/v1`` (chat completions over HTTP, the Realtime API over a WebSocket at ``/v1/realtime``), per-turn metrics at ``/metrics`` and a liveness check at ``/health``.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for a bad
request (invalid JSON, unknown fields, bad base64 or audio, audio too long, body too large) and 5xx for a server
fault; the server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .engine import ServingEngine
from .metrics import ServingMetrics
from .openai_api import APIError, ChatCompletionsAPI
from .realtime import RealtimeAPI, RealtimeLimits

logger = logging.getLogger("fun_audio_chat.serving")


# pydantic locates an error inside a union member with the member's label ("str", "list[...]") and, for the
# request's discriminated unions (messages by role, content parts by type), with the chosen member's tag
_UNION_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "refusal", "input_audio"}
# errors that only say "the value is not this union member's shape" (reported for every member that did not match)
_MEMBER_MISMATCHES = {"string_type", "list_type", "none_required", "dict_type", "model_type", "model_attributes_type"}
_AUDIO_PART_HINT = (
    " An audio part is {'type': 'input_audio', 'input_audio': {'data': <base64 file bytes>, 'format': 'wav'}}; "
    "paths and URLs are refused."
)


def _error_location(loc) -> str | None:
    parts, previous = [], None
    for part in loc:
        is_label = isinstance(part, str) and ("[" in part or part == "str")
        is_tag = isinstance(previous, int) and part in _UNION_TAGS
        if part != "body" and not is_label and not is_tag:
            parts.append(str(part))
        previous = part
    return ".".join(parts) or None


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    errors = err.errors()
    if not errors:
        return "the request is not valid.", None
    specific = [error for error in errors if error.get("type") not in _MEMBER_MISMATCHES] or errors
    first = max(specific, key=lambda error: len(error.get("loc", ())))  # the deepest: inside the matching member
    where = _error_location(first.get("loc", ()))
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    hint = _AUDIO_PART_HINT if where and "input_audio" in where.split(".") else ""
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', first.get('msg'))}).", None
    if kind == "union_tag_invalid":
        discriminator = str(ctx.get("discriminator", "")).strip("'")
        name = "content type" if discriminator == "type" else discriminator
        if discriminator == "type":
            hint = _AUDIO_PART_HINT
        return (
            f"{where}: {name} {ctx.get('tag')!r} is not supported; use one of {ctx.get('expected_tags')}.{hint}",
            where,
        )
    if kind == "union_tag_not_found":
        return f"{where}: missing {str(ctx.get('discriminator', '')).strip(chr(39))!r}.", where
    if kind == "extra_forbidden":
        return f"unknown field {where!r}; this server refuses fields it does not know (see the API docs).{hint}", where
    if kind == "missing":
        return f"missing required field {where!r}.{hint}", where
    return f"{where or 'request'}: {first.get('msg', 'invalid value')}.{hint}", where


def create_app(
    engine: ServingEngine,
    model_id: str = "fun-audio-chat",
    *,
    default_max_tokens: int = 256,
    max_audio_seconds: float = 120.0,
    max_body_bytes: int = 64 * 2**20,
    realtime_limits: RealtimeLimits | None = None,
    voices=None,
) -> FastAPI:
    """The app serving ``engine``; the engine's threads start with the app and stop with it.

    ``realtime_limits`` bounds the Realtime API sessions at ``/v1/realtime`` (default: input buffer of
    ``max_audio_seconds``, ``max_output_tokens: "inf"`` meaning ``default_max_tokens``). ``voices`` (a
    :class:`~fun_audio_chat.voices.VoiceRegistry`) are the voices both APIs offer by name; by default only
    ``default``, the detokenizer's own speaker.
    """
    from ..voices import VoiceRegistry

    if voices is None:
        voices = VoiceRegistry(config=getattr(engine.detokenizer, "config", None))
    metrics = ServingMetrics()
    engine.on_turn_end = metrics.record
    api = ChatCompletionsAPI(
        engine,
        model_id,
        metrics,
        default_max_tokens=default_max_tokens,
        max_audio_seconds=max_audio_seconds,
        voices=voices,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # start() returns once the decoder is ready (compiled decoding: after the warm-up), so the server listens
        # only then; in a thread, so that the loop still answers signals meanwhile
        await asyncio.to_thread(engine.start)
        yield
        engine.close()

    app = FastAPI(title="fun-audio-chat", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.api = api
    app.state.voices = voices

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            metrics.count_bad_request()
            return APIError(
                413,
                f"request body of {int(length)} bytes is larger than this server's limit of "
                f"{max_body_bytes} bytes; send shorter audio.",
                code="body_too_large",
            ).response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        if err.status < 500:
            metrics.count_bad_request()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        metrics.count_bad_request()
        message, param = _validation_message(err)
        return APIError(400, message, param, "invalid_request").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error: {type(err).__name__}: {err}").response()

    app.include_router(api.router())
    realtime = RealtimeAPI(
        engine,
        model_id,
        metrics,
        realtime_limits or RealtimeLimits(max_buffer_seconds=max_audio_seconds, max_output_tokens=default_max_tokens),
        voices=voices,
    )
    app.state.realtime = realtime
    app.include_router(realtime.router())

    static = resources.files("fun_audio_chat.serving") / "static"

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/metrics")
    async def metrics_endpoint(format: str = "prometheus"):
        if format == "json":
            return JSONResponse(metrics.summary())
        if format != "prometheus":
            raise APIError(400, f"format {format!r}: use 'prometheus' (default) or 'json'.", "format")
        return Response(metrics.prometheus(engine.queue_depth()), media_type=metrics.content_type)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_id,
            "speech": engine.can_speak,
            "sample_rate": engine.sample_rate,
            # compiled decoding (serve --compile): the positions one request may use, else None
            "compiled_context": engine.compile_context,
        }

    return app


__all__ = ["create_app"]
