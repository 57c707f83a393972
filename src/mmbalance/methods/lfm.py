"""LFM: dynamically Learning the modality gap (Yang, Wan, Jiang, Xu: "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap", NeurIPS 2024), as the official code (njustkmg/NeurIPS24-LFM) does it."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from mmbalance.constraints import NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from mmbalance.data.batch import collate_batch
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_inactive_options

log = logging.getLogger("mmbalance")

#: the official heuristic (`Crema_epoch.py`): CE weight alpha_1(e) = sum_i c_i e^i, fitted to a 200-epoch CREMA-D run
FITTED_COEFFICIENTS = (0.204623704, 3.35472727e-3, 1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11)
FITTED_SPAN = 200


def scheduled_ce_weight(epoch: float, schedule_epochs: int = FITTED_SPAN) -> float:
    """alpha_1 at a 0-based epoch: the official polynomial at e = epoch * 200 / schedule_epochs, clamped to
    [0, 1] (raw, it exceeds 1 at epochs 177-188 and diverges after ~200). alpha_2 = 1 - alpha_1."""
    e = epoch * FITTED_SPAN / schedule_epochs
    value = sum(c * e**i for i, c in enumerate(FITTED_COEFFICIENTS))
    return min(max(value, 0.0), 1.0)


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Batch mean of JS(p, q) = ½[KL(p‖m) + KL(q‖m)], m = ½(p + q), natural log, from logits (stable)."""
    log_p = F.log_softmax(logits_p.float(), dim=1)
    log_q = F.log_softmax(logits_q.float(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * (kl_p + kl_q)).mean()


def modality_gap(unimodal: dict[str, Tensor]) -> Tensor:
    """The official code's "modality gap" term: JS divergence between the modalities' prediction distributions;
    for M > 2 the mean over all pairs (the peer's generalisation; equal to the official term for M = 2)."""
    pairs = list(itertools.combinations(list(unimodal), 2))
    return sum(js_divergence(unimodal[a], unimodal[b]) for a, b in pairs) / len(pairs)


class LFMWeights(nn.Module):
    """The learnable variant's mixing weight: `align` = alpha_2 (a parameter), alpha_1 = 1 - alpha_2."""

    def __init__(self, align: float):
        super().__init__()
        self.align = nn.Parameter(torch.tensor(float(align)), requires_grad=False)


class LFM(Method):
    """LFM: L = scale · (alpha_1 · CE(z, y) + alpha_2 · D), with z = mean_m z_m (logit averaging of the per-modality
    heads) and D the modality-gap term, alpha_2 = 1 - alpha_1.

    Loss, code versus paper: the paper describes the unsupervised term as contrastive learning between the
    modalities' representations; the official code uses the Jensen–Shannon divergence between the unimodal
    prediction distributions. We implement the code's JS term (`modality_gap`; mean pairwise JS for M > 2).

    Args:
        weighting: "scheduled" (default; the official `Crema_epoch.py`) = alpha_1 from the fitted polynomial of
            the epoch (`scheduled_ce_weight`); "learnable" (`Crema_epoch_learnable.py`) = alpha_2 is updated at
            every epoch start by the official hypergradient step (see `hyper_step`).
        scale: the official overall factor 2.
        fused_logits: "mean" (official: z = (1/M) sum_m z_m; with the concat head this is the fused logits / M,
            with `backbone.fusion=sum` it is the official architecture exactly) or "head" (the fusion head's
            output = sum_m z_m, the peer's choice). Prediction (argmax) is the same either way.
        schedule_epochs: the epoch count the fitted polynomial is stretched over (200 = official, the raw
            epoch; set it to `trainer.epochs` to run the whole curve in a shorter run).
        initial_align_weight: learnable start alpha_2 (official 0.95, so CE starts at 0.05; the peer reverses it).
        alpha_lr: eta_alpha (official 1e-4), halved every `alpha_lr_halve_every` epochs (compounding).
        alpha_min, alpha_max: the clip of alpha_2 (official [0.05, 0.95]).
        holdout_size: learnable only: training samples removed from training as the held-out set (official 16).
        hyper_batch_size: how many of them the hypergradient uses each epoch (official 8; a fixed batch).

    Hooks: `loss`; for "learnable" also `hold_out` (carve the held-out samples from the training split, never val
    or test; rebuild the train loader), `setup` (the learnable weight) and `on_epoch_start` (the hyper-step;
    counted in the FLOPs).
    Per-modality logits come from the fusion's linear blocks (concat slices with b/M, or sum heads): the
    official code's aux heads are exactly `backbone.fusion=sum`; concat differs only by sharing one bias.

    Choices against the peer (BalanceMM): logit averaging instead of the concat output; the official learnable
    start (0.05 CE / 0.95 align), not reversed; the held-out batch comes from the training split, not the test
    set; the scheduled weights are available (the peer always runs the learnable update). Against the official
    code: the polynomial is clamped to [0, 1]; the held-out forward runs in train mode as in the official code,
    but the BatchNorm running statistics it would move are restored afterwards.
    """

    family = "objective"
    regression_refusal = ("its modality-gap term is the Jensen-Shannon divergence between the modalities' "
                          "predicted class distributions")
    needs_unimodal_logits = True

    def __init__(
        self,
        weighting: Literal["scheduled", "learnable"] = "scheduled",
        scale: PositiveFloat = 2.0,
        fused_logits: Literal["mean", "head"] = "mean",
        schedule_epochs: PositiveInt = FITTED_SPAN,
        initial_align_weight: Probability = 0.95,
        alpha_lr: NonNegativeFloat = 1e-4,
        alpha_lr_halve_every: PositiveInt = 20,
        alpha_min: Probability = 0.05,
        alpha_max: Probability = 0.95,
        holdout_size: PositiveInt = 16,
        hyper_batch_size: PositiveInt = 8,
    ):
        refuse_inactive_options(LFM, {"initial_align_weight": initial_align_weight, "alpha_lr": alpha_lr,
                                      "alpha_lr_halve_every": alpha_lr_halve_every, "alpha_min": alpha_min,
                                      "alpha_max": alpha_max, "holdout_size": holdout_size,
                                      "hyper_batch_size": hyper_batch_size}, "weighting", weighting, "learnable")
        refuse_inactive_options(LFM, {"schedule_epochs": schedule_epochs}, "weighting", weighting, "scheduled")
        if not 0 < hyper_batch_size <= holdout_size:
            raise UserError(f"method.hyper_batch_size={hyper_batch_size} must be in 1..holdout_size={holdout_size}")
        self.weighting = weighting
        self.scale = scale
        self.fused_logits = fused_logits
        self.schedule_epochs = schedule_epochs
        self.initial_align_weight = initial_align_weight
        self.alpha_lr = alpha_lr
        self.alpha_lr_halve_every = alpha_lr_halve_every
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.holdout_size = holdout_size
        self.hyper_batch_size = hyper_batch_size
        self.alpha: LFMWeights | None = None
        self.last_hypergradient = float("nan")

    def hold_out(self, run):
        if self.weighting != "learnable":
            return
        dataset = run.train_loader.dataset
        n = len(dataset)
        if self.holdout_size >= n:
            raise UserError(f"method.holdout_size={self.holdout_size} but the training split has {n} samples")
        perm = np.random.default_rng(run.seed + 4801).permutation(n)
        held, kept = perm[: self.holdout_size], np.sort(perm[self.holdout_size:])
        self.holdout_indices, self.train_indices = np.sort(held), kept
        run.train_loader = run.make_loader(Subset(dataset, kept.tolist()), train=True)
        # one fixed batch for the whole run: the first `hyper_batch_size` held-out samples
        self.hyper_batch = collate_batch([dataset[int(i)] for i in held[: self.hyper_batch_size]])

    def setup(self, run):
        super().setup(run)  # holds out first (`hold_out`); fewer than two modalities are refused before
        if self.weighting == "learnable":
            # not optimised by the run's optimizer: the hyper-step moves it
            self.alpha = self.register_module(run, "alpha", LFMWeights(self.initial_align_weight), optimize=False)

    # ---- weights ----
    def weights(self, epoch: int) -> tuple[float, float]:
        """(alpha_1 for CE, alpha_2 for the modality gap) at this epoch."""
        if self.weighting == "learnable":
            align = float(self.alpha.align)
            return 1.0 - align, align
        ce = scheduled_ce_weight(epoch, self.schedule_epochs)
        return ce, 1.0 - ce

    def alpha_lr_at(self, epoch: int) -> float:
        return self.alpha_lr * 0.5 ** (epoch // self.alpha_lr_halve_every) if self.alpha_lr_halve_every else self.alpha_lr

    # ---- loss ----
    def terms(self, logits: Tensor, unimodal: dict[str, Tensor], label: Tensor) -> tuple[Tensor, Tensor]:
        fused = logits / len(unimodal) if self.fused_logits == "mean" else logits
        return F.cross_entropy(fused, label), modality_gap(unimodal)

    def loss(self, run, batch, out):
        ce_w, gap_w = self.weights(run.epoch)
        ce, gap = self.terms(out.logits, out.unimodal, batch.label)
        return {
            "loss": self.scale * (ce_w * ce + gap_w * gap),
            "ce": ce.detach(),
            "modality_gap": gap.detach(),
            "alpha/ce": torch.tensor(ce_w),
        }

    # ---- the learnable variant's hyper-step ----
    def on_epoch_start(self, run, epoch):
        if self.weighting == "learnable":
            self.hyper_step(run, epoch)

    def hyper_step(self, run, epoch: int) -> float:
        """The official update: on the fixed held-out batch (train-mode forward), L_tot = a1·CE + a2·D;
        g_tot = dL_tot/dθ (kept differentiable), g_cls = dCE/dθ (a constant vector); HVP = d<g_tot, g_cls>/dθ;
        a = mean of the HVP's entries for the first parameter tensor only (the official, crude estimate);
        alpha_2 <- clip(alpha_2 - eta·a, alpha_min, alpha_max). Returns a."""
        model = run.model
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        batch = self.hyper_batch.to(run.device)
        was_training = model.training
        model.train()
        ce_w, gap_w = self.weights(epoch)
        out = model(batch.inputs)  # full precision: the double backward is tiny
        ce, gap = self.terms(out.logits, out.unimodal, batch.label)
        total = ce_w * ce + gap_w * gap
        g_tot = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
        g_cls = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        dot = sum((gt * gc.detach()).sum() for gt, gc in zip(g_tot, g_cls) if gt is not None and gc is not None)
        (hvp,) = torch.autograd.grad(dot, params[0], allow_unused=True)
        a = 0.0 if hvp is None else float(hvp.float().mean())
        with torch.no_grad():  # the held-out forward leaves no trace in the BatchNorm statistics
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
            new = min(max(float(self.alpha.align) - self.alpha_lr_at(epoch) * a, self.alpha_min), self.alpha_max)
            self.alpha.align.fill_(new)
        model.train(was_training)
        self.last_hypergradient = a
        log.info("lfm epoch %d: hypergradient %.3g, alpha CE %.4f align %.4f", epoch, a, 1 - new, new)
        return a
