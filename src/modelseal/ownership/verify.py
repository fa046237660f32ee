"""Querying a suspect and deciding (spec §6-§8): verdicts, null calibrations, the sequential test."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import OwnershipError, SuspectError
from . import stats
from ._records import decode_array, encode_array, read_json, write_json
from .suspect import Suspect, as_suspect

__all__ = ["DEFAULT_ALPHA", "Look", "NullCalibration", "Verdict", "combined_p_value"]

DEFAULT_ALPHA = 1e-6
P_FLOOR = 1e-300  # tails below this underflow to 0 in double precision; report the floor instead
PROVEN, NOT_PROVEN, INCONCLUSIVE = "proven", "not-proven", "inconclusive"


@dataclass(frozen=True)
class Look:
    """The evidence at one planned look: ``p_value`` raw, ``adjusted`` divided by the look's alpha share."""

    queries: int
    matches: int
    p_value: float
    adjusted: float


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one suspect against one piece of evidence.

    ``decision`` is ``proven`` (p <= alpha), ``not-proven`` (all planned queries answered and p > alpha:
    *no evidence at this alpha*, which is not a finding that the suspect is independent), or
    ``inconclusive`` (the check could not be completed; ``reason`` says why).
    """

    kind: str
    decision: str
    p_value: float
    alpha: float
    queries: int
    matches: int
    null: str
    reason: str
    suspect: str
    commitment: str
    looks: tuple[Look, ...] = field(default=())
    empirical_p: float | None = None  # (1 + reference models matching as often) / (M + 1), when calibrated

    @property
    def proven(self) -> bool:
        return self.decision == PROVEN

    @property
    def match_rate(self) -> float:
        return self.matches / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "decision": self.decision,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "queries": self.queries,
            "matches": self.matches,
            "match_rate": self.match_rate,
            "null": self.null,
            "reason": self.reason,
            "suspect": self.suspect,
            "commitment": self.commitment,
            "looks": [look.__dict__ for look in self.looks],
            "empirical_p": self.empirical_p,
        }

    def summary(self) -> str:
        """A few readable lines for people (the JSON from :meth:`to_dict` is for tools)."""
        head = {PROVEN: "OWNERSHIP PROVEN", NOT_PROVEN: "not proven", INCONCLUSIVE: "INCONCLUSIVE"}[self.decision]
        lines = [
            f"{self.kind} check of {self.suspect}: {head}",
            f"  {self.matches} of {self.queries} answers matched ({self.match_rate:.1%}); "
            f"p = {self.p_value:.3g} (alpha {self.alpha:.0e})",
            f"  null: {self.null}",
            *(
                [f"  reference models matching as often: empirical p = {self.empirical_p:.3g} (no model assumed)"]
                if self.empirical_p is not None
                else []
            ),
            f"  {self.reason}",
            f"  commitment {self.commitment}",
        ]
        return "\n".join(lines)


def combined_p_value(verdicts: Sequence[Verdict]) -> float:
    """Bonferroni: k times the smallest p-value of k checks, valid whatever their dependence."""
    if not verdicts:
        raise ValueError("no verdicts to combine")
    return min(1.0, len(verdicts) * min(v.p_value for v in verdicts))


@dataclass(frozen=True)
class NullCalibration:
    """Which of the evidence's items each reference model matched (models trained without the key).

    ``matches`` is (models, items) booleans in query order, so a fit can be made at any look size.
    """

    kind: str
    evidence_digest: str
    models: tuple[str, ...]
    matches: np.ndarray

    def fit(self, n: int) -> stats.NullFit:
        return stats.fit_null(self.matches[:, :n].sum(axis=1).tolist(), n)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        write_json(
            path,
            {
                "format": "modelseal-calibration-v1",
                "kind": self.kind,
                "evidence_digest": self.evidence_digest,
                "models": list(self.models),
                "matches": encode_array(np.packbits(self.matches, axis=1), "uint8"),
                "items": int(self.matches.shape[1]),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NullCalibration:
        data = read_json(path, "modelseal-calibration-v1")
        where = str(path)
        models, items, kind = data.get("models"), data.get("items"), data.get("kind")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise OwnershipError(f"{where}: 'models' must be a list of names")
        if not isinstance(items, int) or items <= 0 or kind not in ("watermark", "fingerprint"):
            raise OwnershipError(f"{where}: malformed calibration header")
        packed = decode_array(data.get("matches"), "uint8", where, "matches")
        if packed.shape != (len(models), (items + 7) // 8):
            raise OwnershipError(f"{where}: matches do not have one row per model")
        matches = np.unpackbits(packed, axis=1, count=items).astype(bool)
        digest = data.get("evidence_digest")
        if not isinstance(digest, str):
            raise OwnershipError(f"{where}: no evidence digest")
        return cls(kind=kind, evidence_digest=digest, models=tuple(models), matches=matches)


@contextmanager
def _opened(obj: Any) -> Iterator[Suspect]:
    """``obj`` as a :class:`Suspect`, closed afterwards if it was opened here (a caller's stays open)."""
    suspect = as_suspect(obj)
    try:
        yield suspect
    finally:
        if suspect is not obj:
            suspect.close()


def calibrate_items(
    kind: str, evidence_digest: str, inputs: np.ndarray, expected: np.ndarray, references: Iterable[Any]
) -> NullCalibration:
    names, rows = [], []
    for reference in references:
        with _opened(reference) as suspect:
            rows.append(suspect.predict(inputs) == expected)
            names.append(suspect.name)
    if len(rows) < stats.MIN_REFERENCE_MODELS:
        raise ValueError(f"calibrate with at least {stats.MIN_REFERENCE_MODELS} reference models (50 recommended)")
    return NullCalibration(kind=kind, evidence_digest=evidence_digest, models=tuple(names), matches=np.array(rows))


def run_test(
    suspect: Suspect | Any,
    inputs: np.ndarray,
    expected: np.ndarray,
    *,
    kind: str,
    commitment: str,
    chance_rate: float | None,
    calibration: NullCalibration | None,
    alpha: float,
    budget: int | None,
    num_classes: int,
) -> Verdict:
    """Query ``suspect`` (anything :func:`as_suspect` takes) look by look and decide (spec §6)."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if budget is not None and budget <= 0:
        raise ValueError("budget must be positive")
    with _opened(suspect) as target:
        # Looks are planned from the evidence alone, so a budget only ends the plan early: it cannot
        # move a look or change its share of alpha (no shopping for a lucky budget).
        planned = len(inputs) if calibration is None else min(len(inputs), calibration.matches.shape[1])
        looks = stats.look_schedule(planned)
        weights = stats.look_weights(len(looks))
        if budget is not None:
            kept = sum(1 for size in looks if size <= budget)
            looks, weights = looks[:kept], weights[:kept]
        total = looks[-1] if looks else 0
        nulls = []
        if chance_rate is not None:
            nulls.append(f"binomial at chance {chance_rate:.4g} (exact over the key's randomness)")
        if calibration is not None:
            nulls.append(
                calibration.fit(max(total, 1)).describe()
                + "; a parametric extrapolation, valid as far as independent models vary like these"
            )
        null = "; ".join(nulls) or "none"

        def verdict(decision: str, reason: str, answered: int, matched: int, p: float, done: list[Look]) -> Verdict:
            empirical = None
            if calibration is not None and answered:
                counts = calibration.matches[:, :answered].sum(axis=1)
                empirical = (1 + int(np.count_nonzero(counts >= matched))) / (len(counts) + 1)
            return Verdict(
                kind,
                decision,
                p,
                alpha,
                answered,
                matched,
                null,
                reason,
                target.name,
                commitment,
                tuple(done),
                empirical,
            )

        if chance_rate is None and calibration is None:
            return verdict(INCONCLUSIVE, f"a {kind} needs a null calibration on reference models", 0, 0, 1.0, [])

        def p_value(matched: int, n: int) -> float:
            parts = []
            if chance_rate is not None:
                parts.append(stats.binomial_tail(matched, n, chance_rate))
            if calibration is not None:
                parts.append(calibration.fit(n).tail(matched))
            return max(max(parts), P_FLOOR)

        if not looks:
            reason = f"a budget of {budget} queries is below the first planned look ({stats.look_schedule(planned)[0]})"
            return verdict(INCONCLUSIVE, reason, 0, 0, 1.0, [])
        best_possible = min(p_value(size, size) / weight for size, weight in zip(looks, weights, strict=True))
        if best_possible > alpha:
            return verdict(
                INCONCLUSIVE,
                f"{total} queries cannot reach alpha {alpha:g} even if every answer matches "
                f"(best p {best_possible:.3g})",
                0,
                0,
                1.0,
                [],
            )
        answered, matched, best = 0, 0, 1.0
        done: list[Look] = []
        for size, weight in zip(looks, weights, strict=True):
            try:
                labels = target.predict(inputs[answered:size])
            except SuspectError as exc:
                return verdict(INCONCLUSIVE, f"the suspect could not be queried: {exc}", answered, matched, best, done)
            if labels.size and int(labels.max()) >= num_classes:
                reason = (
                    f"the suspect answered label {int(labels.max())}, outside 0..{num_classes - 1}: "
                    "another label space or a wrong response mapping"
                )
                return verdict(INCONCLUSIVE, reason, answered, matched, best, done)
            matched += int(np.count_nonzero(labels == expected[answered:size]))
            answered = size
            p = p_value(matched, answered)
            adjusted = min(1.0, p / weight)
            best = min(best, adjusted)
            done.append(Look(answered, matched, p, adjusted))
            if best <= alpha:
                return verdict(PROVEN, f"p <= alpha after {answered} queries", answered, matched, best, done)
        reason = (
            f"no evidence at alpha {alpha:g} after all {answered} planned queries; this does not show the suspect is "
            "independent (a distilled copy, for one, need not keep the evidence)"
        )
        return verdict(NOT_PROVEN, reason, answered, matched, best, done)
