from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from modelseal import Identity, SigningKey, VerifyKey, X25519Recipient
from modelseal._private.encoding import b64decode


def test_identity_roundtrip_and_recipient_string() -> None:
    ident = Identity.generate()
    again = Identity.from_string(ident.to_string())
    assert again.recipient == ident.recipient
    r = str(ident.recipient)
    assert r.startswith("mseal-x25519:")
    assert X25519Recipient.parse(r) == ident.recipient


def test_typo_in_a_key_string_is_caught_by_the_checksum() -> None:
    r = str(Identity.generate().recipient)
    i = len(r) - 10
    typo = r[:i] + ("A" if r[i] != "A" else "B") + r[i + 1 :]
    with pytest.raises(ValueError, match="checksum"):
        X25519Recipient.parse(typo)
    with pytest.raises(ValueError, match=r"wrong length|bad base64"):
        X25519Recipient.parse(r[:-3])
    with pytest.raises(ValueError, match="wrong length"):
        X25519Recipient.parse(r[:-4])
    with pytest.raises(ValueError, match="starting with"):
        X25519Recipient.parse("age1qqqqqqqq")
    with pytest.raises(ValueError):
        VerifyKey.parse(r)  # a recipient is not a verify key


def test_identity_file_is_private_and_never_silently_overwritten(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "device.key"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).recipient == ident.recipient
    assert str(ident.recipient) in path.read_text()  # public key noted for the owner
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)
    other = Identity.generate()
    other.save(path, overwrite=True)
    assert Identity.load(path).recipient == other.recipient
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loading_a_world_readable_key_warns(tmp_path: Path) -> None:
    path = tmp_path / "k"
    SigningKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        SigningKey.load(path)


def test_signing_key_signs_and_verifies() -> None:
    sk = SigningKey.generate()
    sig = sk.sign(b"msg")
    assert sk.verify_key.verify(sig, b"msg")
    assert not sk.verify_key.verify(sig, b"other")
    assert VerifyKey.parse(str(sk.verify_key)) == sk.verify_key


def test_canonical_base64_is_enforced() -> None:
    from modelseal import FormatError

    assert b64decode("AA==") == b"\x00"
    for bad in ("AB==", "AA", "A===", "AA==\n", "****"):
        with pytest.raises(FormatError):
            b64decode(bad)
