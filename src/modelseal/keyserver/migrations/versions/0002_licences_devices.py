"""S2 licences and devices: licences, licence_models, devices, usage_days, rate_windows, maintenance.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _blob(name: str, n: int, *, primary_key: bool = False) -> sa.Column[bytes]:
    check = sa.CheckConstraint(f"length({name}) = {n}")
    return sa.Column(name, sa.LargeBinary, check, nullable=False, primary_key=primary_key)


def _at(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger, nullable=nullable)


def _int(name: str, check: str, *, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, sa.CheckConstraint(check), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "licences",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("publisher_id", sa.Text, sa.ForeignKey("publishers.id"), nullable=False),
        _blob("secret_hash", 32),
        sa.Column("label", sa.Text, nullable=True),
        _at("created_at"),
        _at("expires_at", nullable=True),
        _int("max_devices", "max_devices BETWEEN 1 AND 1000000"),
        _int("opens_per_day", "opens_per_day >= 1", nullable=True),
        _int("offline_grace_s", "offline_grace_s BETWEEN 0 AND 31536000"),
        _int("recheck_interval_s", "recheck_interval_s BETWEEN 60 AND 2592000"),
        _int("grant_ttl_s", "grant_ttl_s BETWEEN 60 AND 31536000"),
        sa.Column("active_devices", sa.Integer, nullable=False, server_default=sa.text("0")),
        _at("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
        sa.CheckConstraint("recheck_interval_s <= grant_ttl_s", name="ck_licences_recheck_le_ttl"),
        # The device limit, enforced by the database (spec §5.3): the conditional counter update is
        # the mechanism, this CHECK the backstop.
        sa.CheckConstraint("active_devices BETWEEN 0 AND max_devices", name="ck_licences_active_devices"),
    )
    op.create_index("ix_licences_publisher", "licences", ["publisher_id", "id"])
    op.create_table(
        "licence_models",
        sa.Column("licence_id", sa.Text, sa.ForeignKey("licences.id"), primary_key=True),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id"), primary_key=True),
    )
    op.create_index("ix_licence_models_model", "licence_models", ["model_id"])
    op.create_table(
        "devices",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("licence_id", sa.Text, sa.ForeignKey("licences.id"), nullable=False),
        _blob("x25519_pk", 32),
        _blob("ed25519_pk", 32),
        _blob("fingerprint_hash", 32),
        sa.Column("label", sa.Text, nullable=True),
        _at("created_at"),
        sa.Column("last_request_us", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        _at("last_seen_at", nullable=True),
        _at("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
        # Revoked rows included: a revoked key can never register again under the licence.
        sa.UniqueConstraint("licence_id", "x25519_pk"),
        sa.UniqueConstraint("licence_id", "ed25519_pk"),
    )
    op.create_table(
        "usage_days",
        sa.Column("licence_id", sa.Text, sa.ForeignKey("licences.id"), primary_key=True),
        sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),
        _int("grants", "grants >= 0"),
    )
    op.create_table(
        "rate_windows",
        sa.Column("scope", sa.Text, primary_key=True),
        _blob("key", 32, primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
        _int("count", "count >= 0"),
    )
    op.create_table(
        "maintenance",
        sa.Column("task", sa.Text, primary_key=True),
        _at("last_run_at"),
    )


def downgrade() -> None:
    for table in ("maintenance", "rate_windows", "usage_days", "devices", "licence_models", "licences"):
        op.drop_table(table)
