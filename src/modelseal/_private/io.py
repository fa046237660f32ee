"""Reading a container (single file or shard set) by offset, and writing one atomically."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from types import TracebackType

from ..errors import FormatError
from .sink import FileSink

_SHARD = re.compile(r"(?P<base>.+)-shard(?P<i>[1-9][0-9]*)of(?P<n>[1-9][0-9]*)")
MAX_SHARDS = 10_000
MIN_SHARD_SIZE = 4096


def shard_name(base: Path, index: int, count: int) -> Path:
    return base.with_name(f"{base.name}-shard{index}of{count}")


def resolve(path: str | os.PathLike[str]) -> list[Path]:
    """The file(s) a container path names: itself, or every shard of its shard set, in order."""
    path = Path(path)
    m = _SHARD.fullmatch(path.name)
    if path.is_file() and not m:
        return [path]
    base = path.with_name(m.group("base")) if m else path
    pattern = re.compile(re.escape(base.name) + r"-shard([1-9][0-9]*)of([1-9][0-9]*)")
    found: dict[int, tuple[int, Path]] = {}
    counts: set[int] = set()
    try:
        siblings = list(base.parent.iterdir())
    except FileNotFoundError:
        siblings = []
    for p in siblings:
        sm = pattern.fullmatch(p.name)
        if sm:
            i, n = int(sm.group(1)), int(sm.group(2))
            counts.add(n)
            found[i] = (n, p)
    if not found:
        raise FileNotFoundError(f"no such container: {path}")
    if len(counts) != 1:
        raise FormatError("shard-set", f"shards of {base.name} disagree on the shard count {sorted(counts)}")
    (count,) = counts
    if count > MAX_SHARDS:
        raise FormatError("shard-set", f"more than {MAX_SHARDS} shards")
    missing = [i for i in range(1, count + 1) if i not in found]
    if missing:
        raise FormatError("shard-set", f"{base.name} is missing shard(s) {missing[:10]} of {count}")
    if len(found) != count:
        raise FormatError("shard-set", f"{base.name} has shards numbered beyond {count}")
    return [found[i][1] for i in range(1, count + 1)]


class Source:
    """Random access to the bytes of a container, across its shards."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.paths = resolve(path)
        self._fds: list[int] = []
        self._starts: list[int] = []
        total = 0
        try:
            for p in self.paths:
                fd = os.open(p, os.O_RDONLY)
                self._fds.append(fd)
                self._starts.append(total)
                total += os.fstat(fd).st_size
        except BaseException:
            self.close()
            raise
        self.size = total

    def readinto_at(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset``; a short read is a truncated container."""
        want = len(view)
        done = 0
        k = 0
        while k + 1 < len(self._starts) and self._starts[k + 1] <= offset:
            k += 1
        while done < want:
            if k >= len(self._fds):
                raise FormatError("truncated", "container ends before its payload does")
            local = offset + done - self._starts[k]
            n = os.preadv(self._fds[k], [view[done:]], local)
            if n == 0:
                k += 1
                continue
            done += n
        return None

    def read_at(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto_at(offset, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AtomicOutput:
    """Write a container (or its shards) under temporary names; rename only on success.

    Nothing is left behind if writing fails: ``abort`` (or leaving the ``with``
    block on an exception) removes every temporary file.
    """

    def __init__(self, dst: str | os.PathLike[str], total_size: int, shard_size: int | None = None) -> None:
        self.dst = Path(dst)
        if shard_size is None or shard_size >= total_size:
            self.finals = [self.dst]
            self._limits = [total_size]
        else:
            if shard_size < MIN_SHARD_SIZE:
                raise ValueError(f"shard_size must be at least {MIN_SHARD_SIZE} bytes")
            count = -(-total_size // shard_size)
            if count > MAX_SHARDS:
                raise ValueError(f"shard_size {shard_size} would make more than {MAX_SHARDS} shards")
            self.finals = [shard_name(self.dst, i, count) for i in range(1, count + 1)]
            self._limits = [shard_size] * (count - 1) + [total_size - shard_size * (count - 1)]
        tag = secrets.token_hex(6)
        self._temps = [p.with_name(f".{p.name}.{tag}.tmp") for p in self.finals]
        self._k = 0
        self._left = self._limits[0]
        self._fh = FileSink(self._temps[0], self._limits[0])
        self._opened = 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            if self._left == 0:
                self._fh.close()
                self._k += 1
                self._fh = FileSink(self._temps[self._k], self._limits[self._k])
                self._opened += 1
                self._left = self._limits[self._k]
            n = min(self._left, len(view))
            self._fh.write(view[:n])
            self._left -= n
            view = view[n:]

    def commit(self) -> list[Path]:
        if self._k != len(self._temps) - 1 or self._left != 0:
            self.abort()
            raise RuntimeError("container size differs from its layout (internal error)")
        # No fsync, like cp or age: an interrupted write is caught as truncation on open.
        self._fh.close()
        for tmp, final in zip(self._temps, self.finals, strict=False):
            os.replace(tmp, final)
        # An older copy split differently (or not at all) would shadow or confuse the new one.
        keep = set(self.finals)
        stale = re.compile(re.escape(self.dst.name) + r"(-shard[1-9][0-9]*of[1-9][0-9]*)?")
        for p in self.dst.parent.iterdir():
            if stale.fullmatch(p.name) and p not in keep:
                p.unlink()
        return self.finals

    def abort(self) -> None:
        self._fh.abort()
        for tmp in self._temps[: self._opened]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
