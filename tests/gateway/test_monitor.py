"""The per-key extraction monitor (docs/spec/gateway-v1.md §6): bounded state, independence of keys,
calibration to a false-positive target, detection of simulated thieves on digits, persistence of the
reference, input checks and determinism. No timing assertions: cost is checked structurally."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from modelseal.gateway.monitor import (
    STATISTICS,
    THIEVES,
    Assessment,
    Monitor,
    MonitorConfig,
    Reference,
    Thresholds,
    calibrate,
    simulate_benign,
    simulate_thief,
)
from modelseal.lab.data import Dataset, load_dataset

SEED = b"test-monitor-reference-seed"


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def reference(digits: Dataset) -> Reference:
    return Reference.fit(digits.x_train, seed=SEED)


def _benign(ds: Dataset, seeds: range) -> list[np.ndarray]:
    return [
        simulate_benign(ds.x_test, ds.y_test, seed=s, feature_low=ds.feature_low, feature_high=ds.feature_high)
        for s in seeds
    ]


def _thief(ds: Dataset, kind: str, seed: int, queries: int = 500) -> np.ndarray:
    return simulate_thief(
        kind, ds.x_pool, seed=seed, queries=queries, feature_low=ds.feature_low, feature_high=ds.feature_high
    )


@pytest.fixture(scope="module")
def calibration(digits: Dataset) -> list[np.ndarray]:
    return _benign(digits, range(100))


@pytest.fixture(scope="module")
def thresholds(reference: Reference, calibration: list[np.ndarray]) -> Thresholds:
    return calibrate(reference, calibration, target_fpr=0.01)


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32)


# -- bounded state -----------------------------------------------------------------------------------


def test_state_per_key_is_bounded(reference: Reference, digits: Dataset) -> None:
    config = MonitorConfig()
    monitor = Monitor(reference, config, Thresholds())
    stream = np.concatenate([_thief(digits, "knockoff", seed=s, queries=1000) for s in range(20)])
    monitor.observe("k", stream[:1000])
    early = monitor.footprint("k")
    monitor.observe("k", stream[1000:])
    late = monitor.footprint("k")
    assert late["queries"] == 20_000
    # every query is compared with a reservoir of the same, capped size, and the state does not grow
    assert early["reservoir"] == late["reservoir"] == config.reservoir
    assert early["bytes"] == late["bytes"]
    assert late["buckets"] <= 2**config.lsh_bits
    assert monitor.work_per_query() == (config.reservoir + config.check_every + config.lsh_bits) * reference.dim
    # the state's size is what the configuration says, whatever the history
    expected = config.reservoir * reference.dim * 4 + config.reservoir * 4 + 2 * config.window * 8
    assert late["bytes"] == expected + 2 * 2**config.lsh_bits // 8


def test_keys_tracked_are_capped_least_recently_seen_first(reference: Reference) -> None:
    monitor = Monitor(reference, MonitorConfig(max_keys=3))
    for key in ("a", "b", "c"):
        monitor.observe(key, _noise(5))
    monitor.observe("a", _noise(1))  # a is now the most recent
    monitor.observe("d", _noise(1))  # evicts b
    assert monitor.keys == ("c", "a", "d")
    assert monitor.state("b") == Assessment(queries=0, flagged=False, reasons=(), stats={})
    assert monitor.state("a").queries == 6
    monitor.forget("a")
    monitor.forget("never-seen")
    assert list(monitor.keys) == ["c", "d"]


# -- independence, batching, determinism -------------------------------------------------------------


def test_keys_are_independent(reference: Reference, digits: Dataset, thresholds: Thresholds) -> None:
    benign = simulate_benign(digits.x_test, digits.y_test, seed=1000, queries=400)
    thief = _thief(digits, "uniform", seed=3, queries=400)
    alone, shared = Monitor(reference, thresholds=thresholds), Monitor(reference, thresholds=thresholds)
    for i in range(0, 400, 40):
        expected = alone.observe("benign", benign[i : i + 40])
        shared.observe("thief", thief[i : i + 40])
        assert shared.observe("benign", benign[i : i + 40]) == expected
        shared.observe("thief", thief[i : i + 7])
    assert shared.state("thief").flagged and not shared.state("benign").flagged


def test_batching_changes_nothing(reference: Reference, digits: Dataset, thresholds: Thresholds) -> None:
    stream = _benign(digits, range(2000, 2001))[0]
    stream = np.concatenate([stream, _thief(digits, "natural", seed=1, queries=700)])  # past the reservoir
    whole = Monitor(reference, thresholds=thresholds).observe("k", stream)
    one_by_one = Monitor(reference, thresholds=thresholds)
    for row in stream:
        last = one_by_one.observe("k", row[None])
    ragged = Monitor(reference, thresholds=thresholds)
    sizes = np.random.default_rng(0).integers(1, 90, size=len(stream))
    start = 0
    for size in sizes:
        if start >= len(stream):
            break
        mixed = ragged.observe("k", stream[start : start + size])
        start += size
    assert whole.flagged and whole.flagged_at is not None and whole.flagged_at > 100
    # bit for bit: the same reservoir, distances and evaluations (NaN-free: enough distances by now)
    assert last == whole and mixed == whole


def test_same_seeds_same_assessments(digits: Dataset, calibration: list[np.ndarray]) -> None:
    a, b = Reference.fit(digits.x_train, seed=SEED), Reference.fit(digits.x_train, seed=SEED)
    assert np.array_equal(a.planes, b.planes) and a.key == b.key
    thr_a = calibrate(a, calibration[:30])
    assert thr_a == calibrate(b, calibration[:30])
    streams = [*calibration[30:35], _thief(digits, "natural", seed=5)]
    ma, mb = Monitor(a, thresholds=thr_a), Monitor(b, thresholds=thr_a)
    for i, s in enumerate(streams):
        assert ma.observe(f"k{i}", s) == mb.observe(f"k{i}", s)
    other = Reference.fit(digits.x_train, seed=SEED + b"!")
    assert not np.array_equal(other.planes, a.planes)
    # the simulation is seeded too
    assert np.array_equal(_benign(digits, range(7, 8))[0], _benign(digits, range(7, 8))[0])
    assert np.array_equal(_thief(digits, "jacobian", 4), _thief(digits, "jacobian", 4))


def test_no_verdict_before_min_queries_and_flags_latch(reference: Reference, digits: Dataset) -> None:
    monitor = Monitor(reference, MonitorConfig(min_queries=100), Thresholds(ood=0.9))
    a = monitor.observe("k", _noise(99))
    assert not a.flagged and a.stats == {} and a.queries == 99
    a = monitor.observe("k", _noise(1, seed=1))
    assert a.flagged and a.reasons == ("ood",) and a.flagged_at == 100 and a.stats["ood"] > 0.99
    # benign-looking traffic afterwards does not clear the flag ...
    a = monitor.observe("k", digits.x_train[:400])
    assert a.flagged and a.flagged_at == 100 and a.stats["ood"] < 0.9
    # ... forgetting the key does
    monitor.forget("k")
    assert not monitor.state("k").flagged


# -- calibration and detection -----------------------------------------------------------------------


def test_calibration_meets_its_target_on_the_calibration_streams(
    reference: Reference, calibration: list[np.ndarray], thresholds: Thresholds
) -> None:
    for thr, stats in (
        (thresholds, ("coverage", "ood")),
        (calibrate(reference, calibration, statistics=STATISTICS), STATISTICS),
    ):
        monitor = Monitor(reference, thresholds=thr)
        flagged = [monitor.observe(f"cal-{i}", s).flagged for i, s in enumerate(calibration)]
        assert np.mean(flagged) <= 0.01
        assert math.isfinite(thr.coverage) and math.isfinite(thr.ood)
        assert math.isfinite(thr.normality) == ("distance" in stats)
    plain = calibrate(reference, calibration, extrapolate=False)
    assert plain.coverage <= thresholds.coverage and plain.ood <= thresholds.ood  # extrapolation only adds margin


def test_held_out_benign_false_positive_rate(reference: Reference, digits: Dataset, thresholds: Thresholds) -> None:
    held_out = _benign(digits, range(10_000, 10_100))
    monitor = Monitor(reference, thresholds=thresholds)
    flagged = [monitor.observe(f"held-{i}", s).flagged for i, s in enumerate(held_out)]
    assert np.mean(flagged) <= 0.05  # measured 0/1000 by benchmarks/monitor_calibration.py; loose here


@pytest.mark.parametrize("kind", ["uniform", "natural", "knockoff", "mixup"])
def test_thieves_are_flagged_within_500_queries(
    reference: Reference, digits: Dataset, thresholds: Thresholds, kind: str
) -> None:
    monitor = Monitor(reference, thresholds=thresholds)
    for seed in range(10):
        a = monitor.observe(f"{kind}-{seed}", _thief(digits, kind, seed=100 + seed))
        assert a.flagged, (kind, seed, a.stats)
        assert a.flagged_at is not None and a.flagged_at <= 500
        assert ("ood" if kind == "uniform" else "coverage") in a.reasons


def test_calibrate_rejects_bad_arguments(reference: Reference, calibration: list[np.ndarray]) -> None:
    with pytest.raises(ValueError):
        calibrate(reference, [])
    with pytest.raises(ValueError):
        calibrate(reference, calibration[:3], target_fpr=0.0)
    with pytest.raises(ValueError):
        calibrate(reference, calibration[:3], statistics=("coverage", "bogus"))
    # streams too short to be evaluated leave every statistic switched off
    assert calibrate(reference, [s[:50] for s in calibration[:5]]) == Thresholds()


# -- persistence and input checks --------------------------------------------------------------------


def test_reference_round_trip(tmp_path: Path, reference: Reference, digits: Dataset, thresholds: Thresholds) -> None:
    path = tmp_path / "reference.npz"
    reference.save(path)
    loaded = Reference.load(path)
    for name in ("mean", "scale", "planes", "codes", "ood_sorted"):
        assert np.array_equal(getattr(loaded, name), getattr(reference, name)), name
    assert loaded.key == reference.key and loaded.dim == 64
    stream = _thief(digits, "natural", seed=9)
    assert Monitor(loaded, thresholds=thresholds).observe("k", stream) == Monitor(
        reference, thresholds=thresholds
    ).observe("k", stream)
    assert Thresholds.from_dict(thresholds.to_dict()) == thresholds
    assert all(isinstance(v, float) for v in thresholds.to_dict().values())


def test_reference_load_rejects_other_files(tmp_path: Path, reference: Reference) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError):
        Reference.load(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mean=reference.mean)
    with pytest.raises(ValueError, match="lacks"):
        Reference.load(partial)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        format=np.array([1]),
        mean=reference.mean,
        scale=reference.scale,
        planes=reference.planes,
        codes=reference.codes,
        ood_sorted=np.array([{"evil": 1}] * len(reference.codes), dtype=object),
        key=np.frombuffer(reference.key, dtype=np.uint8),
    )
    with pytest.raises(ValueError):  # object arrays need pickle, which load refuses
        Reference.load(pickled)
    inconsistent = tmp_path / "inconsistent.npz"
    np.savez(
        inconsistent,
        format=np.array([1]),
        mean=reference.mean,
        scale=-reference.scale,
        planes=reference.planes,
        codes=reference.codes,
        ood_sorted=reference.ood_sorted,
        key=np.frombuffer(reference.key, dtype=np.uint8),
    )
    with pytest.raises(ValueError, match="inconsistent"):
        Reference.load(inconsistent)


def test_bad_input_is_rejected_and_leaves_state_alone(reference: Reference) -> None:
    monitor = Monitor(reference)
    monitor.observe("k", _noise(3))
    bad_nan = _noise(4)
    bad_nan[2, 0, 3, 3] = np.nan
    bad_inf = _noise(4)
    bad_inf[0, 0, 0, 0] = np.inf
    for bad in (
        np.zeros((4, 1, 8, 7), dtype=np.float32),  # wrong feature count
        np.zeros((4, 65), dtype=np.float32),
        np.zeros(64, dtype=np.float32),  # no batch axis
        np.zeros((0, 1, 8, 8), dtype=np.float32),  # empty batch
        bad_nan,
        bad_inf,
        np.array([["a"] * 64]),
    ):
        with pytest.raises(ValueError):
            monitor.observe("k", bad)
    assert monitor.state("k").queries == 3
    assert monitor.observe("k", np.zeros((2, 64), dtype=np.float32)).queries == 5  # any shape with 64 features
    with pytest.raises(ValueError):
        Reference.fit(np.full((50, 64), np.nan), seed=1)
    with pytest.raises(ValueError):
        Reference.fit(np.zeros((5, 64)), seed=1)  # too few rows
    with pytest.raises(ValueError):
        Reference.fit(np.zeros((50, 64)), seed=-1)


def test_config_and_thresholds_validation() -> None:
    for bad in (
        {"reservoir": 0},
        {"window": 5},
        {"lsh_bits": 2},
        {"lsh_bits": 17},
        {"check_every": 0},
        {"coverage_horizon": 1001},
        {"max_keys": True},
    ):
        with pytest.raises(ValueError):
            MonitorConfig(**bad)
    with pytest.raises(ValueError):
        Thresholds(coverage=math.nan)
    with pytest.raises(ValueError):
        Thresholds.from_dict({"coverage": 1.0, "ood": 0.9})
    with pytest.raises(ValueError):
        Thresholds.from_dict({"coverage": 1.0, "ood": "0.9", "normality": 0.1})
    assert Thresholds.from_dict({"coverage": 1, "ood": 0.9, "normality": 0.1}).coverage == 1.0
    with pytest.raises(ValueError):
        simulate_thief("bogus", np.zeros((10, 64)), seed=0)
    assert set(THIEVES) >= {"natural", "uniform", "jacobian", "mixup"}
