"""HTTP routes (spec §7): authenticate, parse, call one service function, serialise. No SQL here."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from .._private.encoding import b64decode, b64encode
from . import api_models as api
from .crypto import b64url_decode, is_id
from .deps import AdminDep, KeyServerDep, body, json_body_docs, read_json
from .errors import NotFound
from .services import Model

router = APIRouter()
Limit = Annotated[int, Query(ge=1, le=500)]
AfterModel = Annotated[str | None, Query(pattern=r"^mdl_[A-Za-z0-9_-]{22}$")]
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


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
def readyz(server: KeyServerDep, response: Response) -> dict[str, str]:
    if server.db.is_ready():
        return {"status": "ready"}
    response.status_code = 503
    return {"status": "not-ready"}


@router.get("/v1/server-info", responses=_ERRORS)
def server_info(admin: AdminDep, server: KeyServerDep) -> dict[str, Any]:
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
