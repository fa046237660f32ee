"""Air-gapped activation (spec §11) through the CLI against a real server: request file on the
device, submit on a connected machine, response file back; the device then opens offline. A
request file is answered once; a tampered or foreign response is refused."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal._private.encoding import b64decode, b64encode
from modelseal.keyserver import errors, offline
from modelseal.keyserver import grant as g
from modelseal.keyserver.client import DeviceKey, KeyServerUnwrapper
from modelseal.keyserver.offline_files import make_request, parse_offline_response
from modelseal.keyserver.services import Admin, Policy
from modelseal.keyserver.services import KeyServer as KeyServerType

from ..models import mlp_onnx
from .live import admin_token, serve
from .test_client_cli import _cli
from .test_e2e_grants import _create_model
from .test_grants import FixedClock, _escrow
from .test_licences import FP


def test_air_gapped_activation_then_offline_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device, online, pub = tmp_path / "device", tmp_path / "online", tmp_path / "pub"
    with serve(tmp_path, public_url=True) as base:
        token = admin_token(tmp_path)
        _create_model(base, token, "mlp")
        code, out, err = _cli(pub, base, token, "licence", "create", "--model", "mlp", "--max-devices", "1",
                              "--recheck", "1d", "--offline-grace", "30d", "--grant-ttl", "60d")  # fmt: skip
        assert code == 0, err
        licence = out.strip()
        plain = mlp_onnx(tmp_path / "m.onnx")
        sealed = tmp_path / "m.mseal"
        modelseal.seal(plain, sealed, recipients=[modelseal.KeyServerRecipient(base, token, "mlp")])

        info, req, resp = tmp_path / "info.json", tmp_path / "req.json", tmp_path / "resp.json"
        assert _cli(online, base, token, "offline", "server-info", "-o", str(info), "--licence", licence)[0] == 0
        # The device never talks to the server: no MODELSEAL_KEYSERVER for its commands.
        monkeypatch.setenv("MODELSEAL_HOME", str(device))
        code, _, err = _cli(device, "", "", "offline", "request", "--server-info", str(info), "--for", str(sealed),
                            "--licence", licence, "-o", str(req), "--label", "lab-pc")  # fmt: skip
        assert code == 0, err
        assert "MSEAL-LICENCE" not in req.read_text()  # the request carries no secret
        code, _, err = _cli(online, base, token, "offline", "submit", str(req), "--licence", licence, "-o", str(resp))
        assert code == 0, err
        # a request file is answered once
        code, _, err = _cli(online, base, token, "offline", "submit", str(req), "--licence", licence, "-o", "/dev/null")
        assert code == 10 and "request-already-used" in err

        # a tampered response is refused and changes nothing
        good = json.loads(resp.read_text())
        bad = dict(
            good, response=good["response"][:-8] + ("A" if good["response"][-8] != "A" else "B") + good["response"][-7:]
        )
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        code, _, err = _cli(device, "", "", "offline", "accept", str(tmp_path / "bad.json"))
        assert code == 10, err
        assert not list((device / "activations").glob("*.json"))
        code, out, err = _cli(device, "", "", "offline", "accept", str(resp))
        assert code == 0, err
        accepted = json.loads(out)
        assert accepted["grants"] == 1 and accepted["denied"] == []
        # the response's time does not set this device's clock offset (it may have been held back)
        ident = DeviceKey.load(device / "device.key")
        clock, rolled_back = offline.State(device, ident.identity._key.private_bytes_raw(), ident.x25519_public).clock()
        assert clock is not None and clock.offset == 0.0 and not rolled_back
        code, out, _ = _cli(pub, base, token, "device", "list")
        [listed] = json.loads(out)
        assert listed["id"] == accepted["device_id"] and listed["label"] == "lab-pc"

    # Server gone. The device opens from its cached grant, also past recheck (unreachable),
    # until the offline grace ends.
    with modelseal.open(sealed, identity=KeyServerUnwrapper(home=device)) as m:
        assert m.read() == plain.read_bytes()
    monkeypatch.setattr(offline, "local_time", lambda: time.time() + 10 * 86400)
    with modelseal.open(sealed, identity=KeyServerUnwrapper(home=device)) as m:
        assert m.read() == plain.read_bytes()
    monkeypatch.setattr(offline, "local_time", lambda: time.time() + 40 * 86400)
    with pytest.raises(modelseal.LicenceError) as info_exc:
        modelseal.open(sealed, identity=KeyServerUnwrapper(home=device))
    assert info_exc.value.code == "offline-expired"


# --- service level, SQLite and PostgreSQL ---------------------------------------------------------


def _request_file(server: KeyServerType, device: DeviceKey, licence_id: str, models: list[Any], **over: Any) -> Any:
    fields = {
        "aud": b64encode(server.secrets.signing_kid),
        "ts": int(server.clock.time() * 1_000_000),
        "licence_id": licence_id,
        "device_id": None,
        "x25519_public_key": b64encode(device.x25519_public),
        "ed25519_public_key": b64encode(device.ed25519_public),
        "fingerprint": b64encode(FP),
        "label": None,
        "models": models,
    } | over
    return make_request(fields, device.signing._key)


def test_offline_requests_are_verified_and_used_once(keyserver: KeyServerType, admin: Admin) -> None:
    model_id = keyserver.create_model(admin, "m").id
    k, kc = _escrow(keyserver, admin, model_id)
    view, key = keyserver.create_licence(admin, Policy(models=(model_id,), max_devices=1, offline_grace_s=86400))
    lic = keyserver.authenticate_licence(key)
    device = DeviceKey.generate()
    models = [{"model_id": model_id, "key_commitment": b64encode(kc)}]

    # tampered: the signature covers the request bytes
    good = _request_file(keyserver, device, view["id"], models)
    raw = bytearray(b64decode(good["request"]))
    raw[raw.index(b'"label":null')] = ord(" ")  # no longer canonical: refused before the signature
    with pytest.raises(errors.MalformedRequest):
        keyserver.process_offline(lic, dict(good, request=b64encode(bytes(raw))))
    forged = _request_file(keyserver, DeviceKey.generate(), view["id"], models)
    with pytest.raises(errors.InvalidSignature):  # another key signed it than the one it names
        keyserver.process_offline(lic, dict(forged, request=good["request"]))
    with pytest.raises(errors.WrongAudience):
        keyserver.process_offline(lic, _request_file(keyserver, device, view["id"], models, aud=b64encode(bytes(8))))
    stale = int((keyserver.clock.time() - 8 * 86400) * 1_000_000)
    with pytest.raises(errors.RequestExpired):
        keyserver.process_offline(lic, _request_file(keyserver, device, view["id"], models, ts=stale))
    for bad in ({}, [], {"type": "modelseal-offline-request", "v": 1, "request": "!", "signature": "x"}):
        with pytest.raises(errors.MalformedRequest):
            keyserver.process_offline(lic, bad)

    response = keyserver.process_offline(lic, good)
    pinned = {keyserver.secrets.signing_kid: keyserver.secrets.signing_key.public_key().public_bytes_raw()}
    resp = parse_offline_response(response, pinned)
    [signed] = resp["grants"]
    _, grant = g.verify_signed(signed, pinned)
    assert g.unwrap_grant(grant, device.identity._key) == k
    assert grant["device_id"] == resp["device_id"] and resp["denied"] == []
    with pytest.raises(errors.RequestAlreadyUsed):
        keyserver.process_offline(lic, good)
    with pytest.raises(errors.InvalidSignature):  # the response is bound to the server key
        parse_offline_response(response, {keyserver.secrets.signing_kid: bytes(32)})

    # renewal with a new request from the same device works; a second device is over the limit
    keyserver.clock = FixedClock(keyserver.clock.time() + 1)
    renewal = keyserver.process_offline(lic, _request_file(keyserver, device, view["id"], models))
    assert parse_offline_response(renewal, pinned)["device_id"] == resp["device_id"]
    with pytest.raises(errors.DeviceLimitReached):
        keyserver.process_offline(lic, _request_file(keyserver, DeviceKey.generate(), view["id"], models))
    # a revoked device gets nothing more
    keyserver.revoke_device(admin, resp["device_id"], "stolen")
    keyserver.clock = FixedClock(keyserver.clock.time() + 1)
    with pytest.raises(errors.DeviceRevoked):
        keyserver.process_offline(lic, _request_file(keyserver, device, view["id"], models))
    events = [i["event"] for i in keyserver.list_audit(admin, chain=0, after_seq=0, limit=500)[0]]
    assert events.count("offline.processed") == 2
    assert keyserver.verify_audit() == []
