"""Small torch models for the lab, and seeded training and evaluation helpers.

Construction and training are deterministic given ``seed``: weights are drawn inside
``torch.random.fork_rng`` (torch's global generator is left as it was) and batches are shuffled with
a private ``torch.Generator``. Nothing here changes torch's thread count or other global settings.
Everything runs on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ARCHITECTURES",
    "accuracy",
    "agreement",
    "build",
    "mlp",
    "predict",
    "probabilities",
    "small_cnn",
    "train",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block, then restore its previous state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_sizes(input_shape: tuple[int, ...], num_classes: int) -> None:
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")


def mlp(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: tuple[int, ...] = (128, 128), seed: int = 0
) -> nn.Module:
    """A multi-layer perceptron: flatten, then ``Linear + ReLU`` per hidden size, then a linear head.

    Raises:
        ValueError: Empty or non-positive sizes, fewer than two classes.
    """
    _check_sizes(input_shape, num_classes)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive, got {hidden}")
    width = int(np.prod(input_shape))
    with _seeded(seed):
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)


def small_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, channels: tuple[int, int] = (16, 32), seed: int = 0
) -> nn.Module:
    """A small CNN for ``(C, H, W)`` images such as digits' ``(1, 8, 8)``.

    Two 3x3 convolutions (padding 1) with ReLU, a 2x2 max-pool after the second, then flatten,
    ``Linear(64) + ReLU`` and a linear head.

    Raises:
        ValueError: ``input_shape`` is not ``(C, H, W)`` with H and W at least 2, or bad sizes.
    """
    _check_sizes(input_shape, num_classes)
    if len(input_shape) != 3 or input_shape[1] < 2 or input_shape[2] < 2:
        raise ValueError(f"small_cnn needs an image shape (C, H, W) with H, W >= 2, got {input_shape}")
    if len(channels) != 2 or any(c < 1 for c in channels):
        raise ValueError(f"channels must be two positive sizes, got {channels}")
    c, h, w = input_shape
    c1, c2 = channels
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(c, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (h // 2) * (w // 2), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "mlp-small": functools.partial(mlp, hidden=(64,)),
    "mlp-wide": functools.partial(mlp, hidden=(256, 256)),
    "cnn": small_cnn,
}


def build(arch: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A fresh model of architecture ``arch`` (a key of :data:`ARCHITECTURES`), initialised from ``seed``.

    Raises:
        ValueError: Unknown ``arch``, or ``"cnn"`` for a non-image shape.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(input_shape), num_classes, seed=seed)


def _inputs(x: np.ndarray) -> torch.Tensor:
    # torch.tensor copies: the caller's array is never aliased (or written through).
    return torch.tensor(np.asarray(x, dtype=np.float32))


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Train ``model`` in place with Adam and return it, left in ``eval()`` mode.

    ``y`` is either int labels of shape ``(n,)`` (cross-entropy) or float class probabilities of
    shape ``(n, K)`` (soft cross-entropy, which is the KL divergence to the target distribution up to
    a constant). Batches are shuffled with a ``torch.Generator`` seeded by ``seed``.

    Raises:
        ValueError: Mismatched lengths, empty data, labels out of range, a bad target shape or dtype,
            non-positive ``epochs`` / ``batch_size`` / ``lr``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and the same length, got {len(x)} and {len(y)}")
    inputs = _inputs(x)
    model.eval()
    with torch.no_grad():
        num_outputs = model(inputs[:1]).shape[-1]
    y = np.asarray(y)
    soft = y.ndim == 2 and np.issubdtype(y.dtype, np.floating)
    if soft:
        if y.shape[1] != num_outputs:
            raise ValueError(f"soft targets have {y.shape[1]} classes, the model outputs {num_outputs}")
        targets = torch.tensor(y, dtype=torch.float32)
    elif y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        if y.min() < 0 or y.max() >= num_outputs:
            raise ValueError(f"labels must be in [0, {num_outputs}), got [{y.min()}, {y.max()}]")
        targets = torch.tensor(y, dtype=torch.int64)
    else:
        raise ValueError(f"y must be int labels (n,) or float probabilities (n, K), got {y.dtype} {y.shape}")

    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            logits = model(inputs[batch])
            if soft:
                loss = -(targets[batch] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            else:
                loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # typed, unlike Tensor.backward
            optimizer.step()
    model.eval()
    return model


def _logits(model: nn.Module, x: np.ndarray, batch_size: int) -> torch.Tensor:
    """Logits for ``x`` in eval mode; the model's train/eval mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs = _inputs(x)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, max(len(inputs), 1), batch_size)])
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The predicted class of each row of ``x``, as int64 of shape ``(n,)``."""
    return _logits(model, x, batch_size).argmax(dim=1).numpy().astype(np.int64)


def probabilities(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax class probabilities for each row of ``x``, as float64 of shape ``(n, K)``."""
    return _logits(model, x, batch_size).double().softmax(dim=1).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows of ``x`` whose predicted class equals ``y``."""
    return agreement(predict(model, x), y)


def agreement(a_labels: np.ndarray, b_labels: np.ndarray) -> float:
    """The fraction of positions where two label arrays agree (a copy's "fidelity" to its victim).

    Raises:
        ValueError: Different shapes, or empty arrays.
    """
    a, b = np.asarray(a_labels), np.asarray(b_labels)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"label arrays must be non-empty and the same shape, got {a.shape} and {b.shape}")
    return float(np.mean(a == b))
