"""Fingerprints: probes near the owner's decision boundary, recorded without retraining (spec §7).

Each probe starts from a natural input the key picks and is pushed by small signed-gradient steps
until the owner's model gives it a key-chosen other class. Such points sit just across the owner's
boundary, where models trained independently mostly still answer the original class but copies of
the owner's model (fine-tuned, pruned, quantised) tend to follow the owner. Independent models do
agree with the owner on some probes, by more than chance, so a fingerprint needs a null
calibrated on reference models; without one, verification is inconclusive.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._private.encoding import dumps_canonical
from ..errors import OwnershipError
from ..keys import SigningKey, VerifyKey
from . import _derive
from ._records import Commitment, OwnershipKey, decode_array, encode_array, evidence_digest, read_json, write_json
from .verify import DEFAULT_ALPHA, NullCalibration, Verdict, calibrate_items, run_test

if TYPE_CHECKING:
    import torch

    from .suspect import Suspect

__all__ = ["Fingerprint", "record_fingerprint"]

_FORMAT = "modelseal-fingerprint-v1"


@dataclass(frozen=True)
class Fingerprint:
    """Probes, the owner's model's answers to them, and the signed commitment."""

    probes: np.ndarray
    answers: np.ndarray
    num_classes: int
    settings: dict[str, Any]
    commitment: Commitment

    def _checked(self) -> None:
        if evidence_digest(self.probes, self.answers) != self.commitment.evidence_digest:
            raise OwnershipError("the probes or answers do not match the commitment (record altered?)")
        if _settings_digest(self.num_classes, self.settings) != self.commitment.spec_digest:
            raise OwnershipError("the fingerprint settings differ from the committed ones (record altered?)")

    def verify(
        self,
        suspect: Suspect | Any,
        *,
        calibration: NullCalibration | None,
        alpha: float = DEFAULT_ALPHA,
        budget: int | None = None,
        require_signer: VerifyKey | str | None = None,
    ) -> Verdict:
        """Query ``suspect`` with the probes; the p-value comes from ``calibration`` (required for a
        decision: ``None`` gives an inconclusive verdict that says so).

        Raises:
            OwnershipError: Altered record, bad signature, calibration for other evidence.
        """
        self.commitment.check(require_signer=require_signer)
        self._checked()
        if calibration is not None and calibration.evidence_digest != self.commitment.evidence_digest:
            raise OwnershipError("the calibration was made for other evidence than this commitment's")
        return run_test(
            suspect,
            self.probes,
            self.answers,
            kind="fingerprint",
            commitment=self.commitment.digest,
            chance_rate=None,
            calibration=calibration,
            alpha=alpha,
            budget=budget,
            num_classes=self.num_classes,
        )

    def calibrate(self, references: Iterable[Any]) -> NullCalibration:
        """Record which probes each reference model (trained independently) answers like the owner."""
        self._checked()
        return calibrate_items("fingerprint", self.commitment.evidence_digest, self.probes, self.answers, references)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        write_json(
            path,
            {
                "format": _FORMAT,
                "num_classes": self.num_classes,
                "settings": self.settings,
                "probes": encode_array(self.probes, "float32"),
                "answers": encode_array(self.answers, "int64"),
                "commitment": self.commitment.to_dict(),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Fingerprint:
        where = str(path)
        data = read_json(path, _FORMAT)
        probes = decode_array(data.get("probes"), "float32", where, "probes")
        answers = decode_array(data.get("answers"), "int64", where, "answers")
        num_classes, settings = data.get("num_classes"), data.get("settings")
        if not isinstance(num_classes, int) or num_classes < 2 or not isinstance(settings, dict):
            raise OwnershipError(f"{where}: malformed fingerprint header")
        if probes.ndim < 2 or answers.shape != (len(probes),):
            raise OwnershipError(f"{where}: probes and answers do not pair up")
        commitment = Commitment.from_dict(data.get("commitment"), where)
        return cls(probes=probes, answers=answers, num_classes=num_classes, settings=settings, commitment=commitment)


def _settings_digest(num_classes: int, settings: dict[str, Any]) -> str:
    body = dumps_canonical({"num_classes": num_classes, "settings": settings})
    return hashlib.sha256(b"modelseal-fingerprint-settings-v1\x00" + body).hexdigest()


def record_fingerprint(
    model: torch.nn.Module,
    key: OwnershipKey,
    x_pool: np.ndarray,
    *,
    num_classes: int,
    signing_key: SigningKey,
    count: int = 200,
    step: float = 0.01,
    max_steps: int = 200,
    extra_steps: int = 0,
) -> Fingerprint:
    """Make probes from natural inputs ``x_pool`` (shape (n, *input_shape)) against ``model``.

    ``step`` is a fraction of each feature's range in the pool; ``extra_steps`` pushes a probe
    further past the boundary (more robust to modification, but independent models follow more).
    """
    from . import _torch
    from ._records import torch_model_digest

    pool = np.asarray(x_pool, dtype=np.float32)
    if not 0 < count <= len(pool):
        raise ValueError(f"count must be between 1 and the pool size ({len(pool)})")
    if not np.isfinite(pool).all():
        raise ValueError("x_pool contains NaN or infinite values")
    _torch.check_classes(model, pool[:1], num_classes)
    bases = pool[_derive.sample(key.raw, "fingerprint/base", count, len(pool))]
    owner = _torch.predict(model, bases)
    shift = _derive.integers(key.raw, "fingerprint/targets", count, num_classes - 1)
    targets = shift + (shift >= owner)  # a uniform class other than the owner's answer
    low, high = pool.min(axis=0), pool.max(axis=0)
    probes = _torch.targeted_steps(
        model, bases, targets, low=low, high=high, step=step, max_steps=max_steps, extra_steps=extra_steps
    ).astype(np.float32)
    answers = _torch.predict(model, probes)
    settings = {"count": count, "step": step, "max_steps": max_steps, "extra_steps": extra_steps}
    commitment = Commitment.create(
        kind="fingerprint",
        key_id=key.key_id,
        spec_digest=_settings_digest(num_classes, settings),
        evidence_digest=evidence_digest(probes, answers),
        model_digest=torch_model_digest(model),
        signing_key=signing_key,
    )
    return Fingerprint(
        probes=probes, answers=answers, num_classes=num_classes, settings=settings, commitment=commitment
    )
