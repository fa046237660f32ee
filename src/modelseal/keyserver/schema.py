"""The S1, S2 and S4 tables (spec §5.2) as SQLAlchemy Core metadata.

The database schema is created only by the Alembic migrations in ``migrations/``; a test checks
that the migrated schema matches this metadata.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()


def _blob(name: str, n: int, *, nullable: bool = False, unique: bool = False, pk: bool = False) -> Column[bytes]:
    return Column(
        name, LargeBinary, CheckConstraint(f"length({name}) = {n}"), nullable=nullable, unique=unique, primary_key=pk
    )


server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", Text, primary_key=True),
    Column("kek_id", Text, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

server_keys = Table(
    "server_keys",
    metadata,
    _blob("kid", 8, pk=True),
    Column("purpose", Text, CheckConstraint("purpose IN ('signing', 'escrow')"), nullable=False),
    _blob("public_key", 32, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("retired_at", BigInteger, nullable=True),
)
Index(
    "ux_server_keys_current",
    server_keys.c.purpose,
    unique=True,
    sqlite_where=text("retired_at IS NULL"),
    postgresql_where=text("retired_at IS NULL"),
)

publishers = Table(
    "publishers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("disabled_at", BigInteger, nullable=True),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("publisher_id", Text, ForeignKey("publishers.id"), nullable=False),
    _blob("secret_hash", 32),
    Column("label", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

models = Table(
    "models",
    metadata,
    Column("id", Text, primary_key=True),
    Column("publisher_id", Text, ForeignKey("publishers.id"), nullable=False),
    Column("name", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("publisher_id", "name"),
)

model_keys = Table(
    "model_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Text, ForeignKey("models.id"), nullable=False),
    _blob("key_commitment", 32, unique=True),
    _blob("salt", 32),
    Column("kek_id", Text, nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revoke_reason", Text, nullable=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("chain", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, CheckConstraint("seq >= 1"), primary_key=True, autoincrement=False),
    Column("ts_us", BigInteger, nullable=False),
    Column("event", Text, nullable=False),
    Column("outcome", Text, CheckConstraint("outcome IN ('ok', 'denied')"), nullable=False),
    Column("code", Text, nullable=True),
    Column("publisher_id", Text, nullable=True),
    Column("actor", Text, nullable=True),
    Column("licence_id", Text, nullable=True),
    Column("device_id", Text, nullable=True),
    Column("model_id", Text, nullable=True),
    Column("grant_id", Text, nullable=True),
    Column("detail", Text, nullable=False),
    _blob("prev_hash", 32),
    _blob("hash", 32, unique=True),
)
Index("ix_audit_log_publisher", audit_log.c.publisher_id, audit_log.c.chain, audit_log.c.seq)

audit_heads = Table(
    "audit_heads",
    metadata,
    Column("chain", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    _blob("hash", 32),
)


# --- S2: licences, devices, limits (migration 0002) -------------------------------------------

licences = Table(
    "licences",
    metadata,
    Column("id", Text, primary_key=True),
    Column("publisher_id", Text, ForeignKey("publishers.id"), nullable=False),
    _blob("secret_hash", 32),
    Column("label", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("max_devices", Integer, CheckConstraint("max_devices BETWEEN 1 AND 1000000"), nullable=False),
    Column("opens_per_day", Integer, CheckConstraint("opens_per_day >= 1"), nullable=True),
    Column("offline_grace_s", Integer, CheckConstraint("offline_grace_s BETWEEN 0 AND 31536000"), nullable=False),
    Column("recheck_interval_s", Integer, CheckConstraint("recheck_interval_s BETWEEN 60 AND 2592000"), nullable=False),
    Column("grant_ttl_s", Integer, CheckConstraint("grant_ttl_s BETWEEN 60 AND 31536000"), nullable=False),
    Column("active_devices", Integer, nullable=False, server_default=text("0")),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revoke_reason", Text, nullable=True),
    CheckConstraint("recheck_interval_s <= grant_ttl_s", name="ck_licences_recheck_le_ttl"),
    CheckConstraint("active_devices BETWEEN 0 AND max_devices", name="ck_licences_active_devices"),
)
Index("ix_licences_publisher", licences.c.publisher_id, licences.c.id)

licence_models = Table(
    "licence_models",
    metadata,
    Column("licence_id", Text, ForeignKey("licences.id"), primary_key=True),
    Column("model_id", Text, ForeignKey("models.id"), primary_key=True),
)
Index("ix_licence_models_model", licence_models.c.model_id)

devices = Table(
    "devices",
    metadata,
    Column("id", Text, primary_key=True),
    Column("licence_id", Text, ForeignKey("licences.id"), nullable=False),
    _blob("x25519_pk", 32),
    _blob("ed25519_pk", 32),
    _blob("fingerprint_hash", 32),
    Column("label", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("last_request_us", BigInteger, nullable=False, server_default=text("0")),
    Column("last_seen_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revoke_reason", Text, nullable=True),
    UniqueConstraint("licence_id", "x25519_pk"),
    UniqueConstraint("licence_id", "ed25519_pk"),
)

usage_days = Table(
    "usage_days",
    metadata,
    Column("licence_id", Text, ForeignKey("licences.id"), primary_key=True),
    Column("day", Integer, primary_key=True, autoincrement=False),
    Column("grants", Integer, CheckConstraint("grants >= 0"), nullable=False),
)

rate_windows = Table(
    "rate_windows",
    metadata,
    Column("scope", Text, primary_key=True),
    _blob("key", 32, pk=True),
    Column("window_start", BigInteger, primary_key=True, autoincrement=False),
    Column("count", Integer, CheckConstraint("count >= 0"), nullable=False),
)

maintenance = Table(
    "maintenance",
    metadata,
    Column("task", Text, primary_key=True),
    Column("last_run_at", BigInteger, nullable=False),
)

grant_tokens = Table(
    "grant_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    _blob("secret_hash", 32),
    Column("publisher_id", Text, ForeignKey("publishers.id"), nullable=False),
    Column("licence_id", Text, ForeignKey("licences.id"), nullable=False),
    Column("model_id", Text, ForeignKey("models.id"), nullable=False),
    _blob("key_commitment", 32, nullable=True),
    Column("device_id", Text, ForeignKey("devices.id"), nullable=True),
    Column("grant_ttl_s", Integer, CheckConstraint("grant_ttl_s BETWEEN 60 AND 2592000"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("redeemed_at", BigInteger, nullable=True),
    Column("redeemed_grant_id", Text, nullable=True, unique=True),
    CheckConstraint("(redeemed_at IS NULL) = (redeemed_grant_id IS NULL)", name="ck_grant_tokens_redeemed"),
)
Index("ix_grant_tokens_licence", grant_tokens.c.licence_id)

offline_requests = Table(
    "offline_requests",
    metadata,
    _blob("request_hash", 32, pk=True),
    Column("device_id", Text, ForeignKey("devices.id"), nullable=True),
    Column("processed_at", BigInteger, nullable=False),
)
