"""Identifiers, secret strings, keyed hashes, the master key (KEK) and key escrow (spec §3, §7.6, §13).

Every primitive is from ``cryptography`` or the standard library; nothing here is hand-rolled.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._private.crypto import LABEL, hkdf
from .._private.encoding import decode_key, encode_key
from .errors import CommitmentMismatch, EscrowInvalid, KeyUnavailable, SettingsError

MASTER_PREFIX = "MSEAL-KS-MASTER:"
ADMIN_PREFIX = "MSEAL-ADMIN:"
LICENCE_PREFIX = "MSEAL-LICENCE:"
GRANT_TOKEN_PREFIX = "MSEAL-GRANT-TOKEN:"
DEV_MASTER_KEY = hashlib.sha256(b"modelseal/v1 dev master key, never use in production").digest()
ID_RE = re.compile(r"^(pub|adm|mdl|lic|dev|grt|tok|ofr)_[A-Za-z0-9_-]{22}$")
_WRAP_VERSION = b"\x01"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def make_id(prefix: str, id16: bytes) -> str:
    return f"{prefix}_{b64url(id16)}"


def is_id(value: str, prefix: str) -> bool:
    return bool(ID_RE.match(value)) and value.startswith(prefix + "_")


def server_key_id(public_key: bytes) -> bytes:
    """``SHA-256(L || "keyserver-kid" || P)[0:8]`` (spec §4)."""
    return hashlib.sha256(LABEL + b"keyserver-kid" + public_key).digest()[:8]


# --- secret strings (spec §3) ----------------------------------------------------------------


@dataclass(frozen=True)
class SecretString:
    """A decoded ``PREFIX || b64url(id16 || secret32 || checksum4)`` credential."""

    id16: bytes
    secret32: bytes


def encode_secret(prefix: str, id16: bytes, secret32: bytes) -> str:
    return encode_key(prefix, id16 + secret32)


def decode_secret(prefix: str, text: str) -> SecretString | None:
    """The credential's parts, or None for a wrong prefix, length or checksum."""
    try:
        raw = decode_key(prefix, text, length=48, what="credential")
    except (ValueError, TypeError):
        return None
    if encode_key(prefix, raw) != text:  # one spelling per credential: no padding-bit aliases
        return None
    return SecretString(raw[:16], raw[16:])


def secret_hash(pepper: bytes, kind: str, id16: bytes, secret32: bytes) -> bytes:
    msg = LABEL + b"secret\x00" + kind.encode("ascii") + b"\x00" + id16 + secret32
    return hmac.new(pepper, msg, hashlib.sha256).digest()


# --- master key (spec §13) -------------------------------------------------------------------


class KeyEncryptionKey(ABC):
    """Wraps server secrets and escrowed content keys; a KMS can implement the same interface."""

    key_id: str

    @abstractmethod
    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes: ...

    @abstractmethod
    def unwrap(self, wrapped: bytes, *, aad: bytes) -> bytes:
        """The plaintext; raises :class:`KeyUnavailable` if ``wrapped`` does not authenticate."""


class LocalKey(KeyEncryptionKey):
    """A 32-byte master key held in process memory, read from a key string or a 0600 file."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._aead = AESGCM(key)
        self.key_id = b64url(hashlib.sha256(LABEL + b"kek-id" + key).digest()[:8])
        self.is_dev = hmac.compare_digest(key, DEV_MASTER_KEY)

    @classmethod
    def generate(cls) -> tuple[LocalKey, str]:
        key = os.urandom(32)
        return cls(key), encode_key(MASTER_PREFIX, key)

    @classmethod
    def parse(cls, text: str, *, allow_dev: bool) -> LocalKey:
        if text.strip() == "dev":
            if not allow_dev:
                raise SettingsError("MASTER_KEY", "the dev master key is refused outside dev mode")
            return cls(DEV_MASTER_KEY)
        try:
            return cls(decode_key(MASTER_PREFIX, text, length=32, what="master key"))
        except ValueError as exc:
            raise SettingsError("MASTER_KEY", str(exc)) from None

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return _WRAP_VERSION + nonce + self._aead.encrypt(nonce, plaintext, LABEL + b"kek\x00" + aad)

    def unwrap(self, wrapped: bytes, *, aad: bytes) -> bytes:
        if len(wrapped) < 29 or wrapped[:1] != _WRAP_VERSION:
            raise KeyUnavailable("a wrapped value is malformed")
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], LABEL + b"kek\x00" + aad)
        except InvalidTag:
            raise KeyUnavailable("the master key does not unwrap a stored value (wrong key or altered row)") from None


def write_master_key_file(path: Path) -> LocalKey:
    """Create ``path`` (0600, never overwriting) holding a fresh master key string."""
    kek, text = LocalKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text + "\n")
    return kek


def fingerprint_hash(pepper: bytes, fingerprint: bytes) -> bytes:
    """``HMAC(pepper, L || "fingerprint\\0" || fingerprint)``: the server never stores the fingerprint (§7.3)."""
    return hmac.new(pepper, LABEL + b"fingerprint\x00" + fingerprint, hashlib.sha256).digest()


def rate_key(pepper: bytes, value: str) -> bytes:
    """``HMAC(pepper, L || "rate\\0" || value)``: fixed size, no attacker-chosen strings stored (§14)."""
    return hmac.new(pepper, LABEL + b"rate\x00" + value.encode("utf-8", "replace"), hashlib.sha256).digest()


def request_message(method: str, route: str, body: bytes) -> bytes:
    """What a device signs (spec §6).

    ``L || "keyserver-request\\0" || method || "\\0" || route || "\\0" || u32be(len(body)) || body``
    """
    return (
        LABEL
        + b"keyserver-request\x00"
        + method.encode("ascii")
        + b"\x00"
        + route.encode("ascii")
        + b"\x00"
        + len(body).to_bytes(4, "big")
        + body
    )


def is_valid_x25519_public(public_key: bytes) -> bool:
    """False for a low-order point (its shared secret with any key is all zeros)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        return False
    return True


def model_key_aad(model_id: str, key_commitment: bytes) -> bytes:
    return b"model-key\x00" + model_id.encode("ascii") + b"\x00" + key_commitment


def server_secret_aad(name: str) -> bytes:
    return b"server-secret\x00" + name.encode("ascii")


# --- key escrow (spec §7.6) ------------------------------------------------------------------


def _escrow_info(model_id: str) -> bytes:
    return b"keyserver-escrow\x00" + model_id.encode("ascii")


def _escrow_aad(model_id: str, key_commitment: bytes, salt: bytes) -> bytes:
    return LABEL + _escrow_info(model_id) + b"\x00" + key_commitment + salt


def escrow_wrap(
    content_key: bytes, escrow_public: bytes, model_id: str, key_commitment: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """Client side: ``(epk, body)`` wrapping ``content_key`` to the server's escrow key."""
    e = X25519PrivateKey.generate()
    epk = e.public_key().public_bytes_raw()
    shared = e.exchange(X25519PublicKey.from_public_bytes(escrow_public))
    wrap_key = hkdf(shared, epk + escrow_public, _escrow_info(model_id))
    body = AESGCM(wrap_key).encrypt(bytes(12), content_key, _escrow_aad(model_id, key_commitment, salt))
    return epk, body


def escrow_unwrap(
    escrow_key: X25519PrivateKey, epk: bytes, body: bytes, model_id: str, key_commitment: bytes, salt: bytes
) -> bytes:
    """Server side: the escrowed content key, checked against its commitment.

    Raises:
        EscrowInvalid: the escrow does not decrypt under this server's escrow key.
        CommitmentMismatch: it decrypts, but to a key that does not match ``key_commitment``.
    """
    public = escrow_key.public_key().public_bytes_raw()
    try:
        shared = escrow_key.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:  # low-order point
        raise EscrowInvalid("the escrow does not decrypt") from None
    wrap_key = hkdf(shared, epk + public, _escrow_info(model_id))
    try:
        key = AESGCM(wrap_key).decrypt(bytes(12), body, _escrow_aad(model_id, key_commitment, salt))
    except InvalidTag:
        raise EscrowInvalid("the escrow does not decrypt") from None
    if not hmac.compare_digest(hkdf(key, salt, b"key-commitment"), key_commitment):
        raise CommitmentMismatch("the escrowed key does not match key_commitment")
    return key
