"""The FastAPI application: the OpenAI routes, tokenizer routes, health, metrics, errors, limits.

Every refusal is an OpenAI-shaped JSON error (see :mod:`.protocol`): 400 for a bad body (wrong
types, out-of-range values, malformed JSON, invalid UTF-8, a prompt over the context), 401 without
the ``--api-key``, 404 for an unknown model or route, 413 for a body over the limit, 429 when the
queue is full, 500 when the engine failed on that request (the others go on). Handlers never touch
the model: they submit to the :class:`~.engine.AsyncEngine` and read its streams.
"""

from __future__ import annotations

import contextlib
import json
import secrets

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from .engine import AsyncEngine
from .protocol import DetokenizeRequest, ServeError, TokenizeRequest, error_body
from .routes import OpenAIRoutes
from .text import ServeTokenizer

__all__ = ["create_app"]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (declared or streamed in chunks)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, error_body(413, f"the request body is over {self.limit} bytes"))
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise ServeError(413, f"the request body is over {self.limit} bytes")
            return msg

        await self.app(scope, counted, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    param = ".".join(loc) or None
    return f"{param + ': ' if param else ''}{e.get('msg', 'invalid value')}", param


def create_app(engine: AsyncEngine, tokenizer: ServeTokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 << 20) -> FastAPI:
    """The server's app around a started-or-not ``engine`` (started by the app's lifespan, drained and
    stopped when the server shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine._thread.is_alive():
            engine.start()
        yield
        engine.stop(drain=True, timeout=60)

    app = FastAPI(title="moge serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.state.engine, app.state.tokenizer = engine, tokenizer

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ServeError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    @app.exception_handler(ServeError)
    async def _serve_error(request, exc: ServeError):
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(400, msg, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:  # FastAPI's words for undecodable bytes
            msg = "the request body is not valid JSON in UTF-8"
        return JSONResponse(error_body(exc.status_code, msg, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    routes = OpenAIRoutes(engine, tokenizer, model_name)
    guard = [Depends(authorized)]
    app.post("/v1/completions", dependencies=guard)(routes.completions)
    app.post("/v1/chat/completions", dependencies=guard)(routes.chat)
    app.get("/v1/models", dependencies=guard)(routes.models)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(error_body(503, "the engine is not running", "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", dependencies=guard)
    async def tokenize(req: TokenizeRequest):
        routes.check_model(req.model)
        ids = tokenizer.encode(req.prompt, req.add_special_tokens)
        return {"count": len(ids), "max_model_len": tokenizer.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=guard)
    async def detokenize(req: DetokenizeRequest):
        routes.check_model(req.model)
        if any(i >= engine.scheduler.vocab_size for i in req.tokens):
            raise ServeError(400, f"token ids must be in [0, {engine.scheduler.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info", dependencies=guard)
    async def tokenizer_info():
        return tokenizer.info()

    return app
