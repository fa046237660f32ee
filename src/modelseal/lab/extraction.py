"""Model stealing through queries: train a student on a victim's answers.

The victim is any callable from a batch of inputs to its answers — int labels ``(n,)`` when it
reveals only its decision, or class probabilities ``(n, K)`` when it reveals its scores. The
targets in :mod:`modelseal.lab.targets` (a local model, an ONNX or sealed file, a gateway over HTTP
with one or many API keys) are such callables. The attacker holds natural unlabelled data (a
dataset's ``x_pool``, disjoint from the victim's training data) and a query budget.

- :func:`copycat` (Correia-Silva et al., 2018): query a random subset of the pool, without
  replacement, so at most ``len(pool)`` queries.
- :func:`knockoff_random` (Orekondy et al., 2019, the "random" sampling strategy): draw from the
  pool with replacement and add small Gaussian jitter, so any budget can be spent.
- :func:`knockoff_adaptive` (Orekondy et al., 2019, the "adaptive" strategy): the pool is clustered
  and the clusters are the arms of a gradient bandit that learns, round by round, which of them give
  queries the student learns most from.
- :func:`jacobian_augmentation` (Papernot et al., 2017, the synthetic-query attack PRADA detects):
  from a small seed set, each round adds every point moved a step ``lam`` along the sign of the
  student's gradient for the victim's label, and queries the new points.

Every attack sends at most ``budget`` rows to the victim, ``batch_size`` rows per call (``None``:
each round's queries in one call). When the victim raises
:class:`~modelseal.lab.targets.QueryRefused` (a spent quota, every API key refused), the attack stops
querying and trains the student on the answers it got, including those the refusal carries;
``queries`` then reports the rows actually answered and ``refused`` the victim's reason. A refusal
before a single answer is re-raised. Students are trained with :func:`modelseal.lab.models.train`;
every attack is deterministic given ``seed`` (and a deterministic victim).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import models
from .targets import QueryRefused

__all__ = [
    "OUTPUTS",
    "REWARDS",
    "AdaptiveResult",
    "ExtractionResult",
    "JacobianResult",
    "QueryRefused",
    "Victim",
    "copycat",
    "jacobian_augmentation",
    "knockoff_adaptive",
    "knockoff_random",
    "victim_from_model",
]

OUTPUTS = ("labels", "probabilities")
REWARDS = ("loss", "certainty", "diversity")

Victim = Callable[[np.ndarray], np.ndarray]


@dataclass
class ExtractionResult:
    """A stolen copy and what it cost."""

    student: nn.Module  # trained in place, in eval() mode
    queries: int  # inputs sent to the victim and answered
    outputs: str  # "labels" or "probabilities": what the victim revealed
    inputs: np.ndarray | None = None  # the rows answered, in the order sent (float32)
    refused: str | None = None  # why the victim stopped answering before the budget was spent


@dataclass
class AdaptiveResult(ExtractionResult):
    """What :func:`knockoff_adaptive` learnt on the way."""

    arms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # arm of each row of ``inputs``
    arm_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # pool rows in each arm
    arm_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # queries drawn from each arm
    rewards: np.ndarray = field(default_factory=lambda: np.zeros(0))  # raw reward of each row of ``inputs``
    preferences: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the bandit's final preferences
    policies: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (rounds, arms): pi at each round


@dataclass
class JacobianResult(ExtractionResult):
    """What :func:`jacobian_augmentation` queried."""

    synthetic: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per row of ``inputs``
    rounds: int = 0  # augmentation rounds that sent queries


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


def _check_request(pool: np.ndarray, budget: int, outputs: str, batch_size: int | None = None) -> None:
    _check_outputs(outputs)
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if len(pool) == 0:
        raise ValueError("the pool is empty")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 or None, got {batch_size}")


def _check_answers(answers: np.ndarray, n: int, outputs: str) -> np.ndarray:
    """``answers`` to ``n`` queries, checked to be what ``outputs`` says."""
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


def _answers(victim: Victim, queries: np.ndarray, outputs: str) -> np.ndarray:
    """Query the victim once and check that its answers are what ``outputs`` says."""
    return _check_answers(np.asarray(victim(queries)), len(queries), outputs)


class _Oracle:
    """The attacker's side of the victim: the budget, batching, refusals, and everything answered."""

    def __init__(self, victim: Victim, outputs: str, budget: int, batch_size: int | None) -> None:
        self.victim = victim
        self.outputs = outputs
        self.budget = budget
        self.batch_size = batch_size
        self.inputs: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []
        self.spent = 0
        self.refusal: QueryRefused | None = None
        self._width: int | None = None  # K, for probabilities

    @property
    def remaining(self) -> int:
        return 0 if self.refusal is not None else self.budget - self.spent

    def ask(self, queries: np.ndarray) -> np.ndarray:
        """Answers to the first rows of ``queries`` that the budget allows and the victim answers."""
        queries = np.asarray(queries, dtype=np.float32)[: max(self.remaining, 0)]
        got: list[np.ndarray] = []
        step = self.batch_size or max(len(queries), 1)
        for start in range(0, len(queries), step):
            if self.refusal is not None:
                break
            chunk = queries[start : start + step]
            try:
                answers = _answers(self.victim, chunk, self.outputs)
            except QueryRefused as exc:
                self.refusal = exc
                partial = exc.answers
                if partial is None or len(partial) == 0:
                    break
                if len(partial) > len(chunk):
                    raise ValueError(
                        f"the victim's refusal carries {len(partial)} answers for {len(chunk)} rows"
                    ) from exc
                chunk = chunk[: len(partial)]
                answers = _check_answers(np.asarray(partial), len(chunk), self.outputs)
            if self.outputs == "probabilities":
                if self._width is None:
                    self._width = answers.shape[1]
                elif answers.shape[1] != self._width:
                    raise ValueError(f"the victim answered {answers.shape[1]} classes, earlier {self._width}")
            self.inputs.append(chunk)
            self.answers.append(answers)
            self.spent += len(chunk)
            got.append(answers)
        if got:
            return np.concatenate(got)
        if self.outputs == "labels":
            return np.zeros(0, np.int64)
        return np.zeros((0, self._width or 0), np.float32)

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything answered so far, ``(inputs, answers)``; re-raises a refusal that left nothing."""
        if not self.inputs:
            if self.refusal is not None:
                raise self.refusal
            raise ValueError("no queries were sent")  # pragma: no cover - every attack sends some
        return np.concatenate(self.inputs), np.concatenate(self.answers)

    def result(self, student: nn.Module) -> ExtractionResult:
        inputs, _ = self.data()
        return ExtractionResult(student, self.spent, self.outputs, inputs, self._refused())

    def _refused(self) -> str | None:
        return None if self.refusal is None else str(self.refusal) or type(self.refusal).__name__


def _feature_range(
    data: np.ndarray, feature_low: np.ndarray | None, feature_high: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    low = data.min(axis=0) if feature_low is None else np.asarray(feature_low, dtype=np.float32)
    high = data.max(axis=0) if feature_high is None else np.asarray(feature_high, dtype=np.float32)
    if low.shape != data.shape[1:] or high.shape != data.shape[1:]:
        raise ValueError(f"feature range must have shape {data.shape[1:]}, got {low.shape} and {high.shape}")
    return low, high


def _steal(
    victim: Victim,
    queries: np.ndarray,
    student: nn.Module,
    outputs: str,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int | None = None,
) -> ExtractionResult:
    oracle = _Oracle(victim, outputs, len(queries), batch_size)
    oracle.ask(queries)
    x, y = oracle.data()
    models.train(student, x, y, epochs=epochs, lr=lr, seed=seed)
    return oracle.result(student)


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
    batch_size: int | None = None,
) -> ExtractionResult:
    """Steal ``victim`` by querying a random subset of ``pool`` and training ``student`` on the answers.

    Takes ``budget`` rows of ``pool`` (a ``seed``-ed random subset without replacement; a budget
    larger than the pool uses the whole pool, and ``queries`` reports the real count), sends them to
    the victim and trains ``student`` in place.

    Args:
        victim: Returns int labels ``(n,)`` for ``outputs="labels"``, probabilities ``(n, K)`` for
            ``"probabilities"`` (rows are renormalised to sum to 1).
        pool: The attacker's unlabelled natural data, shape ``(n, *input_shape)``.
        student: The model to train; it must output ``K`` logits.
        budget: The most inputs to send to the victim.
        outputs: What the victim reveals: ``"labels"`` or ``"probabilities"``.
        epochs, lr: Passed to :func:`modelseal.lab.models.train`.
        seed: Seeds both the choice of queries and the training.
        batch_size: Rows per call to the victim; ``None`` sends them all in one call.

    Returns:
        The trained student and the number of queries answered.

    Raises:
        ValueError: Unknown ``outputs``, ``budget < 1``, an empty pool, or victim answers of the wrong
            shape or type.
        QueryRefused: The victim refused before answering anything.
    """
    _check_request(pool, budget, outputs, batch_size)
    n = min(budget, len(pool))
    idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    queries = np.asarray(pool, dtype=np.float32)[idx]
    return _steal(victim, queries, student, outputs, epochs, lr, seed, batch_size)


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
    batch_size: int | None = None,
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
        QueryRefused: The victim refused before answering anything.
    """
    _check_request(pool, budget, outputs, batch_size)
    if not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}")
    data = np.asarray(pool, dtype=np.float32)
    low, high = _feature_range(data, feature_low, feature_high)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=budget)
    noise = rng.standard_normal(size=(budget, *data.shape[1:])) * (jitter * (high - low))
    queries = np.clip(data[idx] + noise, low, high).astype(np.float32)
    return _steal(victim, queries, student, outputs, epochs, lr, seed, batch_size)


# --- adaptive knockoff ------------------------------------------------------------------------


def _cluster(data: np.ndarray, arms: int | np.ndarray, seed: int) -> np.ndarray:
    """Each pool row's arm, as int64 ids ``0..A-1`` with no empty arm."""
    if isinstance(arms, (int, np.integer)):
        if arms < 1:
            raise ValueError(f"arms must be at least 1, got {arms}")
        k = min(int(arms), len(data))
        if k == 1:
            return np.zeros(len(data), np.int64)
        from sklearn.cluster import KMeans

        flat = data.reshape(len(data), -1).astype(np.float64)
        ids = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(flat)
    else:
        ids = np.asarray(arms)
        if ids.shape != (len(data),) or ids.dtype.kind not in "iu" or (len(ids) and ids.min() < 0):
            raise ValueError(f"arms must be a count or non-negative int ids of shape ({len(data)},), got {ids.shape}")
    _, dense = np.unique(ids, return_inverse=True)  # drop ids no row has
    return np.asarray(dense, dtype=np.int64).reshape(len(data))


class _Running:
    """Running mean and standard deviation (Welford)."""

    def __init__(self) -> None:
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self._m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.n) if self.n > 1 else 0.0


def _rewards(
    kind: str,
    answers: np.ndarray,
    student_log_probs: np.ndarray,
    num_classes: int,
    recent: list[np.ndarray],
    window: int,
) -> np.ndarray:
    """The raw reward of each answered row (Orekondy et al., 2019, §4.1.2)."""
    if answers.ndim == 1:  # labels: one-hot distributions
        target = np.zeros((len(answers), num_classes))
        target[np.arange(len(answers)), answers] = 1.0
    else:
        target = answers.astype(np.float64)
    if kind == "loss":  # the student's cross-entropy against the victim: how much it still has to learn here
        out: np.ndarray = -(target * student_log_probs).sum(axis=1)
        return out
    if kind == "certainty":  # the victim's margin between its two most likely classes
        top = np.sort(target, axis=1)
        margin: np.ndarray = top[:, -1] - top[:, -2]
        return margin
    # diversity: how much of each answer is mass on classes the recent answers rarely got
    rewards = np.zeros(len(target))
    for i, row in enumerate(target):
        mean = np.mean(recent[-window:], axis=0) if recent else np.zeros(num_classes)
        rewards[i] = np.maximum(row - mean, 0.0).sum()
        recent.append(row)
    del recent[:-window]
    return rewards


def knockoff_adaptive(
    victim: Victim,
    pool: np.ndarray,
    *,
    student: nn.Module,
    budget: int,
    outputs: str = "labels",
    reward: str = "loss",
    arms: int | np.ndarray = 10,
    rounds: int = 10,
    step_size: float | None = None,
    diversity_window: int = 25,
    epochs: int = 100,
    round_epochs: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
    jitter: float = 0.05,
    feature_low: np.ndarray | None = None,
    feature_high: np.ndarray | None = None,
    batch_size: int | None = None,
) -> AdaptiveResult:
    """Steal ``victim`` with Knockoff Nets' adaptive strategy, adapted to an unlabelled pool.

    Orekondy et al. (2019) let a gradient bandit choose, query by query, which label of a large
    labelled image set to draw the next query from. The attacker here has no labels, so the arms are
    clusters of the pool instead: k-means on the inputs (``arms`` clusters), or any grouping the
    attacker passes. The budget is spent in ``rounds`` rounds of about ``budget / rounds`` queries.
    In each, every query's arm is drawn from the policy ``pi = softmax(H)`` over the arms'
    preferences ``H``; the query is a pool row of that arm not sent before, or, once the arm has
    none left, one of its rows again with Gaussian jitter (as :func:`knockoff_random`, clipped to the
    feature range). After the victim answers, each query's reward ``r`` updates the preferences as
    the gradient bandit does: ``H[a] += step_size * r' * (1 - pi[a])`` for the arm drawn and
    ``H[b] -= step_size * r' * pi[b]`` for the others, where ``r'`` is the reward minus the running
    mean of the rewards before it (the bandit's baseline), divided by their standard deviation. Then the
    student is trained ``round_epochs`` more epochs on everything answered so far. At the end it is
    reset to its initial weights and trained ``epochs`` epochs on all the answers, as
    :func:`copycat` trains it, so the attacks compare on their queries alone.

    Rewards (``reward``), from the paper:

    - ``"loss"`` (the default): the cross-entropy of the student (as trained before the round) against
      the victim's answer — arms where the student is still wrong are worth querying. Works with labels.
    - ``"certainty"``: the victim's margin between its two likeliest classes (needs probabilities).
    - ``"diversity"``: the answer's mass above the mean of the last ``diversity_window`` answers,
      summed over classes — rewards answers unlike the recent ones.

    Args:
        arms: How many k-means clusters (capped at the pool size), or an int cluster id per pool row.
        rounds: Rounds of querying and retraining.
        step_size: The bandit's step size (alpha); ``None`` uses ``10 / budget``, so that the policy
            moves about as far whatever the budget (0.02 for 500 queries: on digits, larger steps let
            the loss reward lock onto one hard cluster and the copy gets worse).
        jitter, feature_low, feature_high: As for :func:`knockoff_random`.
        batch_size: Rows per call to the victim; ``None`` sends each round in one call.
        Others: As for :func:`copycat`.

    Returns:
        The trained student, the queries and their arms and rewards, and the bandit's state.

    Raises:
        ValueError: As for :func:`knockoff_random`; an unknown ``reward``, ``"certainty"`` with
            labels, ``rounds``, ``round_epochs`` or ``step_size`` not positive, bad ``arms``.
        QueryRefused: The victim refused before answering anything.
    """
    _check_request(pool, budget, outputs, batch_size)
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    if reward == "certainty" and outputs == "labels":
        raise ValueError("the certainty reward needs the victim's probabilities, not labels")
    if step_size is None:
        step_size = 10.0 / budget
    if rounds < 1 or round_epochs < 1 or not step_size > 0 or diversity_window < 1:
        raise ValueError("rounds, round_epochs, step_size and diversity_window must be positive")
    if not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}")
    data = np.asarray(pool, dtype=np.float32)
    low, high = _feature_range(data, feature_low, feature_high)
    arm_of_row = _cluster(data, arms, seed)
    num_arms = int(arm_of_row.max()) + 1
    rng = np.random.default_rng(seed)
    # Each arm's rows in a seeded random order; ``fresh[a]`` of them have been sent.
    members = [rng.permutation(np.flatnonzero(arm_of_row == a)) for a in range(num_arms)]
    fresh = np.zeros(num_arms, np.int64)
    initial = copy.deepcopy(student.state_dict())
    num_classes = _num_outputs(student, data[:1])

    oracle = _Oracle(victim, outputs, budget, batch_size)
    preferences = np.zeros(num_arms)
    stats = _Running()
    recent: list[np.ndarray] = []
    arms_sent: list[np.ndarray] = []
    raw_rewards: list[np.ndarray] = []
    policies: list[np.ndarray] = []
    per_round = math.ceil(budget / rounds)
    for r in range(rounds):
        size = min(per_round, oracle.remaining)
        if size <= 0:
            break
        pi = _softmax(preferences)
        policies.append(pi)
        chosen = rng.choice(num_arms, size=size, p=pi)
        queries = np.empty((size, *data.shape[1:]), np.float32)
        for i, a in enumerate(chosen):
            if fresh[a] < len(members[a]):
                queries[i] = data[members[a][fresh[a]]]
                fresh[a] += 1
            else:
                row = data[members[a][rng.integers(len(members[a]))]]
                noise = rng.standard_normal(row.shape) * (jitter * (high - low))
                queries[i] = np.clip(row + noise, low, high)
        answers = oracle.ask(queries)
        got = len(answers)
        if got:
            chosen = chosen[:got]
            log_probs = _log_probabilities(student, queries[:got])
            rewards = _rewards(reward, answers, log_probs, num_classes, recent, diversity_window)
            for a, value in zip(chosen, rewards, strict=True):
                scaled = (value - stats.mean) / stats.std if stats.std > 0 else 0.0
                stats.add(float(value))
                pi = _softmax(preferences)
                step = step_size * scaled
                preferences -= step * pi
                preferences[a] += step
            arms_sent.append(chosen)
            raw_rewards.append(rewards)
        if oracle.remaining <= 0:
            break
        x, y = oracle.data()
        models.train(student, x, y, epochs=round_epochs, lr=lr, seed=seed + r + 1)

    x, y = oracle.data()
    student.load_state_dict(initial)
    models.train(student, x, y, epochs=epochs, lr=lr, seed=seed)
    sent = np.concatenate(arms_sent).astype(np.int64)
    return AdaptiveResult(
        student,
        oracle.spent,
        outputs,
        x,
        oracle._refused(),
        arms=sent,
        arm_sizes=np.bincount(arm_of_row, minlength=num_arms).astype(np.int64),
        arm_counts=np.bincount(sent, minlength=num_arms).astype(np.int64),
        rewards=np.concatenate(raw_rewards),
        preferences=preferences,
        policies=np.stack(policies),
    )


def _softmax(h: np.ndarray) -> np.ndarray:
    e = np.exp(h - h.max())
    out: np.ndarray = e / e.sum()
    return out


def _num_outputs(model: nn.Module, x: np.ndarray) -> int:
    return int(models.probabilities(model, x).shape[1])


def _log_probabilities(model: nn.Module, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.log(np.clip(models.probabilities(model, x), 1e-12, None))
    return out


# --- Jacobian-based augmentation --------------------------------------------------------------


def _label_gradient_signs(model: nn.Module, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``sign(d logit[label] / dx)`` for each row, with the model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        inputs = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        logits = model(inputs)
        chosen = logits.gather(1, torch.as_tensor(labels, dtype=torch.int64).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, inputs)
    finally:
        model.train(was_training)
    out: np.ndarray = np.sign(grad.numpy()).astype(np.float32)
    return out


def jacobian_augmentation(
    victim: Victim,
    seed_set: np.ndarray,
    *,
    student: nn.Module,
    budget: int,
    outputs: str = "labels",
    lam: float = 0.1,
    rounds: int = 6,
    tau: int | None = None,
    reservoir: int | None = None,
    epochs: int = 100,
    round_epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    feature_low: np.ndarray | None = None,
    feature_high: np.ndarray | None = None,
    batch_size: int | None = None,
) -> JacobianResult:
    """Steal ``victim`` with Jacobian-based dataset augmentation (Papernot et al., 2017).

    The attacker starts from a small ``seed_set`` of natural inputs (say ten per class, or a few
    dozen pool rows) and queries it. Each round then trains the student ``round_epochs`` more epochs
    on everything answered so far and augments the set ``S``:
    ``S <- S + {clip(x + lam_r * (high - low) * sign(d student_logit[y(x)] / dx)) : x in S}``, where
    ``y(x)`` is the victim's label for ``x`` (its argmax, for probabilities) and the step is a
    fraction ``lam`` of each feature's range (so ``lam=0.1`` is Papernot's 0.1 on [0, 1] pixels).
    The new points are queried, and the set roughly doubles each round. Points that the step does
    not move (zero gradient, or clipped back where they were) are not sent. When the new points
    exceed the budget left, a seeded random subset of them is sent; sending stops once the budget is
    spent or after ``rounds`` rounds. Finally the student is reset to its initial weights and trained
    ``epochs`` epochs on all the answers.

    Args:
        seed_set: The attacker's natural starting points, ``(m, *input_shape)``; only the first
            ``budget`` are sent if there are more.
        lam: The step, as a fraction of each feature's range.
        rounds: The most augmentation rounds.
        tau: Papernot's periodic step size: ``lam_r = lam * (-1) ** (r // tau)``, so the points move
            back and forth rather than ever further out; ``None`` keeps the sign.
        reservoir: Augment only this many points of ``S`` per round, drawn at random (the reservoir
            variant); ``None`` augments all of ``S``.
        feature_low, feature_high: The valid range, shape ``seed_set.shape[1:]``; it defaults to the
            seed set's own per-feature min and max (pass a dataset's range instead when you have it).
        batch_size: Rows per call to the victim; ``None`` sends each round in one call.
        Others: As for :func:`copycat`.

    Returns:
        The trained student, the rows answered (seed first, then each round's new points) and which
        of them are synthetic.

    Raises:
        ValueError: As for :func:`copycat` (an empty ``seed_set``); ``lam``, ``rounds``, ``tau``,
            ``reservoir`` or ``round_epochs`` not positive; a range of the wrong shape.
        QueryRefused: The victim refused before answering anything.
    """
    _check_request(seed_set, budget, outputs, batch_size)
    if not lam > 0 or rounds < 1 or round_epochs < 1:
        raise ValueError("lam, rounds and round_epochs must be positive")
    if (tau is not None and tau < 1) or (reservoir is not None and reservoir < 1):
        raise ValueError("tau and reservoir must be positive or None")
    data = np.asarray(seed_set, dtype=np.float32)
    low, high = _feature_range(data, feature_low, feature_high)
    span = (high - low).astype(np.float32)
    rng = np.random.default_rng(seed)
    initial = copy.deepcopy(student.state_dict())

    oracle = _Oracle(victim, outputs, budget, batch_size)
    oracle.ask(data)
    natural = oracle.spent
    done = 0
    for r in range(rounds):
        if oracle.remaining <= 0:
            break
        x, y = oracle.data()
        models.train(student, x, y, epochs=round_epochs, lr=lr, seed=seed + r + 1)
        parents, labels = x, (y if y.ndim == 1 else y.argmax(axis=1))
        if reservoir is not None and reservoir < len(parents):
            pick = rng.choice(len(parents), size=reservoir, replace=False)
            parents, labels = parents[pick], labels[pick]
        step = lam if tau is None else lam * (-1) ** (r // tau)
        signs = _label_gradient_signs(student, parents, labels)
        children = np.clip(parents + step * span * signs, low, high).astype(np.float32)
        moved = np.any((children != parents).reshape(len(children), -1), axis=1)
        children = children[moved]
        if len(children) > oracle.remaining:
            children = children[np.sort(rng.choice(len(children), size=oracle.remaining, replace=False))]
        if len(children) == 0:
            break
        oracle.ask(children)
        done += 1

    x, y = oracle.data()
    student.load_state_dict(initial)
    models.train(student, x, y, epochs=epochs, lr=lr, seed=seed)
    synthetic = np.zeros(len(x), bool)
    synthetic[natural:] = True
    return JacobianResult(student, oracle.spent, outputs, x, oracle._refused(), synthetic=synthetic, rounds=done)
