"""Fusion heads: pooled per-modality features -> fused class logits.

`concat` and `sum` have a linear block per modality, so each modality's own logits are defined and sum
exactly to the fused logits; `film` and `gated` mix modalities non-linearly and have no such split.

Methods see a head only through the per-modality block API of `Fusion` (capabilities `has_unimodal_logits`
and `has_linear_blocks`; `unimodal_logits`, `weight_block`, `bias_share`, `block_parameters`,
`load_shared_head`), never through a subclass's attributes, so a new head with linear blocks serves every
method by implementing that API, and one without says so through it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmbalance.errors import UserError


class Fusion(nn.Module):
    """Base class. Subclasses get `modalities` (ordered) and `dims` {modality: feature size}.

    The per-modality block API. A head with `has_linear_blocks` computes
    f = sum_m (z_m W_m^T + b_m), W_m = `weight_block(m)` (C x d_m), b_m = `bias_share(m)` (C,), and
    implements every method below; a head without it leaves them to raise a clear `UserError`.
    """

    #: whether `unimodal_logits` is defined (each modality's own logits, summing to the fused logits)
    has_unimodal_logits: bool = False
    #: whether the fused logits are a sum of one linear block per modality (`weight_block`, `bias_share`,
    #: `block_parameters`, `load_shared_head` are defined)
    has_linear_blocks: bool = False

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _missing(self, what: str) -> UserError:
        return UserError(
            f"fusion {type(self).__name__} has no linear block per modality, so {what} undefined; use "
            f"backbone.fusion={fusion_choices('has_linear_blocks')} for a method that needs them"
        )

    def unimodal_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's own logits z_m W_m^T + b_m; they sum to the fused logits."""
        if not self.has_linear_blocks:
            raise self._missing("per-modality logits are")
        return {m: features[m] @ self.weight_block(m).t() + self.bias_share(m) for m in self.modalities}

    def weight_block(self, modality: str) -> Tensor:
        """W_m, modality m's (C, d_m) weight block: a differentiable view of the head's parameters."""
        raise self._missing("weight blocks are")

    def bias_share(self, modality: str) -> Tensor:
        """b_m, modality m's (C,) share of the bias; the shares sum to the head's bias."""
        raise self._missing("bias shares are")

    def block_parameters(self, modality: str) -> list[tuple[nn.Parameter, Tensor | None]]:
        """The head parameters modality m's block is made of, each with a 0/1 mask of the entries it owns
        (None = the whole parameter). A parameter shared by several blocks (concat's bias) is listed by each."""
        raise self._missing("per-modality parameters are")

    def load_shared_head(self, weight: Tensor, bias: Tensor, coefficients: dict[str, float]) -> None:
        """Overwrite the head (in place, no grad) with the fixed-weight fusion of one shared linear head
        (weight C x d, bias C) applied to every modality: f = sum_m c_m (z_m weight^T + bias).
        Needs every modality's feature size to be d."""
        raise self._missing("fixed-weight fusions are")

    def _check_shared_head(self, weight: Tensor, coefficients: dict[str, float]) -> None:
        if set(coefficients) != set(self.modalities):
            raise UserError(f"a shared head needs one coefficient per modality {self.modalities}; "
                            f"got {sorted(coefficients)}")
        bad = {m: d for m, d in self.dims.items() if d != weight.shape[1]}
        if bad:
            raise UserError(f"a shared head of input size {weight.shape[1]} does not fit the feature sizes {bad}")


class ConcatFusion(Fusion):
    """f = W [z_1; ...; z_M] + b, the head of OGM-GE, PMR and BalanceBenchmark.

    Modality m's logits are z_m W[:, slice_m]^T + b / M (the peer's bias share; the 2-modality official
    code's b/2 is the same thing), so they sum to f exactly.
    """

    has_unimodal_logits = True
    has_linear_blocks = True

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

    def bias_share(self, modality: str) -> Tensor:
        return self.fc.bias / len(self.modalities)

    def unimodal_logits(self, features):
        share = self.fc.bias / len(self.modalities)
        return {m: features[m] @ self.weight_block(m).t() + share for m in self.modalities}

    def block_parameters(self, modality):
        lo, hi = self.slices[modality]
        mask = torch.zeros_like(self.fc.weight)
        mask[:, lo:hi] = 1.0
        return [(self.fc.weight, mask), (self.fc.bias, None)]

    @torch.no_grad()
    def load_shared_head(self, weight, bias, coefficients):
        self._check_shared_head(weight, coefficients)
        for m, c in coefficients.items():
            lo, hi = self.slices[m]
            self.fc.weight[:, lo:hi] = c * weight
        self.fc.bias.copy_(sum(coefficients.values()) * bias)


class SumFusion(Fusion):
    """f = sum_m (W_m z_m + b_m): one linear classifier per modality; modality m's logits are W_m z_m + b_m."""

    has_unimodal_logits = True
    has_linear_blocks = True

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, features):
        return sum(self.heads[m](features[m]) for m in self.modalities)

    def weight_block(self, modality: str) -> Tensor:
        return self.heads[modality].weight

    def bias_share(self, modality: str) -> Tensor:
        return self.heads[modality].bias

    def unimodal_logits(self, features):
        return {m: self.heads[m](features[m]) for m in self.modalities}

    def block_parameters(self, modality):
        return [(p, None) for p in self.heads[modality].parameters()]

    @torch.no_grad()
    def load_shared_head(self, weight, bias, coefficients):
        self._check_shared_head(weight, coefficients)
        for m, c in coefficients.items():
            self.heads[m].weight.copy_(c * weight)
            self.heads[m].bias.copy_(c * bias)


class FiLMFusion(Fusion):
    """FiLM (as in OGM-GE's fusion modules): the first modality is modulated by the others.

    gamma, beta = split(Linear([z_2; ...; z_M])); h = gamma * P(z_1) + beta; f = Linear(h).
    """

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 256):
        super().__init__(dims, num_classes)
        if len(dims) < 2:
            raise UserError("backbone.fusion=film needs at least two modalities (method=unimodal trains one: "
                            "give it backbone.fusion=concat)")
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


def fusions_with(capability: str) -> list[str]:
    """The registered fusion names whose heads declare `capability` (e.g. "has_linear_blocks")."""
    return [name for name, cls in FUSIONS.items() if getattr(cls, capability)]


def fusion_key(fusion: Fusion) -> str:
    """The `backbone.fusion` value that builds a fusion head like `fusion` ("film"), as messages name it; the class
    name for a head built outside the registry."""
    return next((name for name, cls in FUSIONS.items() if type(fusion) is cls), type(fusion).__name__)


def fusion_choices(capability: str) -> str:
    """`fusions_with(capability)` as an error message's suggestion: "concat or sum"."""
    names = fusions_with(capability)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def build_fusion(name: str, dims: dict[str, int], num_classes: int, **kwargs) -> Fusion:
    if name not in FUSIONS:
        raise UserError(f"backbone.fusion={name!r} is unknown; expected one of {sorted(FUSIONS)}")
    return FUSIONS[name](dims, num_classes, **kwargs)
