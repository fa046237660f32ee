"""Naming the API key a model was extracted through (docs/spec/gateway-v1.md §7).

The gateway keeps, per key, the inputs whose answers it altered and the label it served. A model
distilled through key K learned K's altered labels; a model that never saw K's answers matches an
altered label with probability at most 1/(K-1) on each distinct input, independently, because the
alteration is a keyed function of the input it cannot know. So for each key the number of matches
is dominated by Binomial(n, 1/(K-1)) under the null, and its tail is an exact p-value. Testing
several keys, each p-value is multiplied by the number of keys tested (Bonferroni), so the chance
of naming any innocent key stays at most ``alpha``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import OwnershipError, SuspectError
from .store import KeyStore, TraceRecord


@dataclass(frozen=True)
class KeyEvidence:
    key_id: str
    queries: int
    matches: int
    p_value: float
    """Bonferroni-adjusted over the keys tested."""
    error: str | None = None


@dataclass(frozen=True)
class TraceVerdict:
    suspect: str
    num_classes: int
    alpha: float
    keys: list[KeyEvidence] = field(default_factory=list)

    @property
    def named(self) -> list[str]:
        """Keys whose adjusted p-value is at most ``alpha``, most significant first."""
        hits = [k for k in self.keys if k.error is None and k.p_value <= self.alpha]
        return [k.key_id for k in sorted(hits, key=lambda k: k.p_value)]

    @property
    def decision(self) -> str:
        if self.named:
            return "named"
        return "inconclusive" if any(k.error for k in self.keys) else "not-named"

    def to_dict(self) -> dict[str, Any]:
        return {
            "suspect": self.suspect,
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "decision": self.decision,
            "named": self.named,
            "null_match_rate": 1 / (self.num_classes - 1),
            "keys": [asdict(k) for k in self.keys],
        }

    def summary(self) -> str:
        lines = [
            f"suspect {self.suspect}: {self.decision}" + (f" -> key {', '.join(self.named)}" if self.named else "")
        ]
        lines.append(
            f"  null: an independent model matches an altered label with probability <= 1/{self.num_classes - 1}"
        )
        for k in sorted(self.keys, key=lambda k: k.p_value):
            if k.error:
                lines.append(f"  key {k.key_id}: inconclusive ({k.error})")
            else:
                lines.append(
                    f"  key {k.key_id}: {k.matches}/{k.queries} altered labels reproduced, p = {k.p_value:.3g}"
                )
        return "\n".join(lines)


def _distinct(records: Iterable[TraceRecord]) -> list[TraceRecord]:
    """One record per distinct input (a repeated query is one piece of evidence, not two)."""
    seen: set[bytes] = set()
    out = []
    for r in records:
        digest = hashlib.sha256(np.ascontiguousarray(r.input, dtype="<f4").tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            out.append(r)
    return out


def trace_suspect(
    store: KeyStore,
    suspect: Any,
    *,
    num_classes: int | None = None,
    keys: list[str] | None = None,
    alpha: float = 1e-6,
    max_per_key: int = 500,
    min_records: int = 1,
) -> TraceVerdict:
    """Test ``suspect`` (an :class:`~modelseal.ownership.Suspect`) against each key's altered answers.

    ``num_classes`` defaults to the number the gateway recorded when it served the model; a
    different number is refused (overstating it would make innocent keys look guilty).

    Raises:
        OwnershipError: the number of classes is unknown or contradicts the record; fewer than three
            classes (an altered label is then the only other class, and
            reproducing it proves nothing), or ``alpha`` out of range.
    """
    from ..ownership.stats import binomial_tail

    recorded = store.meta("num_classes")
    if num_classes is None:
        if recorded is None:
            raise OwnershipError("the number of classes is not recorded here: give it (--num-classes)")
        num_classes = int(recorded)
    elif recorded is not None and int(recorded) != num_classes:
        # overstating K shrinks the null 1/(K-1) and could name innocent keys: refuse, do not guess
        raise OwnershipError(f"the gateway served a model with {recorded} classes, not {num_classes}")
    if num_classes < 3:
        raise OwnershipError("tracing needs at least three classes: with two, the altered label is the only other one")
    if not 0 < alpha < 1:
        raise OwnershipError("alpha must be in (0, 1)")
    counts = store.traced_keys()
    tested = [k for k in (keys if keys is not None else sorted(counts)) if counts.get(k, 0) >= min_records]
    verdict = TraceVerdict(getattr(suspect, "name", repr(suspect)), num_classes, alpha)
    null = 1 / (num_classes - 1)
    for key_id in tested:
        records = _distinct(store.traces(key_id))[-max_per_key:]
        x = np.stack([r.input for r in records]).astype(np.float32)
        served = np.array([r.served for r in records])
        try:
            labels = np.asarray(suspect.predict(x))
        except SuspectError as exc:
            verdict.keys.append(KeyEvidence(key_id, len(records), 0, 1.0, error=str(exc)))
            continue
        matches = int((labels == served).sum())
        p = min(1.0, binomial_tail(matches, len(records), null) * len(tested))
        verdict.keys.append(KeyEvidence(key_id, len(records), matches, p))
    return verdict
