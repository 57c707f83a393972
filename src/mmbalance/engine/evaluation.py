"""One evaluation pass: fused accuracy and macro-F1 (classification) or MAE, correlation, acc-2/F1 in both
conventions, acc-7/acc-5 (regression), the per-modality scores, exact Shapley, imbalance."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import torch

from mmbalance.errors import NonFiniteError, UserError
from mmbalance.metrics.classification import accuracy, macro_f1
from mmbalance.metrics.regression import mae, pearson, regression_metrics
from mmbalance.metrics.shapley import coalitions, imbalance_score, regression_value, shapley_values

if TYPE_CHECKING:
    from mmbalance.engine.run import Run


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode for the block, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_features(run: "Run", loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled float features of every modality and the labels over a whole loader, in eval mode, on run.device
    (methods' epoch hooks: PMR's prototypes, Re-learning's purity). Its FLOPs are counted on the first batch
    and scaled by the samples (`FlopMeter.sampled_pass`)."""
    model = run.model
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    labels = []
    with eval_mode(model), run.flops.sampled_pass() as sample:
        for batch in loader:
            batch = batch.to(run.device, non_blocking=True)
            with sample(len(batch)), run.autocast():
                z = model.encode(batch.inputs)
            for m in feats:
                feats[m].append(z[m].float())
            labels.append(batch.label)
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)


def task_of(run: "Run") -> str:
    """The task the run's method was set up for (`Method.set_task`): "classification" or "regression"."""
    return getattr(run.method, "task", "classification")


@torch.no_grad()
def evaluate(run: "Run", loader, split: str, shapley: bool = True) -> dict[str, float | None]:
    """Metrics of the model as the method predicts, over a whole split, keyed "<split>/<name>".

    For late fusion every coalition reuses the same encoder pass: an absent modality's feature is its
    encoder's output on an all-zero input (input masking, one constant row in eval mode) or zero
    (feature masking). Intermediate fusion falls back to one masked forward per coalition.

    Classification: acc, macro_f1, acc/<modality>; the coalition value is the accuracy. Regression (the method's
    `task`; the head's one output is the predicted score): the metrics of `metrics.regression.regression_metrics`
    (mae, corr, acc2_*, f1_*, acc7, acc5, and acc / macro_f1 of the non-negative acc-2), per modality mae/<m>,
    corr/<m> and acc/<m> (its acc-2, non-negative); the coalition value is -MAE (`metrics.shapley`).
    Per-modality scores come from the method's per-modality outputs, or, without them, from the modality alone
    with the others masked. Both tasks add shapley/<modality>, value/empty and imbalance when `shapley`.

    Raises NonFiniteError when any fused, per-modality or coalition logit is NaN/Inf: the argmax of NaN is an
    arbitrary class, so every metric would be computed on noise without saying so.
    """
    model, method = run.model, run.method
    regression = task_of(run) == "regression"
    predict = _predicted_score if regression else _predicted_class
    mods = list(model.modalities)
    full = frozenset(mods)
    subsets = coalitions(mods) if shapley else [full]
    # per sample and on the CPU: the predicted class or score of the full model, of each coalition the masked
    # passes cover (keyed by coalition) and of each modality's own output (when the method gives them)
    preds: dict[frozenset, list] = {full: []}
    own_preds: dict[str, list] | None = {m: [] for m in mods}
    targets = []
    absent_cache: dict = {}  # the absent modalities' feature rows, computed once (late fusion)
    n = 0
    # samples with NaN/Inf in the fused logits, and in any logits (fused, per-modality, coalition): counted on the
    # device and read once after the loop, so this check adds no host sync per batch
    nonfinite = None
    with eval_mode(model):
        for batch in loader:
            batch = batch.to(run.device, non_blocking=True)
            y = batch.label
            if regression and not y.is_floating_point():
                raise UserError(f"evaluation on {split}: dataset.task=regression but the labels are integer "
                                "classes; the dataset gives its labels as integers (collate_batch keeps float labels "
                                "float)")
            with run.autocast():
                features = model.encode(batch.inputs)
                logits, unimodal = method.eval_fuse(run, features)
            if regression:
                _check_one_output(logits)
            bad_fused = ~torch.isfinite(logits).all(1)
            bad_any = bad_fused.clone()
            targets.append(y.float().cpu() if regression else y.cpu())
            preds[full].append(predict(logits))
            n += len(y)
            if unimodal is None:
                own_preds = None
            elif own_preds is not None:
                for m in mods:
                    own_preds[m].append(predict(unimodal[m]))
                    bad_any |= ~torch.isfinite(unimodal[m]).all(1)
            for s, coalition_logits in _coalition_logits(run, batch, features, subsets,
                                                         unimodal is None and not shapley, absent_cache):
                preds.setdefault(s, []).append(predict(coalition_logits))
                bad_any |= ~torch.isfinite(coalition_logits).all(1)
            nonfinite = _add_nonfinite(nonfinite, bad_fused, bad_any)
    _check_finite(nonfinite, n, split)

    y_all = torch.cat(targets)
    scores = {s: torch.cat(p) for s, p in preds.items()}
    # no per-modality output: the modality alone, the others masked
    own = {m: torch.cat(own_preds[m]) if own_preds is not None else scores[frozenset([m])] for m in mods}
    if regression:
        out = {f"{split}/{k}": v for k, v in regression_metrics(scores[full], y_all).items()}
        for m, p in own.items():
            out.update({f"{split}/mae/{m}": mae(p, y_all), f"{split}/corr/{m}": pearson(p, y_all),
                        f"{split}/acc/{m}": float(((p >= 0) == (y_all >= 0)).double().mean())})
        value = regression_value
    else:
        k = run.num_classes
        out = {f"{split}/acc": accuracy(scores[full], y_all, k), f"{split}/macro_f1": macro_f1(scores[full], y_all, k)}
        out.update({f"{split}/acc/{m}": accuracy(p, y_all, k) for m, p in own.items()})
        value = functools.partial(accuracy, num_classes=k)
    if shapley:
        values = {s: value(scores[s], y_all) for s in subsets}
        phi = shapley_values(values, mods)
        out.update({f"{split}/shapley/{m}": phi[m] for m in mods})
        out[f"{split}/value/empty"] = values[frozenset()]
        out[f"{split}/imbalance"] = imbalance_score(phi)
    return out


def _predicted_class(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1).cpu()


def _predicted_score(logits: torch.Tensor) -> torch.Tensor:
    """A regression head's one output per sample."""
    return logits[:, 0].float().cpu()


def _add_nonfinite(counts: torch.Tensor | None, bad_fused: torch.Tensor, bad_any: torch.Tensor) -> torch.Tensor:
    """The running (fused, any) counts of samples with non-finite outputs, kept on the device: no host sync per
    batch."""
    batch = torch.stack([bad_fused.sum(), bad_any.sum()])
    return batch if counts is None else counts + batch


def _check_finite(counts: torch.Tensor | None, n: int, split: str) -> None:
    """Raise NonFiniteError when any sample had a non-finite output (counted by `_add_nonfinite`)."""
    if counts is None:
        return
    fused_count, any_count = counts.tolist()
    if any_count:
        raise NonFiniteError(
            f"evaluation on {split}: {any_count} of {n} samples have non-finite (NaN/Inf) logits ({fused_count} "
            f"in the fused prediction, the rest in per-modality or coalition predictions); accuracy, macro-F1 "
            "and Shapley values would be computed on NaN, so none are reported. The model's weights or the "
            f"{split} inputs hold NaN/Inf: check the training loss in history.csv and the data")


def _coalition_logits(run: "Run", batch, features: dict, subsets: list[frozenset], singles: bool, cache: dict):
    """The method's fused logits for each coalition but the full one (modalities outside it absent), or, with
    `singles` (per-modality scores without per-modality logits and without Shapley), for each modality alone.
    Late fusion reuses `features` (one encoder pass) with each absent modality's constant row, kept in `cache`;
    intermediate fusion encodes once per coalition."""
    model, method = run.model, run.method
    mods = list(model.modalities)
    full = frozenset(mods)
    masked_subsets = [frozenset([m]) for m in mods if len(mods) > 1] if singles else [s for s in subsets if s != full]
    for s in masked_subsets:
        with run.autocast():
            if model.late_fusion:
                if "rows" not in cache:
                    cache["rows"] = model.absent_features(batch.inputs)
                n = len(batch.label)
                masked = {m: features[m] if m in s else cache["rows"][m].expand(n, -1) for m in mods}
            else:
                masked = model.encode(batch.inputs, absent=[m for m in mods if m not in s])
            logits, _ = method.eval_fuse(run, masked)
        yield s, logits


def _check_one_output(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise UserError(f"dataset.task=regression needs a head with one output per sample; the model gives "
                        f"{tuple(logits.shape)} (is the dataset's num_classes 1?)")
