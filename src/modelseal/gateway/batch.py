"""One request's rows as the gateway's policies, tracer, monitor and audit see them."""

from __future__ import annotations

import hashlib
import struct
from functools import cached_property

import numpy as np


class Batch:
    """The rows one API key sent in one request.

    ``digests`` are SHA-256 over each row's shape and little-endian float32 bytes, computed once per
    request: the tracer and the keyed noise take an HMAC over (key id, digest), and the audit log
    records a prefix of them instead of the data.
    """

    __slots__ = ("__dict__", "key_id", "x")

    def __init__(self, key_id: str, x: np.ndarray) -> None:
        self.key_id = key_id
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    @cached_property
    def digests(self) -> list[bytes]:
        rows = np.ascontiguousarray(self.x, dtype="<f4")
        shape = rows.shape[1:]
        prefix = struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
        return [hashlib.sha256(prefix + row.tobytes()).digest() for row in rows]
