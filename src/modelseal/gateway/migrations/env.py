"""Alembic environment: always run on a connection handed in by ``store.KeyStore.migrate``."""

from __future__ import annotations

from alembic import context

from modelseal.gateway.store import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table="gateway_alembic_version",  # the gateway may share a database with the key server
)
with context.begin_transaction():
    context.run_migrations()
