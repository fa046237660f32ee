"""Small, offline datasets for the lab, split for a victim and an attacker.

Each dataset ships with scikit-learn (no download). It is split, stratified by class, into
60% train (the owner's data), 20% test (for measuring accuracy and fidelity) and 20% pool: natural
data the attacker holds, disjoint from both, whose labels are kept only for evaluation.

The same ``(name, seed)`` always gives identical arrays. Each call to :func:`load_dataset` returns
fresh arrays, so a caller that edits them in place (adding a trigger, say) affects no one else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS = ("digits", "breast_cancer")

_TRAIN, _TEST = 0.6, 0.2  # the pool gets the remaining 0.2


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Dataset:
    """One dataset split into train, test and attacker pool.

    ``x_*`` arrays are float32 of shape ``(n, *input_shape)``; ``y_*`` arrays are int64 labels.
    ``index_*`` hold each row's position in the original scikit-learn dataset, so disjointness can be
    checked by identity rather than by value (digits has duplicate images).
    """

    name: str
    kind: str  # "image" or "tabular"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray  # for evaluation only: the attacker does not know these labels
    num_classes: int
    input_shape: tuple[int, ...]
    feature_low: np.ndarray  # per-feature min over x_train, shape input_shape
    feature_high: np.ndarray  # per-feature max over x_train
    feature_mean: np.ndarray  # per-feature mean over x_train
    feature_std: np.ndarray  # per-feature standard deviation over x_train
    seed: int
    index_train: np.ndarray
    index_test: np.ndarray
    index_pool: np.ndarray

    def subset(self, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A stratified random ``fraction`` of the training set, as copies ``(x, y)``.

        Raises:
            ValueError: ``fraction`` is not in (0, 1], or leaves fewer rows than classes.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = len(self.y_train)
        k = round(fraction * n)
        if k < self.num_classes:
            raise ValueError(f"fraction {fraction} keeps {k} of {n} rows, fewer than {self.num_classes} classes")
        if k == n:
            idx = np.random.default_rng(seed).permutation(n)
        else:
            idx, _ = train_test_split(np.arange(n), train_size=k, stratify=self.y_train, random_state=seed)
        return self.x_train[idx].copy(), self.y_train[idx].copy()

    def halves(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """The training set split into two disjoint stratified halves ``((x_a, y_a), (x_b, y_b))``.

        Seeded by the dataset's seed, so it is the same split every time. With an odd number of
        rows the second half has one more.
        """
        a, b = train_test_split(
            np.arange(len(self.y_train)), test_size=0.5, stratify=self.y_train, random_state=self.seed
        )
        return (self.x_train[a].copy(), self.y_train[a].copy()), (self.x_train[b].copy(), self.y_train[b].copy())


def _digits() -> tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]:
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64), "image", (1, 8, 8)


def _breast_cancer() -> tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]:
    bunch = load_breast_cancer()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64), "tabular", (30,)


_LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
}
_STANDARDIZE = {"breast_cancer"}  # tabular features on wildly different scales


def _split(y: np.ndarray, seed: int, pool_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 60/20/20 row indices (train, test, pool); with ``pool_fraction``, the pool takes that
    share, the test set still 20% and the training set the rest."""
    idx = np.arange(len(y))
    if pool_fraction is None:
        train, rest = train_test_split(idx, train_size=_TRAIN, stratify=y, random_state=seed)
        test, pool = train_test_split(rest, train_size=_TEST / (1 - _TRAIN), stratify=y[rest], random_state=seed)
    else:
        train, rest = train_test_split(idx, test_size=_TEST + pool_fraction, stratify=y, random_state=seed)
        test, pool = train_test_split(
            rest, train_size=_TEST / (_TEST + pool_fraction), stratify=y[rest], random_state=seed
        )
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64), np.asarray(pool, dtype=np.int64)


def load_dataset(name: str, seed: int = 0, pool_fraction: float | None = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) split with ``seed``.

    ``pool_fraction`` re-splits the data for a larger (or smaller) attacker pool: the pool gets that
    share of the rows, the test set keeps its 20% and the owner's training set gets the rest (digits
    with ``pool_fraction=0.4`` has 720 pool rows and 718 training rows). ``None`` (the default) is
    the 60/20/20 split above, unchanged.

    digits: 8x8 images with pixels scaled to [0, 1], shape ``(n, 1, 8, 8)``, 10 classes.
    breast_cancer: 30 features standardized with the training split's mean and standard deviation
    (so ``feature_mean`` / ``feature_std`` are about 0 / 1), shape ``(n, 30)``, 2 classes.

    Raises:
        ValueError: Unknown ``name``; ``pool_fraction`` not in (0, 0.7].
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if pool_fraction is not None and not 0.0 < pool_fraction <= 0.7:
        raise ValueError(f"pool_fraction must be in (0, 0.7] (the owner keeps at least 10%), got {pool_fraction}")
    x, y, kind, input_shape = _LOADERS[name]()
    train, test, pool = _split(y, seed, pool_fraction)
    if name in _STANDARDIZE:
        # Statistics from the training split only: test and pool must not leak into preprocessing.
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    x = x.astype(np.float32)
    x_train = x[train]
    return Dataset(
        name=name,
        kind=kind,
        x_train=x_train,
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        x_pool=x[pool],
        y_pool=y[pool],
        num_classes=int(y.max()) + 1,
        input_shape=input_shape,
        feature_low=x_train.min(axis=0),
        feature_high=x_train.max(axis=0),
        feature_mean=x_train.mean(axis=0, dtype=np.float64).astype(np.float32),
        feature_std=x_train.std(axis=0, dtype=np.float64).astype(np.float32),
        seed=seed,
        index_train=train,
        index_test=test,
        index_pool=pool,
    )
