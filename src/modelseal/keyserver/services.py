"""Domain logic of the key server. Raises :class:`~.errors.DomainError` subclasses, never HTTP errors.

Each state change is one write unit that ends with its audit record (spec §12.3), so a committed
change always has its record and vice versa. Time and randomness are injected (``Clock``,
``RandomSource``) so tests can fix them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature as InvalidSignatureError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Connection

from .._private.encoding import b64decode, b64encode, dumps_canonical
from ..errors import FormatError
from . import audit
from . import repository as repo
from .audit import AuditEvent
from .crypto import (
    ADMIN_PREFIX,
    GRANT_TOKEN_PREFIX,
    LICENCE_PREFIX,
    KeyEncryptionKey,
    b64url,
    decode_secret,
    encode_secret,
    escrow_unwrap,
    fingerprint_hash,
    is_valid_x25519_public,
    make_id,
    model_key_aad,
    rate_key,
    request_message,
    secret_hash,
    server_key_id,
    server_secret_aad,
)
from .errors import (
    Busy,
    Conflict,
    DeviceLimitReached,
    DeviceMismatch,
    DeviceRevoked,
    DomainError,
    InvalidCredential,
    InvalidLicence,
    InvalidPublicKey,
    InvalidSignature,
    InvalidToken,
    KeyNotRegistered,
    KeyRevoked,
    KeyUnavailable,
    LicenceExpired,
    LicenceRevoked,
    MalformedRequest,
    ModelNotLicensed,
    NotFound,
    RateLimited,
    ReplayedRequest,
    RequestAlreadyUsed,
    RequestExpired,
    SettingsError,
    StaleRequest,
    TokenAlreadyRedeemed,
    TokenExpired,
    UsageLimitReached,
    WrongAudience,
)
from .grant import build_grant, sign_grant
from .offline_files import offline_message, parse_offline_request

_DUMMY_HASH = bytes(32)
ACTIVATION_ROUTE = "/v1/activations"
GRANT_ROUTE = "/v1/grants"
DEFAULT_RATES = {"activate-ip": (30, 60), "activate-licence": (60, 3600), "auth-fail-ip": (60, 60)}
_ACTIVATION_DENIALS = (
    LicenceRevoked,
    LicenceExpired,
    DeviceRevoked,
    DeviceMismatch,
    DeviceLimitReached,
    InvalidPublicKey,
)
_GRANT_DENIALS = (
    LicenceRevoked,
    LicenceExpired,
    DeviceRevoked,
    DeviceMismatch,
    ModelNotLicensed,
    KeyNotRegistered,
    KeyRevoked,
    UsageLimitReached,
)
_TOKEN_DENIALS = (*_GRANT_DENIALS, TokenAlreadyRedeemed, TokenExpired, InvalidPublicKey)


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
class LicenceAuth:
    """An authenticated licence key (its licence may still be revoked or expired)."""

    licence_id: str
    publisher_id: str


@dataclass(frozen=True)
class Policy:
    """A licence's policy (spec §7.7); ranges are checked by the API models and the database."""

    models: tuple[str, ...]
    max_devices: int
    expires_at: int | None = None
    opens_per_day: int | None = None
    offline_grace_s: int = 0
    recheck_interval_s: int = 3600
    grant_ttl_s: int = 86400


@dataclass(frozen=True)
class ActivationRequest:
    """A parsed ``POST /v1/activations`` with its raw body and signature header (spec §7.3)."""

    aud: bytes
    ts: int
    x25519_pk: bytes
    ed25519_pk: bytes
    fingerprint: bytes
    label: str | None
    raw_body: bytes
    signature: str | None


@dataclass(frozen=True)
class GrantRequest:
    """A parsed ``POST /v1/grants`` with its raw body and signature header (spec §7.4)."""

    aud: bytes
    ts: int
    device_id: str
    model_id: str
    key_commitment: bytes
    fingerprint: bytes
    raw_body: bytes
    signature: str | None


@dataclass(frozen=True)
class _GrantReads:
    """The rows a grant decision reads, from one snapshot."""

    device: Any
    licence: Any
    licensed: bool
    key_row: Any


def _licence_id(presented: str | None) -> str:
    """The licence id a presented key names (a dummy id for a malformed key: same work follows)."""
    parsed = decode_secret(LICENCE_PREFIX, presented or "")
    return make_id("lic", parsed.id16 if parsed is not None else bytes(16))


@dataclass(frozen=True)
class Activation:
    device_id: str
    licence_id: str
    activated_at: int
    policy: dict[str, Any]
    created: bool


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
        rates: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.db, self.kek, self.secrets = db, kek, secrets
        self.public_url = public_url
        self.clock: Clock = clock or SystemClock()
        self.rng: RandomSource = rng or OsRandom()
        self.clock_skew_s = clock_skew_s
        self.offline_request_max_age_s = offline_request_max_age_s
        self.rates = {**DEFAULT_RATES, **(rates or {})}

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

    # --- licence keys (spec §3) -----------------------------------------------------------

    def authenticate_licence(self, presented: str | None) -> LicenceAuth:
        """The licence a ``MSEAL-LICENCE:`` key names (revoked and expired ones too: policy comes later).

        Raises:
            InvalidLicence: malformed key, unknown id or wrong secret — identical status, body and
                work (one row lookup and one HMAC on every path), so nothing tells them apart.
        """
        licence_id = _licence_id(presented)
        with self.db.read() as conn:
            row = repo.licence_by_id(conn, licence_id)
        return self._check_licence(presented, row)

    def _check_licence(self, presented: str | None, row: Any) -> LicenceAuth:
        """One HMAC whether or not ``row`` exists, so every failure costs the same."""
        parsed = decode_secret(LICENCE_PREFIX, presented or "")
        id16, secret32 = (parsed.id16, parsed.secret32) if parsed is not None else (bytes(16), bytes(32))
        computed = secret_hash(self.secrets.pepper, "licence", id16, secret32)
        stored = bytes(row.secret_hash) if row is not None else _DUMMY_HASH
        equal = hmac.compare_digest(computed, stored)
        if parsed is None or row is None or not equal:
            raise InvalidLicence("invalid licence key")
        return LicenceAuth(licence_id=row.id, publisher_id=row.publisher_id)

    # --- rate limiting (spec §14) ------------------------------------------------------------

    def _rate_hits(self, hits: list[tuple[str, str, tuple[int, int]]]) -> None:
        """Count each ``(scope, value, (limit, window_s))`` hit in its own short write unit, committed
        before the main work (so denied and rolled-back attempts still count); then raise if any is over.

        Raises:
            RateLimited: with ``retry_after`` the seconds to the end of the window that is over.
        """
        now = self._now()

        def unit(conn: Connection) -> list[int]:
            waits = []
            for scope, value, (limit, window) in hits:
                start = now // window * window
                count = repo.rate_hit(conn, scope, rate_key(self.secrets.pepper, value), start, limit)
                if count is not None and count <= limit:
                    continue
                waits.append(max(1, start + window - now))
                if count is not None:  # the window's first excess: recorded once (spec §12.1)
                    detail = {"scope": scope, "window_start": start, "limit": limit, "window_s": window}
                    event = AuditEvent("ratelimit.tripped", "system", "denied", "rate-limited", detail=detail)
                    self._audit(conn, event)
            return waits

        waits = self.db.write(unit)
        if waits:
            raise RateLimited("too many requests; retry later", retry_after=max(waits))

    def rate_limit_activation(self, client_ip: str, presented: str | None) -> None:
        """The activation limits, keyed by client IP and by the *presented* licence id, existing or not."""
        hits = [("activate-ip", client_ip, self.rates["activate-ip"])]
        parsed = decode_secret(LICENCE_PREFIX, presented or "")
        if parsed is not None:
            hits.append(("activate-licence", make_id("lic", parsed.id16), self.rates["activate-licence"]))
        self._rate_hits(hits)

    def note_auth_failure(self, client_ip: str) -> None:
        """Count a 401 for ``client_ip``; once over the window's limit, its failures become 429."""
        self._rate_hits([("auth-fail-ip", client_ip, self.rates["auth-fail-ip"])])

    # --- licences (spec §7.7) ----------------------------------------------------------------

    def _licence_view(self, row: Any, models: list[str]) -> dict[str, Any]:
        return {
            "id": row.id,
            "label": row.label,
            "created_at": row.created_at,
            "revoked_at": row.revoked_at,
            "revoke_reason": row.revoke_reason,
            "active_devices": row.active_devices,
            "policy": _policy_view(row, models),
        }

    def create_licence(self, admin: Admin, policy: Policy, *, label: str | None = None) -> tuple[dict[str, Any], str]:
        """A new licence: ``(Licence view, licence key)``; the key is shown once, stored as a keyed hash.

        Raises:
            NotFound: a model is not one of this publisher's.
            MalformedRequest: ``recheck_interval_s`` exceeds ``grant_ttl_s``.
        """
        models = sorted(set(policy.models))
        if policy.recheck_interval_s > policy.grant_ttl_s:
            raise MalformedRequest(
                "recheck_interval_s must not exceed grant_ttl_s", fields=["$.policy.recheck_interval_s"]
            )
        id16, secret32 = self.rng.bytes(16), self.rng.bytes(32)
        licence_id = make_id("lic", id16)
        now = self._now()
        row = {
            "id": licence_id,
            "publisher_id": admin.publisher_id,
            "secret_hash": secret_hash(self.secrets.pepper, "licence", id16, secret32),
            "label": label,
            "created_at": now,
            "expires_at": policy.expires_at,
            "max_devices": policy.max_devices,
            "opens_per_day": policy.opens_per_day,
            "offline_grace_s": policy.offline_grace_s,
            "recheck_interval_s": policy.recheck_interval_s,
            "grant_ttl_s": policy.grant_ttl_s,
        }

        def unit(conn: Connection) -> Any:
            if repo.own_model_ids(conn, admin.publisher_id, models) != set(models):
                raise NotFound("no such model")
            repo.insert_licence(conn, row, models)
            detail = {"label": label, "policy": _policy_detail(policy, models)}
            event = AuditEvent(
                "licence.created", admin.token_id, publisher_id=admin.publisher_id, licence_id=licence_id, detail=detail
            )
            self._audit(conn, event)
            return repo.licence_by_id(conn, licence_id)

        stored = self.db.write(unit)
        return self._licence_view(stored, models), encode_secret(LICENCE_PREFIX, id16, secret32)

    def get_licence(self, admin: Admin, licence_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = repo.licence_by_id(conn, licence_id)
            if row is None or row.publisher_id != admin.publisher_id:
                raise NotFound("no such licence")
            models = repo.licence_models(conn, [licence_id])[licence_id]
        return self._licence_view(row, models)

    def list_licences(
        self, admin: Admin, *, status: str = "all", model_id: str | None = None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self.db.read() as conn:
            rows = repo.list_licences(
                conn,
                admin.publisher_id,
                status=status,
                model_id=model_id,
                now=self._now(),
                after=after,
                limit=limit + 1,
            )
            models = repo.licence_models(conn, [r.id for r in rows[:limit]])
        items = [self._licence_view(r, models[r.id]) for r in rows[:limit]]
        return items, (items[-1]["id"] if len(rows) > limit else None)

    def update_licence(
        self, admin: Admin, licence_id: str, changes: dict[str, Any], *, label: str | None = None
    ) -> dict[str, Any]:
        """Change a licence's policy (any of :class:`Policy`'s fields) and label, in place: the
        licence key, its devices and its grants stay; new limits apply from the next request.

        Raises:
            NotFound: not this publisher's licence, or a model that is not theirs.
            Conflict: ``max_devices`` below the devices already active (revoke some first).
            MalformedRequest: ``recheck_interval_s`` would exceed ``grant_ttl_s``.
        """
        fields = {"max_devices", "expires_at", "opens_per_day", "offline_grace_s", "recheck_interval_s", "grant_ttl_s"}
        if not set(changes) <= fields | {"models"}:
            raise MalformedRequest(
                "unknown policy fields", fields=sorted(f"$.policy.{k}" for k in set(changes) - fields)
            )
        cleared = [k for k, v in changes.items() if v is None and k not in ("expires_at", "opens_per_day")]
        if cleared:
            raise MalformedRequest(
                "only expires_at and opens_per_day can be cleared", fields=[f"$.policy.{k}" for k in cleared]
            )

        def unit(conn: Connection) -> None:
            row = repo.licence_by_id(conn, licence_id, lock=True)
            if row is None or row.publisher_id != admin.publisher_id:
                raise NotFound("no such licence")
            merged = {k: changes.get(k, getattr(row, k)) for k in fields}
            if merged["recheck_interval_s"] > merged["grant_ttl_s"]:
                raise MalformedRequest(
                    "recheck_interval_s must not exceed grant_ttl_s", fields=["$.policy.recheck_interval_s"]
                )
            if merged["max_devices"] < row.active_devices:
                raise Conflict(f"{row.active_devices} devices are active; revoke some before lowering max_devices")
            models = sorted(set(changes["models"])) if "models" in changes else None
            if models is not None and repo.own_model_ids(conn, admin.publisher_id, models) != set(models):
                raise NotFound("no such model")
            repo.update_licence(
                conn, licence_id, {k: merged[k] for k in fields} | {"label": label or row.label}, models
            )
            current = models if models is not None else repo.licence_models(conn, [licence_id])[licence_id]
            detail = {"label": label, "policy": _policy_detail(Policy(models=tuple(current), **merged), current)}
            event = AuditEvent(
                "licence.updated", admin.token_id, publisher_id=admin.publisher_id, licence_id=licence_id, detail=detail
            )
            self._audit(conn, event)

        self.db.write(unit)
        return self.get_licence(admin, licence_id)

    def revoke_licence(self, admin: Admin, licence_id: str, reason: str) -> dict[str, Any]:
        """Revoke a licence (idempotent); every later activation and grant under it is refused."""

        def unit(conn: Connection) -> None:
            row = repo.licence_by_id(conn, licence_id, lock=True)
            if row is None or row.publisher_id != admin.publisher_id:
                raise NotFound("no such licence")
            if repo.revoke_licence(conn, licence_id, reason, self._now()):
                event = AuditEvent(
                    "licence.revoked",
                    admin.token_id,
                    publisher_id=admin.publisher_id,
                    licence_id=licence_id,
                    detail={"reason": reason},
                )
                self._audit(conn, event)

        self.db.write(unit)
        return self.get_licence(admin, licence_id)

    # --- devices (spec §7.3, §7.7) -----------------------------------------------------------

    def activate(self, licence: LicenceAuth, request: ActivationRequest) -> Activation:
        """Register a device under a licence, or return it if already registered (idempotent).

        Raises:
            InvalidSignature / WrongAudience / StaleRequest: the request is not the device's, for this
                server, now.
            LicenceRevoked / LicenceExpired / DeviceRevoked / DeviceMismatch / DeviceLimitReached /
            InvalidPublicKey: policy denials, each rolled back and audited in its own unit.
        """
        self._verify_request(request.ed25519_pk, request.signature, ACTIVATION_ROUTE, request.raw_body)
        if not hmac.compare_digest(request.aud, self.secrets.signing_kid):
            raise WrongAudience("the request is addressed to another server key")
        if abs(request.ts - self._now_us()) > self.clock_skew_s * 1_000_000:
            raise StaleRequest("the request timestamp is outside the allowed clock skew")
        return self._activate_checked(licence, request)

    def _activate_checked(self, licence: LicenceAuth, request: ActivationRequest) -> Activation:
        """Activation once the request is known to be the device's, for this server, now."""
        fp_hash = fingerprint_hash(self.secrets.pepper, request.fingerprint)
        device_id = self._new_id("dev")

        def unit(conn: Connection) -> tuple[Any, bool]:
            now = self._now()
            lic = repo.licence_by_id(conn, licence.licence_id, lock=True)  # serialises the idempotency check
            if lic is None or lic.revoked_at is not None:
                raise LicenceRevoked("the licence is revoked")
            if lic.expires_at is not None and lic.expires_at <= now:
                raise LicenceExpired("the licence has expired")
            rows = repo.device_by_key(
                conn, licence.licence_id, x25519_pk=request.x25519_pk, ed25519_pk=request.ed25519_pk
            )
            for row in rows:
                if bytes(row.x25519_pk) == request.x25519_pk:
                    if row.revoked_at is not None:
                        raise DeviceRevoked("this device is revoked")
                    same_ed = hmac.compare_digest(bytes(row.ed25519_pk), request.ed25519_pk)
                    same_fp = hmac.compare_digest(bytes(row.fingerprint_hash), fp_hash)
                    if not (same_ed and same_fp):
                        raise DeviceMismatch("the device is registered with another signing key or fingerprint")
                    return row, False
            if rows:
                raise DeviceMismatch("this signing key is registered with another device key")
            if not is_valid_x25519_public(request.x25519_pk):
                raise InvalidPublicKey("x25519_public_key is not a valid public key")
            if not repo.claim_device_slot(conn, licence.licence_id):
                raise DeviceLimitReached("the licence has no free device slot")
            repo.insert_device(
                conn,
                {
                    "id": device_id,
                    "licence_id": licence.licence_id,
                    "x25519_pk": request.x25519_pk,
                    "ed25519_pk": request.ed25519_pk,
                    "fingerprint_hash": fp_hash,
                    "label": request.label,
                    "created_at": now,
                    "last_request_us": request.ts,
                    "last_seen_at": now,
                },
            )
            detail = {"x25519_public_key": b64encode(request.x25519_pk), "label": request.label}
            event = AuditEvent(
                "device.activated",
                device_id,
                publisher_id=licence.publisher_id,
                licence_id=licence.licence_id,
                device_id=device_id,
                detail=detail,
            )
            self._audit(conn, event)
            return repo.get_device(conn, licence.publisher_id, device_id), True

        try:
            try:
                row, created = self.db.write(unit)
            except Conflict:
                # A concurrent activation of the same key won the unique constraint (its counter
                # increment rolled back with ours); answer as the re-activation it now is.
                row, created = self.db.write(unit)
        except _ACTIVATION_DENIALS as exc:
            self._audit_denial(licence, request, exc)
            raise
        with self.db.read() as conn:
            lic = repo.licence_by_id(conn, licence.licence_id)
            models = repo.licence_models(conn, [licence.licence_id])[licence.licence_id]
        return Activation(
            device_id=row.id,
            licence_id=licence.licence_id,
            activated_at=row.created_at,
            policy=_policy_view(lic, models),
            created=created,
        )

    def _audit_denial(self, licence: LicenceAuth, request: ActivationRequest, exc: DomainError) -> None:
        def unit(conn: Connection) -> None:
            detail = {"x25519_public_key": b64encode(request.x25519_pk)}
            event = AuditEvent(
                "device.activation-denied",
                "system",
                "denied",
                exc.code,
                publisher_id=licence.publisher_id,
                licence_id=licence.licence_id,
                detail=detail,
            )
            self._audit(conn, event)

        self.db.write(unit)

    # --- grants (spec §7.4, §8) ---------------------------------------------------------------

    def _check_fresh(self, aud: bytes, ts: int) -> None:
        if not hmac.compare_digest(aud, self.secrets.signing_kid):
            raise WrongAudience("the request is addressed to another server key")
        if abs(ts - self._now_us()) > self.clock_skew_s * 1_000_000:
            raise StaleRequest("the request timestamp is outside the allowed clock skew")

    def grant_with_licence_key(self, presented: str | None, request: GrantRequest) -> dict[str, str]:
        """:meth:`authenticate_licence` then :meth:`issue_grant`, with every row both need read in
        one snapshot (the grant route's hot path)."""
        with self.db.read() as conn:
            reads = self._grant_reads(conn, _licence_id(presented), request)
        return self.issue_grant(self._check_licence(presented, reads.licence), request, reads=reads)

    def _grant_reads(self, conn: Connection, licence_id: str, request: GrantRequest) -> _GrantReads:
        return _GrantReads(
            device=repo.device_by_id(conn, request.device_id),
            licence=repo.licence_by_id(conn, licence_id),
            licensed=repo.licence_has_model(conn, licence_id, request.model_id),
            key_row=repo.model_key_by_commitment(conn, request.key_commitment),
        )

    def issue_grant(
        self, licence: LicenceAuth, request: GrantRequest, *, reads: _GrantReads | None = None
    ) -> dict[str, str]:
        """A signed grant of the content key to a registered device (the wire form ``SignedGrant``).

        Raises:
            InvalidSignature: unknown device, a device of another licence, or a bad signature (alike).
            WrongAudience / StaleRequest / ReplayedRequest: not this server, not now, or used before.
            LicenceRevoked / LicenceExpired / DeviceRevoked / DeviceMismatch / ModelNotLicensed /
            KeyNotRegistered / KeyRevoked / UsageLimitReached: policy denials, audited as ``grant.denied``.
        """
        if reads is None:
            with self.db.read() as conn:
                reads = self._grant_reads(conn, licence.licence_id, request)
        device = reads.device
        if device is None or device.licence_id != licence.licence_id:
            # Same answer as a bad signature: no oracle about other licences' devices.
            raise InvalidSignature("the request signature does not verify")
        self._verify_request(bytes(device.ed25519_pk), request.signature, GRANT_ROUTE, request.raw_body)
        self._check_fresh(request.aud, request.ts)
        try:
            return self._grant(licence, request, device, reads=reads)
        except _GRANT_DENIALS as exc:
            self._audit_grant_denial(licence, request, exc)
            raise

    def _grant(
        self,
        licence: LicenceAuth,
        request: GrantRequest,
        device: Any,
        *,
        consume_ts: bool = True,
        reads: _GrantReads | None = None,
    ) -> dict[str, str]:
        now = self._now()
        if reads is None:
            with self.db.read() as conn:
                reads = self._grant_reads(conn, licence.licence_id, request)
        lic, licensed, key_row = reads.licence, reads.licensed, reads.key_row
        if lic is None or lic.revoked_at is not None:
            raise LicenceRevoked("the licence is revoked")
        if lic.expires_at is not None and lic.expires_at <= now:
            raise LicenceExpired("the licence has expired")
        if device.revoked_at is not None:
            raise DeviceRevoked("this device is revoked")
        fp_hash = fingerprint_hash(self.secrets.pepper, request.fingerprint)
        if not hmac.compare_digest(bytes(device.fingerprint_hash), fp_hash):
            raise DeviceMismatch("the request comes from another machine than the one activated")
        if not licensed:
            raise ModelNotLicensed("the licence does not cover this model")
        if key_row is None or key_row.model_id != request.model_id:
            raise KeyNotRegistered("no content key with this commitment is registered for this model")
        if key_row.revoked_at is not None:
            raise KeyRevoked("this content key is revoked")

        # Outside the write lock: unwrap K, build and sign the grant (spec §7.4).
        not_after = now + lic.grant_ttl_s if lic.expires_at is None else min(now + lic.grant_ttl_s, lic.expires_at)
        recheck_after = min(now + lic.recheck_interval_s, not_after)
        offline_until = min(recheck_after + lic.offline_grace_s, not_after)
        grant_id = self._new_id("grt")
        grant_bytes, signed = self._signed_grant(
            key_row,
            {
                "grant_id": grant_id,
                "model_id": request.model_id,
                "licence_id": licence.licence_id,
                "device_id": device.id,
                "issued_at": now,
                "recheck_after": recheck_after,
                "offline_until": offline_until,
                "not_after": not_after,
            },
            bytes(device.x25519_pk),
        )

        def unit(conn: Connection) -> None:
            # One conditional update checks replay, device and licence revocation (spec §5.3); only
            # when it matches nothing do we read why. An offline request is used once by its hash
            # instead (spec §11), so it checks revocation without consuming a timestamp.
            ts = request.ts if consume_ts else None
            if conn.dialect.name != "sqlite":
                # PostgreSQL: hold the licence row (shared) until commit, so a revocation waits for
                # this grant instead of committing under it and being audited before it. (On
                # SQLite the write lock already serialises every writer.)
                repo.licence_by_id(conn, licence.licence_id, lock=True, shared=True)
            if not repo.use_device_request(conn, device.id, licence.licence_id, ts, now):
                current = repo.licence_by_id(conn, licence.licence_id)
                if current is None or current.revoked_at is not None:
                    raise LicenceRevoked("the licence is revoked")
                dev = repo.device_by_id(conn, device.id)
                if dev is None or dev.revoked_at is not None:
                    raise DeviceRevoked("this device is revoked")
                raise ReplayedRequest("the request timestamp was used before")
            if lic.opens_per_day is not None and not repo.count_grant(
                conn, licence.licence_id, now // 86400, lic.opens_per_day
            ):
                raise UsageLimitReached("the licence's daily grant limit is reached", retry_after=86400 - now % 86400)
            detail = {
                "not_after": not_after,
                "offline_until": offline_until,
                "sha256": b64encode(hashlib.sha256(grant_bytes).digest()),
            }
            event = AuditEvent(
                "grant.issued",
                device.id,
                publisher_id=licence.publisher_id,
                licence_id=licence.licence_id,
                device_id=device.id,
                model_id=request.model_id,
                grant_id=grant_id,
                detail=detail,
            )
            self._audit(conn, event)

        self.db.write(unit)
        return signed

    def _signed_grant(self, key_row: Any, fields: dict[str, Any], x25519_pk: bytes) -> tuple[bytes, dict[str, str]]:
        """Unwrap the escrowed key and build and sign a grant wrapped to ``x25519_pk`` (spec §8);
        done outside any write lock."""
        full = {
            "v": 1,
            "server_key_id": b64encode(self.secrets.signing_kid),
            "key_commitment": b64encode(bytes(key_row.key_commitment)),
            **fields,
        }
        content_key = self.kek.unwrap(
            bytes(key_row.wrapped_key), aad=model_key_aad(fields["model_id"], bytes(key_row.key_commitment))
        )
        ephemeral = X25519PrivateKey.from_private_bytes(self.rng.bytes(32))
        try:
            grant_bytes = build_grant(full, content_key, x25519_pk, ephemeral)
        except ValueError:
            raise InvalidPublicKey("the device key is not a valid public key") from None
        return grant_bytes, sign_grant(self.secrets.signing_key, grant_bytes)

    def _audit_grant_denial(self, licence: LicenceAuth, request: GrantRequest, exc: DomainError) -> None:
        def unit(conn: Connection) -> None:
            event = AuditEvent(
                "grant.denied",
                request.device_id,
                "denied",
                exc.code,
                publisher_id=licence.publisher_id,
                licence_id=licence.licence_id,
                device_id=request.device_id,
                model_id=request.model_id,
                detail={"key_commitment": b64encode(request.key_commitment)},
            )
            self._audit(conn, event)

        self.db.write(unit)

    # --- one-time grant tokens (spec §9) -----------------------------------------------------

    def create_grant_token(
        self,
        admin: Admin,
        *,
        licence_id: str,
        model_id: str,
        key_commitment: bytes | None = None,
        device_id: str | None = None,
        expires_in_s: int = 86400,
        grant_ttl_s: int = 3600,
    ) -> dict[str, Any]:
        """A one-time grant token (``{"id", "token", "expires_at"}``); the token is shown once.

        Raises:
            NotFound: the licence, or the bound device, is not this publisher's.
            ModelNotLicensed: the licence does not cover the model.
        """
        id16, secret32 = self.rng.bytes(16), self.rng.bytes(32)
        token_id, now = make_id("tok", id16), self._now()
        row = {
            "id": token_id,
            "secret_hash": secret_hash(self.secrets.pepper, "grant-token", id16, secret32),
            "publisher_id": admin.publisher_id,
            "licence_id": licence_id,
            "model_id": model_id,
            "key_commitment": key_commitment,
            "device_id": device_id,
            "grant_ttl_s": grant_ttl_s,
            "created_at": now,
            "expires_at": now + expires_in_s,
        }

        def unit(conn: Connection) -> None:
            lic = repo.licence_by_id(conn, licence_id)
            if lic is None or lic.publisher_id != admin.publisher_id:
                raise NotFound("no such licence")
            if not repo.licence_has_model(conn, licence_id, model_id):
                raise ModelNotLicensed("the licence does not cover this model")
            if device_id is not None:
                dev = repo.device_by_id(conn, device_id)
                if dev is None or dev.licence_id != licence_id:
                    raise NotFound("no such device under this licence")
            repo.insert_grant_token(conn, row)
            detail = {
                "expires_at": row["expires_at"],
                "grant_ttl_s": grant_ttl_s,
                "device_bound": device_id is not None,
            }
            event = AuditEvent(
                "token.created",
                admin.token_id,
                publisher_id=admin.publisher_id,
                licence_id=licence_id,
                device_id=device_id,
                model_id=model_id,
                detail=detail,
            )
            self._audit(conn, event)

        self.db.write(unit)
        return {
            "id": token_id,
            "token": encode_secret(GRANT_TOKEN_PREFIX, id16, secret32),
            "expires_at": row["expires_at"],
        }

    def authenticate_grant_token(self, presented: str | None) -> Any:
        """The token row a ``MSEAL-GRANT-TOKEN:`` string names (redeemed and expired ones too).

        Raises:
            InvalidToken: malformed, unknown or wrong secret — one answer, the same work.
        """
        parsed = decode_secret(GRANT_TOKEN_PREFIX, presented or "")
        id16, secret32 = (parsed.id16, parsed.secret32) if parsed is not None else (bytes(16), bytes(32))
        with self.db.read() as conn:
            row = repo.grant_token_by_id(conn, make_id("tok", id16))
        computed = secret_hash(self.secrets.pepper, "grant-token", id16, secret32)
        equal = hmac.compare_digest(computed, bytes(row.secret_hash) if row is not None else _DUMMY_HASH)
        if parsed is None or row is None or not equal:
            raise InvalidToken("invalid grant token")
        return row

    def redeem_grant_token(
        self, presented: str | None, *, x25519_pk: bytes, model_id: str, key_commitment: bytes
    ) -> dict[str, str]:
        """Redeem a one-time token for a grant wrapped to ``x25519_pk`` (spec §9); at most once.

        Raises:
            InvalidToken: see :meth:`authenticate_grant_token`.
            TokenAlreadyRedeemed / TokenExpired: the token was used, or is past its expiry.
            LicenceRevoked / LicenceExpired / ModelNotLicensed / KeyNotRegistered / KeyRevoked /
            DeviceMismatch / DeviceRevoked / UsageLimitReached: policy denials, audited as ``token.denied``.
        """
        token = self.authenticate_grant_token(presented)
        return self.redeem_authenticated(token, x25519_pk=x25519_pk, model_id=model_id, key_commitment=key_commitment)

    def redeem_authenticated(
        self, token: Any, *, x25519_pk: bytes, model_id: str, key_commitment: bytes
    ) -> dict[str, str]:
        """:meth:`redeem_grant_token` for a token row :meth:`authenticate_grant_token` returned."""
        try:
            return self._redeem(token, x25519_pk, model_id, key_commitment)
        except _TOKEN_DENIALS as exc:
            self._audit_token_denial(token, model_id, key_commitment, exc.code)
            raise

    def _audit_token_denial(self, token: Any, model_id: str, key_commitment: bytes, code: str) -> None:
        def unit(conn: Connection) -> None:
            event = AuditEvent(
                "token.denied",
                token.id,
                "denied",
                code,
                publisher_id=token.publisher_id,
                licence_id=token.licence_id,
                device_id=token.device_id,
                model_id=model_id,
                detail={"key_commitment": b64encode(key_commitment)},
            )
            self._audit(conn, event)

        self.db.write(unit)

    def _redeem(self, token: Any, x25519_pk: bytes, model_id: str, key_commitment: bytes) -> dict[str, str]:
        now = self._now()
        if token.redeemed_at is not None:
            raise TokenAlreadyRedeemed("this grant token was redeemed before")
        if token.expires_at <= now:
            raise TokenExpired("this grant token has expired")
        if not is_valid_x25519_public(x25519_pk):
            raise InvalidPublicKey("not a valid X25519 public key")
        bound = token.key_commitment is not None and not hmac.compare_digest(
            bytes(token.key_commitment), key_commitment
        )
        if model_id != token.model_id or bound:
            raise ModelNotLicensed("the token does not cover this model or content key")
        with self.db.read() as conn:
            lic = repo.licence_by_id(conn, token.licence_id)
            licensed = repo.licence_has_model(conn, token.licence_id, model_id)
            key_row = repo.model_key_by_commitment(conn, key_commitment)
            device = repo.device_by_id(conn, token.device_id) if token.device_id else None
        if lic is None or lic.revoked_at is not None:
            raise LicenceRevoked("the licence is revoked")
        if lic.expires_at is not None and lic.expires_at <= now:
            raise LicenceExpired("the licence has expired")
        if not licensed:
            raise ModelNotLicensed("the licence does not cover this model")
        if key_row is None or key_row.model_id != model_id:
            raise KeyNotRegistered("no content key with this commitment is registered for this model")
        if key_row.revoked_at is not None:
            raise KeyRevoked("this content key is revoked")
        if device is not None:
            if device.revoked_at is not None:
                raise DeviceRevoked("the device this token is bound to is revoked")
            if not hmac.compare_digest(bytes(device.x25519_pk), x25519_pk):
                raise DeviceMismatch("this token is bound to another device key")
        device_id = device.id if device is not None else "pk_" + b64url(x25519_pk)
        until = now + token.grant_ttl_s if lic.expires_at is None else min(now + token.grant_ttl_s, lic.expires_at)
        grant_id = self._new_id("grt")
        fields = {
            "grant_id": grant_id,
            "model_id": model_id,
            "licence_id": token.licence_id,
            "device_id": device_id,
            "issued_at": now,
            "recheck_after": until,
            "offline_until": until,
            "not_after": until,
        }
        grant_bytes, signed = self._signed_grant(key_row, fields, x25519_pk)

        def unit(conn: Connection) -> None:
            row = repo.licence_by_id(conn, token.licence_id, lock=True)  # lock order: licence → token → usage
            if row is None or row.revoked_at is not None:
                raise LicenceRevoked("the licence is revoked")
            if not repo.redeem_grant_token(conn, token.id, grant_id, now):
                current = repo.grant_token_by_id(conn, token.id)
                if current is not None and current.redeemed_at is not None:
                    raise TokenAlreadyRedeemed("this grant token was redeemed before")
                raise TokenExpired("this grant token has expired")
            if row.opens_per_day is not None and not repo.count_grant(
                conn, token.licence_id, now // 86400, row.opens_per_day
            ):
                raise UsageLimitReached("the licence's daily grant limit is reached", retry_after=86400 - now % 86400)
            detail = {"not_after": until, "sha256": b64encode(hashlib.sha256(grant_bytes).digest())}
            event = AuditEvent(
                "token.redeemed",
                token.id,
                publisher_id=token.publisher_id,
                licence_id=token.licence_id,
                device_id=token.device_id,
                model_id=model_id,
                grant_id=grant_id,
                detail=detail,
            )
            self._audit(conn, event)

        self.db.write(unit)  # any failure rolls the redemption back with it
        return signed

    # --- air-gapped activation and renewal (spec §11) -----------------------------------------

    def process_offline(self, licence: LicenceAuth, request_file: Any) -> dict[str, Any]:
        """Answer an air-gapped device's request file: activate it (or renew), and grant each
        listed model; a signed response file. A request file is processed once.

        Raises:
            MalformedRequest: not a request file. InvalidSignature: not signed by the key it names.
            WrongAudience / RequestExpired: for another server key, or too old / in the future.
            RequestAlreadyUsed: processed before. Activation denials as :meth:`activate`.
        """
        raw, req = parse_offline_request(request_file)
        now_us = self._now_us()
        if not hmac.compare_digest(b64decode(req["aud"], length=8), self.secrets.signing_kid):
            raise WrongAudience("the request is addressed to another server key")
        if (
            not now_us - self.offline_request_max_age_s * 1_000_000
            <= req["ts"]
            <= now_us + self.clock_skew_s * 1_000_000
        ):
            raise RequestExpired("the request file is too old, or from the future")
        if req["licence_id"] != licence.licence_id:
            raise InvalidSignature("the request is for another licence")
        request_hash = hashlib.sha256(raw).digest()

        def claim(conn: Connection) -> None:
            if not repo.claim_offline_request(conn, request_hash, self._now()):
                raise RequestAlreadyUsed("this request file was processed before")

        self.db.write(claim)
        try:
            return self._process_claimed(licence, req, request_hash)
        except (Busy, KeyUnavailable):
            # Not an answer about the request: give the file back, so that the device's round trip
            # over the air gap is not spent on a busy database.
            self.db.write(lambda conn: repo.release_offline_request(conn, request_hash))
            raise

    def _process_claimed(self, licence: LicenceAuth, req: dict[str, Any], request_hash: bytes) -> dict[str, Any]:
        x_pk, ed_pk = b64decode(req["x25519_public_key"], length=32), b64decode(req["ed25519_public_key"], length=32)
        fp = b64decode(req["fingerprint"], length=32)
        activation = self._activate_checked(
            licence,
            ActivationRequest(self.secrets.signing_kid, req["ts"], x_pk, ed_pk, fp, req["label"], b"", None),
        )
        with self.db.read() as conn:
            device = repo.device_by_id(conn, activation.device_id)
        if device is None:  # cannot happen: devices are never deleted
            raise DeviceRevoked("this device is gone")
        grants, denied = [], []
        for item in req["models"]:
            kc = b64decode(item["key_commitment"], length=32)
            grant_req = GrantRequest(
                self.secrets.signing_kid, req["ts"], device.id, item["model_id"], kc, fp, b"", None
            )
            try:
                grants.append(self._grant(licence, grant_req, device, consume_ts=False))
            except _GRANT_DENIALS as exc:
                self._audit_grant_denial(licence, grant_req, exc)
                denied.append({"model_id": item["model_id"], "code": exc.code})

        def record(conn: Connection) -> None:
            detail = {"request_sha256": b64encode(request_hash), "grants": len(grants), "denied": len(denied)}
            event = AuditEvent(
                "offline.processed",
                device.id,
                publisher_id=licence.publisher_id,
                licence_id=licence.licence_id,
                device_id=device.id,
                detail=detail,
            )
            self._audit(conn, event)

        self.db.write(record)
        response = {
            "request_sha256": b64encode(request_hash),
            "server_key_id": b64encode(self.secrets.signing_kid),
            "device_id": device.id,
            "licence_id": licence.licence_id,
            "policy": activation.policy,
            "issued_at": self._now(),
            "grants": grants,
            "denied": denied,
        }
        body = dumps_canonical(response)
        signature = self.secrets.signing_key.sign(offline_message("response", body))
        return {
            "type": "modelseal-offline-response",
            "v": 1,
            "response": b64encode(body),
            "signature": b64encode(signature),
        }

    def _verify_request(self, ed25519_pk: bytes, signature: str | None, route: str, raw_body: bytes) -> None:
        """The Ed25519 request signature of spec §6 over the raw body bytes."""
        try:
            sig = b64decode(signature or "", length=64)
            Ed25519PublicKey.from_public_bytes(ed25519_pk).verify(sig, request_message("POST", route, raw_body))
        except (FormatError, ValueError, InvalidSignatureError):
            raise InvalidSignature("the request signature does not verify") from None

    def _device_view(self, row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "licence_id": row.licence_id,
            "label": row.label,
            "x25519_public_key": b64encode(bytes(row.x25519_pk)),
            "ed25519_public_key": b64encode(bytes(row.ed25519_pk)),
            "created_at": row.created_at,
            "last_seen_at": row.last_seen_at,
            "revoked_at": row.revoked_at,
            "revoke_reason": row.revoke_reason,
        }

    def get_device(self, admin: Admin, device_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = repo.get_device(conn, admin.publisher_id, device_id)
        if row is None:
            raise NotFound("no such device")
        return self._device_view(row)

    def list_devices(
        self, admin: Admin, *, licence_id: str | None = None, status: str = "all", after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self.db.read() as conn:
            rows = repo.list_devices(
                conn, admin.publisher_id, licence_id=licence_id, status=status, after=after, limit=limit + 1
            )
        items = [self._device_view(r) for r in rows[:limit]]
        return items, (items[-1]["id"] if len(rows) > limit else None)

    def revoke_device(self, admin: Admin, device_id: str, reason: str) -> dict[str, Any]:
        """Revoke a device and free its slot, in one unit (idempotent: the slot is freed once)."""

        def unit(conn: Connection) -> Any:
            found = repo.get_device(conn, admin.publisher_id, device_id)
            if found is None:
                raise NotFound("no such device")
            repo.licence_by_id(conn, found.licence_id, lock=True)  # lock order: licence → device
            if repo.revoke_device(conn, device_id, reason, self._now()):
                repo.release_device_slot(conn, found.licence_id)
                event = AuditEvent(
                    "device.revoked",
                    admin.token_id,
                    publisher_id=admin.publisher_id,
                    licence_id=found.licence_id,
                    device_id=device_id,
                    detail={"reason": reason},
                )
                self._audit(conn, event)
            return repo.get_device(conn, admin.publisher_id, device_id)

        return self._device_view(self.db.write(unit))

    # --- audit (spec §7.8, §12) ---------------------------------------------------------------

    def list_audit(
        self, admin: Admin, *, chain: int, after_seq: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        with self.db.read() as conn:
            rows = repo.audit_records(conn, chain, after_seq, limit + 1, publisher_id=admin.publisher_id)
        items = [_audit_view(r._mapping) for r in rows[:limit]]
        return items, (items[-1]["seq"] if len(rows) > limit else None)

    def verify_audit(self, anchors: Sequence[Any] = ()) -> list[audit.Problem]:
        """Problems in the audit log (spec §12.4), also against anchors written earlier."""
        return self.verify_and_anchor(anchors)[0]

    def verify_and_anchor(self, anchors: Sequence[Any] = ()) -> tuple[list[audit.Problem], dict[str, Any]]:
        """:meth:`verify_audit` and, from the same snapshot, the anchor of what was verified."""
        with self.db.read() as conn:
            problems = audit.verify(conn, self.secrets.audit_key)
            for anchored in anchors:
                problems += audit.check_anchor(conn, anchored)
            return problems, audit.anchor(conn)


def _policy_view(row: Any, models: list[str]) -> dict[str, Any]:
    return {
        "expires_at": row.expires_at,
        "max_devices": row.max_devices,
        "models": models,
        "opens_per_day": row.opens_per_day,
        "offline_grace_s": row.offline_grace_s,
        "recheck_interval_s": row.recheck_interval_s,
        "grant_ttl_s": row.grant_ttl_s,
    }


def _policy_detail(policy: Policy, models: list[str]) -> dict[str, Any]:
    """The policy for an audit record: up to 100 model ids listed, beyond that their count and digest
    (the record's detail is capped at 4 KiB, spec §12.2)."""
    import hashlib

    detail: dict[str, Any] = {
        "expires_at": policy.expires_at,
        "max_devices": policy.max_devices,
        "opens_per_day": policy.opens_per_day,
        "offline_grace_s": policy.offline_grace_s,
        "recheck_interval_s": policy.recheck_interval_s,
        "grant_ttl_s": policy.grant_ttl_s,
    }
    if len(models) <= 100:
        detail["models"] = models
    else:
        digest = hashlib.sha256("\n".join(models).encode("ascii")).digest()
        detail["models_count"], detail["models_sha256"] = len(models), b64encode(digest)
    return detail


def _audit_view(row: Any) -> dict[str, Any]:
    import json

    out = {k: row[k] for k in ("chain", "seq", "ts_us", "event", "outcome", "code", "publisher_id", "actor")}
    out.update({k: row[k] for k in ("licence_id", "device_id", "model_id", "grant_id")})
    out["detail"] = json.loads(row["detail"])
    out["prev_hash"] = b64encode(bytes(row["prev_hash"]))
    out["hash"] = b64encode(bytes(row["hash"]))
    return out


__all__ = [
    "Activation",
    "ActivationRequest",
    "Admin",
    "KeyServer",
    "KeyUnavailable",
    "LicenceAuth",
    "Policy",
    "ServerSecrets",
    "initialize",
]
