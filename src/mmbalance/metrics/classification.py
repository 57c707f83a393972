"""Accuracy and macro-F1 from epoch-level statistics: exact tensor arithmetic on the whole split at once.

Plain torch (per-class counts with `bincount`), so importing the training recipe does not load a metrics
library. The definitions:

* accuracy: correct predictions over all samples (torchmetrics' `multiclass_accuracy(average="micro")`);
* macro-F1: the unweighted mean over ALL `num_classes` classes of the per-class F1 = 2 TP / (2 TP + FP + FN),
  where a class with 2 TP + FP + FN = 0 (absent from both targets and predictions) has F1 = 0. This equals
  torchmetrics' `multiclass_f1_score(average="none", zero_division=0).mean()`, which the project used before.
  torchmetrics' `average="macro"` differs in exactly that case: it leaves such a class out of the mean. A class
  without support that is predicted (FP > 0) has F1 = 0 under both.
"""

from __future__ import annotations

import torch


def _as_labels(preds: torch.Tensor) -> torch.Tensor:
    """Class indices from (N,) labels or (N, C) scores (argmax over the class dimension, as torchmetrics)."""
    return preds.argmax(dim=1) if preds.ndim == 2 else preds


def accuracy(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Fraction of samples whose predicted class equals the target (0.0 for an empty split)."""
    preds, target = _as_labels(preds).reshape(-1), target.reshape(-1)
    if target.numel() == 0:
        return 0.0
    return float((preds == target).sum().item() / target.numel())


def per_class_f1(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) float64 F1 of every class, 0 where 2 TP + FP + FN = 0."""
    preds, target = _as_labels(preds).reshape(-1).long(), target.reshape(-1).long()
    k = int(num_classes)
    if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= k or int(target.min()) < 0
                          or int(target.max()) >= k):
        raise ValueError(f"class indices must lie in [0, {k}); got predictions in [{int(preds.min())}, "
                         f"{int(preds.max())}] and targets in [{int(target.min())}, {int(target.max())}]")
    # three per-class counts, O(N + C) memory: a k x k confusion matrix is 8 k^2 bytes (320 GB at 200k classes)
    tp = torch.bincount(target[preds == target], minlength=k).to(torch.float64)
    denom = (torch.bincount(preds, minlength=k) + torch.bincount(target, minlength=k)).to(torch.float64)
    # (TP + FP) + (TP + FN) = 2 TP + FP + FN
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def macro_f1(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all `num_classes` classes (a class absent from both the
    targets and the predictions counts with F1 = 0, as in the peer), from the whole split at once."""
    return float(per_class_f1(preds, target, num_classes).mean())
