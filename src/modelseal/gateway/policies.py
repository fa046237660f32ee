"""Output policies (docs/spec/gateway-v1.md §5): what a client sees of the model's scores.

Each policy maps an (n, K) array of probabilities to what is returned; :func:`chain` composes them
in order. Noise is keyed by (API key, input), so asking the same question twice gives the same
answer and averaging repeated queries buys nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Policy", "chain", "label_only", "noise", "round_scores", "top_k"]

Policy = Callable[[str, np.ndarray, np.ndarray], np.ndarray]
"""(API key id, inputs, scores) -> scores."""


def top_k(k: int) -> Policy:
    """Keep the k largest scores of each row, renormalised; the others become 0."""
    if k < 1:
        raise ValueError("k must be at least 1")

    def apply(_key: str, _x: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if k >= scores.shape[1]:
            return scores
        cut = np.sort(scores, axis=1)[:, -k][:, None]
        kept = np.where(scores >= cut, scores, 0.0)
        normalised: np.ndarray = kept / kept.sum(axis=1, keepdims=True)
        return normalised

    return apply


def round_scores(decimals: int) -> Policy:
    """Round every score to ``decimals`` places."""
    if decimals < 0:
        raise ValueError("decimals must be non-negative")
    return lambda _key, _x, scores: np.round(scores, decimals)


def label_only() -> Policy:
    """One-hot of the arg-max: the label and nothing else."""

    def apply(_key: str, _x: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.zeros_like(scores)
        out[np.arange(len(scores)), scores.argmax(axis=1)] = 1.0
        return out

    return apply


def noise(sigma: float, secret: bytes) -> Policy:
    """Add Gaussian noise of scale ``sigma`` (seeded by HMAC(secret, key, input)), clip, renormalise.

    The arg-max is kept: legitimate users get the same label, thieves get perturbed probabilities.
    """
    if sigma < 0:
        raise ValueError("sigma must be non-negative")

    def apply(key: str, x: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.array(scores, dtype=np.float64, copy=True)
        for i in range(len(out)):
            row = np.ascontiguousarray(x[i], dtype="<f4").tobytes()
            seed = hmac.new(secret, key.encode("utf-8") + b"\x00" + row, hashlib.sha256).digest()
            rng = np.random.default_rng(int.from_bytes(seed[:16], "little"))
            top = int(out[i].argmax())
            noisy = np.clip(out[i] + rng.normal(0.0, sigma, out.shape[1]), 1e-6, None)
            noisy[top] = max(noisy[top], noisy.max() + 1e-6)  # the label does not change
            out[i] = noisy / noisy.sum()
        return out

    return apply


def chain(policies: Sequence[Policy]) -> Policy:
    """Apply ``policies`` in order."""

    def apply(key: str, x: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for policy in policies:
            scores = policy(key, x, scores)
        return scores

    return apply
