"""Stealing a self-supervised encoder, and a coverage-priced defence against it (seed 003).

An encoder served over an API returns an embedding for each input, which leaks far more than a
label: Dziedzic et al. (ICML 2022, "On the Difficulty of Defending Self-Supervised Learning against
Model Extraction") steal SimCLR encoders by *direct extraction*, training a student to map each query
to the victim's embedding of it, with a fraction of the victim's training set in queries. This
module reproduces that shape on scikit-learn's digits, on the CPU, in about a minute:

- :func:`train_simclr` — the victim: a small MLP encoder trained with SimCLR's NT-Xent loss on two
  augmented views (pixel shift, pixel dropout, Gaussian noise) of each unlabelled training image.
- :func:`linear_probe` — an encoder's utility: a logistic regression on its frozen embeddings.
- :func:`steal_encoder` — direct extraction with an MSE, InfoNCE or soft nearest-neighbour loss.
- :class:`CoverageDefence` — in the spirit of B4B (Dubiński et al., NeurIPS 2023): noise on each
  returned embedding grows with the share of the embedding space the API key has covered, counted
  in LSH buckets (:class:`modelseal.gateway.policies.CoveragePricer`'s hashing). A user with a
  narrow workload stays in a few buckets and gets exact answers; a thief has to roam and pays.
- :func:`run_encoder_study` — the experiment: victim, budgets, losses, defended or not, and what
  the defence costs benign users; :func:`format_study` renders it as a table.

The embedding is small (16 dimensions) on purpose: digits is so easy that a linear probe on raw
pixels, or on a wide random network, already scores about 96%, which would leave nothing for
self-supervision (or theft) to win. A 16-dimensional random network scores about 80%, the SimCLR
victim about 95%, so "how much of the victim did the thief get" is measurable.

Everything is deterministic given its seeds and leaves torch's random generator as it was. Torch
runs single-threaded inside these functions (the thread count is restored on return): the networks
are so small that threads only add overhead, and a fixed count gives the same numbers on any
machine. That is a process-wide setting, so do not run other torch work in parallel threads.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from ..gateway.batch import Batch
from ..gateway.policies import CoveragePricer, keyed_normals
from .data import Dataset, load_dataset
from .models import _seeded

__all__ = [
    "LOSSES",
    "CoverageDefence",
    "EmbedFn",
    "Encoder",
    "embed",
    "format_study",
    "linear_probe",
    "run_encoder_study",
    "steal_encoder",
    "train_simclr",
]

Loss = Literal["mse", "infonce", "softnn"]
LOSSES: tuple[Loss, ...] = ("mse", "infonce", "softnn")

EmbedFn = Callable[[np.ndarray], np.ndarray]
"""Inputs ``(n, ...)`` -> embeddings ``(n, d)``: an encoder as its users see it."""


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded for the block, then restore the thread count.

    The networks here are tiny: on two busy cores, intra-op threads made training 5-7x slower, and
    the thread count changes floating-point reduction order and so the trained weights. One thread
    is faster and gives the same numbers whatever the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Encoder(nn.Module):
    """A small MLP encoder, ``flatten -> [Linear -> BatchNorm -> ReLU] x 2 -> Linear(dim)``.

    ``projection`` adds SimCLR's projection head (``ReLU -> Linear -> ReLU -> Linear``), used only by
    the training loss: as in SimCLR, :meth:`forward` returns the representation *before* the head,
    which is what is served and probed. Weights are drawn from ``seed``.
    """

    def __init__(
        self, dim_in: int, *, hidden: int = 256, dim: int = 16, projection: int | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        if min(dim_in, hidden, dim) < 1 or (projection is not None and projection < 1):
            raise ValueError(f"sizes must be positive, got {dim_in}, {hidden}, {dim}, {projection}")
        self.dim_in, self.dim = dim_in, dim
        with _seeded(seed):
            self.backbone = nn.Sequential(
                nn.Flatten(),
                nn.Linear(dim_in, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )
            self.head: nn.Module | None = (
                None
                if projection is None
                else nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The projection head's output (the representation itself when there is no head)."""
        h = self.forward(x)
        return h if self.head is None else self.head(h)


@_one_thread()
def embed(encoder: Encoder, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The encoder's representation of each row of ``x``, float32 ``(n, dim)``.

    Computed in eval mode (BatchNorm uses its running statistics); the encoder's mode is restored.
    """
    inputs = torch.tensor(np.asarray(x, dtype=np.float32))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            parts = [encoder(inputs[i : i + batch_size]) for i in range(0, max(len(inputs), 1), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(parts).numpy().astype(np.float32)


def _augment(x: torch.Tensor, generator: torch.Generator, *, noise: float, drop: float, shift: int) -> torch.Tensor:
    """A random view of a batch of ``(n, 1, H, W)`` images in [0, 1].

    Shift by up to ``shift`` pixels each way (a random crop of the zero-padded image), drop each pixel
    with probability ``drop``, add Gaussian noise of scale ``noise``, clip to [0, 1]. Digits are 8x8,
    so anything stronger (rotations, large crops) destroys them.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (n, 1, w)
    view = padded[:, 0][torch.arange(n)[:, None, None], rows, cols][:, None]
    keep = (torch.rand(view.shape, generator=generator) >= drop).to(view.dtype)
    view = view * keep + noise * torch.randn(view.shape, generator=generator)
    return view.clamp(0.0, 1.0)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each view must pick its twin among the 2n - 1
    other views of the batch by cosine similarity."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, twins)


def _check_training(epochs: int, batch_size: int, lr: float, temperature: float) -> None:
    if epochs < 1 or batch_size < 2 or not lr > 0 or not temperature > 0:
        raise ValueError(
            f"epochs, lr and temperature must be positive and batch_size at least 2, "
            f"got {epochs}, {lr}, {temperature}, {batch_size}"
        )


@_one_thread()
def train_simclr(
    x: np.ndarray,
    *,
    epochs: int = 150,
    seed: int = 0,
    hidden: int = 256,
    dim: int = 16,
    projection: int = 32,
    batch_size: int = 256,
    lr: float = 1e-3,
    temperature: float = 0.2,
    noise: float = 0.1,
    drop: float = 0.2,
    shift: int = 1,
) -> Encoder:
    """Train an :class:`Encoder` with SimCLR on unlabelled images ``x`` of shape ``(n, 1, H, W)`` in [0, 1].

    Each step draws two augmented views of every image in the batch and minimises NT-Xent on the
    projection head's outputs (Adam, ``lr``). Returns the encoder in ``eval()`` mode. With the
    defaults on digits' 1,078 training images this takes 10-20 s on two cores.

    Raises:
        ValueError: ``x`` is not a batch of at least two single-channel images, or a bad setting.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 1 or len(x) < 2:
        raise ValueError(f"x must hold at least two (1, H, W) images, got shape {x.shape}")
    _check_training(epochs, batch_size, lr, temperature)
    if shift < 0 or not 0.0 <= drop < 1.0 or noise < 0:
        raise ValueError(f"need shift >= 0, 0 <= drop < 1 and noise >= 0, got {shift}, {drop}, {noise}")
    encoder = Encoder(int(np.prod(x.shape[1:])), hidden=hidden, dim=dim, projection=projection, seed=seed)
    inputs = torch.tensor(x)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = inputs[order[start : start + batch_size]]
            if len(batch) < 2:  # BatchNorm and NT-Xent need company
                continue
            v1 = _augment(batch, generator, noise=noise, drop=drop, shift=shift)
            v2 = _augment(batch, generator, noise=noise, drop=drop, shift=shift)
            loss = _nt_xent(encoder.project(v1), encoder.project(v2), temperature)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
    encoder.eval()
    return encoder


def _probe_accuracy(e_train: np.ndarray, y_train: np.ndarray, e_test: np.ndarray, y_test: np.ndarray) -> float:
    scaler = StandardScaler().fit(e_train)
    clf = LogisticRegression(max_iter=5000).fit(scaler.transform(e_train), y_train)
    return float(np.mean(clf.predict(scaler.transform(e_test)) == y_test))


def linear_probe(
    encoder: Encoder | EmbedFn, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a logistic regression fitted on frozen embeddings of ``x_train``.

    The standard measure of a self-supervised encoder's utility (and of a stolen copy's). ``encoder``
    is an :class:`Encoder` or any function from inputs to embeddings (a defended API, say).
    Embeddings are standardised with the training rows' statistics before the (L2-regularised) fit.
    """
    fn: EmbedFn = (lambda x: embed(encoder, x)) if isinstance(encoder, Encoder) else encoder
    e_train, e_test = np.asarray(fn(x_train), np.float64), np.asarray(fn(x_test), np.float64)
    return _probe_accuracy(e_train, np.asarray(y_train), e_test, np.asarray(y_test))


def _extraction_loss(loss: Loss, student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(student, target)
    s, t = F.normalize(student, dim=1), F.normalize(target, dim=1)
    n = len(s)
    if loss == "infonce":
        # the victim's embedding of the same input is the positive, the rest of the batch the negatives
        return F.cross_entropy(s @ t.T / temperature, torch.arange(n))
    # Soft nearest-neighbour loss (Frosst et al., 2019) over the 2n points {student, victim}, each
    # pair its own class: every point should have its partner, not another input, as soft neighbour.
    z = torch.cat([s, t])
    logits = (-torch.cdist(z, z).pow(2) / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partners)


@_one_thread()
def steal_encoder(
    victim_embed: EmbedFn,
    queries: np.ndarray,
    *,
    loss: Loss = "mse",
    epochs: int = 200,
    seed: int = 0,
    hidden: int = 256,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 0.1,
) -> Encoder:
    """Direct extraction: query the victim once on ``queries``, then train a student to reproduce
    its embeddings with ``loss``.

    - ``"mse"``: squared error to the victim's embedding.
    - ``"infonce"``: the victim's embedding of the same input is the positive among the batch's
      (cosine similarity, ``temperature``).
    - ``"softnn"``: soft nearest-neighbour loss on the student and victim embeddings of the batch,
      each (student, victim) pair a class of its own (squared distance of normalised embeddings).

    The student is an :class:`Encoder` of the victim's output size, without a projection head.
    Returns it in ``eval()`` mode.

    Raises:
        ValueError: Unknown ``loss``, fewer than two queries, answers of the wrong shape, or a bad setting.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    _check_training(epochs, batch_size, lr, temperature)
    queries = np.asarray(queries, dtype=np.float32)
    if len(queries) < 2:
        raise ValueError(f"at least two queries are needed, got {len(queries)}")
    answers = np.asarray(victim_embed(queries), dtype=np.float32)
    if answers.ndim != 2 or len(answers) != len(queries):
        raise ValueError(f"the victim must return ({len(queries)}, d) embeddings, got {answers.shape}")
    dim_in = int(np.prod(queries.shape[1:]))
    student = Encoder(dim_in, hidden=hidden, dim=answers.shape[1], seed=seed)
    inputs, targets = torch.tensor(queries), torch.tensor(answers)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            value = _extraction_loss(loss, student(inputs[idx]), targets[idx], temperature)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(value)
            optimizer.step()
    student.eval()
    return student


class CoverageDefence:
    """An embedding API that adds more noise the more of the embedding space a key has covered.

    In the spirit of B4B (Dubiński et al., NeurIPS 2023), coverage is measured on what the victim
    returns, where inputs of one kind cluster: each answer is hashed into one of ``2**bits`` buckets
    by :class:`~modelseal.gateway.policies.CoveragePricer`'s random hyperplanes, centred and scaled
    on the victim's embeddings of ``reference`` (the owner's own data). A key's coverage is the
    number of distinct buckets it has visited, counted as each row arrives, over the number of
    buckets ``reference`` occupies (so it can exceed 1). Row ``i`` gets Gaussian noise whose standard
    deviation, per dimension, is ``sigma(c_i)`` times the reference embeddings' spread::

        sigma(c) = sigma_max * clip((c - free) / (full - free), 0, 1) ** power

    so a key under ``free`` coverage is answered exactly and one past ``full`` gets ``sigma_max``.
    The noise is fixed by (``seed``, key, input), so asking again returns the same answer and
    averaging repeats buys nothing. State is one set of buckets per key, in memory, never forgotten.

    Hashing the raw inputs instead separates users much worse on digits: a two-class user's 288
    images cover about as many input-space buckets as a thief's 150 random ones.
    """

    def __init__(
        self,
        victim: EmbedFn,
        reference: np.ndarray,
        *,
        seed: int = 0,
        bits: int = 10,
        free: float = 0.3,
        full: float = 0.6,
        sigma_max: float = 1.0,
        power: float = 1.0,
    ) -> None:
        if not 0.0 <= free < full:
            raise ValueError(f"need 0 <= free < full, got {free}, {full}")
        if not sigma_max >= 0 or not power > 0:
            raise ValueError(f"sigma_max must be non-negative and power positive, got {sigma_max}, {power}")
        ref = np.asarray(victim(np.asarray(reference, dtype=np.float32)), dtype=np.float64)
        if ref.ndim != 2 or len(ref) < 2:
            raise ValueError(f"the victim's embeddings of reference must be (n >= 2, d), got {ref.shape}")
        self.victim = victim
        self._secret = hashlib.sha256(
            b"modelseal-lab-encoder-coverage" + seed.to_bytes(8, "little", signed=True)
        ).digest()
        self.spread = ref.std(axis=0) + 1e-6
        self._hash = CoveragePricer(ref.shape[1], seed=self._secret, bits=bits, centre=ref.mean(0), scale=self.spread)
        self.buckets = len(np.unique(self._hash.bucket_ids(ref)))
        self.free, self.full, self.sigma_max, self.power = free, full, sigma_max, power
        self._seen: dict[str, set[int]] = {}

    def sigma(self, coverage: np.ndarray | float) -> np.ndarray:
        """The noise scale, in units of the reference spread, at ``coverage``."""
        ramp = np.clip((np.asarray(coverage, np.float64) - self.free) / (self.full - self.free), 0.0, 1.0)
        out: np.ndarray = self.sigma_max * ramp**self.power
        return out

    def coverage(self, key_id: str) -> float:
        """Distinct buckets ``key_id`` has visited so far, over the buckets the reference occupies."""
        return len(self._seen.get(key_id, ())) / self.buckets

    def __call__(self, key_id: str, x: np.ndarray) -> np.ndarray:
        """The victim's embeddings of ``x`` as ``key_id`` is answered, float32 ``(n, d)``."""
        x = np.asarray(x, dtype=np.float32)
        clean = np.asarray(self.victim(x), dtype=np.float64)
        seen = self._seen.setdefault(key_id, set())
        visited = np.empty(len(x), dtype=np.float64)
        for i, bucket in enumerate(self._hash.bucket_ids(clean).tolist()):
            seen.add(int(bucket))
            visited[i] = len(seen)
        sigma = self.sigma(visited / self.buckets)
        if not sigma.any():
            return clean.astype(np.float32)
        normals = keyed_normals(self._secret, Batch(key_id, x), clean.shape[1])
        noisy: np.ndarray = (clean + sigma[:, None] * self.spread * normals).astype(np.float32)
        return noisy

    def as_key(self, key_id: str) -> EmbedFn:
        """This API as one key sees it: a function from inputs to embeddings."""
        return lambda x: self(key_id, x)


def _benign_users(guard: CoverageDefence, ds: Dataset, workloads: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Each workload is a user who only embeds images of a few classes: its labelled training images,
    then its test images, in one request under its own key. Its cost is the drop in its own linear
    probe's accuracy, defended against exact embeddings."""
    rows: list[dict[str, Any]] = []
    for classes in workloads:
        in_train, in_test = np.isin(ds.y_train, classes), np.isin(ds.y_test, classes)
        x = np.concatenate([ds.x_train[in_train], ds.x_test[in_test]])
        key = "benign-" + "-".join(str(c) for c in classes)
        clean = np.asarray(guard.victim(x), np.float64)
        defended = np.asarray(guard(key, x), np.float64)
        n = int(in_train.sum())
        y_train, y_test = ds.y_train[in_train], ds.y_test[in_test]
        rows.append(
            {
                "classes": tuple(int(c) for c in classes),
                "queries": len(x),
                "coverage": guard.coverage(key),
                "probe_acc_clean": _probe_accuracy(clean[:n], y_train, clean[n:], y_test),
                "probe_acc_defended": _probe_accuracy(defended[:n], y_train, defended[n:], y_test),
                # how far the answers moved, relative to how far apart the user's own embeddings are
                "relative_noise": float(np.linalg.norm(defended - clean) / np.linalg.norm(clean - clean.mean(0))),
            }
        )
    return rows


@_one_thread()
def run_encoder_study(
    budgets: Sequence[int] = (50, 100, 200, 360),
    losses: Sequence[Loss] = LOSSES,
    *,
    fast: bool = False,
    seed: int = 0,
    defence: dict[str, Any] | None = None,
    benign_workloads: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Seed 003 on digits: how cheaply a SimCLR encoder is stolen, and what coverage pricing buys.

    Trains the victim on the (unlabelled) training split; the thief queries the first ``budget``
    images of a seeded shuffle of the attacker pool (disjoint from the victim's data; 360 images)
    and trains a student with each loss, once against the exact API and once through a
    :class:`CoverageDefence` (``defence`` overrides its settings), each run under a fresh key. Every
    encoder is scored by :func:`linear_probe` on the labelled train/test splits. Benign users
    (``benign_workloads``, default: every pair of classes) measure the defence's cost.

    ``fast=True`` trains for fewer epochs and checks fewer benign pairs (for tests; ~20 s with two budgets). The
    result is a plain dict: ``victim_probe_acc``, ``random_init_probe_acc`` (an untrained encoder of
    the same shape), ``victim_train_size``, ``pool_size``, ``stolen`` (one row per loss, budget and
    ``defended``), ``takeback`` (per loss: accuracy the defence takes from the thief at the largest
    budget, and from a thief who picks its best budget), ``benign`` (one row per workload) and
    ``benign_summary`` (mean and worst probe-accuracy cost).

    Raises:
        ValueError: No budgets or losses, a budget below 2 or above the pool size, an unknown loss.
    """
    start = time.perf_counter()
    ds = load_dataset("digits", seed=seed)
    if not budgets or not losses:
        raise ValueError("budgets and losses must be non-empty")
    if any(b < 2 or b > len(ds.x_pool) for b in budgets):
        raise ValueError(f"budgets must be in [2, {len(ds.x_pool)}] (the attacker pool), got {tuple(budgets)}")
    if any(loss not in LOSSES for loss in losses):
        raise ValueError(f"losses must be among {', '.join(LOSSES)}, got {tuple(losses)}")
    victim = train_simclr(ds.x_train, epochs=60 if fast else 150, seed=seed)

    def victim_embed(x: np.ndarray) -> np.ndarray:
        return embed(victim, x)

    def probe(encoder: Encoder) -> float:
        return linear_probe(encoder, ds.x_train, ds.y_train, ds.x_test, ds.y_test)

    victim_acc = probe(victim)
    random_acc = probe(Encoder(victim.dim_in, dim=victim.dim, seed=seed + 1))
    guard = CoverageDefence(victim_embed, ds.x_train, seed=seed, **(defence or {}))
    order = np.random.default_rng(seed).permutation(len(ds.x_pool))
    stolen: list[dict[str, Any]] = []
    for loss, budget, defended in itertools.product(losses, budgets, (False, True)):
        key = f"thief-{loss}-{budget}"
        api = guard.as_key(key) if defended else victim_embed
        student = steal_encoder(api, ds.x_pool[order[:budget]], loss=loss, epochs=100 if fast else 200, seed=seed)
        acc = probe(student)
        stolen.append(
            {
                "loss": loss,
                "budget": int(budget),
                "defended": defended,
                "probe_acc": acc,
                "share_of_victim": acc / victim_acc,
                # share of the victim's gain over an untrained encoder that the thief got
                "gain_recovered": (acc - random_acc) / (victim_acc - random_acc),
                "coverage": guard.coverage(key) if defended else None,
            }
        )
    takeback: dict[str, dict[str, float]] = {}
    for loss in losses:
        plain = sorted((r for r in stolen if r["loss"] == loss and not r["defended"]), key=lambda r: r["budget"])
        guarded = sorted((r for r in stolen if r["loss"] == loss and r["defended"]), key=lambda r: r["budget"])
        takeback[loss] = {
            # a thief who knows the defence spends the budget that suits it best
            "best_undefended": max(r["probe_acc"] for r in plain),
            "best_defended": max(r["probe_acc"] for r in guarded),
            "at_largest_budget": plain[-1]["probe_acc"] - guarded[-1]["probe_acc"],
        }
        takeback[loss]["best_budget"] = takeback[loss]["best_undefended"] - takeback[loss]["best_defended"]
    if benign_workloads is None:
        pairs = list(itertools.combinations(range(ds.num_classes), 2))
        benign_workloads = pairs[::5] if fast else pairs
    benign = _benign_users(guard, ds, benign_workloads)
    costs = np.array([row["probe_acc_clean"] - row["probe_acc_defended"] for row in benign])
    return {
        "victim_probe_acc": victim_acc,
        "random_init_probe_acc": random_acc,
        "victim_train_size": len(ds.x_train),
        "pool_size": len(ds.x_pool),
        "defence": {"free": guard.free, "full": guard.full, "sigma_max": guard.sigma_max, "power": guard.power},
        "stolen": stolen,
        "takeback": takeback,
        "benign": benign,
        "benign_summary": {
            "users": len(benign),
            "mean_cost": float(costs.mean()) if len(costs) else 0.0,
            "max_cost": float(costs.max()) if len(costs) else 0.0,
            "mean_coverage": float(np.mean([row["coverage"] for row in benign])) if benign else 0.0,
            "mean_relative_noise": float(np.mean([row["relative_noise"] for row in benign])) if benign else 0.0,
        },
        "seconds": time.perf_counter() - start,
    }


def format_study(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_encoder_study` result."""
    lines = [
        f"victim: linear probe {result['victim_probe_acc']:.3f} after SimCLR on {result['victim_train_size']} "
        f"unlabelled images; an untrained encoder of the same shape: {result['random_init_probe_acc']:.3f}",
        "loss     budget  queries/train  stolen  (share)  defended  (share)  coverage",
    ]
    rows = {(r["loss"], r["budget"], r["defended"]): r for r in result["stolen"]}
    for loss, budget in dict.fromkeys((r["loss"], r["budget"]) for r in result["stolen"]):
        plain, guarded = rows[(loss, budget, False)], rows[(loss, budget, True)]
        lines.append(
            f"{loss:<8} {budget:>6}  {budget / result['victim_train_size']:>12.1%}  {plain['probe_acc']:.3f}  "
            f"({plain['share_of_victim']:.0%})    {guarded['probe_acc']:.3f}  ({guarded['share_of_victim']:.0%})"
            f"    {guarded['coverage']:.2f}"
        )
    for loss, back in result["takeback"].items():
        lines.append(
            f"{loss}: the defence takes back {back['at_largest_budget']:+.3f} at the largest budget, "
            f"{back['best_budget']:+.3f} from a thief who picks its budget "
            f"(best {back['best_undefended']:.3f} -> {back['best_defended']:.3f})"
        )
    summary = result["benign_summary"]
    lines.append(
        f"benign users ({summary['users']} two-class workloads): mean probe cost {summary['mean_cost']:+.3f}, "
        f"worst {summary['max_cost']:+.3f}, mean coverage {summary['mean_coverage']:.2f}, "
        f"mean relative noise {summary['mean_relative_noise']:.3f}"
    )
    return "\n".join(lines)
