"""Key server fixtures: a real SQLite file and a real PostgreSQL server (spec §17.2), never mocks."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
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

PG_PASSWORD = "not-a-default-9f2c"  # trust auth ignores it; the settings check wants a non-default one


def _pgbin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on a unix socket; each test gets a fresh database."""

    def __init__(self, root: Path, pgbin: Path) -> None:
        self.root, self.pgbin = root, pgbin
        self.data, self.sock, self.log = root / "data", root / "sock", root / "log"
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        cmd = [str(self.pgbin / args[0]), *args[1:]]
        if self._as_postgres:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        self.sock.mkdir()
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "modelseal", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = f"-k {self.sock} -c listen_addresses='' -c max_connections=300 -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start", "-o", opts)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "stop", "-m", "fast")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://modelseal:{PG_PASSWORD}@/{database}?host={self.sock}"

    def admin_sql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host={self.sock} user=modelseal dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def fresh_database(self) -> str:
        name = f"ks_test_{next(self._names)}"
        self.admin_sql(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    pgbin = _pgbin()
    if pgbin is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries not found (make sysdeps installs them)")
        pytest.skip("PostgreSQL binaries not found; run `make sysdeps`")
    # Not under pytest's 0700 root-owned tmp tree: the postgres user must reach its directory.
    root = Path(tempfile.mkdtemp(prefix="modelseal-pg-"))
    server = PostgresServer(root, pgbin)
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
