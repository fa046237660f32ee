"""HTTP conventions (spec §7.1, §16): error bodies, authentication everywhere, 4xx never 500."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from modelseal.keyserver import errors
from modelseal.keyserver.app import create_app
from modelseal.keyserver.services import KeyServer
from modelseal.keyserver.settings import Settings

EXEMPT = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
MDL = "mdl_AAAAAAAAAAAAAAAAAAAAAA"


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["request_id"]
    return dict(body["error"])


def test_healthz_and_readyz(client: TestClient) -> None:
    anonymous = {"Authorization": ""}
    assert client.get("/healthz", headers=anonymous).json() == {"status": "ok"}
    r = client.get("/readyz", headers=anonymous)
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_readyz_is_503_on_an_unmigrated_database(tmp_path: Path, keyserver: KeyServer, settings: Settings) -> None:
    from sqlalchemy import text

    with keyserver.db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    with TestClient(create_app(settings, keyserver=keyserver)) as c:
        assert c.get("/readyz").status_code == 503


def test_server_info(client: TestClient, keyserver: KeyServer) -> None:
    info = client.get("/v1/server-info").json()
    assert info["v"] == 1 and info["public_url"] == "https://keys.example.com"
    assert info["clock_skew_s"] == 300 and info["offline_request_max_age_s"] == 604800
    [signing] = info["signing_keys"]
    assert signing["current"] is True
    from modelseal._private.encoding import b64decode
    from modelseal.keyserver.crypto import server_key_id

    pub = b64decode(signing["public_key"], length=32)
    assert b64decode(signing["kid"], length=8) == server_key_id(pub) == keyserver.secrets.signing_kid
    escrow_pub = keyserver.secrets.escrow_key.public_key().public_bytes_raw()
    assert b64decode(info["escrow_key"]["public_key"]) == escrow_pub
    assert abs(info["time"] - keyserver.clock.time()) < 5


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer nonsense", "Basic abc", "Bearer MSEAL-LICENCE:abc", "Bearer MSEAL-ADMIN:" + "A" * 70],
)
def test_bad_credentials_are_401(client: TestClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    client.headers.pop("Authorization")
    _error(client.get("/v1/server-info", headers=headers), 401, "invalid-credential")


def _routes() -> list[tuple[str, str]]:
    from modelseal.keyserver.routes import router

    out = []
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path not in EXEMPT:
            path = route.path.replace("{model_id}", MDL).replace("{key_commitment}", "A" * 43)
            path = path.replace("{licence_id}", "lic_" + "A" * 22).replace("{device_id}", "dev_" + "A" * 22)
            out += [(m, path) for m in route.methods]
    return out


def test_every_route_authenticates(client: TestClient) -> None:
    routes = _routes()
    assert len(routes) >= 7
    client.headers.pop("Authorization")
    for method, path in routes:
        # Licence routes answer invalid-licence; every other route invalid-credential.
        licence_routes = ("/v1/activations", "/v1/grants", "/v1/offline/requests")
        code = "invalid-licence" if path in licence_routes else "invalid-credential"
        code = "invalid-token" if path == "/v1/grant-tokens/redeem" else code
        for headers in ({}, {"Authorization": "Bearer MSEAL-LICENCE:" + "A" * 70}):
            r = client.request(method, path, headers=headers, json={})
            _error(r, 401, code)
        if code != "invalid-credential":  # and the wrong kind of credential
            _error(client.request(method, path, headers={"Authorization": "Bearer MSEAL-ADMIN:x"}, json={}), 401, code)


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    _error(client.get("/v1/nothing-here"), 404, "not-found")
    _error(client.delete("/v1/server-info"), 405, "method-not-allowed")


def test_openapi_lists_every_route(client: TestClient) -> None:
    r = client.get("/openapi.json", headers={"Authorization": ""})
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    for path in ["/v1/server-info", "/v1/admin/models", "/v1/admin/models/{model_id}/keys", "/v1/admin/audit"]:
        assert path in doc["paths"]
    post = doc["paths"]["/v1/admin/models"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["properties"]["name"]
    assert {"401", "409"} <= set(post["responses"])
    refs = [m.group(1) for m in __import__("re").finditer(r'"#/components/schemas/([^"]+)"', r.text)]
    assert refs and all(ref in doc["components"]["schemas"] for ref in refs)


def test_docs_can_be_turned_off(settings: Settings, keyserver: KeyServer) -> None:
    with TestClient(create_app(settings.model_copy(update={"docs": False}), keyserver=keyserver)) as c:
        assert c.get("/openapi.json").status_code == 404


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"{", "truncated"),
    (b"\xff\xfe", "invalid utf-8"),
    (b'{"name": "a", "name": "b"}', "duplicate member"),
    (b'{"name": 1.5}', "float"),
    (b'{"name": NaN}', "NaN"),
    (b'{"name": 18446744073709551616}', "2^64 integer"),
    (b'{"name": 5}', "wrong type"),
    (b'{"name": ""}', "empty text"),
    (b'{"name": "a\\u0000b"}', "control character"),
    (b'{"name": "' + b"x" * 129 + b'"}', "too long"),
    (b'{"name": "ok", "extra": 1}', "unknown member"),
    (b"[]", "not an object"),
    (b"null", "null"),
    (b"[" * 5000 + b"]" * 5000, "deep nesting"),
    (b"", "empty"),
    (b'{"name": "\\ud800"}', "lone surrogate"),
    (b'{"name": "\\u0085"}', "C1 control"),
]


@pytest.mark.parametrize(("raw", "why"), BAD_BODIES, ids=[w for _, w in BAD_BODIES])
def test_malformed_bodies_are_400(client: TestClient, raw: bytes, why: str) -> None:
    r = client.post("/v1/admin/models", content=raw, headers={"Content-Type": "application/json"})
    err = _error(r, 400, "malformed-request")
    assert "fields" in err and "x" * 129 not in r.text


def test_fields_name_the_member_without_echoing_values(client: TestClient) -> None:
    body = {"key_commitment": "secret-looking-value", "salt": "A" * 44, "escrow": {"epk": 7, "body": "B"}}
    err = _error(client.post(f"/v1/admin/models/{MDL}/keys", json=body), 400, "malformed-request")
    assert err["fields"] == ["$.escrow.body", "$.escrow.epk", "$.key_commitment", "$.salt"]
    assert "secret-looking-value" not in str(err)
    body = {"key_commitment": "A" * 43 + "B", "salt": "A" * 42 + "B=", "escrow": {"epk": "A" * 44, "body": "A" * 64}}
    err = _error(client.post(f"/v1/admin/models/{MDL}/keys", json=body), 400, "malformed-request")
    assert err["fields"] == ["$.escrow.epk", "$.key_commitment", "$.salt"]  # bad padding, non-canonical bits


def test_size_and_media_type_are_checked_before_credentials(client: TestClient) -> None:
    client.headers.pop("Authorization")
    _error(client.post("/v1/admin/models", content=b"x"), 415, "unsupported-media-type")
    big = b'{"name": "' + b"x" * 70000 + b'"}'
    _error(
        client.post("/v1/admin/models", content=big, headers={"Content-Type": "application/json"}),
        413,
        "request-too-large",
    )
    # then credentials, before the body's syntax or schema
    _error(client.post("/v1/admin/models", json={"bad": 1}), 401, "invalid-credential")
    r = client.post("/v1/admin/models", content=b"{", headers={"Content-Type": "application/json"})
    _error(r, 401, "invalid-credential")


def test_media_type_and_size(client: TestClient) -> None:
    _error(client.post("/v1/admin/models", content=b'{"name":"a"}'), 415, "unsupported-media-type")
    _error(
        client.post("/v1/admin/models", content=b'{"name":"a"}', headers={"Content-Type": "text/plain"}),
        415,
        "unsupported-media-type",
    )
    big = b'{"name": "' + b"x" * (10 << 20) + b'"}'
    r = client.post("/v1/admin/models", content=big, headers={"Content-Type": "application/json"})
    _error(r, 413, "request-too-large")

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/admin/models", content=chunks(), headers={"Content-Type": "application/json"})
    _error(r, 413, "request-too-large")


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "limit=abc", "after_seq=-1", "chain=x", "after_seq=99999999999999999999999", "after=%00"],
)
def test_bad_query_parameters_are_400(client: TestClient, query: str) -> None:
    path = "/v1/admin/audit" if "seq" in query or "chain" in query else "/v1/admin/models"
    err = _error(client.get(f"{path}?{query}"), 400, "malformed-request")
    assert err["fields"]


def test_error_classes_match_the_catalogue() -> None:
    table = {
        errors.MalformedRequest: (400, "malformed-request"),
        errors.InvalidPublicKey: (400, "invalid-public-key"),
        errors.EscrowInvalid: (400, "escrow-invalid"),
        errors.CommitmentMismatch: (400, "commitment-mismatch"),
        errors.InvalidCredential: (401, "invalid-credential"),
        errors.NotFound: (404, "not-found"),
        errors.Conflict: (409, "conflict"),
        errors.RequestTooLarge: (413, "request-too-large"),
        errors.UnsupportedMediaType: (415, "unsupported-media-type"),
        errors.Busy: (503, "busy"),
        errors.KeyUnavailable: (503, "unavailable"),
    }
    for cls, (status, code) in table.items():
        assert (cls.status, cls.code) == (status, code)
        assert issubclass(cls, errors.DomainError)


def test_domain_errors_map_through_one_handler(client: TestClient, keyserver: KeyServer, monkeypatch: Any) -> None:
    def busy(*a: object, **k: object) -> None:
        raise errors.Busy("try again")

    monkeypatch.setattr(keyserver, "server_info", busy)
    r = client.get("/v1/server-info")
    _error(r, 503, "busy")
    assert r.headers["Retry-After"]


def test_dev_mode_header(settings: Settings, keyserver: KeyServer) -> None:
    with TestClient(create_app(settings.model_copy(update={"dev": True}), keyserver=keyserver)) as c:
        assert c.get("/healthz").headers["Modelseal-Dev-Mode"] == "1"
    with TestClient(create_app(settings, keyserver=keyserver)) as c:
        assert "Modelseal-Dev-Mode" not in c.get("/healthz").headers


def test_routes_do_not_touch_the_database_layer() -> None:
    package = Path(__file__).parents[2] / "src" / "modelseal" / "keyserver"
    for name in ("routes.py", "deps.py", "api_models.py"):
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert not mod.startswith("sqlalchemy") and mod not in ("repository", "schema"), (name, mod)
                assert not {a.name for a in node.names} & {"repository", "schema"}, name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("sqlalchemy") for a in node.names), name
    for name in ("services.py", "repository.py", "audit.py", "crypto.py"):
        source = (package / name).read_text()
        assert "fastapi" not in source and "starlette" not in source, name
