"""Anonymous in-memory files: a place to decrypt a model that runtimes can map like a file.

On Linux a ``memfd`` is a file that lives only in memory (no directory entry, no
disk blocks, gone when the last descriptor and mapping close). Decrypting into it
lets runtimes that ``mmap`` their inputs (``torch.load(mmap=True)``, safetensors'
``safe_open``) use the decrypted pages in place, with no copy and no plaintext on
disk. It is filled with ``pwrite`` (see ``SealedModel._decrypt_to_fd``), then
sealed (``F_SEAL_WRITE``) so nothing can change the bytes a runtime was handed.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import ModelSealError

__all__ = ["MemFile", "memfd_supported"]


def memfd_supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


class MemFile:
    """An anonymous file, filled once through its descriptor, then sealed read-only."""

    def __init__(self, name: str) -> None:
        if not memfd_supported():
            raise ModelSealError("in-memory files need Linux memfd_create; this platform has none")
        self.fd = os.memfd_create(name[:200] or "modelseal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)

    def seal(self) -> None:
        """Forbid any further change to the contents (and to the size)."""
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)

    @property
    def path(self) -> str:
        """A path any library can ``open``; valid in this process while the file is open."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        """Release our handle; mappings a runtime still holds keep the pages alive until it drops them."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
