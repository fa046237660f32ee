"""A one-thread pipeline stage, so hashing and I/O overlap with AES on the other core.

``cryptography``'s AES-GCM calls hold the GIL; BLAKE3, ``pwrite`` and ``preadv``
release it. A worker thread that hashes (and writes) chunk k while the caller
reads and encrypts chunk k+1 keeps both cores busy, provided the caller lets the
worker take the GIL between its C calls: :func:`yield_gil` after each AES call
(without it the worker waits up to the 5 ms switch interval for every chunk).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


def yield_gil() -> None:
    time.sleep(0)


class Stage(Generic[T, R]):
    """Runs ``fn`` on each item put, in order, on its own thread; ``get`` returns results in order."""

    def __init__(self, fn: Callable[[T], R]) -> None:
        self._fn = fn
        self._in: SimpleQueue[object] = SimpleQueue()
        self._out: SimpleQueue[tuple[bool, object]] = SimpleQueue()
        self.pending = 0
        self._thread = threading.Thread(target=self._run, name="modelseal-stage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._in.get()) is not _STOP:
            try:
                self._out.put((True, self._fn(item)))  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the caller by get()
                self._out.put((False, exc))

    def put(self, item: T) -> None:
        self._in.put(item)
        self.pending += 1

    def get(self) -> R:
        ok, value = self._out.get()
        self.pending -= 1
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """Wait for the items in flight (their results are dropped) and stop the thread."""
        self._in.put(_STOP)
        self._thread.join()

    def __enter__(self) -> Stage[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
