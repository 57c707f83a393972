"""CML: Calibrating Multimodal Learning (Ma, Zhang, Wu, Zhang, Hu, Zhou, Zhao, Zhang; ICML 2023)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat
from mmbalance.methods.base import Method
from mmbalance.models.multimodal import mask_modalities


def removal_levels(batch_size: int, modalities: list[str], generator: torch.Generator | None = None,
                   device=None) -> list[dict[str, Tensor]]:
    """Nested per-sample removals: level k (0..M-1) has the first k modalities of each sample's own random
    order absent, as {modality: (B,) bool, True = absent}.

    Each sample's order is a uniform random permutation: the argsort of iid uniform keys. Entry [i, j] of
    that argsort is read as the position of modality j in sample i's removal order, so modality j is absent
    at level k exactly when its position is < k. Level 0 is the full input, level M-1 keeps one modality,
    and each level's absent set contains the previous one's.
    """
    keys = torch.rand(batch_size, len(modalities), generator=generator, device=device)
    position = keys.argsort(dim=1)
    return [{m: position[:, j] < k for j, m in enumerate(modalities)} for k in range(len(modalities))]


def calibration_penalty(conf: Tensor, correct: Tensor, epsilon: float = 0.0, hinge: str = "sample") -> Tensor:
    """The CML regulariser R over nested levels (L, B): conf[k] = max softmax probability at level k,
    correct[k] = whether level k's prediction is right.

    "sample" (the official code), summed over samples and over the pairs k -> k+1:
        ReLU((conf[k+1] - conf[k]) * 1[correct[k]] - eps)                                 (trick 1)
      + ReLU((conf[k+1] - sg(conf[k])) * 1[~correct[k+1] & ~correct[k]] - eps)             (trick 2)
    "batch" (the peer, BalanceMM): sum_k ReLU(sum_i (conf[k+1] - conf[k])), no correctness masks, no eps.
    """
    later, earlier = conf[1:], conf[:-1]
    if hinge == "batch":
        return F.relu((later - earlier).sum(dim=1)).sum()
    right = correct[:-1].to(conf.dtype)
    both_wrong = (~correct[1:] & ~correct[:-1]).to(conf.dtype)
    trick1 = F.relu((later - earlier) * right - epsilon)
    trick2 = F.relu((later - earlier.detach()) * both_wrong - epsilon)
    return (trick1 + trick2).sum()


class CML(Method):
    """CML (Ma et al., "Calibrating Multimodal Learning", ICML 2023): removing modalities must not make the
    prediction more confident.

    Per step each sample draws its own random removal order (`removal_levels`, from the run's seeded noise
    generator, so resumes replay it); level k removes the first k modalities of that order, down to one
    modality. The loss is

        mean_k CE(z^k, y) + lam * R,    R = `calibration_penalty`(max softmax of z^k, correctness of z^k)

    with R summed over the batch (the official scale: the penalty grows with the batch size).

    Args:
        lam: weight of R; official beta/100 with beta = 10 (README) = 0.1, which is also the peer's `lam`.
        epsilon: the hinge margin (official 0).
        hinge: "sample" (default, official: per-sample hinge with the correctness masks, trick 2 detaching
            the fuller level's confidence) or "batch" (the peer's: one hinge on the batch-summed confidence
            change per level, no masks). At batch level samples whose confidence rose cancel samples whose
            confidence fell, so it is much weaker; it is kept only to reproduce the peer.
        removal: how a modality is removed. "feature" (default): its pooled feature is zeroed through the
            shared `mask_modalities` and the fusion head re-run, so levels cost M-1 head forwards and no
            encoder pass; on the concat head this is exactly the peer's logit subtraction z - W_r h_r.
            "model": `run.model(inputs, absent=...)`, i.e. the model's own `masking` (by default zeroed
            inputs, as the Shapley metric): M-1 extra encoder forwards and backwards per step, and
            train-mode BatchNorm sees the partly zeroed batches (its running statistics with them).

    Hooks used: `loss` (levels from the features of the default forward). Two modalities at least, as every
    balancing method (`min_modalities`).
    Choices: per-sample random orders, per-sample hinge and both correctness tricks follow the official code
    (QingyangZhang/CML, miwae/train.py); the peer shuffles one order per epoch for all samples and uses the
    batch hinge without the masks (option `hinge=batch`). The official code removes views by mean
    imputation of raw vector inputs (a multi-view setting); here removal is zeroing, the project's one
    definition of absence. The CE over all levels (mean, weight 1) is part of the loss in both.
    """

    family = "objective"
    regression_refusal = ("its calibration penalty compares the confidence (the largest softmax class "
                          "probability) of predictions with and without modalities, and which of them are "
                          "correct")

    def __init__(
        self,
        lam: NonNegativeFloat = 0.1,
        epsilon: NonNegativeFloat = 0.0,
        hinge: Literal["sample", "batch"] = "sample",
        removal: Literal["feature", "model"] = "feature",
    ):
        self.lam = lam
        self.epsilon = epsilon
        self.hinge = hinge
        self.removal = removal

    def level_logits(self, run, batch, out) -> list[Tensor]:
        """Fused logits at every removal level, level 0 (nothing removed) first."""
        model = run.model
        levels = removal_levels(len(batch.label), list(model.modalities),
                                run.noise_generator(out.logits.device), out.logits.device)
        logits = [out.logits]
        for absent in levels[1:]:
            if self.removal == "feature":
                logits.append(model.fuse(mask_modalities(out.features, absent)))
            else:
                logits.append(model(batch.inputs, absent=absent).logits)
        return logits

    def loss(self, run, batch, out):
        logits = torch.stack(self.level_logits(run, batch, out)).float()  # (L, B, C)
        levels, n, classes = logits.shape
        ce = F.cross_entropy(logits.reshape(levels * n, classes), batch.label.repeat(levels))  # = mean_k CE_k
        conf, pred = torch.softmax(logits, dim=-1).max(dim=-1)
        penalty = calibration_penalty(conf, pred == batch.label, self.epsilon, self.hinge)
        return {"loss": ce + self.lam * penalty, "ce": ce, "ce/fused": F.cross_entropy(logits[0], batch.label),
                "penalty": penalty}
