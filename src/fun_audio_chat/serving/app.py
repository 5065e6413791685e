"""The FastAPI application of ``fun-audio-chat serve``: the voice page at ``/``, the OpenAI-compatible API under
``/v1`` (chat completions over HTTP, the Realtime API over a WebSocket at ``/v1/realtime``), per-turn metrics at ``/metrics`` and a liveness check at ``/health``.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for a bad
request (invalid JSON, unknown fields, bad base64 or audio, audio too long, body too large) and 5xx for a server
fault; the server keeps serving either way.
"""

from __future__ import annotations

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


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))}).", None
    if kind == "extra_forbidden":
        return f"unknown field {where!r}; this server refuses fields it does not know (see the API docs).", where
    if kind == "missing":
        return f"missing required field {where!r}.", where
    return f"{where or 'request'}: {first.get('msg', 'invalid value')}.", where


def create_app(
    engine: ServingEngine,
    model_id: str = "fun-audio-chat",
    *,
    default_max_tokens: int = 256,
    max_audio_seconds: float = 120.0,
    max_body_bytes: int = 64 * 2**20,
    realtime_limits: RealtimeLimits | None = None,
) -> FastAPI:
    """The app serving ``engine``; the engine's threads start with the app and stop with it.

    ``realtime_limits`` bounds the Realtime API sessions at ``/v1/realtime`` (default: input buffer of
    ``max_audio_seconds``, ``max_output_tokens: "inf"`` meaning ``default_max_tokens``).
    """
    metrics = ServingMetrics()
    engine.on_turn_end = metrics.record
    api = ChatCompletionsAPI(
        engine, model_id, metrics, default_max_tokens=default_max_tokens, max_audio_seconds=max_audio_seconds
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="fun-audio-chat", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.api = api

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
        return {"status": "ok", "model": model_id, "speech": engine.can_speak, "sample_rate": engine.sample_rate}

    return app


__all__ = ["create_app"]
