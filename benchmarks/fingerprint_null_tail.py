"""How far the fingerprint's parametric null can be trusted: false claims at alpha in simulation.

Reference and suspect models are drawn i.i.d. from one population of independent models whose
match rates vary; the fitted null (modelseal.ownership.stats.fit_null) is made from the references
and the suspect is tested against it. A valid p-value gives P(p <= alpha) <= alpha. Two populations:
a beta distribution (the shape the beta-binomial assumes) and a mixture with a rare high-matching
subgroup (a shape it does not). docs/ownership.md quotes the output.

    .venv/bin/python benchmarks/fingerprint_null_tail.py --trials 20000
"""

from __future__ import annotations

import argparse

import numpy as np

from modelseal.ownership import stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--references", type=int, default=50)
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    populations = {
        "beta(6, 24): rates around 0.2": lambda size: rng.beta(6, 24, size=size),
        "mixture: 3% at 0.40, 97% at 0.10": lambda size: np.where(rng.random(size) < 0.03, 0.40, 0.10),
    }
    n, m = args.items, args.references
    print(f"{args.trials} trials, {m} reference models, {n} items")
    for name, draw in populations.items():
        p_values = np.empty(args.trials)
        for t in range(args.trials):
            counts = rng.binomial(n, draw(m + 1))
            p_values[t] = stats.fit_null(counts[:m].tolist(), n).tail(int(counts[m]))
        rates = ", ".join(f"P(p <= {a:g}) = {np.mean(p_values <= a):.2g}" for a in (1e-2, 1e-4, 1e-6))
        print(f"  {name:36s} {rates}")


if __name__ == "__main__":
    main()
