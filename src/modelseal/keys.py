"""Keys: device identities (X25519), recipients, and publisher signing keys (Ed25519).

Key strings carry a type prefix and a 4-byte checksum, so a truncated or mistyped
key is refused instead of silently naming another key::

    mseal-x25519:...          a recipient (public; give it to publishers)
    MSEAL-X25519-SECRET:...   an identity (secret; stays on the device)
    mseal-ed25519:...         a publisher's verify key (public)
    MSEAL-ED25519-SECRET:...  a publisher's signing key (secret)

Recipient kinds are pluggable: a :class:`Recipient` wraps a content key into a
header stanza, an :class:`Unwrapper` recovers it from the stanzas it understands.
"""

from __future__ import annotations

import os
import secrets
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ._private import crypto
from ._private.encoding import b64encode, decode_key, encode_key

__all__ = [
    "Identity",
    "PassphraseRecipient",
    "Recipient",
    "SigningKey",
    "Unwrapper",
    "VerifyKey",
    "X25519Recipient",
]

_RECIPIENT = "mseal-x25519:"
_IDENTITY = "MSEAL-X25519-SECRET:"
_VERIFY = "mseal-ed25519:"
_SIGNING = "MSEAL-ED25519-SECRET:"

Stanza = dict[str, Any]
RandomBytes = Callable[[int], bytes]


class Recipient(ABC):
    """Someone a container is sealed for: turns the content key into one header stanza."""

    @abstractmethod
    def wrap(self, content_key: bytes, random_bytes: RandomBytes = os.urandom) -> Stanza:
        """Return a stanza (a JSON object with a ``type``) holding ``content_key``."""

    def wrap_for(
        self, content_key: bytes, *, salt: bytes, key_commitment: bytes, random_bytes: RandomBytes = os.urandom
    ) -> Stanza:
        """The stanza for a container with this manifest ``salt`` and ``key_commitment``.

        ``seal`` and ``rewrap`` call this; recipients that need the container's identity (the key
        server's, which escrows the key under its commitment) override it. Defaults to :meth:`wrap`.
        """
        return self.wrap(content_key, random_bytes)

    def matches(self, stanza: Stanza) -> bool:
        """True if ``stanza`` was made for this recipient (used by ``rewrap(remove=...)``)."""
        return False


class Unwrapper(ABC):
    """Something that can recover a content key from the stanzas it understands.

    An unwrapper that was refused for a reason worth reporting (a key server that revoked the
    licence, or could not be reached) sets :attr:`error`; ``open`` raises it instead of
    ``WrongKeyError`` when no stanza opened.
    """

    error: Exception | None = None

    @abstractmethod
    def unwrap(self, stanza: Stanza) -> bytes | None:
        """The 32-byte content key if ``stanza`` opens with this key, else None."""


class X25519Recipient(Recipient):
    """A device's public key, as a ``mseal-x25519:`` string."""

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        self.public_bytes = bytes(public_key)

    @classmethod
    def parse(cls, text: str) -> X25519Recipient:
        return cls(decode_key(_RECIPIENT, text, length=32, what="X25519 recipient"))

    def __str__(self) -> str:
        return encode_key(_RECIPIENT, self.public_bytes)

    def __repr__(self) -> str:
        return f"X25519Recipient({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def wrap(self, content_key: bytes, random_bytes: RandomBytes = os.urandom) -> Stanza:
        ephemeral = X25519PrivateKey.from_private_bytes(random_bytes(32))
        return crypto.x25519_wrap(content_key, self.public_bytes, ephemeral)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "x25519" and stanza.get("kid") == b64encode(crypto.key_id(self.public_bytes))


class PassphraseRecipient(Recipient, Unwrapper):
    """A passphrase, stretched with scrypt (``log_n`` is the work factor, 2**log_n)."""

    def __init__(self, passphrase: str | bytes, log_n: int = 18) -> None:
        from ._private.format import SCRYPT_MAX_LOG_N, SCRYPT_MIN_LOG_N

        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not isinstance(passphrase, bytes) or not passphrase:
            raise ValueError("passphrase must be a non-empty str or bytes")
        if not SCRYPT_MIN_LOG_N <= log_n <= SCRYPT_MAX_LOG_N:
            raise ValueError(f"scrypt log_n must be in [{SCRYPT_MIN_LOG_N}, {SCRYPT_MAX_LOG_N}]")
        self._passphrase = passphrase
        self.log_n = log_n

    def __repr__(self) -> str:
        return f"PassphraseRecipient(<hidden>, log_n={self.log_n})"

    def wrap(self, content_key: bytes, random_bytes: RandomBytes = os.urandom) -> Stanza:
        return crypto.scrypt_wrap(content_key, self._passphrase, random_bytes(16), self.log_n)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "scrypt"

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.get("type") != "scrypt":
            return None
        return crypto.scrypt_unwrap(stanza, self._passphrase)


def _write_secret(path: str | os.PathLike[str], text: str, overwrite: bool) -> None:
    """Write a secret key file readable by its owner only (0600), never widening an existing file."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fd = -1
            fh.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def _write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with a 0600 file holding ``text``: written to a temporary file beside it,
    fsynced, then renamed, so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _write_secret(tmp, text, overwrite=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_secret(path: str | os.PathLike[str], prefix: str, what: str) -> str:
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"{what} file {path} is readable by other users (chmod 600 it)", stacklevel=3)
    for line in path.read_text(encoding="ascii").splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return line
    raise ValueError(f"{path} holds no {what} (no line starting with {prefix!r})")


def _header(kind: str, public: str) -> str:
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return f"# modelseal {kind}. Keep this file secret.\n# created: {created}\n# public key: {public}\n"


class Identity(Unwrapper):
    """A device's X25519 key pair: give away :attr:`recipient`, keep the identity secret."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_string(cls, text: str) -> Identity:
        return cls(X25519PrivateKey.from_private_bytes(decode_key(_IDENTITY, text, length=32, what="identity")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read an identity file written by :meth:`save` (or ``modelseal keygen``)."""
        return cls.from_string(_read_secret(path, _IDENTITY, "identity"))

    def to_string(self) -> str:
        """The secret key string. Treat it like a password."""
        return encode_key(_IDENTITY, self._key.private_bytes_raw())

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the identity to ``path`` with mode 0600; refuses to overwrite unless asked."""
        _write_secret(path, _header("identity (X25519)", str(self.recipient)) + self.to_string() + "\n", overwrite)

    @property
    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self._key.public_key().public_bytes_raw())

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.get("type") != "x25519":
            return None
        return crypto.x25519_unwrap(stanza, self._key)

    def __repr__(self) -> str:
        return f"Identity(recipient={str(self.recipient)!r})"


class VerifyKey:
    """A publisher's Ed25519 public key, as a ``mseal-ed25519:`` string."""

    def __init__(self, public_key: bytes) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(public_key)
        self.public_bytes = bytes(public_key)

    @classmethod
    def parse(cls, text: str | VerifyKey) -> VerifyKey:
        if isinstance(text, VerifyKey):
            return text
        return cls(decode_key(_VERIFY, text, length=32, what="Ed25519 verify key"))

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return encode_key(_VERIFY, self.public_bytes)

    def __repr__(self) -> str:
        return f"VerifyKey({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)


class SigningKey:
    """A publisher's Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_string(cls, text: str) -> SigningKey:
        raw = decode_key(_SIGNING, text, length=32, what="signing key")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        return cls.from_string(_read_secret(path, _SIGNING, "signing key"))

    def to_string(self) -> str:
        return encode_key(_SIGNING, self._key.private_bytes_raw())

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        _write_secret(path, _header("signing key (Ed25519)", str(self.verify_key)) + self.to_string() + "\n", overwrite)

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(verify_key={str(self.verify_key)!r})"


def as_recipient(value: Recipient | str) -> Recipient:
    if isinstance(value, Recipient):
        return value
    if isinstance(value, str):
        return X25519Recipient.parse(value)
    raise TypeError(f"a recipient must be a Recipient or a recipient string, not {type(value).__name__}")


def as_unwrappers(identity: Unwrapper | Sequence[Unwrapper] | None, passphrase: str | bytes | None) -> list[Unwrapper]:
    found: list[Unwrapper] = []
    if isinstance(identity, Unwrapper):
        found.append(identity)
    elif identity is not None:
        for item in identity:
            if not isinstance(item, Unwrapper):
                raise TypeError(f"identity must be an Identity (or Unwrapper), not {type(item).__name__}")
            found.append(item)
    if passphrase is not None:
        found.append(PassphraseRecipient(passphrase))
    if not found:
        raise ValueError("give an identity or a passphrase to open a container")
    return found
