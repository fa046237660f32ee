"""Gateway v1: API keys and the records of traced (altered) answers.

Revision ID: g0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "g0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("tier", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.LargeBinary, sa.CheckConstraint("length(secret_hash) = 32"), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "gateway_traces",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("served", sa.Integer, nullable=False),
        sa.Column("original", sa.Integer, nullable=False),
    )
    op.create_index("gateway_traces_key", "gateway_traces", ["key_id", "seq"])


def downgrade() -> None:
    op.drop_index("gateway_traces_key", "gateway_traces")
    op.drop_table("gateway_traces")
    op.drop_table("gateway_keys")
