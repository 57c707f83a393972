"""AMSS / AMSS+: Adaptively Mask Subnetworks considering modal Significance (Yang, Pan, Jiang, Xu, Tang:
"Learning to Rebalance Multi-Modal Optimization by Adaptively Masking Subnetworks", TPAMI 2025)."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeInt, PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_inactive_options
from mmbalance.methods.ogm_ge import Scope, select_parameters

log = logging.getLogger("mmbalance")

#: the official clamp on every modality's kept fraction
MIN_KEEP, MAX_KEEP = 0.1, 0.9
#: the official fraction for every modality when an information estimate is not positive (or is NaN)
FALLBACK_KEEP = 0.5


def label_entropy(counts: Tensor, mode: str = "entropy") -> float:
    """H(Y) of the batch's label frequencies pi_c = n_c / n, in nats.

    "entropy": -sum_c pi_c ln pi_c (the paper's H(Y)). "official": the AV script's CE(pi, pi) with pi passed
    as *logits*, i.e. -sum_c pi_c log softmax(pi)_c over the classes 0..(largest label in the batch) (the length
    of `torch.bincount`); it equals ln C for a uniform batch and is only close to H(Y) otherwise.
    """
    counts = counts.detach().double().flatten()
    pi = counts / counts.sum()
    if mode == "entropy":
        pi = pi[pi > 0]
        return float(-(pi * pi.log()).sum())
    present = int(torch.nonzero(counts).max()) + 1
    pi = pi[:present]
    return float(-(pi * torch.log_softmax(pi, 0)).sum())


def amss_coefficients(scores: dict[str, float], feature_entropy: dict[str, float], hy: float, temperature: float,
                      offset: float = 0.5, bias: float = 0.0) -> dict[str, float]:
    """Each modality's kept fraction c_m from its significance (official `modal_caculate_MI`).

    info_m = s_m + H(Y) + offset, with s_m = -CE(z_m, y) (a variational lower bound on I(X_m; Y) up to the
    offset); if any info_m <= 0 (or NaN) every c_m = 0.5. Otherwise the mutual-information rate is
    r_m = info_m / H_m (H_m the entropy of the softmax over modality m's feature dimensions), t_m = r_m / T and
    c_m = clamp(1 - softmax_m(t) + bias, 0.1, 0.9) (NaN -> 0.5): the more significant modality keeps less.
    For two modalities 1 - softmax_a(t) = e^{t_v} / (e^{t_a} + e^{t_v}), the AV script's formula; for three it
    is the 3-modality script's. The softmax is the numerically stable one (the official exp() overflows to
    NaN -> 0.5 once t > 88); a modality with H_m = 0 has an infinite rate, and the infinite rates share the
    whole softmax mass equally (its limit).
    """
    mods = list(scores)
    info = {m: scores[m] + hy + offset for m in mods}
    if any(not v > 0 for v in info.values()):
        return {m: FALLBACK_KEEP for m in mods}
    t = {m: (info[m] / feature_entropy[m] if feature_entropy[m] > 0 else math.inf) / temperature for m in mods}
    infinite = [m for m in mods if t[m] == math.inf]
    if infinite:
        share = {m: (1.0 / len(infinite) if m in infinite else 0.0) for m in mods}
    else:
        top = max(t.values())
        e = {m: math.exp(t[m] - top) for m in mods}
        total = sum(e.values())
        share = {m: e[m] / total for m in mods}
    out = {}
    for m in mods:
        c = 1.0 - share[m] + bias
        out[m] = FALLBACK_KEEP if c != c else min(MAX_KEEP, max(MIN_KEEP, c))
    return out


def kept_units(n: int, fraction: float) -> int:
    """k = ceil(n * fraction) (official), at least 1 and at most n; a 1e-9 guard keeps float noise such as
    10 * 0.3 = 3.0000000000000004 from adding a unit."""
    return min(n, max(1, math.ceil(n * fraction - 1e-9)))


def keep_probabilities(importance: Tensor, k: int) -> Tensor:
    """pi_f = min(1, lambda * u_f) with lambda chosen so that sum_f pi_f = k (importance sampling with the cap at
    1 filled by water-filling: units too important to sample are always kept, the rest share the remaining
    budget in proportion to u). Units with u_f = 0 get 0 (their gradient is zero; when fewer than k units
    have any importance they are all kept); when every u_f = 0, pi = k/n uniformly.

    Closed form without host synchronisation: with u sorted descending and T_j = sum_{i >= j} u_i, the number of
    capped units is the length of the prefix where (k - j) u_j >= T_j, and lambda = (k - capped) / T_capped.
    """
    n = importance.numel()
    dtype = torch.float64 if importance.device.type in ("cpu", "cuda") else torch.float32
    u = importance.detach().to(dtype).flatten()
    sorted_u, order = torch.sort(u, descending=True)
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_u, [0]), 0), [0])
    j = torch.arange(n, device=u.device, dtype=dtype)
    capped = ((k - j) * sorted_u >= suffix) & (sorted_u > 0)
    n_capped = torch.cumprod(capped.to(torch.int64), 0).sum()  # a prefix, also under rounding
    rest = torch.cat([suffix, suffix.new_zeros(1)])[n_capped]
    lam = torch.where(rest > 0, (k - n_capped) / rest.clamp(min=torch.finfo(dtype).tiny), rest.new_zeros(()))
    p_sorted = torch.where(j < n_capped, torch.ones_like(sorted_u), (lam * sorted_u).clamp(max=1.0))
    p = torch.empty_like(p_sorted).scatter_(0, order, p_sorted)
    return torch.where(suffix[0] > 0, p, torch.full_like(p, k / n))


def sample_mask(importance: Tensor, fraction: float, variant: str = "amss", sampling: str = "bernoulli",
                plus_scale: str = "inverse_probability", generator: torch.Generator | None = None) -> Tensor:
    """The gradient mask of one parameter's units (float32, one entry per unit).

    k = `kept_units(n, fraction)`, pi = `keep_probabilities(importance, k)`.
    - sampling "bernoulli": unit f is kept when U_f < pi_f, U = torch.rand(n) drawn from `generator` (float32;
      independent Bernoulli(pi_f) draws; k units are kept in expectation).
    - sampling "multinomial" (the official "Adaptive" mode): exactly k units (or every unit with importance, if
      fewer) drawn without replacement with probability u_f / sum(u) (`torch.multinomial`).
    AMSS keeps a unit with mask 1. AMSS+ keeps it with weight 1/pi_f ("inverse_probability": the unbiased
    estimate, E[mask_f] = 1 for every unit with importance, exact under bernoulli sampling and a first-order
    approximation of the inclusion probability under multinomial sampling) or 1/(q_f + 1/n) with q = u / sum(u)
    ("official": the released code's factor, which is not an inverse keep-probability).
    """
    n = importance.numel()
    u = importance.detach().float().flatten()
    k = kept_units(n, fraction)
    p = keep_probabilities(u, k)
    if sampling == "bernoulli":
        kept = torch.rand(n, generator=generator, device=u.device) < p
    else:
        kept = torch.zeros(n, dtype=torch.bool, device=u.device)
        nonzero = int((u > 0).sum())
        if nonzero:
            kept[torch.multinomial(u / u.sum(), min(k, nonzero), replacement=False, generator=generator)] = True
    if variant == "amss":
        return kept.float()
    if plus_scale == "inverse_probability":
        scale = 1.0 / p.clamp(min=torch.finfo(p.dtype).tiny)
    else:
        total = u.sum()
        q = u / total if float(total) > 0 else torch.full_like(u, 1.0 / n)
        scale = 1.0 / (q.to(p.dtype) + 1.0 / n)
    return torch.where(kept, scale, torch.zeros_like(scale)).float()


def unit_importance(grad: Tensor, granularity: str = "filter", importance: str = "gn") -> Tensor:
    """u per unit: the squared gradient summed over each output unit (dim 0: a conv filter, a linear layer's
    output row; each entry of a 1-D parameter) for "filter", or per entry for "element"; "sqrt_gn" takes its
    square root (the official `gn` / `sqrt_gn` modes)."""
    g2 = grad.detach().float() ** 2
    u = g2.reshape(g2.shape[0], -1).sum(1) if granularity == "filter" and g2.dim() > 0 else g2.reshape(-1)
    return u.sqrt() if importance == "sqrt_gn" else u


class AMSS(Method):
    """AMSS and AMSS+ (TPAMI 2025; official code njustkmg/TPAMI-AMSS, `AMSS/train_test.py` for two modalities,
    `AMSS_rod/train_nv.py` for three).

    Each step, from the step's own forward pass (detached, reduced across processes with `run.reduce`):
    s_m = -CE(z_m, y) from the concat/sum head's per-modality logits (slice + b/M), H(Y) of the batch labels
    (`label_entropy`), H_m = batch mean of the entropy of softmax(h_m) over the feature dimensions of modality
    m's pooled feature, and the kept fractions c_m = `amss_coefficients`. The loss is the fused CE. After
    backward, every selected gradient of encoder m is masked unit by unit: importance u_f = sum of the squared
    gradient of unit f (Fisher-information proxy; `unit_importance`), keep probabilities pi from u and k =
    ceil(n c_m) (`keep_probabilities`), a random mask (`sample_mask`), grad <- grad * mask. AMSS keeps with 1,
    AMSS+ with the unbiased weight 1/pi_f. The draws come from `run.noise_generator` (seeded from the run seed,
    saved in checkpoints), so a run is reproducible and a resumed run draws what the uninterrupted one would.
    Under hardware=ddp the gradients are averaged before the masks are drawn, so every rank masks identically.

    Args:
        variant: "amss" (0/1 masks) or "amss_plus" (kept units re-weighted, see `plus_scale`).
        temperature: T in t_m = r_m / T (official AV 0.2; image-text 0.5). Smaller T separates the modalities'
            fractions more: the method's strength knob.
        offset: the constant in info_m = s_m + H(Y) + offset (AV script 0.5; the 3-modality script uses 3 with
            a batch-summed, log2, /40 feature entropy, which we do not reproduce).
        bias: added to every fraction before the clamp (AV 0; image-text 0.2).
        sampling: "bernoulli" (default: independent Bernoulli(pi_f) keeps with known keep-probabilities, which the
            paper's unbiased AMSS+ estimate needs) or "multinomial" (the official default "Adaptive": exactly k
            units drawn without replacement in proportion to u, whose inclusion probabilities have no closed
            form). The official "Bernoulli" mode (keep-probability u_f / sum(u), about one unit kept whatever c_m)
            and its "TopK" / "random" ablations are not offered.
        plus_scale: AMSS+ only: "inverse_probability" (default: 1/pi_f, the paper's unbiased estimate) or
            "official" (1/(q_f + 1/n), the released code's factor: not unbiased, but never above n). With
            importance "gn" (pi proportional to |g_f|^2) a rarely kept unit of tiny gradient g_f comes back with norm
            sum(u) / (k |g_f|): the expected squared norm stays n/k times the full gradient's, but single units can
            spike; "sqrt_gn" (pi proportional to |g_f|, the minimum-variance choice) gives every sampled unit the
            same rescaled norm, and trainer.grad_clip bounds the update.
        importance: "gn" (default, official: sum of g^2 per unit) or "sqrt_gn" (its square root). The official
            "gn_wn" (g^2 / w^2) is not offered: it divides by zero on a zero weight.
        granularity: "filter" (default, official: one mask entry per output unit, broadcast over its kernel) or
            "element" (one per parameter entry: the paper's element-wise subnetwork).
        scope: which encoder parameters are masked (as OGM-GE's): "weights" (default: every non-1-D encoder
            parameter, i.e. conv kernels and linear weights, so MLP/Transformer encoders are masked too),
            "conv_kernels" (4-D weights only) or "all" (biases and norms as well).
        label_entropy: "entropy" (default, the paper's H(Y)) or "official" (the AV script's CE(pi, pi); see
            `label_entropy`).
        warmup_epochs: epochs at the start with plain training (no masks); 0 = the official behaviour.

    Hooks used: `setup` (the masked parameters per encoder, by `scope`), `loss` (fused CE; the fractions, logged
    as amss_keep_<modality>), `on_after_backward` (masks).
    Needs per-modality logits (concat or sum fusion). No state across steps besides the run's noise generator.
    Choices: the official code masks only ResNet residual-block convs (names with "layer" and "conv"); we mask
    by `scope`, stems and linear layers included. The official AV script computes a mask for the fused head
    but never applies it (the NVGesture script does); we never mask the head. The official guard is applied to
    every modality (any info_m <= 0 -> all 0.5). The 3-modality script's different constants (offset 3,
    entropy/40) are not reproduced; `offset` exposes the constant. Weight decay and momentum still move masked
    units (the optimizer acts after the mask), as in the official code. Where the released code departs from the
    paper (sampling, the AMSS+ factor, H(Y) computed from probabilities passed as logits), the defaults follow the
    paper and the code's behaviour is an option.
    """

    family = "optimization"
    regression_refusal = ("its kept fractions come from each modality's information estimate -CE(z_m, y) + H(Y), "
                          "the cross-entropy of the modality's class logits against the class label plus the "
                          "entropy of the batch's class frequencies")
    needs_unimodal_logits = True

    def __init__(
        self,
        variant: Literal["amss", "amss_plus"] = "amss",
        temperature: PositiveFloat = 0.2,
        offset: float = 0.5,
        bias: float = 0.0,
        sampling: Literal["bernoulli", "multinomial"] = "bernoulli",
        plus_scale: Literal["inverse_probability", "official"] = "inverse_probability",
        importance: Literal["gn", "sqrt_gn"] = "gn",
        granularity: Literal["filter", "element"] = "filter",
        scope: Scope = "weights",
        label_entropy: Literal["entropy", "official"] = "entropy",
        warmup_epochs: NonNegativeInt = 0,
    ):
        refuse_inactive_options(AMSS, {"plus_scale": plus_scale}, "variant", variant, "amss_plus")
        self.variant = variant
        self.temperature = temperature
        self.offset = offset
        self.bias = bias
        self.sampling = sampling
        self.plus_scale = plus_scale
        self.importance = importance
        self.granularity = granularity
        self.scope = scope
        self.label_entropy = label_entropy
        self.warmup_epochs = warmup_epochs
        self.last_coefficients: dict[str, float] = {}

    def setup(self, run):
        super().setup(run)
        self.params = {m: select_parameters(ps, self.scope) for m, ps in run.model.modality_parameters().items()}
        for m, ps in self.params.items():
            if not ps:
                raise UserError(f"method.scope={self.scope!r} selects no parameters of the {m!r} encoder")
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and self.warmup_epochs >= epochs:
            log.warning("amss: method.warmup_epochs=%d >= trainer.epochs=%d, so no gradient is ever masked (this "
                        "run is the baseline)", self.warmup_epochs, epochs)

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def coefficients(self, run, out, label: Tensor) -> dict[str, float]:
        """The kept fractions from the step's per-modality logits and features (summed over ranks)."""
        mods = list(out.features)
        parts = []
        for m in mods:
            parts.append(F.cross_entropy(out.unimodal[m].detach().float(), label, reduction="sum"))
        for m in mods:
            h = out.features[m].detach().float().flatten(1)
            parts.append(-(torch.softmax(h, 1) * torch.log_softmax(h, 1)).sum())
        counts = torch.bincount(label, minlength=run.num_classes).float()
        flat = run.reduce({"amss": torch.cat([torch.stack(parts), counts])})["amss"].double().cpu()
        n = float(flat[2 * len(mods):].sum())
        scores = {m: -float(flat[i]) / n for i, m in enumerate(mods)}
        entropy = {m: float(flat[len(mods) + i]) / n for i, m in enumerate(mods)}
        hy = label_entropy(flat[2 * len(mods):], self.label_entropy)
        return amss_coefficients(scores, entropy, hy, self.temperature, self.offset, self.bias)

    # ---- loss stage ----
    def loss(self, run, batch, out):
        losses = {"loss": F.cross_entropy(out.logits, batch.label)}
        self.last_coefficients = self.coefficients(run, out, batch.label)
        dev = out.logits.device
        for m, c in self.last_coefficients.items():
            losses[f"amss_keep_{m}"] = torch.tensor(c, device=dev)
        return losses

    # ---- gradient stage ----
    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        if not self.active(run.epoch) or not self.last_coefficients:
            return
        run.sync_gradients()  # hardware=ddp: masks from the whole batch's gradient, identical on every rank
        for m, params in self.params.items():
            for p in params:
                if p.grad is None:
                    continue
                u = unit_importance(p.grad, self.granularity, self.importance)
                mask = sample_mask(u, self.last_coefficients[m], self.variant, self.sampling, self.plus_scale,
                                   run.noise_generator(p.grad.device))
                per_unit = self.granularity == "filter" and p.grad.dim() > 0
                shape = (-1,) + (1,) * (p.grad.dim() - 1) if per_unit else p.grad.shape
                p.grad.mul_(mask.reshape(shape).to(p.grad.dtype))
