"""MLA: Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Latham, Yao, CVPR 2024)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import NonNegativeFloat, PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_inactive_options
from mmbalance.models.fusion import fusion_key

log = logging.getLogger("mmbalance")


def owm_update(P: Tensor, r: Tensor, alpha: float) -> Tensor:
    """One recursive orthogonal-projector update: P <- P - (P r)(P r)^T / (alpha + r^T P r).

    r is the (detached) batch-mean feature of the modality just trained; as alpha -> 0, P r -> 0, so
    P projects onto the orthogonal complement of every mean feature seen so far. The denominator is the
    paper's / textbook scalar r^T P r, not the official code's element-wise division by the outer product.
    """
    k = P @ r
    return P - torch.outer(k, k) / (alpha + r @ k)


def project_gradient(grad: Tensor, P: Tensor) -> Tensor:
    """The head weight's gradient (C x d) restricted to the projector's subspace: grad <- grad P^T."""
    return grad @ P.t()


def entropy_weights(logits: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample fusion weights w_{m,i} = softmax_m(-H_{m,i}), H_{m,i} = entropy of softmax over classes
    of o_{m,i} (the paper's exp(max_k H_k - H_m) / sum_j exp(max_k H_k - H_j), which is the same thing)."""
    mods = list(logits)
    ent = torch.stack([-(F.softmax(o.float(), 1) * F.log_softmax(o.float(), 1)).sum(1) for o in logits.values()])
    w = torch.softmax(-ent, dim=0)  # (M, B): over modalities, per sample
    return {m: w[i] for i, m in enumerate(mods)}


def fixed_weights(modalities: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """The fixed test-time weights: given {modality: weight}, or 1/M each (the official 0.5/0.5 for two)."""
    if weights is None:
        return {m: 1.0 / len(modalities) for m in modalities}
    weights = dict(weights)
    if set(weights) != set(modalities):
        raise UserError(f"method.weights has keys {sorted(weights)}; expected one weight per modality "
                        f"{sorted(modalities)}")
    return {m: float(weights[m]) for m in modalities}


class MLA(Method):
    """MLA (Zhang, Latham, Yao: "Multimodal Representation Learning by Alternating Unimodal Adaptation",
    CVPR 2024; official code Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation).

    Training (takes over `training_step`): every encoder is run once, then for each modality in the model's
    order: o_m = head(z_m) through ONE shared linear head, L_m = CE(o_m, y), zero_grad, backward, head-weight
    gradient projection, clip, optimizer step. So a batch makes M optimizer steps, each moving one encoder and
    the shared head (the trainer's FLOP count of the first step of each epoch holds all M steps).

    Gradient projection (`projection="paper"`): one projector P (d x d, starting at I) for the whole run;
    from the second update on, before each step P <- owm_update(P, r, alpha_t) with r the detached batch mean
    of z_m and alpha_t = alpha0 ** (1 + batch_index / batches_per_epoch) (official schedule, alpha0 = 0.1),
    then grad(W_head) <- grad(W_head) P^T; the bias gradient is untouched. `projection="off"` is what the
    official code does at HEAD (its projection matches the parameter name "module.weight", which the bare
    linear head never has, so it never runs).

    Prediction (`eval_fuse`): o_m = head(z_m) (also returned as the per-modality logits);
    `fusion="entropy"` (default, the paper's uncertainty fusion): per-sample weights softmax_m(-H_m), H_m the
    entropy of softmax over classes; `fusion="fixed"`: sum_m w_m o_m with `weights` (default 1/M each, the
    official 0.5/0.5; the official three-modality setting is e.g. weights={audio: 0.35, visual: 0.25,
    text: 0.4}).

    The shared head is method-owned (`register_module`): the model's own fusion head takes the concatenation
    and cannot be shared. The model's head is not trained; after every step it is overwritten with the fixed
    fusion of the shared head (`Fusion.load_shared_head`: f = sum_m w_m head(z_m); concat: W_m = w_m W_head,
    b = (sum_m w_m) b_head; sum: heads[m] = w_m head), so `run.model` alone predicts like `fusion="fixed"`.
    With a head without linear blocks per modality (film, gated) that mirror is impossible and the model's
    head stays at its initialisation (it is never used for prediction).

    Choices: GS on by default (the paper's intent; official HEAD = off) with the scalar textbook denominator
    (official: element-wise) and no Frobenius normalisation of P (official code divides P by its norm, which
    shrinks every later head step by about 1/sqrt(d); not in the paper); P is built from detached features
    (the official code would keep the graph); the projection replaces the gradient (the peer adds grad P^T
    to grad). Entropy per sample over classes (paper, peer; the official code takes softmax over the batch).
    Features are computed once per batch (official); the peer recomputes each before its own step, which is
    the same thing here because step m moves only encoder m and the head.
    All modalities need one feature size d (the paper's 512); otherwise a clear error.

    Hooks used: `setup`, `on_epoch_start`, `training_step`, `eval_fuse`, `state_dict`/`load_state_dict`.
    """

    family = "feed-forward"
    regression_refusal = ("its prediction (fusion=entropy) weighs the modalities by the entropy of their class "
                          "distributions, and its shared head is trained with cross-entropy")

    def __init__(
        self,
        fusion: Literal["entropy", "fixed"] = "entropy",
        weights: dict[str, NonNegativeFloat] | None = None,
        projection: Literal["paper", "off"] = "paper",
        projection_alpha: PositiveFloat = 0.1,
    ):
        refuse_inactive_options(MLA, {"projection_alpha": projection_alpha}, "projection", projection, "paper")
        self.fusion = fusion
        self.weights_arg = dict(weights) if weights is not None else None
        self.projection = projection
        self.projection_alpha = projection_alpha
        self.P: Tensor | None = None
        self.updates = 0  # optimizer steps taken so far (the official global counter)
        self.batch_in_epoch = 0

    # ---- setup ----
    def setup(self, run):
        super().setup(run)
        model = run.model
        dims = {m: model.fusion.dims[m] for m in model.modalities}
        if len(set(dims.values())) != 1:
            raise UserError(f"method=mla shares one head across modalities, so every encoder needs the same "
                            f"out_dim; got {dims}: set the encoders' out_dim alike, e.g. "
                            f"backbone.encoders.<kind>.out_dim={max(dims.values())} for each kind")
        d = next(iter(dims.values()))
        self.weights = fixed_weights(model.modalities, self.weights_arg)
        self.head = self.register_module(run, "shared_head", nn.Linear(d, run.num_classes))
        self.P = torch.eye(d, device=run.device)
        if not model.fusion.has_linear_blocks:
            log.info("mla: the model's %s head is unused (predictions use the shared head)",
                     fusion_key(model.fusion))
        self.mirror_head(run)

    def on_epoch_start(self, run, epoch):
        self.batch_in_epoch = 0

    # ---- training ----
    def training_step(self, run, batch):
        model = run.model
        with run.autocast():
            features = model.encode(batch.inputs)
        params = [p for p in model.parameters()] + list(self.head.parameters())
        losses = {}
        n_batches = max(len(run.train_loader), 1) if run.train_loader is not None else 1
        alpha = self.projection_alpha ** (1 + self.batch_in_epoch / n_batches)
        for m in model.modalities:
            with run.autocast():
                loss = F.cross_entropy(self.head(features[m]), batch.label)
            run.zero_grad()
            loss.backward()
            if self.projection == "paper" and self.updates > 0:
                with torch.no_grad():
                    # the mean feature over every rank's batch (hardware=ddp), so P stays identical everywhere
                    r = run.reduce({"r": features[m].detach().float().mean(0)})["r"] / run.world_size
                    self.P = owm_update(self.P, r, alpha)
                    g = self.head.weight.grad
                    g.copy_(project_gradient(g.float(), self.P).to(g.dtype))
            run.optimizer_step(params=params)  # averaged, clipped and stepped over this update's parameters
            self.updates += 1
            losses[f"ce/{m}"] = loss.detach()
        run.zero_grad()
        self.batch_in_epoch += 1
        self.mirror_head(run)
        losses["loss"] = torch.stack(list(losses.values())).mean()
        return losses

    @torch.no_grad()
    def mirror_head(self, run):
        """Write the fixed fusion of the shared head into the model's own head (see the class docstring)."""
        if run.model.fusion.has_linear_blocks:
            run.model.fusion.load_shared_head(self.head.weight, self.head.bias, self.weights)

    # ---- prediction ----
    def eval_fuse(self, run, features):
        unimodal = {m: self.head(features[m]) for m in run.model.modalities}
        return self.fuse_logits(unimodal), unimodal

    def fuse_logits(self, unimodal: dict[str, Tensor]) -> Tensor:
        if self.fusion == "fixed":
            return sum(self.weights[m] * o for m, o in unimodal.items())
        w = entropy_weights(unimodal)
        return sum(w[m][:, None].to(o.dtype) * o for m, o in unimodal.items())

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state.update(P=None if self.P is None else self.P.detach().cpu().clone(), updates=self.updates,
                     batch_in_epoch=self.batch_in_epoch)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("P") is not None:
            device = self.P.device if self.P is not None else "cpu"
            self.P = state["P"].to(device)
        self.updates = state.get("updates", 0)
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
