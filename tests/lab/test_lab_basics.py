"""The lab's foundations: seeded dataset splits, small models and their training, and query-based
model stealing (copycat, knockoff). Accuracy floors here are what the removal and stealing
benchmarks assume of a victim trained with the defaults."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from modelseal.lab import data, extraction, models  # noqa: E402
from modelseal.lab.data import DATASETS, Dataset, load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cancer() -> Dataset:
    return load_dataset("breast_cancer")


@pytest.fixture(scope="module")
def digits_mlp(digits: Dataset) -> nn.Module:
    """An mlp trained on digits with the default settings: the victim of the stealing tests."""
    return models.train(
        models.build("mlp", digits.input_shape, digits.num_classes, seed=0), digits.x_train, digits.y_train
    )


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


class CountingVictim:
    """Wraps a victim and records every call, so tests can check what was queried."""

    def __init__(self, answer: Callable[[np.ndarray], np.ndarray]) -> None:
        self.answer = answer
        self.calls: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(x, copy=True))
        return self.answer(x)


# --- import -------------------------------------------------------------------------------------


def test_import_lab_package_is_light() -> None:
    code = "import sys, modelseal.lab; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not loaded & {"torch", "sklearn", "numpy"}, sorted(loaded & {"torch", "sklearn", "numpy"})


# --- datasets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "shape", "k", "total"),
    [("digits", "image", (1, 8, 8), 10, 1797), ("breast_cancer", "tabular", (30,), 2, 569)],
)
def test_dataset_shapes_and_dtypes(name: str, kind: str, shape: tuple[int, ...], k: int, total: int) -> None:
    ds = load_dataset(name)
    assert (ds.name, ds.kind, ds.input_shape, ds.num_classes) == (name, kind, shape, k)
    for x, y in [(ds.x_train, ds.y_train), (ds.x_test, ds.y_test), (ds.x_pool, ds.y_pool)]:
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *shape) and y.ndim == 1
        assert set(np.unique(y)) == set(range(k))
    assert len(ds.y_train) + len(ds.y_test) + len(ds.y_pool) == total
    assert abs(len(ds.y_train) / total - 0.6) < 0.01
    assert abs(len(ds.y_test) / total - 0.2) < 0.01
    for stat in (ds.feature_low, ds.feature_high, ds.feature_mean, ds.feature_std):
        assert stat.shape == shape and stat.dtype == np.float32
    np.testing.assert_array_equal(ds.feature_low, ds.x_train.min(axis=0))
    np.testing.assert_array_equal(ds.feature_high, ds.x_train.max(axis=0))
    np.testing.assert_allclose(ds.feature_mean, ds.x_train.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(ds.feature_std, ds.x_train.std(axis=0), atol=1e-5)


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint_by_index_and_cover_everything(name: str) -> None:
    ds = load_dataset(name, seed=3)
    train, test, pool = (set(ds.index_train.tolist()), set(ds.index_test.tolist()), set(ds.index_pool.tolist()))
    assert len(train) == len(ds.y_train) and len(test) == len(ds.y_test) and len(pool) == len(ds.y_pool)
    assert not train & test and not train & pool and not test & pool
    assert train | test | pool == set(range(len(train) + len(test) + len(pool)))


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_stratified(name: str) -> None:
    ds = load_dataset(name)
    everything = np.concatenate([ds.y_train, ds.y_test, ds.y_pool])
    overall = np.bincount(everything) / len(everything)
    for y in (ds.y_train, ds.y_test, ds.y_pool):
        assert np.abs(np.bincount(y, minlength=ds.num_classes) / len(y) - overall).max() < 0.02


def test_digits_pixels_in_unit_range(digits: Dataset) -> None:
    for x in (digits.x_train, digits.x_test, digits.x_pool):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.x_train.max() == 1.0


def test_breast_cancer_standardized_on_train(cancer: Dataset) -> None:
    np.testing.assert_allclose(cancer.feature_mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(cancer.feature_std, 1.0, atol=1e-4)
    # Test and pool were scaled with train statistics, so they are only roughly standardized.
    assert np.abs(cancer.x_test.mean(axis=0)).max() < 0.5


@pytest.mark.parametrize("name", DATASETS)
def test_load_is_deterministic(name: str) -> None:
    a, b, c = load_dataset(name, seed=5), load_dataset(name, seed=5), load_dataset(name, seed=6)
    for field in ("x_train", "y_train", "x_test", "y_test", "x_pool", "y_pool", "feature_mean", "feature_std"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.index_train, c.index_train)
    a.x_train[0] = 42.0  # fresh arrays per call: editing one copy touches no other
    assert not np.any(load_dataset(name, seed=5).x_train == 42.0)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="digits, breast_cancer"):
        load_dataset("mnist")


def test_subset_is_stratified_and_seeded(digits: Dataset) -> None:
    x, y = digits.subset(0.25, seed=1)
    assert len(y) == round(0.25 * len(digits.y_train)) and x.shape == (len(y), 1, 8, 8)
    expected = np.bincount(digits.y_train) / len(digits.y_train)
    assert np.abs(np.bincount(y, minlength=10) / len(y) - expected).max() < 0.02
    x2, y2 = digits.subset(0.25, seed=1)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(y, digits.subset(0.25, seed=2)[1])
    x_all, y_all = digits.subset(1.0, seed=0)
    assert Counter(y_all.tolist()) == Counter(digits.y_train.tolist()) and len(x_all) == len(digits.x_train)
    for bad in (0.0, -0.1, 1.5, 0.001):
        with pytest.raises(ValueError):
            digits.subset(bad, seed=0)


def test_halves_partition_the_training_set(digits: Dataset) -> None:
    (xa, ya), (xb, yb) = digits.halves()
    assert abs(len(ya) - len(yb)) <= 1 and len(ya) + len(yb) == len(digits.y_train)
    assert np.abs(np.bincount(ya, minlength=10) - np.bincount(yb, minlength=10)).max() <= 1

    def rows(x: np.ndarray, y: np.ndarray) -> Counter[bytes]:
        return Counter(xi.tobytes() + yi.tobytes() for xi, yi in zip(x, y, strict=True))

    assert rows(xa, ya) + rows(xb, yb) == rows(digits.x_train, digits.y_train)
    (xa2, _), _ = digits.halves()
    np.testing.assert_array_equal(xa, xa2)


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_build_every_architecture(arch: str, digits: Dataset) -> None:
    model = models.build(arch, digits.input_shape, digits.num_classes, seed=0)
    assert models.probabilities(model, digits.x_test[:5]).shape == (5, 10)
    assert _same_weights(model, models.build(arch, digits.input_shape, digits.num_classes, seed=0))
    assert not _same_weights(model, models.build(arch, digits.input_shape, digits.num_classes, seed=1))


def test_architecture_shapes() -> None:
    wide = models.build("mlp-wide", (30,), 2)
    assert [m.out_features for m in wide.modules() if isinstance(m, nn.Linear)] == [256, 256, 2]
    small = models.build("mlp-small", (30,), 2)
    assert [m.out_features for m in small.modules() if isinstance(m, nn.Linear)] == [64, 2]
    cnn = models.small_cnn((1, 8, 8), 10)
    assert [type(m).__name__ for m in cnn.children()] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear",
    ]  # fmt: skip


def test_build_refuses_bad_requests() -> None:
    with pytest.raises(ValueError, match="image shape"):
        models.build("cnn", (30,), 2)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("resnet", (30,), 2)
    with pytest.raises(ValueError):
        models.mlp((30,), 1)


def test_seeding_leaves_global_state_alone(digits: Dataset) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    model = models.build("mlp-small", digits.input_shape, 10, seed=7)
    models.train(model, digits.x_train[:100], digits.y_train[:100], epochs=2, seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_training_is_deterministic(digits: Dataset) -> None:
    def run(seed: int) -> nn.Module:
        model = models.build("cnn", digits.input_shape, 10, seed=0)
        return models.train(model, digits.x_train[:300], digits.y_train[:300], epochs=3, seed=seed)

    a = run(0)
    assert _same_weights(a, run(0))
    assert not _same_weights(a, run(1))  # the shuffle follows the seed
    assert not a.training


@pytest.mark.parametrize(
    ("name", "arch", "floor"), [("digits", "mlp", 0.94), ("digits", "cnn", 0.95), ("breast_cancer", "mlp", 0.93)]
)
def test_default_training_reaches_accuracy_floor(name: str, arch: str, floor: float) -> None:
    ds = load_dataset(name)
    model = models.train(models.build(arch, ds.input_shape, ds.num_classes, seed=0), ds.x_train, ds.y_train)
    assert models.accuracy(model, ds.x_test, ds.y_test) >= floor


def test_soft_label_training_follows_the_teacher(digits: Dataset, digits_mlp: nn.Module) -> None:
    soft = models.probabilities(digits_mlp, digits.x_pool)
    student = models.train(models.build("mlp-small", digits.input_shape, 10, seed=3), digits.x_pool, soft, epochs=40)
    fidelity = models.agreement(models.predict(student, digits.x_test), models.predict(digits_mlp, digits.x_test))
    assert fidelity >= 0.9


def test_train_refuses_bad_targets(digits: Dataset) -> None:
    model = models.build("mlp-small", digits.input_shape, 10)
    x, y = digits.x_train[:20], digits.y_train[:20]
    bad: list[tuple[np.ndarray, np.ndarray]] = [
        (x, y[:10]),  # lengths differ
        (x, y.astype(np.float32)),  # float labels
        (x, np.full(20, 10)),  # label out of range
        (x, np.full((20, 3), 1 / 3)),  # wrong number of classes
        (x[:0], y[:0]),  # empty
    ]
    for xs, ys in bad:
        with pytest.raises(ValueError):
            models.train(model, xs, ys, epochs=1)
    with pytest.raises(ValueError):
        models.train(model, x, y, epochs=0)


def test_predictions_and_agreement(digits: Dataset, digits_mlp: nn.Module) -> None:
    probs = models.probabilities(digits_mlp, digits.x_test, batch_size=100)
    labels = models.predict(digits_mlp, digits.x_test, batch_size=7)
    assert probs.dtype == np.float64 and probs.shape == (len(digits.x_test), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))
    assert models.accuracy(digits_mlp, digits.x_test, digits.y_test) == models.agreement(labels, digits.y_test)
    assert models.agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        models.agreement(np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        models.agreement(np.array([]), np.array([]))
    digits_mlp.train()
    models.predict(digits_mlp, digits.x_test[:3])
    assert digits_mlp.training  # the caller's mode is restored
    digits_mlp.eval()


# --- extraction ---------------------------------------------------------------------------------


def test_copycat_with_probabilities_copies_the_victim(digits: Dataset, digits_mlp: nn.Module) -> None:
    victim = CountingVictim(lambda x: models.probabilities(digits_mlp, x))
    student = models.build("mlp", digits.input_shape, 10, seed=1)
    result = extraction.copycat(victim, digits.x_pool, student=student, budget=300, outputs="probabilities")
    assert result.student is student and result.outputs == "probabilities"
    assert result.queries == 300 and len(victim.calls) == 1 and len(victim.calls[0]) == 300
    # Distinct pool rows (without replacement), all taken from the pool.
    pool_rows = {row.tobytes() for row in digits.x_pool}
    assert all(row.tobytes() in pool_rows for row in victim.calls[0])
    fidelity = models.agreement(models.predict(student, digits.x_test), models.predict(digits_mlp, digits.x_test))
    assert fidelity >= 0.85


def test_copycat_budget_beyond_pool_reports_real_count(cancer: Dataset) -> None:
    teacher = models.train(models.build("mlp-small", cancer.input_shape, 2), cancer.x_train, cancer.y_train, epochs=20)
    victim = CountingVictim(extraction.victim_from_model(teacher, "labels"))
    student = models.build("mlp-small", cancer.input_shape, 2, seed=1)
    result = extraction.copycat(victim, cancer.x_pool, student=student, budget=10_000, epochs=5)
    assert result.queries == len(cancer.x_pool) == len(victim.calls[0]) and result.outputs == "labels"


def test_copycat_is_deterministic(digits: Dataset, digits_mlp: nn.Module) -> None:
    def run(seed: int) -> tuple[nn.Module, np.ndarray]:
        victim = CountingVictim(extraction.victim_from_model(digits_mlp, "labels"))
        student = models.build("mlp-small", digits.input_shape, 10, seed=0)
        extraction.copycat(victim, digits.x_pool, student=student, budget=50, epochs=2, seed=seed)
        return student, victim.calls[0]

    (a, qa), (b, qb), (_, qc) = run(4), run(4), run(5)
    assert _same_weights(a, b)
    np.testing.assert_array_equal(qa, qb)
    assert not np.array_equal(qa, qc)


def test_knockoff_random_spends_budgets_beyond_the_pool(digits: Dataset, digits_mlp: nn.Module) -> None:
    victim = CountingVictim(extraction.victim_from_model(digits_mlp, "probabilities"))
    budget = 2 * len(digits.x_pool)
    student = models.build("mlp-small", digits.input_shape, 10, seed=1)
    result = extraction.knockoff_random(
        victim, digits.x_pool, student=student, budget=budget, outputs="probabilities", epochs=5, seed=2
    )
    queries = victim.calls[0]
    assert result.queries == budget == len(queries) and queries.dtype == np.float32
    assert queries.min() >= digits.x_pool.min() and queries.max() <= digits.x_pool.max()  # clipped to range
    pool_rows = {row.tobytes() for row in digits.x_pool}
    assert sum(row.tobytes() in pool_rows for row in queries) < budget // 10  # jittered, not copies
    plain = CountingVictim(extraction.victim_from_model(digits_mlp, "labels"))
    extraction.knockoff_random(plain, digits.x_pool, student=student, budget=30, epochs=1, jitter=0.0)
    assert all(row.tobytes() in pool_rows for row in plain.calls[0])


def test_extraction_refuses_bad_requests(digits: Dataset, digits_mlp: nn.Module) -> None:
    student = models.build("mlp-small", digits.input_shape, 10)
    labels = extraction.victim_from_model(digits_mlp, "labels")
    probs = extraction.victim_from_model(digits_mlp, "probabilities")
    pool = digits.x_pool
    for attack in (extraction.copycat, extraction.knockoff_random):
        with pytest.raises(ValueError, match="outputs"):
            attack(labels, pool, student=student, budget=10, outputs="logits")
        with pytest.raises(ValueError, match="budget"):
            attack(labels, pool, student=student, budget=0)
        with pytest.raises(ValueError, match="empty"):
            attack(labels, pool[:0], student=student, budget=10)
        with pytest.raises(ValueError, match="labels victim"):
            attack(probs, pool, student=student, budget=10, outputs="labels")
        with pytest.raises(ValueError, match="probabilities victim"):
            attack(labels, pool, student=student, budget=10, outputs="probabilities")
    with pytest.raises(ValueError, match="jitter"):
        extraction.knockoff_random(labels, pool, student=student, budget=10, jitter=-1.0)
    with pytest.raises(ValueError, match="outputs"):
        extraction.victim_from_model(digits_mlp, "logits")


def test_data_module_exports() -> None:
    assert data.DATASETS == ("digits", "breast_cancer")
    assert set(models.ARCHITECTURES) == {"mlp", "mlp-small", "mlp-wide", "cnn"}
