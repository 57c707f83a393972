"""AMCo: Adaptive Mask Co-optimization (Zhou, Liang, Zheng, Xuan, Kumada: "Adaptive Mask Co-optimization for
Modal Dependence in Multimodal Learning", ICASSP 2023)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, Probability, Range
from mmbalance.methods.base import Method, refuse_empty_window
from mmbalance.models.multimodal import Output


def mask_ratio(progress: float, ramp_epochs: float, max_ratio: float) -> float:
    """p = max_ratio * sin(pi/2 * min(progress, ramp_epochs) / ramp_epochs), 0 before the ramp starts.

    `progress` is training progress in epochs since the modulation window opened, advanced per step
    (epoch offset + step_in_epoch / steps_per_epoch), so the ratio grows smoothly within epochs.
    `ramp_epochs <= 0` means no ramp (max_ratio at once).
    """
    if progress < 0:
        return 0.0
    if ramp_epochs <= 0:
        return max_ratio
    return max_ratio * math.sin(math.pi / 2 * min(progress, ramp_epochs) / ramp_epochs)


def dependence_threshold(num_modalities: int, margin: float = 0.0) -> float:
    """sigma_M = 1/M + margin: a modality is dependent when it takes more than its equal share of the
    softmax mass over all modalities' logits. M = 2, margin 0 gives the third-party sigma = 0.5."""
    return 1.0 / num_modalities + margin


def softmax_shares(unimodal: dict[str, Tensor]) -> Tensor:
    """(M,) batch sums of each modality's share of the softmax over the concatenated (B, M*C) unimodal logits
    (the third-party implementations' dependence measure); divide by B for the mean share. Detached."""
    logits = torch.cat([o.detach().float() for o in unimodal.values()], dim=1)
    b, mc = logits.shape
    return torch.softmax(logits, dim=1).view(b, len(unimodal), mc // len(unimodal)).sum(dim=2).sum(dim=0)


def dependent_modality(shares: dict[str, float], margin: float = 0.0) -> str | None:
    """The one dependent modality: the largest mean share if it is strictly above `dependence_threshold`,
    else None (for M = 2 at most one modality can exceed 0.5 anyway; at an exact tie nobody is masked)."""
    best = max(shares, key=shares.get)
    return best if shares[best] > dependence_threshold(len(shares), margin) else None


def feature_mask(batch: int, dim: int, ratio: float, generator: torch.Generator | None = None, device=None,
                 rescale: bool = True) -> Tensor:
    """(B, d) mask with exactly floor(ratio * d) zeros per sample at random positions (each sample its own),
    the kept entries scaled by d / (d - k) when `rescale` (inverted-dropout style, so the feature's expected
    magnitude is kept; exact for the floored k, where the third-party code uses 1 / (1 - p))."""
    k = min(int(math.floor(ratio * dim)), dim - 1)  # never the whole representation
    mask = torch.ones(batch, dim, device=device)
    if k <= 0:
        return mask
    keys = torch.rand(batch, dim, generator=generator, device=device)
    mask.scatter_(1, keys.argsort(dim=1)[:, :k], 0.0)
    return mask * (dim / (dim - k)) if rescale else mask


class AMCo(Method):
    """AMCo (Zhou et al., ICASSP 2023). No official code exists; the full paper was not reachable, so this
    follows the abstract — "the adaptive mask makes the dependent modality harder to learn; co-optimization
    keeps its own performance from degrading" — and the two third-party versions where they agree
    (reference notes §10: the pre-peer `new-imbalance_leaderboard` code "A" and the peer BalanceMM "B").

    Each step inside the modulation window:
      1. z_m = encoder_m(x_m) (one forward).
      2. Detect the dependent modality from this batch's *unmasked* unimodal logits o_m (concat/sum head
         blocks, detached): share_m = mean_i of the softmax mass of m's C columns in the softmax over the
         concatenated [o_1..o_M] (A and B); summed with `run.reduce`. Dependent = the largest share if it
         exceeds sigma_M = 1/M + margin (`dependence_threshold`; sigma_2 = 0.5 as A and B, for M = 3 it is 1/3:
         ahead of the equal share). At most one modality is dependent ("the dependent modality").
      3. Mask a fraction p_t (`mask_ratio`) of the dependent modality's pooled feature z_m: each sample its
         own random floor(p_t * d) feature positions (`feature_mask`, drawn from `run.noise_generator`), the
         kept positions rescaled by d / (d - k).
      4. Co-optimization through the shared classifier: the fusion head's own blocks give the fused logits
         f = fuse(z~) and the unimodal logits o_m(z~_m) (the concat head's weight slice + b/M, or the sum
         head's per-modality classifier), so the unimodal terms train the same classifier the fused
         prediction uses. loss = CE(f, y) + co_weight * sum_m CE(o_m, y), the unimodal terms on the masked
         features (as A and B).
    Outside the window: the fused CE only. Prediction (validation/test/Shapley): the unmasked fused head.

    Args:
        max_ratio: the largest masked fraction of the dependent feature (ours: 0.5). A and B ramp to the
            whole representation, after which the dependent modality's unimodal loss is constant and it
            learns nothing, which contradicts "co-optimization preserves its performance".
        ramp_epochs: epochs (since `modulation_starts`) the sine ramp takes to reach `max_ratio`; the ramp
            advances every step. A's cumulative l_t = sum_k k/10 with eps 0.3 reaches the top at epoch 2, so
            the default is 2; B restarts its ramp every epoch (not followed).
        margin: added to 1/M in the dependence threshold.
        co_weight: weight of the unimodal co-optimization losses (A and B: 1).
        rescale: rescale the kept feature entries (A rescales; B does not).
        modulation_starts, modulation_ends: 0-based inclusive epoch window (B: 0..80; A: 10..60).

    Hooks used: `on_epoch_start` (the step count for the ramp), `forward` (detection and mask), `loss`.
    Choices: A projects to a U = 100 embedding before a new shared classifier and masks that; B masks the C
    class logits (and with a (2, C) mask that only works on two GPUs) and adds a Linear(C, C) after the sum.
    Here the pooled encoder feature is masked and the model's own head is the shared classifier, so no
    parameters are added and the model predicts like every other method's. The mask is resampled each step and
    per sample (A: one mask per epoch; B: per batch); detection uses the current batch's unmasked logits, not
    the previous step's masked ones (A and B), so the mask never decides whom it masks next; A's flag
    sticks for the rest of the epoch, B re-tests every step as we do.
    """

    family = "feed-forward"
    regression_refusal = ("it detects the dependent modality from the softmax mass each modality's class logits"
                          " take")
    needs_unimodal_logits = True

    def __init__(
        self,
        max_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.5,
        ramp_epochs: NonNegativeFloat = 2.0,
        margin: Probability = 0.0,
        co_weight: NonNegativeFloat = 1.0,
        rescale: bool = True,
        modulation_starts: NonNegativeInt = 0,
        modulation_ends: NonNegativeInt = 80,
    ):
        refuse_empty_window(modulation_starts, modulation_ends)  # empty: silently the fused CE only (baseline)
        self.max_ratio = max_ratio
        self.ramp_epochs = ramp_epochs
        self.margin = margin
        self.co_weight = co_weight
        self.rescale = rescale
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self._epoch_first_step: int | None = None
        self._steps_per_epoch = 0
        self.last: dict[str, float | str | None] = {}

    def in_window(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch <= self.modulation_ends

    def on_epoch_start(self, run, epoch):
        self._epoch_first_step = run.step
        try:
            self._steps_per_epoch = len(run.train_loader)
        except TypeError:  # a loader without a length: the ramp advances per epoch only
            self._steps_per_epoch = 0

    def progress(self, run) -> float:
        """Epochs since the window opened, with the fraction of this epoch's steps done."""
        within = 0.0
        if self._epoch_first_step is not None and self._steps_per_epoch > 0:
            within = min(1.0, (run.step - self._epoch_first_step) / self._steps_per_epoch)
        return run.epoch - self.modulation_starts + within

    def forward(self, run, batch):
        model = run.model
        z = model.encode(batch.inputs)
        if not self.in_window(run.epoch):
            return Output(model.fuse(z), z, fusion=model.fusion)
        with torch.no_grad():
            sums = softmax_shares(model.unimodal_logits({m: f.detach() for m, f in z.items()}))
            # one vector (share sums, batch size) so replicas reduce it in a single call
            total = run.reduce({"shares": torch.cat([sums, sums.new_tensor([float(len(batch))])])})["shares"]
        shares = {m: float(s) / float(total[-1]) for m, s in zip(model.modalities, total[:-1])}
        dependent = dependent_modality(shares, self.margin)
        ratio = mask_ratio(self.progress(run), self.ramp_epochs, self.max_ratio)
        if dependent is not None and ratio > 0:
            x = z[dependent]
            mask = feature_mask(x.shape[0], x.shape[1], ratio, run.noise_generator(x.device), x.device, self.rescale)
            z = {**z, dependent: x * mask.to(x.dtype)}
        self.last = {"dependent": dependent, "ratio": ratio, **{f"share/{m}": s for m, s in shares.items()}}
        return Output(model.fuse(z), z, fusion=model.fusion)  # unimodal logits from the masked features

    def loss(self, run, batch, out):
        ce = F.cross_entropy(out.logits, batch.label)
        if not self.in_window(run.epoch):
            return {"loss": ce}
        uni = {m: F.cross_entropy(o, batch.label) for m, o in out.unimodal.items()}
        device = ce.device
        stats = {"loss": ce + self.co_weight * sum(uni.values()), "ce/fused": ce,
                 **{f"ce/{m}": v for m, v in uni.items()},
                 "mask_ratio": torch.tensor(float(self.last.get("ratio", 0.0)), device=device)}
        for m in run.model.modalities:  # epoch means: fraction of steps with m masked, mean share
            stats[f"dependent/{m}"] = torch.tensor(float(self.last.get("dependent") == m), device=device)
            stats[f"share/{m}"] = torch.tensor(float(self.last.get(f"share/{m}", 0.0)), device=device)
        return stats

    def state_dict(self):
        state = super().state_dict()
        state["last"] = dict(self.last)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.last = dict(state.get("last", {}))
