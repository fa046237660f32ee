"""S4 one-time grant tokens and air-gapped requests: grant_tokens, offline_requests.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _blob(name: str, n: int, *, nullable: bool = False, primary_key: bool = False) -> sa.Column[bytes]:
    check = sa.CheckConstraint(f"length({name}) = {n}")
    return sa.Column(name, sa.LargeBinary, check, nullable=nullable, primary_key=primary_key)


def upgrade() -> None:
    op.create_table(
        "grant_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        _blob("secret_hash", 32),
        sa.Column("publisher_id", sa.Text, sa.ForeignKey("publishers.id"), nullable=False),
        sa.Column("licence_id", sa.Text, sa.ForeignKey("licences.id"), nullable=False),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id"), nullable=False),
        _blob("key_commitment", 32, nullable=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), nullable=True),
        sa.Column("grant_ttl_s", sa.Integer, sa.CheckConstraint("grant_ttl_s BETWEEN 60 AND 2592000"), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("redeemed_at", sa.BigInteger, nullable=True),
        sa.Column("redeemed_grant_id", sa.Text, nullable=True, unique=True),
        # Redeemed means both set (spec §5.2): a token is redeemed with its grant recorded, or not at all.
        sa.CheckConstraint("(redeemed_at IS NULL) = (redeemed_grant_id IS NULL)", name="ck_grant_tokens_redeemed"),
    )
    op.create_index("ix_grant_tokens_licence", "grant_tokens", ["licence_id"])
    op.create_table(
        "offline_requests",
        _blob("request_hash", 32, primary_key=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), nullable=True),
        sa.Column("processed_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("offline_requests")
    op.drop_index("ix_grant_tokens_licence", "grant_tokens")
    op.drop_table("grant_tokens")
