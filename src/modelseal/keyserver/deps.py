"""Request dependencies: the service, admin authentication and strict JSON bodies (spec §7.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from .._private.encoding import loads_strict
from ..errors import FormatError
from .errors import DomainError, InvalidCredential, MalformedRequest, RequestTooLarge, UnsupportedMediaType
from .services import Admin, KeyServer

M = TypeVar("M", bound=BaseModel)
OPENAPI_COMPONENTS: dict[str, Any] = {}  # nested body schemas, added to the document by create_app
_bearer = HTTPBearer(auto_error=False, description="MSEAL-ADMIN:… admin token")


async def get_keyserver(request: Request) -> KeyServer:
    server: KeyServer = request.app.state.keyserver
    return server


KeyServerDep = Annotated[KeyServer, Depends(get_keyserver)]


def get_admin(
    server: KeyServerDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Admin:
    if credentials is None:
        raise InvalidCredential("an admin token is required (Authorization: Bearer MSEAL-ADMIN:…)")
    return server.authenticate_admin(credentials.credentials)


AdminDep = Annotated[Admin, Depends(get_admin)]


def require_admin_or_licence(
    server: KeyServerDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Admin, Licence or grant-token auth (``/v1/server-info``, spec §7.2); failures are ``invalid-credential``."""
    if credentials is None:
        raise InvalidCredential("an admin token or licence key is required")
    presented = credentials.credentials
    if presented.startswith(("MSEAL-LICENCE:", "MSEAL-GRANT-TOKEN:")):
        check = (
            server.authenticate_licence if presented.startswith("MSEAL-LICENCE:") else server.authenticate_grant_token
        )
        try:
            check(presented)
        except DomainError:
            raise InvalidCredential("invalid credential") from None
        return
    server.authenticate_admin(credentials.credentials)


def bearer(request: Request) -> str | None:
    """The ``Authorization: Bearer`` value as presented (None if absent or another scheme)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def client_ip(request: Request) -> str:
    """The socket peer, or the rightmost ``X-Forwarded-For`` address that is not a trusted proxy
    when the peer is one (spec §14)."""
    import ipaddress

    peer = request.client.host if request.client else "unknown"
    proxies = request.app.state.settings.trusted_proxies
    if not proxies:
        return peer

    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip())
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in proxies)

    if not trusted(peer):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted(hop):
            return hop
    return peer


def parse_body(model: type[M], raw: bytes) -> M:
    """The raw body as strict JSON validated as ``model`` (400 ``malformed-request`` otherwise)."""
    return _validated(model, raw)


async def read_json(request: Request) -> None:
    """Media type, then size (checked while reading); runs before authentication (spec §7.1)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    limit: int = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body exceeds {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestTooLarge(f"the request body exceeds {limit} bytes")
    request.state.raw_body = bytes(raw)


def _validated(model: type[M], raw: bytes) -> M:
    try:
        value = loads_strict(raw, section="request body")
    except FormatError as exc:
        raise MalformedRequest(exc.detail, fields=["$"]) from None
    try:
        return model.model_validate(value, strict=True)
    except ValidationError as exc:
        paths = ("$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]) for e in exc.errors())
        raise MalformedRequest("the request body does not match the schema", fields=sorted(set(paths))) from None


def body(model: type[M]) -> Callable[[Request], M]:
    """Dependency: the body as strict JSON (no duplicates, fractions, NaN) validated as ``model``.

    Declare ``read_json`` on the route and the admin dependency before this one, so the order of
    checks is size and media type → credential → body.
    """

    def dependency(request: Request) -> M:
        return _validated(model, request.state.raw_body)

    return dependency


def json_body_docs(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route whose body is parsed by :func:`read_json`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    OPENAPI_COMPONENTS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
