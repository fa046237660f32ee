"""A throwaway PostgreSQL cluster from the Debian package, for the key server's tests and its
benchmark (spec §17.2): initdb and pg_ctl as the ``postgres`` user, on a unix socket."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

PG_PASSWORD = "not-a-default-9f2c"  # trust auth ignores it; the settings check wants a non-default one


def pgbin() -> Path | None:
    """The newest installed PostgreSQL binaries, or None."""
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

    def pid(self) -> int:
        """The postmaster's process id (while running)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])
