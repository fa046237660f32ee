"""Publishers and admin tokens (spec §3): keyed hashes only, constant-time checks, no oracle."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from modelseal.keyserver.crypto import ADMIN_PREFIX, decode_secret, encode_secret, make_id, secret_hash
from modelseal.keyserver.errors import Conflict, InvalidCredential, NotFound
from modelseal.keyserver.services import KeyServer


def test_token_string_format(keyserver: KeyServer) -> None:
    token_id, token = keyserver.create_admin_token("default", label="ci")
    assert token.startswith(ADMIN_PREFIX) and len(token) == len(ADMIN_PREFIX) + 70
    parsed = decode_secret(ADMIN_PREFIX, token)
    assert parsed is not None and token_id == make_id("adm", parsed.id16)
    assert keyserver.authenticate_admin(token).token_id == token_id


def test_only_a_keyed_hash_is_stored(keyserver: KeyServer) -> None:
    token_id, token = keyserver.create_admin_token("default")
    parsed = decode_secret(ADMIN_PREFIX, token)
    assert parsed is not None
    with keyserver.db.read() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM admin_tokens WHERE id = :i"), {"i": token_id}).scalar_one()
        everything = [
            str(list(r)) for t in ("admin_tokens", "audit_log") for r in conn.execute(text(f"SELECT * FROM {t}"))
        ]
    assert bytes(stored) == secret_hash(keyserver.secrets.pepper, "admin", parsed.id16, parsed.secret32)
    assert bytes(stored) != secret_hash(bytes(32), "admin", parsed.id16, parsed.secret32)  # keyed with the pepper
    dump = "\n".join(everything)
    assert token not in dump and parsed.secret32.hex() not in dump and repr(parsed.secret32) not in dump


def test_unknown_id_and_wrong_secret_look_the_same(client: TestClient, keyserver: KeyServer) -> None:
    _token_id, token = keyserver.create_admin_token("default")
    parsed = decode_secret(ADMIN_PREFIX, token)
    assert parsed is not None
    wrong_secret = encode_secret(ADMIN_PREFIX, parsed.id16, bytes(32))
    unknown_id = encode_secret(ADMIN_PREFIX, bytes(16), parsed.secret32)
    mid = len(ADMIN_PREFIX) + 30
    malformed = token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1 :]  # checksum fails
    alias = token[:-1] + chr(ord(token[-1]) ^ 1)  # same bytes, other padding bits: not canonical
    bodies = []
    for candidate in (wrong_secret, unknown_id, malformed, alias):
        r = client.get("/v1/server-info", headers={"Authorization": f"Bearer {candidate}"})
        assert r.status_code == 401
        err = r.json()["error"]
        err.pop("request_id")
        bodies.append(err)
    assert (
        bodies[0]
        == bodies[1]
        == bodies[2]
        == bodies[3]
        == {"code": "invalid-credential", "message": "invalid credential"}
    )


def test_comparison_is_constant_time(keyserver: KeyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    _, token = keyserver.create_admin_token("default")
    keyserver.authenticate_admin(token)
    parsed = decode_secret(ADMIN_PREFIX, token)
    assert parsed is not None
    with pytest.raises(InvalidCredential):  # unknown id: compared against a dummy hash all the same
        keyserver.authenticate_admin(encode_secret(ADMIN_PREFIX, bytes(16), parsed.secret32))
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


def test_revoked_token_is_refused(client: TestClient, keyserver: KeyServer) -> None:
    token_id, token = keyserver.create_admin_token("default")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/server-info", headers=headers).status_code == 200
    keyserver.revoke_admin_token(token_id)
    keyserver.revoke_admin_token(token_id)  # idempotent
    assert client.get("/v1/server-info", headers=headers).status_code == 401
    with pytest.raises(NotFound):
        keyserver.revoke_admin_token("adm_" + "A" * 22)


def test_publishers(keyserver: KeyServer) -> None:
    pub = keyserver.create_publisher("acme")
    assert pub.startswith("pub_")
    with pytest.raises(Conflict):
        keyserver.create_publisher("acme")
    with pytest.raises(NotFound):
        keyserver.create_admin_token("nobody")
    _, by_name = keyserver.create_admin_token("acme")
    _, by_id = keyserver.create_admin_token(pub)
    assert keyserver.authenticate_admin(by_name).publisher_id == keyserver.authenticate_admin(by_id).publisher_id == pub
    with keyserver.db.read() as conn:
        events = [e for (e,) in conn.execute(text("SELECT event FROM audit_log ORDER BY seq"))]
    assert events[-3:] == ["publisher.created", "admin-token.created", "admin-token.created"]
