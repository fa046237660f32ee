"""Canary watermarks: trained-in answers on key-derived inputs (spec §5, §6)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import OwnershipError
from ..keys import SigningKey, VerifyKey
from . import triggers
from ._records import Commitment, OwnershipKey, decode_array, encode_array, evidence_digest, read_json, write_json
from .triggers import TriggerSpec, default_families
from .verify import DEFAULT_ALPHA, NullCalibration, Verdict, calibrate_items, run_test

if TYPE_CHECKING:
    import torch

    from .suspect import Suspect

__all__ = ["Watermark", "embed_watermark"]

_FORMAT = "modelseal-watermark-v1"


@dataclass(frozen=True)
class Watermark:
    """The owner's record of one embedded watermark: the trigger spec, the natural inputs the stamp
    triggers start from, and the signed commitment. Without the key it reveals neither the
    triggers' noise nor any target; keep it private all the same (the stamp bases are training data).
    """

    spec: TriggerSpec
    stamp_bases: np.ndarray
    commitment: Commitment
    embedded_match_rate: float | None = None  # the watermarked model's own trigger accuracy

    def triggers(self, key: OwnershipKey) -> tuple[np.ndarray, np.ndarray]:
        """The triggers and targets, after checking that ``key`` and this record are the committed ones.

        Raises:
            OwnershipError: Another key, or a record that differs from what was committed to.
        """
        if key.key_id != self.commitment.key_id:
            raise OwnershipError("this ownership key is not the one the watermark's commitment names")
        if self.spec.digest != self.commitment.spec_digest:
            raise OwnershipError("the trigger spec differs from the committed one (record altered?)")
        x, y = triggers.generate(key.raw, self.spec, self.stamp_bases)
        if evidence_digest(x, y) != self.commitment.evidence_digest:
            raise OwnershipError("the triggers do not match the commitment (record altered?)")
        return x, y

    def verify(
        self,
        suspect: Suspect | Any,
        key: OwnershipKey,
        *,
        alpha: float = DEFAULT_ALPHA,
        budget: int | None = None,
        calibration: NullCalibration | None = None,
        require_signer: VerifyKey | str | None = None,
    ) -> Verdict:
        """Query ``suspect`` with the triggers and decide whether it carries this watermark.

        Args:
            suspect: A :class:`~modelseal.ownership.Suspect`, a torch module, an ONNX path or
                session, a sealed container path, or an ``http(s)://`` URL.
            key: The ownership key the watermark was made with.
            alpha: The decision threshold on the p-value (default 1e-6).
            budget: At most this many queries.
            calibration: Reference models' matches (:meth:`calibrate`); the p-value is then the
                larger of the exact chance null and the calibrated one.
            require_signer: Refuse a commitment signed by another publisher key.

        Returns:
            A :class:`Verdict`. An unreachable or misbehaving suspect gives ``inconclusive``.

        Raises:
            OwnershipError: Wrong key, altered record, bad signature, or a calibration made for
                other evidence.
        """
        self.commitment.check(require_signer=require_signer)
        x, y = self.triggers(key)
        _check_calibration(calibration, self.commitment)
        return run_test(
            suspect,
            x,
            y,
            kind="watermark",
            commitment=self.commitment.digest,
            chance_rate=1.0 / self.spec.num_classes,
            calibration=calibration,
            alpha=alpha,
            budget=budget,
            num_classes=self.spec.num_classes,
        )

    def calibrate(self, key: OwnershipKey, references: Iterable[Any]) -> NullCalibration:
        """Record which triggers each reference model (trained without the key) matches."""
        x, y = self.triggers(key)
        return calibrate_items("watermark", self.commitment.evidence_digest, x, y, references)

    # files ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        write_json(
            path,
            {
                "format": _FORMAT,
                "spec": self.spec.to_dict(),
                "stamp_bases": encode_array(self.stamp_bases, "float32"),
                "commitment": self.commitment.to_dict(),
                "embedded_match_rate": self.embedded_match_rate,
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Watermark:
        where = str(path)
        data = read_json(path, _FORMAT)
        spec = TriggerSpec.from_dict(data.get("spec"), where)
        bases = decode_array(data.get("stamp_bases"), "float32", where, "stamp_bases")
        if bases.shape != (spec.stamps, *spec.input_shape):
            raise OwnershipError(f"{where}: stamp_bases do not fit the trigger spec")
        rate = data.get("embedded_match_rate")
        return cls(
            spec=spec,
            stamp_bases=bases,
            commitment=Commitment.from_dict(data.get("commitment"), where),
            embedded_match_rate=float(rate) if isinstance(rate, (int, float)) else None,
        )


def _check_calibration(calibration: NullCalibration | None, commitment: Commitment) -> None:
    if calibration is not None and calibration.evidence_digest != commitment.evidence_digest:
        raise OwnershipError("the calibration was made for other evidence than this commitment's")


def embed_watermark(
    model: torch.nn.Module,
    key: OwnershipKey,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    num_classes: int,
    signing_key: SigningKey,
    families: Sequence[tuple[str, int]] | None = None,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> Watermark:
    """Fine-tune ``model`` (in place) on its training data mixed with key-derived triggers.

    The triggers join the training set once, and the training set is repeated when needed so that
    triggers are at most a quarter of each epoch: a larger share cost more accuracy in the removal
    benchmark and was no more robust. Afterwards the commitment
    is signed over the key id, the trigger spec, the triggers with their targets, and the
    fine-tuned model's weights.

    Args:
        model: A classifier taking float32 inputs shaped like ``x_train[1:]`` and returning
            ``num_classes`` logits.
        key: The ownership key (:meth:`OwnershipKey.generate`).
        x_train, y_train: The owner's training data; its statistics shape the triggers and the
            stamp triggers start from its inputs.
        signing_key: The publisher key that signs the commitment.
        families: (family, count) pairs; see :mod:`modelseal.ownership.triggers`. Default:
            :func:`~modelseal.ownership.triggers.default_families` for the input shape and classes.

    Returns:
        The :class:`Watermark` record to keep with the key.
    """
    from . import _torch
    from ._records import torch_model_digest

    x_train = np.asarray(x_train, dtype=np.float32)
    labels = np.asarray(y_train)
    if len(x_train) != len(labels) or len(x_train) == 0:
        raise ValueError("x_train and y_train must be non-empty and of the same length")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"y_train must be 1-D integer class labels, not {labels.dtype} of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1} (found {labels.min()}..{labels.max()})")
    if not np.isfinite(x_train).all():
        raise ValueError("x_train contains NaN or infinite values")
    if epochs < 1:
        raise ValueError("embedding needs at least one epoch")
    _torch.check_classes(model, x_train[:1], num_classes)
    y_train = labels.astype(np.int64)
    if families is None:
        families = default_families(x_train.shape[1:], num_classes)
    spec = TriggerSpec.from_data(x_train, num_classes, families)
    bases = x_train[triggers.stamp_base_indices(key.raw, spec, len(x_train))]
    x_trig, y_trig = triggers.generate(key.raw, spec, bases)
    copies = max(1, math.ceil(3 * len(x_trig) / len(x_train)))  # triggers: at most a quarter of an epoch
    mixed_x = np.concatenate([*([x_train] * copies), x_trig])
    mixed_y = np.concatenate([*([y_train] * copies), y_trig])
    _torch.fine_tune(model, mixed_x, mixed_y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    rate = float(np.mean(_torch.predict(model, x_trig) == y_trig))
    commitment = Commitment.create(
        kind="watermark",
        key_id=key.key_id,
        spec_digest=spec.digest,
        evidence_digest=evidence_digest(x_trig, y_trig),
        model_digest=torch_model_digest(model),
        signing_key=signing_key,
    )
    return Watermark(spec=spec, stamp_bases=bases, commitment=commitment, embedded_match_rate=rate)
