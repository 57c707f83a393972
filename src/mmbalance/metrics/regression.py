"""The regression task (`dataset.task=regression`, CMU-MOSEI sentiment scores): its losses, its metrics and the
validation criterion that selects the checkpoint.

Metrics of predicted scores p against true scores y over a whole split, as MMSA (`__eval_mosei_regression`) and
MulT (`eval_mosei_senti`) compute them:

* ``mae``: mean |p - y|;
* ``corr``: Pearson's r of p and y; None (undefined) when either is constant or there are fewer than two samples;
* ``acc2_nonneg``, ``f1_nonneg`` (MMSA "Has0"): every sample, y >= 0 vs y < 0 and p >= 0 vs p < 0 (a zero score
  counts as non-negative, BalanceBenchmark's acc-2 and the dataset's ``binary_nonneg`` label);
* ``acc2_nonzero``, ``f1_nonzero`` (MMSA "Non0", MulT's reported Acc-2 and F1): samples with y == 0 left out, then
  y > 0 vs y < 0 and p > 0 vs p <= 0 (a prediction of exactly 0 counts as negative, as both do); None when every
  y is 0;
* the F1 scores are sklearn's ``average="weighted"``: the two classes' F1 = 2 TP / (2 TP + FP + FN) (0 when that
  is 0/0) weighted by their support in y;
* ``acc7``: round(clip(p, -3, 3)) == round(clip(y, -3, 3)); ``acc5`` the same with [-2, 2]. Rounding is half to
  even (numpy's and torch's), as MulT and MMSA and the dataset's ``7class`` label mode;
* ``acc`` and ``macro_f1``: the non-negative convention's accuracy (= ``acc2_nonneg``) and macro-F1 over its two
  classes, so a regression run fills the same columns as a BalanceBenchmark 2-class run of the same data.

Selection: the default criterion of a regression run is the lowest validation MAE (MulT keeps the epoch with the
lowest validation L1 loss, which is the MAE). See `selection_metric`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import UserError
from mmbalance.metrics.classification import macro_f1

TASKS = ("classification", "regression")
# the training losses each task accepts (`dataset.loss`); "auto" picks the first
LOSSES = {"classification": ("cross_entropy",), "regression": ("l1", "mse")}
# the prefix of logged per-head losses ("ce/fused", "l1/audio", ...)
LOSS_KEYS = {"cross_entropy": "ce", "l1": "l1", "mse": "mse"}
# what `eval.select_metric` may name in a regression run; the metrics where lower is better
SELECT_METRICS = ("mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_nonzero", "f1_nonzero", "acc7", "acc5")
LOWER_IS_BETTER = frozenset({"mae"})
# the classification criteria (conf/train.yaml's default is acc): in a regression run they mean the default one
CLASSIFICATION_SELECT_METRICS = ("acc", "macro_f1")
DEFAULT_SELECT_METRIC = "mae"
METRICS = ("mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_nonzero", "f1_nonzero", "acc7", "acc5", "acc", "macro_f1")


def resolve_loss(task: str, loss: str = "auto") -> str:
    """The training loss of `task` named by `dataset.loss` (auto: cross_entropy, or l1 for regression as MulT)."""
    if task not in TASKS:
        raise UserError(f"dataset.task={task!r}; expected one of {list(TASKS)}")
    if loss == "auto":
        return LOSSES[task][0]
    if loss not in LOSSES[task]:
        raise UserError(f"dataset.loss={loss!r} does not train dataset.task={task}; expected auto or one of "
                        f"{list(LOSSES[task])}")
    return loss


def selection_metric(task: str, requested: str) -> str:
    """The validation metric that selects the checkpoint (`eval.select_metric`) for `task`.

    Classification: acc or macro_f1, as asked. Regression: a metric of SELECT_METRICS as asked; the classification
    names (acc, the run config's default, and macro_f1) select on the lowest validation MAE instead.
    """
    if task == "classification":
        if requested not in CLASSIFICATION_SELECT_METRICS:
            raise UserError(f"eval.select_metric={requested} is a regression metric; dataset.task=classification "
                            f"selects on one of {list(CLASSIFICATION_SELECT_METRICS)}")
        return requested
    if requested in CLASSIFICATION_SELECT_METRICS:
        return DEFAULT_SELECT_METRIC
    if requested not in SELECT_METRICS:
        raise UserError(f"eval.select_metric={requested!r}; dataset.task=regression selects on one of "
                        f"{list(SELECT_METRICS)}")
    return requested


def regression_loss(name: str, output: Tensor, target: Tensor) -> Tensor:
    """L1 or MSE (batch mean) of a one-output head's (B, 1) output against (B,) float scores, in float32."""
    if output.ndim != 2 or output.shape[1] != 1:
        raise ValueError(f"a regression head gives one value per sample, (B, 1); got {tuple(output.shape)}")
    if not target.is_floating_point():
        raise UserError(
            "dataset.task=regression: the targets reached the loss as integer class labels, not float scores: "
            "the dataset gives its labels as integers (collate_batch keeps float labels float)")
    pred = output[:, 0].float()
    if name == "l1":
        return F.l1_loss(pred, target.float())
    if name == "mse":
        return F.mse_loss(pred, target.float())
    raise ValueError(f"unknown regression loss {name!r}; expected one of {list(LOSSES['regression'])}")


# ------------------------------------------------------------------------------------------------ metrics


def mae(pred: Tensor, target: Tensor) -> float | None:
    pred, target = _flat(pred), _flat(target)
    return float((pred - target).abs().mean()) if target.numel() else None


def pearson(pred: Tensor, target: Tensor) -> float | None:
    """Pearson's r; None when it is undefined (fewer than two samples, or a constant p or y)."""
    pred, target = _flat(pred), _flat(target)
    if target.numel() < 2:
        return None
    dp, dt = pred - pred.mean(), target - target.mean()
    denom = ((dp * dp).sum() * (dt * dt).sum()).sqrt()
    if float(denom) == 0.0:
        return None
    return float(((dp * dt).sum() / denom).clamp(-1.0, 1.0))


def weighted_f1(pred_pos: Tensor, true_pos: Tensor) -> float | None:
    """sklearn's f1_score(true, pred, average="weighted") of two boolean labels: each class's F1 (0 where
    2 TP + FP + FN = 0) weighted by its support in `true_pos`; None for no samples."""
    pred_pos, true_pos = pred_pos.reshape(-1).bool(), true_pos.reshape(-1).bool()
    n = true_pos.numel()
    if n == 0:
        return None
    total = 0.0
    for cls in (True, False):
        p, t = pred_pos == cls, true_pos == cls
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        total += f1 * int(t.sum())
    return total / n


def binary_accuracy(pred_pos: Tensor, true_pos: Tensor) -> float | None:
    pred_pos, true_pos = pred_pos.reshape(-1).bool(), true_pos.reshape(-1).bool()
    return float((pred_pos == true_pos).double().mean()) if true_pos.numel() else None


def clipped_accuracy(pred: Tensor, target: Tensor, bound: float) -> float | None:
    """Share of samples whose scores, clipped to [-bound, bound] and rounded half to even, agree (acc-7: bound 3)."""
    pred, target = _flat(pred), _flat(target)
    if target.numel() == 0:
        return None
    agree = torch.round(pred.clamp(-bound, bound)) == torch.round(target.clamp(-bound, bound))
    return float(agree.double().mean())


def regression_metrics(pred: Tensor, target: Tensor) -> dict[str, float | None]:
    """Every metric of METRICS (see the module docstring) of scores `pred` against `target`, computed in float64."""
    pred, target = _flat(pred), _flat(target)
    nonneg_pred, nonneg_true = pred >= 0, target >= 0
    nonzero = target != 0
    acc2 = binary_accuracy(nonneg_pred, nonneg_true)
    return {
        "mae": mae(pred, target),
        "corr": pearson(pred, target),
        "acc2_nonneg": acc2,
        "f1_nonneg": weighted_f1(nonneg_pred, nonneg_true),
        "acc2_nonzero": binary_accuracy(pred[nonzero] > 0, target[nonzero] > 0),
        "f1_nonzero": weighted_f1(pred[nonzero] > 0, target[nonzero] > 0),
        "acc7": clipped_accuracy(pred, target, 3.0),
        "acc5": clipped_accuracy(pred, target, 2.0),
        "acc": acc2,
        "macro_f1": macro_f1(nonneg_pred.long(), nonneg_true.long(), 2) if target.numel() else None,
    }


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
