"""The FastAPI application factory and its single error handler (spec §2, §7.1, §16)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
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
    app = FastAPI(
        title="modelseal key server",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.keyserver = keyserver
    app.state.settings = settings

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        _request_id(request)
        response = await call_next(request)
        response.headers["Modelseal-Request-Id"] = _request_id(request)
        if settings.dev:
            response.headers["Modelseal-Dev-Mode"] = "1"
        return response

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


def _malformed(fields: list[str]) -> DomainError:
    from .errors import MalformedRequest

    return MalformedRequest("the request is malformed", fields=fields)


def app_from_env() -> FastAPI:
    """uvicorn factory for ``keyserver serve`` workers (settings from the environment)."""
    from .bootstrap import open_keyserver

    settings = load_settings()
    # `serve` already migrated and initialised the database in one process before starting workers.
    return create_app(settings, keyserver=open_keyserver(settings, migrate=False, bootstrap=False))
