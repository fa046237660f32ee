"""Key-derived randomness (spec §3), trigger generation (§5) and the statistics (§6, §8)."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, chisquare

from modelseal.errors import OwnershipError
from modelseal.ownership import TriggerSpec, stats, triggers
from modelseal.ownership import _derive as d

KEY = bytes(range(32))


# --- spec §3: fixed vectors, and the same numbers recomputed from their definition ---------------


def test_vectors_are_stable() -> None:
    # These bytes are normative: a change here breaks every existing watermark.
    assert d.subkey(KEY, "test").hex() == "ab087b5e6ffdcb1884a31c60d0590b41b631cc261091ba09ee37198afbe66da1"
    assert d.keystream(KEY, "test", 16).hex() == "e606aa8902821d7202507f292729f2bc"
    assert d.uniforms(KEY, "test", 3).tolist() == [0.4457627540774993, 0.7380700798616975, 0.5875580796435748]
    assert d.centred(KEY, "test", 3).tolist() == [0.9531267132272762, 1.4961562089145024, 1.4493828688145802]
    assert d.integers(KEY, "test", 8, 10).tolist() == [8, 0, 0, 5, 9, 6, 3, 0]
    assert d.permutation(KEY, "test", 8).tolist() == [0, 6, 2, 7, 4, 1, 3, 5]


def test_subkey_is_rfc5869_hkdf() -> None:
    prk = hmac.new(b"modelseal-ownership-v1", KEY, hashlib.sha256).digest()
    okm = hmac.new(prk, b"label" + b"\x01", hashlib.sha256).digest()
    assert d.subkey(KEY, "label") == okm


def test_uniforms_follow_the_spec_conversion() -> None:
    stream = d.keystream(KEY, "u", 8 * 5)
    expected = [(struct.unpack_from("<Q", stream, 8 * i)[0] >> 11) * 2.0**-53 for i in range(5)]
    assert d.uniforms(KEY, "u", 5).tolist() == expected


def test_integers_follow_the_spec_rejection_rule() -> None:
    k = 3  # 2**32 mod 3 == 1: the single word 0xFFFFFFFF is rejected
    words = struct.unpack("<64I", d.keystream(KEY, "i", 256))
    limit = 2**32 - (2**32 % k)
    expected = [w % k for w in words if w < limit][:50]
    assert d.integers(KEY, "i", 50, k).tolist() == expected


def test_keystream_prefix_property() -> None:
    assert d.keystream(KEY, "p", 1000)[:100] == d.keystream(KEY, "p", 100)


def test_labels_and_keys_separate_streams() -> None:
    assert d.keystream(KEY, "a", 32) != d.keystream(KEY, "b", 32)
    assert d.keystream(KEY, "a", 32) != d.keystream(bytes(32), "a", 32)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 300), st.integers(1, 1000))
def test_integers_in_range(key: bytes, n: int, k: int) -> None:
    values = d.integers(key, "prop", n, k)
    assert values.shape == (n,) and values.min() >= 0 and values.max() < k


def test_integers_are_uniform() -> None:
    counts = np.bincount(d.integers(KEY, "chi", 70_000, 7), minlength=7)
    assert chisquare(counts).pvalue > 1e-4


def test_centred_has_unit_variance() -> None:
    z = d.centred(KEY, "z", 200_000)
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.01 and np.abs(z).max() <= 2 * math.sqrt(3)


def test_sample_is_distinct() -> None:
    picked = d.sample(KEY, "s", 50, 60)
    assert len(set(picked.tolist())) == 50 and picked.max() < 60
    with pytest.raises(ValueError):
        d.sample(KEY, "s", 61, 60)


# --- triggers (§5) ----------------------------------------------------------------------------------


def _spec(shape: tuple[int, ...] = (1, 8, 8), k: int = 10, families=(("uniform", 30), ("noise", 20), ("stamp", 10))):
    x = np.random.default_rng(0).random((40, *shape)).astype(np.float32)
    return TriggerSpec.from_data(x, k, families), x


def test_triggers_are_deterministic_and_in_range() -> None:
    spec, x = _spec()
    bases = x[triggers.stamp_base_indices(KEY, spec, len(x))]
    a, ta = triggers.generate(KEY, spec, bases)
    b, tb = triggers.generate(KEY, spec, bases)
    assert a.shape == (60, 1, 8, 8) and a.dtype == np.float32 and ta.shape == (60,)
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    low = np.asarray(spec.low, dtype=np.float32).reshape(1, 1, 8, 8)
    high = np.asarray(spec.high, dtype=np.float32).reshape(1, 1, 8, 8)
    assert (a >= low).all() and (a <= high).all()
    assert ta.min() >= 0 and ta.max() < 10
    other, _ = triggers.generate(bytes(32), spec, bases)
    assert not np.array_equal(a, other)


def test_stamp_triggers_keep_most_of_their_base_image() -> None:
    spec, x = _spec(families=(("stamp", 40),))
    bases = x[triggers.stamp_base_indices(KEY, spec, len(x))]
    trig, _ = triggers.generate(KEY, spec, bases)
    order = d.permutation(KEY, "triggers/order", 40)
    changed = (trig != bases[order]).reshape(40, -1).sum(axis=1)
    side = round(math.sqrt(0.2 * 64))
    assert (changed <= side * side).all() and changed.mean() > side * side / 2


def test_stamp_on_vectors_changes_a_fifth_of_the_features() -> None:
    spec, x = _spec(shape=(30,), k=2, families=(("stamp", 20),))
    bases = x[triggers.stamp_base_indices(KEY, spec, len(x))]
    trig, _ = triggers.generate(KEY, spec, bases)
    order = d.permutation(KEY, "triggers/order", 20)
    assert ((trig != bases[order]).sum(axis=1) <= 6).all()


def test_noise_and_wide_follow_their_definitions() -> None:
    """Spec §5.2: noise is clip(mean + std * z, low, high); wide is mean + 1.5 * std * z, unclipped,
    each with z = centred(its family's prefix)."""
    spec, _ = _spec(shape=(30,), k=2, families=(("noise", 50), ("wide", 50)))
    x, _ = triggers.generate(KEY, spec, None)
    back = np.empty_like(x)
    back[d.permutation(KEY, "triggers/order", 100)] = x  # undo the query order
    mean, std = np.asarray(spec.mean), np.asarray(spec.std)
    low, high = np.asarray(spec.low), np.asarray(spec.high)
    z_noise = d.centred(KEY, "triggers/0/noise", 50 * 30).reshape(50, 30)
    z_wide = d.centred(KEY, "triggers/1/wide", 50 * 30).reshape(50, 30)
    assert np.array_equal(back[:50], np.clip(mean + std * z_noise, low, high).astype(np.float32))
    assert np.array_equal(back[50:], (mean + 1.5 * std * z_wide).astype(np.float32))
    # Unclipped: on uniform [0, 1) data (std 0.29, so 1.5 * std = 0.43) |z| > 1.1 leaves the range, ~27%.
    outside = (back[50:] < low.astype(np.float32)) | (back[50:] > high.astype(np.float32))
    assert 0.15 < outside.mean() < 0.45
    assert ((back[:50] >= low.astype(np.float32)) & (back[:50] <= high.astype(np.float32))).all()


def test_stamp_needs_its_bases() -> None:
    spec, _ = _spec()
    with pytest.raises(OwnershipError, match="base inputs"):
        triggers.generate(KEY, spec, None)


def test_spec_round_trip_and_validation() -> None:
    spec, _ = _spec()
    assert TriggerSpec.from_dict(spec.to_dict()) == spec
    assert TriggerSpec.from_dict(spec.to_dict()).digest == spec.digest
    with pytest.raises(OwnershipError, match="malformed"):
        TriggerSpec.from_dict({**spec.to_dict(), "num_classes": "ten"})
    with pytest.raises(OwnershipError):
        TriggerSpec.from_dict({**spec.to_dict(), "families": [["laser", 3]]})
    with pytest.raises(OwnershipError):
        TriggerSpec.from_dict({**spec.to_dict(), "low": [0.0]})
    with pytest.raises(ValueError):
        TriggerSpec.from_data(np.zeros((3, 4)), 1, (("noise", 5),))


def test_default_families_depend_on_shape_and_classes() -> None:
    assert triggers.default_families((1, 8, 8), 10) == (("uniform", 100),)
    assert triggers.default_families((3, 8, 8), 2) == (("uniform", 300),)
    assert triggers.default_families((30,), 2) == (("wide", 400),)
    assert triggers.default_families((30,), 5) == (("wide", 200),)


def test_chance_null_is_exact_over_keys() -> None:
    """Spec §5.4: for a fixed model, matches over many keys follow Binomial(n, 1/K)."""
    n, k, keys = 50, 10, 2000
    answers = np.arange(n) % 3  # any fixed answers: a model that ignores the triggers' key
    counts = np.array(
        [int((d.integers(i.to_bytes(32, "big"), "triggers/targets", n, k) == answers).sum()) for i in range(keys)]
    )
    assert abs(counts.mean() - n / k) < 0.1
    assert abs(counts.var() - n * (1 / k) * (1 - 1 / k)) < 0.5
    # the upper tail is no heavier than the binomial's
    for m in (9, 11, 13):
        assert (counts >= m).mean() <= binom.sf(m - 1, n, 1 / k) + 0.02


# --- statistics (§6, §8) ---------------------------------------------------------------------------


def test_look_schedule_and_weights() -> None:
    assert stats.look_schedule(50) == [50]
    assert stats.look_schedule(100) == [100]
    assert stats.look_schedule(400) == [100, 200, 400]
    assert stats.look_schedule(401) == [100, 200, 400, 401]
    assert stats.look_weights(1) == [1.0]
    assert stats.look_weights(3) == [0.5, 0.25, 0.25]
    assert math.isclose(sum(stats.look_weights(7)), 1.0)


def test_binomial_tail() -> None:
    assert stats.binomial_tail(0, 10, 0.5) == 1.0
    assert stats.binomial_tail(10, 10, 0.5) == pytest.approx(2.0**-10)
    assert stats.binomial_tail(100, 100, 0.1) == pytest.approx(1e-100)


def test_fit_null_refuses_few_models() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        stats.fit_null([1, 2, 3], 10)


def test_fit_null_bounds_cover_the_truth() -> None:
    rng = np.random.default_rng(1)
    fit = stats.fit_null(rng.binomial(200, 0.3, size=50).tolist(), 200)
    assert fit.rate_upper > 0.3 > fit.mean_rate - 0.05
    assert stats.binomial_tail(90, 200, 0.3) <= fit.tail(90)  # more conservative than the truth


def test_calibrated_p_values_are_valid_under_overdispersion() -> None:
    """Reference and test models drawn from the same overdispersed population: calibrated p-values
    must not be smaller than they should (P(p <= a) <= a), across many calibrations."""
    rng = np.random.default_rng(7)
    n, trials, hits = 200, 300, {0.05: 0, 0.01: 0}
    for _ in range(trials):
        rates = rng.beta(6, 24, size=51)  # per-model match rates around 0.2, varying
        counts = rng.binomial(n, rates)
        fit = stats.fit_null(counts[:50].tolist(), n)
        p = fit.tail(int(counts[50]))
        for a in hits:
            hits[a] += p <= a
    assert hits[0.05] / trials <= 0.05 and hits[0.01] / trials <= 0.01
