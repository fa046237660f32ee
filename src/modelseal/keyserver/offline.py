"""The client's encrypted state: cached grants and the clock record (spec §10.4, §10.5).

Every file is encrypted and authenticated under a key derived from the device's X25519 secret,
with its path inside the state directory as associated data, so another user, a backup or a
copied directory can neither read a cached grant nor move one to another slot. The device's
owner, who holds the device key, can; the clock rules detect a careless or scripted clock change,
not a determined owner (threat model §1).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._private.crypto import LABEL
from ..keys import _write_atomic
from .grant import GrantInvalid, check_binding, verify_signed

MAGIC = "MSEALC1 "
CLOCK_TOLERANCE_S = 300
_ID = re.compile(r"^[a-z]{3}_[A-Za-z0-9_-]{22}$")


def local_time() -> float:
    """The device's wall clock (a function so tests can move it)."""
    return time.time()


def boot() -> tuple[str, float]:
    """``(boot id, seconds since boot including suspend)``; the boot id is empty where unknown."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        boot_id = ""
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return boot_id, time.clock_gettime(clock)


def write_atomic(path: Path, text: str) -> None:
    """Write a 0600 state file atomically, creating its directory (0700) if needed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, text)


class Corrupt(Exception):
    """A state file exists but does not decrypt (edited, moved, or another device's)."""


@dataclass
class Clock:
    """``clock.state``: the largest local and server times seen, the server-minus-local offset
    measured at the last online success, and where the local and boot clocks stood then."""

    last_local: float
    last_server: int
    offset: float
    local: float
    boot_id: str
    boottime: float

    def rolled_back(self, local: float, boot_id: str, boottime: float) -> bool:
        """Spec §10.5: the wall clock went back past the tolerance, or (same boot) advanced less
        than the boot clock did."""
        if local < self.last_local - CLOCK_TOLERANCE_S:
            return True
        same_boot = bool(boot_id) and boot_id == self.boot_id
        return same_boot and (local - self.local) < (boottime - self.boottime) - CLOCK_TOLERANCE_S


@dataclass(frozen=True)
class Usable:
    """A cached grant that decrypted, verified and is bound to the slot asked for."""

    grant: dict[str, Any]
    signed: dict[str, str]


class State:
    """The encrypted files of one device's state directory (call writers under the state lock)."""

    def __init__(self, home: Path, device_secret: bytes, device_public: bytes) -> None:
        self.home = home
        hkdf = HKDF(hashes.SHA256(), 32, salt=device_public, info=LABEL + b"client-state")
        self._aead = AESGCM(hkdf.derive(device_secret))

    # -- encrypted files --------------------------------------------------------------------------

    def _aad(self, rel: str) -> bytes:
        return LABEL + b"client-state\0" + rel.encode()

    def write(self, rel: str, obj: dict[str, Any]) -> None:
        nonce = os.urandom(12)
        plain = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        blob = nonce + self._aead.encrypt(nonce, plain, self._aad(rel))
        write_atomic(self.home / rel, MAGIC + base64.b64encode(blob).decode() + "\n")

    def read(self, rel: str) -> dict[str, Any] | None:
        """The decrypted object, ``None`` if absent; :class:`Corrupt` if it does not decrypt."""
        try:
            text = (self.home / rel).read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            raise Corrupt(rel) from None
        try:
            if not text.startswith(MAGIC):
                raise ValueError
            blob = base64.b64decode(text[len(MAGIC) :].strip(), validate=True)
            obj = json.loads(self._aead.decrypt(blob[:12], blob[12:], self._aad(rel)))
        except (ValueError, binascii.Error, InvalidTag):
            raise Corrupt(rel) from None
        if not isinstance(obj, dict):
            raise Corrupt(rel)
        return obj

    # -- clock (spec §10.5) -----------------------------------------------------------------------

    def clock(self) -> tuple[Clock | None, bool]:
        """``(clock record or None, rollback detected)``; an undecryptable record is a rollback."""
        try:
            data = self.read("clock.state")
        except Corrupt:
            return None, True
        if data is None:
            return None, False
        try:
            clock = Clock(
                float(data["last_local"]),
                int(data["last_server"]),
                float(data["offset"]),
                float(data["local"]),
                str(data["boot_id"]),
                float(data["boottime"]),
            )
        except (KeyError, TypeError, ValueError):
            return None, True
        local, (boot_id, boottime) = local_time(), boot()
        return clock, clock.rolled_back(local, boot_id, boottime)

    def note_use(self, clock: Clock | None, *, server_time: int | None = None) -> None:
        """Advance ``clock.state`` after a use; with ``server_time`` (an online success) also reset
        the offset and clear any rollback."""
        local, (boot_id, boottime) = local_time(), boot()
        if server_time is not None:  # the server's clock is the reference again
            last_local, offset = local, float(server_time) - local
            last_server = max(server_time, clock.last_server if clock else 0)
        elif clock is not None:
            last_local, offset, last_server = max(local, clock.last_local), clock.offset, clock.last_server
        else:
            last_local, offset, last_server = local, 0.0, 0
        self.write(
            "clock.state",
            {
                "v": 1,
                "last_local": last_local,
                "last_server": last_server,
                "offset": offset,
                "local": local,
                "boot_id": boot_id,
                "boottime": boottime,
            },
        )

    # -- grants -----------------------------------------------------------------------------------

    @staticmethod
    def grant_path(licence_id: str, model_id: str, key_commitment: bytes) -> str:
        if not (_ID.match(licence_id) and _ID.match(model_id)):
            raise ValueError("malformed id")
        return f"grants/{licence_id}/{model_id}/{key_commitment.hex()}.grant"

    def save_grant(self, licence_id: str, model_id: str, key_commitment: bytes, signed: dict[str, str]) -> None:
        rel = self.grant_path(licence_id, model_id, key_commitment)
        self.write(rel, {"v": 1, "signed": signed, "fetched_at": local_time()})

    def cached_grant(
        self,
        *,
        licence_id: str,
        device_id: str,
        model_id: str,
        key_commitment: bytes,
        signing_keys: dict[bytes, bytes],
    ) -> Usable | None:
        """The cached grant for this slot if it decrypts, verifies and is bound to it (spec §8.4);
        anything else is removed and treated as absent."""
        rel = self.grant_path(licence_id, model_id, key_commitment)
        try:
            data = self.read(rel)
            if data is None:
                return None
            signed = data["signed"]
            _, grant = verify_signed(signed, signing_keys)
            check_binding(
                grant, model_id=model_id, key_commitment=key_commitment, licence_id=licence_id, device_id=device_id
            )
        except (Corrupt, KeyError, TypeError, GrantInvalid):
            (self.home / rel).unlink(missing_ok=True)
            return None
        return Usable(grant, signed)

    def has_grants(self) -> bool:
        return any((self.home / "grants").rglob("*.grant"))

    def drop_grants(self, licence_id: str, model_id: str | None = None) -> None:
        """Forget cached grants of a licence (all of them, or one model's) after a denial."""
        if not _ID.match(licence_id) or (model_id is not None and not _ID.match(model_id)):
            return
        target = self.home / "grants" / licence_id
        if model_id is not None:
            target = target / model_id
        shutil.rmtree(target, ignore_errors=True)
