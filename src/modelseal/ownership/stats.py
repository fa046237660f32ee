"""p-values for ownership evidence (docs/spec/ownership-v1.md §6).

Two nulls, and the verifier uses the more conservative:

* **Key randomness** (watermarks only). Every trigger's target is drawn uniformly from the K
  classes by the key, independently of the trigger input. A model that never saw the key answers
  a trigger with *some* label; the chance that label equals an independent uniform target is
  exactly 1/K, whatever the model is, and targets are independent across triggers. So the number
  of matches of an independent model is exactly Binomial(n, 1/K) over the key's randomness — the
  reason the key is committed to before any suspect exists.
* **Reference models** (watermarks and fingerprints). Match counts of models trained without
  the key give an empirical null. Fingerprint probes have no exact null (independent models agree
  with the owner's more often than 1/K, because they learned the same task), so they rely on
  this alone. The counts are fitted with a beta-binomial (a binomial whose rate varies between
  models), taking upper confidence bounds on the mean rate and on its spread, so that 50 models
  do not make an optimistic tail.

Evidence is read at planned *looks* (100, 200, 400, ... queries) to stop early on a clear copy;
look j is tested at a share w_j of alpha (w = 1/2, 1/4, ..., the last look taking the rest), so
the chance of any false claim stays below alpha. The reported p-value is min_j p_j / w_j.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["NullFit", "binomial_tail", "fit_null", "look_schedule", "look_weights"]

FIRST_LOOK = 100
CONFIDENCE = 0.999  # of the upper bounds on the reference models' mean rate and spread
MIN_REFERENCE_MODELS = 10


def binomial_tail(matches: int, n: int, rate: float) -> float:
    """P(X >= matches) for X ~ Binomial(n, rate), exact (scipy's regularised incomplete beta)."""
    from scipy.stats import binom

    if matches <= 0:
        return 1.0
    return float(binom.sf(matches - 1, n, rate))


@dataclass(frozen=True)
class NullFit:
    """A beta-binomial null fitted to reference models' match counts at one look size."""

    n: int
    models: int
    mean_rate: float  # observed
    rate_upper: float  # the mean rate used: an upper bound at CONFIDENCE
    rho_upper: float  # intra-model correlation used (0 = plain binomial)

    def tail(self, matches: int) -> float:
        """P(X >= matches) under the fitted null."""
        from scipy.stats import betabinom

        if matches <= 0:
            return 1.0
        if self.rho_upper <= 1e-12:
            return binomial_tail(matches, self.n, self.rate_upper)
        scale = 1.0 / self.rho_upper - 1.0
        a, b = self.rate_upper * scale, (1.0 - self.rate_upper) * scale
        return float(betabinom.sf(matches - 1, self.n, a, b))

    def describe(self) -> str:
        return (
            f"beta-binomial fitted to {self.models} reference models (observed mean rate {self.mean_rate:.4f}; "
            f"used {self.rate_upper:.4f}, correlation {self.rho_upper:.4f}, upper bounds at {CONFIDENCE})"
        )


def fit_null(counts: Sequence[int], n: int) -> NullFit:
    """Fit the null to ``counts`` (matches of each reference model out of ``n`` items).

    Mean rate: the larger of the Student-t and the pooled Clopper-Pearson upper bounds. Spread:
    the sample variance's chi-square upper bound, turned into a beta-binomial correlation by the
    method of moments.
    """
    from scipy.stats import beta, chi2, t

    m = len(counts)
    if m < MIN_REFERENCE_MODELS:
        raise ValueError(f"a null needs at least {MIN_REFERENCE_MODELS} reference models, got {m}")
    if n <= 0:
        raise ValueError("n must be positive")
    rates = np.asarray(counts, dtype=np.float64) / n
    mean = float(rates.mean())
    sd = float(rates.std(ddof=1))
    upper_t = mean + float(t.ppf(CONFIDENCE, m - 1)) * sd / math.sqrt(m)
    total = int(np.sum(counts))
    upper_cp = float(beta.ppf(CONFIDENCE, total + 1, m * n - total)) if total < m * n else 1.0
    rate = min(max(upper_t, upper_cp), 1.0 - 1e-9)
    var_upper = sd * sd * (m - 1) / float(chi2.ppf(1.0 - CONFIDENCE, m - 1))
    binomial_var = rate * (1.0 - rate) / n
    rho = 0.0 if n == 1 else max(0.0, (var_upper / binomial_var - 1.0) / (n - 1))
    return NullFit(n=n, models=m, mean_rate=mean, rate_upper=rate, rho_upper=min(rho, 0.999))


def look_schedule(total: int, first: int = FIRST_LOOK) -> list[int]:
    """Query counts at which evidence is read: first, 2*first, 4*first, ... then ``total``."""
    if total <= 0:
        return []
    looks = []
    size = first
    while size < total:
        looks.append(size)
        size *= 2
    looks.append(total)
    return looks


def look_weights(count: int) -> list[float]:
    """alpha shares of the looks: 1/2, 1/4, ..., and the last look the remainder (they sum to 1)."""
    if count <= 0:
        return []
    weights = [2.0 ** -(j + 1) for j in range(count - 1)]
    weights.append(1.0 - sum(weights))
    return weights
