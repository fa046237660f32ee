"""Canary triggers derived from the ownership key (spec §5).

Four families, for image and for vector inputs alike (an image is its flattened features):

* ``noise``: out-of-distribution points, each feature mean + std * z with z a key-derived centred
  variable, clipped to the feature's training range. Independent features make points no natural
  input looks like (natural features are correlated).
* ``wide``: each feature mean + 1.5 * std * z, not clipped: the ``noise`` points spread half as
  far again, many features outside the training range (the default for vectors).
* ``uniform``: each feature uniform over its training range.
* ``stamp``: a natural input chosen by the key from the owner's data, with a key-derived patch
  written over it: a square patch across all channels for (C, H, W) images, a key-chosen subset of
  features for vectors.

Every trigger's target is uniform over the K classes and independent of its input; that is what
makes the null exact (see :mod:`modelseal.ownership.stats`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._private.encoding import dumps_canonical
from ..errors import OwnershipError
from . import _derive

FAMILIES = ("noise", "wide", "uniform", "stamp")
WIDE_SCALE = 1.5  # spec §5.2
MAX_TRIGGERS = 100_000


def default_families(input_shape: Sequence[int], num_classes: int) -> tuple[tuple[str, int], ...]:
    """The trigger mix the removal benchmark found best (docs/ownership.md has the measurements).

    Images (C, H, W): uniform noise over the pixel range, far from any natural image. Vectors:
    ``wide`` per-feature noise around the mean. On breast-cancer it cost less accuracy than
    ``noise`` (clipped to the training range, so closer to natural inputs) on the same victims and
    kept almost as many triggers through an aggressive fine-tune; uniform noise over a standardised range lands
    so far out that fine-tuning reshapes it easily. Stamped natural inputs survived fine-tuning
    less well on digits and cost as much accuracy on breast-cancer, so the default has none; choose
    them when a suspect may refuse out-of-distribution queries. A task with 2-3 classes gets more
    triggers: each match is worth log2(K) bits of evidence.
    """
    few_classes = num_classes <= 3
    if len(input_shape) == 3:
        return (("uniform", 300 if few_classes else 100),)
    return (("wide", 400 if few_classes else 200),)


@dataclass(frozen=True)
class TriggerSpec:
    """Everything besides the key that fixes the triggers: no secret in it.

    ``low``/``high``/``mean``/``std`` are per-feature statistics of the training inputs, flattened.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    families: tuple[tuple[str, int], ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch: float = 0.2

    def __post_init__(self) -> None:
        features = math.prod(self.input_shape)
        if not self.input_shape or features <= 0:
            raise ValueError("input_shape must name at least one feature")
        if not 2 <= self.num_classes <= 2**31:
            raise ValueError("a watermark needs a classifier with at least 2 classes")
        for name, count in self.families:
            if name not in FAMILIES:
                raise ValueError(f"unknown trigger family {name!r} (families: {', '.join(FAMILIES)})")
            if count < 0:
                raise ValueError("trigger counts must be non-negative")
        if not 0 < self.count <= MAX_TRIGGERS:
            raise ValueError(f"between 1 and {MAX_TRIGGERS} triggers, not {self.count}")
        for name in ("low", "high", "mean", "std"):
            values = getattr(self, name)
            if len(values) != features or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold {features} finite values")
        if any(lo > hi for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError("low must not exceed high")
        if not 0 < self.patch <= 1:
            raise ValueError("patch is a fraction of the features, in (0, 1]")

    @property
    def count(self) -> int:
        return sum(count for _, count in self.families)

    @property
    def stamps(self) -> int:
        return sum(count for name, count in self.families if name == "stamp")

    @classmethod
    def from_data(
        cls,
        x: np.ndarray,
        num_classes: int,
        families: Sequence[tuple[str, int]],
        *,
        patch: float = 0.2,
    ) -> TriggerSpec:
        """A spec whose statistics are those of the training inputs ``x`` (shape (n, *input_shape))."""
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if len(flat) == 0:
            raise ValueError("need training inputs to take their statistics")

        def values(a: np.ndarray) -> tuple[float, ...]:
            return tuple(float(v) for v in a.astype(np.float32))

        return cls(
            input_shape=tuple(int(d) for d in np.shape(x)[1:]),
            num_classes=int(num_classes),
            families=tuple((str(n), int(c)) for n, c in families),
            low=values(flat.min(0)),
            high=values(flat.max(0)),
            mean=values(flat.mean(0)),
            std=values(flat.std(0)),
            patch=float(patch),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "families": [[name, count] for name, count in self.families],
            "low": list(self.low),
            "high": list(self.high),
            "mean": list(self.mean),
            "std": list(self.std),
            "patch": self.patch,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "trigger spec") -> TriggerSpec:
        try:
            if not isinstance(data, Mapping):
                raise TypeError("not an object")
            return cls(
                input_shape=tuple(_int(v) for v in data["input_shape"]),
                num_classes=_int(data["num_classes"]),
                families=tuple((str(name), _int(count)) for name, count in data["families"]),
                low=tuple(float(v) for v in data["low"]),
                high=tuple(float(v) for v in data["high"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                patch=float(data["patch"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OwnershipError(f"{where}: malformed trigger spec ({exc})") from None

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"modelseal-trigger-spec-v1\x00" + dumps_canonical(self.to_dict())).hexdigest()


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def stamp_base_indices(key: bytes, spec: TriggerSpec, pool_size: int) -> np.ndarray:
    """Which inputs of the owner's data the stamp triggers start from (distinct when possible)."""
    if spec.stamps == 0:
        return np.zeros(0, dtype=np.int64)
    if pool_size <= 0:
        raise ValueError("stamp triggers need natural inputs to start from")
    if spec.stamps <= pool_size:
        return _derive.sample(key, "triggers/stamp-base", spec.stamps, pool_size)
    return _derive.integers(key, "triggers/stamp-base", spec.stamps, pool_size)


def generate(key: bytes, spec: TriggerSpec, stamp_bases: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The triggers (float32, shape (count, *input_shape)) and their targets (int64), in query order.

    ``stamp_bases`` holds the natural inputs the stamp family starts from, in the order of
    :func:`stamp_base_indices` (the watermark record keeps them).
    """
    d = math.prod(spec.input_shape)
    low, high = np.asarray(spec.low), np.asarray(spec.high)
    mean, std = np.asarray(spec.mean), np.asarray(spec.std)
    parts = []
    for index, (family, count) in enumerate(spec.families):
        if count == 0:
            continue
        label = f"triggers/{index}/{family}"
        if family == "noise":
            z = _derive.centred(key, label, count * d).reshape(count, d)
            parts.append(np.clip(mean + std * z, low, high))
        elif family == "wide":
            z = _derive.centred(key, label, count * d).reshape(count, d)
            parts.append(mean + (WIDE_SCALE * std) * z)
        elif family == "uniform":
            u = _derive.uniforms(key, label, count * d).reshape(count, d)
            parts.append(low + (high - low) * u)
        else:
            parts.append(
                _stamp(key, label, spec, count, stamp_bases, sum(c for n, c in spec.families[:index] if n == "stamp"))
            )
    x = np.concatenate(parts).astype(np.float32)
    order = _derive.permutation(key, "triggers/order", len(x))
    targets = _derive.integers(key, "triggers/targets", len(x), spec.num_classes)
    return x[order].reshape(len(x), *spec.input_shape), targets


def _stamp(key: bytes, label: str, spec: TriggerSpec, count: int, bases: np.ndarray | None, offset: int) -> np.ndarray:
    d = math.prod(spec.input_shape)
    if bases is None or len(bases) < offset + count:
        raise OwnershipError("the stamp triggers need their natural base inputs (kept in the watermark record)")
    x = np.asarray(bases[offset : offset + count], dtype=np.float64).reshape(count, d).copy()
    low, high = np.asarray(spec.low), np.asarray(spec.high)
    values = low + (high - low) * _derive.uniforms(key, label + "/values", count * d).reshape(count, d)
    if len(spec.input_shape) == 3:  # (C, H, W): a square patch across channels
        c, h, w = spec.input_shape
        side = max(1, min(h, w, round(math.sqrt(spec.patch * h * w))))
        rows = _derive.integers(key, label + "/row", count, h - side + 1)
        cols = _derive.integers(key, label + "/col", count, w - side + 1)
        image_mask = np.zeros((count, c, h, w), dtype=bool)
        for i, (r, q) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            image_mask[i, :, r : r + side, q : q + side] = True
        mask = image_mask.reshape(count, d)
    else:  # vectors (or any other shape): a key-chosen subset of features per trigger
        m = max(1, round(spec.patch * d))
        ranks = np.argsort(_derive.uniforms(key, label + "/mask", count * d).reshape(count, d), axis=1, kind="stable")
        mask = np.zeros((count, d), dtype=bool)
        np.put_along_axis(mask, ranks[:, :m], True, axis=1)
    x[mask] = values[mask]
    return x
