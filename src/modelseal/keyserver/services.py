"""Domain logic of the key server. Raises :class:`~.errors.DomainError` subclasses, never HTTP errors.

Each state change is one write unit that ends with its audit record (spec §12.3), so a committed
change always has its record and vice versa. Time and randomness are injected (``Clock``,
``RandomSource``) so tests can fix them.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Connection

from .._private.encoding import b64encode
from . import audit
from . import repository as repo
from .audit import AuditEvent
from .crypto import (
    ADMIN_PREFIX,
    KeyEncryptionKey,
    b64url,
    decode_secret,
    encode_secret,
    escrow_unwrap,
    make_id,
    model_key_aad,
    secret_hash,
    server_key_id,
    server_secret_aad,
)
from .errors import Conflict, InvalidCredential, KeyUnavailable, NotFound, SettingsError

_DUMMY_HASH = bytes(32)


class Clock(Protocol):
    def time(self) -> float: ...


class RandomSource(Protocol):
    def bytes(self, n: int) -> bytes: ...


class SystemClock:
    def time(self) -> float:
        return time.time()


class OsRandom:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


@dataclass(frozen=True)
class ServerSecrets:
    """The server's secrets, unwrapped into each worker's memory at start (spec §13)."""

    pepper: bytes
    audit_key: bytes
    signing_key: Ed25519PrivateKey
    signing_kid: bytes
    escrow_key: X25519PrivateKey
    escrow_kid: bytes
    install_id: bytes
    mode: str


@dataclass(frozen=True)
class Admin:
    """An authenticated admin token, scoped to its publisher."""

    token_id: str
    publisher_id: str


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    created_at: int
    keys: int


@dataclass(frozen=True)
class RegisteredKey:
    model_id: str
    key_commitment: bytes
    stanza: dict[str, str]
    created: bool


def _unwrap_secret(kek: KeyEncryptionKey, name: str, row: Any) -> bytes:
    return kek.unwrap(bytes(row.wrapped), aad=server_secret_aad(name))


def initialize(
    db: repo.Database, kek: KeyEncryptionKey, *, dev: bool, clock: Clock, rng: RandomSource
) -> ServerSecrets:
    """Create the server secrets on first start, then unwrap them (idempotent; safe across replicas).

    Raises:
        SettingsError: the database was initialised in dev mode and this server is not.
        KeyUnavailable: the master key cannot unwrap the stored secrets.
    """
    now = int(clock.time())

    def create(conn: Connection) -> None:
        if "pepper" in repo.get_secrets(conn):
            return
        signing = Ed25519PrivateKey.generate()
        escrow = X25519PrivateKey.generate()
        s_pub, e_pub = signing.public_key().public_bytes_raw(), escrow.public_key().public_bytes_raw()
        s_kid, e_kid = server_key_id(s_pub), server_key_id(e_pub)
        values = {
            "pepper": rng.bytes(32),
            "audit-key": rng.bytes(32),
            f"signing:{b64url(s_kid)}": signing.private_bytes_raw(),
            f"escrow:{b64url(e_kid)}": escrow.private_bytes_raw(),
            "install-id": rng.bytes(16),
            "mode": b"dev" if dev else b"production",
        }
        for name, value in values.items():
            repo.insert_secret(conn, name, kek.key_id, kek.wrap(value, aad=server_secret_aad(name)), now)
        repo.insert_server_key(conn, s_kid, "signing", s_pub, now)
        repo.insert_server_key(conn, e_kid, "escrow", e_pub, now)

    with contextlib.suppress(Conflict):  # another replica initialised it first; read theirs back
        db.write(create)
    with db.read() as conn:
        rows = repo.get_secrets(conn)
        keys = repo.server_keys(conn)
    mode = _unwrap_secret(kek, "mode", rows["mode"]).decode()
    if mode == "dev" and not dev:
        raise SettingsError("DEV", "the database was initialised in dev mode; refusing to serve it outside dev mode")
    current = {k.purpose: bytes(k.kid) for k in keys if k.retired_at is None}
    s_kid, e_kid = current["signing"], current["escrow"]
    s_name, e_name = f"signing:{b64url(s_kid)}", f"escrow:{b64url(e_kid)}"
    return ServerSecrets(
        pepper=_unwrap_secret(kek, "pepper", rows["pepper"]),
        audit_key=_unwrap_secret(kek, "audit-key", rows["audit-key"]),
        signing_key=Ed25519PrivateKey.from_private_bytes(_unwrap_secret(kek, s_name, rows[s_name])),
        signing_kid=s_kid,
        escrow_key=X25519PrivateKey.from_private_bytes(_unwrap_secret(kek, e_name, rows[e_name])),
        escrow_kid=e_kid,
        install_id=_unwrap_secret(kek, "install-id", rows["install-id"]),
        mode=mode,
    )


class KeyServer:
    """Every S1 operation of the key server."""

    def __init__(
        self,
        db: repo.Database,
        kek: KeyEncryptionKey,
        secrets: ServerSecrets,
        *,
        public_url: str,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        clock_skew_s: int = 300,
        offline_request_max_age_s: int = 604800,
    ) -> None:
        self.db, self.kek, self.secrets = db, kek, secrets
        self.public_url = public_url
        self.clock: Clock = clock or SystemClock()
        self.rng: RandomSource = rng or OsRandom()
        self.clock_skew_s = clock_skew_s
        self.offline_request_max_age_s = offline_request_max_age_s

    # --- helpers ----------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock.time())

    def _now_us(self) -> int:
        return int(self.clock.time() * 1_000_000)

    def _new_id(self, prefix: str) -> str:
        return make_id(prefix, self.rng.bytes(16))

    def _audit(self, conn: Connection, event: AuditEvent) -> None:
        audit.append(conn, self.secrets.audit_key, event, self._now_us())

    # --- credentials (spec §3) ----------------------------------------------------------

    def authenticate_admin(self, presented: str | None) -> Admin:
        """The admin token's identity.

        Raises:
            InvalidCredential: malformed, unknown, wrong secret, revoked, or disabled publisher —
                all indistinguishable to the caller.
        """
        parsed = decode_secret(ADMIN_PREFIX, presented or "")
        if parsed is None:
            # Same HMAC work as for a well-formed token, so timing does not tell the cases apart.
            secret_hash(self.secrets.pepper, "admin", bytes(16), bytes(32))
            raise InvalidCredential("invalid credential")
        token_id = make_id("adm", parsed.id16)
        with self.db.read() as conn:
            row = repo.admin_token_with_publisher(conn, token_id)
        computed = secret_hash(self.secrets.pepper, "admin", parsed.id16, parsed.secret32)
        stored = bytes(row.secret_hash) if row is not None else _DUMMY_HASH
        # Constant-time comparison: an attacker cannot learn a hash prefix from response timing.
        equal = hmac.compare_digest(computed, stored)
        if row is None or not equal or row.revoked_at is not None or row.disabled_at is not None:
            raise InvalidCredential("invalid credential")
        return Admin(token_id=token_id, publisher_id=row.publisher_id)

    # --- publishers and admin tokens (server-host CLI) -----------------------------------

    def create_publisher(self, name: str, *, actor: str = "cli") -> str:
        pub_id = self._new_id("pub")

        def unit(conn: Connection) -> None:
            repo.insert_publisher(conn, pub_id, name, self._now())
            self._audit(conn, AuditEvent("publisher.created", actor, publisher_id=pub_id, detail={"name": name}))

        try:
            self.db.write(unit)
        except Conflict:
            raise Conflict(f"a publisher named {name!r} exists") from None
        return pub_id

    def create_admin_token(self, publisher: str, *, label: str | None = None, actor: str = "cli") -> tuple[str, str]:
        """A new admin token for ``publisher`` (id or name): ``(token_id, token_string)``, shown once."""
        id16, secret32 = self.rng.bytes(16), self.rng.bytes(32)
        return self._store_admin_token(publisher, id16, secret32, label, actor)

    def _store_admin_token(
        self, publisher: str, id16: bytes, secret32: bytes, label: str | None, actor: str
    ) -> tuple[str, str]:
        token_id = make_id("adm", id16)
        digest = secret_hash(self.secrets.pepper, "admin", id16, secret32)

        def unit(conn: Connection) -> None:
            pub = repo.publisher_by_name_or_id(conn, publisher)
            if pub is None:
                raise NotFound(f"no publisher {publisher!r}")
            repo.insert_admin_token(conn, token_id, pub.id, digest, label, self._now())
            detail = {"token_id": token_id, "label": label}
            self._audit(conn, AuditEvent("admin-token.created", actor, publisher_id=pub.id, detail=detail))

        self.db.write(unit)
        return token_id, encode_secret(ADMIN_PREFIX, id16, secret32)

    def revoke_admin_token(self, token_id: str, *, actor: str = "cli") -> None:
        def unit(conn: Connection) -> None:
            row = repo.revoke_admin_token(conn, token_id, self._now())
            if row is None:
                raise NotFound(f"no admin token {token_id!r}")
            detail = {"token_id": token_id}
            self._audit(conn, AuditEvent("admin-token.revoked", actor, publisher_id=row.publisher_id, detail=detail))

        self.db.write(unit)

    def bootstrap(self, data_dir: Path, dev_admin_token: str | None = None) -> Path | None:
        """First start on an empty database: publisher ``default`` and a token in ``<data_dir>/admin-token``.

        Returns the token file's path when one was written.
        """
        if dev_admin_token is not None:
            self._provision_dev_token(dev_admin_token)
        with self.db.read() as conn:
            if repo.count_publishers(conn) > (1 if dev_admin_token else 0):
                return None
        try:
            self.create_publisher("default", actor="system")
        except Conflict:
            return None  # another process bootstrapped first
        _, token = self.create_admin_token("default", label="bootstrap", actor="system")
        path = data_dir / "admin-token"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
        return path

    def _provision_dev_token(self, token: str) -> None:
        parsed = decode_secret(ADMIN_PREFIX, token)
        if parsed is None:
            raise SettingsError("DEV_ADMIN_TOKEN", "not a valid MSEAL-ADMIN: token string")
        with self.db.read() as conn:
            exists = repo.admin_token_with_publisher(conn, make_id("adm", parsed.id16)) is not None
            has_dev = repo.publisher_by_name_or_id(conn, "dev") is not None
        if exists:
            return
        if not has_dev:
            self.create_publisher("dev", actor="system")
        self._store_admin_token("dev", parsed.id16, parsed.secret32, "dev", "system")

    # --- server info (spec §7.2) ------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        with self.db.read() as conn:
            keys = repo.server_keys(conn)
        signing = [
            {
                "kid": b64encode(bytes(k.kid)),
                "public_key": b64encode(bytes(k.public_key)),
                "current": k.retired_at is None,
            }
            for k in keys
            if k.purpose == "signing"
        ]
        escrow = next(k for k in keys if k.purpose == "escrow" and k.retired_at is None)
        return {
            "v": 1,
            "public_url": self.public_url,
            "time": self._now(),
            "signing_keys": signing,
            "escrow_key": {"kid": b64encode(bytes(escrow.kid)), "public_key": b64encode(bytes(escrow.public_key))},
            "clock_skew_s": self.clock_skew_s,
            "offline_request_max_age_s": self.offline_request_max_age_s,
        }

    # --- models and key escrow (spec §7.6) ---------------------------------------------------

    def create_model(self, admin: Admin, name: str) -> Model:
        model_id = self._new_id("mdl")
        now = self._now()

        def unit(conn: Connection) -> None:
            repo.insert_model(conn, model_id, admin.publisher_id, name, now)
            event = AuditEvent(
                "model.created",
                admin.token_id,
                publisher_id=admin.publisher_id,
                model_id=model_id,
                detail={"name": name},
            )
            self._audit(conn, event)

        try:
            self.db.write(unit)
        except Conflict:
            raise Conflict("a model with this name exists") from None
        return Model(model_id, name, now, 0)

    def get_model(self, admin: Admin, model_id: str) -> Model:
        with self.db.read() as conn:
            row = repo.get_model(conn, admin.publisher_id, model_id)
        if row is None:
            raise NotFound("no such model")
        return Model(row.id, row.name, row.created_at, row.keys)

    def list_models(self, admin: Admin, *, after: str | None, limit: int) -> tuple[list[Model], str | None]:
        with self.db.read() as conn:
            rows = repo.list_models(conn, admin.publisher_id, after, limit + 1)
        items = [Model(r.id, r.name, r.created_at, r.keys) for r in rows[:limit]]
        return items, (items[-1].id if len(rows) > limit else None)

    def stanza(self, model_id: str, key_commitment: bytes) -> dict[str, str]:
        return {
            "type": "keyserver",
            "url": self.public_url,
            "model_id": model_id,
            "key_commitment": b64encode(key_commitment),
            "server_key_id": b64encode(self.secrets.signing_kid),
        }

    def register_key(
        self, admin: Admin, model_id: str, *, key_commitment: bytes, salt: bytes, epk: bytes, body: bytes
    ) -> RegisteredKey:
        """Escrow a content key: unwrap it, check its commitment, store it under the master key.

        Raises:
            NotFound: no such model of this publisher.
            EscrowInvalid / CommitmentMismatch: the escrow is not a key for ``key_commitment``.
            Conflict: the commitment is registered under another model.
        """
        self.get_model(admin, model_id)
        content_key = escrow_unwrap(self.secrets.escrow_key, epk, body, model_id, key_commitment, salt)
        wrapped = self.kek.wrap(content_key, aad=model_key_aad(model_id, key_commitment))

        def unit(conn: Connection) -> bool:
            existing = repo.model_key_by_commitment(conn, key_commitment)
            if existing is not None:
                if existing.model_id != model_id:
                    raise Conflict("this content key is registered under another model")
                return False
            repo.insert_model_key(conn, model_id, key_commitment, salt, self.kek.key_id, wrapped, self._now())
            detail = {"key_commitment": b64encode(key_commitment)}
            event = AuditEvent(
                "model-key.registered",
                admin.token_id,
                publisher_id=admin.publisher_id,
                model_id=model_id,
                detail=detail,
            )
            self._audit(conn, event)
            return True

        try:
            created = self.db.write(unit)
        except Conflict:
            # A concurrent registration of the same commitment won; answer as the repeat would.
            with self.db.read() as conn:
                existing = repo.model_key_by_commitment(conn, key_commitment)
            if existing is None or existing.model_id != model_id:
                raise
            created = False
        return RegisteredKey(model_id, key_commitment, self.stanza(model_id, key_commitment), created)

    def escrowed_key(self, model_id: str, key_commitment: bytes) -> bytes:
        """The escrowed content key (for grants, S3)."""
        with self.db.read() as conn:
            row = repo.model_key_by_commitment(conn, key_commitment)
        if row is None or row.model_id != model_id:
            raise NotFound("no such key")
        return self.kek.unwrap(bytes(row.wrapped_key), aad=model_key_aad(model_id, key_commitment))

    def revoke_key(self, admin: Admin, model_id: str, key_commitment: bytes, reason: str) -> dict[str, Any]:
        self.get_model(admin, model_id)

        def unit(conn: Connection) -> Any:
            row = repo.model_key_by_commitment(conn, key_commitment)
            if row is None or row.model_id != model_id:
                raise NotFound("no such key")
            if repo.revoke_model_key(conn, key_commitment, reason, self._now()):
                detail = {"key_commitment": b64encode(key_commitment), "reason": reason}
                event = AuditEvent(
                    "model-key.revoked",
                    admin.token_id,
                    publisher_id=admin.publisher_id,
                    model_id=model_id,
                    detail=detail,
                )
                self._audit(conn, event)
            return repo.model_key_by_commitment(conn, key_commitment)

        row = self.db.write(unit)
        return {
            "model_id": model_id,
            "key_commitment": b64encode(key_commitment),
            "revoked_at": row.revoked_at,
            "revoke_reason": row.revoke_reason,
        }

    # --- audit (spec §7.8, §12) ---------------------------------------------------------------

    def list_audit(
        self, admin: Admin, *, chain: int, after_seq: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        with self.db.read() as conn:
            rows = repo.audit_records(conn, chain, after_seq, limit + 1, publisher_id=admin.publisher_id)
        items = [_audit_view(r._mapping) for r in rows[:limit]]
        return items, (items[-1]["seq"] if len(rows) > limit else None)

    def verify_audit(self) -> list[audit.Problem]:
        with self.db.read() as conn:
            return audit.verify(conn, self.secrets.audit_key)


def _audit_view(row: Any) -> dict[str, Any]:
    import json

    out = {k: row[k] for k in ("chain", "seq", "ts_us", "event", "outcome", "code", "publisher_id", "actor")}
    out.update({k: row[k] for k in ("licence_id", "device_id", "model_id", "grant_id")})
    out["detail"] = json.loads(row["detail"])
    out["prev_hash"] = b64encode(bytes(row["prev_hash"]))
    out["hash"] = b64encode(bytes(row["hash"]))
    return out


__all__ = ["Admin", "KeyServer", "KeyUnavailable", "ServerSecrets", "initialize"]
