"""IBM ART's CopycatCNN and KnockoffNets as the lab's external reference (modelseal.lab.art_reference).

Every run is seeded. The victim is a digits MLP (about 0.97 accurate); the accuracy floor sits well
below what ART's copycat reaches with 300 label queries (0.90 to 0.92 over seeds 0 to 2; chance is 0.10).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("art")

from torch import nn  # noqa: E402

from modelseal.lab import models  # noqa: E402
from modelseal.lab.art_reference import (  # noqa: E402
    art_extract,
    art_postprocessor_table,
    format_postprocessor_table,
)
from modelseal.lab.data import Dataset, load_dataset  # noqa: E402

EPOCHS = 40  # the thief's training; fewer than the default 100 to keep the tests quick


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def victim(digits: Dataset) -> nn.Module:
    model = models.build("mlp", digits.input_shape, digits.num_classes, seed=0)
    return models.train(model, digits.x_train, digits.y_train, epochs=30)


def test_copycat_steals_a_digits_mlp(victim: nn.Module, digits: Dataset) -> None:
    assert models.accuracy(victim, digits.x_test, digits.y_test) > 0.9
    result = art_extract(victim, digits, attack="copycat", budget=300, outputs="labels", seed=0, epochs=EPOCHS)
    assert result["queries"] == 300
    assert result["accuracy"] > 0.8  # chance is 0.1; seeds 0, 1, 2 give 0.92, 0.90, 0.92
    assert result["fidelity"] > 0.8


def test_budgets_are_respected(victim: nn.Module, digits: Dataset) -> None:
    # Copycat samples the pool without replacement, so it spends at most the pool.
    big = art_extract(victim, digits, attack="copycat", budget=10_000, seed=1, epochs=1)
    assert big["queries"] == len(digits.x_pool) <= 10_000
    # Adaptive knockoff queries one row at a time, with replacement: exactly the budget.
    adaptive = art_extract(victim, digits, attack="knockoff-adaptive", budget=40, seed=1, epochs=1)
    assert adaptive["queries"] == 40
    small = art_extract(victim, digits, attack="knockoff-random", budget=7, outputs="probabilities", seed=1, epochs=1)
    assert small["queries"] == 7


def test_a_label_only_thief_ignores_a_postprocessor_that_keeps_the_top_label(
    victim: nn.Module, digits: Dataset
) -> None:
    plain = art_extract(victim, digits, budget=150, outputs="labels", seed=3, epochs=EPOCHS)
    rounded = art_extract(victim, digits, budget=150, outputs="labels", postprocessor="rounded", seed=3, epochs=EPOCHS)
    assert rounded == plain  # same seed, same queries, same labels: the very same thief
    again = art_extract(victim, digits, budget=150, outputs="labels", seed=3, epochs=EPOCHS)
    assert again == plain  # deterministic given the seed


def test_the_victim_and_global_generators_are_left_alone(victim: nn.Module, digits: Dataset) -> None:
    before = [p.detach().clone() for p in victim.parameters()]
    victim.train()
    np.random.seed(123)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.random(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    try:
        art_extract(victim, digits, budget=20, postprocessor="gaussian_noise", seed=0, epochs=1)
        assert victim.training
        assert all(torch.equal(a, b) for a, b in zip(before, victim.parameters(), strict=True))
        assert np.random.random() == expected_np
        assert torch.equal(torch.rand(1), expected_torch)
    finally:
        victim.eval()


def test_postprocessor_table_has_one_row_per_cell(victim: nn.Module, digits: Dataset) -> None:
    rows = art_postprocessor_table(victim, digits, budgets=(30,), seed=0, postprocessors=(None, "rounded"), epochs=2)
    assert [(r["postprocessor"], r["outputs"]) for r in rows] == [
        ("none", "labels"),
        ("none", "probabilities"),
        ("rounded", "labels"),
        ("rounded", "probabilities"),
    ]
    assert all(r["queries"] == 30 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    table = format_postprocessor_table(rows)
    assert table.splitlines()[0] == "| postprocessor | thief | 30 |"
    assert len(table.splitlines()) == 2 + 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attack": "jacobian"}, "unknown attack"),
        ({"outputs": "logits"}, "outputs must be"),
        ({"postprocessor": "blur"}, "unknown postprocessor"),
        ({"budget": 0}, "budget"),
    ],
)
def test_bad_arguments_raise(victim: nn.Module, digits: Dataset, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"budget": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        art_extract(victim, digits, **args)  # type: ignore[arg-type]
