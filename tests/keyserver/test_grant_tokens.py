"""One-time grant tokens (spec §9, §7.5, §7.7) on SQLite and PostgreSQL: a token redeems once —
also when 200 clients race for it — is bound to its model, key and device, expires, and every
redemption and denial is audited."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import text

import modelseal
from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver import errors
from modelseal.keyserver import grant as g
from modelseal.keyserver.client import DeviceKey
from modelseal.keyserver.crypto import b64url
from modelseal.keyserver.services import Admin, KeyServer, Policy

from ..models import mlp_onnx
from .live import admin_token, serve
from .test_client_cli import _cli
from .test_e2e_grants import _create_model
from .test_grants import FixedClock, _escrow
from .test_licences import _activate


@pytest.fixture
def setup(keyserver: KeyServer, admin: Admin) -> dict[str, Any]:
    model_id = keyserver.create_model(admin, "resnet").id
    k, kc = _escrow(keyserver, admin, model_id)
    view, key = keyserver.create_licence(admin, Policy(models=(model_id,), max_devices=5))
    return {"model_id": model_id, "k": k, "kc": kc, "licence_id": view["id"], "key": key}


def _pk() -> tuple[X25519PrivateKey, bytes]:
    secret = X25519PrivateKey.generate()
    return secret, secret.public_key().public_bytes_raw()


def _token_events(server: KeyServer, admin: Admin) -> list[tuple[str, str | None]]:
    items, _ = server.list_audit(admin, chain=0, after_seq=0, limit=1000)
    return [(i["event"], i["code"]) for i in items if i["event"].startswith("token.")]


def test_token_redeems_once_into_a_working_grant(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    created = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"], grant_ttl_s=600)
    assert created["token"].startswith("MSEAL-GRANT-TOKEN:") and created["id"].startswith("tok_")
    secret, pk = _pk()
    signed = keyserver.redeem_grant_token(
        created["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"]
    )
    pinned = {keyserver.secrets.signing_kid: keyserver.secrets.signing_key.public_key().public_bytes_raw()}
    _, grant = g.verify_signed(signed, pinned)
    assert g.unwrap_grant(grant, secret) == s["k"]
    assert grant["device_id"] == "pk_" + b64url(pk)
    assert grant["not_after"] - grant["issued_at"] == 600
    assert grant["recheck_after"] == grant["offline_until"] == grant["not_after"]
    with pytest.raises(errors.TokenAlreadyRedeemed):
        keyserver.redeem_grant_token(created["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
    with keyserver.db.read() as conn:
        row = conn.execute(text("SELECT redeemed_grant_id FROM grant_tokens")).one()
    assert row[0] == grant["grant_id"]
    assert _token_events(keyserver, admin) == [
        ("token.created", None),
        ("token.redeemed", None),
        ("token.denied", "token-already-redeemed"),
    ]
    assert keyserver.verify_audit() == []


def test_invalid_tokens_get_one_answer(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    token = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"])["token"]
    wrong_secret = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]  # checksum breaks too
    _, pk = _pk()
    for bad in (None, "", "MSEAL-GRANT-TOKEN:xyz", wrong_secret, s["key"], token.replace("GRANT-TOKEN", "LICENCE")):
        with pytest.raises(errors.InvalidToken):
            keyserver.redeem_grant_token(bad, x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
    # none of them redeemed it
    keyserver.redeem_grant_token(token, x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])


def test_token_bindings_and_expiry(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    _, pk = _pk()
    other_model = keyserver.create_model(admin, "other").id
    _, other_kc = _escrow(keyserver, admin, other_model)
    with pytest.raises(errors.ModelNotLicensed):  # the licence does not cover it
        keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=other_model)

    # bound to a key commitment: another container of the same model is refused, without redeeming
    _, kc2 = _escrow(keyserver, admin, s["model_id"])
    bound = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"], key_commitment=kc2)
    with pytest.raises(errors.ModelNotLicensed):
        keyserver.redeem_grant_token(bound["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
    keyserver.redeem_grant_token(bound["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=kc2)

    # bound to a device: only that device's key
    device = DeviceKey.generate()
    device_id = _activate(keyserver, keyserver.authenticate_licence(s["key"]), device).device_id
    for_device = keyserver.create_grant_token(
        admin, licence_id=s["licence_id"], model_id=s["model_id"], device_id=device_id
    )
    with pytest.raises(errors.DeviceMismatch):
        keyserver.redeem_grant_token(for_device["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
    signed = keyserver.redeem_grant_token(
        for_device["token"], x25519_pk=device.x25519_public, model_id=s["model_id"], key_commitment=s["kc"]
    )
    assert g.parse_grant(b64decode(signed["grant"]))["device_id"] == device_id

    # expiry
    expiring = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"], expires_in_s=60)
    keyserver.clock = FixedClock(time.time() + 61)
    with pytest.raises(errors.TokenExpired):
        keyserver.redeem_grant_token(expiring["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])

    # a revoked licence stops its tokens
    keyserver.clock = FixedClock(time.time())
    live_token = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"])
    keyserver.revoke_licence(admin, s["licence_id"], "ended")
    with pytest.raises(errors.LicenceRevoked):
        keyserver.redeem_grant_token(live_token["token"], x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
    with keyserver.db.read() as conn:
        redeemed = conn.execute(text("SELECT COUNT(*) FROM grant_tokens WHERE redeemed_at IS NOT NULL")).scalar_one()
    assert redeemed == 2  # bound (after the refusal) and for_device; denials redeemed nothing
    codes = [c for e, c in _token_events(keyserver, admin) if e == "token.denied"]
    assert codes == ["model-not-licensed", "device-mismatch", "token-expired", "licence-revoked"]
    assert keyserver.verify_audit() == []
    assert other_kc  # escrowed, but not licensed


def test_race_200_redemptions_of_one_token(keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    """§17.2: 200 threads redeem one token at once; exactly one grant is issued."""
    s = setup
    token = keyserver.create_grant_token(admin, licence_id=s["licence_id"], model_id=s["model_id"])["token"]
    barrier = threading.Barrier(200)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        _, pk = _pk()
        barrier.wait()
        try:
            keyserver.redeem_grant_token(token, x25519_pk=pk, model_id=s["model_id"], key_commitment=s["kc"])
            outcome = "granted"
        except errors.DomainError as exc:
            outcome = exc.code
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert outcomes.count("granted") == 1
    assert outcomes.count("token-already-redeemed") == 199
    events = _token_events(keyserver, admin)
    assert events.count(("token.redeemed", None)) == 1
    assert events.count(("token.denied", "token-already-redeemed")) == 199
    with keyserver.db.read() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM grant_tokens WHERE redeemed_at IS NOT NULL")).scalar_one() == 1
    assert keyserver.verify_audit() == []


def test_http_routes(client: TestClient, keyserver: KeyServer, admin: Admin, setup: dict[str, Any]) -> None:
    s = setup
    r = client.post("/v1/admin/grant-tokens", json={"licence_id": s["licence_id"], "model_id": s["model_id"]})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    _, pk = _pk()
    body = {
        "x25519_public_key": b64encode(pk),
        "model_id": s["model_id"],
        "key_commitment": b64encode(s["kc"]),
    }
    anon = TestClient(client.app, headers={"Authorization": f"Bearer {token}"})
    # server-info accepts the token as a credential (the client pins keys from it)
    assert anon.get("/v1/server-info").status_code == 200
    r = anon.post("/v1/grant-tokens/redeem", json=body)
    assert r.status_code == 200 and set(r.json()) == {"grant", "signature"}
    r = anon.post("/v1/grant-tokens/redeem", json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "token-already-redeemed"
    r = anon.post("/v1/grant-tokens/redeem", json=body, headers={"Authorization": "Bearer MSEAL-GRANT-TOKEN:nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid-token"
    for bad in ({**body, "x25519_public_key": "AAAA"}, {**body, "extra": 1}, {"token": token}, [1]):
        r = anon.post("/v1/grant-tokens/redeem", json=bad)
        assert r.status_code == 400, (bad, r.text)
    r = anon.post("/v1/admin/grant-tokens", json={"licence_id": s["licence_id"], "model_id": s["model_id"]})
    assert r.status_code == 401  # a grant token is not an admin credential
    r = client.post(
        "/v1/admin/grant-tokens", json={"licence_id": s["licence_id"], "model_id": s["model_id"], "expires_in_s": 5}
    )
    assert r.status_code == 400


def test_open_with_a_one_time_token_end_to_end(tmp_path: Path) -> None:
    """A one-time link's token opens the model once, on a machine with no activation."""
    with serve(tmp_path, public_url=True) as base:
        token = admin_token(tmp_path)
        model_id = _create_model(base, token, "mlp")
        plain = mlp_onnx(tmp_path / "m.onnx")
        sealed = tmp_path / "m.mseal"
        modelseal.seal(plain, sealed, recipients=[modelseal.KeyServerRecipient(base, token, "mlp")])
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            policy = {"models": [model_id], "max_devices": 1, "expires_at": None}
            licence_id = http.post("/v1/admin/licences", json={"policy": policy}).json()["licence"]["id"]
            grant_token = http.post(
                "/v1/admin/grant-tokens", json={"licence_id": licence_id, "model_id": model_id}
            ).json()["token"]
            # the publisher CLI makes tokens too (by model name), bound to a device if asked
            code, out, err = _cli(tmp_path / "pub", base, token, "grant-token", "create", "--licence", licence_id,
                                  "--model", "mlp", "--expires", "2h", "--grant-ttl", "10m")  # fmt: skip
            assert code == 0 and out.startswith("MSEAL-GRANT-TOKEN:"), err
            code, _, err = _cli(tmp_path / "pub", base, token, "grant-token", "create", "--licence", licence_id,
                                "--model", "nope")  # fmt: skip
            assert code == 10 and "no model named 'nope'" in err
        home = tmp_path / "fresh"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MODELSEAL_HOME", str(home))
            with modelseal.open(sealed, keyserver=base, grant_token=grant_token) as m:
                assert m.read() == plain.read_bytes()
            with pytest.raises(modelseal.LicenceError) as info:
                modelseal.open(sealed, keyserver=base, grant_token=grant_token)
            assert info.value.code == "token-already-redeemed"
        assert not home.exists()  # nothing was written: no device key, no cache
