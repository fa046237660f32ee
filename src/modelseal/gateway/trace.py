"""Traceable answers (docs/spec/gateway-v1.md §7): a keyed, deterministic few answers per API key.

For an API key K and an input x, ``HMAC-SHA256(secret, key_id || shape || float32 bytes of x)``
decides whether the answer is altered (its first 8 bytes, as a fraction of 2**64, below ``rate``)
and to which class (the next 4 bytes pick one of the other K-1 classes). The same key and input
always get the same answer, so a model distilled through K reproduces K's alterations on the inputs
K sent, while a model that never saw K's answers matches an altered label with probability at most
1/(K-1), whatever it is: that bound is the null the ownership verifier tests against.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

__all__ = ["Tracer"]


class Tracer:
    """Alters a keyed fraction ``rate`` of answers, deterministically per (API key, input)."""

    def __init__(self, secret: bytes, *, rate: float = 0.005) -> None:
        if len(secret) < 16:
            raise ValueError("the trace secret must be at least 16 bytes")
        if not 0 <= rate < 1:
            raise ValueError("rate must be in [0, 1)")
        self._secret = bytes(secret)
        self.rate = rate
        self._threshold = int(rate * 2**64)

    def _digest(self, key_id: str, row: np.ndarray) -> bytes:
        x = np.ascontiguousarray(row, dtype="<f4")
        message = key_id.encode("utf-8") + b"\x00" + struct.pack("<I", x.ndim) + struct.pack(f"<{x.ndim}I", *x.shape)
        return hmac.new(self._secret, message + x.tobytes(), hashlib.sha256).digest()

    def plan(self, key_id: str, x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """For each row of ``x``: the label to answer instead of ``labels[i]``, or -1 to leave it."""
        if num_classes < 2:
            raise ValueError("tracing needs at least two classes")
        out = np.full(len(x), -1, dtype=np.int64)
        for i in range(len(x)):
            digest = self._digest(key_id, x[i])
            if int.from_bytes(digest[:8], "little") >= self._threshold:
                continue
            shift = int.from_bytes(digest[8:12], "little") % (num_classes - 1)
            out[i] = shift + (shift >= labels[i])  # one of the other classes
        return out

    def apply(self, key_id: str, x: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores with the planned rows altered, and the mask of altered rows.

        An altered row swaps the scores of its top class and its planned class, so the planned class
        wins and the row's set of values (what rounding or top-k policies see) is unchanged.
        """
        scores = np.array(scores, dtype=np.float64, copy=True)
        labels = scores.argmax(axis=1)
        plan = self.plan(key_id, x, labels, scores.shape[1])
        rows = np.flatnonzero(plan >= 0)
        top, target = labels[rows], plan[rows]
        scores[rows, top], scores[rows, target] = scores[rows, target], scores[rows, top].copy()
        return scores, plan >= 0
