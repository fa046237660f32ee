"""A throwaway Redis from the Debian package, for the gateway's shared quotas (spec §4): one
``redis-server`` per test session on a unix socket in a temp dir, nothing persisted. Unlike
PostgreSQL, Redis runs as root without complaint, so no user switch is needed."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_server_bin() -> Path | None:
    """The installed ``redis-server``, or None."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    return Path(found) if found else None


class RedisServer:
    """A ``redis-server`` subprocess on a unix socket (no TCP port), started and stopped by the caller."""

    def __init__(self, binary: Path, root: Path | None = None) -> None:
        # Not under pytest's tmp tree: a unix socket path must stay under ~100 bytes.
        self.binary = binary
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="modelseal-redis-")) if root is None else root
        self.sock, self.log = self.root / "redis.sock", self.root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 10.0) -> None:
        cmd = [
            str(self.binary),
            *("--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--dir", str(self.root), "--logfile", str(self.log)),
        ]
        # Output to a file, not a pipe nobody drains (a full pipe would block the server).
        with open(self.root / "redis.out", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"redis-server exited with {code}:{self._log_tail()}")
            if self.sock.exists() and self._ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {timeout} s{self._log_tail()}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        try:
            with redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _log_tail(self) -> str:
        lines: list[str] = []
        for path in (self.root / "redis.out", self.log):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()[-20:]
        return "".join("\n" + line for line in lines)

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.sock), socket_timeout=5)

    def flush(self) -> None:
        """Empty every database, so each test starts from no counters."""
        with self.client() as client:
            client.flushall()

    def stop(self) -> None:
        """Stop the server (it can be started again on the same socket)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        """Stop the server and remove its directory (if the harness made it)."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
