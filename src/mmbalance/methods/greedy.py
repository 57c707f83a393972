"""Greedy: conditional learning speed and re-balancing steps through MMTM gates (Wu et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from mmbalance.errors import UserError
from mmbalance.methods.base import Method
from mmbalance.models.greedy import GreedyModel
from mmbalance.models.multimodal import MultimodalModel


class MMTM(nn.Module):
    """Multimodal transfer module between two stage outputs (Joze et al., CVPR 2020), as Greedy uses it.

    squeeze_m = per-sample channel means of map m (over time, height and width; frames folded into the batch
    are unfolded first), s = [squeeze_0; squeeze_1] -> Linear(D, int(2D / ratio)) -> ReLU = e, gate_m =
    sigmoid(excite[m](e)), output_m = map_m * gate_m per channel. D = c_0 + c_1.

    `running_gate_m` is the mean of gate_m over every sample of the training forwards so far (a buffer, saved
    with the model): a training forward keeps its live gates in `last_gates`, and `update_running` (called by
    the method after the backward, with the run's cross-process reduction) folds them in. With `frozen=m`
    modality m's gate is replaced by that running average (broadcast over the batch, no gradient); the other
    keeps its live gate. The forward itself changes no state.
    """

    def __init__(self, channels: tuple[int, int], ratio: float = 4.0):
        super().__init__()
        c0, c1 = (int(c) for c in channels)
        hidden = int(2 * (c0 + c1) / ratio)
        if hidden < 1:
            raise UserError(f"method.ratio={ratio} leaves no hidden units for an MMTM block of {c0}+{c1} channels")
        self.squeeze = nn.Linear(c0 + c1, hidden)
        self.excite = nn.ModuleList([nn.Linear(hidden, c0), nn.Linear(hidden, c1)])
        self.register_buffer("running_gate_0", torch.zeros(c0))
        self.register_buffer("running_gate_1", torch.zeros(c1))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.last_gates: list[Tensor] | None = None

    def gates(self, maps: tuple[Tensor, Tensor], batch_size: int) -> list[Tensor]:
        """The live (B, c_m) gates of both modalities."""
        squeezed = [x.reshape(batch_size, -1, x.shape[1], x.shape[2] * x.shape[3]).mean(dim=(1, 3)) for x in maps]
        e = F.relu(self.squeeze(torch.cat(squeezed, dim=1)))
        return [torch.sigmoid(fc(e)) for fc in self.excite]

    @torch.no_grad()
    def update_running(self, reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda s: s) -> None:
        """Fold the last training forward's gates into the running averages (each modality its own gate)."""
        if self.last_gates is None:
            return
        g0, g1 = self.last_gates
        self.last_gates = None
        flat = torch.cat([g0.float().sum(0), g1.float().sum(0), g0.new_full((1,), g0.shape[0], dtype=torch.float)])
        flat = reduce({"gates": flat})["gates"]
        c0 = self.running_gate_0.numel()
        n_old = self.updates.float()
        means = (flat[:c0] / flat[-1], flat[c0:-1] / flat[-1])
        for buf, mean in zip((self.running_gate_0, self.running_gate_1), means):
            buf.copy_((mean + buf * n_old) / (n_old + 1))  # official bug fixed: modality 1 averages its own gate
        self.updates += 1

    def forward(self, x0: Tensor, x1: Tensor, batch_size: int, frozen: int | None = None) -> tuple[Tensor, Tensor]:
        gates = self.gates((x0, x1), batch_size)
        if self.training:
            self.last_gates = [g.detach() for g in gates]
        if frozen is not None:
            running = (self.running_gate_0, self.running_gate_1)[frozen]
            gates[frozen] = running.to(gates[frozen].dtype).expand(batch_size, -1)
        return tuple(_scale(x, g, batch_size) for x, g in zip((x0, x1), gates))


def _scale(x: Tensor, gate: Tensor, batch_size: int) -> Tensor:
    """x (N, C, H, W) with N = B*T, times the (B, C) gate of its sample on every frame."""
    n, c, h, w = x.shape
    return (x.view(batch_size, n // batch_size, c, h, w) * gate[:, None, :, None, None]).view(n, c, h, w)


def learning_speed_ratio(params: list[nn.Parameter]) -> Tensor:
    """sum_p ||grad p||^2 / sum_p ||p||^2 over a parameter set (a missing gradient counts as zero), detached."""
    weights = torch._foreach_norm([p.detach() for p in params])
    grads = [p.grad.detach() for p in params if p.grad is not None]
    w = torch.stack(weights).float().pow(2).sum()
    g = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else w.new_zeros(())
    return g / w.clamp_min(torch.finfo(torch.float32).tiny)


def bdr_difference(acc: dict[str, list[float]]) -> float:
    """d = BDR_0 - BDR_1 with BDR_m = log10(A_bypass_m / A_main_m) from the cumulative accumulators."""
    byp, main = acc["bypass"], acc["main"]
    if min(byp + main) <= 0:  # nothing accumulated yet (or all gradients zero): no direction
        return 0.0
    return math.log10(byp[0] / main[0]) - math.log10(byp[1] / main[1])


class Greedy(Method):
    """Greedy (Wu, Jastrzebski, Cho, Geras: "Characterizing and Overcoming the Greedy Nature of Learning in
    Multi-modal Deep Neural Networks", ICML 2022), from the official code (nyukat/greedy_multimodal_learning).

    Model (`setup`): the run's model is replaced by a `GreedyModel` that runs the two encoders stage by stage
    with an `MMTM` block after each stage from `mmtm_from_stage` on (official: after ResNet-18's layer2, layer3
    and layer4, i.e. stages 1-3 of [stem+layer1, layer2, layer3, layer4]; the peer puts one after every stage,
    `mmtm_from_stage=0`). The blocks are adopted with `register_module` (optimised and saved with the method;
    they are also submodules of `run.model`, so clipping, train/eval mode and checkpoints see them).
    Both encoders must expose stages (SmallCNN, ResNet18Encoder) with the same count; frames inputs are folded
    into the batch, each MMTM squeezes over time too and gates every frame of a sample alike.

    Loss (`loss`): "unimodal" (official) = sum_m CE(o_m, y) over the fusion head's per-modality logits (with
    concat fusion o_m = W_m z_m + b/2 and the prediction is the fused logits = o_0 + o_1, the official
    (f_0 + f_1)/2 up to scale; `backbone.fusion=sum` gives each branch its own full head as officially);
    "fused" = CE on the fused logits (the peer).

    Conditional learning speed (`on_after_backward`, before clipping and the step): per step, for modality m,
    r_bypass_m = sum ||g||^2 / sum ||w||^2 over the MMTM parameters into branch m (`excite[m]` of every block
    plus the shared `squeeze`, which counts for both) and r_main_m = the same over encoder m. Accumulated
    cumulatively from the start (A_bypass_m += r_bypass_m, A_main_m += r_main_m); BDR_m = log10(A_bypass_m /
    A_main_m); d = BDR_0 - BDR_1 (modality order = the model's). Gradients are already identical across
    processes, so no reduction is needed.

    Switch rule: in epochs before `unlock_epoch` (0-based; official starting_epoch=2 is 1-based, so 1) the
    accumulators are updated and training stays normal. Afterwards, when not curating: update, and if |d| >
    `epsilon` start a curation window with caring modality 0 if d > 0 else 1. While curating nothing is
    accumulated; each step's backward counts one, and after `window` of them curation ends. So the `window`
    forwards after the deciding step run with the caring modality's MMTM gates frozen to their running average.

    Choices: the official code updates modality 1's running average from modality 0's gate (and sizes it with
    modality 0's channels) -- fixed, each modality averages its own gate. The official code also updates the
    running averages on evaluation forwards and applies curation whenever the flag is set; here only training
    forwards count (evaluation, including the Shapley metric's masked passes, changes no state) and evaluation
    always uses live gates. A training forward's gates are folded in after its backward (the official folds
    them in before gating), so a frozen gate is the average over the steps before the current one. The main
    set is the encoder only (officially each branch's own fc head is part of its branch; here the head is
    shared). ε = 0.01, window 5 (official; the peer: 0.001, no lock, fused CE); with that ε, once unlocked
    nearly every window is followed by another after one deciding step (about 5/6 of steps curated). The
    official random variant and SE-only/shared-weight MMTM options are not implemented. Shapley and
    per-modality masking fall back to one masked forward per coalition (intermediate fusion).

    Cost: the MMTM blocks' FLOPs in every forward and backward (counted by the trainer); curation steps cost
    about the same as normal ones (the frozen gates are still computed, to update the running average; the
    frozen excite layer's backward and the norms are skipped), so the first step of each epoch represents
    it. The norms are a few fused `_foreach_norm` calls and one host sync per step.

    Hooks used: `setup`, `forward` (passes the curation state to the model), `loss`, `on_after_backward`.
    Two modalities only.
    """

    family = "feed-forward"
    regression_refusal = ("its curation rule reads gradients, not probabilities, but its losses are "
                          "cross-entropy and it runs only on two modalities with staged CNN encoders, which no "
                          "regression dataset here has, so a regression version could not be tested")
    max_modalities = 2

    def __init__(
        self,
        epsilon: NonNegativeFloat = 0.01,
        window: PositiveInt = 5,
        unlock_epoch: NonNegativeInt = 1,
        ratio: PositiveFloat = 4.0,
        mmtm_from_stage: NonNegativeInt = 1,
        loss: Literal["unimodal", "fused"] = "unimodal",
    ):
        self.epsilon = float(epsilon)
        self.window = int(window)
        self.unlock_epoch = int(unlock_epoch)
        self.ratio = float(ratio)
        self.mmtm_from_stage = int(mmtm_from_stage)
        self.loss_kind = loss
        self.needs_unimodal_logits = loss == "unimodal"
        self.unimodal_logits_option = ("method.loss=unimodal", "method.loss=fused (the peer's variant)")
        self.acc = {"bypass": [0.0, 0.0], "main": [0.0, 0.0]}
        self.curating = False
        self.caring: int | None = None
        self.curation_step = 0
        self.last_d = 0.0

    # ---- model ----
    def setup(self, run):
        super().setup(run)
        model = run.model
        if len(model.modalities) != 2:
            raise UserError(f"method greedy needs exactly 2 modalities, got {model.modalities}")
        if not isinstance(model, MultimodalModel):
            raise UserError(f"method greedy wraps a MultimodalModel, got {type(model).__name__}")
        for m in model.modalities:
            enc = model.encoders[m]
            if not all(hasattr(enc, a) for a in ("stages", "stage_input", "pool_head", "stage_channels")):
                raise UserError(
                    f"method greedy puts MMTM blocks between encoder stages, but the {m!r} encoder "
                    f"({type(enc).__name__}) exposes no stages; use SmallCNN or ResNet18Encoder for both "
                    f"modalities (image, spectrogram or frames inputs)"
                )
        channels = [model.encoders[m].stage_channels() for m in model.modalities]
        if len(channels[0]) != len(channels[1]):
            raise UserError(
                f"method greedy pairs the encoders' stages one to one, but {model.modalities[0]!r} has "
                f"{len(channels[0])} stages and {model.modalities[1]!r} {len(channels[1])}; give both encoders "
                f"the same depth"
            )
        after = list(range(self.mmtm_from_stage, len(channels[0])))
        if not after:
            raise UserError(
                f"method.mmtm_from_stage={self.mmtm_from_stage} leaves no MMTM block: the encoders have "
                f"{len(channels[0])} stages (0-based)"
            )
        blocks = nn.ModuleList([MMTM((channels[0][i], channels[1][i]), self.ratio) for i in after])
        self.register_module(run, "mmtm", blocks)
        wrapped = GreedyModel(model, blocks, after).to(run.device)
        wrapped.train(model.training)
        run.model = wrapped
        self._sync_model(run)

    def _sync_model(self, run) -> None:
        run.model.frozen = self.caring if self.curating else None

    # ---- forward stage ----
    def forward(self, run, batch):
        self._sync_model(run)  # the curation state decided after the last backward (or restored on resume)
        return run.model(batch.inputs)

    def bypass_and_main(self, model: GreedyModel) -> tuple[list[list[nn.Parameter]], list[list[nn.Parameter]]]:
        """Per modality index: its MMTM parameters (excite[m] of each block + the shared squeeze), its encoder's."""
        shared = [p for b in model.mmtm for p in b.squeeze.parameters()]
        bypass = [[p for b in model.mmtm for p in b.excite[i].parameters()] + shared for i in range(2)]
        main = [list(model.encoders[m].parameters()) for m in model.modalities]
        return bypass, main

    # ---- loss ----
    def loss(self, run, batch, out):
        # logged (epoch means): the share of curated steps, which modality's gates were frozen, d so far
        ref = out.logits.new_zeros(())
        log = {"greedy/curated": ref + float(self.curating), "greedy/d": ref + self.last_d,
               **{f"greedy/frozen/{m}": ref + float(self.curating and self.caring == i)
                  for i, m in enumerate(run.model.modalities)}}
        if self.loss_kind == "fused":
            return {"loss": F.cross_entropy(out.logits, batch.label), **log}
        per = {f"ce/{m}": F.cross_entropy(o, batch.label) for m, o in out.unimodal.items()}
        return {"loss": sum(per.values()), **per, **log}

    # ---- gradient stage ----
    def accumulate(self, bypass_ratios: list[float], main_ratios: list[float]) -> float:
        """Add one step's ratios to the accumulators; return d = BDR_0 - BDR_1."""
        for i in range(2):
            self.acc["bypass"][i] += bypass_ratios[i]
            self.acc["main"][i] += main_ratios[i]
        self.last_d = bdr_difference(self.acc)
        return self.last_d

    def advance(self, unlocked: bool, ratios: Callable[[], tuple[list[float], list[float]]]) -> None:
        """The switch rule after one backward; `ratios()` measures the step's (bypass, main) ratios."""
        if self.curating:
            self.curation_step += 1
            if self.curation_step >= self.window:
                self.curating, self.caring = False, None
            return
        d = self.accumulate(*ratios())
        if unlocked and abs(d) > self.epsilon:
            self.curating, self.caring, self.curation_step = True, (0 if d > 0 else 1), 0

    @torch.no_grad()
    def on_after_backward(self, run, batch, out):
        # hardware=ddp: the ratios are of the gradient of the whole (all ranks') batch, so every rank takes the
        # same curation decision (the trainer's own averaging after this hook then finds them equal already)
        run.sync_gradients()
        bypass, main = self.bypass_and_main(run.model)

        def ratios():
            values = torch.stack([learning_speed_ratio(ps) for ps in bypass + main]).tolist()  # one sync
            return values[:2], values[2:]

        self.advance(run.epoch >= self.unlock_epoch, ratios)
        for block in run.model.mmtm:
            block.update_running(run.reduce)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state.update(acc={k: list(v) for k, v in self.acc.items()}, curating=self.curating, caring=self.caring,
                     curation_step=self.curation_step, last_d=self.last_d)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.acc = {k: list(v) for k, v in state["acc"].items()}
        self.curating, self.caring = state["curating"], state["caring"]
        self.curation_step, self.last_d = state["curation_step"], state["last_d"]
