"""Sequential file output that skips the page cache for large files (O_DIRECT), when it can.

Writing a multi-GiB container through the page cache makes the kernel allocate and
dirty a page for every 4 KiB before writeback; on some machines (VMs that return
free memory to their host, for instance) that costs several times the disk's own
speed. A sealed model is written once and rarely read back at once, so streaming it
with O_DIRECT from a page-aligned staging buffer is both faster and kinder to the
cache. File systems that refuse O_DIRECT (tmpfs, some network file systems) get
ordinary buffered writes; ``MODELSEAL_DIRECT_IO=0`` turns it off everywhere.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from .pipeline import Stage

_BLOCK = 4 << 20  # staging buffer; a multiple of every logical block size in use
_DIRECT = getattr(os, "O_DIRECT", 0)


def _direct_enabled() -> bool:
    return bool(_DIRECT) and os.environ.get("MODELSEAL_DIRECT_IO", "1") != "0"


class FileSink:
    """Create ``path`` (it must not exist) and write it front to back."""

    def __init__(self, path: str | os.PathLike[str], size_hint: int = 0, mode: int = 0o644) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self._direct = False
        if _direct_enabled() and size_hint >= 2 * _BLOCK:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | _DIRECT)
                self._direct = True
            except OSError:
                pass
        # Two page-aligned staging buffers (O_DIRECT needs aligned memory): one fills while a
        # writer thread hands the other to the kernel, so a blocking disk write overlaps work.
        self._bufs = [mmap.mmap(-1, _BLOCK) for _ in range(2 if size_hint >= 2 * _BLOCK else 1)]
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0
        self._view = self._views[0]
        self._fill = 0
        self._writer: Stage[memoryview, None] | None = Stage(self._flush) if len(self._bufs) > 1 else None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), _BLOCK - self._fill)
            self._view[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == _BLOCK:
                self._block_full()

    def _block_full(self) -> None:
        if self._writer is None:
            self._flush(self._view)
        else:
            self._writer.put(self._view)
            if self._writer.pending > 1:  # the other buffer's write must finish before we refill it
                self._writer.get()
            self._cur ^= 1
            self._view = self._views[self._cur]
        self._fill = 0

    def _flush(self, block: memoryview) -> None:
        done = 0
        while done < len(block):
            try:
                done += os.write(self.fd, block[done:])
            except OSError as exc:
                if not self._direct or done or exc.errno != errno.EINVAL:
                    raise
                self._buffered()  # the file system took the flag but refuses the write
        return None

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
        self._direct = False

    def close(self) -> None:
        """Write what is staged (the unaligned tail goes through the page cache) and close."""
        if self.fd < 0:
            return
        try:
            if self._writer is not None:
                while self._writer.pending:
                    self._writer.get()
            if self._fill:
                if self._direct:
                    self._buffered()
                self._flush(self._view[: self._fill])
                self._fill = 0
        finally:
            if self._writer is not None:
                self._writer.close()
            for view, buf in zip(self._views, self._bufs, strict=True):
                view.release()
                buf.close()
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Close without writing what is staged (a write already in flight may still land)."""
        self._fill = 0
        if self._writer is not None:
            self._writer.close()  # drops results, including errors
            self._writer = None
        self.close()
