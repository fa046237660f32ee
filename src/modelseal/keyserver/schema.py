"""The S1 tables (spec §5.2) as SQLAlchemy Core metadata.

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
