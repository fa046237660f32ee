"""End to end against a real ``modelseal keyserver serve`` (spec §17.1 rows 7, 17): seal with
``--keyserver``, activate, run an ONNX model through a grant, revoke, and fail with a typed error."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import modelseal
from modelseal._private import format as fmt
from modelseal.keyserver import offline
from modelseal.keyserver.client import KeyServerUnwrapper

from ..models import mlp_onnx
from .live import admin_token, serve
from .test_client_cli import _cli


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``keyserver serve`` in dev mode, its public URL set to where it listens (stanzas carry it)."""
    with serve(tmp_path, public_url=True) as base:
        yield base, admin_token(tmp_path)


X = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)


def _create_model(base: str, token: str, name: str) -> str:
    req = urllib.request.Request(
        base + "/v1/admin/models",
        data=json.dumps({"name": name}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(json.loads(resp.read())["id"])


def test_seal_activate_run_revoke(live: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, token = live
    publisher, device_home = tmp_path / "publisher", tmp_path / "device"
    model_id = _create_model(base, token, "mlp")
    code, out, err = _cli(publisher, base, token, "licence", "create", "--model", "mlp", "--max-devices", "2")
    assert code == 0, err
    licence = out.strip()

    plain = mlp_onnx(tmp_path / "m.onnx")
    sealed = tmp_path / "m.mseal"
    code, _, err = _cli(
        publisher, base, token, "seal", str(plain), "-o", str(sealed), "--keyserver", base, "--model", "mlp"
    )
    assert code == 0, err
    [stanza] = modelseal.inspect(sealed).recipients
    assert stanza["type"] == "keyserver" and stanza["model_id"] == model_id
    assert stanza["url"] == base

    code, out, err = _cli(device_home, base, token, "activate", "--licence", licence)
    assert code == 0, err
    device_id = json.loads(out)["device_id"]

    unwrapper = KeyServerUnwrapper(home=device_home)
    session = modelseal.load_onnx(sealed, identity=unwrapper, providers=["CPUExecutionProvider"])
    expected = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert np.array_equal(session.run(None, {"x": X})[0], expected)
    # opening again works (from the cached grant)
    with modelseal.open(sealed, identity=unwrapper) as m:
        assert m.read() == plain.read_bytes()

    # a second device activates transparently through modelseal.open(keyserver=, licence=)
    other_home = tmp_path / "other"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELSEAL_HOME", str(other_home))
        with modelseal.open(sealed, keyserver=base, licence=licence) as m:
            assert m.read() == plain.read_bytes()
        # and every loader takes the same keywords
        session2 = modelseal.load_onnx(sealed, keyserver=base, licence=licence, providers=["CPUExecutionProvider"])
        assert np.array_equal(session2.run(None, {"x": X})[0], expected)
    assert (other_home / "device.key").exists()

    # the CLI opens with the activated device state
    code, _, err = _cli(device_home, base, token, "open", str(sealed), "-o", str(tmp_path / "out"))
    assert code == 0, err

    assert _cli(publisher, base, token, "device", "revoke", device_id, "--reason", "lost")[0] == 0
    # Revocation takes effect at the next online check (spec §10.5): until the grant's
    # recheck_after the cached grant opens without contacting the server.
    with modelseal.open(sealed, identity=unwrapper) as m:
        assert m.read() == plain.read_bytes()
    monkeypatch.setattr(offline, "local_time", lambda: time.time() + 3601)  # past the 1 h recheck
    with pytest.raises(modelseal.LicenceError) as info:
        modelseal.load_onnx(sealed, identity=unwrapper, providers=["CPUExecutionProvider"])
    assert info.value.code == "device-revoked"
    code, _, err = _cli(device_home, base, token, "open", str(sealed), "-o", str(tmp_path / "out2"))
    assert code == 10 and "device-revoked" in err
    assert not list((device_home / "grants").rglob("*.grant"))  # the denial removed the cached grant


def test_copied_stanza_makes_no_request_and_unknown_server_is_not_contacted(
    live: tuple[str, str],
    tmp_path: Path,
) -> None:
    base, token = live
    _create_model(base, token, "mlp")
    _, out, _ = _cli(tmp_path / "pub", base, token, "licence", "create", "--model", "mlp", "--max-devices", "1")
    licence = out.strip()
    plain = mlp_onnx(tmp_path / "m.onnx")
    sealed = tmp_path / "m.mseal"
    recipient = modelseal.KeyServerRecipient(base, token, "mlp")
    identity = modelseal.Identity.generate()
    modelseal.seal(plain, sealed, recipients=[recipient, identity.recipient])
    assert recipient.matches(modelseal.inspect(sealed).recipients[0])
    home = tmp_path / "dev"
    assert _cli(home, base, token, "activate", "--licence", licence)[0] == 0

    # A keyserver stanza whose commitment differs from the manifest's is skipped: no request.
    data = bytearray(sealed.read_bytes())
    found = re.search(rb'"key_commitment":"[A-Za-z0-9+/=]{44}","model_id"', bytes(data))  # the stanza's copy
    assert found is not None
    old, new = found.group(0), b'"key_commitment":"' + b"A" * 43 + b'=","model_id"'
    at = data.index(old)
    data[at : at + len(old)] = new
    copied = tmp_path / "copied.mseal"
    copied.write_bytes(bytes(data))
    calls: list[str] = []
    unwrapper = KeyServerUnwrapper(home=home)
    original = unwrapper._unwrap
    unwrapper._unwrap = lambda *a: calls.append("x") or original(*a)  # type: ignore[method-assign]
    with pytest.raises((modelseal.WrongKeyError, modelseal.IntegrityError)):
        modelseal.open(copied, identity=unwrapper)
    assert calls == []

    # Not activated anywhere: a clear typed error, not "wrong key".
    with pytest.raises(modelseal.LicenceError) as info:
        modelseal.open(sealed, identity=KeyServerUnwrapper(home=tmp_path / "nobody"))
    assert info.value.code == "not-activated"
    # The publisher's own x25519 recipient still opens it.
    with modelseal.open(sealed, identity=identity) as m:
        assert m.read() == plain.read_bytes()
    assert fmt.MAX_STANZAS >= 2
