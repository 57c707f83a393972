"""One evaluation pass: fused accuracy and macro-F1, per-modality accuracy, exact Shapley, imbalance."""

from __future__ import annotations

import contextlib

from typing import TYPE_CHECKING

import torch

from mmbalance.errors import NonFiniteError
from mmbalance.metrics.classification import accuracy, macro_f1
from mmbalance.metrics.shapley import coalitions, imbalance_score, shapley_values

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


@torch.no_grad()
def evaluate(run: "Run", loader, split: str, shapley: bool = True) -> dict[str, float | None]:
    """Metrics of the model as the method predicts, over a whole split, keyed "<split>/<name>".

    For late fusion every coalition reuses the same encoder pass: an absent modality's feature is its
    encoder's output on an all-zero input (input masking, one constant row in eval mode) or zero
    (feature masking). Intermediate fusion falls back to one masked forward per coalition.

    Raises NonFiniteError when any fused, per-modality or coalition logit is NaN/Inf: the argmax of NaN is an
    arbitrary class, so every metric would be computed on noise without saying so.
    """
    model, method = run.model, run.method
    mods = list(model.modalities)
    subsets = coalitions(mods) if shapley else [frozenset(mods)]
    full = frozenset(mods)
    was_training = model.training
    model.eval()
    preds, targets = [], []
    unimodal_preds: dict[str, list] = {m: [] for m in mods}
    correct = {s: 0 for s in subsets}
    have_unimodal = True
    absent_rows = None
    n = 0
    # samples with NaN/Inf in the fused logits, and in any logits (fused, per-modality, coalition): counted on the
    # device and read once after the loop, so this check adds no host sync per batch
    nonfinite_fused = nonfinite_any = None
    for batch in loader:
        batch = batch.to(run.device, non_blocking=True)
        y = batch.label
        with run.autocast():
            features = model.encode(batch.inputs)
            logits, unimodal = method.eval_fuse(run, features)
        pred = logits.argmax(1)
        bad_fused = ~torch.isfinite(logits).all(1)
        bad_any = bad_fused.clone()
        preds.append(pred.cpu())
        targets.append(y.cpu())
        n += len(y)
        correct[full] += int((pred == y).sum())
        if unimodal is None:
            have_unimodal = False
        else:
            for m in mods:
                unimodal_preds[m].append(unimodal[m].argmax(1).cpu())
                bad_any |= ~torch.isfinite(unimodal[m]).all(1)
        masked_subsets = [s for s in subsets if s != full]
        if unimodal is None and not shapley:  # per-modality accuracy needs the single-modality coalitions
            masked_subsets = [frozenset([m]) for m in mods]
        for s in masked_subsets:
            with run.autocast():
                if model.late_fusion:
                    if absent_rows is None:
                        absent_rows = model.absent_features(batch.inputs)
                    masked = {m: features[m] if m in s else absent_rows[m].expand(len(y), -1) for m in mods}
                else:
                    masked = model.encode(batch.inputs, absent=[m for m in mods if m not in s])
                coalition_logits, _ = method.eval_fuse(run, masked)
            correct[s] = correct.get(s, 0) + int((coalition_logits.argmax(1) == y).sum())
            bad_any |= ~torch.isfinite(coalition_logits).all(1)
        if nonfinite_fused is None:
            nonfinite_fused, nonfinite_any = bad_fused.sum(), bad_any.sum()
        else:
            nonfinite_fused += bad_fused.sum()
            nonfinite_any += bad_any.sum()
    if was_training:
        model.train()
    if nonfinite_fused is not None:
        fused_count, any_count = torch.stack([nonfinite_fused, nonfinite_any]).tolist()
        if any_count:
            raise NonFiniteError(
                f"evaluation on {split}: {any_count} of {n} samples have non-finite (NaN/Inf) logits ({fused_count} "
                f"in the fused prediction, the rest in per-modality or coalition predictions); accuracy, macro-F1 "
                "and Shapley values would be computed on NaN, so none are reported. The model's weights or the "
                f"{split} inputs hold NaN/Inf: check the training loss in history.csv and the data")

    preds_t, targets_t = torch.cat(preds), torch.cat(targets)
    k = run.num_classes
    out: dict[str, float | None] = {
        f"{split}/acc": accuracy(preds_t, targets_t, k),
        f"{split}/macro_f1": macro_f1(preds_t, targets_t, k),
    }
    for m in mods:
        if have_unimodal:
            out[f"{split}/acc/{m}"] = accuracy(torch.cat(unimodal_preds[m]), targets_t, k)
        else:  # no per-modality head: the modality alone, the others masked
            out[f"{split}/acc/{m}"] = correct[frozenset([m])] / n
    if shapley:
        values = {s: correct[s] / n for s in subsets}
        phi = shapley_values(values, mods)
        for m in mods:
            out[f"{split}/shapley/{m}"] = phi[m]
        out[f"{split}/value/empty"] = values[frozenset()]
        out[f"{split}/imbalance"] = imbalance_score(phi)
    return out
