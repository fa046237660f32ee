"""IBM ART's model-stealing attacks as an external reference for the lab's own.

The same victims the lab attacks with :mod:`modelseal.lab.extraction` are attacked here with the
Adversarial Robustness Toolbox (PyPI ``adversarial-robustness-toolbox``, imported as ``art``):
``CopycatCNN`` and ``KnockoffNets`` (random and adaptive sampling), with ART's output
postprocessors as the victim's defence. ART is an optional dependency of the ``lab`` extra and is
imported only when a function here runs.

How the lab's pieces map onto ART:

- The victim ``nn.Module`` (which outputs logits) is followed by a softmax and wrapped as a
  ``PyTorchClassifier``, so ART's postprocessors see class probabilities, which is what they are
  written for. A counter in front of the victim counts the rows it actually answers: that is the
  ``queries`` reported.
- The thief is a fresh :func:`modelseal.lab.models.build` model, wrapped as a ``PyTorchClassifier``
  with cross-entropy and Adam, trained by ART (``nb_epochs`` = ``epochs``, batches of 64), the
  settings of the lab's own :func:`~modelseal.lab.extraction.copycat`.
- The attacker's data is ``dataset.x_pool``; ``nb_stolen`` is the budget.

ART's behaviour worth knowing when reading its numbers (ART 1.20):

- ``CopycatCNN`` and ``KnockoffNets(sampling_strategy="random")`` run the same code path: a
  random subset of the pool *without replacement*, one batch of queries, one ``fit``. With the same
  seed they give the same thief. Neither can spend more than ``len(x_pool)`` queries.
- ``KnockoffNets(sampling_strategy="adaptive")`` needs labels for the attacker's pool: its bandit
  picks a *class* of the pool to sample from and rewards it, so ART's design assumes the attacker
  knows the pool's true classes. It is given ``dataset.y_pool`` (which the lab otherwise keeps for
  evaluation only). It samples with replacement, queries one row at a time, takes one training step
  per query (then a final ``fit`` on all of them), and always trains on the victim's top-1 label:
  ``use_probability`` does not apply. Its "loss" reward takes a softmax of the victim's answers
  (ART assumes logits); here they are already probabilities, which makes that reward flatter.
- ``ClassLabels`` (``"class_labels"`` here) is broken for more than one row in ART 1.20.1: it sets,
  for every row, the columns of every class predicted anywhere in the batch
  (``class_labels[:, index_labels] = 1``), and a ``PyTorchClassifier`` applies it to all of one
  ``predict`` call's rows at once. A label-only copycat thief then learns one class for everything.
  See https://github.com/Trusted-AI/adversarial-robustness-toolbox/pull/2824. It is used as shipped:
  this module measures ART, it does not repair it.
- ``ReverseSigmoid`` warns "divide by zero encountered in log" on a victim that answers exactly 1.0
  (its clip bound ``1 - 1e-9`` is 1.0 in float32); the limit it then computes is the right one.

Everything runs on the CPU and is deterministic given ``seed``: numpy's and torch's global
generators (which ART draws from) are seeded for the call and restored afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from . import models
from .data import Dataset

__all__ = [
    "ATTACKS",
    "OUTPUTS",
    "POSTPROCESSORS",
    "ArtResult",
    "PostprocessorRow",
    "art_extract",
    "art_postprocessor_table",
    "format_postprocessor_table",
]

ATTACKS = ("copycat", "knockoff-random", "knockoff-adaptive")
OUTPUTS = ("labels", "probabilities")
# ART's output postprocessors, each with its default parameters (ART 1.20): ReverseSigmoid(beta=1,
# gamma=0.1), Rounded(decimals=3), HighConfidence(cutoff=0.25), GaussianNoise(scale=0.2), ClassLabels().
POSTPROCESSORS = ("reverse_sigmoid", "rounded", "high_confidence", "gaussian_noise", "class_labels")

_BATCH_SIZE_FIT = 64
_BATCH_SIZE_QUERY = 128


class ArtResult(TypedDict):
    """What :func:`art_extract` measured."""

    accuracy: float  # the thief's accuracy on dataset.x_test
    fidelity: float  # agreement of the thief's labels with the (undefended) victim's labels on x_test
    queries: int  # rows the victim answered


class PostprocessorRow(TypedDict):
    """One cell of :func:`art_postprocessor_table`."""

    postprocessor: str  # "none" or one of POSTPROCESSORS
    outputs: str  # "labels" or "probabilities": what the thief trains on
    budget: int
    queries: int
    accuracy: float
    fidelity: float


class _CountingVictim(nn.Module):
    """The victim followed by a softmax, counting the rows it is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += int(x.shape[0])
        logits: torch.Tensor = self.model(x)
        return torch.softmax(logits, dim=1)


@contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global generators for the block (ART uses both), then restore them."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _check(attack: str, outputs: str, postprocessor: str | None) -> None:
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
    if postprocessor is not None and postprocessor not in POSTPROCESSORS:
        raise ValueError(f"unknown postprocessor {postprocessor!r}; choose None or one of {', '.join(POSTPROCESSORS)}")


def _postprocessor(name: str | None) -> Any:
    """ART's postprocessor called ``name`` with its default parameters, or None."""
    if name is None:
        return None
    from art.defences.postprocessor import ClassLabels, GaussianNoise, HighConfidence, ReverseSigmoid, Rounded

    factories: dict[str, Any] = {
        "reverse_sigmoid": ReverseSigmoid,
        "rounded": Rounded,
        "high_confidence": HighConfidence,
        "gaussian_noise": GaussianNoise,
        "class_labels": ClassLabels,
    }
    return factories[name]()


def art_extract(
    victim_model: nn.Module,
    dataset: Dataset,
    *,
    attack: str = "copycat",
    budget: int,
    outputs: str = "labels",
    postprocessor: str | None = None,
    seed: int = 0,
    thief_arch: str = "mlp",
    epochs: int = 100,
    lr: float = 1e-3,
) -> ArtResult:
    """Steal ``victim_model`` with one of ART's extraction attacks and measure the stolen copy.

    Args:
        victim_model: A classifier that outputs ``dataset.num_classes`` logits. It is not modified
            (its train/eval mode is restored).
        dataset: Supplies the attacker's pool (``x_pool``; ``y_pool`` too for
            ``"knockoff-adaptive"``, as ART's adaptive strategy requires) and the test set.
        attack: ``"copycat"`` (ART's ``CopycatCNN``), ``"knockoff-random"`` or
            ``"knockoff-adaptive"`` (ART's ``KnockoffNets`` with that sampling strategy).
        budget: ART's ``nb_stolen``. Copycat and knockoff-random spend at most ``len(x_pool)``.
        outputs: ``"labels"`` trains the thief on the victim's top-1 label (ART's
            ``use_probability=False``); ``"probabilities"`` on its (postprocessed) output vector.
            Knockoff-adaptive always uses labels.
        postprocessor: The victim's defence: None or one of :data:`POSTPROCESSORS`, ART's
            postprocessor of that name with its default parameters, applied to every answer.
        seed: Seeds the thief's initialisation, ART's sampling (numpy's global generator), the
            training batches (torch's global generator) and GaussianNoise's noise.
        thief_arch: The thief's architecture, a key of :data:`modelseal.lab.models.ARCHITECTURES`.
        epochs, lr: The thief's training: ART's ``nb_epochs`` and Adam's learning rate.

    Returns:
        ``accuracy`` of the thief on ``dataset.x_test``, its ``fidelity`` (agreement with the
        undefended victim's labels on ``x_test``) and the ``queries`` the victim answered.

    Raises:
        ValueError: Unknown ``attack``, ``outputs``, ``postprocessor`` or ``thief_arch``;
            ``budget``, ``epochs`` or ``lr`` not positive; an empty pool.
        ImportError: ART is not installed.
    """
    _check(attack, outputs, postprocessor)
    budget = operator.index(budget)  # ART insists on a Python int
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if epochs < 1 or not lr > 0:
        raise ValueError(f"epochs and lr must be positive, got {epochs} and {lr}")
    if len(dataset.x_pool) == 0:
        raise ValueError("the pool is empty")

    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    thief = models.build(thief_arch, dataset.input_shape, dataset.num_classes, seed=seed)
    counter = _CountingVictim(victim_model)
    was_training = victim_model.training
    defence = _postprocessor(postprocessor)
    try:
        with _global_seed(seed):
            victim = PyTorchClassifier(
                model=counter,
                loss=nn.CrossEntropyLoss(),  # unused: the victim is only queried
                input_shape=dataset.input_shape,
                nb_classes=dataset.num_classes,
                postprocessing_defences=defence,
                device_type="cpu",
            )
            thieved = PyTorchClassifier(
                model=thief,
                loss=nn.CrossEntropyLoss(),  # accepts ART's one-hot labels and probability targets
                optimizer=torch.optim.Adam(thief.parameters(), lr=lr),
                input_shape=dataset.input_shape,
                nb_classes=dataset.num_classes,
                device_type="cpu",
            )
            common: dict[str, Any] = {
                "batch_size_fit": _BATCH_SIZE_FIT,
                "batch_size_query": _BATCH_SIZE_QUERY,
                "nb_epochs": epochs,
                "nb_stolen": budget,
                "use_probability": outputs == "probabilities",
            }
            pool = np.asarray(dataset.x_pool, dtype=np.float32)
            if attack == "copycat":
                CopycatCNN(victim, **common).extract(pool, thieved_classifier=thieved)
            elif attack == "knockoff-random":
                KnockoffNets(victim, sampling_strategy="random", verbose=False, **common).extract(
                    pool, thieved_classifier=thieved
                )
            else:
                KnockoffNets(victim, sampling_strategy="adaptive", reward="all", verbose=False, **common).extract(
                    pool, np.asarray(dataset.y_pool), thieved_classifier=thieved
                )
    finally:
        victim_model.train(was_training)

    stolen = models.predict(thief, dataset.x_test)
    return ArtResult(
        accuracy=models.agreement(stolen, dataset.y_test),
        fidelity=models.agreement(stolen, models.predict(victim_model, dataset.x_test)),
        queries=counter.rows,
    )


def art_postprocessor_table(
    victim_model: nn.Module,
    dataset: Dataset,
    budgets: Sequence[int] = (100, 250, 500),
    seed: int = 0,
    *,
    attack: str = "copycat",
    postprocessors: Sequence[str | None] = (None, *POSTPROCESSORS),
    epochs: int = 100,
) -> list[PostprocessorRow]:
    """The thief's accuracy against each of ART's postprocessors, for a label-only and a probability thief.

    One :func:`art_extract` run per (postprocessor, outputs, budget), all with the same ``seed``,
    so a postprocessor that keeps every top-1 label gives a label-only thief exactly the
    undefended accuracy. ``None`` (reported as ``"none"``) is the undefended baseline.

    Returns:
        Rows in the order postprocessor, then outputs (labels first), then budget.

    Raises:
        ValueError: As for :func:`art_extract`.
    """
    rows: list[PostprocessorRow] = []
    for post in postprocessors:
        for outputs in OUTPUTS:
            for budget in budgets:
                result = art_extract(
                    victim_model,
                    dataset,
                    attack=attack,
                    budget=budget,
                    outputs=outputs,
                    postprocessor=post,
                    seed=seed,
                    epochs=epochs,
                )
                rows.append(
                    PostprocessorRow(
                        postprocessor=post or "none",
                        outputs=outputs,
                        budget=int(budget),
                        queries=result["queries"],
                        accuracy=result["accuracy"],
                        fidelity=result["fidelity"],
                    )
                )
    return rows


def format_postprocessor_table(rows: Sequence[PostprocessorRow]) -> str:
    """A Markdown table of :func:`art_postprocessor_table`'s rows: stolen accuracy (%) per budget.

    Each column is headed by the budget and, where it differs, the queries actually spent.
    """
    sent: dict[int, int] = {}  # budget -> queries spent (the first row's)
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        sent.setdefault(row["budget"], row["queries"])
        cells.setdefault((row["postprocessor"], row["outputs"]), {})[row["budget"]] = row["accuracy"]
    heads = [str(b) if b == q else f"{b} ({q} sent)" for b, q in sent.items()]
    lines = [
        "| postprocessor | thief | " + " | ".join(heads) + " |",
        "|---|---|" + "---:|" * len(heads),
    ]
    for (post, outputs), accs in cells.items():
        values = [f"{100 * accs[b]:.1f}" if b in accs else "" for b in sent]
        lines.append(f"| {post} | {outputs} | " + " | ".join(values) + " |")
    return "\n".join(lines)
