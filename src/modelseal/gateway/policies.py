"""Output policies (docs/spec/gateway-v1.md §5): what a client sees of the model's scores.

Each policy maps a :class:`~.batch.Batch` and its (n, K) probabilities to what is returned;
:func:`chain` composes them in order. Noise is keyed by (API key, input), so asking the same
question twice gives the same answer and averaging repeated queries buys nothing.
:class:`CoveragePricer` degrades a key's answers as the share of the input space it has
explored grows, in the spirit of B4B: a legitimate user asks about its own corner of the space, a
thief has to cover all of it.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from .batch import Batch

__all__ = ["CoveragePricer", "Policy", "chain", "label_only", "noise", "round_scores", "top_k"]

Policy = Callable[[Batch, np.ndarray], np.ndarray]
"""(batch, scores) -> scores."""


def top_k(k: int) -> Policy:
    """Keep the k largest scores of each row, renormalised; the others become 0."""
    if k < 1:
        raise ValueError("k must be at least 1")

    def apply(_batch: Batch, scores: np.ndarray) -> np.ndarray:
        if k >= scores.shape[1]:
            return scores
        cut = np.partition(scores, -k, axis=1)[:, -k][:, None]
        kept = np.where(scores >= cut, scores, 0.0)
        normalised: np.ndarray = kept / kept.sum(axis=1, keepdims=True)
        return normalised

    return apply


def round_scores(decimals: int) -> Policy:
    """Round every score to ``decimals`` places."""
    if decimals < 0:
        raise ValueError("decimals must be non-negative")
    return lambda _batch, scores: scores.round(decimals)  # np.round's values, without its wrapper


def _label_only(scores: np.ndarray) -> np.ndarray:
    out = np.zeros_like(scores)
    out[np.arange(len(scores)), scores.argmax(axis=1)] = 1.0
    return out


def label_only() -> Policy:
    """One-hot of the arg-max: the label and nothing else."""
    return lambda _batch, scores: _label_only(scores)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_STEPS: dict[int, np.ndarray] = {}


def _splitmix_inplace(z: np.ndarray) -> None:
    """SplitMix64's finaliser over a uint64 array, in place (array arithmetic wraps silently, as it
    must; in place because this runs on every request of a tier with noise)."""
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31


def keyed_normals(secret: bytes, batch: Batch, k: int) -> np.ndarray:
    """(n, k) standard normals fixed by (secret, key id, row): the row's MAC (:meth:`Batch.keyed`)
    seeds a SplitMix64 stream expanded in numpy, so the cost is one HMAC per row, not one generator."""
    # bytes 16-24 of the per-row MAC the tracer also reads (bytes 0-12): one HMAC per row for both
    seeds = np.array([int.from_bytes(m[16:24], "little") for m in batch.keyed(secret)], dtype=np.uint64)
    steps = _STEPS.get(k)
    if steps is None:
        steps = _STEPS[k] = (_GOLDEN * np.arange(1, 2 * k + 1, dtype=np.uint64))[None, :]
    z = seeds[:, None] + steps
    _splitmix_inplace(z)
    z >>= _S11  # 53 random bits
    u = z.astype(np.float64)
    u += 0.5
    u *= 1.0 / float(1 << 53)  # in (0, 1)
    normals = np.log(u[:, :k])
    normals *= -2.0
    np.sqrt(normals, out=normals)
    angle = (2.0 * np.pi) * u[:, k:]  # contiguous, as numpy's cos saw it before (its SIMD path)
    normals *= np.cos(angle, out=angle)  # Box-Muller
    return normals


def noise(sigma: float, secret: bytes) -> Policy:
    """Add Gaussian noise of scale ``sigma`` (fixed by key and input), clip, renormalise.

    The arg-max is kept: legitimate users get the same label, thieves get perturbed probabilities.
    """
    if sigma < 0:
        raise ValueError("sigma must be non-negative")

    def apply(batch: Batch, scores: np.ndarray) -> np.ndarray:
        n, k = scores.shape
        noisy = keyed_normals(secret, batch, k)  # in place from here on: the values of
        noisy *= sigma  # clip(scores + sigma * normals, 1e-6, None), without the temporaries
        noisy += scores
        np.maximum(noisy, 1e-6, out=noisy)
        rows = np.arange(n)
        top = scores.argmax(axis=1)
        noisy[rows, top] = np.maximum(noisy[rows, top], noisy.max(axis=1) + 1e-6)  # the label does not change
        noisy /= noisy.sum(axis=1, keepdims=True)
        return noisy

    return apply


def chain(policies: Sequence[Policy]) -> Policy:
    """Apply ``policies`` in order."""

    def apply(batch: Batch, scores: np.ndarray) -> np.ndarray:
        for policy in policies:
            scores = policy(batch, scores)
        return scores

    return apply


class CoveragePricer:
    """Coarser answers for keys that have explored more of the input space (B4B-style).

    Inputs are hashed into ``2**bits`` buckets by random hyperplanes through ``centre`` (fixed by
    ``seed``). A key's coverage is the share of buckets it has visited; each row is answered by the
    first level whose coverage bound the key is still under:

    ========================  ===============================
    coverage < ``levels[0]``  the scores as they are
    coverage < ``levels[1]``  rounded to 2 decimals
    coverage < ``levels[2]``  rounded to 1 decimal
    otherwise                 the label only
    ========================  ===============================

    State per key is one bitmap of ``2**bits`` booleans; at most ``max_keys`` keys are kept (the
    least recently seen is forgotten first), so memory is bounded. State is per process.
    """

    def __init__(
        self,
        dim: int,
        *,
        seed: bytes,
        bits: int = 12,
        levels: tuple[float, float, float] = (0.05, 0.15, 0.30),
        centre: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        max_keys: int = 100_000,
    ) -> None:
        if not 1 <= bits <= 20:
            raise ValueError("bits must be in 1..20")
        if not 0 < levels[0] <= levels[1] <= levels[2] <= 1:
            raise ValueError("levels must be increasing fractions in (0, 1]")
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"coverage" + seed).digest()[:16], "little"))
        self._planes = rng.normal(size=(dim, bits)).astype(np.float32)
        self._centre = np.zeros(dim, np.float32) if centre is None else np.asarray(centre, np.float32).reshape(dim)
        self._scale = np.ones(dim, np.float32) if scale is None else np.asarray(scale, np.float32).reshape(dim)
        self._weights = (1 << np.arange(bits)).astype(np.int64)
        self.buckets = 1 << bits
        self.levels = levels
        self.max_keys = max_keys
        self._bounds = [level * self.buckets for level in levels]  # visited buckets where each level starts
        # per key: a byte per bucket (1 = visited) and how many are visited
        self._seen: OrderedDict[str, tuple[bytearray, list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def bucket_ids(self, x: np.ndarray) -> np.ndarray:
        z = (x.reshape(len(x), -1).astype(np.float32) - self._centre) / self._scale
        ids: np.ndarray = ((z @ self._planes) > 0).astype(np.int64) @ self._weights
        return ids

    def coverage(self, key_id: str) -> float:
        with self._lock:
            state = self._seen.get(key_id)
            return 0.0 if state is None else state[1][0] / self.buckets

    def __call__(self, batch: Batch, scores: np.ndarray) -> np.ndarray:
        ids = self.bucket_ids(batch.x).tolist()
        bounds = self._bounds
        with self._lock:
            state = self._seen.pop(batch.key_id, None)
            if state is None:
                state = (bytearray(self.buckets), [0])
                if len(self._seen) >= self.max_keys:
                    self._seen.popitem(last=False)
            self._seen[batch.key_id] = state
            seen, count = state
            visited = count[0]
            # coverage as each row arrives: rows later in a batch pay for the earlier ones' buckets
            levels = []
            for b in ids:
                if not seen[b]:
                    seen[b] = 1
                    visited += 1
                levels.append(bisect.bisect_right(bounds, visited))
            count[0] = visited
        out = np.array(scores, dtype=np.float64, copy=True)
        if levels[-1] == 0:  # levels never decrease within a batch: every row is answered as it is
            return out
        level = np.array(levels)
        for value, transform in ((1, lambda s: s.round(2)), (2, lambda s: s.round(1)), (3, _label_only)):
            rows = level == value
            if rows.any():
                out[rows] = transform(out[rows])
        return out
