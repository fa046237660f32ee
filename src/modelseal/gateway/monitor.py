"""Per-API-key extraction monitor (docs/spec/gateway-v1.md §6), with bounded state and cost per key.

Each key's queries feed three statistics, all computed in a *standardised* feature space fixed at
start-up by a :class:`Reference` (per-feature mean and standard deviation of a benign sample of the
training distribution, the standard deviation floored so that near-constant features do not blow up):

- **coverage**: every query is hashed into ``2**lsh_bits`` buckets by random hyperplanes through the
  data mean; a key's visited buckets are an exact bitmap. The statistic is the number of distinct
  buckets a key visited divided by the number expected from as many draws from the reference
  distribution (``sum_b 1 - (1 - p_b)**n`` over the reference sample's bucket frequencies ``p_b``).
  A client sampling the natural distribution broadly sits near 1 at any ``n``; a client whose work
  is about a few things, with repeats, sits well below. This is what catches natural-data thieves,
  which the other two statistics cannot see. Coverage counts the key's last ``coverage_horizon`` to
  ``2 * coverage_horizon`` queries (two alternating bitmaps), so a long-lived key is judged on its
  recent traffic and the reference curve never has to extrapolate far.
- **ood**: each query's out-of-distribution score (mean squared standardised feature) is turned into
  its percentile among the reference sample's scores; the statistic is the mean percentile over the
  last ``window`` queries (about 0.5 for in-distribution traffic, 1.0 for uniform noise).
- **distance** (PRADA-style): the minimum L2 distance of each query to a reservoir sample (fixed
  size, Algorithm R with a keyed counter-based RNG) of the key's earlier queries; the last ``window``
  minimum distances are tested for normality with the Shapiro-Francia W' (squared correlation of the
  sorted values with normal scores). Low W' is suspicious. Exact repeats (distance 0) are not
  recorded: a repeated query tells a thief nothing new, and benign clients repeat themselves.
  Computed and reported always, but :func:`calibrate` leaves it off by default
  (:data:`DEFAULT_STATISTICS`): benign traffic with near-duplicates is far from normal too.

Statistics are evaluated every ``check_every`` queries once a key has ``min_queries``; a flag latches
until :meth:`Monitor.forget`. Work per query is ``O((reservoir + check_every + lsh_bits) * d)`` and
state per key is ``O(reservoir * d + 2**lsh_bits / 4 + window)`` bytes, whatever the key's history.
A batch is processed exactly as the same queries sent one by one would be (same reservoir, same
distances, same evaluations), so batching neither hides nor changes anything.

:func:`calibrate` sets the thresholds from simulated or recorded benign traffic to a target false
positive rate (per key, over the key's whole stream). :func:`simulate_benign` and
:func:`simulate_thief` are the simulation the tests and ``benchmarks/monitor_calibration.py`` use.

What no query-statistics monitor can do: a thief whose queries are distributed exactly like a benign
client's (the same narrow workload, the same repeats) produces the same statistics and cannot be told
apart; and a benign client whose real workload is a broad sample of the natural distribution (a
general-purpose user of a general-purpose model) looks like a natural-data thief to the coverage test.
The thresholds are only as good as the benign traffic they were calibrated on.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from statistics import NormalDist

import numpy as np

__all__ = [
    "DEFAULT_STATISTICS",
    "MAX_LSH_BITS",
    "STATISTICS",
    "THIEVES",
    "Assessment",
    "Monitor",
    "MonitorConfig",
    "Reference",
    "Thresholds",
    "calibrate",
    "stream_peaks",
    "simulate_benign",
    "simulate_thief",
]

MAX_LSH_BITS = 16
"""Hyperplanes stored in a :class:`Reference`; a monitor uses the first ``lsh_bits`` of them."""

STATISTICS = ("coverage", "ood", "distance")
"""The statistics, in the order of :attr:`Assessment.reasons`."""

DEFAULT_STATISTICS = ("coverage", "ood")
"""What :func:`calibrate` sets thresholds for unless told otherwise. The distance test is computed and
reported but off by default: on digits its benign W' has a heavy lower tail (near-duplicate queries),
so at a 1% budget it adds false positives and catches no thief the other two miss, as the PRADA
rerun on digits found (``benchmarks/monitor_calibration.py`` measures it). Pass
``statistics=STATISTICS`` to use it anyway."""

_FORMAT = 1  # Reference file format version
_MIN_SAMPLE = 10
_MIN_NORMALITY = 20  # fewest recorded distances for which W' is computed
_STD_FLOOR = 0.1  # a feature's scale is at least this fraction of the median positive std
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _seed_bytes(seed: bytes | int) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (bytes, int)):
        raise TypeError("seed must be bytes or a non-negative int")
    if isinstance(seed, int):
        if seed < 0:
            raise ValueError("seed must be non-negative")
        return b"i" + seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "little")
    return b"b" + bytes(seed)


def _flatten(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """``(n, *shape)`` -> float64 ``(n, d)``; ValueError on a bad shape or non-finite values."""
    a = np.asarray(x)
    if a.ndim < 2:
        raise ValueError(f"{what} must have shape (n, *input_shape), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.bool_:
        raise ValueError(f"{what} must be numeric, got {a.dtype}")
    flat = a.reshape(a.shape[0], -1).astype(np.float64, copy=False)
    if dim is not None and flat.shape[1] != dim:
        raise ValueError(f"{what} has {flat.shape[1]} features per row, the reference has {dim}")
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return flat


# --------------------------------------------------------------------------------------------------
# Reference: fitted once at start-up


@dataclass(frozen=True, eq=False)
class Reference:
    """What the monitor knows of the benign input distribution; fit once, saved with the config.

    ``key`` seeds everything random (hyperplanes, each API key's reservoir sampling), so whoever
    holds a reference file can predict which queries a key's reservoir keeps: keep it with the
    gateway's other secrets.
    """

    mean: np.ndarray  # (d,) float64
    scale: np.ndarray  # (d,) float64, > 0
    planes: np.ndarray  # (MAX_LSH_BITS, d) float64, in standardised space, through the mean
    codes: np.ndarray  # (n,) uint32: the sample's LSH codes over all MAX_LSH_BITS planes
    ood_sorted: np.ndarray  # (n,) float64: the sample's OOD scores, sorted
    key: bytes  # 32 bytes

    @property
    def dim(self) -> int:
        """Features per (flattened) query."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, sample: np.ndarray, *, seed: bytes | int) -> Reference:
        """Fit from a benign sample ``(n, *input_shape)`` of the training distribution (n >= 10).

        Raises:
            ValueError: Too few rows, a bad shape or non-finite values.
        """
        x = _flatten(sample, None, "the reference sample")
        if x.shape[0] < _MIN_SAMPLE:
            raise ValueError(f"the reference sample needs at least {_MIN_SAMPLE} rows, got {x.shape[0]}")
        key = hashlib.sha256(b"modelseal/gateway/monitor/v1\x00" + _seed_bytes(seed)).digest()
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        positive = std[std > 0]
        floor = _STD_FLOOR * float(np.median(positive)) if positive.size else 1.0
        scale = np.maximum(std, floor)
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key + b"lsh").digest(), "little"))
        planes = rng.standard_normal((MAX_LSH_BITS, x.shape[1]))
        z = ((x - mean) / scale).astype(np.float32)  # as the monitor computes it
        return cls(
            mean=mean,
            scale=scale,
            planes=planes,
            codes=_codes(z, planes.astype(np.float32)),
            ood_sorted=np.sort(_ood_scores(z.astype(np.float64))),
            key=key,
        )

    def save(self, path: str | PathLike[str]) -> None:
        """Write a ``.npz`` file (no pickled objects)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                format=np.array([_FORMAT], dtype=np.int64),
                mean=self.mean,
                scale=self.scale,
                planes=self.planes,
                codes=self.codes,
                ood_sorted=self.ood_sorted,
                key=np.frombuffer(self.key, dtype=np.uint8),
            )

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Reference:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: Not a reference file of this format, or inconsistent contents.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in f.files}
        except (OSError, EOFError) as exc:
            raise ValueError(f"not a monitor reference file: {exc}") from exc
        need = {"format", "mean", "scale", "planes", "codes", "ood_sorted", "key"}
        if not need <= arrays.keys():
            raise ValueError(f"monitor reference file lacks {', '.join(sorted(need - arrays.keys()))}")
        if arrays["format"].tolist() != [_FORMAT]:
            raise ValueError(f"unsupported monitor reference format {arrays['format'].tolist()}")
        mean = arrays["mean"].astype(np.float64)
        scale = arrays["scale"].astype(np.float64)
        planes = arrays["planes"].astype(np.float64)
        codes = arrays["codes"]
        ood = arrays["ood_sorted"].astype(np.float64)
        key = arrays["key"]
        d = mean.shape[0] if mean.ndim == 1 else -1
        ok = (
            d > 0
            and scale.shape == (d,)
            and planes.shape == (MAX_LSH_BITS, d)
            and codes.ndim == 1
            and codes.dtype == np.uint32
            and codes.shape[0] >= _MIN_SAMPLE
            and ood.shape == codes.shape
            and key.dtype == np.uint8
            and key.shape == (32,)
            and all(np.all(np.isfinite(a)) for a in (mean, scale, planes, ood))
            and bool(np.all(scale > 0))
            and bool(np.all(np.diff(ood) >= 0))
        )
        if not ok:
            raise ValueError("inconsistent monitor reference file")
        return cls(mean=mean, scale=scale, planes=planes, codes=codes, ood_sorted=ood, key=key.tobytes())


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` by einsum, not BLAS: the products here are small, a threaded BLAS spends more time
    synchronising than computing on a busy machine, and each entry is summed in the same order
    whatever the batch size, so sending queries one by one or in batches gives identical results."""
    out: np.ndarray = np.einsum("ij,kj->ik", a, b)
    return out


def _sqnorms(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.einsum("ij,ij->i", z, z)
    return out


def _codes(z: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """LSH codes of float32 rows ``z`` (standardised) against float32 ``planes`` ``(bits, d)``."""
    bits = _gram(z, planes) > 0
    weights = np.left_shift(np.uint32(1), np.arange(planes.shape[0], dtype=np.uint32))
    codes: np.ndarray = (bits.astype(np.uint32) * weights).sum(axis=1, dtype=np.uint32)
    return codes


def _ood_scores(z: np.ndarray) -> np.ndarray:
    """Mean squared standardised feature of each float64 row."""
    scores: np.ndarray = _sqnorms(z) / z.shape[1]
    return scores


# --------------------------------------------------------------------------------------------------
# Configuration, thresholds, assessments


@dataclass(frozen=True)
class MonitorConfig:
    """Sizes and cadence of the per-key statistics (thresholds are separate: :class:`Thresholds`).

    Memory per key is about ``4 * reservoir * d + 16 * window + 2**lsh_bits / 4`` bytes (137 KB for
    digits' d = 64 with the defaults, so 1,024 keys take about 140 MB); put a feature extractor or a
    projection in front of the monitor for high-dimensional inputs. Evicting a key (``max_keys``)
    forgets its statistics and its flag, so size ``max_keys`` above the keys active at once.
    """

    reservoir: int = 512  # past queries kept per key for the minimum-distance statistic
    window: int = 200  # recent minimum distances and OOD percentiles kept per key
    check_every: int = 50  # queries between evaluations of the statistics
    lsh_bits: int = 12  # hyperplanes -> 2**lsh_bits coverage buckets
    min_queries: int = 100  # no verdict before this many queries
    coverage_horizon: int = 1000  # coverage counts the last horizon..2*horizon queries
    max_keys: int = 1024  # keys tracked at once; the least recently seen is forgotten beyond this

    def __post_init__(self) -> None:
        for name in ("reservoir", "window", "check_every", "min_queries", "coverage_horizon", "max_keys"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonitorConfig.{name} must be a positive int, got {value!r}")
        if self.window < _MIN_NORMALITY:
            raise ValueError(f"MonitorConfig.window must be at least {_MIN_NORMALITY}")
        if isinstance(self.lsh_bits, bool) or not isinstance(self.lsh_bits, int):
            raise ValueError("MonitorConfig.lsh_bits must be an int")
        if not 3 <= self.lsh_bits <= MAX_LSH_BITS:
            raise ValueError(f"MonitorConfig.lsh_bits must be in [3, {MAX_LSH_BITS}], got {self.lsh_bits}")
        if self.coverage_horizon % self.check_every:
            raise ValueError("MonitorConfig.coverage_horizon must be a multiple of check_every")


@dataclass(frozen=True)
class Thresholds:
    """When a key is flagged: ``coverage > coverage``, ``ood > ood`` or ``distance W' < normality``.

    The defaults never flag. Infinite values are allowed (a statistic switched off).
    """

    coverage: float = math.inf
    ood: float = math.inf
    normality: float = -math.inf

    def __post_init__(self) -> None:
        for name in ("coverage", "ood", "normality"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(f"Thresholds.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        return {"coverage": self.coverage, "ood": self.ood, "normality": self.normality}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Thresholds:
        """Inverse of :meth:`to_dict`. Raises ValueError on unknown or missing names or non-numbers."""
        names = {"coverage", "ood", "normality"}
        if set(data) != names:
            raise ValueError(f"thresholds must have exactly {sorted(names)}, got {sorted(data)}")
        values: dict[str, float] = {}
        for name in sorted(names):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"threshold {name} must be a number, got {value!r}")
            values[name] = float(value)
        return cls(**values)


@dataclass
class Assessment:
    """A key's standing after its latest query.

    ``stats`` holds the values at the latest evaluation (``evaluated_at`` queries): ``coverage`` (the
    ratio above), ``coverage_buckets``, ``ood`` (mean percentile), ``distance_w`` (W', NaN until
    enough distances), ``distance_median``; and the extremes over all evaluations so far:
    ``peak_coverage``, ``peak_ood``, ``min_distance_w``. Empty before the first evaluation.
    """

    queries: int
    flagged: bool
    reasons: tuple[str, ...]  # which statistics have crossed their threshold, in STATISTICS order
    stats: dict[str, float]
    flagged_at: int | None = None  # query count at the evaluation that first flagged the key


# --------------------------------------------------------------------------------------------------
# The monitor


_GOLDEN, _MIX1, _MIX2, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1


def _uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (seed + counter), so a query's draw depends on
    its position in the key's stream only, not on how the stream was batched. Arrays wrap silently."""
    z = counters.astype(np.uint64) + np.uint64((seed + _GOLDEN) & _MASK)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    out: np.ndarray = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return out


def _uniform_one(seed: int, counter: int) -> float:
    """:func:`_uniform` for one counter, in Python integers (identical result, no array overhead)."""
    z = (counter + seed + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    z ^= z >> 31
    return (z >> 11) * (1.0 / 2**53)


class _KeyState:
    __slots__ = (
        "count",
        "dist_n",
        "dist_pos",
        "dist_ring",
        "filled",
        "flagged_at",
        "last",
        "min_w",
        "ood_n",
        "ood_pos",
        "ood_ring",
        "peak_coverage",
        "peak_ood",
        "reasons",
        "reservoir",
        "seed",
        "sqnorm",
        "visited",
    )

    def __init__(self, seed: int, config: MonitorConfig, dim: int) -> None:
        self.seed = seed
        self.count = 0
        self.reservoir = np.zeros((config.reservoir, dim), dtype=np.float32)
        self.sqnorm = np.zeros(config.reservoir, dtype=np.float32)
        self.filled = 0
        self.dist_ring = np.zeros(config.window, dtype=np.float64)
        self.dist_pos = 0
        self.dist_n = 0
        self.ood_ring = np.zeros(config.window, dtype=np.float64)
        self.ood_pos = 0
        self.ood_n = 0
        nbytes = max(1, (1 << config.lsh_bits) // 8)
        self.visited = np.zeros((2, nbytes), dtype=np.uint8)  # [current epoch, previous epoch]
        self.reasons: set[str] = set()
        self.flagged_at: int | None = None
        self.peak_coverage = -math.inf
        self.peak_ood = -math.inf
        self.min_w = math.inf
        self.last: dict[str, float] = {}


def _ring_write(ring: np.ndarray, pos: int, n: int, values: np.ndarray) -> tuple[int, int]:
    size = ring.shape[0]
    values = values[-size:]
    k = values.shape[0]
    idx = (pos + np.arange(k)) % size
    ring[idx] = values
    return (pos + k) % size, min(size, n + k)


@functools.lru_cache(maxsize=1024)
def _normal_scores(n: int) -> np.ndarray:
    """Blom's normal scores for n sorted values, centred and scaled to unit norm (read-only)."""
    inv = NormalDist().inv_cdf
    scores = np.array([inv((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    scores -= scores.mean()
    scores /= np.sqrt(np.dot(scores, scores))
    scores.flags.writeable = False
    return scores


def _shapiro_francia(values: np.ndarray) -> float:
    """Shapiro-Francia W': squared correlation of the sorted values with normal scores (1 = normal)."""
    v = np.sort(values)
    v -= v.mean()
    ss = float(np.dot(v, v))
    if ss <= 0.0:
        return 0.0  # all values equal: as far from a normal sample as it gets
    return float(np.dot(_normal_scores(v.shape[0]), v) ** 2 / ss)


class Monitor:
    """Per-key extraction statistics; thread-safe (one lock per monitor).

    Args:
        reference: The fitted :class:`Reference`.
        config: Sizes and cadence.
        thresholds: When to flag; None computes the statistics but never flags (what :func:`calibrate`
            uses).
    """

    def __init__(
        self, reference: Reference, config: MonitorConfig | None = None, thresholds: Thresholds | None = None
    ) -> None:
        self.reference = reference
        self.config = config if config is not None else MonitorConfig()
        self.thresholds = thresholds
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._lock = threading.Lock()
        bits = self.config.lsh_bits
        self._planes = np.ascontiguousarray(reference.planes[:bits].astype(np.float32))  # (bits, d)
        self._weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
        counts = np.bincount(reference.codes & np.uint32((1 << bits) - 1), minlength=1 << bits)
        self._bucket_p = counts[counts > 0] / counts.sum()
        self._mean = reference.mean
        self._scale = reference.scale

    # -- public API ------------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys tracked now, least recently seen first."""
        with self._lock:
            return tuple(self._keys)

    def observe(self, key_id: str, x: np.ndarray) -> Assessment:
        """Account a batch ``(batch, *input_shape)`` of ``key_id``'s queries; the key's new standing.

        Raises:
            ValueError: An empty batch, the wrong number of features, or NaN / infinite values (the
                key's state is left unchanged).
        """
        if not isinstance(key_id, str):
            raise TypeError("key_id must be a str")
        flat = _flatten(x, self.reference.dim, "the batch")
        z = ((flat - self._mean) / self._scale).astype(np.float32)
        with self._lock:
            state = self._keys.get(key_id)
            if state is None:
                state = self._new_state(key_id)
            else:
                self._keys.move_to_end(key_id)
            start = 0
            every = self.config.check_every
            while start < z.shape[0]:
                stop = min(z.shape[0], start + every - state.count % every)
                if stop - start == 1:
                    self._ingest_one(state, z[start])
                else:
                    self._ingest(state, z[start:stop])
                start = stop
                if state.count % every == 0 and state.count >= self.config.min_queries:
                    self._evaluate(state)
            return self._assessment(state)

    def state(self, key_id: str) -> Assessment:
        """The key's standing (zero queries and no statistics for a key not tracked)."""
        with self._lock:
            state = self._keys.get(key_id)
            if state is None:
                return Assessment(queries=0, flagged=False, reasons=(), stats={})
            return self._assessment(state)

    def forget(self, key_id: str) -> None:
        """Drop the key's state (and its flag); unknown keys are ignored."""
        with self._lock:
            self._keys.pop(key_id, None)

    def footprint(self, key_id: str) -> dict[str, int]:
        """What a key's state holds: ``queries`` seen, ``reservoir`` (stored queries the next one is
        compared with, at most ``config.reservoir``), ``buckets`` (visited, over the coverage horizon)
        and ``bytes`` (its arrays, fixed at creation). All zero for a key not tracked."""
        with self._lock:
            st = self._keys.get(key_id)
            if st is None:
                return {"queries": 0, "reservoir": 0, "buckets": 0, "bytes": 0}
            arrays = (st.reservoir, st.sqnorm, st.dist_ring, st.ood_ring, st.visited)
            return {
                "queries": st.count,
                "reservoir": st.filled,
                "buckets": int(_POPCOUNT[st.visited[0] | st.visited[1]].sum()),
                "bytes": sum(a.nbytes for a in arrays),
            }

    def work_per_query(self) -> int:
        """Multiply-adds per query in the worst case: distances to the reservoir and to the rest of a
        segment, and the LSH projection. A constant of the configuration, whatever a key's history."""
        c = self.config
        return (c.reservoir + c.check_every + c.lsh_bits) * self.reference.dim

    # -- internals -------------------------------------------------------------------------------

    def _new_state(self, key_id: str) -> _KeyState:
        digest = hmac.new(self.reference.key, b"key\x00" + key_id.encode("utf-8"), hashlib.sha256).digest()
        state = _KeyState(int.from_bytes(digest[:8], "little"), self.config, self.reference.dim)
        self._keys[key_id] = state
        while len(self._keys) > self.config.max_keys:
            self._keys.popitem(last=False)
        return state

    def _ingest_one(self, st: _KeyState, z: np.ndarray) -> None:
        """:meth:`_ingest` for a single query ``(d,)``, without the segment bookkeeping (same result)."""
        cfg = self.config
        size = cfg.reservoir
        t = st.count
        if t % cfg.coverage_horizon == 0 and t > 0:
            st.visited[1] = st.visited[0]
            st.visited[0] = 0
        if t < size:
            slot = t
        else:
            draw = int(_uniform_one(st.seed, t) * (t + 1))
            slot = draw if draw < size else -1
        filled = st.filled
        row = z[None]
        sq = _sqnorms(row)
        if filled:
            near = sq[0] + st.sqnorm[:filled] - 2.0 * _gram(row, st.reservoir[:filled])[0]
            diff = row.astype(np.float64) - st.reservoir[int(np.argmin(near))].astype(np.float64)
            dist = float(np.sqrt(_sqnorms(diff))[0])
            if dist > 0:
                st.dist_ring[st.dist_pos] = dist
                st.dist_pos = (st.dist_pos + 1) % st.dist_ring.shape[0]
                st.dist_n = min(st.dist_ring.shape[0], st.dist_n + 1)
        if slot >= 0:
            st.reservoir[slot] = z
            st.sqnorm[slot] = sq[0]
        st.filled = min(size, t + 1)
        ref = self.reference.ood_sorted
        score = float(_ood_scores(row.astype(np.float64))[0])
        st.ood_ring[st.ood_pos] = np.searchsorted(ref, score, side="right") / ref.shape[0]
        st.ood_pos = (st.ood_pos + 1) % st.ood_ring.shape[0]
        st.ood_n = min(st.ood_ring.shape[0], st.ood_n + 1)
        code = int((_gram(row, self._planes)[0] > 0) @ self._weights)
        st.visited[0, code >> 3] |= np.uint8(1 << (code & 7))
        st.count = t + 1

    def _ingest(self, st: _KeyState, z: np.ndarray) -> None:
        """One segment (never crossing a check boundary): reservoir, distances, OOD, coverage."""
        cfg = self.config
        b = z.shape[0]
        size = cfg.reservoir
        t0 = st.count
        if t0 % cfg.coverage_horizon == 0 and t0 > 0:  # a new coverage epoch
            st.visited[1] = st.visited[0]
            st.visited[0] = 0

        # Reservoir decisions (Algorithm R), from a counter-based keyed RNG: query t goes to slot t
        # while the reservoir fills, then to slot floor(u * (t + 1)) if that is < size.
        t = np.arange(t0, t0 + b, dtype=np.int64)
        draw = np.floor(_uniform(st.seed, t) * (t + 1)).astype(np.int64)
        slots = np.where(t < size, t, np.where(draw < size, draw, -1))
        first_write = np.full(size, b, dtype=np.int64)  # first row of the segment writing each slot
        next_write = np.full(b, b, dtype=np.int64)  # next row overwriting the slot row i wrote
        last_writer: dict[int, int] = {}
        for i in range(b):
            s = int(slots[i])
            if s < 0:
                continue
            prev = last_writer.get(s)
            if prev is None:
                first_write[s] = i
            else:
                next_write[prev] = i
            last_writer[s] = i

        # Minimum distance of each row to the reservoir as it stood just before that row.
        filled = st.filled
        sq = _sqnorms(z)
        rows = np.arange(b)
        res = st.reservoir[:filled]
        d_res = sq[:, None] + st.sqnorm[None, :filled] - 2.0 * _gram(z, res)
        d_res[rows[:, None] > first_write[None, :filled]] = np.inf
        d_seg = sq[:, None] + sq[None, :] - 2.0 * _gram(z, z)
        alive = (rows[None, :] < rows[:, None]) & (slots[None, :] >= 0) & (rows[:, None] <= next_write[None, :])
        d_seg[~alive] = np.inf
        cand = np.concatenate([d_res, d_seg], axis=1)
        nearest = np.argmin(cand, axis=1)
        has = np.isfinite(cand[rows, nearest])
        if np.any(has):
            # exact distances to the nearest candidates (the expansion above loses precision near 0)
            src = np.where(nearest < filled, 0, 1)
            near_vec = np.where(
                (src == 0)[:, None],
                st.reservoir[np.minimum(nearest, max(filled - 1, 0))],
                z[np.clip(nearest - filled, 0, b - 1)],
            )
            diff = z.astype(np.float64) - near_vec.astype(np.float64)
            dist = np.sqrt(_sqnorms(diff))[has]
            dist = dist[dist > 0]  # exact repeats carry no information
            if dist.size:
                st.dist_pos, st.dist_n = _ring_write(st.dist_ring, st.dist_pos, st.dist_n, dist)

        # Reservoir update: the last writer of each slot stays.
        keep = (slots >= 0) & (next_write == b)
        st.reservoir[slots[keep]] = z[keep]
        st.sqnorm[slots[keep]] = sq[keep]
        st.filled = min(size, t0 + b)

        # OOD percentiles against the reference sample's scores.
        ref = self.reference.ood_sorted
        pct = np.searchsorted(ref, _ood_scores(z.astype(np.float64)), side="right") / ref.shape[0]
        st.ood_pos, st.ood_n = _ring_write(st.ood_ring, st.ood_pos, st.ood_n, pct)

        # Coverage buckets.
        codes = (_gram(z, self._planes) > 0) @ self._weights
        np.bitwise_or.at(st.visited[0], codes >> 3, np.left_shift(1, codes & 7).astype(np.uint8))
        st.count = t0 + b

    def _expected_buckets(self, n: int) -> float:
        return float(np.sum(-np.expm1(n * np.log1p(-self._bucket_p))))

    def _evaluate(self, st: _KeyState) -> None:
        cfg = self.config
        epoch = (st.count - 1) // cfg.coverage_horizon
        covered_queries = st.count - epoch * cfg.coverage_horizon + (cfg.coverage_horizon if epoch else 0)
        buckets = int(_POPCOUNT[st.visited[0] | st.visited[1]].sum())
        coverage = buckets / self._expected_buckets(covered_queries)
        ood = float(st.ood_ring[: st.ood_n].mean())
        dists = st.dist_ring[: st.dist_n]
        w = _shapiro_francia(dists) if st.dist_n >= _MIN_NORMALITY else math.nan
        st.peak_coverage = max(st.peak_coverage, coverage)
        st.peak_ood = max(st.peak_ood, ood)
        if not math.isnan(w):
            st.min_w = min(st.min_w, w)
        st.last = {
            "evaluated_at": float(st.count),
            "coverage": coverage,
            "coverage_buckets": float(buckets),
            "ood": ood,
            "distance_w": w,
            "distance_median": float(np.median(dists)) if st.dist_n else math.nan,
            "peak_coverage": st.peak_coverage,
            "peak_ood": st.peak_ood,
            "min_distance_w": st.min_w if st.min_w < math.inf else math.nan,
        }
        thr = self.thresholds
        if thr is None:
            return
        fired = set()
        if coverage > thr.coverage:
            fired.add("coverage")
        if ood > thr.ood:
            fired.add("ood")
        if not math.isnan(w) and w < thr.normality:
            fired.add("distance")
        if fired:
            st.reasons |= fired
            if st.flagged_at is None:
                st.flagged_at = st.count

    def _assessment(self, st: _KeyState) -> Assessment:
        return Assessment(
            queries=st.count,
            flagged=st.flagged_at is not None,
            reasons=tuple(name for name in STATISTICS if name in st.reasons),
            stats=dict(st.last),
            flagged_at=st.flagged_at,
        )


# --------------------------------------------------------------------------------------------------
# Calibration


_PEAKS = {"coverage": "peak_coverage", "ood": "peak_ood", "distance": "min_distance_w"}


def stream_peaks(
    reference: Reference, stream: np.ndarray, *, config: MonitorConfig | None = None, key_id: str = "calibration"
) -> dict[str, float]:
    """The extremes one key's stream reaches: ``peak_coverage``, ``peak_ood`` and ``min_distance_w``
    (NaN where never evaluated: a stream shorter than ``min_queries``)."""
    stats = Monitor(reference, config).observe(key_id, stream).stats
    return {name: stats.get(name, math.nan) for name in _PEAKS.values()}


def calibrate(
    reference: Reference,
    benign_streams: Sequence[np.ndarray],
    *,
    config: MonitorConfig | None = None,
    target_fpr: float = 0.01,
    statistics: Sequence[str] = DEFAULT_STATISTICS,
    extrapolate: bool = True,
) -> Thresholds:
    """Thresholds under which at most ``target_fpr`` of ``benign_streams`` are ever flagged.

    Each stream (one benign key's queries, in order) runs through a fresh monitor. Each of the
    chosen ``statistics`` gets a share ``a = target_fpr / len(statistics)`` (Bonferroni); its
    threshold is the order statistic of the extremes the streams reached that leaves at most
    ``floor(a * len(streams))`` streams beyond it, so at most ``target_fpr`` of the calibration
    streams are flagged. Statistics not chosen are switched off.

    With 100 streams and 1% that order statistic is the most extreme benign value itself, which a
    fresh benign key passes with probability about ``1 / (len(streams) + 1)`` per statistic, whatever
    the distribution: 100 streams cannot certify 1%. ``extrapolate`` (the default) therefore also
    fits a normal distribution to the streams' extremes and takes its ``1 - a`` quantile when that is
    more conservative; it never makes a threshold less conservative than the empirical one. Either
    way, more calibration streams give thresholds that hold better on unseen traffic.

    Raises:
        ValueError: No streams, ``target_fpr`` outside (0, 1), or unknown / no statistics.
    """
    if not benign_streams:
        raise ValueError("calibration needs at least one benign stream")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    chosen = tuple(dict.fromkeys(statistics))
    if not chosen or not set(chosen) <= set(STATISTICS):
        raise ValueError(f"statistics must be a non-empty subset of {STATISTICS}, got {tuple(statistics)}")
    peaks = [stream_peaks(reference, stream, config=config) for stream in benign_streams]
    n = len(peaks)
    share = target_fpr / len(chosen)
    allowed = math.floor(share * n)  # streams each statistic may flag
    z = NormalDist().inv_cdf(1.0 - share)

    def threshold(name: str) -> float:
        upper = name != "distance"  # coverage and ood flag above, W' below
        values = np.array([p[_PEAKS[name]] for p in peaks])
        reached = values[~np.isnan(values)]
        if reached.size <= allowed:  # (almost) no stream reached an evaluation: nothing to go on
            return math.inf if upper else -math.inf
        signed = np.sort(reached if upper else -reached)[::-1]  # most extreme first
        cut = float(signed[allowed])
        if extrapolate and reached.size >= 2:
            cut = max(cut, float(signed.mean() + z * signed.std(ddof=1)))
        return cut if upper else -cut

    return Thresholds(
        coverage=threshold("coverage") if "coverage" in chosen else math.inf,
        ood=threshold("ood") if "ood" in chosen else math.inf,
        normality=threshold("distance") if "distance" in chosen else -math.inf,
    )


# --------------------------------------------------------------------------------------------------
# Simulation: benign clients and thieves (numpy only; the arrays come from modelseal.lab.data)

THIEVES = ("natural", "knockoff", "uniform", "jacobian", "mixup", "hybrid")
"""Thief workloads of :func:`simulate_thief`."""


def _range(x: np.ndarray, low: np.ndarray | None, high: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    lo = x.min(axis=0) if low is None else np.broadcast_to(np.asarray(low, dtype=x.dtype), x.shape[1:])
    hi = x.max(axis=0) if high is None else np.broadcast_to(np.asarray(high, dtype=x.dtype), x.shape[1:])
    return lo, hi


def simulate_benign(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    queries: int | None = None,
    feature_low: np.ndarray | None = None,
    feature_high: np.ndarray | None = None,
) -> np.ndarray:
    """One benign client's queries, in order, drawn from labelled natural data ``(x, y)``.

    Assumptions (each client draws its own parameters from ``seed``):

    - volume log-uniform in [100, 1000] queries (or ``queries``);
    - 1 to 3 "home" classes; 85-98% of fresh queries are rows of those classes, the rest any row;
    - 5-30% of queries resubmit one of the client's earlier queries exactly;
    - 10-50% of fresh queries carry small Gaussian noise (1-5% of each feature's range), clipped to
      the range (re-scans, re-encodings).

    The labels only pick the workload; the monitor never sees them.
    """
    rng = np.random.default_rng(seed)
    data = np.asarray(x)
    labels = np.asarray(y)
    lo, hi = _range(data, feature_low, feature_high)
    n = queries if queries is not None else int(np.exp(rng.uniform(math.log(100), math.log(1000))))
    classes = np.unique(labels)
    home = rng.choice(classes, size=min(int(rng.integers(1, 4)), len(classes)), replace=False)
    home_rows = np.flatnonzero(np.isin(labels, home))
    p_other, p_repeat = rng.uniform(0.02, 0.15), rng.uniform(0.05, 0.30)
    p_noise, sigma = rng.uniform(0.10, 0.50), rng.uniform(0.01, 0.05)
    rows = np.where(
        rng.random(n) < p_other, rng.integers(0, len(data), n), home_rows[rng.integers(0, len(home_rows), n)]
    )
    out = data[rows].astype(np.float32, copy=True)
    noisy = rng.random(n) < p_noise
    noise = rng.standard_normal((int(noisy.sum()), *data.shape[1:])) * (sigma * (hi - lo))
    out[noisy] = np.clip(out[noisy] + noise, lo, hi)
    repeat = rng.random(n) < p_repeat
    sources = rng.random(n)
    for i in np.flatnonzero(repeat):
        if i > 0:
            out[i] = out[int(sources[i] * i)]
    return out


def simulate_thief(
    kind: str,
    pool: np.ndarray,
    *,
    seed: int,
    queries: int = 500,
    feature_low: np.ndarray | None = None,
    feature_high: np.ndarray | None = None,
) -> np.ndarray:
    """A thief's queries, in order, built from its unlabelled natural ``pool``.

    - ``natural``: copycat, the pool in random order without replacement, then (past the pool's
      size) pool rows with 5% Gaussian jitter;
    - ``knockoff``: pool rows drawn with replacement, 5% jitter (``lab.extraction.knockoff_random``);
    - ``uniform``: uniform noise over the feature range;
    - ``jacobian``: Jacobian-style augmentation approximated by signed steps: a seed set of 20 pool
      rows, each round adding every point moved by +-10% of the range on every feature (random
      signs stand in for the gradient's), clipped;
    - ``mixup``: convex combinations of two random pool rows;
    - ``hybrid``: natural pool rows and ``jacobian`` points interleaved half and half.

    Raises:
        ValueError: Unknown ``kind`` or ``queries < 1``.
    """
    if kind not in THIEVES:
        raise ValueError(f"unknown thief {kind!r}; choose one of {', '.join(THIEVES)}")
    if queries < 1:
        raise ValueError("queries must be at least 1")
    rng = np.random.default_rng(seed)
    data = np.asarray(pool, dtype=np.float32)
    lo, hi = _range(data, feature_low, feature_high)
    span = hi - lo
    m = len(data)

    def jitter(rows: np.ndarray) -> np.ndarray:
        moved: np.ndarray = np.clip(rows + rng.standard_normal(rows.shape) * (0.05 * span), lo, hi)
        return moved

    if kind == "natural":
        first = data[rng.permutation(m)[: min(queries, m)]]
        rest = jitter(data[rng.integers(0, m, max(0, queries - m))])
        out = np.concatenate([first, rest])
    elif kind == "knockoff":
        out = jitter(data[rng.integers(0, m, queries)])
    elif kind == "uniform":
        out = lo + rng.random((queries, *data.shape[1:])) * span
    elif kind == "jacobian":
        points = data[rng.choice(m, size=min(20, m), replace=False)]
        while len(points) < queries:
            steps = rng.choice(np.array([-0.1, 0.1], dtype=np.float32), size=points.shape) * span
            points = np.concatenate([points, np.clip(points + steps, lo, hi)])
        out = points[:queries]
    elif kind == "mixup":
        a, b = data[rng.integers(0, m, queries)], data[rng.integers(0, m, queries)]
        lam = rng.random(queries).reshape(-1, *([1] * (data.ndim - 1)))
        out = lam * a + (1 - lam) * b
    else:  # hybrid
        half = (queries + 1) // 2
        natural = simulate_thief("natural", data, seed=seed + 1, queries=half, feature_low=lo, feature_high=hi)
        synthetic = simulate_thief(
            "jacobian", data, seed=seed + 2, queries=queries - half, feature_low=lo, feature_high=hi
        )
        out = np.empty((queries, *data.shape[1:]), dtype=np.float32)
        out[0::2], out[1::2] = natural, synthetic
    return np.asarray(out, dtype=np.float32)
