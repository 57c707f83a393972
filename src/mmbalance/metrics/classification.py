"""Accuracy and macro-F1 from epoch-level statistics (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def accuracy(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    return float(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro"))


def macro_f1(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all `num_classes` classes (a class absent from both the
    targets and the predictions counts with F1 = 0, as in the peer), from the whole split at once."""
    per_class = multiclass_f1_score(preds, target, num_classes=num_classes, average="none", zero_division=0)
    return float(per_class.mean())
