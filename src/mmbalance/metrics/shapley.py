"""Exact Shapley contribution of each modality over all 2^M coalitions, and the imbalance score.

The value v(S) of a coalition S is a score of the model's prediction with the modalities outside S absent
(docs/architecture.md, "Settled choices": inputs zeroed in eval mode by default, or pooled features with
`masking: feature`), over the whole evaluation split; `VALUE_FUNCTIONS` names it per task:

* classification: the fused accuracy; v(empty) = the accuracy with every modality absent.
* regression: the negative mean absolute error, v(S) = -MAE(S) (`regression_value`). MAE rather than acc-2
  because it is what the model is trained (L1) and selected (lowest validation MAE) on, it is continuous (acc-2
  only sees the sign, so a modality that moves every score towards the truth without flipping a sign would get
  nothing), and it needs no convention for zero scores. The sign makes a helpful modality's phi positive, as
  with accuracy: phi_m is how much modality m lowers the MAE, in sentiment points, and by efficiency the phi sum
  to MAE(empty) - MAE(all). v(empty) is well defined as for accuracy: with every modality absent each encoder
  gives its constant absent feature, so the model predicts one constant score c for every sample and
  v(empty) = -mean|c - y|.

Shapley values are unchanged by adding a constant to v, so these are also the contributions to the accuracy
gain over v(empty) or to the MAE reduction below MAE(empty). The imbalance score is in the value's unit (accuracy
or MAE points), so it compares runs of one task, not across tasks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence


VALUE_FUNCTIONS = {"classification": "accuracy", "regression": "negative MAE"}


def regression_value(pred, target) -> float:
    """v(S) of the regression task: -mean |pred - target| over the split (see the module docstring)."""
    return -float((pred.detach().double().reshape(-1) - target.detach().double().reshape(-1)).abs().mean())


def coalitions(modalities: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of the modalities, the empty one first and the full one last."""
    mods = list(modalities)
    return [frozenset(c) for r in range(len(mods) + 1) for c in itertools.combinations(mods, r)]


def shapley_values(values: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """phi_m = sum over S not containing m of |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S))."""
    mods = list(modalities)
    n = len(mods)
    phi = {}
    for m in mods:
        others = [k for k in mods if k != m]
        total = 0.0
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                s = frozenset(s)
                total += weight * (values[s | {m}] - values[s])
        phi[m] = total
    return phi


def imbalance_score(phi: Mapping[str, float]) -> float | None:
    """BalanceBenchmark's imbalance: mean absolute pairwise difference of the modalities' phi.

    Two modalities: |phi_1 - phi_2|; three: (|phi_1-phi_2| + |phi_1-phi_3| + |phi_2-phi_3|) / 3; M > 3: the
    mean over all pairs. Undefined (None) for a single modality.
    """
    vals = list(phi.values())
    pairs = list(itertools.combinations(vals, 2))
    if not pairs:
        return None
    return sum(abs(a - b) for a, b in pairs) / len(pairs)
