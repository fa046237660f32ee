"""Master key and envelope encryption (spec §13): the KEK contract, row binding, nothing in clear."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from modelseal._private.crypto import hkdf
from modelseal.keyserver.crypto import (
    DEV_MASTER_KEY,
    KeyEncryptionKey,
    LocalKey,
    escrow_wrap,
    model_key_aad,
)
from modelseal.keyserver.errors import KeyUnavailable, SettingsError
from modelseal.keyserver.services import Admin, KeyServer
from modelseal.keyserver.settings import Settings


class DictKms(KeyEncryptionKey):
    """A stand-in KMS: opaque handles, plaintext kept server side, bound to the aad (encryption context)."""

    key_id = "kms-test"

    def __init__(self) -> None:
        self._store: dict[bytes, tuple[bytes, bytes]] = {}

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        handle = os.urandom(16)
        self._store[handle] = (plaintext, aad)
        return handle

    def unwrap(self, wrapped: bytes, *, aad: bytes) -> bytes:
        found = self._store.get(wrapped)
        if found is None or found[1] != aad:
            raise KeyUnavailable("kms refused")
        return found[0]


@pytest.fixture(params=["local", "kms"])
def kek(request: pytest.FixtureRequest) -> KeyEncryptionKey:
    return LocalKey.generate()[0] if request.param == "local" else DictKms()


def test_contract_round_trip(kek: KeyEncryptionKey) -> None:
    wrapped = kek.wrap(b"k" * 32, aad=b"row-1")
    assert kek.unwrap(wrapped, aad=b"row-1") == b"k" * 32
    assert kek.wrap(b"k" * 32, aad=b"row-1") != wrapped  # fresh nonce / handle each time


def test_contract_wrong_aad(kek: KeyEncryptionKey) -> None:
    wrapped = kek.wrap(b"k" * 32, aad=b"row-1")
    with pytest.raises(KeyUnavailable):
        kek.unwrap(wrapped, aad=b"row-2")


def test_local_key_format_and_tamper() -> None:
    kek = LocalKey(bytes(range(32)))
    wrapped = kek.wrap(b"secret", aad=b"a")
    assert wrapped[0] == 1 and len(wrapped) == 1 + 12 + 6 + 16
    for i in (0, 5, len(wrapped) - 1):
        bad = bytearray(wrapped)
        bad[i] ^= 1
        with pytest.raises(KeyUnavailable):
            kek.unwrap(bytes(bad), aad=b"a")
    with pytest.raises(KeyUnavailable):
        kek.unwrap(wrapped[:20], aad=b"a")
    with pytest.raises(KeyUnavailable):
        LocalKey(bytes(32)).unwrap(wrapped, aad=b"a")
    assert kek.key_id != LocalKey(bytes(32)).key_id and len(kek.key_id) == 11


def test_master_key_strings() -> None:
    kek, text_ = LocalKey.generate()
    assert text_.startswith("MSEAL-KS-MASTER:")
    assert LocalKey.parse(text_, allow_dev=False).key_id == kek.key_id
    with pytest.raises(SettingsError, match="MASTER_KEY"):
        LocalKey.parse(text_[:-2] + "AA", allow_dev=False)
    with pytest.raises(SettingsError, match="MASTER_KEY"):
        LocalKey.parse("dev", allow_dev=False)
    assert LocalKey.parse("dev", allow_dev=True).key_id == LocalKey(DEV_MASTER_KEY).key_id


def _register(server: KeyServer, admin: Admin, name: str) -> tuple[str, bytes, bytes]:
    model = server.create_model(admin, name)
    key, salt = os.urandom(32), os.urandom(32)
    commitment = hkdf(key, salt, b"key-commitment")
    pub = server.secrets.escrow_key.public_key().public_bytes_raw()
    epk, body = escrow_wrap(key, pub, model.id, commitment, salt)
    server.register_key(admin, model.id, key_commitment=commitment, salt=salt, epk=epk, body=body)
    return model.id, commitment, key


def test_row_swap_fails_to_unwrap(keyserver: KeyServer, admin: Admin) -> None:
    a_id, a_kc, _ = _register(keyserver, admin, "a")
    b_id, b_kc, _ = _register(keyserver, admin, "b")
    with keyserver.db.engine.begin() as conn:
        wa = conn.execute(text("SELECT wrapped_key FROM model_keys WHERE model_id = :m"), {"m": a_id}).scalar_one()
        conn.execute(text("UPDATE model_keys SET wrapped_key = :w WHERE model_id = :m"), {"w": wa, "m": b_id})
    with pytest.raises(KeyUnavailable):
        keyserver.escrowed_key(b_id, b_kc)
    with pytest.raises(KeyUnavailable):
        keyserver.kek.unwrap(bytes(wa), aad=model_key_aad(b_id, a_kc))


def test_database_holds_no_key_in_clear(keyserver: KeyServer, admin: Admin, backend: str, tmp_path: Path) -> None:
    keys = [_register(keyserver, admin, f"m{i}")[2] for i in range(3)]
    secrets = [
        keyserver.secrets.pepper,
        keyserver.secrets.audit_key,
        keyserver.secrets.signing_key.private_bytes_raw(),
        keyserver.secrets.escrow_key.private_bytes_raw(),
    ]
    with keyserver.db.engine.begin() as conn:
        rows: list[bytes] = []
        for table in ("server_secrets", "model_keys", "admin_tokens", "audit_log", "server_keys"):
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                rows += [bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode() for v in row]
    dump = b"\n".join(rows)
    if backend == "sqlite":
        keyserver.db.dispose()
        data = tmp_path / "data"
        dump += b"".join(p.read_bytes() for p in data.iterdir() if p.name.startswith("keyserver.db"))
    for secret in keys + secrets:
        assert secret not in dump


def test_wrong_master_key_refuses_to_start(settings: Settings, keyserver: KeyServer) -> None:
    from pydantic import SecretStr

    from modelseal.keyserver.bootstrap import open_keyserver

    other = settings.model_copy(update={"master_key": SecretStr(LocalKey.generate()[1])})
    with pytest.raises(KeyUnavailable):
        open_keyserver(other)
