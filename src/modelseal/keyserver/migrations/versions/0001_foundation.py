"""S1 foundation: server secrets and keys, publishers, admin tokens, models, model keys, audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _blob(name: str, n: int, *, primary_key: bool = False, unique: bool = False) -> sa.Column[bytes]:
    check = sa.CheckConstraint(f"length({name}) = {n}")
    return sa.Column(name, sa.LargeBinary, check, nullable=False, primary_key=primary_key, unique=unique)


def _at(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger, nullable=nullable)


APPEND_ONLY = ("audit_log",)


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("kek_id", sa.Text, nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        _at("created_at"),
    )
    op.create_table(
        "server_keys",
        _blob("kid", 8, primary_key=True),
        sa.Column("purpose", sa.Text, sa.CheckConstraint("purpose IN ('signing', 'escrow')"), nullable=False),
        _blob("public_key", 32, unique=True),
        _at("created_at"),
        _at("retired_at", nullable=True),
    )
    op.create_index(
        "ux_server_keys_current",
        "server_keys",
        ["purpose"],
        unique=True,
        sqlite_where=sa.text("retired_at IS NULL"),
        postgresql_where=sa.text("retired_at IS NULL"),
    )
    op.create_table(
        "publishers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        _at("created_at"),
        _at("disabled_at", nullable=True),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("publisher_id", sa.Text, sa.ForeignKey("publishers.id"), nullable=False),
        _blob("secret_hash", 32),
        sa.Column("label", sa.Text, nullable=True),
        _at("created_at"),
        _at("revoked_at", nullable=True),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("publisher_id", sa.Text, sa.ForeignKey("publishers.id"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        _at("created_at"),
        sa.UniqueConstraint("publisher_id", "name"),
    )
    op.create_table(
        "model_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id"), nullable=False),
        _blob("key_commitment", 32, unique=True),
        _blob("salt", 32),
        sa.Column("kek_id", sa.Text, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        _at("created_at"),
        _at("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
    )
    op.create_table(
        "audit_log",
        sa.Column("chain", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, sa.CheckConstraint("seq >= 1"), primary_key=True, autoincrement=False),
        _at("ts_us"),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, sa.CheckConstraint("outcome IN ('ok', 'denied')"), nullable=False),
        *(
            sa.Column(c, sa.Text, nullable=True)
            for c in ("code", "publisher_id", "actor", "licence_id", "device_id", "model_id", "grant_id")
        ),
        sa.Column("detail", sa.Text, nullable=False),
        _blob("prev_hash", 32),
        _blob("hash", 32, unique=True),
    )
    op.create_index("ix_audit_log_publisher", "audit_log", ["publisher_id", "chain", "seq"])
    op.create_table(
        "audit_heads",
        sa.Column("chain", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        _blob("hash", 32),
    )
    op.bulk_insert(
        sa.table("audit_heads", sa.column("chain"), sa.column("seq"), sa.column("hash", sa.LargeBinary)),
        [{"chain": 0, "seq": 0, "hash": bytes(32)}],
    )
    # Append-only in the database (spec §5.2): stops mistakes and bugs; the keyed chain (§12)
    # is what detects a database owner who drops these.
    if op.get_bind().dialect.name == "sqlite":
        for table in APPEND_ONLY:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'append-only'); END"
                )
    else:
        op.execute(
            "CREATE FUNCTION modelseal_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'append-only'; END $$"
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION modelseal_append_only()"
            )


def downgrade() -> None:
    for table in ("audit_heads", "audit_log", "model_keys", "models", "admin_tokens", "publishers"):
        op.drop_table(table)
    op.drop_table("server_keys")
    op.drop_table("server_secrets")
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP FUNCTION modelseal_append_only()")
