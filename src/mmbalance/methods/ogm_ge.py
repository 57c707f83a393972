"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al., CVPR 2022)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_empty_window, true_class_scores

Scope = Literal["weights", "conv_kernels", "all"]  # the choices config validation and the constructor check


def ogm_coefficients(scores: dict[str, float], alpha: float) -> dict[str, float]:
    """k_m = 1 - tanh(alpha * rho_m) when rho_m > 1, else 1, with rho_m = s_m / mean_{k != m} s_k.

    For two modalities rho_m is the official ratio s_m / s_other, so exactly one modality is damped
    (the official code since 2022-05; the earlier relu(rho - 1) form is not used). For M > 2 the ratio
    against the mean of the others is the generalisation proposed in the reference notes: every modality
    ahead of the average of the rest is damped. At an exact tie nothing is damped (the official 2-modality
    code damps audio there; a measure-zero event).
    """
    mods = list(scores)
    if len(mods) < 2:
        return {m: 1.0 for m in mods}
    coeffs = {}
    for m in mods:
        others = sum(scores[k] for k in mods if k != m) / (len(mods) - 1)
        rho = scores[m] / others if others > 0 else math.inf
        coeffs[m] = 1.0 - math.tanh(alpha * rho) if rho > 1 else 1.0
    return coeffs


class OGMGE(Method):
    """OGM / OGM-GE (Peng, Wei, Deng, Wang, Hu: "Balanced Multimodal Learning via On-the-fly Gradient
    Modulation", CVPR 2022), as the official code (GeWu-Lab/OGM-GE_CVPR2022) does it.

    Each step, inside the modulation window: per-modality scores s_m = sum_i softmax(o_m)_i[y_i] from the
    concat head's unimodal logits (detached), coefficients from `ogm_coefficients`, then for each
    modality's selected encoder gradients g <- g * k_m (+ GE noise N(0, std(g)^2) where std is the
    *unscaled* gradient's, added to every modality including the undamped one). The loss is the fused CE.

    Args:
        alpha: modulation strength (official README: 0.8 CREMA-D, 0.1 VGGSound).
        variant: "ogm_ge" (scale + noise, the default) or "ogm" (scale only).
        modulation_starts, modulation_ends: 0-based inclusive epoch window (official 0..50).
        scope: which encoder gradients are modulated. "weights" (default) = every non-1-D encoder
            parameter: on the official ResNet18 encoders (no fc) these are exactly the conv kernels the
            official code selects, and on encoders with linear layers (our small CNN's projection, MLPs,
            Transformers) the whole encoder is modulated instead of silently only part of it or nothing.
            "conv_kernels" = 4-D weights only (the official code's literal rule); "all" = every encoder
            parameter, biases and norms included.
        warmup_epochs: epochs at the start with no modulation at all, whatever the window (the journal version,
            GeWu-Lab/BML_TPAMI2024, uses 6: `epoch <= 5`); 0 (default) = the CVPR behaviour.

    Hooks used: `on_after_backward`. Needs per-modality logits (concat or sum fusion).
    Choices: the noise std comes from the unscaled gradient, as the official code; the peer (BalanceMM)
    damps nobody at a tie and starts at epoch 10 — not followed; like the peer (and unlike the official code's
    literal 4-D rule) linear encoder weights are modulated too, see `scope`.
    """

    family = "optimization"
    regression_refusal = ("its modulation coefficients come from each modality's softmax probability of the "
                          "true class")
    needs_unimodal_logits = True

    def __init__(
        self,
        alpha: NonNegativeFloat = 0.8,
        variant: Literal["ogm_ge", "ogm"] = "ogm_ge",
        modulation_starts: NonNegativeInt = 0,
        modulation_ends: NonNegativeInt = 50,
        scope: Scope = "weights",
        warmup_epochs: NonNegativeInt = 0,
    ):
        refuse_empty_window(modulation_starts, modulation_ends)  # empty: silently the baseline
        self.alpha = alpha
        self.variant = variant
        self.modulation_starts = modulation_starts
        self.modulation_ends = modulation_ends
        self.scope = scope
        self.warmup_epochs = warmup_epochs
        self.last_coefficients: dict[str, float] = {}

    def setup(self, run):
        super().setup(run)
        self.params = {m: select_parameters(ps, self.scope) for m, ps in run.model.modality_parameters().items()}
        for m, ps in self.params.items():
            if not ps:
                raise UserError(f"method.scope={self.scope!r} selects no parameters of the {m!r} encoder")

    def in_window(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs and self.modulation_starts <= epoch <= self.modulation_ends

    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        if not self.in_window(run.epoch):
            return
        scores = {m: float(s) for m, s in run.reduce(true_class_scores(out.unimodal, batch.label)).items()}
        self.last_coefficients = coeffs = ogm_coefficients(scores, self.alpha)
        for m, params in self.params.items():
            for p in params:
                if p.grad is None:
                    continue
                if self.variant == "ogm_ge":
                    # the unscaled gradient's std as a tensor: no host sync per parameter on the step's hot path
                    std = p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                    noise = torch.randn(p.grad.shape, generator=run.noise_generator(p.grad.device),
                                        device=p.grad.device, dtype=p.grad.dtype) * (std + 1e-8)
                    p.grad.mul_(coeffs[m]).add_(noise)
                else:
                    p.grad.mul_(coeffs[m])


def select_parameters(params, scope: str):
    """The encoder parameters a gradient-modulation method edits, by `scope` (see OGMGE)."""
    params = list(params)
    if scope == "all":
        return params
    if scope == "conv_kernels":
        return [p for p in params if p.dim() == 4]
    return [p for p in params if p.dim() > 1]
