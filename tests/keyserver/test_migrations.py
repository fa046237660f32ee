"""Schema (spec §5): created only by migrations, matching the metadata, constraints in the database."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from modelseal.keyserver import schema
from modelseal.keyserver.repository import Database
from modelseal.keyserver.services import KeyServer


def test_migrated_schema_matches_metadata(keyserver: KeyServer) -> None:
    with keyserver.db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, schema.metadata)
    assert diff == []


def test_at_head_and_idempotent(keyserver: KeyServer) -> None:
    assert keyserver.db.current_revision() == keyserver.db.head_revision() == "0003"
    keyserver.db.migrate()  # a second run changes nothing
    assert keyserver.db.is_ready()


def test_fresh_database_is_not_ready_until_migrated(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert not db.is_ready()
        db.migrate()
        assert db.is_ready()
        with db.read() as conn:
            assert conn.execute(text("SELECT chain, seq FROM audit_heads")).all() == [(0, 0)]
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "stmt",
    [
        "INSERT INTO server_keys (kid, purpose, public_key, created_at) VALUES (:b8, 'other', :b32, 0)",
        "INSERT INTO server_keys (kid, purpose, public_key, created_at) VALUES (:b8, 'signing', :b32, 0)",
        "INSERT INTO server_keys (kid, purpose, public_key, created_at) VALUES (:b32, 'signing', :b32, 0)",
        "INSERT INTO models (id, publisher_id, name, created_at) VALUES ('mdl_x', 'pub_missing', 'n', 0)",
        "UPDATE audit_heads SET hash = :b8",
    ],
    ids=["purpose", "one-current-key", "kid-length", "foreign-key", "hash-length"],
)
def test_database_enforces_constraints(keyserver: KeyServer, stmt: str) -> None:
    with pytest.raises(IntegrityError), keyserver.db.engine.begin() as conn:
        conn.execute(text(stmt), {"b8": b"\x01" * 8, "b32": b"\x02" * 32})


@pytest.mark.parametrize("backend", ["sqlite"])  # SQLITE_BUSY is SQLite's
def test_locked_sqlite_database_gives_busy(keyserver: KeyServer) -> None:
    """A write unit that cannot get the lock is retried, then answered as Busy (503), never hangs."""
    import sqlite3

    from modelseal.keyserver.errors import Busy

    db = Database(keyserver.db.url, busy_timeout_ms=20)
    holder = sqlite3.connect(keyserver.db.engine.url.database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, outside our flock
    try:
        with pytest.raises(Busy):
            db.write(lambda conn: conn.execute(text("UPDATE audit_heads SET seq = seq")))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        db.dispose()
    assert db.write(lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1
