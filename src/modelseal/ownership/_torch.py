"""The small amount of PyTorch the ownership tools need: fine-tuning, prediction, gradient steps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fine_tune(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Adam on cross-entropy over shuffled mini-batches; leaves the model in eval mode."""
    inputs = torch.as_tensor(np.asarray(x, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(inputs[batch]), labels[batch]))
            optimiser.step()
    model.eval()


@torch.no_grad()
def check_classes(model: torch.nn.Module, x: np.ndarray, num_classes: int) -> None:
    """Refuse a model whose output is not one score per class for ``num_classes`` classes."""
    model.eval()
    try:
        out = model(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    except Exception as exc:  # any module error: the input shape or dtype does not fit the model
        raise ValueError(f"the model cannot take inputs shaped {list(x.shape[1:])}: {exc}") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"the model answers {list(out.shape[1:])} scores per input, not {num_classes} class scores")


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    inputs = torch.as_tensor(np.asarray(x, dtype=np.float32))
    out = [model(inputs[i : i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def targeted_steps(
    model: torch.nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    low: np.ndarray,
    high: np.ndarray,
    step: float,
    max_steps: int,
    extra_steps: int,
) -> np.ndarray:
    """Signed-gradient steps of size ``step`` * (high - low) towards ``targets``, each input stopping
    ``extra_steps`` after the model first answers its target; clipped to [low, high]."""
    model.eval()
    lo = torch.as_tensor(np.asarray(low, dtype=np.float32)).reshape(1, *x.shape[1:])
    hi = torch.as_tensor(np.asarray(high, dtype=np.float32)).reshape(1, *x.shape[1:])
    size = step * (hi - lo)
    probe = torch.as_tensor(np.asarray(x, dtype=np.float32)).clone()
    goal = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    remaining = torch.full((len(probe),), extra_steps + 1, dtype=torch.int64)
    for _ in range(max_steps):
        probe.requires_grad_(True)
        logits = model(probe)
        reached = logits.argmax(1) == goal
        remaining = torch.where(reached, remaining - 1, remaining)
        active = remaining > 0
        if not bool(active.any()):
            break
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, goal, reduction="sum"), probe)
        with torch.no_grad():
            mask = active.to(probe.dtype).reshape(-1, *([1] * (probe.dim() - 1)))
            probe = torch.minimum(torch.maximum(probe - size * grad.sign() * mask, lo), hi)
    return probe.detach().numpy()
