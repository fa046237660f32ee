"""Anonymous in-memory files: a place to decrypt a model that runtimes can map like a file.

On Linux a ``memfd`` is a file that lives only in memory (no directory entry, no
disk blocks, gone when the last descriptor and mapping close). Decrypting into it
lets runtimes that ``mmap`` their inputs (``torch.load(mmap=True)``, safetensors'
``safe_open``) use the decrypted pages in place, with no copy and no plaintext on
disk. Once written, the memfd is sealed read-only (``F_SEAL_WRITE``) so nothing
can change the bytes a runtime has already been handed.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from ..errors import ModelSealError

__all__ = ["MemFile", "memfd_supported"]


def memfd_supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


class MemFile:
    """A sealed, read-only anonymous file of exactly ``size`` bytes."""

    def __init__(self, name: str, size: int) -> None:
        if not memfd_supported():
            raise ModelSealError("in-memory files need Linux memfd_create; this platform has none")
        self.size = size
        self.fd = os.memfd_create(name[:200] or "modelseal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, size) if size else None
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def view(self) -> memoryview:
        """Writable view of the file's bytes (until :meth:`seal`)."""
        if self._map is None:
            return memoryview(bytearray(0))
        return memoryview(self._map)

    def seal(self) -> None:
        """Drop the writable mapping and forbid any further change to the contents."""
        if self._map is not None:
            self._map.close()
            self._map = None
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)

    @property
    def path(self) -> str:
        """A path any library can ``open``; valid in this process while the file is open."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        """Release our handle; mappings a runtime still holds keep the pages alive until it drops them."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
