"""The model-stealing lab's attacks and targets: Copycat, Knockoff Nets (random and adaptive) and
Jacobian-based augmentation against a digits MLP, each within its query budget; victims as a local
model, a sealed ONNX file opened in memory, and a live gateway reached through several sybil API keys
until every key's quota is spent."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

import httpx  # noqa: E402
from torch import nn  # noqa: E402

import modelseal  # noqa: E402
from modelseal.lab import extraction, models  # noqa: E402
from modelseal.lab.data import Dataset, load_dataset  # noqa: E402
from modelseal.lab.targets import (  # noqa: E402
    HttpTarget,
    LocalTarget,
    MalformedAnswer,
    OnnxTarget,
    QueryRefused,
    TargetError,
)

SMALL = "mlp-small"  # students: fast to train, and enough to copy a digits MLP


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These models are tiny: a second intra-op thread only adds contention on a busy 2-core runner
    (the suite ran 6x slower with it under load). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def victim(digits: Dataset) -> nn.Module:
    model = models.build("mlp", digits.input_shape, 10, seed=0)
    return models.train(model, digits.x_train, digits.y_train, epochs=30)


@pytest.fixture(scope="module")
def sealed(victim: nn.Module, digits: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The victim exported to ONNX and sealed for a device identity (``device.key`` beside it); the
    plaintext ONNX file is deleted."""
    root = tmp_path_factory.mktemp("sealed-digits")
    plain = root / "digits.onnx"
    torch.onnx.export(
        victim, (torch.zeros((1, *digits.input_shape)),), str(plain), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    identity = modelseal.Identity.generate()
    identity.save(root / "device.key")
    modelseal.seal(plain, root / "digits.mseal", recipients=[identity.recipient])
    plain.unlink()
    return root / "digits.mseal"


class CountingVictim:
    """Wraps a victim and records every batch it is asked about."""

    def __init__(self, answer: Callable[[np.ndarray], np.ndarray]) -> None:
        self.answer = answer
        self.calls: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(x, copy=True))
        return self.answer(x)

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self.calls)


def _fidelity(student: nn.Module, victim: nn.Module, digits: Dataset) -> float:
    return models.agreement(models.predict(student, digits.x_test), models.predict(victim, digits.x_test))


def _seed_set(digits: Dataset, n: int = 60) -> np.ndarray:
    return digits.x_pool[np.random.default_rng(0).choice(len(digits.x_pool), n, replace=False)]


def _run(
    attack: str, victim: extraction.Victim, digits: Dataset, *, budget: int, outputs: str, **kw: Any
) -> extraction.ExtractionResult:
    student = models.build(SMALL, digits.input_shape, 10, seed=1)
    rng: dict[str, Any] = {"feature_low": digits.feature_low, "feature_high": digits.feature_high}
    if attack == "copycat":
        return extraction.copycat(victim, digits.x_pool, student=student, budget=budget, outputs=outputs, **kw)
    if attack == "knockoff_random":
        return extraction.knockoff_random(
            victim, digits.x_pool, student=student, budget=budget, outputs=outputs, **rng, **kw
        )
    if attack == "knockoff_adaptive":
        return extraction.knockoff_adaptive(
            victim, digits.x_pool, student=student, budget=budget, outputs=outputs, round_epochs=5, **rng, **kw
        )
    assert attack == "jacobian"
    return extraction.jacobian_augmentation(
        victim, _seed_set(digits), student=student, budget=budget, outputs=outputs, round_epochs=10, **rng, **kw
    )


ATTACKS = ["copycat", "knockoff_random", "knockoff_adaptive", "jacobian"]


# --- every attack: budget, batching, and a real copy ---------------------------------------------


@pytest.mark.parametrize(
    ("attack", "outputs", "floor"),
    [
        ("copycat", "labels", 0.8),
        ("knockoff_random", "probabilities", 0.8),
        ("knockoff_adaptive", "labels", 0.8),
        ("knockoff_adaptive", "probabilities", 0.8),
        ("jacobian", "labels", 0.7),
        ("jacobian", "probabilities", 0.7),
    ],
)
def test_attack_spends_its_budget_in_batches_and_copies_the_victim(
    attack: str, outputs: str, floor: float, digits: Dataset, victim: nn.Module
) -> None:
    counting = CountingVictim(extraction.victim_from_model(victim, outputs))
    result = _run(attack, counting, digits, budget=300, outputs=outputs, batch_size=64, epochs=40)
    assert counting.rows == result.queries == 300  # exactly the budget: never more, and none wasted
    assert all(1 <= len(c) <= 64 for c in counting.calls)
    assert result.inputs is not None and result.inputs.shape == (300, *digits.input_shape)
    np.testing.assert_array_equal(result.inputs, np.concatenate(counting.calls))
    assert result.refused is None and result.outputs == outputs
    random_init = _fidelity(models.build(SMALL, digits.input_shape, 10, seed=1), victim, digits)
    fidelity = _fidelity(result.student, victim, digits)
    assert random_init < 0.3 and fidelity >= floor, (random_init, fidelity)


def test_copycat_without_batch_size_still_sends_one_call(digits: Dataset, victim: nn.Module) -> None:
    counting = CountingVictim(extraction.victim_from_model(victim, "labels"))
    student = models.build(SMALL, digits.input_shape, 10, seed=1)
    extraction.copycat(counting, digits.x_pool, student=student, budget=100, epochs=1)
    assert [len(c) for c in counting.calls] == [100]


def test_jacobian_points_are_synthetic_and_stay_in_range(digits: Dataset, victim: nn.Module) -> None:
    seed_set = _seed_set(digits, 50)
    result = extraction.jacobian_augmentation(
        extraction.victim_from_model(victim, "labels"),
        seed_set,
        student=models.build(SMALL, digits.input_shape, 10, seed=1),
        budget=330,
        lam=0.1,
        epochs=5,
        round_epochs=5,
        feature_low=digits.feature_low,
        feature_high=digits.feature_high,
    )
    assert isinstance(result, extraction.JacobianResult) and result.inputs is not None
    assert result.queries == 330 and len(result.inputs) == 330
    # the seed set first, then three rounds: 50 -> 100 -> 200 -> 330 (the last one cut to the budget)
    assert result.rounds == 3 and int(result.synthetic.sum()) == 280 and not result.synthetic[:50].any()
    np.testing.assert_array_equal(result.inputs[:50], seed_set)
    synthetic = result.inputs[result.synthetic]
    assert np.all(synthetic >= digits.feature_low) and np.all(synthetic <= digits.feature_high)
    natural = {row.tobytes() for row in digits.x_pool} | {row.tobytes() for row in digits.x_train}
    assert not any(row.tobytes() in natural for row in synthetic)
    assert len({row.tobytes() for row in synthetic}) > 0.95 * len(synthetic)
    # the first round moved every feature of each seed point by -lam, 0 or +lam times its range, clipped
    low, high = digits.feature_low, digits.feature_high
    options = [np.clip(seed_set + sign * 0.1 * (high - low), low, high) for sign in (-1, 0, 1)]
    first = synthetic[:50]
    assert np.all(np.any([np.isclose(first, o, atol=1e-6) for o in options], axis=0))
    assert np.all(np.isclose(first, options[0], atol=1e-6) | np.isclose(first, options[2], atol=1e-6))


# --- the adaptive bandit ----------------------------------------------------------------------------


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    """Four far-apart blobs of 60 rows in 8 dimensions; the blob of each row."""
    rng = np.random.default_rng(3)
    centres = np.eye(4, 8) * 6.0
    blob = np.repeat(np.arange(4), 60)
    return (centres[blob] + rng.normal(scale=0.3, size=(240, 8))).astype(np.float32), blob


def _blob_victim(x: np.ndarray) -> np.ndarray:
    """Blobs 0-2 have one class each (learnt at once); blob 3's classes look random (never learnt)."""
    blob = np.argmax(x[:, :4], axis=1)
    scrambled = (np.floor(np.abs(x[:, 4:]).sum(axis=1) * 1e4).astype(np.int64) * 7919) % 3
    out: np.ndarray = np.where(blob == 3, scrambled, blob).astype(np.int64)
    return out


def test_adaptive_bandit_moves_to_the_arm_the_student_cannot_learn() -> None:
    pool, blob = _blobs()

    def attack(**kw: Any) -> extraction.AdaptiveResult:
        return extraction.knockoff_adaptive(
            CountingVictim(_blob_victim),
            pool,
            student=models.build(SMALL, (8,), 3, seed=0),
            budget=400,
            rounds=8,
            round_epochs=10,
            epochs=5,
            seed=2,
            **kw,
        )

    result = attack(arms=blob)
    assert result.arm_sizes.tolist() == [60, 60, 60, 60]
    assert result.arm_counts.sum() == result.queries == 400 and len(result.arms) == 400
    assert np.array_equal(np.bincount(result.arms, minlength=4), result.arm_counts)
    # the policy starts uniform and ends favouring blob 3, which gets most of the queries
    np.testing.assert_allclose(result.policies[0], 0.25)
    assert int(np.argmax(result.policies[-1])) == 3 and result.policies[-1][3] > 0.4
    assert result.arm_counts[3] > 1.5 * result.arm_counts[:3].max(), result.arm_counts
    # blob 3 ran out of fresh rows: its repeats are jittered copies, not pool rows
    assert result.arm_counts[3] > 60 and result.inputs is not None
    pool_rows = {row.tobytes() for row in pool}
    fresh = sum(row.tobytes() in pool_rows for row in result.inputs)
    assert fresh == sum(min(int(c), 60) for c in result.arm_counts)
    # deterministic, and k-means finds the blobs by itself
    again = attack(arms=blob)
    np.testing.assert_array_equal(result.arms, again.arms)
    clustered = attack(arms=4)
    assert sorted(clustered.arm_sizes.tolist()) == [60, 60, 60, 60]
    assert clustered.arm_counts.max() > 1.5 * np.sort(clustered.arm_counts)[-2]


def test_adaptive_rewards_and_their_limits(digits: Dataset, victim: nn.Module) -> None:
    probs = extraction.victim_from_model(victim, "probabilities")
    student = models.build(SMALL, digits.input_shape, 10, seed=1)
    result = extraction.knockoff_adaptive(
        probs, digits.x_pool, student=student, budget=120, outputs="probabilities", reward="certainty",
        arms=6, rounds=3, round_epochs=2, epochs=2,
    )  # fmt: skip
    assert result.queries == 120 and len(result.arm_sizes) == 6 and result.arm_sizes.sum() == len(digits.x_pool)
    assert np.all((result.rewards >= 0) & (result.rewards <= 1))  # the victim's top-2 margins
    labels = extraction.victim_from_model(victim, "labels")
    with pytest.raises(ValueError, match="certainty"):
        extraction.knockoff_adaptive(labels, digits.x_pool, student=student, budget=10, reward="certainty")
    with pytest.raises(ValueError, match="reward"):
        extraction.knockoff_adaptive(labels, digits.x_pool, student=student, budget=10, reward="greed")
    with pytest.raises(ValueError, match="arms"):
        extraction.knockoff_adaptive(labels, digits.x_pool, student=student, budget=10, arms=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        extraction.copycat(labels, digits.x_pool, student=student, budget=10, batch_size=0)
    with pytest.raises(ValueError, match="lam"):
        extraction.jacobian_augmentation(labels, digits.x_pool[:5], student=student, budget=10, lam=0.0)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_stops_at_a_refusal_and_trains_on_what_it_got(attack: str, digits: Dataset, victim: nn.Module) -> None:
    target = LocalTarget(victim, "labels", quota=150)
    result = _run(attack, target, digits, budget=300, outputs="labels", batch_size=64, epochs=2)
    # 64 + 64 + the 22 rows the quota still allowed, which the refusal carries
    assert result.queries == target.queries == 150 and result.inputs is not None and len(result.inputs) == 150
    assert result.refused is not None and "quota" in result.refused
    with pytest.raises(QueryRefused):  # nothing answered at all: nothing to train on
        _run(attack, LocalTarget(victim, "labels", quota=0), digits, budget=300, outputs="labels", epochs=1)


def test_local_target_counts_and_refuses(digits: Dataset, victim: nn.Module) -> None:
    target = LocalTarget(victim, "probabilities", batch_size=50, quota=120)
    first = target(digits.x_test[:100])
    assert first.shape == (100, 10) and target.queries == 100 and target.calls == 1
    np.testing.assert_allclose(first, models.probabilities(victim, digits.x_test[:100]))
    with pytest.raises(QueryRefused) as refused:
        target(digits.x_test[100:150])
    assert refused.value.answered == 20 and target.queries == 120 and refused.value.answers is not None
    np.testing.assert_allclose(refused.value.answers, models.probabilities(victim, digits.x_test[100:120]))
    wrong = LocalTarget(lambda x: np.zeros(len(x), np.float32), "labels")
    with pytest.raises(MalformedAnswer, match="integers"):
        wrong(digits.x_test[:3])


# --- ONNX and sealed targets --------------------------------------------------------------------


def test_onnx_target_opens_a_sealed_model_in_memory(digits: Dataset, victim: nn.Module, sealed: Path) -> None:
    before = sorted(p.name for p in sealed.parent.iterdir())
    identity = modelseal.Identity.load(sealed.parent / "device.key")
    x = digits.x_test[:200]
    probs = OnnxTarget(sealed, "probabilities", identity=identity, batch_size=64)
    answers = probs(x)
    assert answers.shape == (200, 10) and probs.queries == 200 and probs.name.startswith("sealed:")
    np.testing.assert_allclose(answers, models.probabilities(victim, x), atol=1e-5)  # softmax of its logits
    labels = OnnxTarget(sealed, "labels", identity=identity)
    np.testing.assert_array_equal(labels(x), models.predict(victim, x))
    assert sorted(p.name for p in sealed.parent.iterdir()) == before  # no plaintext written beside it
    with pytest.raises(modelseal.WrongKeyError):
        OnnxTarget(sealed, identity=modelseal.Identity.generate())
    with pytest.raises(ValueError, match="sealed container"):
        OnnxTarget(sealed.with_suffix(".onnx"), identity=identity)
    with pytest.raises(TargetError, match="no such"):
        OnnxTarget(sealed.parent / "missing.onnx")
    # an attack steals through it like through any victim
    result = extraction.copycat(labels, digits.x_pool, student=models.build(SMALL, (1, 8, 8), 10), budget=50, epochs=1)
    assert result.queries == 50 and labels.queries == 250


# --- a live gateway through sybil keys ----------------------------------------------------------


class FrozenClockQuota:
    """The gateway's in-process quota store with the clock held still (a test must not straddle a
    minute boundary by chance); ``now`` is moved by hand."""

    def __init__(self, now: float) -> None:
        from modelseal.gateway.quota import MemoryQuota

        self.now = now
        self._inner = MemoryQuota()

    def charge(self, key_id: str, rows: int, limits: Any, *, now: float | None = None) -> None:
        self._inner.charge(key_id, rows, limits, now=self.now if now is None else now)

    def usage(self, key_id: str, *, now: float | None = None) -> dict[str, int]:
        return self._inner.usage(key_id, now=self.now if now is None else now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def gateway_client(sealed: Path, tmp_path: Path) -> Iterator[tuple[Any, Any, FrozenClockQuota]]:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from modelseal.gateway.app import create_app
    from modelseal.gateway.service import Gateway

    from ..gateway.conftest import make_config

    quota = FrozenClockQuota(1_700_000_010.0)  # 30 s before a minute boundary
    config = make_config(
        tmp_path, sealed, trace_rate=0.0, max_batch=64,
        tiers={"default": {"per_minute": 120}, "roomy": {}, "labels": {"policy": ["label_only"]}},
    )  # fmt: skip
    gateway = Gateway(config, quota=quota)  # type: ignore[arg-type]
    try:
        with TestClient(create_app(gateway)) as client:
            yield gateway, client, quota
    finally:
        gateway.close()


def test_http_target_rotates_sybil_keys_until_every_quota_is_spent(
    gateway_client: tuple[Any, Any, FrozenClockQuota], digits: Dataset, victim: nn.Module, sealed: Path
) -> None:
    gateway, client, quota = gateway_client
    sybils = [gateway.store.create(f"sybil-{i}")[1] for i in range(3)]
    clock = [100.0]
    target = HttpTarget("http://testserver", sybils, "labels", batch_size=40, client=client, clock=lambda: clock[0])

    x = digits.x_test[:90]
    labels = target(x)  # 40, 40 and 10 rows, one request through each key in turn
    np.testing.assert_array_equal(labels, models.predict(victim, x))
    identity = modelseal.Identity.load(sealed.parent / "device.key")
    np.testing.assert_array_equal(labels, OnnxTarget(sealed, "labels", identity=identity)(x))
    assert [target.queries_by_key[k] for k in sybils] == [40, 40, 10] and target.policy == "full"

    # a thief with a budget of 500 gets what three quotas of 120 rows a minute allow, then stops
    student = models.build(SMALL, digits.input_shape, 10, seed=1)
    result = extraction.copycat(target, digits.x_pool, student=student, budget=500, epochs=30, seed=3)
    by_key = [target.queries_by_key[k] for k in sybils]
    assert by_key == [120, 120, 90]  # the last key's 30 rows left are less than a request of 40
    assert sum(by_key) == target.queries == 90 + result.queries and result.queries == 240
    assert result.refused is not None and "every API key is refused" in result.refused and "429" in result.refused
    assert all(math.isfinite(until) for until, _ in target.refused.values()) and len(target.refused) == 3
    assert _fidelity(student, victim, digits) >= 0.8
    for token in sybils:  # the gateway saw what the target counted
        assert gateway.quota.usage(token.split("_")[1])["minute"] == target.queries_by_key[token]

    with pytest.raises(QueryRefused) as refused:
        target(digits.x_test[:5])
    assert refused.value.answers is None and refused.value.retry_after == pytest.approx(30.0)
    # a minute later the gateway and the target both let the keys in again
    quota.now += 60
    clock[0] += 60
    assert target(digits.x_test[:5]).shape == (5,) and not target.refused


def test_http_target_scores_413_and_revoked_keys(
    gateway_client: tuple[Any, Any, FrozenClockQuota], digits: Dataset, victim: nn.Module
) -> None:
    gateway, client, _ = gateway_client
    roomy = gateway.store.create("roomy", tier="roomy")[1]
    # a bogus key is set aside for good; a batch over the gateway's max_batch (64) is halved
    target = HttpTarget("http://testserver/", ["msk_bogus_key", roomy], "probabilities", batch_size=100, client=client)
    x = digits.x_test[:150]
    scores = target(x)
    np.testing.assert_allclose(scores, models.probabilities(victim, x), atol=1e-5)
    assert target.batch_size == 50 and target.queries_by_key == {"msk_bogus_key": 0, roomy: 150}
    assert target.refused["msk_bogus_key"][0] == math.inf and "401" in target.refused["msk_bogus_key"][1]
    # a label-only key's scores are one-hot rows
    labels_key = gateway.store.create("labels-only", tier="labels")[1]
    onehot = HttpTarget("http://testserver", [labels_key], "probabilities", client=client)(x[:10])
    np.testing.assert_array_equal(onehot.argmax(axis=1), models.predict(victim, x[:10]))
    assert set(np.unique(onehot)) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("status", "body", "error", "match"),
    [
        (200, b"not json", MalformedAnswer, "not JSON"),
        (200, b'{"scores": [[1, 0]]}', MalformedAnswer, "no 'labels'"),
        (200, b'{"labels": [0.5, 1]}', MalformedAnswer, "integers"),
        (200, b'{"labels": [0, 1, 2]}', MalformedAnswer, "expected 2 labels"),
        (200, b'{"labels": [true, false]}', MalformedAnswer, "integers"),
        (500, b'{"error": "boom"}', TargetError, "HTTP 500"),
    ],
)
def test_http_target_refuses_malformed_answers(status: int, body: bytes, error: type[Exception], match: str) -> None:
    seen: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=body)

    with httpx.Client(transport=httpx.MockTransport(reply)) as client:
        target = HttpTarget("http://gateway.test", ["msk_a_b"], "labels", client=client)
        with pytest.raises(error, match=match):
            target(np.zeros((2, 4), np.float32))
    assert seen[0].url.path == "/v1/predict" and seen[0].headers["authorization"] == "Bearer msk_a_b"
    assert target.queries == 0


def test_http_target_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="api_keys"):
        HttpTarget("http://x", [])
    with pytest.raises(ValueError, match="duplicates"):
        HttpTarget("http://x", ["a", "a"])
    with pytest.raises(ValueError, match="http"):
        HttpTarget("ftp://x", ["a"])
    with pytest.raises(ValueError, match="outputs"):
        HttpTarget("http://x", ["a"], "logits")


# --- a larger attacker pool ---------------------------------------------------------------------


def test_pool_fraction_resplits_for_a_larger_pool(digits: Dataset) -> None:
    big = load_dataset("digits", pool_fraction=0.4)
    assert (len(big.x_train), len(big.x_test), len(big.x_pool)) == (718, 359, 720)
    parts = [set(big.index_train), set(big.index_test), set(big.index_pool)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1797
    assert np.bincount(big.y_pool).min() >= 65  # stratified (about 72 a class)
    assert len(digits.x_pool) == 360  # the default split is unchanged
    with pytest.raises(ValueError, match="pool_fraction"):
        load_dataset("digits", pool_fraction=0.9)
