"""Traceable answers (docs/spec/gateway-v1.md §7): a keyed, deterministic few answers per API key.

For an API key K and an input row x with digest d (:attr:`~.batch.Batch.digests`), the row's
MAC ``HMAC-SHA256(secret, key_id || 0x00 || d)`` (:meth:`~.batch.Batch.keyed`) decides whether
the answer is altered (its first 8 bytes, as a fraction of 2**64, below ``rate``) and to which
class (the next 4 bytes pick one of the other K-1 classes). The same key and input always get the
same answer, so a model distilled through K reproduces K's alterations on the inputs K sent, while
a model that never saw K's answers matches an altered label with probability at most 1/(K-1),
whatever it is: that bound is the null the verifier (:mod:`.tracing`) tests against.

The same construction at a high rate, under its own secret, is the misinformation a tier can serve a
key the extraction monitor flagged (``on_alert = "misinform"``, spec §6): every misinformed answer is
a keyed wrong label, recorded like a traced one, so a model distilled from them names the key too.
"""

from __future__ import annotations

import numpy as np

from .batch import Batch

__all__ = ["Tracer"]


class Tracer:
    """Alters a keyed fraction ``rate`` of answers, deterministically per (API key, input)."""

    def __init__(self, secret: bytes, *, rate: float = 0.01) -> None:
        if len(secret) < 16:
            raise ValueError("the trace secret must be at least 16 bytes")
        if not 0 <= rate <= 1:
            raise ValueError("rate must be in [0, 1]")
        self._secret = bytes(secret)
        self.rate = rate
        self._threshold = 2**64 if rate == 1 else int(rate * 2**64)

    def plan(self, batch: Batch, labels: np.ndarray, num_classes: int, *, skip: np.ndarray | None = None) -> np.ndarray:
        """For each row: the label to answer instead of ``labels[i]``, or -1 to leave it (always -1
        where ``skip`` is true)."""
        if num_classes < 2:
            raise ValueError("tracing needs at least two classes")
        out = np.full(len(batch), -1, dtype=np.int64)
        if self._threshold == 0:
            return out
        for i, digest in enumerate(batch.keyed(self._secret)):
            if int.from_bytes(digest[:8], "little") >= self._threshold or (skip is not None and skip[i]):
                continue
            shift = int.from_bytes(digest[8:12], "little") % (num_classes - 1)
            out[i] = shift + (shift >= labels[i])  # one of the other classes
        return out

    def apply(
        self, batch: Batch, scores: np.ndarray, *, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores with the planned rows altered, and the planned labels (-1 where unaltered; rows
        where ``skip`` is true are left as they are).

        An altered row swaps the scores of its top class and its planned class, so the planned class
        wins and the row's set of values (what rounding or top-k policies see) is unchanged.
        """
        labels = scores.argmax(axis=1)
        plan = self.plan(batch, labels, scores.shape[1], skip=skip)
        rows = np.flatnonzero(plan >= 0)
        if len(rows) == 0:
            return scores, plan
        scores = np.array(scores, dtype=np.float64, copy=True)
        top, target = labels[rows], plan[rows]
        scores[rows, top], scores[rows, target] = scores[rows, target], scores[rows, top].copy()
        return scores, plan
