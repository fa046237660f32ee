"""Key server fixtures: a real SQLite file and a real PostgreSQL server (spec §17.2), never mocks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from modelseal.keyserver.app import create_app
from modelseal.keyserver.bootstrap import open_keyserver
from modelseal.keyserver.crypto import LocalKey
from modelseal.keyserver.services import Admin, KeyServer
from modelseal.keyserver.settings import Settings

from .pgharness import PostgresServer, pgbin


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    found = pgbin()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries not found (make sysdeps installs them)")
        pytest.skip("PostgreSQL binaries not found; run `make sysdeps`")
    # Not under pytest's 0700 root-owned tmp tree: the postgres user must reach its directory.
    root = Path(tempfile.mkdtemp(prefix="modelseal-pg-"))
    server = PostgresServer(root, found)
    try:
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'keyserver.db'}"
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.fresh_database()


@pytest.fixture
def master_key_text() -> str:
    return LocalKey.generate()[1]


@pytest.fixture
def settings(tmp_path: Path, database_url: str, master_key_text: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        master_key=master_key_text,  # type: ignore[arg-type]
        public_url="https://keys.example.com",
    )


@pytest.fixture
def keyserver(settings: Settings) -> Iterator[KeyServer]:
    server = open_keyserver(settings)
    yield server
    server.db.dispose()


@pytest.fixture
def admin_token(settings: Settings, keyserver: KeyServer) -> str:
    """The bootstrap token that the first start wrote for publisher ``default``."""
    return (settings.data_dir / "admin-token").read_text().strip()


@pytest.fixture
def admin(keyserver: KeyServer, admin_token: str) -> Admin:
    return keyserver.authenticate_admin(admin_token)


@pytest.fixture
def client(settings: Settings, keyserver: KeyServer, admin_token: str) -> Iterator[TestClient]:
    app = create_app(settings, keyserver=keyserver)
    with TestClient(app, raise_server_exceptions=True) as c:
        c.headers["Authorization"] = f"Bearer {admin_token}"
        yield c
