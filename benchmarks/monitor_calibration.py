"""Calibrate the extraction monitor on simulated benign clients; measure false positives, detection, cost.

On scikit-learn's digits (``modelseal.lab.data``, seed 0): the monitor's :class:`Reference` is fitted on
the owner's training split; benign clients query the held-out test split; thieves query the attacker's
pool (disjoint from both). Thresholds are calibrated on 100 benign streams (target 1% of keys ever
flagged) and evaluated on *other* benign streams (1,000 by default, so the rate is measured to a
fraction of a percent; the first 100 are also reported alone) and on thieves with 500 queries each.

Simulation assumptions (see ``simulate_benign`` / ``simulate_thief`` in
``modelseal.gateway.monitor``): a benign client sends 100-1,000 queries about 1-3 "home" classes (2-15%
about anything else), resubmits 5-30% of its queries exactly, and adds small noise (1-5% of the range)
to 10-50% of the rest. Thieves: ``natural`` (copycat over the pool, then jittered redraws),
``knockoff`` (redraws with 5% jitter), ``uniform`` noise, ``jacobian`` (signed +-10% steps from 20 pool
seeds, standing in for Jacobian augmentation), ``mixup`` (convex mixes of two pool rows), ``hybrid``
(natural and jacobian interleaved) and ``mimic``: a thief whose queries follow the benign workload
itself (narrow, repetitive) on pool data. ``mimic`` is there to show the limit of any monitor that
looks only at query statistics: traffic distributed like a benign client's cannot be told apart, so
it is flagged at about the false-positive rate (and steals correspondingly little: 1-3 classes).
A benign client whose real workload is a broad sample of the natural distribution would likewise be
flagged by the coverage test; these numbers hold for the benign workload simulated here.

Cost per query is timed for one key with no history and for the same key after 10^5 queries: the
per-key state (reservoir, ring buffers, bucket bitmaps) has a fixed size, so it does not grow.

    .venv/bin/python benchmarks/monitor_calibration.py
    .venv/bin/python benchmarks/monitor_calibration.py --held-out 100 --thieves 50   # quicker
"""

from __future__ import annotations

import os

# One BLAS thread, as a gateway worker per core would run: the monitor's products are small, and a
# multi-threaded BLAS on a busy 2-core machine spends more time synchronising than computing.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelseal.gateway.monitor import (
    STATISTICS,
    THIEVES,
    Monitor,
    MonitorConfig,
    Reference,
    Thresholds,
    calibrate,
    simulate_benign,
    simulate_thief,
)
from modelseal.lab.data import Dataset, load_dataset

BUDGET = 500
TARGET_FPR = 0.01
CALIBRATION_SEEDS = 0  # benign streams 0..n-1
HELD_OUT_SEEDS = 1_000_000  # benign streams 1_000_000..
THIEF_SEEDS = 2_000_000


@dataclass
class Outcome:
    flagged: int
    total: int
    first_flag: list[int]  # query counts at the first flag, flagged streams only
    reasons: Counter[str]

    @property
    def rate(self) -> float:
        return self.flagged / self.total if self.total else math.nan


def run(monitor: Monitor, streams: Sequence[np.ndarray], prefix: str) -> Outcome:
    out = Outcome(0, len(streams), [], Counter())
    for i, stream in enumerate(streams):
        a = monitor.observe(f"{prefix}-{i}", stream)
        monitor.forget(f"{prefix}-{i}")
        if a.flagged:
            out.flagged += 1
            assert a.flagged_at is not None
            out.first_flag.append(a.flagged_at)
            out.reasons.update(a.reasons)
    return out


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a binomial rate k/n."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


def benign(ds: Dataset, seeds: range) -> list[np.ndarray]:
    return [
        simulate_benign(ds.x_test, ds.y_test, seed=s, feature_low=ds.feature_low, feature_high=ds.feature_high)
        for s in seeds
    ]


def thieves(ds: Dataset, count: int) -> dict[str, list[np.ndarray]]:
    out = {
        kind: [
            simulate_thief(
                kind,
                ds.x_pool,
                seed=THIEF_SEEDS + s,
                queries=BUDGET,
                feature_low=ds.feature_low,
                feature_high=ds.feature_high,
            )
            for s in range(count)
        ]
        for kind in THIEVES
    }
    out["mimic"] = [
        simulate_benign(
            ds.x_pool,
            ds.y_pool,
            seed=THIEF_SEEDS + s,
            queries=BUDGET,
            feature_low=ds.feature_low,
            feature_high=ds.feature_high,
        )
        for s in range(count)
    ]
    return out


def fmt_rate(o: Outcome) -> str:
    return f"{o.flagged}/{o.total} ({100 * o.rate:.1f}%)"


def cost_per_query(reference: Reference, ds: Dataset, prior: int, repeats: int = 7) -> tuple[float, float]:
    """µs per query for a key that has already sent ``prior`` queries: 500 queries one at a time, then
    500 in batches of 50 (thresholds set, so evaluations run as in service). The best of ``repeats``
    runs: on a shared machine, interference only ever adds time."""
    rng = np.random.default_rng(7)
    x = ds.x_pool.reshape(len(ds.x_pool), -1)

    def queries(n: int) -> np.ndarray:
        rows = x[rng.integers(0, len(x), n)] + 0.02 * rng.standard_normal((n, x.shape[1]))
        return np.clip(rows, 0, 1).astype(np.float32)

    single: list[float] = []
    batched: list[float] = []
    for r in range(repeats):
        monitor = Monitor(reference, thresholds=Thresholds(coverage=1e9, ood=1e9, normality=-1e9))
        key = f"cost-{r}"
        for done in range(0, prior, 5_000):
            monitor.observe(key, queries(min(5_000, prior - done)))
        for batch, out in ((1, single), (50, batched)):
            timed = queries(500)
            start = time.perf_counter()
            for i in range(0, len(timed), batch):
                monitor.observe(key, timed[i : i + batch])
            out.append((time.perf_counter() - start) / len(timed) * 1e6)
    return min(single), min(batched)


def naive_prada_cost(history: int, dim: int) -> float:
    """µs for one query's minimum distance to *all* ``history`` earlier queries (what PRADA does)."""
    rng = np.random.default_rng(0)
    past = rng.random((history, dim), dtype=np.float32)
    q = rng.random(dim, dtype=np.float32)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        float(np.min(np.sum((past - q) ** 2, axis=1)))
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=100, help="benign streams to calibrate on")
    parser.add_argument("--held-out", type=int, default=1000, help="other benign streams for the false-positive rate")
    parser.add_argument("--thieves", type=int, default=100, help="streams per thief kind")
    args = parser.parse_args()
    t0 = time.perf_counter()

    ds = load_dataset("digits", seed=0)
    config = MonitorConfig()
    reference = Reference.fit(ds.x_train, seed=b"monitor-calibration-benchmark")
    calibration = benign(ds, range(CALIBRATION_SEEDS, CALIBRATION_SEEDS + args.calibration))
    held_out = benign(ds, range(HELD_OUT_SEEDS, HELD_OUT_SEEDS + args.held_out))
    attacks = thieves(ds, args.thieves)
    print(
        f"digits: reference on {len(ds.x_train)} training rows; {args.calibration} calibration and "
        f"{args.held_out} held-out benign streams ({sum(map(len, held_out))} queries, "
        f"{min(map(len, held_out))}-{max(map(len, held_out))} per key); {args.thieves} thieves per kind x "
        f"{BUDGET} queries; target {TARGET_FPR:.0%} of benign keys ever flagged"
    )
    print(f"config: {config}\n")

    setups: list[tuple[str, dict[str, object]]] = [
        ("A  all three, empirical quantile", {"statistics": STATISTICS, "extrapolate": False}),
        ("B  all three, + normal tail", {"statistics": STATISTICS}),
        ("C  coverage + ood, empirical quantile", {"extrapolate": False}),
        ("D  coverage + ood, + normal tail (the default)", {}),
        ("E  distance alone (PRADA-style), empirical", {"statistics": ("distance",), "extrapolate": False}),
    ]
    kinds = list(attacks)
    header = f"{'setup':<52} {'calib FP':>9} {'held-out FP':>22} {'first 100':>9} " + " ".join(
        f"{k:>14}" for k in kinds
    )
    rows = []
    details = []
    for name, options in setups:
        thresholds = calibrate(reference, calibration, config=config, target_fpr=TARGET_FPR, **options)  # type: ignore[arg-type]
        monitor = Monitor(reference, config, thresholds)
        cal = run(monitor, calibration, "cal")
        held = run(monitor, held_out, "held")
        first = run(monitor, held_out[:100], "held100")
        results = {kind: run(monitor, streams, kind) for kind, streams in attacks.items()}
        cells = []
        for kind in kinds:
            o = results[kind]
            median = f"@{int(np.median(o.first_flag))}" if o.first_flag else ""
            cells.append(f"{100 * o.rate:5.1f}% {median:>7}")
        held_cell = f"{fmt_rate(held)} <{100 * wilson_upper(held.flagged, held.total):.1f}%"
        rows.append(
            f"{name:<52} {cal.flagged:>4}/{cal.total:<4} {held_cell:>22} {first.flagged:>5}/100 "
            + " ".join(f"{c:>14}" for c in cells)
        )
        details.append(
            f"{name[:2]} thresholds { ({k: round(v, 4) for k, v in thresholds.to_dict().items()}) }; "
            f"held-out flags by {dict(held.reasons)}; thief flags by "
            + ", ".join(f"{k}: {dict(results[k].reasons)}" for k in kinds)
        )
    print("Keys ever flagged (thieves: % flagged within 500 queries, @ median queries at the first flag;")
    print("held-out: count, rate and the 95% upper bound of the rate):")
    print(header)
    print("\n".join(rows))
    print()
    print("\n".join(details))

    print("\nCost per query (µs, best of 7 runs of 500 queries on one key, after its prior queries):")
    priors = (0, 1_000, 100_000)
    costs = [cost_per_query(reference, ds, prior) for prior in priors]
    print(f"{'prior queries of the key':>26} " + " ".join(f"{p:>9,}" for p in priors))
    print(f"{'one query per call':>26} " + " ".join(f"{c[0]:>9.1f}" for c in costs))
    print(f"{'batches of 50':>26} " + " ".join(f"{c[1]:>9.1f}" for c in costs))
    monitor = Monitor(reference, config)
    print(
        f"work per query (multiply-adds, a constant of the config): {monitor.work_per_query()}; for contrast, "
        f"PRADA's min distance to all 10^5 earlier queries: {naive_prada_cost(100_000, reference.dim):.0f} µs a query"
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
