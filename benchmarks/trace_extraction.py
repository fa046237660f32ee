"""Traceable answers against extraction (docs/spec/gateway-v1.md §7): is the key named?

A digits MLP is served through a :class:`~modelseal.gateway.trace.Tracer`. A thief extracts a copy
through one API key (knockoff-style: natural rows with jitter, labels or probabilities); an innocent
user's key and independently trained models are the controls. For each trace rate and budget it
prints how many of the thief's answers were altered, how many of them the stolen copy reproduces,
the Bonferroni p-value that names the thief's key (over the keys tested), the best p-value any
innocent key or independent model reaches, and the accuracy cost of the rate to legitimate users.

    .venv/bin/python benchmarks/trace_extraction.py [--rates 0.005 0.01 0.02] [--budgets 500 1000 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modelseal.gateway.batch import Batch
from modelseal.gateway.trace import Tracer
from modelseal.lab import data, models
from modelseal.ownership.stats import binomial_tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    ap.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--outputs", nargs="+", default=["labels", "probabilities"])
    ap.add_argument("--keys", type=int, default=100, help="keys tested (Bonferroni factor)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[100, 300], help="the thief's training epochs")
    ap.add_argument("--jitter", type=float, default=0.05, help="the thief's query jitter (fraction of range)")
    args = ap.parse_args()
    ds = data.load_dataset("digits")
    k = ds.num_classes
    victim = models.train(models.build("mlp", ds.input_shape, k, seed=0), ds.x_train, ds.y_train, seed=0)
    independents = [
        models.train(models.build("mlp", ds.input_shape, k, seed=s), ds.x_train, ds.y_train, seed=s)
        for s in (11, 12, 13)
    ]
    base_acc = models.accuracy(victim, ds.x_test, ds.y_test)
    print(f"victim accuracy {base_acc:.3f}; null match rate 1/{k - 1}; Bonferroni over {args.keys} keys")
    print(
        "rate    outputs        budget epochs altered reproduced  p(thief key)  best p(innocent)  benign cost (points)"
    )
    for rate in args.rates:
        tracer = Tracer(b"benchmark-trace-secret-0123456789", rate=rate)

        def serve(x: np.ndarray, key: str, outputs: str, tracer: Tracer = tracer) -> tuple[np.ndarray, np.ndarray]:
            probs, plan = tracer.apply(Batch(key, x), models.probabilities(victim, x))
            return (probs.argmax(axis=1) if outputs == "labels" else probs), plan

        traced_test = serve(ds.x_test, "benign-user", "labels")[0]
        cost = 100 * (models.accuracy(victim, ds.x_test, ds.y_test) - float((traced_test == ds.y_test).mean()))
        for outputs in args.outputs:
            for budget, epochs in [(b, e) for b in args.budgets for e in args.epochs]:
                started = time.perf_counter()
                rng = np.random.default_rng(budget)
                idx = rng.integers(0, len(ds.x_pool), budget)
                span = ds.feature_high - ds.feature_low
                q = np.clip(
                    ds.x_pool[idx] + args.jitter * span * rng.normal(size=(budget, *ds.input_shape)),
                    ds.feature_low,
                    ds.feature_high,
                ).astype(np.float32)
                answers, plan = serve(q, "thief", outputs)
                student = models.train(
                    models.build("mlp", ds.input_shape, k, seed=7), q, answers, epochs=epochs, seed=7
                )
                altered = np.flatnonzero(plan >= 0)
                n = len(altered)
                if n == 0:
                    print(f"{rate:<7} {outputs:<14} {budget:>6} {epochs:>6} {0:>7}  -")
                    continue
                x_alt, served = q[altered], plan[altered]
                matches = int((models.predict(student, x_alt) == served).sum())
                p_thief = min(1.0, binomial_tail(matches, n, 1 / (k - 1)) * args.keys)
                innocent = [int((models.predict(m, x_alt) == served).sum()) for m in independents]
                # an innocent key: a user who sent other rows; its altered answers are on its own rows
                other_q = ds.x_test[: min(budget, len(ds.x_test))]
                _, other_plan = serve(other_q, "innocent-user", "labels")
                other_alt = np.flatnonzero(other_plan >= 0)
                if len(other_alt):
                    innocent.append(int((models.predict(student, other_q[other_alt]) == other_plan[other_alt]).sum()))
                best_innocent = min(
                    min(1.0, binomial_tail(m, n if i < len(independents) else len(other_alt), 1 / (k - 1)) * args.keys)
                    for i, m in enumerate(innocent)
                )
                print(
                    f"{rate:<7} {outputs:<14} {budget:>6} {epochs:>6} {n:>7} {matches:>6}/{n:<5} {p_thief:>12.2g}"
                    f" {best_innocent:>16.2g}  {cost:>8.2f}   ({time.perf_counter() - started:.1f}s)"
                )


if __name__ == "__main__":
    main()
