"""MLGM: Multi-Loss Gradient Modulation (Kontras et al.: "Improving Multimodal Learning with Multi-Loss Gradient
Modulation", BMVC 2024; official code kkontras/MLB, `Bias_Infusion_MLB` and `Bias_Infusion_MLB_3d`)."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, Range
from mmbalance.methods.base import Method, refuse_empty_window
from mmbalance.models.fusion import fusion_key

log = logging.getLogger("mmbalance")


def mlgm_ratios(scores: dict[str, float]) -> dict[str, float]:
    """r_m = mean_{j != m} s_j / s_m: the others' mean confidence over this modality's (other/own).

    For two modalities r_0 = s_1 / s_0 and r_1 = s_0 / s_1 (official `Bias_Infusion_MLB`); for three the official
    `Bias_Infusion_MLB_3d` uses the mean of the other two, which is this formula for any M. Zero scores: a
    modality at 0 while the others are above 0 gets r = inf (the largest boost); when the others' mean is 0 too
    (0/0) r = 1 (no change). A single modality gets r = 1.
    """
    mods = list(scores)
    out = {}
    for m in mods:
        if len(mods) < 2:
            out[m] = 1.0
            continue
        others = sum(scores[j] for j in mods if j != m) / (len(mods) - 1)
        own = scores[m]
        if own > 0:
            out[m] = others / own
        else:
            out[m] = math.inf if others > 0 else 1.0
    return out


def mlgm_coefficients(scores: dict[str, float], alpha: float, max_boost: float = 2.0) -> dict[str, float]:
    """k_m = 1 + tanh(alpha (r_m - 1)) for r_m <= 1 (slow down, down to 0), and
    k_m = 1 + (max_boost - 1) tanh(alpha (r_m - 1)) for r_m > 1 (speed up, up to max_boost), r from `mlgm_ratios`.

    max_boost = 2 (default) is the official symmetric form 1 + tanh(alpha (r - 1)) on both sides; another value is
    the official `tanh_mode: 2` with `tanh_mode_beta` = max_boost. At r = 1 (a tie) k = 1, so the modulation
    fades out by itself as the modalities' confidences converge.
    """
    coeffs = {}
    for m, r in mlgm_ratios(scores).items():
        t = math.tanh(alpha * (r - 1.0)) if alpha > 0 and r != 1.0 else 0.0
        coeffs[m] = 1.0 + (max_boost - 1.0) * t if r > 1.0 else 1.0 + t
    return coeffs


def aux_head_logits(heads: nn.ModuleDict, features: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each auxiliary head on its modality's pooled feature, in float32 whatever autocast is active (the scores that
    drive the coefficients come from these; gradients reach bf16 features through the cast)."""
    device_type = next(iter(features.values())).device.type
    off = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
           else contextlib.nullcontext())
    with off:
        return {m: heads[m](features[m].float()) for m in heads}


class MLGM(Method):
    """MLGM (BMVC 2024; code name MLB), as the official code (kkontras/MLB) does it, for any M >= 2.

    Loss: L = w_f CE(z, y) + w_u sum_m CE(z_m, y), z the fused logits, z_m each modality's own logits.
    Each step, inside the modulation window: s_m = mean_i softmax(z_m)_i[y_i] (detached, float32, summed with
    the batch size across processes, so every replica derives the same coefficients), the coefficients
    k_m = `mlgm_coefficients` (two-sided: < 1 slows a modality ahead of the others, > 1 speeds one behind them, up to
    `max_boost`; k -> 1 as the confidences converge), and after backward, before clipping and the step, every
    gradient of modality m's branch is multiplied by k_m: all of encoder m's parameters, its auxiliary head
    (`unimodal_heads=aux`), and its weight block of the fused head (`weight_block`: the concat head's column slice
    or the sum head's own weight; the bias is never scaled, as the official code scales `fc_m_lin.weight` only).

    Args:
        alpha: the tanh slope (official CREMA-D config 0.8).
        max_boost: the ceiling of k for a lagging modality (2 = the official default form; other values = the
            official `tanh_mode: 2` with `tanh_mode_beta`).
        fused_weight, unimodal_weight: the loss weights (official 1 and 1).
        unimodal_heads: where z_m comes from. "aux" (default, official and the notes' requirement that s_m come
            from trained per-modality classifiers): one linear head per modality on its pooled feature, owned by
            the method (optimised, saved with the method's state); the fused head is never trained by the unimodal
            losses, and any fusion works. "slice": the concat/sum head's per-modality block (weight slice + b/M);
            no extra head, but the unimodal losses then also train the fused head.
        scale_fusion_block: also scale modality m's weight block of the fused head (official: yes). With a fusion
            that has no linear blocks (film, gated) there is no block to scale: only the encoders and the aux heads
            are scaled, and setup says so in the log.
        modulation_starts, modulation_ends: 0-based inclusive epoch window (official `starting_epoch` 0,
            `ending_epoch` 1500: always); null = no end. Outside it the loss is the same multi-loss, unmodulated.
            An empty window (starts > ends) is refused; one that opens after the last epoch is warned about.

    Hooks used: `setup` (aux heads, the parameter map), `loss` (multi-loss, scores, coefficients),
    `on_after_backward` (the scaling). It keeps the base `eval_fuse`, so it composes with a method that owns it.
    Cost: the aux heads' forward and backward (one small linear layer per modality), counted in the training
    FLOPs by the trainer's step measurement; no extra pass.
    Evaluation: predictions come from the fused head, and per-modality accuracies from its blocks where the fusion
    has them, as for every other method (the official code reports its aux heads' accuracies instead).
    Choices: the official code computes scores with a per-sample Python loop; here one gather. Under bf16 autocast
    the aux heads run in float32. The official 2-modality architecture's fused head is a sum of two linear layers
    with the bias on the first one only; the concat head here is the same function with one shared bias, which
    (like the official bias) is not scaled. The JS-divergence and Shapley score variants of the repository
    (`tanh_mode: 2_jsd`, `MLB_Shap`) are not part of the BMVC method and not implemented.
    """

    family = "optimization"
    regression_refusal = ("its modulation coefficients come from each modality's softmax probability of the true "
                          "class (the official code's separate MSE-ratio variant is not implemented)")

    def __init__(
        self,
        alpha: NonNegativeFloat = 0.8,
        max_boost: Annotated[float, Range(ge=1)] = 2.0,
        fused_weight: NonNegativeFloat = 1.0,
        unimodal_weight: NonNegativeFloat = 1.0,
        unimodal_heads: Literal["aux", "slice"] = "aux",
        scale_fusion_block: bool = True,
        modulation_starts: NonNegativeInt = 0,
        modulation_ends: NonNegativeInt | None = None,
    ):
        # an empty window would silently be unmodulated multi-loss training (k = 1 always)
        refuse_empty_window(modulation_starts, modulation_ends, open_end=True)
        self.alpha = alpha
        self.max_boost = max_boost
        self.fused_weight = fused_weight
        self.unimodal_weight = unimodal_weight
        self.unimodal_heads = unimodal_heads
        self.scale_fusion_block = scale_fusion_block
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.needs_unimodal_logits = unimodal_heads == "slice"
        self.unimodal_logits_option = ("method.unimodal_heads=slice", "method.unimodal_heads=aux")
        self.heads: nn.ModuleDict | None = None
        self.last_coefficients: dict[str, float] = {}

    def in_window(self, epoch: int) -> bool:
        return epoch >= self.modulation_starts and (self.modulation_ends is None or epoch <= self.modulation_ends)

    # ---- setup: heads and the modality -> parameters map ----
    def setup(self, run):
        super().setup(run)
        model = run.model
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and self.modulation_starts >= epochs:
            log.warning("mlgm: method.modulation_starts=%d >= trainer.epochs=%d, so no step is modulated (this run "
                        "is unmodulated multi-loss training)", self.modulation_starts, epochs)
        if self.unimodal_heads == "aux":
            dims = model.fusion.dims
            heads = nn.ModuleDict({m: nn.Linear(dims[m], run.num_classes) for m in model.modalities})
            self.heads = self.register_module(run, "unimodal_heads", heads)
        # {modality: [(parameter, mask or None)]}: every gradient k_m multiplies (mask = the entries it owns)
        self.scaled: dict[str, list[tuple[nn.Parameter, Tensor | None]]] = {}
        blocks = self.scale_fusion_block and model.fusion.has_linear_blocks
        if self.scale_fusion_block and not blocks:
            # the official method scales that block too: a partial no-op the user should see (false silences it)
            log.warning("mlgm: backbone.fusion=%s has no per-modality weight block, so method.scale_fusion_block=true "
                        "scales only the encoders%s; set method.scale_fusion_block=false to say so",
                        fusion_key(model.fusion), " and the aux heads" if self.heads is not None else "")
        for m, params in model.modality_parameters().items():
            entries: list[tuple[nn.Parameter, Tensor | None]] = [(p, None) for p in params]
            if self.heads is not None:
                entries += [(p, None) for p in self.heads[m].parameters()]
            if blocks:  # the weight block only: the official code scales fc_m_lin.weight, never a bias
                entries += [(p, mask) for p, mask in model.fusion.block_parameters(m) if p.dim() > 1]
            self.scaled[m] = entries

    # ---- loss stage ----
    def unimodal_logits(self, run, features: dict[str, Tensor], out=None) -> dict[str, Tensor]:
        if self.heads is not None:
            return aux_head_logits(self.heads, features)
        return out.unimodal if out is not None else run.model.unimodal_logits(features)

    def loss(self, run, batch, out):
        y = batch.label
        uni = self.unimodal_logits(run, out.features, out)
        fused = F.cross_entropy(out.logits.float(), y)
        ce = {m: F.cross_entropy(z.float(), y) for m, z in uni.items()}
        total = self.fused_weight * fused + self.unimodal_weight * sum(ce.values())
        # the scores are logged every epoch (the same history columns throughout); k applies inside the window only
        probs = {m: torch.softmax(z.detach().float(), dim=1).gather(1, y[:, None]).sum() for m, z in uni.items()}
        stats = run.reduce({**probs, "_count": torch.tensor(float(len(y)), device=y.device)})
        count = float(stats.pop("_count"))
        scores = {m: float(v) / count for m, v in stats.items()}
        if self.in_window(run.epoch):
            self.last_coefficients = mlgm_coefficients(scores, self.alpha, self.max_boost)
        else:
            self.last_coefficients = {m: 1.0 for m in uni}
        losses = {"loss": total, "ce/fused": fused.detach(), **{f"ce/{m}": v.detach() for m, v in ce.items()}}
        for m in uni:
            losses[f"mlgm/k/{m}"] = torch.tensor(self.last_coefficients[m], device=y.device)
            losses[f"mlgm/score/{m}"] = torch.tensor(scores[m], device=y.device)
        return losses

    # ---- gradient stage ----
    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        if not self.in_window(run.epoch):
            return
        for m, entries in self.scaled.items():
            k = self.last_coefficients.get(m, 1.0)
            if k == 1.0:
                continue
            for p, mask in entries:
                if p.grad is None:
                    continue
                if mask is None:
                    p.grad.mul_(k)
                else:  # only the block's entries: g * (1 + (k - 1) * mask)
                    p.grad.mul_(1.0 + (k - 1.0) * mask.to(p.grad.device, p.grad.dtype))
