"""Model stealing through queries: train a student on a victim's answers.

The victim is any callable from a batch of inputs to its answers — int labels ``(n,)`` when it
reveals only its decision, or class probabilities ``(n, K)`` when it reveals its scores. The attacker
holds natural unlabelled data (a dataset's ``x_pool``) and a query budget.

- :func:`copycat` (Correia-Silva et al., 2018): query a random subset of the pool, without
  replacement, so at most ``len(pool)`` queries.
- :func:`knockoff_random` (Orekondy et al., 2019, the "random" sampling strategy): draw from the
  pool with replacement and add small Gaussian jitter, so any budget can be spent.

Both send all their queries in one call to the victim and train the student with
:func:`modelseal.lab.models.train`. Both are deterministic given ``seed`` (and a deterministic victim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from . import models

__all__ = ["OUTPUTS", "ExtractionResult", "Victim", "copycat", "knockoff_random", "victim_from_model"]

OUTPUTS = ("labels", "probabilities")

Victim = Callable[[np.ndarray], np.ndarray]


@dataclass
class ExtractionResult:
    """A stolen copy and what it cost."""

    student: nn.Module  # trained in place, in eval() mode
    queries: int  # inputs sent to the victim
    outputs: str  # "labels" or "probabilities": what the victim revealed


def victim_from_model(model: nn.Module, outputs: str = "labels") -> Victim:
    """A victim callable that answers with ``model``'s labels or probabilities.

    Raises:
        ValueError: ``outputs`` is not one of :data:`OUTPUTS`.
    """
    _check_outputs(outputs)
    if outputs == "labels":
        return lambda x: models.predict(model, x)
    return lambda x: models.probabilities(model, x)


def _check_outputs(outputs: str) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")


def _check_request(pool: np.ndarray, budget: int, outputs: str) -> None:
    _check_outputs(outputs)
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if len(pool) == 0:
        raise ValueError("the pool is empty")


def _answers(victim: Victim, queries: np.ndarray, outputs: str) -> np.ndarray:
    """Query the victim once and check that its answers are what ``outputs`` says."""
    answers = np.asarray(victim(queries))
    n = len(queries)
    if outputs == "labels":
        if answers.shape != (n,) or not np.issubdtype(answers.dtype, np.integer):
            raise ValueError(
                f"a labels victim must return int labels of shape ({n},), got {answers.dtype} {answers.shape}"
            )
        return answers.astype(np.int64)
    if answers.ndim != 2 or len(answers) != n or not np.issubdtype(answers.dtype, np.floating):
        raise ValueError(
            f"a probabilities victim must return floats of shape ({n}, K), got {answers.dtype} {answers.shape}"
        )
    totals = answers.sum(axis=1, keepdims=True)
    if not np.all(np.isfinite(answers)) or np.any(answers < 0) or np.any(totals <= 0):
        raise ValueError("a probabilities victim returned negative, non-finite or all-zero rows")
    # Renormalise: a victim may round its scores (a common defence), and the rows must still sum to 1.
    normalised: np.ndarray = (answers / totals).astype(np.float32)
    return normalised


def _steal(
    victim: Victim, queries: np.ndarray, student: nn.Module, outputs: str, epochs: int, lr: float, seed: int
) -> ExtractionResult:
    answers = _answers(victim, queries, outputs)
    models.train(student, queries, answers, epochs=epochs, lr=lr, seed=seed)
    return ExtractionResult(student=student, queries=len(queries), outputs=outputs)


def copycat(
    victim: Victim,
    pool: np.ndarray,
    *,
    student: nn.Module,
    budget: int,
    outputs: str = "labels",
    epochs: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> ExtractionResult:
    """Steal ``victim`` by querying a random subset of ``pool`` and training ``student`` on the answers.

    Takes ``budget`` rows of ``pool`` (a ``seed``-ed random subset without replacement; a budget
    larger than the pool uses the whole pool, and ``queries`` reports the real count), sends them to
    the victim in one call and trains ``student`` in place.

    Args:
        victim: Returns int labels ``(n,)`` for ``outputs="labels"``, probabilities ``(n, K)`` for
            ``"probabilities"`` (rows are renormalised to sum to 1).
        pool: The attacker's unlabelled natural data, shape ``(n, *input_shape)``.
        student: The model to train; it must output ``K`` logits.
        budget: The most inputs to send to the victim.
        outputs: What the victim reveals: ``"labels"`` or ``"probabilities"``.
        epochs, lr: Passed to :func:`modelseal.lab.models.train`.
        seed: Seeds both the choice of queries and the training.

    Returns:
        The trained student and the number of queries spent.

    Raises:
        ValueError: Unknown ``outputs``, ``budget < 1``, an empty pool, or victim answers of the wrong
            shape or type.
    """
    _check_request(pool, budget, outputs)
    n = min(budget, len(pool))
    idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    queries = np.asarray(pool, dtype=np.float32)[idx]
    return _steal(victim, queries, student, outputs, epochs, lr, seed)


def knockoff_random(
    victim: Victim,
    pool: np.ndarray,
    *,
    student: nn.Module,
    budget: int,
    outputs: str = "labels",
    epochs: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    jitter: float = 0.05,
    feature_low: np.ndarray | None = None,
    feature_high: np.ndarray | None = None,
) -> ExtractionResult:
    """Like :func:`copycat`, but the queries are pool rows drawn with replacement plus Gaussian jitter.

    Exactly ``budget`` queries are sent, so budgets beyond the pool size are possible; the jitter
    keeps repeated draws from being identical queries. Each query is a pool row plus independent
    per-feature noise with standard deviation ``jitter * (feature_high - feature_low)``, clipped back
    to ``[feature_low, feature_high]`` so that queries stay in the data's valid range (digits' pixels
    stay in [0, 1], for instance). The range defaults to the pool's own per-feature min and max; pass
    a dataset's ``feature_low`` / ``feature_high`` to use the training range instead.

    Args:
        jitter: Noise scale as a fraction of each feature's range; 0 sends pool rows unchanged.
        feature_low, feature_high: Per-feature range, shape ``pool.shape[1:]``.
        Others: As for :func:`copycat`.

    Raises:
        ValueError: As for :func:`copycat`; also a negative ``jitter`` or a range of the wrong shape.
    """
    _check_request(pool, budget, outputs)
    if not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}")
    data = np.asarray(pool, dtype=np.float32)
    low = data.min(axis=0) if feature_low is None else np.asarray(feature_low, dtype=np.float32)
    high = data.max(axis=0) if feature_high is None else np.asarray(feature_high, dtype=np.float32)
    if low.shape != data.shape[1:] or high.shape != data.shape[1:]:
        raise ValueError(f"feature range must have shape {data.shape[1:]}, got {low.shape} and {high.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=budget)
    noise = rng.standard_normal(size=(budget, *data.shape[1:])) * (jitter * (high - low))
    queries = np.clip(data[idx] + noise, low, high).astype(np.float32)
    return _steal(victim, queries, student, outputs, epochs, lr, seed)
