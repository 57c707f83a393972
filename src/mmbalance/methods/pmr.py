"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wei, Hu, Wu: "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023)."""

from __future__ import annotations

import logging
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, Probability, Range
from mmbalance.engine.evaluation import collect_features
from mmbalance.methods.base import Method, refuse_empty_window

log = logging.getLogger("mmbalance")


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """sim_ik = -||z_i - P_k||_2: negative Euclidean distance (not squared), temperature 1, (B, C)."""
    # the exact (non-matmul) path: the matmul shortcut loses precision near zero distance
    return -torch.cdist(features.float(), prototypes.to(features.device).float(),
                        compute_mode="donot_use_mm_for_euclid_dist")


def prototype_loss(features: Tensor, prototypes: Tensor, label: Tensor) -> Tensor:
    """Prototypical cross-entropy PCE = CE(-D(z, P), y); the prototypes are constants."""
    return F.cross_entropy(prototype_logits(features, prototypes.detach()), label)


def weaker_modalities(scores: dict[str, float]) -> list[str]:
    """The modalities that get the prototype loss: every one whose prototype score is below the maximum.

    For two modalities this is the official step rule on rho = s_a / s_v: rho > 1 -> visual, rho < 1 ->
    audio, rho = 1 -> neither. For three or more it is the generalisation (every modality below the
    strongest), not official code.
    """
    best = max(scores.values())
    return [m for m, s in scores.items() if s < best]


def class_means(features: Tensor, label: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean feature (C, d) and per-class count (C,); classes without samples have mean 0."""
    features = features.float()
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, label, features)
    counts = torch.bincount(label, minlength=num_classes)
    return sums / counts.clamp(min=1)[:, None].to(sums.dtype), counts


def update_prototypes(old: Tensor | None, means: Tensor, counts: Tensor, momentum: float,
                      use_momentum: bool) -> tuple[Tensor, int]:
    """P <- (1 - momentum) * new + momentum * old (when `use_momentum`), else new, per class present in the
    subset; a class without samples keeps its previous prototype (or, when there is none yet, the mean of
    the present classes' prototypes, so it never becomes NaN). Returns (P, number of missing classes)."""
    present = counts > 0
    if old is not None:
        old = old.to(means.device, means.dtype)
        new = (1 - momentum) * means + momentum * old if use_momentum else means
        fill = old
    else:
        new = means
        fill = means[present].mean(0, keepdim=True).expand_as(means) if present.any() else means
    return torch.where(present[:, None], new, fill), int((~present).sum())


class PMR(Method):
    """PMR (CVPR 2023), following the official code (fanyunfeng-bit/Modal-Imbalance-PMR,
    `main_Prototype_grad.py --modulation Proto`).

    Prototypes: per modality, the class means of eval-mode pooled encoder features (no grad) over a random
    `prototype_fraction` of the training set (a fresh seeded draw each time; the official code takes the
    first 10 % of the shuffled train loader's batches). They are computed once before training (`setup`, from
    the initial model, as the official code) and after every training epoch (`on_epoch_end`); the first
    post-epoch computation replaces the initial ones, later ones are mixed as
    P <- (1 - momentum) P_new + momentum P_old (official convention). A class missing from the subset keeps
    its previous prototype (the official code divides by zero); see `update_prototypes`.

    Each step inside the modulation window: sim_m = -||z_m - P_m||_2 (Euclidean, not squared; `torch.cdist`
    instead of the official double loop), prototype scores s_m = sum_i softmax(sim_m)_i[y_i] (detached,
    reduced with `run.reduce`), and loss = CE(fused, y) + alpha * sum_{m weaker} PCE_m with
    PCE_m = CE(sim_m, y) for the modalities below the strongest (`weaker_modalities`: for two modalities
    exactly the official step switch, for three or more every modality below the strongest, our
    generalisation). Outside the window: the fused CE only. The prototype loss reaches only modality m's
    encoder (the prototypes are constants). No gradient edits.

    Cost: per step B x C distances per modality; per epoch one no-grad eval-mode encoder pass over the
    subset, counted by the trainer on its first batch and scaled by the samples (`FlopMeter.sampled_pass`),
    through one loader kept across epochs (`run.loader`). The pass is skipped when its prototypes could
    never be used (the next epoch is past the window or past the last epoch).

    Args:
        alpha: weight of the prototype loss (official argparse 1.0; scripts 2.0 on CREMA-D/AVE; peer 0.6).
        momentum: prototype momentum (official argparse 0.2; CREMA-D script 0.0; peer 0.5).
        modulation_starts, modulation_ends: 0-based inclusive epoch window (official argparse 0..100;
            CREMA-D script 0..70).
        prototype_fraction: share of the training set the prototypes are computed from (official 10 %).

    Hooks used: `setup` and `on_epoch_end` (prototype passes), `loss`. Works with any fusion and M >= 2.
    Choices: the paper's prototype entropy regulariser (PER) is not in the official code (nor the peer) and
    is not implemented. The peer (BalanceMM) computes prototypes at each epoch start from the *first* 10 %
    of batches with momentum 0.5, and for three modalities drops the prototype loss for OGM-style gradient
    scaling with subtracted noise; we keep the prototype loss for every modality below the strongest.
    """

    family = "optimization"
    regression_refusal = ("it builds one prototype per class and adds a prototype cross-entropy over the "
                          "classes")

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        momentum: Probability = 0.2,
        modulation_starts: NonNegativeInt = 0,
        modulation_ends: NonNegativeInt = 100,
        prototype_fraction: Annotated[float, Range(gt=0, le=1)] = 0.1,
    ):
        refuse_empty_window(modulation_starts, modulation_ends)  # empty: silently the baseline
        self.alpha = alpha
        self.momentum = momentum
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.prototype_fraction = prototype_fraction
        self.prototypes: dict[str, Tensor] | None = None
        self.updates = 0  # prototype computations after a training epoch (0 = only the initial ones)

    def in_window(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch <= self.modulation_ends

    # ---- prototypes ----
    def setup(self, run):
        super().setup(run)
        if self.prototypes is None and self.modulation_ends >= 0:
            self.prototypes = self.compute_prototypes(run, draw=0)[0]

    def on_epoch_end(self, run, epoch):
        last = (run.config or {}).get("trainer", {}).get("epochs")
        if epoch + 1 > self.modulation_ends or (last is not None and epoch + 1 >= last):
            return  # the next epoch would never use them
        means, counts = self.compute_means(run, draw=epoch + 1)
        use_momentum = self.updates > 0  # the first post-epoch prototypes replace the initial model's
        protos, missing = {}, 0
        for m in means:
            old = self.prototypes[m] if self.prototypes is not None else None
            protos[m], missing = update_prototypes(old, means[m], counts, self.momentum, use_momentum)
        if missing:
            log.warning("pmr: %d classes had no sample in the prototype subset after epoch %d; they keep their "
                        "previous prototypes", missing, epoch)
        self.prototypes = protos
        self.updates += 1

    def compute_prototypes(self, run, draw: int) -> tuple[dict[str, Tensor], int]:
        means, counts = self.compute_means(run, draw)
        protos, missing = {}, 0
        for m in means:
            protos[m], missing = update_prototypes(None, means[m], counts, self.momentum, False)
        if missing:
            log.warning("pmr: %d classes had no sample in the initial prototype subset; they start at the mean "
                        "of the other classes' prototypes", missing)
        return protos, missing

    @torch.no_grad()
    def compute_means(self, run, draw: int) -> tuple[dict[str, Tensor], Tensor]:
        """Class means of eval-mode features over a random subset of the training set (seeded by run seed
        and draw, so a resumed run draws the same subsets)."""
        dataset = run.train_loader.dataset
        n = len(dataset)
        k = max(1, int(round(self.prototype_fraction * n)))
        g = torch.Generator().manual_seed(run.seed * 1_000_003 + 7_919 + draw)
        # one kept loader over the training set, pointed at this draw's subset: no new workers every epoch
        indices = torch.randperm(n, generator=g)[:k].tolist()
        feats, y = collect_features(run, run.loader("pmr/prototypes", dataset, train=False, indices=indices))
        means = {}
        for m, z in feats.items():
            means[m], counts = class_means(z, y, run.num_classes)
        return means, counts

    # ---- loss stage ----
    def loss(self, run, batch, out):
        ce = F.cross_entropy(out.logits, batch.label)
        if not self.in_window(run.epoch) or self.prototypes is None:
            return {"loss": ce}
        y = batch.label
        if any(p.device != y.device for p in self.prototypes.values()):  # e.g. restored from a checkpoint
            self.prototypes = {m: p.to(y.device) for m, p in self.prototypes.items()}
        sims = {m: prototype_logits(out.features[m], self.prototypes[m]) for m in run.model.modalities}
        stats = run.reduce({m: torch.softmax(s.detach(), 1).gather(1, y[:, None]).sum() for m, s in sims.items()})
        scores = {m: float(v) for m, v in stats.items()}
        weaker = set(weaker_modalities(scores))
        losses = {"ce": ce.detach()}
        total = ce
        for m, s in sims.items():
            pce = F.cross_entropy(s, y)
            if m in weaker:
                total = total + self.alpha * pce
            losses[f"pmr_pce_{m}"] = pce.detach()
            losses[f"pmr_on_{m}"] = torch.tensor(float(m in weaker), device=ce.device)
        losses["loss"] = total
        return losses

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        protos = None if self.prototypes is None else {m: p.detach().cpu().clone() for m, p in self.prototypes.items()}
        state.update(prototypes=protos, updates=self.updates)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        protos = state["prototypes"]
        self.prototypes = None if protos is None else {m: p.clone() for m, p in protos.items()}
        self.updates = int(state["updates"])
