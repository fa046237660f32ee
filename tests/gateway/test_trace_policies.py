"""Traceable answers and output policies (docs/spec/gateway-v1.md §5, §7)."""

from __future__ import annotations

import numpy as np
import pytest

from modelseal.gateway import policies
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
    a, mask_a = tracer.apply("key-a", x, p)
    again, mask_again = tracer.apply("key-a", x, p)
    _, mask_b = tracer.apply("key-b", x, p)
    assert np.array_equal(a, again) and np.array_equal(mask_a, mask_again)
    assert 0.04 < mask_a.mean() < 0.06 and 0.04 < mask_b.mean() < 0.06
    assert (mask_a & mask_b).mean() < 0.01  # another key alters other inputs (independent: ~0.0025)
    # altered rows answer another class; the others are untouched
    assert (a[mask_a].argmax(axis=1) != p[mask_a].argmax(axis=1)).all()
    assert np.array_equal(a[~mask_a], p[~mask_a])
    # a swap: each row keeps its set of values
    assert np.allclose(np.sort(a, axis=1), np.sort(p, axis=1))


def test_trace_targets_are_spread_over_the_other_classes() -> None:
    x, p = _scores(n=20000)
    altered, mask = Tracer(SECRET, rate=0.5).apply("k", x, p)
    shift = (altered[mask].argmax(axis=1) - p[mask].argmax(axis=1)) % 10
    counts = np.bincount(shift, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()


def test_trace_rate_zero_and_bad_arguments() -> None:
    x, p = _scores(n=100)
    same, mask = Tracer(SECRET, rate=0.0).apply("k", x, p)
    assert not mask.any() and np.array_equal(same, p)
    with pytest.raises(ValueError):
        Tracer(b"short")
    with pytest.raises(ValueError):
        Tracer(SECRET, rate=1.0)


def test_policies() -> None:
    x, p = _scores(n=50)
    top2 = policies.top_k(2)("k", x, p)
    assert ((top2 > 0).sum(axis=1) == 2).all() and np.allclose(top2.sum(axis=1), 1)
    assert np.array_equal(top2.argmax(axis=1), p.argmax(axis=1))
    one_hot = policies.label_only()("k", x, p)
    assert np.array_equal(one_hot.argmax(axis=1), p.argmax(axis=1)) and (one_hot.sum(axis=1) == 1).all()
    rounded = policies.round_scores(1)("k", x, p)
    assert np.array_equal(rounded, np.round(p, 1))
    noisy = policies.noise(0.05, SECRET)
    a, b, c = noisy("k", x, p), noisy("k", x, p), noisy("other", x, p)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # keyed: repeating buys nothing
    assert np.array_equal(a.argmax(axis=1), p.argmax(axis=1)) and np.allclose(a.sum(axis=1), 1)
    assert not np.allclose(a, p)
    both = policies.chain([policies.top_k(3), policies.round_scores(2)])("k", x, p)
    assert np.array_equal(both, np.round(policies.top_k(3)("k", x, p), 2))
    with pytest.raises(ValueError):
        policies.top_k(0)
