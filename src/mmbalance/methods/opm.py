"""OPM: On-the-fly Prediction Modulation (Wei, Li, Hu, Peng et al., TPAMI 2025; the journal OGM-GE)."""

from __future__ import annotations

import logging

import torch

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, Probability
from mmbalance.methods.base import Method, true_class_scores
from mmbalance.models.multimodal import Output, mask_modalities

log = logging.getLogger("mmbalance")


def opm_drop_probabilities(scores: dict[str, float], q_base: float, lam: float) -> dict[str, float]:
    """q_m = clip(q_base * (1 + lam * r_m), 0, 1) when r_m > 0, else 0, with r_m = tanh(relu(rho_m - 1)) and
    rho_m = s_m / mean_{k != m} s_k (for two modalities the official s_m / s_other)."""
    mods = list(scores)
    if len(mods) < 2:
        return {m: 0.0 for m in mods}
    s = torch.tensor([scores[m] for m in mods], dtype=torch.float64)
    others = (s.sum() - s) / (len(mods) - 1)
    rho = torch.where(others > 0, s / others.clamp_min(1e-300), torch.full_like(s, float("inf")))
    r = torch.tanh(torch.relu(rho - 1))
    q = torch.where(r > 0, (q_base * (1 + lam * r)).clamp(0.0, 1.0), torch.zeros_like(r))
    return {m: float(q[i]) for i, m in enumerate(mods)}


def drop_scale(q: dict[str, float], dims: dict[str, int]) -> float:
    """The shared rescale 1/(1 - theta), theta = sum_m d_m q_m / sum_m d_m (every modality gets it)."""
    theta = sum(dims[m] * q[m] for m in q) / sum(dims[m] for m in q)
    return 1.0 / (1.0 - theta)


class OPM(Method):
    """OPM (Wei, Li, Hu, Peng et al.: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2025;
    official code GeWu-Lab/BML_TPAMI2024), the forward-stage sibling of OGM.

    Each training step after the warm-up: features z_m = encode(inputs); per-modality scores
    s_m = sum_i softmax(o_m)_i[y_i] from the concat head's unimodal logits (no gradient; reduced with
    `run.reduce`); drop probabilities from `opm_drop_probabilities` (only modalities ahead of the mean of the
    others get q > 0); one execution coin per batch, heads with probability `p_exe`; on heads, every modality
    with q_m > 0 loses its pooled feature on a per-sample Bernoulli(q_m) mask (`mask_modalities`), and EVERY
    modality's feature is multiplied by the shared 1/(1 - theta) of `drop_scale`; logits = model.fuse(z~);
    loss = fused CE. Random draws come from `run.noise_generator` (replicas agree, resume is exact).
    Nothing is dropped or rescaled during the `warmup_epochs` first epochs, or at evaluation (`eval_fuse` is
    the base one).

    Args:
        q_base: base drop probability (official argparse and scripts 0.5; its config.py and the peer 0.4).
        lam: how much the dominance ratio raises q (official 0.5).
        p_exe: probability that a batch is modulated at all (official 0.7).
        warmup_epochs: epochs without modulation (official `epoch <= 5`, i.e. 6).

    Hooks used: `setup`, `forward`, `loss` (adds the drop statistics to the log).
    Needs per-modality logits (concat or sum fusion).
    Choices: q and theta are constants (detached; the official autograd function leaks a spurious gradient);
    for M > 2 the ratio is against the mean of the others (as our OGM-GE; the peer divides by the sum of the
    others, which with three balanced modalities never drops anything); the official code removes samples
    whose modalities are all dropped, which cannot happen here: the weakest modality's ratio is <= 1, so it
    is never dropped (and theta < 1). The peer runs without warm-up; the official 6 epochs are the default.
    """

    family = "feed-forward"
    regression_refusal = ("its drop probabilities come from each modality's softmax probability of the true "
                          "class")
    needs_unimodal_logits = True

    def __init__(
        self,
        q_base: Probability = 0.5,
        lam: NonNegativeFloat = 0.5,
        p_exe: Probability = 0.7,
        warmup_epochs: NonNegativeInt = 6,
    ):
        self.q_base = q_base
        self.lam = lam
        self.p_exe = p_exe
        self.warmup_epochs = warmup_epochs
        self.last_q: dict[str, float] = {}
        self.last_executed = False

    def setup(self, run):
        super().setup(run)
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and self.warmup_epochs >= epochs:
            log.warning("opm: method.warmup_epochs=%d >= trainer.epochs=%d, so no batch is ever modulated "
                        "(this run is the baseline)", self.warmup_epochs, epochs)

    def forward(self, run, batch):
        model = run.model
        features = model.encode(batch.inputs)
        self.last_q, self.last_executed = {m: 0.0 for m in model.modalities}, False
        if model.training and run.epoch >= self.warmup_epochs:
            features = self.modulate(run, features, batch.label)
        return Output(model.fuse(features), features, fusion=model.fusion)

    def modulate(self, run, features, label):
        with torch.no_grad():
            scores = run.reduce(true_class_scores(run.model.unimodal_logits(features), label))
        q = opm_drop_probabilities({m: float(s) for m, s in scores.items()}, self.q_base, self.lam)
        self.last_q = q
        first = next(iter(features.values()))
        g = run.noise_generator(first.device)
        coin = torch.rand((), generator=g, device=first.device)
        if not bool(coin < self.p_exe) or not any(v > 0 for v in q.values()):
            return features
        self.last_executed = True
        n = first.shape[0]
        absent = {m: torch.rand((n,), generator=g, device=first.device) < q[m] for m in features if q[m] > 0}
        scale = drop_scale(q, {m: z[0].numel() for m, z in features.items()})
        return {m: z * scale for m, z in mask_modalities(features, absent).items()}

    def loss(self, run, batch, out):
        losses = super().loss(run, batch, out)
        device = out.logits.device
        losses.update({f"opm/q/{m}": torch.tensor(v, device=device) for m, v in self.last_q.items()})
        losses["opm/executed"] = torch.tensor(float(self.last_executed), device=device)
        return losses
