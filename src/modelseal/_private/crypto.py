"""Key schedule, chunk AEAD and recipient stanzas (the format's hazmat layer).

Every primitive comes from ``cryptography`` (plus BLAKE3 from ``blake3`` for the
chunk table). Nothing here decides policy; container.py calls these in order.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .encoding import b64decode, b64encode
from .format import KEY_LEN

LABEL = b"modelseal/v1/"
_ZERO_NONCE = bytes(12)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=LABEL + info).derive(ikm)


class KeySchedule:
    """Every key a container uses, derived from its content key and manifest salt."""

    def __init__(self, content_key: bytes, salt: bytes) -> None:
        if len(content_key) != KEY_LEN:
            raise ValueError("content key must be 32 bytes")
        self.content_key = content_key
        self._salt = salt
        self.header_mac_key = hkdf(content_key, salt, b"header-mac")
        self.trailer_mac_key = hkdf(content_key, salt, b"trailer-mac")
        self.commitment = hkdf(content_key, salt, b"key-commitment")

    def entry_aead(self, index: int) -> AESGCM:
        return AESGCM(hkdf(self.content_key, self._salt, b"entry" + struct.pack(">I", index)))

    def header_mac(self, preamble: bytes) -> bytes:
        return hmac.new(self.header_mac_key, preamble, hashlib.sha256).digest()

    def trailer_mac(self, header_mac: bytes, table: bytes | bytearray, signatures_bytes: bytes) -> bytes:
        mac = hmac.new(self.trailer_mac_key, header_mac, hashlib.sha256)
        mac.update(table)
        mac.update(struct.pack(">I", len(signatures_bytes)))
        mac.update(signatures_bytes)
        return mac.digest()


def chunk_nonce(counter: int, last: bool) -> bytes:
    """STREAM nonce: 11-byte big-endian chunk counter, then a last-chunk flag byte."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_hash(ciphertext: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(ciphertext).digest()


def table_root(table: bytes | bytearray) -> bytes:
    return blake3.blake3(LABEL + b"chunk-table\x00" + bytes(table)).digest()


def signed_message(manifest_bytes: bytes, root: bytes) -> bytes:
    """What an Ed25519 publisher signature covers: the manifest and the chunk-table root."""
    return LABEL + b"signature\x00" + struct.pack(">I", len(manifest_bytes)) + manifest_bytes + root


# --- stanzas -------------------------------------------------------------------------------


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(LABEL + b"kid" + public_key).digest()[:8]


def x25519_wrap(content_key: bytes, recipient: bytes, ephemeral: X25519PrivateKey) -> dict[str, str | int]:
    epk = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    wrap_key = hkdf(shared, epk + recipient, b"x25519")
    body = AESGCM(wrap_key).encrypt(_ZERO_NONCE, content_key, None)
    return {"type": "x25519", "kid": b64encode(key_id(recipient)), "epk": b64encode(epk), "body": b64encode(body)}


def x25519_unwrap(stanza: dict[str, object], identity: X25519PrivateKey) -> bytes | None:
    """The content key if this stanza is addressed to ``identity``, else None."""
    public = identity.public_key().public_bytes_raw()
    if b64decode(stanza["kid"]) != key_id(public):
        return None
    epk = b64decode(stanza["epk"])
    try:
        shared = identity.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:  # low-order point: the shared secret would be all zeros
        return None
    wrap_key = hkdf(shared, epk + public, b"x25519")
    try:
        return AESGCM(wrap_key).decrypt(_ZERO_NONCE, b64decode(stanza["body"]), None)
    except InvalidTag:
        return None


def _scrypt_key(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
    return Scrypt(salt=LABEL + b"scrypt" + salt, length=32, n=1 << log_n, r=8, p=1).derive(passphrase)


def scrypt_wrap(content_key: bytes, passphrase: bytes, salt: bytes, log_n: int) -> dict[str, str | int]:
    body = AESGCM(_scrypt_key(passphrase, salt, log_n)).encrypt(_ZERO_NONCE, content_key, None)
    return {"type": "scrypt", "salt": b64encode(salt), "log_n": log_n, "body": b64encode(body)}


def scrypt_unwrap(stanza: dict[str, object], passphrase: bytes) -> bytes | None:
    log_n = stanza["log_n"]
    assert isinstance(log_n, int)  # bounded by format.validate_stanzas
    key = _scrypt_key(passphrase, b64decode(stanza["salt"]), log_n)
    try:
        return AESGCM(key).decrypt(_ZERO_NONCE, b64decode(stanza["body"]), None)
    except InvalidTag:
        return None
