"""Unimodal: one modality trained alone (the BalanceBenchmark paper's Unimodal-1/2/3 rows)."""

from mmbalance.errors import UserError
from mmbalance.methods.base import Method


class Unimodal(Method):
    """Train one modality alone: the model is built from that modality's encoder and a head over it.

    Args:
        modality: the modality to keep, e.g. ``method.modality=audio``.

    Hooks used: `select_modalities` (the model only ever sees the chosen modality). The loss is the
    cross-entropy of that model's logits (with dataset.task=regression the L1/MSE of its one output), so the
    result is what the modality reaches on its own.
    """

    family = "reference"
    tasks = ("classification", "regression")

    def __init__(self, modality: str):
        self.modality = modality

    def select_modalities(self, available: list[str]) -> list[str]:
        if self.modality not in available:
            raise UserError(
                f"method.modality={self.modality!r} is not a modality of this dataset; "
                f"expected one of {available}" + (" (digits_av's text modality: dataset.text=true)"
                                                  if self.modality == "text" and "text" not in available else "")
            )
        return [self.modality]
