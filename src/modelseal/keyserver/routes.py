"""HTTP routes (spec §7): authenticate, parse, call one service function, serialise. No SQL here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from .._private.encoding import b64decode, b64encode, loads_strict
from ..errors import FormatError
from . import api_models as api
from .crypto import b64url_decode, is_id
from .deps import (
    AdminDep,
    KeyServerDep,
    bearer,
    body,
    client_ip,
    json_body_docs,
    parse_body,
    read_json,
    require_admin_or_licence,
)
from .errors import DomainError, MalformedRequest, NotFound
from .services import ActivationRequest, GrantRequest, KeyServer, Model, Policy

router = APIRouter()
Limit = Annotated[int, Query(ge=1, le=500)]
AfterModel = Annotated[str | None, Query(pattern=r"^mdl_[A-Za-z0-9_-]{22}$")]
LicenceQuery = Annotated[str | None, Query(pattern=r"^lic_[A-Za-z0-9_-]{22}$")]
DeviceQuery = Annotated[str | None, Query(pattern=r"^dev_[A-Za-z0-9_-]{22}$")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {400: "malformed-request", 401: "invalid-credential", 404: "not-found", 503: "busy"}.items()
}


def _model_view(m: Model) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "created_at": m.created_at, "keys": m.keys}


def _model_id(model_id: str) -> str:
    if not is_id(model_id, "mdl"):
        raise NotFound("no such model")
    return model_id


@contextmanager
def _counting_auth_failures(server: KeyServer, ip: str) -> Iterator[None]:
    """Count every 401 against the client's address (spec §14): once over its window, its
    failures become 429 ``rate-limited``."""
    try:
        yield
    except DomainError as exc:
        if exc.status == 401:
            server.note_auth_failure(ip)  # raises rate-limited once this IP is over its window
        raise


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
def readyz(server: KeyServerDep, response: Response) -> dict[str, str]:
    if server.db.is_ready():
        return {"status": "ready"}
    response.status_code = 503
    return {"status": "not-ready"}


@router.get("/v1/server-info", responses=_ERRORS, dependencies=[Depends(require_admin_or_licence)])
def server_info(server: KeyServerDep) -> dict[str, Any]:
    return server.server_info()


@router.post(
    "/v1/admin/models",
    status_code=201,
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.ModelCreate),
    responses={**_ERRORS, 409: {"description": "conflict"}},
)
def create_model(
    admin: AdminDep, server: KeyServerDep, req: Annotated[api.ModelCreate, Depends(body(api.ModelCreate))]
) -> dict[str, Any]:
    return _model_view(server.create_model(admin, req.name))


@router.get("/v1/admin/models", responses=_ERRORS)
def list_models(admin: AdminDep, server: KeyServerDep, limit: Limit = 100, after: AfterModel = None) -> dict[str, Any]:
    items, next_id = server.list_models(admin, after=after, limit=limit)
    return {"items": [_model_view(m) for m in items], "next": next_id}


@router.get("/v1/admin/models/{model_id}", responses=_ERRORS)
def get_model(admin: AdminDep, server: KeyServerDep, model_id: str) -> dict[str, Any]:
    return _model_view(server.get_model(admin, _model_id(model_id)))


@router.post(
    "/v1/admin/models/{model_id}/keys",
    status_code=201,
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.KeyRegister),
    responses={**_ERRORS, 200: {"description": "already registered"}, 409: {"description": "conflict"}},
)
def register_key(
    admin: AdminDep,
    server: KeyServerDep,
    model_id: str,
    req: Annotated[api.KeyRegister, Depends(body(api.KeyRegister))],
    response: Response,
) -> dict[str, Any]:
    result = server.register_key(
        admin,
        _model_id(model_id),
        key_commitment=b64decode(req.key_commitment),
        salt=b64decode(req.salt),
        epk=b64decode(req.escrow.epk),
        body=b64decode(req.escrow.body),
    )
    if not result.created:
        response.status_code = 200
    return {"model_id": result.model_id, "key_commitment": b64encode(result.key_commitment), "stanza": result.stanza}


@router.post(
    "/v1/admin/models/{model_id}/keys/{key_commitment}/revoke",
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.Revoke),
    responses=_ERRORS,
)
def revoke_key(
    admin: AdminDep,
    server: KeyServerDep,
    model_id: str,
    key_commitment: str,
    req: Annotated[api.Revoke, Depends(body(api.Revoke))],
) -> dict[str, Any]:
    try:
        commitment = b64url_decode(key_commitment)
    except ValueError:
        raise NotFound("no such key") from None
    if len(commitment) != 32:
        raise NotFound("no such key")
    return server.revoke_key(admin, _model_id(model_id), commitment, req.reason)


def _checked_id(value: str, prefix: str, what: str) -> str:
    if not is_id(value, prefix):
        raise NotFound(f"no such {what}")
    return value


_ACTIVATION_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the device was already registered (idempotent)"},
    400: {"description": "malformed-request, invalid-public-key"},
    401: {"description": "invalid-licence, invalid-signature, stale-request, wrong-audience"},
    403: {"description": "licence-revoked, licence-expired, device-revoked, device-mismatch, device-limit-reached"},
    429: {"description": "rate-limited"},
    503: {"description": "busy"},
}


@router.post(
    "/v1/activations",
    status_code=201,
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.Activate),
    responses=_ACTIVATION_ERRORS,
)
def activate(server: KeyServerDep, request: Request, response: Response) -> dict[str, Any]:
    """Register a device under a licence (spec §7.3). Checks in the order of spec §7.1."""
    ip, presented = client_ip(request), bearer(request)
    server.rate_limit_activation(ip, presented)
    with _counting_auth_failures(server, ip):
        licence = server.authenticate_licence(presented)
        raw = request.state.raw_body
        req = parse_body(api.Activate, raw)
        result = server.activate(
            licence,
            ActivationRequest(
                aud=b64decode(req.aud),
                ts=req.ts,
                x25519_pk=b64decode(req.x25519_public_key),
                ed25519_pk=b64decode(req.ed25519_public_key),
                fingerprint=b64decode(req.fingerprint),
                label=req.label,
                raw_body=raw,
                signature=request.headers.get("modelseal-signature"),
            ),
        )
    if not result.created:
        response.status_code = 200
    return {
        "device_id": result.device_id,
        "licence_id": result.licence_id,
        "activated_at": result.activated_at,
        "policy": result.policy,
        "server": server.server_info(),
    }


_GRANT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed-request"},
    401: {"description": "invalid-licence, invalid-signature, stale-request, wrong-audience, replayed-request"},
    403: {
        "description": "licence-revoked, licence-expired, device-revoked, device-mismatch, model-not-licensed, "
        "key-revoked"
    },
    404: {"description": "key-not-registered"},
    429: {"description": "usage-limit-reached, rate-limited"},
    503: {"description": "busy"},
}


@router.post("/v1/grants", openapi_extra=json_body_docs(api.GrantIn), responses=_GRANT_ERRORS)
async def grant(request: Request) -> Response:
    """A signed key grant for a registered device (spec §7.4, §8). Checks in the order of spec §7.1.

    On SQLite the whole grant runs on the event loop, not in the thread pool: it is a few hundred
    microseconds of CPU and short local statements, and the thread hop (with its GIL hand-offs)
    cost more than the work (docs/benchmarks.md). On PostgreSQL, where every statement is a
    network round trip, it runs in the thread pool so that other requests use the waits. For the
    same reason it takes no FastAPI dependencies: it reads the body and the server itself.
    """
    await read_json(request)
    server: KeyServer = request.app.state.keyserver
    work = (
        request.state.raw_body,
        bearer(request),
        request.headers.get("modelseal-signature"),
        client_ip(request),
    )
    if server.db.is_sqlite:
        signed = _grant(server, *work)
    else:
        signed = await run_in_threadpool(_grant, server, *work)
    return Response(json.dumps(signed, separators=(",", ":")), media_type="application/json")


def _grant(server: KeyServer, raw: bytes, presented: str | None, signature: str | None, ip: str) -> dict[str, str]:
    with _counting_auth_failures(server, ip):
        try:
            req = parse_body(api.GrantIn, raw)
        except DomainError:
            server.authenticate_licence(presented)  # a bad credential is reported before a bad body
            raise
        grant_request = GrantRequest(
            aud=b64decode(req.aud),
            ts=req.ts,
            device_id=req.device_id,
            model_id=req.model_id,
            key_commitment=b64decode(req.key_commitment),
            fingerprint=b64decode(req.fingerprint),
            raw_body=raw,
            signature=signature,
        )
        return server.grant_with_licence_key(presented, grant_request)


_TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed-request, invalid-public-key"},
    401: {"description": "invalid-token"},
    403: {
        "description": "token-expired, licence-revoked, licence-expired, model-not-licensed, key-revoked, "
        "device-mismatch, device-revoked"
    },
    404: {"description": "key-not-registered"},
    409: {"description": "token-already-redeemed"},
    429: {"description": "usage-limit-reached, rate-limited"},
    503: {"description": "busy"},
}


@router.post(
    "/v1/grant-tokens/redeem",
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.GrantTokenRedeem),
    responses=_TOKEN_ERRORS,
)
def redeem_grant_token(server: KeyServerDep, request: Request) -> dict[str, Any]:
    """A signed grant for a one-time token (spec §7.5, §9); a token redeems once."""
    ip, presented = client_ip(request), bearer(request)
    with _counting_auth_failures(server, ip):
        token = server.authenticate_grant_token(presented)  # authentication before the body (spec §7.1)
        req = parse_body(api.GrantTokenRedeem, request.state.raw_body)
        return server.redeem_authenticated(
            token,
            x25519_pk=b64decode(req.x25519_public_key),
            model_id=req.model_id,
            key_commitment=b64decode(req.key_commitment),
        )


@router.post(
    "/v1/admin/grant-tokens",
    status_code=201,
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.GrantTokenCreate),
    responses=_ERRORS,
)
def create_grant_token(
    admin: AdminDep, server: KeyServerDep, req: Annotated[api.GrantTokenCreate, Depends(body(api.GrantTokenCreate))]
) -> dict[str, Any]:
    """A one-time grant token (spec §7.7), shown once; hand it over in a one-time link's body."""
    return server.create_grant_token(
        admin,
        licence_id=req.licence_id,
        model_id=req.model_id,
        key_commitment=b64decode(req.key_commitment) if req.key_commitment else None,
        device_id=req.device_id,
        expires_in_s=req.expires_in_s,
        grant_ttl_s=req.grant_ttl_s,
    )


@router.post(
    "/v1/offline/requests",
    dependencies=[Depends(read_json)],
    responses={
        **_GRANT_ERRORS,
        401: {"description": "invalid-licence, invalid-signature, wrong-audience"},
        403: {"description": "request-expired and the activation denials"},
        409: {"description": "request-already-used"},
    },
)
def offline_request(server: KeyServerDep, request: Request) -> dict[str, Any]:
    """Answer an air-gapped device's request file with a signed response file (spec §7.9, §11)."""
    ip, presented = client_ip(request), bearer(request)
    server.rate_limit_activation(ip, presented)  # it may activate a device: the same limits
    with _counting_auth_failures(server, ip):
        licence = server.authenticate_licence(presented)
        try:
            request_file = loads_strict(request.state.raw_body, section="request body")
        except FormatError as exc:
            raise MalformedRequest(exc.detail, fields=["$"]) from None
        return server.process_offline(licence, request_file)


@router.post(
    "/v1/admin/licences",
    status_code=201,
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.LicenceCreate),
    responses=_ERRORS,
)
def create_licence(
    admin: AdminDep, server: KeyServerDep, req: Annotated[api.LicenceCreate, Depends(body(api.LicenceCreate))]
) -> dict[str, Any]:
    p = req.policy
    policy = Policy(
        models=tuple(p.models),
        max_devices=p.max_devices,
        expires_at=p.expires_at,
        opens_per_day=p.opens_per_day,
        offline_grace_s=p.offline_grace_s,
        recheck_interval_s=p.recheck_interval_s,
        grant_ttl_s=p.grant_ttl_s,
    )
    licence, key = server.create_licence(admin, policy, label=req.label)
    return {"licence": licence, "licence_key": key}


@router.get("/v1/admin/licences", responses=_ERRORS)
def list_licences(
    admin: AdminDep,
    server: KeyServerDep,
    status: Literal["active", "revoked", "expired", "all"] = "all",
    model_id: AfterModel = None,
    limit: Limit = 100,
    after: LicenceQuery = None,
) -> dict[str, Any]:
    items, next_id = server.list_licences(admin, status=status, model_id=model_id, after=after, limit=limit)
    return {"items": items, "next": next_id}


@router.get("/v1/admin/licences/{licence_id}", responses=_ERRORS)
def get_licence(admin: AdminDep, server: KeyServerDep, licence_id: str) -> dict[str, Any]:
    return server.get_licence(admin, _checked_id(licence_id, "lic", "licence"))


@router.patch(
    "/v1/admin/licences/{licence_id}",
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.LicencePatch),
    responses=_ERRORS,
)
def update_licence(
    admin: AdminDep,
    server: KeyServerDep,
    licence_id: str,
    req: Annotated[api.LicencePatch, Depends(body(api.LicencePatch))],
) -> dict[str, Any]:
    """Change a licence's policy or label in place (spec §7.7); ``null`` clears ``expires_at`` and
    ``opens_per_day``."""
    changes = req.policy.model_dump(exclude_unset=True)
    return server.update_licence(admin, _checked_id(licence_id, "lic", "licence"), changes, label=req.label)


@router.post(
    "/v1/admin/licences/{licence_id}/revoke",
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.Revoke),
    responses=_ERRORS,
)
def revoke_licence(
    admin: AdminDep, server: KeyServerDep, licence_id: str, req: Annotated[api.Revoke, Depends(body(api.Revoke))]
) -> dict[str, Any]:
    return server.revoke_licence(admin, _checked_id(licence_id, "lic", "licence"), req.reason)


@router.get("/v1/admin/devices", responses=_ERRORS)
def list_devices(
    admin: AdminDep,
    server: KeyServerDep,
    licence_id: LicenceQuery = None,
    status: Literal["active", "revoked", "all"] = "all",
    limit: Limit = 100,
    after: DeviceQuery = None,
) -> dict[str, Any]:
    items, next_id = server.list_devices(admin, licence_id=licence_id, status=status, after=after, limit=limit)
    return {"items": items, "next": next_id}


@router.get("/v1/admin/devices/{device_id}", responses=_ERRORS)
def get_device(admin: AdminDep, server: KeyServerDep, device_id: str) -> dict[str, Any]:
    return server.get_device(admin, _checked_id(device_id, "dev", "device"))


@router.post(
    "/v1/admin/devices/{device_id}/revoke",
    dependencies=[Depends(read_json)],
    openapi_extra=json_body_docs(api.Revoke),
    responses=_ERRORS,
)
def revoke_device(
    admin: AdminDep, server: KeyServerDep, device_id: str, req: Annotated[api.Revoke, Depends(body(api.Revoke))]
) -> dict[str, Any]:
    return server.revoke_device(admin, _checked_id(device_id, "dev", "device"), req.reason)


@router.get("/v1/admin/audit", responses=_ERRORS)
def list_audit(
    admin: AdminDep,
    server: KeyServerDep,
    after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
    chain: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Limit = 100,
) -> dict[str, Any]:
    items, next_seq = server.list_audit(admin, chain=chain, after_seq=after_seq, limit=limit)
    return {"items": items, "next_seq": next_seq}


# Routes are tried in order; the grant route is the hot path, so it is tried first.
router.routes.sort(key=lambda route: getattr(route, "path", "") != "/v1/grants")
