"""AGM: Adaptive Gradient Modulation (Li, Li, Hu, Yang, Tao: "Boosting Multi-modal Model Performance with
Adaptive Gradient Modulation", ICCV 2023)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_empty_window
from mmbalance.metrics.shapley import coalitions, shapley_values
from mmbalance.models.multimodal import Output, mask_modalities

#: per-sample probabilities below this count as this (the official score's guard against log 0)
MIN_PROB = 1e-8


def agm_ratios(scores: dict[str, float]) -> dict[str, float]:
    """r_m = exp(M/(M-1) * (mean_k s_k - s_m)) for per-modality cross-entropies s_m.

    For two modalities this is the official r_a = exp(s_v - s_a): a modality with a *lower* loss than the
    others gets a ratio above 1. (The peer flips the sign of the exponent, which inverts the method.)
    """
    n = len(scores)
    mean = sum(scores.values()) / n
    return {m: math.exp(n / (n - 1) * (mean - s)) for m, s in scores.items()}


def agm_coefficients(scores: dict[str, float], running: dict[str, float], alpha: float,
                     clamp: float | None) -> dict[str, float]:
    """c_m = exp(alpha * min(rbar_m - r_m, clamp)): rbar from the running scores, r from the current ones.

    A modality currently ahead of its usual standing (r_m > rbar_m) is damped, one behind it is boosted.
    The clamp bounds only the boost (as the official code); `clamp=None` leaves it unbounded.
    """
    r, rbar = agm_ratios(scores), agm_ratios(running)
    out = {}
    for m in scores:
        gap = rbar[m] - r[m]
        out[m] = math.exp(alpha * (gap if clamp is None else min(gap, clamp)))
    return out


def coalition_logits(model, inputs: dict[str, Tensor], full_logits: Tensor,
                     features: dict[str, Tensor] | None = None) -> dict[frozenset, Tensor]:
    """v(S) for every coalition S, as the official code defines them: v(all) = the training-mode fused
    logits, v(empty) = 0, and every other S from the model in *eval* mode on the inputs with the modalities
    outside S absent (the model's masking), gradients kept.

    For late fusion the 2^M - 2 masked passes share their work exactly: in eval mode a present modality's
    feature is its eval-mode encoding of the real input (the same in every coalition), and an absent one's is
    the encoder's output on an all-zero input, one constant row for every sample. So one eval-mode encoding
    of the batch with one all-zero sample appended (eval-mode encoders treat samples independently, so the
    extra row changes no other row; with feature masking the absent row is zero and nothing is appended), in
    the graph, and 2^M - 2 head evaluations give the same values and the same gradients as the 2^M - 2 full
    masked forwards. Intermediate fusion falls back to those full forwards.

    `features` (late fusion only): the training pass's features, used for the present modalities instead
    of the eval-mode encoding (AGM's `coalition_features="train"`, not the official values): no second
    encoding of the batch; only the absent rows are encoded in eval mode.
    """
    mods = list(model.modalities)
    full = frozenset(mods)
    values: dict[frozenset, Tensor] = {frozenset(): torch.zeros_like(full_logits), full: full_logits}
    proper = [s for s in coalitions(mods) if s and s != full]
    if features is not None and not model.late_fusion:
        raise ValueError("coalition_logits: reusing the training features needs a late-fusion model")
    was_training = model.training
    model.eval()
    try:
        if model.late_fusion:
            present, absent = _present_and_absent(model, inputs, features)
            n = full_logits.shape[0]
            for s in proper:
                mixed = {m: present[m] if m in s else absent[m].expand(n, *absent[m].shape[1:]) for m in mods}
                values[s] = model.fuse(mixed)
        else:
            for s in proper:
                values[s] = model(inputs, absent=[m for m in mods if m not in s]).logits
    finally:
        model.train(was_training)
    return values


def _present_and_absent(model, inputs: dict[str, Tensor], features: dict[str, Tensor] | None):
    """(present features (B, d), absent rows (1, d)) per modality, the model in eval mode (see
    `coalition_logits`). Absence is made by the model's own masking (`mask_modalities`)."""
    mods = list(model.modalities)
    if getattr(model, "masking", "input") == "feature":  # absent = a zero feature row
        present = features if features is not None else model.encode(inputs)
        return present, mask_modalities({m: present[m][:1] for m in mods}, mods)
    zeros = mask_modalities({m: inputs[m][:1] for m in mods}, mods)  # one all-zero sample per modality
    if features is not None:
        return features, model.encode(zeros)
    n = inputs[mods[0]].shape[0]
    both = model.encode({m: torch.cat([inputs[m], zeros[m]]) for m in mods})
    return {m: f[:n] for m, f in both.items()}, {m: f[n:] for m, f in both.items()}


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient flowing into x is multiplied by `scale` (the official backward hook)."""
    if x.requires_grad and scale != 1.0:
        x.register_hook(lambda g: g * scale)
    return x


class AGM(Method):
    """AGM (ICCV 2023), following the official code (lihong2303/AGM_ICCV2023, CREMA-D and UR-Funny scripts).

    Each step: T = fused logits of the normal training-mode pass; v(S) for every other non-empty coalition S
    from the model in eval mode (BatchNorm running statistics) with the absent modalities masked and
    gradients kept; v(empty) = 0. Modality m's output is its exact Shapley value
    phi_m = sum_{S not containing m} |S|!(M-|S|-1)!/M! (v(S+m) - v(S)); since v(empty) = 0 they sum to T
    exactly (efficiency), and the loss is CE(sum_m phi_m, y). Its per-modality score is
    s_m = mean_i -log max(softmax(phi_m)_i[y_i], 1e-8) (detached, reduced with `run.reduce`); ratios,
    running ratios and coefficients are `agm_ratios` / `agm_coefficients`; then the running scores are
    updated as the cumulative mean S_m <- S_m (t-1)/t + s_m/t over every step since training started
    (t = 1, 2, ...; S starts at 0, so on the first step rbar = 1). Inside the modulation window the gradient
    flowing into phi_m is multiplied by c_m with a tensor hook on phi_m, the official mechanism (identity
    modules with backward hooks on the Shapley outputs). It is not a per-parameter `.grad` scaling: every
    branch of phi_m (the training pass, the eval-mode passes, the head) carries c_m-weighted gradient, e.g.
    for M = 2 dL/dT = (c_a + c_v)/2 g and dL/dv({a}) = (c_a - c_v)/2 g. After backward, if any entry of a
    fusion-head weight's gradient exceeds `clip_threshold` in magnitude, all gradients are clipped to norm
    `clip_norm` (official: fc_out.weight, 1.0/1.0 on CREMA-D; 5/5 on UR-Funny); this runs every step.

    Cost: the official code runs 2^M full forwards, all in the graph. For late fusion we run the training
    pass, one eval-mode encoding of the batch with an all-zero sample appended (in the graph) and 2^M - 2
    cheap head evaluations: identical values and gradients (see `coalition_logits`), about 2x the baseline's
    forward+backward instead of 2^M x. The second encoding cannot be shared with the training pass: its
    BatchNorm layers use running instead of batch statistics, so from the first BatchNorm on its activations
    differ, and inside the window its gradient is part of the method (dL/dv({a}) = (c_a - c_v)/2 g above).
    `coalition_features="train"` is the fast, non-official variant: see Args. While every scale is 1 (before
    the window, after it unless `stale_scale_after_window`) the hooks are identities, the coalition passes cannot change
    the gradient and run under no_grad for the scores only, and once the window has closed (non-stale) the
    scores are never used again, so the step is the plain training pass (+ the conditional clip). The cost
    changes only at epoch boundaries, so the trainer's first-step-of-epoch FLOP count is exact.

    Args:
        alpha: modulation strength (official argparse 1.0; README AV-MNIST 2.5; the peer 0.1).
        clamp: upper bound on rbar_m - r_m (official CREMA-D 10; UR-Funny/3 modalities 7; AVE, AV-MNIST,
            MOSEI none -> null).
        modulation_starts, modulation_ends: 0-based inclusive epoch window. The official window 0..20 is
            on 1-based epochs (epochs 1..20), i.e. our 0..19.
        stale_scale_after_window: the official code never resets its hooks, so after the window every
            backward keeps the last coefficients. Off by default (after the window the gradient is plain);
            true reproduces it.
        clip_threshold, clip_norm: the conditional clip above; clip_threshold=null disables it.
        coalition_features: "eval" (default, official): the present modalities' features in v(S) come from
            an eval-mode encoding of the batch, with gradients. "train" (fast, late fusion only): they are
            the training pass's own features (train-mode BatchNorm), so the only extra encoder work is the
            one-sample eval-mode encoding of the zero inputs; the step costs about 1.1-1.3x the baseline's
            against the official 2x (CREMA-D shapes, ResNet-18: benchmarks/agm_step.py). The Shapley
            outputs still sum to T exactly and the c_m-weighted gradients flow the same way, but v(S), the
            scores and therefore the coefficients differ from the official ones by train- vs eval-mode
            BatchNorm (not at all without BatchNorm or dropout); on the digits demo the per-step scores
            differed by a median 3% (audio) and 6% (image), ranked the modalities alike in 96.5% of steps,
            and test accuracy was 0.933 vs 0.947 (seed 0) and 0.942 vs 0.953 (seed 1), official vs fast.

    Hooks used: `forward` (coalition passes, Shapley outputs, scores, coefficients, gradient hooks), `loss`
    (fused CE plus logged coefficients), `on_after_backward` (conditional clip). Works with any fusion (it
    needs no per-modality head logits) and any M >= 2.
    Choices: the peer (BalanceMM) flips the sign of the ratio exponent (inverting the method), leaves out the
    empty-coalition term, runs the coalition passes without gradients and scales the encoders' non-1-D
    parameter gradients instead of the Shapley branches; none of that is followed. The empty coalition is
    worth 0 (official), not the output of all-zero inputs. Stale scales: see above.
    """

    family = "optimization"
    regression_refusal = ("its per-modality scores are the softmax probability of the true class of each "
                          "modality's Shapley logits, -log p_m[y], and its loss is the cross-entropy of their "
                          "sum")

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        clamp: NonNegativeFloat | None = 10.0,
        modulation_starts: NonNegativeInt = 0,
        modulation_ends: NonNegativeInt = 19,
        stale_scale_after_window: bool = False,
        clip_threshold: NonNegativeFloat | None = 1.0,
        clip_norm: PositiveFloat = 1.0,
        coalition_features: Literal["eval", "train"] = "eval",
    ):
        # an empty window would silently never modulate (and with the stale scales, keep the initial ones)
        refuse_empty_window(modulation_starts, modulation_ends)
        self.alpha = alpha
        self.clamp = clamp
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.stale_scale_after_window = stale_scale_after_window
        self.clip_threshold = clip_threshold
        self.clip_norm = clip_norm
        self.coalition_features = coalition_features
        self.running_scores: dict[str, float] = {}
        self.iteration = 0  # steps whose scores entered the running mean
        self.scales: dict[str, float] = {}  # the hooks' current scales (persist, for the stale option)
        self.last_scores: dict[str, float] = {}
        self.last_coefficients: dict[str, float] = {}

    def setup(self, run):
        super().setup(run)
        mods = run.model.modalities
        if self.coalition_features == "train" and not run.model.late_fusion:
            raise UserError("method agm: coalition_features=train reuses the training pass's per-modality features, "
                            "which needs a late-fusion model; use coalition_features=eval (the official passes)")
        self.running_scores = self.running_scores or {m: 0.0 for m in mods}
        self.scales = self.scales or {m: 1.0 for m in mods}

    def in_window(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch <= self.modulation_ends

    def _phase(self, epoch: int) -> tuple[bool, bool]:
        """(compute the Shapley scores this step, apply non-unit scales this step)."""
        after = epoch > self.modulation_ends
        if after and not self.stale_scale_after_window:
            return False, False
        return True, self.in_window(epoch) or after

    # ---- forward stage ----
    def forward(self, run, batch):
        model = run.model
        scored, modulated = self._phase(run.epoch)
        out = model(batch.inputs)
        if not scored:
            self.last_coefficients = {}
            return out
        with torch.set_grad_enabled(modulated and torch.is_grad_enabled()):
            reuse = out.features if self.coalition_features == "train" else None
            values = coalition_logits(model, batch.inputs, out.logits, features=reuse)
            phi = shapley_values(values, model.modalities)
        scores = self._scores(run, phi, batch.label)
        if self.in_window(run.epoch):
            self.scales = agm_coefficients(scores, self.running_scores, self.alpha, self.clamp)
        self.iteration += 1
        t = self.iteration
        self.running_scores = {m: self.running_scores[m] * (t - 1) / t + scores[m] / t for m in scores}
        self.last_scores = scores
        scales = self.scales if modulated else {m: 1.0 for m in phi}
        self.last_coefficients = dict(scales)
        if not modulated:  # unit scales: the plain logits carry exactly the gradient of the Shapley sum
            return Output(out.logits, out.features, unimodal={m: p.detach() for m, p in phi.items()})
        logits = sum(_scale_gradient(phi[m], scales[m]) for m in model.modalities)
        return Output(logits, out.features, unimodal={m: p.detach() for m, p in phi.items()})

    @staticmethod
    def _scores(run, phi: dict[str, Tensor], label: Tensor) -> dict[str, float]:
        """s_m = batch mean of -log max(p_m[y], 1e-8) from the Shapley outputs (detached, reduced)."""
        stats = {}
        for m, p in phi.items():
            nll = -torch.log_softmax(p.detach().float(), dim=1).gather(1, label[:, None])
            stats[m] = nll.clamp(max=-math.log(MIN_PROB)).sum()
        stats["_n"] = torch.tensor(float(label.shape[0]), device=label.device)
        stats = run.reduce(stats)
        n = float(stats.pop("_n"))
        return {m: float(v) / n for m, v in stats.items()}

    # ---- loss stage ----
    def loss(self, run, batch, out):
        losses = {"loss": F.cross_entropy(out.logits, batch.label)}
        dev = out.logits.device
        if self.last_coefficients:  # logged (epoch means in history.csv) while the scores are computed
            for m, c in self.last_coefficients.items():
                losses[f"agm_coef_{m}"] = torch.tensor(c, device=dev)
                losses[f"agm_score_{m}"] = torch.tensor(self.last_scores[m], device=dev)
        return losses

    # ---- gradient stage ----
    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        if self.clip_threshold is None:
            return
        head = [p.grad for p in run.model.head_parameters() if p.grad is not None and p.dim() > 1]
        if head and max(float(g.abs().max()) for g in head) > self.clip_threshold:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), self.clip_norm)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state.update(running_scores=dict(self.running_scores), iteration=self.iteration, scales=dict(self.scales))
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.running_scores = dict(state["running_scores"])
        self.iteration = int(state["iteration"])
        self.scales = dict(state["scales"])
