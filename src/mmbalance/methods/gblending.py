"""Gradient-Blending (Wang, Tran, Feiszli: "What Makes Training Multi-modal Classification Networks Hard?",
CVPR 2020), with online estimation of the blend weights on a held-out part of the training split."""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from mmbalance.constraints import Fraction, PositiveFloat, PositiveInt
from mmbalance.data.batch import stratified_split
from mmbalance.errors import UserError
from mmbalance.methods.base import Method

log = logging.getLogger("mmbalance")

FUSED = "fused"  # the key of the fused head among the blended heads


def blend_weights(
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
    gain_floor: float = 1e-4,
    overfit_floor: float = 1e-3,
) -> dict[str, float]:
    """w_k ∝ ΔG_k / ΔO_k², normalised to sum 1 (the paper's OGR rule).

    `before`/`after` map each head to (L^T, L^V): its per-sample mean training and held-out loss at the two
    checkpoints N and N+n. O = L^V - L^T, ΔO = O_{N+n} - O_N, ΔG = L^V_N - L^V_{N+n}. A head whose held-out
    loss rose (ΔG <= 0) gets the floor ΔG = `gain_floor`, i.e. about zero weight (BB and MultiBench take
    abs() and would reward it); |ΔO| is floored at `overfit_floor` so a flat head cannot divide by zero.
    """
    raw = {}
    for k, (lt0, lv0) in before.items():
        lt1, lv1 = after[k]
        gain = lv0 - lv1
        overfit = (lv1 - lt1) - (lv0 - lt0)
        raw[k] = max(gain, gain_floor) / max(abs(overfit), overfit_floor) ** 2
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def blended_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """L = sum_k w_k CE_k over the fused head and every unimodal head."""
    return sum(weights[k] * losses[k] for k in weights)


def split_holdout(dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of `dataset`: stratified by class when the dataset exposes `labels`
    (MultimodalDataset and its subclasses), else a seeded random fraction."""
    n = len(dataset)
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == n:
        kept, held = stratified_split(np.asarray(torch.as_tensor(labels)), fraction, seed)
    else:
        perm = np.random.default_rng(seed).permutation(n)
        k = max(1, int(round(fraction * n)))
        held, kept = np.sort(perm[:k]), np.sort(perm[k:])
    if len(held) == 0 or len(kept) == 0:
        raise UserError(
            f"method.holdout_fraction={fraction} leaves {len(kept)} training and {len(held)} held-out samples "
            f"out of {n}; both must be non-empty"
        )
    return kept, held


def fresh_optimizer(optimizer: torch.optim.Optimizer, params, lr: float) -> torch.optim.Optimizer:
    """An optimizer of the same type and settings with fresh state (no momentum) at learning rate `lr`."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(params, **{**settings, "lr": lr})


class GBlending(Method):
    """Gradient-Blending (G-Blend), online: L = sum_k w_k CE(z_k, y) over the fused head and one head per
    modality, with w_k re-estimated every `super_epoch` epochs from each head's overfitting-to-generalisation
    ratio (OGR) on a held-out part of the *training* split (never val or test).

    Args:
        super_epoch: n, epochs between weight estimates (BB: 10).
        holdout_fraction: share of the training split held out for L^V (stratified, seeded by the run seed;
            MultiBench: 0.08). It is removed from training: `run.train_loader` is rebuilt on the rest.
        estimator: "trajectory" (default) measures every head's L^T (on the training part) and L^V (held-out),
            per-sample means in eval mode, at each super-epoch boundary of the real run, and sets the weights
            for the next super-epoch from the last two measurements; the first super-epoch uses uniform
            weights 1/(M+1). Costs two no-grad passes per super-epoch. "trial" is the paper's online
            estimator: at each boundary N (from epoch 0), for each head k a copy of the model trains only
            branch k (fused: everything; unimodal m: encoder m and its head) on its own CE for n epochs with
            a fresh optimizer of the run's type at the current learning rate; L^T, L^V are measured at N and
            N+n and the copy is discarded. It costs (M+1)·n extra epochs per super-epoch (about (M+2)× the
            baseline).
        unimodal_heads: "aux" (default) = one extra linear head per modality on its pooled feature, owned by
            the method (`register_module`), as the official VMZ code and the paper (a unimodal branch is
            encoder + its own classifier; the fused head is never trained by unimodal losses; works with
            any fusion). "slice" = the concat/sum head's per-modality block (the peer's choice; unimodal
            losses then also train the fused head).
        gain_floor, overfit_floor: see `blend_weights` (our guards; neither reference code has them).

    Hooks: `hold_out` (carve the held-out part, rebuild the train loader), `setup` (own the aux heads),
    `on_epoch_start` (estimate at boundaries; counted in the FLOPs, each pass and each branch's trial training on
    its first batch scaled by the samples, `FlopMeter.sampled_pass`), `loss` (blended CE), `eval_fuse` (fused
    logits from the fusion head; per-modality accuracy from the aux heads in "aux" mode).

    Choices: the official code (facebookresearch/VMZ) released only the blended loss with static weights, no
    estimator. Against the peer (BalanceMM): we never estimate on the test set; unimodal branches are
    encoder + own head, not the fused head on zero-masked inputs; L^T and L^V are per-sample means at the
    same checkpoints in eval mode (the peer mixes a running train sum with a held-out sum and measures "pre"
    after trial epoch 1); no abs() (a head whose held-out loss rises gets ~0 weight). The weights sum to 1 as
    in the paper, so the fused head's gradient is smaller than the baseline's (the notes say: retune the
    learning rate if needed).
    """

    family = "objective"
    regression_refusal = ("its blend weights come from the cross-entropy of every head on a held-out part "
                          "stratified by class; the overfitting-to-generalisation ratio itself would work on a "
                          "regression loss, but that version is not implemented")

    def __init__(
        self,
        super_epoch: PositiveInt = 10,
        holdout_fraction: Fraction = 0.08,
        estimator: Literal["trajectory", "trial"] = "trajectory",
        unimodal_heads: Literal["aux", "slice"] = "aux",
        gain_floor: PositiveFloat = 1e-4,
        overfit_floor: PositiveFloat = 1e-3,
    ):
        self.super_epoch = super_epoch
        self.holdout_fraction = holdout_fraction
        self.estimator = estimator
        self.unimodal_heads = unimodal_heads
        self.gain_floor = gain_floor
        self.overfit_floor = overfit_floor
        self.needs_unimodal_logits = unimodal_heads == "slice"
        self.unimodal_logits_option = ("method.unimodal_heads=slice", "method.unimodal_heads=aux")
        self.weights: dict[str, float] = {}
        self.last_measure: dict[str, tuple[float, float]] | None = None  # trajectory: (L^T, L^V) at the last boundary
        self.heads: nn.ModuleDict | None = None

    # ---- held-out part, and setup: heads ----
    def hold_out(self, run):
        dataset = run.train_loader.dataset
        kept, held = split_holdout(dataset, self.holdout_fraction, seed=run.seed + 7919)
        self.train_indices, self.holdout_indices = kept, held
        run.train_loader = run.make_loader(Subset(dataset, kept.tolist()), train=True)
        self.holdout_loader = run.make_loader(Subset(dataset, held.tolist()), train=False)
        log.info("gblending: %d training samples, %d held out for the blend weights", len(kept), len(held))

    def setup(self, run):
        super().setup(run)  # holds out first (`hold_out`)
        if FUSED in run.modalities:
            raise UserError(f"gblending names its fused head {FUSED!r}, which is also a modality name")
        if self.unimodal_heads == "aux":
            dims = run.model.fusion.dims
            self.heads = self.register_module(
                run, "heads", nn.ModuleDict({m: nn.Linear(dims[m], run.num_classes) for m in run.modalities})
            )
        heads = [FUSED, *run.modalities]
        if not self.weights:
            self.weights = {k: 1.0 / len(heads) for k in heads}

    # ---- logits of every head ----
    def head_logits(self, model, heads, features: dict[str, Tensor], fused: Tensor | None = None) -> dict[str, Tensor]:
        out = {FUSED: model.fuse(features) if fused is None else fused}
        if self.unimodal_heads == "aux":
            out.update({m: heads[m](features[m]) for m in model.modalities})
        else:
            out.update(model.unimodal_logits(features))
        return out

    def loss(self, run, batch, out):
        logits = self.head_logits(run.model, self.heads, out.features, fused=out.logits)
        ce = {k: F.cross_entropy(z, batch.label) for k, z in logits.items()}
        losses = {"loss": blended_loss(ce, self.weights)}
        losses.update({f"ce/{k}": v.detach() for k, v in ce.items()})
        losses.update({f"weight/{k}": torch.tensor(w) for k, w in self.weights.items()})
        return losses

    def eval_fuse(self, run, features):
        if self.unimodal_heads == "slice":
            return super().eval_fuse(run, features)
        logits = self.head_logits(run.model, self.heads, features)
        fused = logits.pop(FUSED)
        return fused, logits

    # ---- estimation ----
    def on_epoch_start(self, run, epoch):
        if epoch % self.super_epoch != 0:
            return
        if self.estimator == "trajectory":
            now = self.measure(run, run.model, self.heads, list(self.weights))
            if self.last_measure is not None and epoch > 0:
                self.weights = blend_weights(self.last_measure, now, self.gain_floor, self.overfit_floor)
            self.last_measure = now
        else:
            self.weights = self.trial_weights(run)
        log.info("gblending weights at epoch %d: %s", epoch,
                 "  ".join(f"{k} {w:.3f}" for k, w in self.weights.items()))

    @torch.no_grad()
    def measure(self, run, model, heads, which: list[str]) -> dict[str, tuple[float, float]]:
        """{head: (L^T, L^V)}: per-sample mean CE on the training part and on the held-out part, eval mode."""
        train_loss = self._mean_losses(run, model, heads, run.train_loader, which)
        held_loss = self._mean_losses(run, model, heads, self.holdout_loader, which)
        return {k: (train_loss[k], held_loss[k]) for k in which}

    def _mean_losses(self, run, model, heads, loader, which) -> dict[str, float]:
        was_training = model.training
        model.eval()
        if heads is not None:
            heads.eval()
        sums = {k: torch.zeros((), dtype=torch.float64, device=run.device) for k in which}
        count = torch.zeros((), dtype=torch.float64, device=run.device)
        with run.flops.sampled_pass() as sample:  # FLOPs: the first batch, scaled by the samples
            for batch in loader:
                batch = batch.to(run.device, non_blocking=True)
                with sample(len(batch)):
                    with run.autocast():
                        logits = self._branch_logits(model, heads, batch.inputs, which)
                    for k in which:
                        sums[k] += F.cross_entropy(logits[k].float(), batch.label, reduction="sum").double()
                count += len(batch.label)
        model.train(was_training)
        if heads is not None:
            heads.train(was_training)
        totals = run.reduce({**{f"loss/{k}": v for k, v in sums.items()}, "count": count})
        return {k: float(totals[f"loss/{k}"] / totals["count"]) for k in which}

    def _branch_logits(self, model, heads, inputs, which) -> dict[str, Tensor]:
        """Logits of the heads in `which`; a unimodal branch alone runs only its own encoder (aux heads)."""
        if FUSED not in which and self.unimodal_heads == "aux":
            return {m: heads[m](model.encoders[m](inputs[m])) for m in which}
        logits = self.head_logits(model, heads, model.encode(inputs))
        return {k: logits[k] for k in which}

    def trial_weights(self, run) -> dict[str, float]:
        """The paper's online estimate: train each branch alone on a copy for n epochs, measure before/after."""
        before, after = {}, {}
        start = self.measure(run, run.model, self.heads, list(self.weights))
        lr = run.optimizer.param_groups[0]["lr"]
        # the whole training split on every rank (hardware=ddp), so every rank measures the same weights; one
        # loader kept across super-epochs (its order comes from set_epoch below)
        loader = run.loader("gblending/trial", run.train_loader.dataset, train=True, shard=False)
        sampler = loader.sampler
        for k in self.weights:
            model = copy.deepcopy(run.model)
            heads = copy.deepcopy(self.heads)
            if k == FUSED:
                params = list(model.parameters())
            elif self.unimodal_heads == "aux":
                params = list(model.encoders[k].parameters()) + list(heads[k].parameters())
            else:
                params = list(model.encoders[k].parameters()) + list(model.fusion.parameters())
            opt = fresh_optimizer(run.optimizer, params, lr)
            model.train()
            if heads is not None:
                heads.train()
            with run.flops.sampled_pass() as sample:  # every step of this branch costs the same per sample
                for trial_epoch in range(self.super_epoch):
                    sampler.set_epoch(10_000 + run.epoch * self.super_epoch + trial_epoch)  # distinct trial orders
                    for batch in loader:
                        batch = batch.to(run.device, non_blocking=True)
                        with sample(len(batch)):
                            with run.autocast():
                                z = self._branch_logits(model, heads, batch.inputs, [k])[k]
                                loss = F.cross_entropy(z, batch.label)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
            before[k] = start[k]
            after[k] = self.measure(run, model, heads, [k])[k]
            del model, heads, opt
        return blend_weights(before, after, self.gain_floor, self.overfit_floor)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state["weights"] = dict(self.weights)
        state["last_measure"] = None if self.last_measure is None else {k: list(v) for k, v in self.last_measure.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weights = dict(state["weights"])
        last = state.get("last_measure")
        self.last_measure = None if last is None else {k: tuple(v) for k, v in last.items()}
