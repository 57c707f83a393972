"""Exact Shapley contribution of each modality over all 2^M coalitions, and the imbalance score.

The value of a coalition S is the fused accuracy with the modalities outside S absent (docs/architecture.md, "Settled choices":
inputs zeroed in eval mode by default, v(empty) = accuracy with every input zeroed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence


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
