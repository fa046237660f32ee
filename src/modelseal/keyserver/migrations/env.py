"""Alembic environment: always run on a connection handed in by ``repository.migrate``."""

from __future__ import annotations

from alembic import context

from modelseal.keyserver.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=False)
with context.begin_transaction():
    context.run_migrations()
