"""One request's rows as the gateway's policies, tracer, monitor and audit see them."""

from __future__ import annotations

import hashlib
import hmac
import struct
from functools import cached_property

import numpy as np


class Batch:
    """The rows one API key sent in one request.

    ``digests`` are SHA-256 over each row's shape and little-endian float32 bytes, computed once per
    request: the tracer and the keyed noise take an HMAC over (key id, digest), and the audit log
    records a prefix of them instead of the data.
    """

    __slots__ = ("__dict__", "_keyed", "key_id", "x")

    def __init__(self, key_id: str, x: np.ndarray) -> None:
        self.key_id = key_id
        self.x = x
        self._keyed: dict[bytes, list[bytes]] = {}

    def keyed(self, secret: bytes) -> list[bytes]:
        """``HMAC-SHA256(secret, key_id || 0x00 || digest)`` per row, computed once per secret: the
        tracer reads bytes 0-12 and the keyed noise bytes 16-24 of the same MAC."""
        out = self._keyed.get(secret)
        if out is None:
            prefix = self.key_id.encode("utf-8") + b"\x00"
            out = self._keyed[secret] = [hmac.digest(secret, prefix + d, "sha256") for d in self.digests]
        return out

    def __len__(self) -> int:
        return len(self.x)

    @cached_property
    def digests(self) -> list[bytes]:
        rows = np.ascontiguousarray(self.x, dtype="<f4")
        shape = rows.shape[1:]
        prefix = struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
        return [hashlib.sha256(prefix + row.tobytes()).digest() for row in rows]
