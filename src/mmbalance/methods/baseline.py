"""Baseline: joint training of all modalities with the fused cross-entropy."""

from mmbalance.methods.base import Method


class Baseline(Method):
    """Joint training with CE(fused logits, y): the reference every balancing method is compared against.

    Hooks used: none (the base class's defaults are exactly this).
    """

    family = "reference"
