"""MMPareto: boosting multimodal learning with innocent unimodal assistance (Wei & Hu, ICML 2024)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from mmbalance.constraints import PositiveFloat
from mmbalance.methods.base import Method

log = logging.getLogger("mmbalance")
# optimizers whose step divides each parameter's gradient by a running estimate of its own magnitude: a constant
# factor on a parameter's gradient (MMPareto's gamma) cancels out of their updates
SCALE_INVARIANT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                              torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad)


def min_norm_weight(aa: Tensor, ab: Tensor, bb: Tensor) -> Tensor:
    """Weight c of the first vector in min_c ||c a + (1-c) b||^2, c in [0, 1], from the dot products
    <a,a>, <a,b>, <b,b>; the two-task MGDA closed form with the official solver's clipping to 0.999/0.001."""
    interior = (bb - ab) / (aa + bb - 2 * ab).clamp_min(torch.finfo(aa.dtype).tiny)
    second = torch.where(ab >= bb, torch.full_like(aa, 0.001), interior)
    return torch.where(ab >= aa, torch.full_like(aa, 0.999), second)


def pareto_combine(g_mm: list[Tensor], g_uni: list[Tensor], gamma: float = 1.5) -> tuple[list[Tensor], Tensor, Tensor]:
    """MMPareto's gradient for one encoder from its per-tensor multimodal and unimodal gradients.

    The cosine and the weights are computed over the whole encoder (all tensors flattened together):
    cos > 0 gives alpha_mm = alpha_uni = 1/2, otherwise the min-norm weights (`min_norm_weight`). Then per
    tensor: g_new = 2 (alpha_mm g_mm + alpha_uni g_uni); its norm is restored to at least that of the plain
    sum g_mm + g_uni (scaled up only) and multiplied by gamma. Without a conflict this is gamma (g_mm + g_uni).
    A tensor whose g_new is exactly zero stays zero (the official code would give NaN there).

    Returns the new gradients, the cosine and alpha_mm (0-d tensors; nothing leaves the device).
    """
    aa = sum((a * a).sum() for a in g_mm)
    bb = sum((b * b).sum() for b in g_uni)
    ab = sum((a * b).sum() for a, b in zip(g_mm, g_uni))
    cos = ab / (aa.sqrt() * bb.sqrt()).clamp_min(1e-8)  # F.cosine_similarity's eps
    alpha = torch.where(cos > 0, torch.full_like(cos, 0.5), min_norm_weight(aa, ab, bb))
    out = []
    for a, b in zip(g_mm, g_uni):
        new = 2 * (alpha * a + (1 - alpha) * b)
        new_norm, sum_norm = new.norm(), (a + b).norm()
        ratio = torch.where(new_norm > 0, sum_norm / new_norm.clamp_min(torch.finfo(new_norm.dtype).tiny),
                            torch.ones_like(new_norm))
        out.append(new * (gamma * torch.clamp_min(ratio, 1.0)))
    return out, cos, alpha


class MMPareto(Method):
    """MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
    ICML 2024), as the official code (GeWu-Lab/MMPareto_ICML2024, code/MMPareto.py) does it.

    Losses: L_mm = CE(fused logits) and L_m = CE(unimodal logits of m) for every modality. Each encoder m
    gets two gradients, g_mm (from L_mm) and g_m (from L_m), combined by `pareto_combine` (cosine test over
    the whole encoder, min-norm weights under conflict, per-tensor magnitude restore, times gamma).
    Head parameters keep the plain sum of what the losses give them, as the official code (it skips every
    parameter named 'head'): the fused head gets dL_mm, each auxiliary head dL_m (with `slice`, the
    fused head gets dL_mm + sum_m dL_m).

    Two backward passes per step whatever M is: `torch.autograd.grad` of L_mm, then of sum_m L_m. L_m
    reaches only encoder m (and its head), so the second pass gives every encoder exactly its own g_m.
    The official code runs M+2 passes (one probe per loss, then the summed loss once more); the gradients
    are the same.

    Args:
        gamma: the magnitude boost (official 1.5; the peer calls it `alpha`).
        unimodal_head: "aux" (default, official): a separate linear classifier per modality on its pooled
            feature, owned by the method (optimised, saved), so the unimodal losses never touch the fused
            head and any fusion works. "slice": the peer's convention, the fused concat/sum head's own
            per-modality logits (weight slice + b/M); then L_m also trains the fused head.

    Regression (dataset.task=regression): the rule never reads class probabilities, only the gradients of the
    multimodal and unimodal losses, so it applies unchanged with those losses replaced by the run's regression
    loss (`task_loss`: L1 or MSE of one-output heads; logged as "l1/..." or "mse/..." instead of "ce/...").

    Hooks used: `setup` (auxiliary heads, parameter map), `loss`, `backward` (replaces the plain backward).
    The loss logged as "loss" is L_mm + sum_m L_m (what the official code reports); the per-encoder cosine,
    alpha_mm and conflict indicator are logged as "pareto/..." (epoch means).
    Evaluation predicts with the fused head; per-modality accuracies are the fused head's slices as for
    every other method (the official code reports its auxiliary heads' accuracies instead).
    Choices vs the peer (BalanceMM): the peer never zeroes gradients between its probe passes, so its
    cosine is always 1 and the method degenerates to the multitask loss with encoder gradients x 2*gamma;
    here the probes are separate. The per-step rule runs on each step's gradients (no accumulation).
    Single-process: under DDP the probed gradients would have to be all-reduced before the cosine test.
    """

    family = "objective"
    tasks = ("classification", "regression")

    def __init__(self, gamma: PositiveFloat = 1.5, unimodal_head: Literal["aux", "slice"] = "aux"):
        self.gamma = gamma
        self.unimodal_head = unimodal_head
        self.needs_unimodal_logits = unimodal_head == "slice"
        self.unimodal_logits_option = ("method.unimodal_head=slice", "method.unimodal_head=aux")

    def setup(self, run):
        super().setup(run)
        if isinstance(run.optimizer, SCALE_INVARIANT_OPTIMIZERS):
            log.warning("MMPareto: method.gamma=%g scales the encoder gradients by a constant, which %s cancels out "
                        "of its updates (it normalises each parameter's gradient): gamma has no effect here; the "
                        "paper and its official code use SGD (optimizer=sgd)", self.gamma,
                        type(run.optimizer).__name__)
        model = run.model
        self.heads = None
        if self.unimodal_head == "aux":
            dims = model.fusion.dims
            heads = nn.ModuleDict({m: nn.Linear(dims[m], run.num_classes) for m in model.modalities})
            self.heads = self.register_module(run, "unimodal_heads", heads)
        self.encoder_params = {m: [p for p in ps if p.requires_grad] for m, ps in model.modality_parameters().items()}
        encoder_ids = {id(p) for ps in self.encoder_params.values() for p in ps}
        # the fused head and anything else of the model: plain summed gradients
        self.shared_params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
        self.aux_params = [p for p in self.heads.parameters() if p.requires_grad] if self.heads is not None else []

    def unimodal_logits(self, run, out) -> dict[str, Tensor]:
        if self.heads is not None:
            return {m: self.heads[m](out.features[m]) for m in run.model.modalities}
        return out.unimodal

    def loss(self, run, batch, out):
        uni = {m: self.task_loss(z, batch.label) for m, z in self.unimodal_logits(run, out).items()}
        fused = self.task_loss(out.logits, batch.label)
        key = self.loss_key  # "ce", or "l1"/"mse" for regression
        return {"loss": fused + sum(uni.values()), f"{key}/fused": fused, **{f"{key}/{m}": v for m, v in uni.items()}}

    def backward(self, run, losses):
        mods = list(run.model.modalities)
        encoder = [p for m in mods for p in self.encoder_params[m]]
        shared, aux = self.shared_params, self.aux_params
        uni_reach = aux if self.heads is not None else shared
        # pass 1: the multimodal loss; pass 2: the sum of the unimodal losses (L_m reaches only encoder m)
        key = self.loss_key
        g_mm = torch.autograd.grad(losses[f"{key}/fused"], encoder + shared, retain_graph=True, allow_unused=True)
        g_uni = torch.autograd.grad(sum(losses[f"{key}/{m}"] for m in mods), encoder + uni_reach, allow_unused=True)
        n = len(encoder)
        start = 0
        for m in mods:
            params = self.encoder_params[m]
            stop = start + len(params)
            mm, un = g_mm[start:stop], g_uni[start:stop]
            used = [i for i in range(len(params)) if mm[i] is not None or un[i] is not None]
            start = stop
            if not used:  # an encoder no loss reaches keeps no gradient
                continue
            new, cos, alpha = pareto_combine(
                [_or_zeros(mm[i], params[i]) for i in used], [_or_zeros(un[i], params[i]) for i in used], self.gamma)
            for i, g in zip(used, new):
                params[i].grad = g
            # logged with the step's losses (the template returns this dict after backward)
            losses[f"pareto/cos/{m}"] = cos.detach()
            losses[f"pareto/alpha_mm/{m}"] = alpha.detach()
            losses[f"pareto/conflict/{m}"] = (cos <= 0).float()
        head_grads: dict[int, Tensor] = {}
        for p, g in zip(shared, g_mm[n:]):
            if g is not None:
                head_grads[id(p)] = g
        for p, g in zip(uni_reach, g_uni[n:]):
            if g is not None:
                head_grads[id(p)] = head_grads[id(p)] + g if id(p) in head_grads else g
        for p in shared + aux:
            if id(p) in head_grads:
                p.grad = head_grads[id(p)]


def _or_zeros(g: Tensor | None, p: Tensor) -> Tensor:
    return torch.zeros_like(p) if g is None else g
