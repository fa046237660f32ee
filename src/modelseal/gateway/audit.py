"""The gateway's audit log (docs/spec/gateway-v1.md §8): who asked how much, and what the monitor
concluded — JSON lines, hashed inputs only, bounded on disk.

Requests only put a record on a queue; one background thread per process writes. Several worker
processes may share one log: lines are appended with ``O_APPEND`` (one ``write`` per batch of whole
lines), and rotation happens under an ``flock`` on ``PATH.lock``; a writer whose file was rotated
away by another process notices (the inode changed) and reopens. The disk used stays under
``(backups + 1) * max_bytes`` plus one batch.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

_STOP = object()


def _encode(value: object) -> object:
    """Row digests travel as bytes (formatting them is the writer's work, not the request's)."""
    if isinstance(value, bytes):
        return value[:12].hex()
    raise TypeError(f"cannot write {type(value).__name__} to the audit log")


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = 16 * 2**20, backups: int = 4, max_queue: int = 100_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes, self.backups = max_bytes, backups
        self.dropped = 0  # records refused because the queue was full (the writer cannot keep up)
        self._queue: queue.Queue[object] = queue.Queue(max_queue)
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gateway-audit", daemon=True)
                self._thread.start()

    def write(self, event: str, **fields: Any) -> None:
        """Queue one record (never blocks the request; counts a drop if the queue is full)."""
        record = {"t": round(time.time(), 3), "event": event, **fields}
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            time.sleep(0.05)  # gather a burst: one wake-up and one write per burst, not per record
            items = [item]
            while len(items) < 5000:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is _STOP for i in items)
            lines = "".join(
                json.dumps(i, separators=(",", ":"), default=_encode) + "\n" for i in items if i is not _STOP
            )
            try:
                if lines:
                    self._append(lines.encode("utf-8"))
            except OSError:
                self.dropped += len(items) - stop
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                return

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, data: bytes) -> None:
        if self._fd < 0 or not self._same_file():
            self._open()
        if os.fstat(self._fd).st_size + len(data) > self.max_bytes:
            self._rotate()
        os.write(self._fd, data)

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def _rotate(self) -> None:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._same_file() and os.fstat(self._fd).st_size > 0:  # nobody rotated it meanwhile
                    if self.backups == 0:
                        os.truncate(self.path, 0)
                    else:
                        for n in range(self.backups - 1, 0, -1):
                            src = self.path.with_name(f"{self.path.name}.{n}")
                            if src.exists():
                                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
                        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
                self._open()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
