"""Traceable answers and output policies (docs/spec/gateway-v1.md §5, §7)."""

from __future__ import annotations

import numpy as np
import pytest

from modelseal.gateway import policies
from modelseal.gateway.batch import Batch
from modelseal.gateway.trace import Tracer

SECRET = bytes(range(32))


def _scores(n: int = 4000, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8)).astype(np.float32)
    logits = rng.normal(size=(n, k))
    p = np.exp(logits)
    return x, p / p.sum(axis=1, keepdims=True)


def test_trace_is_deterministic_keyed_and_near_its_rate() -> None:
    x, p = _scores()
    tracer = Tracer(SECRET, rate=0.05)
    a, plan_a = tracer.apply(Batch("key-a", x), p)
    again, plan_again = tracer.apply(Batch("key-a", x), p)
    _, plan_b = tracer.apply(Batch("key-b", x), p)
    mask_a, mask_again, mask_b = plan_a >= 0, plan_again >= 0, plan_b >= 0
    assert np.array_equal(a, again) and np.array_equal(mask_a, mask_again)
    assert 0.04 < mask_a.mean() < 0.06 and 0.04 < mask_b.mean() < 0.06
    assert (mask_a & mask_b).mean() < 0.01  # another key alters other inputs (independent: ~0.0025)
    # altered rows answer another class; the others are untouched
    assert (a[mask_a].argmax(axis=1) != p[mask_a].argmax(axis=1)).all()
    assert np.array_equal(a[mask_a].argmax(axis=1), plan_a[mask_a])
    assert np.array_equal(a[~mask_a], p[~mask_a])
    # a swap: each row keeps its set of values
    assert np.allclose(np.sort(a, axis=1), np.sort(p, axis=1))


def test_trace_targets_are_spread_over_the_other_classes() -> None:
    x, p = _scores(n=20000)
    altered, plan = Tracer(SECRET, rate=0.5).apply(Batch("k", x), p)
    mask = plan >= 0
    shift = (altered[mask].argmax(axis=1) - p[mask].argmax(axis=1)) % 10
    counts = np.bincount(shift, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()


def test_trace_rate_zero_and_bad_arguments() -> None:
    x, p = _scores(n=100)
    same, plan = Tracer(SECRET, rate=0.0).apply(Batch("k", x), p)
    assert (plan == -1).all() and np.array_equal(same, p)
    with pytest.raises(ValueError):
        Tracer(b"short")
    for rate in (-0.1, 1.01):
        with pytest.raises(ValueError):
            Tracer(SECRET, rate=rate)
    # rate 1 (misinformation) alters every row not skipped, each to another class
    skip = np.arange(len(x)) % 3 == 0
    wrong, plan = Tracer(SECRET, rate=1.0).apply(Batch("k", x), p, skip=skip)
    assert (plan[skip] == -1).all() and (plan[~skip] >= 0).all()
    assert np.array_equal(wrong[skip], p[skip])
    assert (wrong[~skip].argmax(axis=1) == plan[~skip]).all() and (plan[~skip] != p[~skip].argmax(axis=1)).all()


def test_policies() -> None:
    x, p = _scores(n=50)
    top2 = policies.top_k(2)(Batch("k", x), p)
    assert ((top2 > 0).sum(axis=1) == 2).all() and np.allclose(top2.sum(axis=1), 1)
    assert np.array_equal(top2.argmax(axis=1), p.argmax(axis=1))
    one_hot = policies.label_only()(Batch("k", x), p)
    assert np.array_equal(one_hot.argmax(axis=1), p.argmax(axis=1)) and (one_hot.sum(axis=1) == 1).all()
    rounded = policies.round_scores(1)(Batch("k", x), p)
    assert np.array_equal(rounded, np.round(p, 1))
    noisy = policies.noise(0.05, SECRET)
    a, b, c = noisy(Batch("k", x), p), noisy(Batch("k", x), p), noisy(Batch("other", x), p)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # keyed: repeating buys nothing
    assert np.array_equal(a.argmax(axis=1), p.argmax(axis=1)) and np.allclose(a.sum(axis=1), 1)
    assert not np.allclose(a, p)
    both = policies.chain([policies.top_k(3), policies.round_scores(2)])(Batch("k", x), p)
    assert np.array_equal(both, np.round(policies.top_k(3)(Batch("k", x), p), 2))
    with pytest.raises(ValueError):
        policies.top_k(0)


def test_keyed_normals_are_standard_normal_and_fixed_by_key_and_row() -> None:
    x, _ = _scores(n=5000)
    z = policies.keyed_normals(SECRET, Batch("k", x), 10)
    assert z.shape == (5000, 10)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.05
    # a row's noise depends on that row only (not on its batch neighbours)
    assert np.array_equal(policies.keyed_normals(SECRET, Batch("k", x[7:8]), 10)[0], z[7])


def test_coverage_pricer_degrades_a_broad_key_and_spares_a_narrow_one() -> None:
    rng = np.random.default_rng(3)
    pricer = policies.CoveragePricer(8, seed=b"s", bits=8, levels=(0.05, 0.15, 0.30))
    _, p = _scores(n=400)
    # a narrow user: rows around one point stay in a few buckets
    home = rng.normal(size=8).astype(np.float32)
    narrow = home + 0.01 * rng.normal(size=(400, 8)).astype(np.float32)
    out = pricer(Batch("narrow", narrow), p)
    assert np.array_equal(out, p) and pricer.coverage("narrow") < 0.05
    # a broad thief: the first rows are answered in full, later ones get coarser, then labels only
    broad = rng.normal(size=(400, 8)).astype(np.float32)
    out = pricer(Batch("thief", broad), p)
    assert np.array_equal(out[:5], p[:5])
    assert np.array_equal(out[-50:], policies.label_only()(Batch("thief", broad), p)[-50:])
    coarse = ~np.isclose(out, p).all(axis=1)
    assert coarse.sum() >= 200 and np.allclose(out[coarse], np.round(out[coarse], 2))
    assert pricer.coverage("thief") > 0.30 and pricer.coverage("narrow") < 0.05  # keys do not mix
