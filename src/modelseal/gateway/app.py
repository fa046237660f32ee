"""The gateway's HTTP front (docs/spec/gateway-v1.md §2, §3): parse, call the service, translate.

Bodies are read by the route itself, under the size limit and before any parsing, so an oversized
or malformed body is a 4xx without ever reaching the model; every :class:`~.errors.GatewayError`
becomes its status with a one-line JSON reason, and nothing a client sends produces a 500.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import (
    Forbidden,
    GatewayError,
    InvalidApiKey,
    MalformedRequest,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from .service import Gateway
from .store import ApiKey

log = logging.getLogger("modelseal.gateway")

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"

_PREDICT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "additionalProperties": False,
                    "properties": {
                        "inputs": {"type": "array", "description": "A batch of rows of the model's input shape."}
                    },
                }
            },
            NPY: {
                "schema": {"type": "string", "format": "binary", "description": "One .npy array; axis 0 is the batch."}
            },
        },
    },
    "responses": {
        "200": {
            "description": "Labels and the scores the key's policy lets it see.",
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "labels": {"type": "array", "items": {"type": "integer"}},
                            "scores": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                            "policy": {"type": "string"},
                        },
                    }
                },
                NPZ: {"schema": {"type": "string", "format": "binary", "description": ".npz with labels and scores"}},
            },
        },
        "400": {"description": "Malformed body, wrong shape or dtype, NaN or infinity, empty batch."},
        "401": {"description": "Missing, unknown, revoked or wrong API key."},
        "413": {"description": "Body or batch over the limit."},
        "415": {"description": "Content type other than application/json or application/x-npy."},
        "422": {"description": "The runtime refused an input that passed the checks."},
        "429": {"description": "A quota window is used up (Retry-After says when it resets)."},
        "503": {"description": "The quota store cannot be reached."},
    },
}


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    if isinstance(exc, InvalidApiKey):
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="modelseal"'}
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=headers)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_npy_header(body: bytes) -> None:
    """Refuse a ``.npy`` whose header declares more data than the body holds, before numpy allocates
    the declared shape (a 100-byte body could otherwise ask for gigabytes)."""
    buf = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buf)
        shape, _fortran, dtype = (
            np.lib.format.read_array_header_1_0(buf) if version == (1, 0) else np.lib.format.read_array_header_2_0(buf)
        )
    except Exception:  # numpy raises ValueError and friends for a bad header
        raise MalformedRequest("the body is not a valid .npy array (pickled objects are refused)") from None
    if dtype.hasobject:
        raise MalformedRequest("the body is not a valid .npy array (pickled objects are refused)")
    count = 1
    for d in shape:
        count *= int(d)
    if count * dtype.itemsize > len(body) - buf.tell():
        raise MalformedRequest("the .npy header declares more data than the body holds")


def parse_inputs(body: bytes, content_type: str) -> np.ndarray:
    """The batch in ``body`` (JSON ``{"inputs": [...]}`` or one ``.npy`` array)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == NPY:
        _check_npy_header(body)
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception:  # numpy raises ValueError, OSError, EOFError... for a bad .npy
            raise MalformedRequest("the body is not a valid .npy array (pickled objects are refused)") from None
        if not isinstance(arr, np.ndarray):
            raise MalformedRequest("the body must be one .npy array")
        return arr
    if kind not in ("", JSON):
        raise UnsupportedMediaType(f"send {JSON} or {NPY}, not {kind}")
    if not body:
        raise MalformedRequest("the body is empty")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise MalformedRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"inputs"}:
        raise MalformedRequest('the body must be a JSON object with exactly one field, "inputs"')
    try:
        arr = np.asarray(doc["inputs"])
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise MalformedRequest("inputs must be a rectangular array of numbers") from None
    if arr.dtype.kind not in "iuf":
        raise MalformedRequest("inputs must be a rectangular array of numbers")
    return arr


def create_app(gateway: Gateway) -> FastAPI:
    """An app serving ``gateway`` (started with the app, closed when it stops)."""
    config = gateway.config

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        gateway.start()
        try:
            yield
        finally:
            gateway.close()

    app = FastAPI(
        lifespan=lifespan,
        title="modelseal gateway",
        version="1",
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed"))
        if exc.status_code == 404:
            return error_response(NotFound("not found"))
        return JSONResponse({"error": {"code": "http-error", "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error (a bug)", exc_info=exc)
        return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, 500)

    def authenticate(request: Request, scope: str) -> ApiKey:
        key = gateway.authenticate(_bearer(request))
        if key is None:
            gateway.refused_unauthenticated("invalid-api-key")
            raise InvalidApiKey("a valid API key is required: Authorization: Bearer msk_...")
        if scope not in key.scopes:
            raise Forbidden(f"this key does not have the {scope!r} scope")
        return key

    @app.post("/v1/predict", openapi_extra=_PREDICT_DOC, summary="Predict a batch of inputs")
    async def predict(request: Request) -> Response:
        key = authenticate(request, "predict")
        accept = request.headers.get("accept", JSON)
        binary = NPZ in accept
        if not binary and not any(t in accept for t in (JSON, "*/*", "application/*")):
            raise NotAcceptable(f"answers are {JSON} or {NPZ}")
        body = await read_body(request, config.max_body_bytes)
        x = parse_inputs(body, request.headers.get("content-type", JSON))
        answer = gateway.predict(key, x)
        if binary:
            out = io.BytesIO()
            np.savez(out, labels=answer.labels.astype(np.int64), scores=answer.scores.astype(np.float32))
            return Response(out.getvalue(), media_type=NPZ, headers={"Modelseal-Policy": answer.policy})
        text = json.dumps(
            {"labels": answer.labels.tolist(), "scores": answer.scores.tolist(), "policy": answer.policy},
            separators=(",", ":"),
        )
        return Response(text, media_type=JSON)

    @app.get("/v1/model", summary="The served model and the caller's own limits and usage")
    async def model(request: Request) -> dict[str, Any]:
        key = authenticate(request, "predict")
        return {"model": gateway.runner.describe(), **gateway.key_state(key)}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        if not config.metrics_public:
            authenticate(request, "metrics")
        gateway.sync_metrics()
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
