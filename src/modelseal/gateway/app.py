"""The gateway's HTTP front (docs/spec/gateway-v1.md §2, §3): parse, call the service, translate.

Bodies are read by the route itself, under the size limit and before any parsing, so an oversized
or malformed body is a 4xx without ever reaching the model; every :class:`~.errors.GatewayError`
becomes its status with a one-line JSON reason, and nothing a client sends produces a 500.

Predictions that arrive together are answered together (:class:`Coalescer`): a request queues its
parsed rows and the first one schedules a flush for the event loop's next turn, so every request
whose bytes were read in the same turn goes through :meth:`Gateway.predict_many` in one call. No
request waits for a timer; one arriving alone is answered alone. With a quota store across the
network (Redis), that call runs on a worker thread, one flush at a time, and the requests arriving
meanwhile join the next flush: a slow or unreachable Redis then delays predictions (until its
timeout gives a 503) but never stalls the event loop, so health checks and other routes still answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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
from .service import Answer, Gateway
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


def error_response(exc: GatewayError) -> Response:
    status, headers, body = _error_reply(exc)
    return Response(body, status, headers={k: v for k, v in headers if k != "content-type"}, media_type=JSON)


_Reply = tuple[int, list[tuple[str, str]], bytes]


def _error_reply(exc: GatewayError) -> _Reply:
    headers = [("content-type", JSON)]
    if exc.retry_after is not None:
        headers.append(("retry-after", str(exc.retry_after)))
    if isinstance(exc, InvalidApiKey):
        headers.append(("www-authenticate", 'Bearer realm="modelseal"'))
    body = json.dumps({"error": {"code": exc.code, "message": exc.message}}, separators=(",", ":"))
    return exc.status, headers, body.encode()


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes (``declared`` is
    the Content-Length header, if any)."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


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


class Coalescer:
    """Answers the predictions queued during one turn of the event loop in one service call.

    ``offload``: make that call on a worker thread (one at a time) instead of on the event loop.
    """

    def __init__(self, gateway: Gateway, *, offload: bool = False) -> None:
        self._gateway = gateway
        self._pending: list[tuple[ApiKey, np.ndarray, asyncio.Future[Answer]]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if offload:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modelseal-predict")
        self._busy = False  # a flush is running on the worker thread

    async def predict(self, key: ApiKey, x: np.ndarray) -> Answer:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the tasks already runnable: their requests join
        self._pending.append((key, x, future))
        return await future

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _flush(self) -> None:
        if self._busy or not self._pending:
            return  # the running flush starts the next one when it finishes
        pending, self._pending = self._pending, []
        requests = [(key, x) for key, x, _ in pending]
        if self._executor is None:
            try:
                results = self._gateway.predict_many(requests)
            except Exception as exc:
                self._deliver(pending, exc)
                return
            self._deliver(pending, results)
            return
        self._busy = True
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._executor, self._gateway.predict_many, requests)
        running.add_done_callback(lambda done: self._finished(pending, done))

    def _finished(
        self, pending: list[tuple[ApiKey, np.ndarray, asyncio.Future[Answer]]], done: asyncio.Future[Any]
    ) -> None:
        self._busy = False
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        self._deliver(pending, exc if exc is not None else done.result())
        if self._pending:
            asyncio.get_running_loop().call_soon(self._flush)

    @staticmethod
    def _deliver(
        pending: list[tuple[ApiKey, np.ndarray, asyncio.Future[Answer]]],
        results: list[Answer | Exception] | BaseException,
    ) -> None:
        if isinstance(results, BaseException):  # a bug: every request of the flush gets it (a 500, logged)
            for _, _, future in pending:
                if not future.done():
                    future.set_exception(results)
            return
        for (_, _, future), result in zip(pending, results, strict=True):
            if future.done():  # the client went away and its request was cancelled
                continue
            if isinstance(result, Answer):
                future.set_result(result)
            else:
                future.set_exception(result)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class PredictFront:
    """The ASGI app ``serve`` runs: ``POST /v1/predict`` straight to the prediction core, the rest
    (documentation, ``/v1/model``, metrics, lifespan) through FastAPI (:attr:`api`).

    The hot path skips FastAPI's routing, middleware and response layers, which cost about as much
    CPU per 1-row request as the gateway's own work; the FastAPI route for ``/v1/predict`` calls the
    same core, so both answer byte for byte alike (tested), and OpenAPI documents it.
    """

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self._core = api.state.predict_core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST":
            await self.api(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            status, out_headers, body = await self._core(headers, chunks())
        except _Disconnected:  # the client left before sending its body: nobody to answer
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out_headers]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


class _Disconnected(Exception):
    pass


def create_app(gateway: Gateway) -> PredictFront:
    """An app serving ``gateway`` (started with the app, closed when it stops)."""
    config = gateway.config

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        gateway.start()
        try:
            yield
        finally:
            coalescer.close()
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
    coalescer = Coalescer(gateway, offload=gateway.quota.remote)

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed"))
        if exc.status_code == 404:
            return error_response(NotFound("not found"))
        return JSONResponse({"error": {"code": "http-error", "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error (a bug)", exc_info=exc)
        return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, 500)

    def authenticate(authorization: str, scope: str) -> ApiKey:
        key = gateway.authenticate(_bearer(authorization))
        if key is None:
            gateway.refused_unauthenticated("invalid-api-key")
            raise InvalidApiKey("a valid API key is required: Authorization: Bearer msk_...")
        if scope not in key.scopes:
            raise Forbidden(f"this key does not have the {scope!r} scope")
        return key

    @app.post("/v1/predict", openapi_extra=_PREDICT_DOC, summary="Predict a batch of inputs")
    async def predict(request: Request) -> Response:
        # served by the ASGI front below (PredictFront); this route documents it and answers alike
        status, headers, body = await predict_core(request.headers, request.stream())
        return Response(body, status, headers=dict(headers))

    async def predict_core(headers: Mapping[str, str], chunks: AsyncIterator[bytes]) -> _Reply:
        """(status, headers, body) for one prediction request; every error becomes its 4xx/5xx."""
        try:
            key = authenticate(headers.get("authorization", ""), "predict")
            accept = headers.get("accept", JSON)
            binary = NPZ in accept
            if not binary and not any(t in accept for t in (JSON, "*/*", "application/*")):
                raise NotAcceptable(f"answers are {JSON} or {NPZ}")
            body = await read_body(headers.get("content-length"), chunks, config.max_body_bytes)
            x = parse_inputs(body, headers.get("content-type", JSON))
            answer = await coalescer.predict(key, x)
        except GatewayError as exc:
            return _error_reply(exc)
        except (_Disconnected, ClientDisconnect):
            raise  # the client is gone: nothing to answer
        except Exception as exc:  # a bug: logged, and a bare 500 with no detail
            log.error("internal error (a bug)", exc_info=exc)
            return 500, [("content-type", JSON)], b'{"error":{"code":"internal","message":"internal error"}}'
        if binary:
            out = io.BytesIO()
            np.savez(out, labels=answer.labels.astype(np.int64), scores=answer.scores.astype(np.float32))
            return 200, [("content-type", NPZ), ("modelseal-policy", answer.policy)], out.getvalue()
        text = json.dumps(
            {"labels": answer.labels.tolist(), "scores": answer.scores.tolist(), "policy": answer.policy},
            separators=(",", ":"),
        )
        return 200, [("content-type", JSON)], text.encode()

    app.state.predict_core = predict_core

    @app.get("/v1/model", summary="The served model and the caller's own limits and usage")
    async def model(request: Request) -> dict[str, Any]:
        key = authenticate(request.headers.get("authorization", ""), "predict")
        return {"model": gateway.runner.describe(), **gateway.key_state(key)}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        if not config.metrics_public:
            authenticate(request.headers.get("authorization", ""), "metrics")
        gateway.sync_metrics()
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return PredictFront(app)
