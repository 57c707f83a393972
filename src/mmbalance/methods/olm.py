"""OLM: Online Logit Modulation (IJCAI 2024), from the official code (anonymous-gitlab/OLM, `engine_logits_com.py`)."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method
from mmbalance.methods.gblending import split_holdout

log = logging.getLogger("mmbalance")

FUSED = "fused"  # the key of the fused branch among the modulated branches
EPS = 1e-6  # the official clamp floor of the generalisation and convergence rates
DEFAULT_HOLDOUT_FRACTION = 0.2  # official: one fold of a 5-fold split
# the held-out stream's shuffles, far from the training sampler's epochs (0, 1, ...): (epoch, pass) -> sampler epoch
_STREAM_OFFSET = 1 << 20
_PASSES_PER_EPOCH = 1 << 12


def heldout_ratios(train: Tensor, heldout: Tensor, train_ref: Tensor, heldout_ref: Tensor) -> Tensor:
    """r = softmax_k(clamp(G_k, 1e-6) / clamp(Cv_k, 1e-6)) with G_k = L^{e,0}_k - L^e_k (generalisation: how much
    the held-out loss fell since the reference) and Cv_k = L^0_k - L_k - G_k (convergence beyond generalisation).
    All (K,) float tensors; the result sums to 1."""
    g = heldout_ref - heldout
    cv = train_ref - train - g
    return torch.softmax(g.clamp(min=EPS) / cv.clamp(min=EPS), dim=0)


def train_ratios(train: Tensor, train_ref: Tensor) -> Tensor:
    """The held-out-free variant (`engine_logits.py`): rho_k = L_k / L^0_k, normalised to sum 1 (the official
    rho_k / mean_j rho_j, whose targets n-bar * r_k this reproduces with `target="total"`)."""
    rho = train / train_ref
    return rho / rho.sum()


def norm_targets(norms: Tensor, ratios: Tensor, target: str = "total") -> Tensor:
    """Per-sample target norms (B, K): the (detached) per-sample total of the branch norms, `total` = sum_k n_ik
    (the targets keep the total), or `mean` = mean_k n_ik (the official com engine: the targets sum to the mean),
    split in the proportions `ratios` (K,)."""
    norms = norms.detach()
    scale = norms.sum(1) if target == "total" else norms.mean(1)
    return scale[:, None] * ratios[None, :]


def norm_loss(weights: Tensor, logit_norms: Tensor, ratios: Tensor, target: str = "total") -> Tensor:
    """L_norm = sum_{i,k} |w_k ||z_ik|| - target_ik| with n_ik = w_k ||z_ik|| (the logit norms are constants,
    so only the weights get its gradient); `logit_norms` is (B, K)."""
    norms = weights[None, :] * logit_norms.detach()
    return (norms - norm_targets(norms, ratios, target)).abs().sum()


@contextlib.contextmanager
def scratch_buffers(model: nn.Module):
    """Inside, the model's buffers (BatchNorm running statistics) are copies, and the originals come back after:
    a train-mode pass leaves no trace in them. The originals are never written, so the training step's graph,
    which saved them for its backward, stays valid."""
    saved = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                saved.append((module, name, buffer))
                module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer


class OLMWeights(nn.Module):
    """w (K,): one coefficient per branch (the modalities', then the fused one), initialised to 1."""

    def __init__(self, branches: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(branches))


class OLM(Method):
    """OLM (Online Logit Modulation, IJCAI 2024; official code in the anonymous mirror anonymous-gitlab/OLM,
    `engines/engine_logits_com.py` and `engine_logits.py`).

    Branches k: one per modality (its unimodal logits z_m) and the fused head (z). A learnable coefficient w_k
    (init 1, its own Adam, `weight_lr`) scales each branch's logits inside its cross-entropy, and is trained so
    that the branches' logit norms track targets set by each branch's progress. Per step:

    - L_k = CE(w_k z_k, y) on the training batch; "loss" = sum_k L_k (backpropagated by the step as usual: it
      trains the network and gives w its CE gradient).
    - variant "heldout" (default, the com engine): a held-out batch (from a part of the *training* split that is
      never trained on) is forwarded without gradients: L^e_k = CE(w_k z^e_k, y^e). During the first
      `reference_epochs` epochs every step records the reference losses L^0 := L, L^{e,0} := L^e (so they end as
      the last step's of those epochs, as the official `iteration == 0`), then r = `heldout_ratios`.
      Variant "train" (`engine_logits.py`): no held-out data, r = `train_ratios` (rho_k = L_k / L^0_k).
    - n_ik = w_k ||z_ik|| (norms detached), targets `norm_targets`, L_norm = `norm_loss`; its gradient is added to
      w's after the backward, and w's optimiser steps (`on_after_backward`).

    Args:
        variant: "heldout" (official com engine) or "train" (the held-out-free engine).
        holdout_fraction: share of the training split held out (stratified, seeded by the run seed; official: one
            fold of a 5-fold split, 0.2). Removed from training. Variant "heldout" only: with "train" nothing is
            held out, so another value is refused rather than ignored.
        weight_lr: Adam learning rate of w (official 1e-3).
        reference_epochs: epochs whose every step overwrites the reference losses (official: the first epoch,
            1); 0 = the first step's losses.
        target: "total" (default): the targets split the per-sample *total* of the branch norms, so modulation
            redistributes logit norm between branches (the `engine_logits` variant keeps the total too).
            "mean": the com engine's literal targets, which sum to the *mean* norm, i.e. 1/K of the total: no
            positive norms meet them, so they pull every w towards 0 (kept as an option to reproduce the code).
        unimodal_heads: "aux" (default, official): a linear head per modality on its pooled feature, owned by the
            method (optimised by the run's optimiser, saved), so the unimodal losses never touch the fusion
            head; any fusion works. "slice": the fusion head's per-modality logits (concat/sum fusion).

    Hooks used: `hold_out` (the held-out part), `setup` (aux heads, w and its optimiser), `on_epoch_start`
    (restarts the held-out stream, so a resumed run draws the same held-out batches), `loss` (scaled CEs,
    held-out pass, L_norm), `on_after_backward` (w's step). Prediction is the fused head's raw logits z, without
    w: w scales logits only inside the training losses. While w_fused > 0 the argmax is that of w_fused z too, but
    w is unconstrained: once w_k < 0, CE(w_k z_k, y) trains branch k's *lowest* logit towards the label, so the
    raw argmax of that branch (the prediction, for the fused one) turns wrong (`target: mean` pulls every w
    towards 0; `w/<branch>` in the history shows it).
    FLOPs: the held-out forward runs inside the training step, so the trainer counts it with every step; w's
    Adam update is elementwise arithmetic, which counts zero by the project's convention (as every optimiser).

    Choices against the official code: the held-out stream cycles (reshuffled each pass) so every training
    batch is used, where the official `zip` truncates each epoch to the shorter loader (about a quarter of the
    training data with 5 folds); the held-out forward runs in train mode as officially, but without a graph
    and leaving the BatchNorm running statistics as they were (officially they move with held-out data),
    and batches of a single sample are skipped (train-mode BatchNorm cannot normalise them); the held-out
    losses and the training losses that drive r are averaged across processes (hardware=ddp) and w's gradient
    is averaged, so every replica keeps the same w; the held-out fused logits are the run's prediction
    (`eval_fuse`, e.g. MMCosine's in a hybrid); the targets keep the total norm by default (`target`).
    Kept: w unconstrained (no positivity), the clamp floor 1e-6, the sum (not mean) over samples in L_norm.
    """

    family = "objective"
    regression_refusal = ("its coefficients scale each branch's class logits inside a cross-entropy (a softmax "
                          "temperature), which a one-output regression head does not have")

    def __init__(
        self,
        variant: Literal["heldout", "train"] = "heldout",
        holdout_fraction: Fraction = DEFAULT_HOLDOUT_FRACTION,
        weight_lr: PositiveFloat = 1e-3,
        reference_epochs: NonNegativeInt = 1,
        target: Literal["total", "mean"] = "total",
        unimodal_heads: Literal["aux", "slice"] = "aux",
    ):
        if variant == "train" and holdout_fraction != DEFAULT_HOLDOUT_FRACTION:
            raise UserError(f"method.holdout_fraction={holdout_fraction} is used only by method.variant=heldout; "
                            "variant=train holds out no data, so it would be ignored: drop method.holdout_fraction "
                            "or set method.variant=heldout")
        self.variant = variant
        self.holdout_fraction = holdout_fraction
        self.weight_lr = weight_lr
        self.reference_epochs = reference_epochs
        self.target = target
        self.unimodal_heads = unimodal_heads
        self.needs_unimodal_logits = unimodal_heads == "slice"
        self.unimodal_logits_option = ("method.unimodal_heads=slice", "method.unimodal_heads=aux")
        self.branches: list[str] = []
        self.weights: OLMWeights | None = None
        self.heads: nn.ModuleDict | None = None
        self.weight_optimizer: torch.optim.Optimizer | None = None
        self.train_reference: Tensor | None = None
        self.heldout_reference: Tensor | None = None
        self.holdout_loader = None
        self._stream = None  # (epoch, pass, iterator) of the held-out batches
        self._pending: Tensor | None = None  # this step's L_norm, for on_after_backward

    # ---- held-out part and setup ----
    def hold_out(self, run):
        if self.variant != "heldout":
            return
        dataset = run.train_loader.dataset
        kept, held = split_holdout(dataset, self.holdout_fraction, seed=run.seed + 6421)
        if len(held) < 2:
            raise UserError(f"method.holdout_fraction={self.holdout_fraction} holds out {len(held)} sample(s); "
                            "olm needs at least 2 (a held-out batch is normalised in train mode)")
        self.train_indices, self.holdout_indices = kept, held
        run.train_loader = run.make_loader(Subset(dataset, kept.tolist()), train=True)
        self.holdout_loader = run.make_loader(Subset(dataset, held.tolist()), train=True)
        log.info("olm: %d training samples, %d held out for the logit modulation", len(kept), len(held))

    def setup(self, run):
        super().setup(run)  # holds out first (`hold_out`)
        mods = list(run.model.modalities)
        if FUSED in mods:
            raise UserError(f"olm names its fused branch {FUSED!r}, which is also a modality name")
        self.branches = [*mods, FUSED]
        if self.unimodal_heads == "aux":
            dims = run.model.fusion.dims
            self.heads = self.register_module(
                run, "heads", nn.ModuleDict({m: nn.Linear(dims[m], run.num_classes) for m in mods}))
        # w is not in the run's optimiser: it has its own Adam, as officially
        self.weights = self.register_module(run, "weights", OLMWeights(len(self.branches)), optimize=False)
        self.weight_optimizer = torch.optim.Adam(self.weights.parameters(), lr=self.weight_lr)

    # ---- the held-out stream ----
    def on_epoch_start(self, run, epoch):
        self._stream = None  # restart: the epoch's held-out batches depend only on (seed, epoch)

    def next_heldout(self, run):
        """The next held-out batch of this epoch's stream: passes over the held-out part, each reshuffled from
        (seed, epoch, pass); single-sample batches are skipped."""
        epoch = run.epoch
        if self._stream is None or self._stream[0] != epoch:
            self._stream = [epoch, 0, None]
        for _ in range(2):  # the rest of the current pass, then one fresh pass
            if self._stream[2] is None:
                sampler = self.holdout_loader.sampler
                sampler.set_epoch(_STREAM_OFFSET + epoch * _PASSES_PER_EPOCH + self._stream[1])
                self._stream[2] = iter(self.holdout_loader)
            for batch in self._stream[2]:
                if len(batch) >= 2:
                    return batch.to(run.device, non_blocking=True)
            self._stream[1] += 1
            self._stream[2] = None
        raise UserError("olm: a pass over the held-out part gives no batch of two or more samples; raise "
                        "method.holdout_fraction or trainer.batch_size")

    # ---- branches ----
    def branch_logits(self, out_logits: Tensor, features: dict[str, Tensor],
                      unimodal: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """{modality: z_m, ..., "fused": z} in float32."""
        if self.unimodal_heads == "aux":
            logits = {m: self.heads[m](features[m]) for m in self.branches[:-1]}
        else:
            logits = {m: unimodal[m] for m in self.branches[:-1]}
        logits[FUSED] = out_logits
        return {k: v.float() for k, v in logits.items()}

    def branch_losses(self, logits: dict[str, Tensor], label: Tensor) -> Tensor:
        """(K,) L_k = CE(w_k z_k, y)."""
        w = self.weights.w
        return torch.stack([F.cross_entropy(w[i] * logits[k], label) for i, k in enumerate(self.branches)])

    @torch.no_grad()
    def heldout_losses(self, run) -> Tensor:
        """(K,) L^e_k on the next held-out batch: a train-mode forward without a graph, predicting the way the
        run predicts (`eval_fuse`: the fused logits of a hybrid's prediction part too); BatchNorm running
        statistics are left as they were (`scratch_buffers`)."""
        model = run.model
        batch = self.next_heldout(run)
        predictor = getattr(run, "method", None) or self
        with scratch_buffers(model):
            features = model.encode(batch.inputs)
            fused, unimodal = predictor.eval_fuse(run, features)
            logits = self.branch_logits(fused, features, unimodal)
        return self.branch_losses(logits, batch.label)

    def _mean_across_ranks(self, run, values: dict[str, Tensor]) -> dict[str, Tensor]:
        if run.world_size == 1:
            return values
        summed = run.reduce(values)
        return {k: v / run.world_size for k, v in summed.items()}

    # ---- loss ----
    def loss(self, run, batch, out):
        logits = self.branch_logits(out.logits, out.features, out.unimodal if self.needs_unimodal_logits else None)
        train = self.branch_losses(logits, batch.label)
        stats = {"train": train.detach()}
        if self.variant == "heldout":
            stats["heldout"] = self.heldout_losses(run)
        stats = self._mean_across_ranks(run, stats)
        if self.train_reference is None or run.epoch < self.reference_epochs:
            self.train_reference = stats["train"].clone()
            if self.variant == "heldout":
                self.heldout_reference = stats["heldout"].clone()
        if self.variant == "heldout":
            ratios = heldout_ratios(stats["train"], stats["heldout"], self.train_reference, self.heldout_reference)
        else:
            ratios = train_ratios(stats["train"], self.train_reference)
        norms = torch.stack([logits[k].detach().norm(dim=1) for k in self.branches], dim=1)  # (B, K)
        self._pending = norm_loss(self.weights.w, norms, ratios, self.target)
        losses = {"loss": train.sum(), "norm_loss": self._pending.detach()}
        w = self.weights.w.detach()
        for i, k in enumerate(self.branches):
            losses[f"ce/{k}"] = train[i].detach()
            losses[f"w/{k}"] = w[i].clone()
            losses[f"r/{k}"] = ratios[i]
            if self.variant == "heldout":
                losses[f"heldout_ce/{k}"] = stats["heldout"][i]
        return losses

    # ---- w's step ----
    def on_after_backward(self, run, batch, out):
        if self._pending is None:
            return
        w = self.weights.w
        (grad,) = torch.autograd.grad(self._pending, w)
        self._pending = None
        w.grad = grad if w.grad is None else w.grad + grad
        run.sync_gradients([w])
        self.weight_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state["weight_optimizer"] = self.weight_optimizer.state_dict() if self.weight_optimizer is not None else None
        state["train_reference"] = None if self.train_reference is None else self.train_reference.cpu().clone()
        state["heldout_reference"] = None if self.heldout_reference is None else self.heldout_reference.cpu().clone()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("weight_optimizer") is not None and self.weight_optimizer is not None:
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        device = self.weights.w.device if self.weights is not None else "cpu"
        for key in ("train_reference", "heldout_reference"):
            value = state.get(key)
            setattr(self, key, None if value is None else value.to(device))
