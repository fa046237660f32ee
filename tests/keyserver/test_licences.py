"""Licences, activation and devices (spec §3, §7.3, §7.7, §14, §17.2) on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver import errors
from modelseal.keyserver.app import create_app
from modelseal.keyserver.crypto import make_id
from modelseal.keyserver.services import ActivationRequest, Admin, KeyServer, LicenceAuth, Policy
from modelseal.keyserver.settings import Settings
from modelseal.keyserver_client import ACTIVATION_ROUTE, DeviceKey, activation_body

FP = bytes(range(32))


def _request(
    server: KeyServer, device: DeviceKey, *, fp: bytes = FP, aud: bytes | None = None, ts: int | None = None
) -> ActivationRequest:
    raw = activation_body(device, aud or server.secrets.signing_kid, fp, label="box", ts=ts)
    return ActivationRequest(
        aud=aud or server.secrets.signing_kid,
        ts=ts if ts is not None else time.time_ns() // 1000,
        x25519_pk=device.x25519_public,
        ed25519_pk=device.ed25519_public,
        fingerprint=fp,
        label="box",
        raw_body=raw,
        signature=device.sign_request(ACTIVATION_ROUTE, raw),
    )


def _parse_ts(req: ActivationRequest) -> ActivationRequest:
    import json

    body = json.loads(req.raw_body)
    return ActivationRequest(**{**req.__dict__, "ts": body["ts"]})


def _activate(server: KeyServer, lic: LicenceAuth, device: DeviceKey, **kw: Any) -> Any:
    return server.activate(lic, _parse_ts(_request(server, device, **kw)))


@pytest.fixture
def model_id(keyserver: KeyServer, admin: Admin) -> str:
    return keyserver.create_model(admin, "resnet").id


def _licence(server: KeyServer, admin: Admin, model_id: str, **policy: Any) -> tuple[dict[str, Any], str]:
    return server.create_licence(admin, Policy(models=(model_id,), **{"max_devices": 5, **policy}), label="acme")


def _events(server: KeyServer, admin: Admin) -> list[tuple[str, str | None]]:
    items, _ = server.list_audit(admin, chain=0, after_seq=0, limit=500)
    return [(i["event"], i["code"]) for i in items]


# --- service layer ------------------------------------------------------------------------------


def test_licence_key_is_hashed_and_verified_in_constant_time(
    keyserver: KeyServer, admin: Admin, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    view, key = _licence(keyserver, admin, model_id, expires_at=2_000_000_000, opens_per_day=7, offline_grace_s=60)
    assert key.startswith("MSEAL-LICENCE:") and len(key) == len("MSEAL-LICENCE:") + 70
    assert view["policy"] == {
        "expires_at": 2_000_000_000,
        "max_devices": 5,
        "models": [model_id],
        "opens_per_day": 7,
        "offline_grace_s": 60,
        "recheck_interval_s": 3600,
        "grant_ttl_s": 86400,
    }
    assert keyserver.get_licence(admin, view["id"]) == view
    with keyserver.db.read() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM licences")).scalar_one()
    from modelseal.keyserver.crypto import LICENCE_PREFIX, decode_secret

    parsed = decode_secret(LICENCE_PREFIX, key)
    assert parsed is not None and len(bytes(stored)) == 32 and parsed.secret32 != bytes(stored)

    import hmac as hmac_mod

    calls: list[int] = []
    real = hmac_mod.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr("modelseal.keyserver.services.hmac.compare_digest", spy)
    assert keyserver.authenticate_licence(key).licence_id == view["id"]
    assert calls
    wrong_secret = key[:-10] + ("A" if key[-10] != "A" else "B") + key[-9:]
    unknown = "MSEAL-LICENCE:" + "A" * 70
    for bad in (wrong_secret, unknown, "MSEAL-LICENCE:short", "", None, "MSEAL-ADMIN:" + key[14:]):
        with pytest.raises(errors.InvalidLicence):
            keyserver.authenticate_licence(bad)


def test_policy_models_must_be_own(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    pub = keyserver.create_publisher("rival")
    _, token = keyserver.create_admin_token(pub)
    rival = keyserver.authenticate_admin(token)
    with pytest.raises(errors.NotFound):
        _licence(keyserver, rival, model_id)
    view, _ = _licence(keyserver, admin, model_id)
    with pytest.raises(errors.NotFound):
        keyserver.get_licence(rival, view["id"])
    with pytest.raises(errors.NotFound):
        keyserver.revoke_licence(rival, view["id"], "no")
    assert keyserver.list_licences(rival, after=None, limit=10) == ([], None)
    with pytest.raises(errors.MalformedRequest):
        _licence(keyserver, admin, model_id, recheck_interval_s=7200, grant_ttl_s=3600)


def test_activation_idempotent_mismatch_revocation(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    view, key = _licence(keyserver, admin, model_id, max_devices=2)
    lic = keyserver.authenticate_licence(key)
    dev = DeviceKey.generate()
    first = _activate(keyserver, lic, dev)
    assert first.created and first.device_id.startswith("dev_") and first.policy["max_devices"] == 2
    again = _activate(keyserver, lic, dev)
    assert not again.created and again.device_id == first.device_id
    assert keyserver.get_licence(admin, view["id"])["active_devices"] == 1
    with pytest.raises(errors.DeviceMismatch):
        _activate(keyserver, lic, dev, fp=bytes(32))
    other_sign = DeviceKey(dev.identity, DeviceKey.generate().signing)
    with pytest.raises(errors.DeviceMismatch):
        _activate(keyserver, lic, other_sign)
    other_x = DeviceKey(DeviceKey.generate().identity, dev.signing)
    with pytest.raises(errors.DeviceMismatch):
        _activate(keyserver, lic, other_x)
    dev2 = DeviceKey.generate()
    second = _activate(keyserver, lic, dev2)
    with pytest.raises(errors.DeviceLimitReached):
        _activate(keyserver, lic, DeviceKey.generate())
    revoked = keyserver.revoke_device(admin, second.device_id, "lost laptop")
    assert revoked["revoked_at"] is not None and revoked["revoke_reason"] == "lost laptop"
    assert keyserver.revoke_device(admin, second.device_id, "again")["revoke_reason"] == "lost laptop"  # idempotent
    assert keyserver.get_licence(admin, view["id"])["active_devices"] == 1
    with pytest.raises(errors.DeviceRevoked):
        _activate(keyserver, lic, dev2)
    third = _activate(keyserver, lic, DeviceKey.generate())  # the slot was freed
    assert third.created
    items, _ = keyserver.list_devices(admin, licence_id=view["id"], status="active", after=None, limit=10)
    assert {d["id"] for d in items} == {first.device_id, third.device_id}
    items, _ = keyserver.list_devices(admin, status="revoked", after=None, limit=10)
    assert [d["id"] for d in items] == [second.device_id]
    keyserver.revoke_licence(admin, view["id"], "contract ended")
    assert keyserver.revoke_licence(admin, view["id"], "x")["revoke_reason"] == "contract ended"
    with pytest.raises(errors.LicenceRevoked):
        _activate(keyserver, lic, dev)
    events = _events(keyserver, admin)
    assert events.count(("device.activated", None)) == 3
    denied = [c for e, c in events if e == "device.activation-denied"]
    assert denied == ["device-mismatch"] * 3 + ["device-limit-reached", "device-revoked", "licence-revoked"]
    assert events.count(("device.revoked", None)) == 1 and events.count(("licence.revoked", None)) == 1
    assert keyserver.verify_audit() == []


def test_revoked_device_key_cannot_register_again(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    _, key = _licence(keyserver, admin, model_id)
    lic = keyserver.authenticate_licence(key)
    dev = DeviceKey.generate()
    keyserver.revoke_device(admin, _activate(keyserver, lic, dev).device_id, "stolen")
    with pytest.raises(errors.DeviceRevoked):
        _activate(keyserver, lic, dev)


def test_expired_licence(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    view, key = _licence(keyserver, admin, model_id, expires_at=int(time.time()) - 1)
    with pytest.raises(errors.LicenceExpired):
        _activate(keyserver, keyserver.authenticate_licence(key), DeviceKey.generate())
    ids = lambda s: [i["id"] for i in keyserver.list_licences(admin, status=s, after=None, limit=10)[0]]  # noqa: E731
    assert ids("expired") == [view["id"]] and ids("active") == [] and ids("all") == [view["id"]]


def test_request_checks(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    _, key = _licence(keyserver, admin, model_id)
    lic = keyserver.authenticate_licence(key)
    dev = DeviceKey.generate()
    good = _parse_ts(_request(keyserver, dev))
    with pytest.raises(errors.InvalidSignature):
        keyserver.activate(lic, ActivationRequest(**{**good.__dict__, "signature": None}))
    with pytest.raises(errors.InvalidSignature):
        keyserver.activate(lic, ActivationRequest(**{**good.__dict__, "raw_body": good.raw_body + b" "}))
    other = DeviceKey.generate()
    with pytest.raises(errors.InvalidSignature):  # signed by another key than the one it names
        keyserver.activate(lic, ActivationRequest(**{**good.__dict__, "ed25519_pk": other.ed25519_public}))
    with pytest.raises(errors.WrongAudience):
        _activate(keyserver, lic, dev, aud=bytes(8))
    with pytest.raises(errors.StaleRequest):
        _activate(keyserver, lic, dev, ts=(int(time.time()) - 3600) * 1_000_000)
    low_order = DeviceKey.generate()
    zero = ActivationRequest(**{**_parse_ts(_request(keyserver, low_order)).__dict__})
    raw = activation_body(low_order, keyserver.secrets.signing_kid, FP, label="box").replace(
        b64encode(low_order.x25519_public).encode(), b64encode(bytes(32)).encode()
    )
    import json

    zero = ActivationRequest(
        **{
            **zero.__dict__,
            "x25519_pk": bytes(32),
            "raw_body": raw,
            "ts": json.loads(raw)["ts"],
            "signature": low_order.sign_request(ACTIVATION_ROUTE, raw),
        }
    )
    with pytest.raises(errors.InvalidPublicKey):
        keyserver.activate(lic, zero)


def _counts(keyserver: KeyServer, licence_id: str) -> tuple[int, int]:
    with keyserver.db.read() as conn:
        active = conn.execute(text("SELECT active_devices FROM licences WHERE id = :i"), {"i": licence_id}).scalar_one()
        rows = conn.execute(
            text("SELECT COUNT(*) FROM devices WHERE licence_id = :i AND revoked_at IS NULL"), {"i": licence_id}
        ).scalar_one()
    return int(active), int(rows)


def _race(keyserver: KeyServer, lic: LicenceAuth, requests: list[ActivationRequest]) -> list[str]:
    barrier = threading.Barrier(len(requests))
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(req: ActivationRequest) -> None:
        barrier.wait()
        try:
            result = keyserver.activate(lic, req)
            outcome = "created" if result.created else "existing"
        except errors.DomainError as exc:
            outcome = exc.code
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return outcomes


def test_race_200_devices_on_max_5(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    """§17.2: 200 threads with their own device keys race on one licence; exactly max_devices win."""
    view, key = _licence(keyserver, admin, model_id, max_devices=5)
    lic = keyserver.authenticate_licence(key)
    outcomes = _race(keyserver, lic, [_parse_ts(_request(keyserver, DeviceKey.generate())) for _ in range(200)])
    assert sorted(set(outcomes)) == ["created", "device-limit-reached"]
    assert outcomes.count("created") == 5 and outcomes.count("device-limit-reached") == 195
    assert _counts(keyserver, view["id"]) == (5, 5)
    events = _events(keyserver, admin)
    assert events.count(("device.activated", None)) == 5
    assert events.count(("device.activation-denied", "device-limit-reached")) == 195
    assert keyserver.verify_audit() == []


def test_race_same_key_200_times(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    view, key = _licence(keyserver, admin, model_id, max_devices=5)
    lic = keyserver.authenticate_licence(key)
    dev = DeviceKey.generate()
    req = _parse_ts(_request(keyserver, dev))
    outcomes = _race(keyserver, lic, [req] * 200)
    assert outcomes.count("created") == 1 and outcomes.count("existing") == 199
    assert _counts(keyserver, view["id"]) == (1, 1)
    assert keyserver.verify_audit() == []


def test_rate_limits_are_shared_through_the_database(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    """Two service instances (as two workers) over one database share the activation windows (§14)."""
    from modelseal.keyserver.repository import Database
    from modelseal.keyserver.services import KeyServer as Server

    keyserver.rates["activate-ip"] = (4, 60)
    db2 = Database(keyserver.db.url)
    other = Server(db2, keyserver.kek, keyserver.secrets, public_url="x", rates={"activate-ip": (4, 60)})
    try:
        passed = 0
        for i in range(7):
            try:
                (keyserver if i % 2 else other).rate_limit_activation("10.0.0.1", None)
                passed += 1
            except errors.RateLimited as exc:
                assert exc.retry_after is not None and 1 <= exc.retry_after <= 60
        assert passed == 4
        keyserver.rate_limit_activation("10.0.0.2", None)  # another IP has its own window
    finally:
        db2.dispose()
    tripped = [e for e in _events(keyserver, admin) if e[0] == "ratelimit.tripped"]
    assert tripped == []  # system records carry no publisher: not in the publisher's view
    with keyserver.db.read() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM audit_log WHERE event = 'ratelimit.tripped'")).scalar_one()
        keys = conn.execute(text("SELECT key FROM rate_windows")).scalars().all()
    assert n == 1  # only the window's first excess is recorded
    assert all(len(bytes(k)) == 32 and b"10.0.0" not in bytes(k) for k in keys)
    assert keyserver.verify_audit() == []


def test_licence_limit_counts_presented_ids_alike(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    _, key = _licence(keyserver, admin, model_id)
    keyserver.rates["activate-licence"] = (2, 3600)
    unknown = "MSEAL-LICENCE:" + "B" * 70
    from modelseal.keyserver.crypto import LICENCE_PREFIX, encode_secret

    unknown = encode_secret(LICENCE_PREFIX, os.urandom(16), os.urandom(32))
    for presented in (key, unknown):
        outcomes = []
        for i in range(3):
            try:
                keyserver.rate_limit_activation(f"ip-{presented[-5:]}-{i}", presented)
                outcomes.append("ok")
            except errors.RateLimited:
                outcomes.append("limited")
        assert outcomes == ["ok", "ok", "limited"]


# --- HTTP -----------------------------------------------------------------------------------------


@pytest.fixture
def http_model(client: TestClient) -> str:
    r = client.post("/v1/admin/models", json={"name": "resnet"})
    assert r.status_code == 201
    return str(r.json()["id"])


def _http_activate(client: TestClient, key: str, device: DeviceKey, *, fp: bytes = FP) -> Any:
    info = client.get("/v1/server-info", headers={"Authorization": f"Bearer {key}"})
    assert info.status_code == 200, info.text
    kid = b64decode(info.json()["signing_keys"][0]["kid"], length=8)
    raw = activation_body(device, kid, fp, label="laptop")
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Modelseal-Signature": device.sign_request(ACTIVATION_ROUTE, raw),
    }
    return client.post(ACTIVATION_ROUTE, content=raw, headers=headers)


def test_http_licence_lifecycle(client: TestClient, http_model: str) -> None:
    body = {"label": "acme", "policy": {"models": [http_model], "max_devices": 1, "expires_at": None}}
    r = client.post("/v1/admin/licences", json=body)
    assert r.status_code == 201, r.text
    licence, key = r.json()["licence"], r.json()["licence_key"]
    assert licence["active_devices"] == 0 and licence["policy"]["grant_ttl_s"] == 86400
    assert client.get(f"/v1/admin/licences/{licence['id']}").json() == licence
    page = client.get("/v1/admin/licences", params={"model_id": http_model, "status": "active"}).json()
    assert [i["id"] for i in page["items"]] == [licence["id"]] and page["next"] is None
    dev = DeviceKey.generate()
    r = _http_activate(client, key, dev)
    assert r.status_code == 201, r.text
    act = r.json()
    assert act["licence_id"] == licence["id"] and act["server"]["v"] == 1 and act["policy"]["models"] == [http_model]
    assert _http_activate(client, key, dev).status_code == 200
    r = _http_activate(client, key, DeviceKey.generate())
    assert r.status_code == 403 and r.json()["error"]["code"] == "device-limit-reached"
    r = _http_activate(client, key, dev, fp=bytes(32))
    assert r.status_code == 403 and r.json()["error"]["code"] == "device-mismatch"
    devices = client.get("/v1/admin/devices", params={"licence_id": licence["id"]}).json()["items"]
    assert [d["id"] for d in devices] == [act["device_id"]]
    assert devices[0]["x25519_public_key"] == b64encode(dev.x25519_public)
    assert client.get(f"/v1/admin/devices/{act['device_id']}").json() == devices[0]
    r = client.post(f"/v1/admin/devices/{act['device_id']}/revoke", json={"reason": "lost"})
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert client.get(f"/v1/admin/licences/{licence['id']}").json()["active_devices"] == 0
    r = client.post(f"/v1/admin/licences/{licence['id']}/revoke", json={"reason": "ended"})
    assert r.status_code == 200 and r.json()["revoke_reason"] == "ended"
    r = _http_activate(client, key, DeviceKey.generate())
    assert r.status_code == 403 and r.json()["error"]["code"] == "licence-revoked"
    for path in ("/v1/admin/licences/lic_AAAAAAAAAAAAAAAAAAAAAA", "/v1/admin/licences/junk", "/v1/admin/devices/x"):
        assert client.get(path).json()["error"]["code"] == "not-found"


def test_http_other_publisher_sees_nothing(client: TestClient, keyserver: KeyServer, http_model: str) -> None:
    body = {"policy": {"models": [http_model], "max_devices": 1, "expires_at": None}}
    licence = client.post("/v1/admin/licences", json=body).json()["licence"]
    pub = keyserver.create_publisher("rival")
    _, token = keyserver.create_admin_token(pub)
    rival = {"Authorization": f"Bearer {token}"}
    assert client.get(f"/v1/admin/licences/{licence['id']}", headers=rival).status_code == 404
    assert client.get("/v1/admin/licences", headers=rival).json()["items"] == []
    r = client.post(f"/v1/admin/licences/{licence['id']}/revoke", json={"reason": "x"}, headers=rival)
    assert r.status_code == 404
    r = client.post("/v1/admin/licences", json=body, headers=rival)  # a model of another publisher
    assert r.status_code == 404


def test_http_no_licence_oracle(client: TestClient, http_model: str) -> None:
    body = {"policy": {"models": [http_model], "max_devices": 1, "expires_at": None}}
    key = client.post("/v1/admin/licences", json=body).json()["licence_key"]
    wrong = key[:-10] + ("A" if key[-10] != "A" else "B") + key[-9:]
    unknown = "MSEAL-LICENCE:" + key[14:20] + ("A" if key[20] != "A" else "B") + key[21:]
    bodies = []
    for presented in (wrong, unknown, "MSEAL-LICENCE:garbage", "nonsense"):
        r = client.post(ACTIVATION_ROUTE, json={}, headers={"Authorization": f"Bearer {presented}"})
        err = r.json()["error"]
        bodies.append((r.status_code, err["code"], err["message"], set(r.headers) - {"content-length"}))
    assert len({(s, c, m) for s, c, m, _ in bodies}) == 1 and bodies[0][:2] == (401, "invalid-licence")


BAD_ACTIVATIONS: list[tuple[bytes, str]] = [
    (b"{", "truncated"),
    (b"\xff", "invalid utf-8"),
    (b'{"aud": "AAAAAAAAAAA=", "aud": "AAAAAAAAAAA="}', "duplicate"),
    (b'{"aud": "AAAAAAAAAAA=", "ts": 1.5}', "float"),
    (b'{"aud": "AAAAAAAAAAA=", "ts": 18446744073709551616}', "2^64"),
    (b"[]", "array"),
    (b'{"aud": "AAAAAAAAAAB=", "ts": 1, "x25519_public_key": 1}', "types"),
    (b"[" * 5000 + b"]" * 5000, "deep"),
]


@pytest.mark.parametrize(("raw", "why"), BAD_ACTIVATIONS, ids=[w for _, w in BAD_ACTIVATIONS])
def test_http_malformed_activations_are_400(client: TestClient, http_model: str, raw: bytes, why: str) -> None:
    body = {"policy": {"models": [http_model], "max_devices": 1, "expires_at": None}}
    key = client.post("/v1/admin/licences", json=body).json()["licence_key"]
    r = client.post(
        ACTIVATION_ROUTE, content=raw, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed-request", r.text


@pytest.mark.parametrize(
    "policy",
    [
        {"models": [], "max_devices": 1, "expires_at": None},
        {"models": ["mdl_x"], "max_devices": 1, "expires_at": None},
        {"models": ["MDL"], "max_devices": 0, "expires_at": None},
        {"models": ["MDL"], "max_devices": 1_000_001, "expires_at": None},
        {"models": ["MDL"], "max_devices": 1, "expires_at": -1},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "recheck_interval_s": 59},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "recheck_interval_s": 7200, "grant_ttl_s": 3600},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "offline_grace_s": 31536001},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "opens_per_day": 0},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "opens_per_day": 2**40},
        {"models": ["MDL"], "max_devices": True, "expires_at": None},
        {"models": ["MDL"], "max_devices": 1, "expires_at": None, "extra": 1},
        {"models": ["MDL"], "max_devices": 1},
    ],
)
def test_http_bad_policies_are_400(client: TestClient, http_model: str, policy: dict[str, Any]) -> None:
    policy = {k: ([http_model] if v == ["MDL"] else v) for k, v in policy.items()}
    r = client.post("/v1/admin/licences", json={"policy": policy})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed-request", r.text


@pytest.mark.parametrize(
    "query", ["status=bogus", "limit=0", "after=lic_x", "licence_id=nope", "model_id=x"], ids=lambda q: q
)
def test_http_bad_list_queries_are_400(client: TestClient, query: str) -> None:
    path = "/v1/admin/devices" if "licence_id" in query else "/v1/admin/licences"
    assert client.get(f"{path}?{query}").status_code == 400


def test_http_activation_rate_limits(settings: Settings, keyserver: KeyServer, admin_token: str) -> None:
    """The IP window is checked before the credential; 401s count toward auth-fail-ip."""
    keyserver.rates.update({"activate-ip": (3, 60), "auth-fail-ip": (2, 60)})
    with TestClient(create_app(settings, keyserver=keyserver)) as c:
        headers = {"Authorization": "Bearer MSEAL-LICENCE:" + "A" * 70}
        codes = [c.post(ACTIVATION_ROUTE, json={}, headers=headers).json()["error"]["code"] for _ in range(4)]
        assert codes == ["invalid-licence", "invalid-licence", "rate-limited", "rate-limited"]
        r = c.post(ACTIVATION_ROUTE, json={}, headers=headers)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60


def test_update_licence_in_place(keyserver: KeyServer, admin: Admin, model_id: str) -> None:
    """PATCH (spec §7.7): limits change for the next request; key, devices and grants stay."""
    view, key = _licence(keyserver, admin, model_id, max_devices=1, expires_at=2_000_000_000)
    lic = keyserver.authenticate_licence(key)
    _activate(keyserver, lic, DeviceKey.generate())
    with pytest.raises(errors.DeviceLimitReached):
        _activate(keyserver, lic, DeviceKey.generate())

    updated = keyserver.update_licence(admin, view["id"], {"max_devices": 2, "expires_at": None}, label="acme, 2 seats")
    assert updated["policy"]["max_devices"] == 2 and updated["policy"]["expires_at"] is None
    assert updated["label"] == "acme, 2 seats" and updated["active_devices"] == 1
    _activate(keyserver, keyserver.authenticate_licence(key), DeviceKey.generate())  # the same key works

    with pytest.raises(errors.Conflict):  # below the active devices
        keyserver.update_licence(admin, view["id"], {"max_devices": 1})
    with pytest.raises(errors.MalformedRequest):
        keyserver.update_licence(admin, view["id"], {"recheck_interval_s": 7200, "grant_ttl_s": 3600})
    with pytest.raises(errors.MalformedRequest):
        keyserver.update_licence(admin, view["id"], {"max_devices": None})
    other = keyserver.create_model(admin, "other").id
    assert keyserver.update_licence(admin, view["id"], {"models": [other, model_id]})["policy"]["models"] == sorted(
        [other, model_id]
    )
    with pytest.raises(errors.NotFound):
        keyserver.update_licence(admin, view["id"], {"models": [make_id("mdl", bytes(16))]})
    foreign = keyserver.create_publisher("someone-else")
    _, token = keyserver.create_admin_token(foreign)
    with pytest.raises(errors.NotFound):
        keyserver.update_licence(keyserver.authenticate_admin(token), view["id"], {"max_devices": 3})

    assert keyserver.get_licence(admin, view["id"])["policy"]["max_devices"] == 2  # refusals changed nothing
    assert [e for e in _events(keyserver, admin) if e[0] == "licence.updated"] == [("licence.updated", None)] * 2
    assert keyserver.verify_audit() == []
