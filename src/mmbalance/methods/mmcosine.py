"""MMCosine: multimodal cosine-similarity logits (Xu, Xu, Hu, Wei, Hu; ICASSP 2023)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method
from mmbalance.models.fusion import fusion_choices, fusion_key
from mmbalance.models.multimodal import Output


def cosine_logits(features: dict[str, Tensor], weights: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """z_m = s * normalize(h_m) @ normalize_rows(W_m)^T, no bias: z_{m,c} = s * cos(h_m, W_m[c]).

    `weights[m]` is modality m's own (C, d_m) block; each class row is normalised within that block (never
    across the concatenated row of all modalities). An all-zero feature (an absent modality under feature
    masking) gives zero logits.
    """
    return {
        m: scaling * F.normalize(h, dim=1) @ F.normalize(weights[m], dim=1).t()
        for m, h in features.items()
    }


class MMCosine(Method):
    """MMCosine (Xu et al., "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained
    Learning", ICASSP 2023; official code GeWu-Lab/MMCosine_ICASSP23).

    Each modality's pooled feature and each class row of that modality's weight block are L2-normalised, so
    z_m = s * cos(h_m, W_m[c]) is bounded by +-s whatever the feature norms; the fused logits are
    z = sum_m z_m and the loss is CE(z, y). The head's bias is not used (it gets no gradient).

    Weight blocks: W_m is the fusion head's `weight_block(m)`: with `backbone.fusion=concat` the slice of the
    one linear layer over the concatenated features; with `backbone.fusion=sum` the weight of modality m's
    own head. Fusions without a linear block per modality (`has_linear_blocks` false: film, gated) are
    refused: cosine logits there would need new per-modality heads, i.e. a different architecture.

    Args:
        scaling: s, the logit scale (official argparse default and README: 10; the peer uses 15).

    Hooks used: `forward` (cosine logits replace the head's linear output, and become `out.unimodal`),
    `eval_fuse` (validation, test and the Shapley metric predict with the same cosine logits, fused and per
    modality).
    Choices: evaluation uses the cosine logits, as the paper and the peer; the official `valid()` scores the
    fused accuracy with the raw `fc_out` + bias (a train/eval mismatch, not followed). The official optional
    NCE term (weight 0 by default, supplementary only) is not implemented. The peer's fallback to the plain
    linear head outside an epoch window and its s = 15 are not followed; the peer's hard-coded 2/3-modality
    slicing is replaced by the fusion's own blocks, so any number of modalities works.
    """

    family = "objective"
    regression_refusal = ("its logits are scaled cosines between the features and one weight row per class, "
                          "trained with cross-entropy: a classifier by construction")

    def __init__(self, scaling: PositiveFloat = 10.0):
        self.scaling = float(scaling)

    def setup(self, run):
        super().setup(run)
        fusion = run.model.fusion
        if not fusion.has_linear_blocks:
            raise UserError(
                f"method mmcosine needs a linear weight block per modality, which backbone.fusion="
                f"{fusion_key(fusion)} does not have; use backbone.fusion={fusion_choices('has_linear_blocks')}"
            )

    def weight_blocks(self, run) -> dict[str, Tensor]:
        fusion = run.model.fusion
        return {m: fusion.weight_block(m) for m in fusion.modalities}

    def cosine(self, run, features: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        unimodal = cosine_logits(features, self.weight_blocks(run), self.scaling)
        return sum(unimodal.values()), unimodal

    def forward(self, run, batch):
        features = run.model.encode(batch.inputs)
        logits, unimodal = self.cosine(run, features)
        return Output(logits, features, unimodal=unimodal)

    def eval_fuse(self, run, features):
        return self.cosine(run, features)
