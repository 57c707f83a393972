"""InfoReg: Information Acquisition Regulation (Huang, Wei, Yang, Hu: "Adaptive Unimodal Regulation for Balanced
Multimodal Information Acquisition", CVPR 2025; official code GeWu-Lab/InfoReg_CVPR2025, `main.py`)."""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat, PositiveInt, Range
from mmbalance.errors import UserError
from mmbalance.methods.base import Method

log = logging.getLogger("mmbalance")

WINDOW_SOURCES = ("own", "sum")  # or the name of one modality (the official: "audio")


def window_indicator(traces: list[float], window_epochs: int = 10) -> float:
    """k_e, the relative growth of the information amount: with the per-epoch Fisher traces T_0..T_{e-1} so far,
    padded in front with `window_epochs` zeros (official), k = (mean of the last W - mean of the W before the last
    one) / mean of the last W = (T_{e-1} - T_{e-1-W}) / sum_{j=e-W}^{e-1} T_j.

    No trace yet (epoch 0) gives 1 (official). With the zero padding, the first epochs give k = 1, then
    T_1/(T_0+T_1), ...: the window stays open while the trace still grows. A last-W sum of 0 (no gradient at all)
    gives 0 (closed; the official code divides by zero).
    """
    if not traces:
        return 1.0
    padded = [0.0] * window_epochs + [float(t) for t in traces]
    recent = sum(padded[-window_epochs:]) / window_epochs
    before = sum(padded[-window_epochs - 1:-1]) / window_epochs
    if recent <= 0.0:
        return 0.0
    return (recent - before) / recent


def regulation_strengths(scores: dict[str, float], open_windows: dict[str, bool],
                         constants: dict[str, float]) -> dict[str, float]:
    """beta_m = c_m exp(tanh(s_m - min_j s_j)) for every modality whose window is open and whose score is above the
    lowest one; 0 for the others (the lowest, a tie at the lowest, a closed window).

    For two modalities "above the lowest" is "ahead of the other": the official rule (audio: S_a > S_v and k > thr
    -> beta_a = 0.95 exp(tanh(S_a - S_v)); visual symmetric with 0.1; at a tie neither). For M > 2 every modality
    ahead of the weakest one is regulated, more the further ahead it is (the reference notes' proposal).
    """
    low = min(scores.values())
    return {m: constants[m] * math.exp(math.tanh(s - low)) if open_windows.get(m, False) and s > low else 0.0
            for m, s in scores.items()}


class InfoReg(Method):
    """InfoReg (CVPR 2025), following the official code (GeWu-Lab/InfoReg_CVPR2025, `main.py`), extended to M
    modalities symmetrically.

    Loss: L = CE(z, y) + sum_m CE(z_m, y) with z_m the fused head's per-modality logits (concat slice + b/M, or the
    sum head's own), as the official code (one backward; its three extra backward passes are logging only and are
    not run). No auxiliary heads.

    Per epoch (`on_epoch_start`): for each modality m the window indicator k_m = `window_indicator` of its encoder's
    Fisher-trace history; the prime learning window of m is open while k_m > `threshold`. For every modality whose
    window is open, the anchor theta_m^0 = a copy of encoder m's parameters at the start of the epoch (official:
    a deepcopy of the whole model; only the encoders are needed). When no window is open, no anchor is kept.

    Per step: scores s_m = sum_i softmax(z_m)_i[y_i] (detached, float32; summed across processes under DDP),
    beta_m = `regulation_strengths`, and after backward, before clipping and the step, for every parameter of
    encoder m: grad += beta_m (theta - theta^0), the gradient of (beta_m / 2) ||theta_m - theta_m^0||^2, i.e. a
    proximal pull of the fast-learning modality towards its epoch-start parameters. The Fisher trace of encoder m
    accumulates over the epoch: T_m = sum over its weights W (parameters with more than one dimension: the
    conv/linear weights the official code reads, and on other encoders their matrices) of mean_elements(sum_steps
    grad_W^2). It is read from the step's own gradients (no extra pass), and appended to the history at the epoch's
    end (`on_epoch_end`), averaged over processes. Once every window has closed, training is plain multi-loss
    training with one float of bookkeeping per step.

    Args:
        beta: c, the regulation constant of every modality (official: 0.95 for audio, which is the modality it
            regulates on audio-dominant data).
        beta_per_modality: per-modality constants overriding `beta`, e.g. {audio: 0.95, visual: 0.1} = the official
            asymmetric pair (fitted to audio-dominant data; a modality not listed uses `beta`).
        threshold: the window is open while k > threshold (official 0.05; an earlier revision of the code has 0.04,
            and its visual branch can never fire: `elif score_v < score_a` repeats the audio condition). Must be
            below 1: k = 1 - (earlier mean / recent mean) of non-negative traces is at most 1, so a threshold >= 1
            would keep every window shut from the first epoch on (silently plain multi-loss training; beta=0 is
            the way to ask for that).
        window_epochs: W, the moving-window length of the trace means (official 10, with 10 zeros in front).
        window_source: which Fisher traces decide the windows. "own" (default, symmetric): each modality's own
            encoder trace decides its own window. "sum": one window for all, from the sum of every encoder's trace.
            A modality name (e.g. "audio", the official behaviour): one window for all, from that encoder's trace.
        score: "sum" (official: the batch sum of true-class probabilities, so tanh(s_m - s_min) is close to 1 for
            any gap of a few samples and beta is nearly binary, ~c e) or "mean" (the batch mean, a graded gap).
        fisher_gradients: which gradients the trace is read from. "loss" (default): the training loss's gradients,
            before the proximal term is added. The paper measures information with the Fisher information, which by
            definition belongs to the model's likelihood; the proximal regulariser is not part of it. "final":
            after the proximal term (the official code), which lets the regulation itself keep the trace, and so
            the window, up. Either way the trace is the official empirical estimate from batch-mean gradients
            (not per-sample gradients).

    The official 2-modality behaviour on audio-visual data is `window_source=audio`,
    `beta_per_modality={audio: 0.95, visual: 0.1}`, `score=sum`, `fisher_gradients=final`, `threshold=0.05`.

    Hooks used: `setup` (parameter maps), `on_epoch_start` (windows, anchor), `loss` (multi-loss, scores, betas),
    `on_after_backward` (Fisher accumulation, proximal term), `on_epoch_end` (trace history). Needs per-modality
    logits (concat or sum fusion). Resume: the trace history is the method's state; the anchor and the windows are
    rebuilt from the restored model and history when the next epoch starts.
    Cost: one copy of the regulated encoders per epoch while a window is open; per step an O(#params) add and
    squared-gradient sum; the per-modality logits' matmuls (counted in the training FLOPs by the trainer's step
    measurement). No extra forward or backward pass.
    M-modality extension (not in the official code, which is 2-modality with audio hard-coded): per-modality
    windows (`window_source=own`), one constant for all (`beta`), and every modality ahead of the weakest is
    regulated (`regulation_strengths`). With two modalities it reduces to the official rule except that (a) the
    visual encoder's regulation is gated by the visual window, not the audio one (`window_source=audio` restores
    it), (b) both modalities use the same constant (`beta_per_modality` restores 0.95 / 0.1) and (c) the trace is
    read before the proximal term (`fisher_gradients=final` restores it).
    Choices: the unused, buggy `calculate_proximal_term*` helpers of the official file are not ported; scores are
    one gather instead of a per-sample loop; a parameter that got no gradient still gets its proximal gradient.
    """

    family = "optimization"
    regression_refusal = ("it picks the modality to regulate by each modality's summed softmax probability of the "
                          "true class")
    needs_unimodal_logits = True

    def __init__(
        self,
        beta: NonNegativeFloat = 0.95,
        beta_per_modality: dict[str, NonNegativeFloat] | None = None,
        threshold: Annotated[float, Range(lt=1)] = 0.05,  # k <= 1: a threshold >= 1 never opens a window
        window_epochs: PositiveInt = 10,
        window_source: str = "own",
        score: Literal["sum", "mean"] = "sum",
        fisher_gradients: Literal["loss", "final"] = "loss",
    ):
        self.beta = beta
        self.beta_per_modality = dict(beta_per_modality or {})
        self.threshold = threshold
        self.window_epochs = window_epochs
        self.window_source = window_source
        self.score = score
        self.fisher_gradients = fisher_gradients
        self.traces: dict[str, list[float]] = {}
        # the current epoch's state (rebuilt by `begin_epoch`, never saved)
        self.epoch: int | None = None
        self.indicators: dict[str, float] = {}
        self.open: dict[str, bool] = {}
        self.anchor: dict[str, list[Tensor]] = {}
        self.fisher: dict[str, Tensor] = {}
        self.betas: dict[str, float] = {}

    # ---- setup ----
    def setup(self, run):
        super().setup(run)
        mods = list(run.model.modalities)
        if self.window_source not in WINDOW_SOURCES and self.window_source not in mods:
            raise UserError(f"method.window_source={self.window_source!r}; expected 'own', 'sum' or one of the "
                            f"modalities {mods}")
        unknown = sorted(set(self.beta_per_modality) - set(mods))
        if unknown:
            raise UserError(f"method.beta_per_modality names {unknown}, which are not modalities of this run {mods}")
        self.constants = {m: float(self.beta_per_modality.get(m, self.beta)) for m in mods}
        self.params = {m: [p for p in ps if p.requires_grad] for m, ps in run.model.modality_parameters().items()}
        self.fisher_params = {m: [p for p in ps if p.dim() > 1] for m, ps in self.params.items()}
        for m, ps in self.fisher_params.items():
            if not ps:
                raise UserError(f"method inforeg: the {m!r} encoder has no weight matrix or kernel to read a Fisher "
                                "trace from")
        for m in mods:
            self.traces.setdefault(m, [])

    # ---- windows ----
    def window_indicators(self) -> dict[str, float]:
        """{modality: k} for the coming epoch, from the trace history and `window_source`."""
        mods = list(self.traces)
        if self.window_source == "own":
            return {m: window_indicator(self.traces[m], self.window_epochs) for m in mods}
        if self.window_source == "sum":
            total = [sum(values) for values in zip(*(self.traces[m] for m in mods))]
            k = window_indicator(total, self.window_epochs)
        else:
            k = window_indicator(self.traces[self.window_source], self.window_epochs)
        return {m: k for m in mods}

    @torch.no_grad()
    def begin_epoch(self, run, epoch: int) -> None:
        """Windows, anchors and fresh Fisher accumulators for `epoch`."""
        self.epoch = epoch
        self.indicators = self.window_indicators()
        self.open = {m: k > self.threshold for m, k in self.indicators.items()}
        self.anchor = {m: [p.detach().clone() for p in self.params[m]] for m, is_open in self.open.items() if is_open}
        self.fisher = {m: torch.zeros((), dtype=torch.float32, device=run.device) for m in self.params}
        self.betas = {m: 0.0 for m in self.params}
        log.info("inforeg epoch %d: window indicator %s", epoch,
                 "  ".join(f"{m} {k:.4f} ({'open' if self.open[m] else 'closed'})" for m, k in self.indicators.items()))

    def on_epoch_start(self, run, epoch):
        self.begin_epoch(run, epoch)

    def on_epoch_end(self, run, epoch):
        if self.epoch != epoch:  # an epoch without a step: no gradient, trace 0
            self.begin_epoch(run, epoch)
        totals = run.reduce(dict(self.fisher))
        for m, value in totals.items():
            self.traces[m].append(float(value) / run.world_size)
        self.anchor = {}  # free the copies; the next epoch takes its own

    # ---- loss stage ----
    def loss(self, run, batch, out):
        if self.epoch != run.epoch:  # a step without on_epoch_start (a hand-driven step, a composition)
            self.begin_epoch(run, run.epoch)
        y = batch.label
        uni = out.unimodal
        fused = F.cross_entropy(out.logits, y)
        ce = {m: F.cross_entropy(z, y) for m, z in uni.items()}
        losses = {"loss": fused + sum(ce.values()), "ce/fused": fused.detach(),
                  **{f"ce/{m}": v.detach() for m, v in ce.items()}}
        if any(self.open.values()):
            self.betas = regulation_strengths(self.scores(run, uni, y), self.open, self.constants)
        else:  # no window open: nothing to decide, no host sync
            self.betas = {m: 0.0 for m in uni}
        for m in uni:
            losses[f"inforeg/k/{m}"] = torch.tensor(self.indicators[m], device=y.device)
            losses[f"inforeg/beta/{m}"] = torch.tensor(self.betas[m], device=y.device)
        return losses

    def scores(self, run, unimodal: dict[str, Tensor], label: Tensor) -> dict[str, float]:
        """s_m: the batch sum (or mean) of softmax(z_m)[y], detached, over every process's batch."""
        stats = {m: torch.softmax(z.detach().float(), dim=1).gather(1, label[:, None]).sum()
                 for m, z in unimodal.items()}
        stats["_count"] = torch.tensor(float(len(label)), device=label.device)
        stats = run.reduce(stats)
        count = float(stats.pop("_count"))
        return {m: float(v) / (count if self.score == "mean" else 1.0) for m, v in stats.items()}

    # ---- gradient stage ----
    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        if self.fisher_gradients == "loss":
            self.accumulate_fisher()
        for m, beta in self.betas.items():
            if beta == 0.0 or m not in self.anchor:
                continue
            for p, p0 in zip(self.params[m], self.anchor[m]):
                if p.grad is None:
                    p.grad = beta * (p.detach() - p0)
                else:
                    p.grad.add_(p.detach() - p0, alpha=beta)
        if self.fisher_gradients == "final":
            self.accumulate_fisher()

    def accumulate_fisher(self) -> None:
        """T_m += sum over encoder m's weights of mean(grad^2): the mean of the epoch's summed squares, step by step."""
        for m, params in self.fisher_params.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                self.fisher[m] += torch.stack([g.float().pow(2).mean() for g in grads]).sum()

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state["traces"] = {m: list(v) for m, v in self.traces.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.traces = {m: [float(t) for t in v] for m, v in state["traces"].items()}
