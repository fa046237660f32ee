"""The FastAPI application factory and its single error handler (spec §2, §7.1, §16)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import DomainError, MethodNotAllowed, NotFound
from .services import KeyServer
from .settings import Settings, load_settings

log = logging.getLogger("modelseal.keyserver")


def error_body(request: Request, code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": _request_id(request)}
    if fields is not None:
        error["fields"] = fields
    return {"error": error}


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = os.urandom(8).hex()
    return str(rid)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    where, *rest = loc if loc else ("body",)
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    return f"$.{path.lstrip('.')}" if where == "body" else f"{where}{path}"


def create_app(settings: Settings | None = None, *, keyserver: KeyServer | None = None) -> FastAPI:
    """An app over ``keyserver`` (or one opened from ``settings``; by default, the environment).

    Opening from settings migrates and initialises the database first, so a misconfigured server
    fails here, before it accepts a request.
    """
    settings = settings or load_settings()
    if keyserver is None:
        from .bootstrap import open_keyserver

        keyserver = open_keyserver(settings)
    docs = settings.docs

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Few threads run the synchronous services: with many, threads holding the database's
        # write lock wait for the GIL behind threads doing crypto, and every writer queues longer.
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        # Everything loaded so far lives as long as the process: keep the cyclic collector
        # from walking it again on every collection.
        gc.freeze()
        # Requests allocate many short-lived objects; collect the youngest generation less often
        # (fewer pauses in the middle of a grant).
        gc.set_threshold(100_000, 50, 100)
        keyserver.db.start_checkpoints()
        try:
            yield
        finally:
            keyserver.db.stop_checkpoints()

    app = FastAPI(
        lifespan=lifespan,
        title="modelseal key server",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.keyserver = keyserver
    app.state.settings = settings

    app.add_middleware(_RequestContext, dev=settings.dev)

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after or 1)} if exc.status in (429, 503) else None
        return JSONResponse(error_body(request, exc.code, exc.message, exc.fields), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({_field_path(e.get("loc", ())) for e in exc.errors()})
        return await domain_error(request, _malformed(fields))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return await domain_error(request, MethodNotAllowed("method not allowed"))
        if exc.status_code == 404:
            return await domain_error(request, NotFound("not found"))
        body = error_body(request, "http-error", str(exc.detail))
        return JSONResponse(body, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error (a bug) in request %s", _request_id(request))
        return JSONResponse(error_body(request, "internal", "internal error"), 500)

    from .deps import OPENAPI_COMPONENTS
    from .routes import router

    app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(OPENAPI_COMPONENTS)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _RequestContext:
    """Pure ASGI middleware: a request id for every request (echoed as ``Modelseal-Request-Id``)
    and the dev-mode marker header. (Not ``@app.middleware``: that wraps every request in extra
    tasks and streams, a large share of a small request's cost.)"""

    def __init__(self, app: Any, *, dev: bool) -> None:
        self.app, self.dev = app, dev

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = rid
        extra = [(b"modelseal-request-id", rid.encode())] + ([(b"modelseal-dev-mode", b"1")] if self.dev else [])

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _malformed(fields: list[str]) -> DomainError:
    from .errors import MalformedRequest

    return MalformedRequest("the request is malformed", fields=fields)


def app_from_env() -> FastAPI:
    """uvicorn factory for ``keyserver serve`` workers (settings from the environment)."""
    from .bootstrap import open_keyserver

    settings = load_settings()
    # `serve` already migrated and initialised the database in one process before starting workers.
    return create_app(settings, keyserver=open_keyserver(settings, migrate=False, bootstrap=False))
