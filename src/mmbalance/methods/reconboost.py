"""ReconBoost (Hua, Xu, Bao, Yang, Huang: "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, Range
from mmbalance.errors import UserError
from mmbalance.methods.base import Method
from mmbalance.models.fusion import Fusion, fusion_choices, fusion_key

log = logging.getLogger("mmbalance")

BOOST, RECTIFY = "boost", "rectify"


@dataclass(frozen=True)
class Phase:
    stage: int       # 0, 1, 2, ...
    kind: str        # "boost" (one learner, reconcilement loss) | "rectify" (all learners + beta, fused CE)
    modality: str    # the stage's modality (boosted in its "boost" phase)

    @property
    def key(self) -> tuple[int, str]:
        return (self.stage, self.kind)


def phase_at(epoch: int, modalities: list[str], boost_epochs: int, correct_epochs: int) -> Phase:
    """Which phase a (0-based) trainer epoch belongs to. One trainer epoch = one official epoch.

    Stage s spans `boost_epochs + correct_epochs` epochs: first `boost_epochs` epochs boosting modality
    modalities[s % M] (cyclic, as the official schedule: audio, visual, audio, ... / text, visual, audio, ...),
    then `correct_epochs` epochs of global rectification.
    """
    cycle = boost_epochs + correct_epochs
    stage, r = divmod(epoch, cycle)
    return Phase(stage, BOOST if r < boost_epochs else RECTIFY, modalities[stage % len(modalities)])


def reconcilement_weights(others: Tensor | None, beta: Tensor | float, label: Tensor,
                          w1: float, w2: float, num_classes: int) -> Tensor:
    """Per-sample weights (w1 - w2 q_i[y_i]) / C on -log p_i[y_i], with q = softmax(beta * sum_{k != m} f_k).

    `others` is the sum of the other learners' logits (None when there are none: q_y = 1, the value the
    official code's scalar ensemble gives). The 1/C comes from the official `.mean(-1)` over the one-hot
    product. Detached: the other learners get no gradient.
    """
    if others is None:
        q_y = torch.ones(label.shape, device=label.device)
    else:
        q_y = torch.softmax(beta * others.detach().float(), dim=1).gather(1, label[:, None]).squeeze(1)
    return ((w1 - w2 * q_y) / num_classes).detach()


def reconcilement_loss(logits: Tensor, weights: Tensor, label: Tensor) -> Tensor:
    """mean_i weights_i * (-log softmax(f_m)_i[y_i])."""
    log_p_y = torch.log_softmax(logits.float(), dim=1).gather(1, label[:, None]).squeeze(1)
    return -(weights * log_p_y).mean()


def learner_head(fusion: Fusion, modality: str) -> list[tuple[nn.Parameter, Tensor | None]]:
    """The head parameters of one modality's learner, each with a mask of the entries it owns (None = all):
    the fusion's `block_parameters` (concat: the weight columns of its slice and the shared bias, since its
    learner logits carry b/M; sum: its own linear head).
    """
    if not fusion.has_linear_blocks:
        raise UserError(f"method reconboost needs backbone.fusion={fusion_choices('has_linear_blocks')}, "
                        f"not backbone.fusion={fusion_key(fusion)}")
    return fusion.block_parameters(modality)


class EnsembleScale(nn.Module):
    """beta, the learnable scale of the ensemble F = beta * sum_m f_m."""

    def __init__(self, init: float):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(init)))


class ReconBoost(Method):
    """ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024), as the official code (huacong/ReconBoost, `train.py`)
    does it, on top of the run's model.

    Learner of modality m: f_m = its encoder + its per-modality logits from the fusion head (concat: the
    weight slice + b/M; sum: its own head). The ensemble is F = beta * sum_m f_m (for concat: beta times the
    fused logits), with beta learnable (init `boost_rate`). Training alternates stages; stage s picks
    m = modalities[s % M] and runs
      1. boost (`boost_epochs` epochs): a fresh SGD over learner m only; per batch
         q = softmax(beta * sum_{k != m} f_k) (no grad, other learners forwarded in train mode as the
         official code), loss = mean_i (w1 - w2 q_i[y_i]) / C * (-log softmax(f_m)_i[y_i]);
      2. rectify (`correct_epochs` epochs): a fresh SGD over every learner and beta; loss = CE(F, y).
    One trainer epoch is one official epoch (see `phase_at`), so `trainer.epochs` bounds the run; a run of
    E epochs does E / (boost_epochs + correct_epochs) stages. Prediction (`eval_fuse`, validation, test,
    Shapley) is F = beta * sum_m f_m; per-modality accuracy uses f_m.

    Args:
        boost_rate: initial beta (official 1.0; the peer uses 0.01).
        boost_epochs: epochs of phase 1 per stage (official `epochs_per_stage` 4).
        correct_epochs: epochs of phase 2 per stage (official `correct_epoch` 4). 0 disables rectification.
        m_lr, e_lr: learning rates of the phase-1 / phase-2 optimisers (official 0.01 each); both are
            multiplied by the run scheduler's current factor (lr / initial lr of `run.optimizer`), so the
            optimizer preset's StepLR decays them.
        momentum, weight_decay: of the phase optimisers (official SGD 0.9, 5e-4). Weight decay is applied only
            to the entries a learner owns (the concat head's other slices stay as they are).
        weight1, weight2: w1, w2 of the reconcilement weights (official CREMA-D 5, 1; AVE w1 = 4; MSA 1, 0.25).
        ga_alpha, ga_gradient: the official "GA" (memory consolidation) term alpha * MSE(softmax(f_m),
            softmax(f_prev)) for stages > 0, f_prev the previous stage's learner. The official code detaches
            both inputs, so the term has no gradient and changes nothing: `ga_gradient=false` (default) is that
            behaviour and skips computing it; `true` lets its gradient reach f_m (a change to the official
            results; the paper's exact form was not checked).

    Hooks used: `setup` (beta as a method-owned module, not in `run.optimizer`), `training_step` (taken over:
    the phase's own optimiser), `eval_fuse`. `run.optimizer` is never stepped: its only use is the
    scheduler's learning-rate factor, so the trainer's scheduler/checkpoint logic works unchanged (`setup`
    makes one no-op step on it, with no gradients, so torch does not warn that the scheduler stepped first).
    The phase optimiser's state, the phase and beta are saved with the method state, so a resume mid-phase
    continues with the same momentum buffers; a new phase always starts a fresh optimiser (momentum reset),
    as the official code.
    Choices: all learners are in the ensemble from stage 0 — the official `--use_pretrain` path that the
    README's commands use, here starting from the model's own initialisation (no unimodal pretraining step);
    the official non-pretrained path's stage-0 quirk (a random scalar as ensemble, i.e. q_y = 1, and stage 0
    rectifying the first learner only) is not reproduced. The official shared MLP head ("common space") needs
    equal feature sizes; we use the fusion head's per-modality blocks instead (the peer's slicing rule), whose
    shared part is the bias. The peer's (BalanceMM) one global AdamW, T_epochs = 1 alternation inside every
    epoch and beta = 0.01 are not followed. FLOPs: every step of an epoch is the same phase, so the measured
    first step scaled by the epoch's samples is exact.
    """

    family = "optimization"
    regression_refusal = "its boosting weights use the ensemble's softmax probability of the true class"
    needs_unimodal_logits = True

    def __init__(
        self,
        boost_rate: PositiveFloat = 1.0,
        boost_epochs: NonNegativeInt = 4,
        correct_epochs: NonNegativeInt = 4,
        m_lr: PositiveFloat = 0.01,
        e_lr: PositiveFloat = 0.01,
        momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9,
        weight_decay: NonNegativeFloat = 5e-4,
        weight1: NonNegativeFloat = 5.0,
        weight2: NonNegativeFloat = 1.0,
        ga_alpha: NonNegativeFloat = 0.5,
        ga_gradient: bool = False,
    ):
        if boost_epochs < 0 or correct_epochs < 0 or boost_epochs + correct_epochs < 1:
            raise UserError(f"method.boost_epochs={boost_epochs}, method.correct_epochs={correct_epochs}; "
                            "expected non-negative epochs with a positive sum")
        self.boost_rate = boost_rate
        self.boost_epochs = boost_epochs
        self.correct_epochs = correct_epochs
        self.m_lr, self.e_lr = m_lr, e_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.weight1, self.weight2 = weight1, weight2
        self.ga_alpha, self.ga_gradient = ga_alpha, ga_gradient
        self.scale: EnsembleScale | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._decay: list[tuple[nn.Parameter, Tensor | None]] = []
        self._phase_key: tuple[int, str] | None = None
        self._pending: tuple[tuple[int, str], dict] | None = None

    def setup(self, run):
        super().setup(run)
        for m in run.model.modalities:
            learner_head(run.model.fusion, m)  # refuse a fusion without per-modality blocks now
        self.scale = self.register_module(run, "ensemble_scale", EnsembleScale(self.boost_rate), optimize=False)
        group = run.optimizer.param_groups[0]
        if type(run.optimizer) is not torch.optim.SGD or group.get("lr") not in (self.m_lr, self.e_lr) \
                or group.get("momentum", 0) != self.momentum or group.get("weight_decay", 0) != self.weight_decay:
            # a run config that names another optimizer records settings this method never uses: say so
            log.warning("reconboost trains with its own SGD per phase (method.m_lr=%g, method.e_lr=%g, "
                        "method.momentum=%g, method.weight_decay=%g), as the official code: the optimizer group's "
                        "%s (lr %g) is not used, only the scheduler's factor on those rates", self.m_lr, self.e_lr,
                        self.momentum, self.weight_decay, type(run.optimizer).__name__, group.get("lr", float("nan")))
        # run.optimizer is never stepped; one step with no gradients is a no-op that tells the run's
        # scheduler (which still scales the phase learning rates) the optimizer has stepped, so torch does
        # not warn about the order
        run.optimizer.zero_grad(set_to_none=True)
        run.optimizer.step()

    @property
    def beta(self) -> nn.Parameter:
        return self.scale.beta

    def phase(self, epoch: int, modalities: list[str]) -> Phase:
        return phase_at(epoch, modalities, self.boost_epochs, self.correct_epochs)

    # ---- the phase optimisers ----
    def _learners(self, run, modalities: list[str]) -> list[tuple[nn.Parameter, Tensor | None]]:
        params = run.model.modality_parameters()
        out = [(p, None) for m in modalities for p in params[m]]
        seen = {id(p) for p, _ in out}
        for m in modalities:
            for p, mask in learner_head(run.model.fusion, m):
                if id(p) in seen:  # concat: the weight is shared, merge the masks
                    i = next(i for i, (q, _) in enumerate(out) if q is p)
                    old = out[i][1]
                    out[i] = (p, None if old is None or mask is None else torch.maximum(old, mask))
                else:
                    seen.add(id(p))
                    out.append((p, mask))
        return out

    def optimizer_for(self, run, phase: Phase) -> torch.optim.Optimizer:
        """The phase's own SGD, created fresh when a phase starts (or restored when resuming mid-phase)."""
        if self._phase_key != phase.key or self._optimizer is None:
            if phase.kind == BOOST:
                self._decay = self._learners(run, [phase.modality])
                params, lr = [p for p, _ in self._decay], self.m_lr
            else:
                self._decay = self._learners(run, run.model.modalities) + [(self.beta, None)]
                params, lr = [p for p, _ in self._decay], self.e_lr
            self._optimizer = torch.optim.SGD(params, lr=lr, momentum=self.momentum)
            for group in self._optimizer.param_groups:
                group["base_lr"] = lr
            self._phase_key = phase.key
            if self._pending is not None and tuple(self._pending[0]) == phase.key:
                self._optimizer.load_state_dict(self._pending[1])
            self._pending = None
        factor = lr_factor(run.optimizer)
        for group in self._optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self._optimizer

    @torch.no_grad()
    def _apply_weight_decay(self) -> None:
        """SGD's coupled weight decay (grad += wd * theta), restricted to the entries the learners own."""
        if not self.weight_decay:
            return
        for p, mask in self._decay:
            if p.grad is None:
                continue
            p.grad.add_(p if mask is None else p * mask, alpha=self.weight_decay)

    # ---- the step ----
    def learner_logits(self, run, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """f_m for the modalities in `features` (the others are zero-filled for the head and dropped)."""
        model = run.model
        ref = next(iter(features.values()))
        full = {m: features.get(m, ref.new_zeros(len(ref), model.fusion.dims[m])) for m in model.modalities}
        logits = model.unimodal_logits(full)
        return {m: logits[m] for m in features}

    def training_step(self, run, batch):
        phase = self.phase(run.epoch, run.model.modalities)
        optimizer = self.optimizer_for(run, phase)
        with run.autocast():
            losses = self.boost_loss(run, batch, phase) if phase.kind == BOOST else self.rectify_loss(run, batch)
        run.zero_grad(optimizer)
        run.model.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self._apply_weight_decay()
        run.optimizer_step(optimizer)  # the phase's optimizer: averaged over its parameters, the model clipped
        stats = {k: v.detach() for k, v in losses.items()}
        stats["beta"] = self.beta.detach().clone()
        return stats

    def boost_loss(self, run, batch, phase: Phase) -> dict[str, Tensor]:
        model, m = run.model, phase.modality
        others = [k for k in model.modalities if k != m]
        with torch.no_grad():  # the other learners, in train mode as the official code
            z_others = {k: model.encoders[k](batch.inputs[k]) for k in others}
            f_others = self.learner_logits(run, z_others)
            others_sum = sum(f_others.values())
        f_m = self.learner_logits(run, {m: model.encoders[m](batch.inputs[m])})[m]
        weights = reconcilement_weights(others_sum, self.beta.detach(), batch.label, self.weight1, self.weight2,
                                        run.num_classes)
        boost = reconcilement_loss(f_m, weights, batch.label)
        out = {"loss": boost, "boost_loss": boost.detach(), "boost_weight": weights.mean()}
        if self.ga_gradient and self.ga_alpha and phase.stage > 0:
            f_prev = f_others[model.modalities[(phase.stage - 1) % len(model.modalities)]]
            ga = F.mse_loss(torch.softmax(f_m.float(), 1), torch.softmax(f_prev.float(), 1).detach())
            out["ga_loss"] = ga.detach()
            out["loss"] = boost + self.ga_alpha * ga
        return out

    def rectify_loss(self, run, batch) -> dict[str, Tensor]:
        logits = self.ensemble(self.learner_logits(run, run.model.encode(batch.inputs)))
        loss = F.cross_entropy(logits, batch.label)
        return {"loss": loss, "rectify_loss": loss.detach()}

    # ---- prediction ----
    def ensemble(self, learner_logits: dict[str, Tensor]) -> Tensor:
        """F = beta * sum_m f_m."""
        return self.beta * sum(learner_logits.values())

    def eval_fuse(self, run, features):
        unimodal = run.model.unimodal_logits(features)
        return self.ensemble(unimodal), unimodal

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        if self._optimizer is not None:
            state["phase"] = list(self._phase_key)
            state["phase_optimizer"] = self._optimizer.state_dict()
        elif self._pending is not None:
            state["phase"] = list(self._pending[0])
            state["phase_optimizer"] = self._pending[1]
        else:
            state["phase"], state["phase_optimizer"] = None, None
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._optimizer, self._phase_key = None, None
        if state.get("phase") is not None:
            self._pending = (tuple(state["phase"]), state["phase_optimizer"])
        else:
            self._pending = None


def lr_factor(optimizer: torch.optim.Optimizer) -> float:
    """The run scheduler's current multiplier: lr / initial lr of the run optimizer's first group (1 without one)."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0
