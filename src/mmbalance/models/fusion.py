"""Fusion heads: pooled per-modality features -> fused class logits.

`concat` and `sum` have a linear block per modality, so each modality's own logits are defined and sum
exactly to the fused logits; `film` and `gated` mix modalities non-linearly and have no such split.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmbalance.errors import UserError


class Fusion(nn.Module):
    """Base class. Subclasses get `modalities` (ordered) and `dims` {modality: feature size}."""

    #: whether `unimodal_logits` is defined (a linear block per modality)
    has_unimodal_logits: bool = False

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def unimodal_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        raise UserError(
            f"fusion {type(self).__name__} has no linear block per modality, so per-modality logits are "
            "undefined; use backbone.fusion=concat or sum for a method that needs them"
        )


class ConcatFusion(Fusion):
    """f = W [z_1; ...; z_M] + b, the head of OGM-GE, PMR and BalanceBenchmark.

    Modality m's logits are z_m W[:, slice_m]^T + b / M (the peer's bias share; the 2-modality official
    code's b/2 is the same thing), so they sum to f exactly.
    """

    has_unimodal_logits = True

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)
        offsets, start = {}, 0
        for m, d in dims.items():
            offsets[m] = (start, start + d)
            start += d
        self.slices = offsets

    def forward(self, features):
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=1))

    def weight_block(self, modality: str) -> Tensor:
        lo, hi = self.slices[modality]
        return self.fc.weight[:, lo:hi]

    def unimodal_logits(self, features):
        share = self.fc.bias / len(self.modalities)
        return {m: features[m] @ self.weight_block(m).t() + share for m in self.modalities}


class SumFusion(Fusion):
    """f = sum_m (W_m z_m + b_m): one linear classifier per modality; modality m's logits are W_m z_m + b_m."""

    has_unimodal_logits = True

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, features):
        return sum(self.heads[m](features[m]) for m in self.modalities)

    def unimodal_logits(self, features):
        return {m: self.heads[m](features[m]) for m in self.modalities}


class FiLMFusion(Fusion):
    """FiLM (as in OGM-GE's fusion modules): the first modality is modulated by the others.

    gamma, beta = split(Linear([z_2; ...; z_M])); h = gamma * P(z_1) + beta; f = Linear(h).
    """

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 256):
        super().__init__(dims, num_classes)
        if len(dims) < 2:
            raise UserError("backbone.fusion=film needs at least two modalities")
        first, rest = self.modalities[0], self.modalities[1:]
        self.project = nn.Linear(dims[first], hidden)
        self.condition = nn.Linear(sum(dims[m] for m in rest), 2 * hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features):
        gamma, beta = self.condition(torch.cat([features[m] for m in self.modalities[1:]], 1)).chunk(2, 1)
        return self.fc(gamma * self.project(features[self.modalities[0]]) + beta)


class GatedFusion(Fusion):
    """Gated fusion: each modality is projected to a shared space and weighted by a sigmoid gate computed
    from all modalities; f = Linear(sum_m g_m * P_m(z_m)). Generalises OGM-GE's two-modality gate."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 256):
        super().__init__(dims, num_classes)
        self.project = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.gate = nn.Linear(sum(dims.values()), hidden * len(dims))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features):
        gates = torch.sigmoid(self.gate(torch.cat([features[m] for m in self.modalities], 1)))
        gates = gates.chunk(len(self.modalities), dim=1)
        return self.fc(sum(g * self.project[m](features[m]) for g, m in zip(gates, self.modalities)))


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


def build_fusion(name: str, dims: dict[str, int], num_classes: int, **kwargs) -> Fusion:
    if name not in FUSIONS:
        raise UserError(f"backbone.fusion={name!r} is unknown; expected one of {sorted(FUSIONS)}")
    return FUSIONS[name](dims, num_classes, **kwargs)
