"""Baseline: joint training of all modalities with the fused cross-entropy (or the regression loss)."""

from mmbalance.methods.base import Method


class Baseline(Method):
    """Joint training with CE(fused logits, y): the reference every balancing method is compared against.
    With dataset.task=regression the loss is the L1 or MSE of the fused one-output head (`Method.task_loss`).

    Hooks used: none (the base class's defaults are exactly this).
    """

    family = "reference"
    tasks = ("classification", "regression")
