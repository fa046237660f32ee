"""The key grant format (spec §8): build, sign, parse and open grants.

Shared by the server (building) and the client (verifying); imports only ``cryptography`` and the
core library, so the client pulls in no web or database stack. Every primitive is from
``cryptography``; the wrap is HPKE-style (X25519 + HKDF-SHA256 + AES-256-GCM), not RFC 9180.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._private.crypto import LABEL, hkdf
from .._private.encoding import b64decode, b64encode, dumps_canonical, loads_strict
from ..errors import FormatError

MAX_GRANT_LEN = 4096
_TIMES = ("issued_at", "recheck_after", "offline_until", "not_after")
_MEMBERS = {"v", "grant_id", "server_key_id", "model_id", "licence_id", "device_id", "key_commitment", "wrap", *_TIMES}
_ID = {p: re.compile(rf"^{p}_[A-Za-z0-9_-]{{22}}$") for p in ("grt", "mdl", "lic", "dev")}
_PK_DEVICE = re.compile(r"^pk_[A-Za-z0-9_-]{43}$")


class GrantInvalid(ValueError):
    """A grant failed a check of spec §8.4 (the client reports ``grant-invalid``)."""


def header_bytes(grant: dict[str, Any]) -> bytes:
    """``H``: the canonical grant without ``wrap`` (the wrap's associated data)."""
    return dumps_canonical({k: v for k, v in grant.items() if k != "wrap"})


def _wrap_key(shared: bytes, epk: bytes, device_pk: bytes, grant_id: str) -> bytes:
    return hkdf(shared, epk + device_pk, b"keyserver-grant\x00" + grant_id.encode("ascii"))


def signature_message(grant_bytes: bytes) -> bytes:
    """``L || "keyserver-grant-signature\\0" || u32be(len(G)) || G`` (spec §8.3)."""
    return LABEL + b"keyserver-grant-signature\x00" + len(grant_bytes).to_bytes(4, "big") + grant_bytes


def build_grant(fields: dict[str, Any], content_key: bytes, device_pk: bytes, ephemeral: X25519PrivateKey) -> bytes:
    """``G``: ``fields`` (every member of spec §8.1 but ``wrap``) plus ``content_key`` wrapped to ``device_pk``.

    Raises:
        ValueError: the device key is a low-order point (the shared secret is all zeros).
    """
    epk = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(device_pk))  # ValueError if all-zero
    header = header_bytes(fields)
    body = AESGCM(_wrap_key(shared, epk, device_pk, fields["grant_id"])).encrypt(bytes(12), content_key, header)
    grant_bytes = dumps_canonical({**fields, "wrap": {"epk": b64encode(epk), "body": b64encode(body)}})
    if len(grant_bytes) > MAX_GRANT_LEN:
        raise ValueError("grant too large")
    return grant_bytes


def sign_grant(signing_key: Ed25519PrivateKey, grant_bytes: bytes) -> dict[str, str]:
    """The wire form ``SignedGrant`` (spec §8.3)."""
    return {"grant": b64encode(grant_bytes), "signature": b64encode(signing_key.sign(signature_message(grant_bytes)))}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_grant(grant_bytes: bytes) -> dict[str, Any]:
    """Spec §8.4 step 1: size, strict JSON, canonical, exact members and types."""
    if len(grant_bytes) > MAX_GRANT_LEN:
        raise GrantInvalid("grant too large")
    try:
        grant = loads_strict(grant_bytes, section="grant")
    except FormatError:
        raise GrantInvalid("grant is not strict JSON") from None
    if not isinstance(grant, dict) or set(grant) != _MEMBERS or dumps_canonical(grant) != grant_bytes:
        raise GrantInvalid("grant is not a canonical grant object")
    wrap = grant["wrap"]
    ok = (
        grant["v"] == 1
        and _is_int(grant["v"])
        and all(_is_int(grant[t]) and 0 <= grant[t] <= 2**40 for t in _TIMES)
        and all(isinstance(grant[k], str) for k in ("grant_id", "model_id", "licence_id", "device_id"))
        and isinstance(wrap, dict)
        and set(wrap) == {"epk", "body"}
    )
    if not ok:
        raise GrantInvalid("grant members have the wrong types")
    if not (
        _ID["grt"].match(grant["grant_id"])
        and _ID["mdl"].match(grant["model_id"])
        and _ID["lic"].match(grant["licence_id"])
        and (_ID["dev"].match(grant["device_id"]) or _PK_DEVICE.match(grant["device_id"]))
    ):
        raise GrantInvalid("grant ids are malformed")
    try:
        b64decode(grant["server_key_id"], length=8)
        b64decode(grant["key_commitment"], length=32)
        b64decode(wrap["epk"], length=32)
        b64decode(wrap["body"], length=48)
    except FormatError:
        raise GrantInvalid("grant binary members are malformed") from None
    t = [grant[k] for k in _TIMES]
    if not (t[0] < t[1] <= t[2] <= t[3]):
        raise GrantInvalid("grant times are out of order")
    return grant


def verify_signed(signed: object, signing_keys: dict[bytes, bytes]) -> tuple[bytes, dict[str, Any]]:
    """Steps 1-2 of spec §8.4: ``(G, grant)`` if the signature verifies under a pinned key.

    ``signing_keys`` maps ``server_key_id`` to the pinned Ed25519 public key.
    """
    if not isinstance(signed, dict) or set(signed) != {"grant", "signature"}:
        raise GrantInvalid("not a SignedGrant")
    try:
        grant_bytes = b64decode(signed["grant"])
        signature = b64decode(signed["signature"], length=64)
    except FormatError:
        raise GrantInvalid("SignedGrant is malformed") from None
    grant = parse_grant(grant_bytes)
    public = signing_keys.get(b64decode(grant["server_key_id"]))
    if public is None:
        raise GrantInvalid("the grant is signed by a key that is not pinned for this server")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, signature_message(grant_bytes))
    except (InvalidSignature, ValueError):
        raise GrantInvalid("the grant signature does not verify") from None
    return grant_bytes, grant


def check_binding(
    grant: dict[str, Any], *, model_id: str, key_commitment: bytes, licence_id: str, device_id: str
) -> None:
    """Step 3 of spec §8.4 (times are checked in :func:`parse_grant`)."""
    if grant["model_id"] != model_id or b64decode(grant["key_commitment"]) != key_commitment:
        raise GrantInvalid("the grant is for another model or container")
    if grant["licence_id"] != licence_id or grant["device_id"] != device_id:
        raise GrantInvalid("the grant is for another licence or device")


def unwrap_grant(grant: dict[str, Any], device_secret: X25519PrivateKey) -> bytes:
    """Step 5 of spec §8.4: the content key, with the header recomputed as associated data."""
    epk = b64decode(grant["wrap"]["epk"], length=32)
    body = b64decode(grant["wrap"]["body"], length=48)
    device_pk = device_secret.public_key().public_bytes_raw()
    try:
        shared = device_secret.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:
        raise GrantInvalid("the grant's ephemeral key is a low-order point") from None
    try:
        key = AESGCM(_wrap_key(shared, epk, device_pk, grant["grant_id"])).decrypt(bytes(12), body, header_bytes(grant))
    except InvalidTag:
        raise GrantInvalid("the grant does not decrypt with this device key") from None
    if len(key) != 32:
        raise GrantInvalid("the granted key has the wrong length")
    return key
