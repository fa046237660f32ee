"""Models and key escrow (spec §7.6) over HTTP and the service layer, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelseal._private.crypto import hkdf
from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver.crypto import b64url, escrow_wrap
from modelseal.keyserver.services import KeyServer


def _escrow_body(server_info: dict[str, Any], model_id: str, key: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    key = key or os.urandom(32)
    salt = os.urandom(32)
    commitment = hkdf(key, salt, b"key-commitment")
    escrow_pub = b64decode(server_info["escrow_key"]["public_key"])
    epk, body = escrow_wrap(key, escrow_pub, model_id, commitment, salt)
    return key, {
        "key_commitment": b64encode(commitment),
        "salt": b64encode(salt),
        "escrow": {"epk": b64encode(epk), "body": b64encode(body)},
    }


@pytest.fixture
def model(client: TestClient) -> dict[str, Any]:
    r = client.post("/v1/admin/models", json={"name": "resnet"})
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture
def info(client: TestClient) -> dict[str, Any]:
    return dict(client.get("/v1/server-info").json())


@pytest.fixture
def other_client(client: TestClient, keyserver: KeyServer) -> TestClient:
    pub = keyserver.create_publisher("rival")
    _, token = keyserver.create_admin_token(pub)
    c = TestClient(client.app)
    c.headers["Authorization"] = f"Bearer {token}"
    return c


def test_create_get_list(client: TestClient, model: dict[str, Any]) -> None:
    assert model["name"] == "resnet" and model["keys"] == 0 and model["id"].startswith("mdl_")
    assert client.get(f"/v1/admin/models/{model['id']}").json() == model
    names = [f"m{i:02d}" for i in range(5)]
    for n in names:
        assert client.post("/v1/admin/models", json={"name": n}).status_code == 201
    seen, after = [], None
    while True:
        page = client.get("/v1/admin/models", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += page["items"]
        if page["next"] is None:
            break
        after = page["next"]
    assert sorted(m["name"] for m in seen) == sorted([*names, "resnet"])
    assert [m["id"] for m in seen] == sorted(m["id"] for m in seen)


def test_name_taken_is_409(client: TestClient, model: dict[str, Any]) -> None:
    r = client.post("/v1/admin/models", json={"name": "resnet"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_other_publishers_models_are_not_found(
    client: TestClient, other_client: TestClient, model: dict[str, Any], info: dict[str, Any]
) -> None:
    missing = "mdl_" + "A" * 22
    for path in (model["id"], missing, "not-an-id"):
        r = other_client.get(f"/v1/admin/models/{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
    _, body = _escrow_body(info, model["id"])
    assert other_client.post(f"/v1/admin/models/{model['id']}/keys", json=body).status_code == 404
    assert other_client.get("/v1/admin/models").json()["items"] == []
    # the same name is free for another publisher
    assert other_client.post("/v1/admin/models", json={"name": "resnet"}).status_code == 201


def test_register_key_escrows_it(
    client: TestClient, keyserver: KeyServer, model: dict[str, Any], info: dict[str, Any]
) -> None:
    key, body = _escrow_body(info, model["id"])
    r = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["model_id"] == model["id"] and out["key_commitment"] == body["key_commitment"]
    assert out["stanza"] == {
        "type": "keyserver",
        "url": "https://keys.example.com",
        "model_id": model["id"],
        "key_commitment": body["key_commitment"],
        "server_key_id": info["signing_keys"][0]["kid"],
    }
    commitment = b64decode(body["key_commitment"])
    assert keyserver.escrowed_key(model["id"], commitment) == key
    assert client.get(f"/v1/admin/models/{model['id']}").json()["keys"] == 1
    # the same registration again: 200, nothing new
    again = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert again.status_code == 200 and again.json() == out
    events = [i["event"] for i in client.get("/v1/admin/audit", params={"limit": 500}).json()["items"]]
    assert events.count("model-key.registered") == 1


def test_the_stanza_opens_nothing_but_matches_the_container(
    client: TestClient, keyserver: KeyServer, model: dict[str, Any], info: dict[str, Any], tmp_path: Any
) -> None:
    """The commitment the server checks is the one a real container's manifest carries."""
    from modelseal._private.crypto import KeySchedule

    key, body = _escrow_body(info, model["id"])
    salt = b64decode(body["salt"])
    assert KeySchedule(key, salt).commitment == b64decode(body["key_commitment"])


def test_commitment_under_another_model_is_409(client: TestClient, info: dict[str, Any], model: dict[str, Any]) -> None:
    other = client.post("/v1/admin/models", json={"name": "other"}).json()
    key, body = _escrow_body(info, model["id"])
    assert client.post(f"/v1/admin/models/{model['id']}/keys", json=body).status_code == 201
    _, body2 = _escrow_body(info, other["id"], key)
    body2["salt"], body2["key_commitment"] = body["salt"], body["key_commitment"]
    escrow_pub = b64decode(info["escrow_key"]["public_key"])
    epk, wrapped = escrow_wrap(key, escrow_pub, other["id"], b64decode(body["key_commitment"]), b64decode(body["salt"]))
    body2["escrow"] = {"epk": b64encode(epk), "body": b64encode(wrapped)}
    r = client.post(f"/v1/admin/models/{other['id']}/keys", json=body2)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_escrow_bound_to_its_model(client: TestClient, info: dict[str, Any], model: dict[str, Any]) -> None:
    other = client.post("/v1/admin/models", json={"name": "other"}).json()
    _, body = _escrow_body(info, other["id"])  # wrapped for another model id
    r = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "escrow-invalid"


@pytest.mark.parametrize("what", ["body", "epk", "salt"])
def test_altered_escrow_is_invalid(client: TestClient, info: dict[str, Any], model: dict[str, Any], what: str) -> None:
    _, body = _escrow_body(info, model["id"])
    target = body if what == "salt" else body["escrow"]
    raw = bytearray(b64decode(target[what]))
    raw[0] ^= 1
    target[what] = b64encode(bytes(raw))
    r = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "escrow-invalid"


def test_low_order_epk_is_invalid(client: TestClient, info: dict[str, Any], model: dict[str, Any]) -> None:
    _, body = _escrow_body(info, model["id"])
    body["escrow"]["epk"] = b64encode(bytes(32))
    r = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "escrow-invalid"


def test_commitment_mismatch(client: TestClient, info: dict[str, Any], model: dict[str, Any]) -> None:
    key, salt, wrong = os.urandom(32), os.urandom(32), os.urandom(32)
    epk, wrapped = escrow_wrap(key, b64decode(info["escrow_key"]["public_key"]), model["id"], wrong, salt)
    body = {
        "key_commitment": b64encode(wrong),
        "salt": b64encode(salt),
        "escrow": {"epk": b64encode(epk), "body": b64encode(wrapped)},
    }
    r = client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "commitment-mismatch"


def test_revoke_key(client: TestClient, info: dict[str, Any], model: dict[str, Any]) -> None:
    _, body = _escrow_body(info, model["id"])
    client.post(f"/v1/admin/models/{model['id']}/keys", json=body)
    kc = b64url(b64decode(body["key_commitment"]))
    path = f"/v1/admin/models/{model['id']}/keys/{kc}/revoke"
    r = client.post(path, json={"reason": "leaked"})
    assert r.status_code == 200, r.text
    assert r.json()["revoke_reason"] == "leaked" and r.json()["revoked_at"] > 0
    assert client.post(path, json={"reason": "again"}).json() == r.json()  # idempotent
    events = [i["event"] for i in client.get("/v1/admin/audit", params={"limit": 500}).json()["items"]]
    assert events.count("model-key.revoked") == 1
    for bad in ("A" * 43, "%%%", "AA"):
        r = client.post(f"/v1/admin/models/{model['id']}/keys/{bad}/revoke", json={"reason": "x"})
        assert r.status_code == 404


def test_concurrent_registrations_of_one_key(keyserver: KeyServer, admin: Any, info: dict[str, Any]) -> None:
    """Eight threads register the same key: one insert, everyone gets the same answer, one audit record."""
    from concurrent.futures import ThreadPoolExecutor

    model = keyserver.create_model(admin, "raced")
    key, body = _escrow_body(keyserver.server_info(), model.id)
    args = {
        "key_commitment": b64decode(body["key_commitment"]),
        "salt": b64decode(body["salt"]),
        "epk": b64decode(body["escrow"]["epk"]),
        "body": b64decode(body["escrow"]["body"]),
    }
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: keyserver.register_key(admin, model.id, **args), range(8)))
    assert sum(r.created for r in results) == 1
    assert keyserver.escrowed_key(model.id, args["key_commitment"]) == key
    assert keyserver.verify_audit() == []


def test_concurrent_writers_keep_one_chain(keyserver: KeyServer, admin: Any) -> None:
    """32 threads each create a model: every write lands, the audit chain has no gap or fork."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda i: keyserver.create_model(admin, f"m{i}"), range(32)))
    assert len({m.id for m in made}) == 32
    items, _ = keyserver.list_audit(admin, chain=0, after_seq=0, limit=500)
    assert [i["seq"] for i in items] == list(range(1, 35))
    assert keyserver.verify_audit() == []
