"""Key grants (spec §7.4, §8): the appendix vector, client verification, and the grant service on
SQLite and PostgreSQL (policy denials audited, usage limit, replay), plus the HTTP route."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi.testclient import TestClient
from sqlalchemy import text

from modelseal._private.crypto import KeySchedule
from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver import errors
from modelseal.keyserver import grant as g
from modelseal.keyserver.client import DeviceKey, grant_body
from modelseal.keyserver.crypto import escrow_wrap, make_id, server_key_id
from modelseal.keyserver.services import GRANT_ROUTE, Admin, GrantRequest, KeyServer, Policy

from .test_licences import FP, _activate

VECTOR = json.loads((Path(__file__).parent / "vectors" / "grant-v1.json").read_text())
L = b"modelseal/v1/"


def _d(name: str) -> bytes:
    return hashlib.sha256(b"modelseal/v1 keyserver example/" + name.encode()).digest()


def _vector_fields() -> dict[str, Any]:
    kid = server_key_id(Ed25519PrivateKey.from_private_bytes(_d("server-ed25519")).public_key().public_bytes_raw())
    t, inp = VECTOR["inputs"]["issued_at"], VECTOR["inputs"]
    recheck = t + inp["recheck_interval_s"]
    return {
        "v": 1,
        "grant_id": make_id("grt", _d("grant-id")[:16]),
        "server_key_id": b64encode(kid),
        "model_id": make_id("mdl", _d("model-id")[:16]),
        "licence_id": make_id("lic", _d("licence-id")[:16]),
        "device_id": make_id("dev", _d("device-id")[:16]),
        "key_commitment": b64encode(KeySchedule(_d("content-key"), _d("salt")).commitment),
        "issued_at": t,
        "recheck_after": recheck,
        "offline_until": recheck + inp["offline_grace_s"],
        "not_after": t + inp["grant_ttl_s"],
    }


def test_appendix_vector_through_the_implementation() -> None:
    assert _d("content-key").hex() == VECTOR["content_key"] and _d("salt").hex() == VECTOR["salt"]
    fields = _vector_fields()
    assert g.header_bytes(fields).decode() == VECTOR["H"] and len(VECTOR["H"]) == 365
    device = X25519PrivateKey.from_private_bytes(_d("device-x25519"))
    grant_bytes = g.build_grant(
        fields,
        _d("content-key"),
        device.public_key().public_bytes_raw(),
        X25519PrivateKey.from_private_bytes(_d("ephemeral")),
    )
    assert grant_bytes.decode() == VECTOR["G"] and len(grant_bytes) == 501
    assert hashlib.sha256(grant_bytes).hexdigest() == VECTOR["sha256_G"]
    server = Ed25519PrivateKey.from_private_bytes(_d("server-ed25519"))
    signed = g.sign_grant(server, grant_bytes)
    assert b64decode(signed["signature"]).hex() == VECTOR["signature"]
    assert len(g.signature_message(grant_bytes)) == 544
    # and the client side accepts it and recovers K
    pinned = {bytes.fromhex(VECTOR["server_key_id"]): bytes.fromhex(VECTOR["server_pk"])}
    _, grant = g.verify_signed(signed, pinned)
    g.check_binding(
        grant,
        model_id=fields["model_id"],
        key_commitment=bytes.fromhex(VECTOR["key_commitment"]),
        licence_id=fields["licence_id"],
        device_id=fields["device_id"],
    )
    assert g.unwrap_grant(grant, device).hex() == VECTOR["content_key"]


def test_appendix_vector_with_cryptography_primitives_only() -> None:
    def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=L + info).derive(ikm)

    k, salt = _d("content-key"), _d("salt")
    assert hkdf(k, salt, b"key-commitment").hex() == VECTOR["key_commitment"]
    device = X25519PrivateKey.from_private_bytes(_d("device-x25519"))
    dpk = device.public_key().public_bytes_raw()
    e = X25519PrivateKey.from_private_bytes(_d("ephemeral"))
    epk = e.public_key().public_bytes_raw()
    assert (dpk.hex(), epk.hex()) == (VECTOR["device_x25519_pk"], VECTOR["epk"])
    server_pk = Ed25519PrivateKey.from_private_bytes(_d("server-ed25519")).public_key().public_bytes_raw()
    assert server_pk.hex() == VECTOR["server_pk"]
    assert hashlib.sha256(L + b"keyserver-kid" + server_pk).digest()[:8].hex() == VECTOR["server_key_id"]
    shared = e.exchange(X25519PublicKey.from_public_bytes(dpk))
    assert shared.hex() == VECTOR["shared"]
    grant_id = json.loads(VECTOR["H"])["grant_id"]
    wrap_key = hkdf(shared, epk + dpk, b"keyserver-grant\x00" + grant_id.encode())
    assert wrap_key.hex() == VECTOR["wrap_key"]
    body = AESGCM(wrap_key).encrypt(bytes(12), k, VECTOR["H"].encode())
    assert body.hex() == VECTOR["body"]
    grant_bytes = VECTOR["G"].encode()
    message = L + b"keyserver-grant-signature\x00" + len(grant_bytes).to_bytes(4, "big") + grant_bytes
    Ed25519PublicKey.from_public_bytes(server_pk).verify(bytes.fromhex(VECTOR["signature"]), message)


def _vector_signed(fields: dict[str, Any] | None = None, *, raw: bytes | None = None) -> dict[str, str]:
    fields = fields or _vector_fields()
    device = X25519PrivateKey.from_private_bytes(_d("device-x25519")).public_key().public_bytes_raw()
    grant_bytes = raw or g.build_grant(fields, _d("content-key"), device, X25519PrivateKey.generate())
    return g.sign_grant(Ed25519PrivateKey.from_private_bytes(_d("server-ed25519")), grant_bytes)


PINNED = {bytes.fromhex(VECTOR["server_key_id"]): bytes.fromhex(VECTOR["server_pk"])}


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": make_id("mdl", bytes(16))},
        {"licence_id": make_id("lic", bytes(16))},
        {"device_id": make_id("dev", bytes(16))},
        {"key_commitment": b64encode(bytes(32))},
        {"not_after": 1790604801},
        {"issued_at": 1790003600},
        {"v": 2},
    ],
)
def test_changed_header_fields_are_refused(change: dict[str, Any]) -> None:
    fields = _vector_fields()
    signed = json.loads(VECTOR["G"])
    signed.update(change)  # keep the original wrap: the header no longer matches its aad
    raw = json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()
    device = X25519PrivateKey.from_private_bytes(_d("device-x25519"))
    with pytest.raises(g.GrantInvalid):
        _, grant = g.verify_signed(_vector_signed(raw=raw), PINNED)
        g.check_binding(
            grant,
            model_id=fields["model_id"],
            key_commitment=b64decode(fields["key_commitment"]),
            licence_id=fields["licence_id"],
            device_id=fields["device_id"],
        )
        g.unwrap_grant(grant, device)


def test_swapped_wrap_other_signer_noncanonical_and_wrong_device_are_refused() -> None:
    one, two = _vector_signed(), _vector_signed()
    g1, g2 = json.loads(b64decode(one["grant"])), json.loads(b64decode(two["grant"]))
    g1["wrap"] = g2["wrap"] if g1["wrap"] != g2["wrap"] else g1["wrap"]
    g1["grant_id"] = make_id("grt", bytes(16))  # another grant's wrap under this header
    swapped = _vector_signed(raw=json.dumps(g1, sort_keys=True, separators=(",", ":")).encode())
    _, grant = g.verify_signed(swapped, PINNED)
    with pytest.raises(g.GrantInvalid):
        g.unwrap_grant(grant, X25519PrivateKey.from_private_bytes(_d("device-x25519")))
    forged = g.sign_grant(Ed25519PrivateKey.generate(), b64decode(one["grant"]))
    with pytest.raises(g.GrantInvalid, match="signature"):
        g.verify_signed(forged, PINNED)
    spaced = _vector_signed(raw=VECTOR["G"].replace(",", ", ", 1).encode())
    with pytest.raises(g.GrantInvalid, match="canonical"):
        g.verify_signed(spaced, PINNED)
    with pytest.raises(g.GrantInvalid, match="pinned"):
        g.verify_signed(one, {bytes(8): bytes.fromhex(VECTOR["server_pk"])})
    _, grant = g.verify_signed(one, PINNED)
    with pytest.raises(g.GrantInvalid, match="device"):
        g.unwrap_grant(grant, X25519PrivateKey.generate())  # device B cannot unwrap device A's grant
    for bad in ({}, {"grant": "!!", "signature": one["signature"]}, [], {"grant": one["grant"]}):
        with pytest.raises(g.GrantInvalid):
            g.verify_signed(bad, PINNED)


# --- the service, on SQLite and PostgreSQL ----------------------------------------------------------


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


def _escrow(server: KeyServer, admin: Admin, model_id: str) -> tuple[bytes, bytes]:
    k, salt = os.urandom(32), os.urandom(32)
    kc = KeySchedule(k, salt).commitment
    epk, body = escrow_wrap(k, server.secrets.escrow_key.public_key().public_bytes_raw(), model_id, kc, salt)
    server.register_key(admin, model_id, key_commitment=kc, salt=salt, epk=epk, body=body)
    return k, kc


def _grant_request(
    server: KeyServer,
    device: DeviceKey,
    device_id: str,
    model_id: str,
    kc: bytes,
    *,
    fp: bytes = FP,
    ts: int | None = None,
) -> GrantRequest:
    ts = ts if ts is not None else int(server.clock.time() * 1_000_000)
    raw = grant_body(server.secrets.signing_kid, device_id, model_id, kc, fp, ts=ts)
    return GrantRequest(
        aud=server.secrets.signing_kid,
        ts=ts,
        device_id=device_id,
        model_id=model_id,
        key_commitment=kc,
        fingerprint=fp,
        raw_body=raw,
        signature=device.sign_request(GRANT_ROUTE, raw),
    )


@pytest.fixture
def setup(keyserver: KeyServer, admin: Admin) -> dict[str, Any]:
    model_id = keyserver.create_model(admin, "resnet").id
    k, kc = _escrow(keyserver, admin, model_id)
    _, key = keyserver.create_licence(
        admin,
        Policy(models=(model_id,), max_devices=5, opens_per_day=3, offline_grace_s=86400, recheck_interval_s=3600),
    )
    lic = keyserver.authenticate_licence(key)
    device = DeviceKey.generate()
    device_id = _activate(keyserver, lic, device).device_id
    return {"model_id": model_id, "k": k, "kc": kc, "lic": lic, "device": device, "device_id": device_id}


def _events(server: KeyServer, admin: Admin) -> list[tuple[str, str | None]]:
    items, _ = server.list_audit(admin, chain=0, after_seq=0, limit=500)
    return [(i["event"], i["code"]) for i in items if i["event"].startswith("grant.")]


def test_grant_issued_verifies_and_unwraps(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    now = time.time() + 1
    keyserver.clock = FixedClock(now)
    req = _grant_request(keyserver, s["device"], s["device_id"], s["model_id"], s["kc"])
    signed = keyserver.issue_grant(s["lic"], req)
    pinned = {keyserver.secrets.signing_kid: keyserver.secrets.signing_key.public_key().public_bytes_raw()}
    grant_bytes, grant = g.verify_signed(signed, pinned)
    g.check_binding(
        grant, model_id=s["model_id"], key_commitment=s["kc"], licence_id=s["lic"].licence_id, device_id=s["device_id"]
    )
    assert g.unwrap_grant(grant, s["device"].identity._key) == s["k"]
    t = int(now)
    assert (grant["issued_at"], grant["recheck_after"], grant["offline_until"], grant["not_after"]) == (
        t,
        t + 3600,
        t + 86400,  # recheck_after + grace, capped at not_after
        t + 86400,
    )
    items, _ = keyserver.list_audit(admin, chain=0, after_seq=0, limit=500)
    [issued] = [i for i in items if i["event"] == "grant.issued"]
    assert issued["grant_id"] == grant["grant_id"] and issued["device_id"] == s["device_id"]
    assert issued["detail"]["sha256"] == b64encode(hashlib.sha256(grant_bytes).digest())
    # the same request again is a replay
    with pytest.raises(errors.ReplayedRequest):
        keyserver.issue_grant(s["lic"], req)
    assert keyserver.verify_audit() == []


def test_grant_not_after_is_capped_by_licence_expiry(keyserver: KeyServer, admin: Admin) -> None:
    now = int(time.time()) + 2  # after the activation's request timestamp
    keyserver.clock = FixedClock(now)
    model_id = keyserver.create_model(admin, "m").id
    _, kc = _escrow(keyserver, admin, model_id)
    _, key = keyserver.create_licence(admin, Policy(models=(model_id,), max_devices=1, expires_at=now + 600))
    lic = keyserver.authenticate_licence(key)
    device = DeviceKey.generate()
    device_id = _activate(keyserver, lic, device).device_id
    signed = keyserver.issue_grant(lic, _grant_request(keyserver, device, device_id, model_id, kc))
    grant = json.loads(b64decode(signed["grant"]))
    assert grant["not_after"] == grant["offline_until"] == grant["recheck_after"] == now + 600
    keyserver.clock = FixedClock(now + 601)
    with pytest.raises(errors.LicenceExpired):
        keyserver.issue_grant(lic, _grant_request(keyserver, device, device_id, model_id, kc))


def test_grant_denials_are_audited(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    lic, dev, dev_id, mdl, kc = s["lic"], s["device"], s["device_id"], s["model_id"], s["kc"]

    def ask(**kw: Any) -> None:
        args = {"model_id": mdl, "kc": kc, **kw}
        keyserver.issue_grant(lic, _grant_request(keyserver, dev, dev_id, args.pop("model_id"), args.pop("kc"), **args))

    other_model = keyserver.create_model(admin, "other").id
    with pytest.raises(errors.ModelNotLicensed):
        ask(model_id=other_model)
    with pytest.raises(errors.ModelNotLicensed):
        ask(model_id=make_id("mdl", bytes(16)))  # nonexistent: same answer
    with pytest.raises(errors.KeyNotRegistered):
        ask(kc=os.urandom(32))
    with pytest.raises(errors.DeviceMismatch):
        ask(fp=bytes(32))
    # a device of another licence, an unknown device, a bad signature: all invalid-signature
    _, key2 = keyserver.create_licence(admin, Policy(models=(mdl,), max_devices=1))
    lic2 = keyserver.authenticate_licence(key2)
    dev2 = DeviceKey.generate()
    dev2_id = _activate(keyserver, lic2, dev2).device_id
    with pytest.raises(errors.InvalidSignature):
        keyserver.issue_grant(lic, _grant_request(keyserver, dev2, dev2_id, mdl, kc))
    with pytest.raises(errors.InvalidSignature):
        keyserver.issue_grant(lic, _grant_request(keyserver, dev, make_id("dev", bytes(16)), mdl, kc))
    with pytest.raises(errors.InvalidSignature):
        keyserver.issue_grant(lic, _grant_request(keyserver, dev2, dev_id, mdl, kc))  # signed by another key
    stale = int((time.time() - 3600) * 1_000_000)
    with pytest.raises(errors.StaleRequest):
        ask(ts=stale)
    keyserver.revoke_key(admin, mdl, kc, "leaked")
    with pytest.raises(errors.KeyRevoked):
        ask()
    _, kc2 = _escrow(keyserver, admin, mdl)
    ask(kc=kc2)
    keyserver.revoke_device(admin, dev_id, "lost")
    with pytest.raises(errors.DeviceRevoked):
        ask(kc=kc2)
    keyserver.revoke_licence(admin, lic.licence_id, "unpaid")
    with pytest.raises(errors.LicenceRevoked):
        ask(kc=kc2)
    assert _events(keyserver, admin) == [
        ("grant.denied", "model-not-licensed"),
        ("grant.denied", "model-not-licensed"),
        ("grant.denied", "key-not-registered"),
        ("grant.denied", "device-mismatch"),
        ("grant.denied", "key-revoked"),
        ("grant.issued", None),
        ("grant.denied", "device-revoked"),
        ("grant.denied", "licence-revoked"),
    ]
    assert keyserver.verify_audit() == []


def test_usage_limit_per_utc_day(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    day = (int(time.time()) // 86400) * 86400
    keyserver.clock = FixedClock(day + 86400 - 100)

    def ask() -> dict[str, str]:
        req = _grant_request(keyserver, s["device"], s["device_id"], s["model_id"], s["kc"])
        return keyserver.issue_grant(s["lic"], req)

    for _ in range(3):
        ask()
        keyserver.clock = FixedClock(keyserver.clock.time() + 0.001)
    with pytest.raises(errors.UsageLimitReached) as info:
        ask()
    assert info.value.retry_after == 100
    keyserver.clock = FixedClock(day + 86400 + 1)  # the next UTC day
    ask()
    assert [e for e in _events(keyserver, admin) if e[0] == "grant.denied"] == [("grant.denied", "usage-limit-reached")]


# --- HTTP -------------------------------------------------------------------------------------


def _http_grant(client: TestClient, key: str, raw: bytes, signature: str) -> Any:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Modelseal-Signature": signature}
    return client.post("/v1/grants", content=raw, headers=headers)


def test_http_grant(client: TestClient, keyserver: KeyServer, admin: Admin) -> None:
    model_id = keyserver.create_model(admin, "http").id
    k, kc = _escrow(keyserver, admin, model_id)
    _, key = keyserver.create_licence(admin, Policy(models=(model_id,), max_devices=1))
    device = DeviceKey.generate()
    device_id = _activate(keyserver, keyserver.authenticate_licence(key), device).device_id
    ts = time.time_ns() // 1000
    raw = grant_body(keyserver.secrets.signing_kid, device_id, model_id, kc, FP, ts=ts)
    r = _http_grant(client, key, raw, device.sign_request(GRANT_ROUTE, raw))
    assert r.status_code == 200, r.text
    pinned = {keyserver.secrets.signing_kid: keyserver.secrets.signing_key.public_key().public_bytes_raw()}
    _, grant = g.verify_signed(r.json(), pinned)
    assert g.unwrap_grant(grant, device.identity._key) == k
    r = _http_grant(client, key, raw, device.sign_request(GRANT_ROUTE, raw))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "replayed-request")
    raw2 = grant_body(keyserver.secrets.signing_kid, device_id, model_id, kc, FP, ts=ts + 1)
    r = _http_grant(client, key, raw2, device.sign_request("/v1/activations", raw2))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid-signature")
    r = _http_grant(client, "MSEAL-LICENCE:nope", raw2, device.sign_request(GRANT_ROUTE, raw2))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid-licence")


GOOD = {
    "aud": "AAAAAAAAAAA=",
    "ts": 1,
    "device_id": "dev_" + "A" * 22,
    "model_id": "mdl_" + "A" * 22,
    "key_commitment": b64encode(bytes(32)),
    "fingerprint": b64encode(bytes(32)),
}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b'{"aud": "AAAAAAAAAAA=", "aud": "AAAAAAAAAAA="}',
        json.dumps({**GOOD, "ts": 1.5}).encode(),
        json.dumps({**GOOD, "ts": 2**64}).encode(),
        json.dumps({**GOOD, "ts": -1}).encode(),
        json.dumps({**GOOD, "device_id": "lic_" + "A" * 22}).encode(),
        json.dumps({**GOOD, "key_commitment": "AAAA"}).encode(),
        json.dumps({**GOOD, "extra": 1}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "model_id"}).encode(),
        b"[" * 10000,
        b'{"ts": NaN}',
    ],
)
def test_http_malformed_grant_requests_are_400(
    client: TestClient, keyserver: KeyServer, admin: Admin, raw: bytes
) -> None:
    _, key = keyserver.create_licence(admin, Policy(models=(keyserver.create_model(admin, "x").id,), max_devices=1))
    r = _http_grant(client, key, raw, b64encode(bytes(64)))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "malformed-request"


def test_http_grant_media_type_and_size(client: TestClient, keyserver: KeyServer, admin: Admin) -> None:
    _, key = keyserver.create_licence(admin, Policy(models=(keyserver.create_model(admin, "x").id,), max_devices=1))
    r = client.post(
        "/v1/grants", content=b"{}", headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
    )
    assert r.status_code == 415
    r = _http_grant(client, key, b"{" + b" " * (10 << 20) + b"}", "x")
    assert r.status_code == 413


@pytest.mark.parametrize("revoke", ["licence", "device"])
def test_revocation_between_checks_and_commit_is_caught_in_the_write(
    keyserver: KeyServer, admin: Admin, setup: dict[str, Any], revoke: str
) -> None:
    """Spec §5.3: a revocation that commits after a grant's reads but before its write unit is seen
    by the write unit's conditional update; no grant, no usage counted, a denial audited."""
    s = setup
    req = _grant_request(keyserver, s["device"], s["device_id"], s["model_id"], s["kc"])
    with keyserver.db.read() as conn:
        stale = keyserver._grant_reads(conn, s["lic"].licence_id, req)  # read before the revocation
    if revoke == "licence":
        keyserver.revoke_licence(admin, s["lic"].licence_id, "ended")
    else:
        keyserver.revoke_device(admin, s["device_id"], "lost")
    expected = errors.LicenceRevoked if revoke == "licence" else errors.DeviceRevoked
    with pytest.raises(expected):
        keyserver.issue_grant(s["lic"], req, reads=stale)
    with keyserver.db.read() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM usage_days")).scalar_one() == 0
    assert ("grant.denied", expected.code) in _events(keyserver, admin)
    assert ("grant.issued", None) not in _events(keyserver, admin)


def test_grant_waits_for_a_revocation_in_progress_and_is_refused(
    keyserver: KeyServer, admin: Admin, setup: dict[str, Any]
) -> None:
    """A revocation that has changed the licence row but not committed yet: the grant's write unit
    waits for it (PostgreSQL: its shared lock on the licence row; SQLite: the write lock), then
    sees it and refuses, so no grant is audited after the revocation."""
    import threading

    s = setup
    req = _grant_request(keyserver, s["device"], s["device_id"], s["model_id"], s["kc"])
    revoker = keyserver.db.engine.connect()
    revoker.execution_options(sqlite_begin="IMMEDIATE")  # SQLite: take the write lock now
    revoker.begin()
    revoker.execute(
        text("UPDATE licences SET revoked_at = 1, revoke_reason = 'x' WHERE id = :i"), {"i": s["lic"].licence_id}
    )
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_try(lambda: keyserver.issue_grant(s["lic"], req))))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive()  # waiting for the revocation's transaction
    revoker.commit()
    revoker.close()
    worker.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.LicenceRevoked)


def _try(fn: Any) -> object:
    try:
        return fn()
    except errors.DomainError as exc:
        return exc
