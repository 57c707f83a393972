"""CGGM: Classifier-guided Gradient Modulation (Guo, Jin, Chen, Zhao: "Classifier-guided Gradient Modulation for
Enhanced Multimodal Learning", NeurIPS 2024)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat
from mmbalance.errors import UserError
from mmbalance.methods.base import Method
from mmbalance.methods.gblending import fresh_optimizer
from mmbalance.models.fusion import fusion_choices, fusion_key

log = logging.getLogger("mmbalance")

#: the official guard added to the sum of the accuracy changes (zrguo/CGGM: `diff_sum = sum(diff) + 1e-8`)
EPS = 1e-8


def cggm_coefficients(acc: dict[str, float], prev_acc: dict[str, float], clamp: bool = False) -> dict[str, float]:
    """B_m = (S - Delta_m) / S with Delta_m = acc_m - prev_acc_m and S = sum_k Delta_k + 1e-8 (official).

    For two modalities B_1 = Delta_2 / S: the modality that improved less gets the larger factor. For M
    modalities sum_m B_m = M - 1 (up to the guard). S near 0 or negative makes B explode or change sign (a
    negative B reverses that encoder's gradient); `clamp` bounds every B_m to [0, 1], the range it has whenever
    all the changes share a sign (a deviation from the official code).
    """
    delta = {m: acc[m] - prev_acc.get(m, 0.0) for m in acc}
    s = sum(delta.values()) + EPS
    b = {m: (s - d) / s for m, d in delta.items()}
    return {m: min(1.0, max(0.0, v)) for m, v in b.items()} if clamp else b


def b_out_of_range(b: dict[str, float]) -> bool:
    """Whether the (unclamped) B of `cggm_coefficients` left [0, 1].

    That happens exactly when the accuracy changes have opposite signs: with changes of one sign every
    B_m = 1 - Delta_m / S lies in [0, 1]; with opposite signs the modality whose change has the sign opposite to S
    gets B_m > 1 (and, with two modalities, the other one B < 0, since they sum to 1). So the test is max B > 1:
    when every change is <= 0 the guard alone moves S a hair towards 0 and can give B_m = -4e-8, which is not a
    reversal worth reporting (a 1e-8-scale artefact of the official guard, not of the accuracies).
    """
    return max(b.values()) > 1.0


def direction_loss(b: dict[str, float], cosines: dict[str, Tensor]) -> Tensor:
    """L_gm = (sum_m |B_m| - sum_m B_m cos_m) / M (official `l_gm`); 0 when every cos_m = sign(B_m)."""
    m_count = len(b)
    return (sum(abs(v) for v in b.values()) - sum(b[m] * cosines[m] for m in b)) / m_count


class AuxClassifier(nn.Module):
    """A modality's lightweight classifier on its detached pooled feature: `layers` x (Linear(d, d) + ReLU), then
    `out_layer` = Linear(d, C), whose (C, d) weight has the shape of the fused head's block for that modality."""

    def __init__(self, dim: int, num_classes: int, layers: int = 2):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(layers)])
        self.out_layer = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.body(x))


class CGGM(Method):
    """CGGM (NeurIPS 2024), following the official code (zrguo/CGGM, `src/msatrain.py`, `src/foodtrain.py`) for
    classification with any number M >= 2 of modalities.

    Each step (t):
      1. forward; loss = CE(fused) + lam * L_gm, L_gm = `direction_loss`(B^(t-1), cos), cos_m = cosine between
         the flattened fused-head block W_m (C x d_m; concat/sum fusion) and the flattened weight of auxiliary
         classifier m's `out_layer` (detached), from the current parameters. Absent at the first step (no B yet).
      2. each auxiliary classifier f_m runs on the detached pooled feature h_m; acc_m^t = f_m's accuracy on this
         batch (before its update; correct counts summed over ranks) and B^(t) = `cggm_coefficients`(acc^t,
         acc^(t-1)) (acc^0 = 0, the previous *batch*, across epochs). This runs in `loss` too, so the B logged
         with a step is the one that scales it; the official code runs it after step 3's backward, which gives
         the same numbers (the classifiers' input is detached and they have not changed in between).
      3. backward; sum_m CE(f_m(h_m), y) is backpropagated into the classifiers only, and every gradient of
         encoder m is multiplied by rho * B_m^(t).
      4. the auxiliary optimizer steps (the run's optimizer type and settings, at `cls_lr`; averaged over ranks;
         trainer.grad_clip applies to it too), the model's gradients are clipped to `clip_norm`, and the trainer
         takes the main step.
    B is the official one and unbounded: when the accuracy changes have opposite signs (common, as batch
    accuracies are multiples of 1/batch) S is small or has the other sign, so B leaves [0, 1]: a negative B
    reverses that encoder's gradient, and with S = 0 + 1e-8 |B| reaches ~1e7 (then only the clip bounds the step,
    and lam * L_gm, which grows with |B|, dominates the loss). Each epoch logs the share of its steps whose B left
    [0, 1] (`cggm_B_out_of_range`, counted before `clamp_B`; the trainer's epoch mean, so steps weigh by their
    batch size) and, unless `clamp_B`, warns once at the epoch's end with the number of steps and the largest |B|.
    The auxiliary classifiers are discarded at inference (predictions and per-modality accuracies come from the
    fusion head, `eval_fuse`). Their forward and backward run inside the training step, so the trainer's measured
    training FLOPs include them (the optimiser arithmetic and the cosine count zero, as every elementwise op).

    Args:
        rho: the gradient-magnitude scale (official 1.3 on MOSI, IEMOCAP, Food-101; 1.0 on BraTS); strength knob.
        lam: weight of the direction term L_gm (official 0.2 MOSI/IEMOCAP, 0.05 Food-101, 0.1 BraTS); 0 = off,
            which also lets CGGM run with a fusion without per-modality linear blocks (film, gated).
        cls_lr: learning rate of the auxiliary classifiers (official 5e-4; 6e-3 on BraTS).
        cls_layers: hidden Linear+ReLU layers of each auxiliary classifier (official: 2 transformer layers over the
            token sequence; on pooled features a layer is a Linear+ReLU).
        clip_norm: the model's gradient norm is clipped to this after the modulation, every step, warm-up
            included (official 0.8: the official loop clips every step, also with `--modulation none`, so the clip
            belongs to its training recipe, not to the modulation); null = off (trainer.grad_clip still applies).
        clamp_B: bound every B_m to [0, 1] (default false = the official, unbounded B; see `cggm_coefficients`
            and `b_out_of_range`).
        warmup_epochs: epochs at the start without modulation (no L_gm, no scaling); the auxiliary classifiers,
            accuracies and B are still updated so the first modulated step has real values, and the clip to
            `clip_norm` still applies (see above), so a warm-up epoch equals plain training with
            trainer.grad_clip=clip_norm, not the baseline. 0 = official (the official code has no warm-up).

    Hooks used: `setup` (auxiliary classifiers via `register_module(optimize=False)` and their own optimiser),
    `loss` (fused CE + lam L_gm, the auxiliary forward, accuracies and B; L_gm logged as cggm_l_gm, this step's
    B as cggm_B_<modality>, whether it left [0, 1] as cggm_B_out_of_range), `on_after_backward` (the auxiliary
    backward and step, scaling, clip), `on_epoch_end` (the out-of-range warning). State for resume: the
    classifiers, their optimiser's state, the previous accuracies and B.
    Choices: the paper describes the direction term with the cosine between *gradients*; the official code (and
    the reference notes) use the two out-layers' *parameters*, which we follow: a gradient cosine would need
    second-order gradients to train anything. The official code keeps the previous step's L_gm graph (parameters
    of step t-1) and adds it at step t; we recompute the cosines from the current parameters with the previous
    step's B (the same term one optimizer step fresher, and a state that survives a checkpoint). Its gradient
    reaches only the fused head (official: the auxiliary out-layer's share is wiped by the next zero_grad; here
    it is detached). The official code compares one fused out-layer with every auxiliary one (same width); our
    fused head is linear per modality, so modality m's block is compared with classifier m's out-layer.
    `clamp_B` is off by default, as in the official code.
    """

    family = "optimization"
    regression_refusal = ("its balancing terms B come from the batch accuracy (the arg-max class against the label) "
                          "of auxiliary classifiers trained with cross-entropy; the official code's MOSI variant "
                          "(one-output auxiliary heads trained with L1, scored by the sign of the prediction) is not "
                          "implemented")

    def __init__(
        self,
        rho: NonNegativeFloat = 1.3,
        lam: NonNegativeFloat = 0.2,
        cls_lr: PositiveFloat = 5e-4,
        cls_layers: NonNegativeInt = 2,
        clip_norm: PositiveFloat | None = 0.8,
        clamp_B: bool = False,
        warmup_epochs: NonNegativeInt = 0,
    ):
        self.rho = rho
        self.lam = lam
        self.cls_lr = cls_lr
        self.cls_layers = cls_layers
        self.clip_norm = clip_norm
        self.clamp_B = clamp_B
        self.warmup_epochs = warmup_epochs
        self.prev_acc: dict[str, float] = {}
        self.B: dict[str, float] | None = None  # this step's (set in `loss`): scales it, drives the next L_gm
        # this epoch's count of steps whose B left [0, 1]: {"epoch", "steps", "out", "max_abs"} (not saved: a
        # resume starts at an epoch boundary)
        self.tally: dict[str, float] | None = None
        self.last_acc: dict[str, float] = {}
        self.classifiers: nn.ModuleDict | None = None
        self.cls_loss: Tensor | None = None  # the auxiliary classifiers' loss, from `loss` to `on_after_backward`
        self.cls_optimizer: torch.optim.Optimizer | None = None

    def setup(self, run):
        super().setup(run)
        model = run.model
        mods = model.modalities
        if self.lam > 0 and not model.fusion.has_linear_blocks:
            raise UserError(
                f"method cggm's direction term (method.lam={self.lam}) compares each modality's block of the fusion "
                f"head with its auxiliary classifier, which backbone.fusion={fusion_key(model.fusion)} does not "
                f"have; use backbone.fusion={fusion_choices('has_linear_blocks')} or method.lam=0")
        dims = model.fusion.dims
        classifiers = nn.ModuleDict({m: AuxClassifier(dims[m], run.num_classes, self.cls_layers) for m in mods})
        self.classifiers = self.register_module(run, "classifiers", classifiers, optimize=False)
        self.cls_optimizer = fresh_optimizer(run.optimizer, list(self.classifiers.parameters()), self.cls_lr)
        self.params = model.modality_parameters()
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and self.warmup_epochs >= epochs:
            log.warning("cggm: method.warmup_epochs=%d >= trainer.epochs=%d, so no step is modulated (this run is "
                        "plain training with the gradient clip to method.clip_norm, plus the auxiliary "
                        "classifiers)", self.warmup_epochs, epochs)

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    # ---- loss stage ----
    def loss(self, run, batch, out):
        losses = {"loss": F.cross_entropy(out.logits, batch.label)}
        if self.lam > 0 and self.B is not None and self.active(run.epoch):
            fusion = run.model.fusion
            cosines = {m: F.cosine_similarity(fusion.weight_block(m).float().flatten(),
                                              self.classifiers[m].out_layer.weight.detach().float().flatten(), dim=0)
                       for m in self.B}
            l_gm = direction_loss(self.B, cosines)  # the previous step's B (official)
            losses["loss"] = losses["loss"] + self.lam * l_gm
            losses["cggm_l_gm"] = l_gm.detach()
        # This step's B, from the auxiliary classifiers' accuracy on this batch before their update (which
        # `on_after_backward` makes, as the official code does after the main backward; their input is detached,
        # so measuring it here changes nothing). Measured here, the B logged with the step is the one that scales
        # its gradients, and the out-of-range count covers exactly the epoch's steps.
        acc = self.classifier_forward(run, batch, out)
        raw = cggm_coefficients(acc, self.prev_acc)
        b = cggm_coefficients(acc, self.prev_acc, clamp=True) if self.clamp_B else raw
        self.prev_acc, self.last_acc, self.B = acc, acc, b
        dev = out.logits.device
        for m, v in b.items():
            losses[f"cggm_B_{m}"] = torch.tensor(v, device=dev)
        outside = b_out_of_range(raw)  # before the clamp: with clamp_B, how often it acted
        # its epoch mean is the share of the epoch's steps whose B left [0, 1]; the count goes to the warning
        losses["cggm_B_out_of_range"] = torch.tensor(float(outside), device=dev)
        self.count_out_of_range(run.epoch, outside, max(abs(v) for v in raw.values()))
        return losses

    def count_out_of_range(self, epoch: int, outside: bool, max_abs: float) -> None:
        if self.tally is None or self.tally["epoch"] != epoch:  # a new epoch (or steps driven by hand)
            self.tally = {"epoch": epoch, "steps": 0, "out": 0, "max_abs": 0.0}
        self.tally["steps"] += 1
        if outside:
            self.tally["out"] += 1
            self.tally["max_abs"] = max(self.tally["max_abs"], max_abs)

    def classifier_forward(self, run, batch, out) -> dict[str, float]:
        """Run the auxiliary classifiers on the detached features, keep their loss for `classifier_step`, and
        return their batch accuracies (correct counts summed over ranks)."""
        label = batch.label
        with torch.enable_grad():
            with run.autocast():
                logits = {m: self.classifiers[m](out.features[m].detach()) for m in self.classifiers}
            self.cls_loss = sum(F.cross_entropy(z.float(), label) for z in logits.values())
        stats = torch.stack([(z.detach().argmax(1) == label).sum().float() for z in logits.values()]
                            + [label.new_tensor(label.shape[0]).float()])
        stats = run.reduce({"cggm": stats})["cggm"].double().cpu()
        n = float(stats[-1])
        return {m: float(stats[i]) / n for i, m in enumerate(logits)}

    # ---- gradient stage ----
    def classifier_step(self, run) -> None:
        """Train the auxiliary classifiers one step on the loss `classifier_forward` kept."""
        run.zero_grad(self.cls_optimizer)
        cls_loss, self.cls_loss = self.cls_loss, None
        cls_loss.backward()
        run.optimizer_step(self.cls_optimizer, params=self.classifiers.parameters())

    def on_after_backward(self, run, batch, out):
        self.classifier_step(run)
        b = self.B
        with torch.no_grad():
            if self.active(run.epoch):
                for m, params in self.params.items():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(self.rho * b[m])
            # outside the `active` check on purpose: the official loop clips every step, with or without
            # modulation, so warm-up epochs are clipped too (see `warmup_epochs`)
            if self.clip_norm is not None:
                run.sync_gradients()  # hardware=ddp: clip the whole batch's gradient, identically on every rank
                nn.utils.clip_grad_norm_(run.model.parameters(), self.clip_norm)

    def on_epoch_end(self, run, epoch):
        tally, self.tally = self.tally, None
        if tally is None or tally["epoch"] != epoch or not tally["out"] or self.clamp_B or not self.active(epoch):
            return
        clip = (f"before the clip to method.clip_norm={self.clip_norm}" if self.clip_norm is not None
                else "unclipped (method.clip_norm=null)")
        log.warning(
            "cggm epoch %d: B left [0, 1] in %d of %d steps (largest |B| %.3g): the auxiliary classifiers' "
            "accuracy changes had opposite signs, so S = their sum + 1e-8 was near 0 or of the other sign. A "
            "negative B reverses that encoder's gradient and a B above 1 multiplies it by rho*B, %s, and lam*L_gm "
            "grows with |B|. This is the official, unbounded B; method.clamp_B=true bounds B to [0, 1] (a "
            "deviation from the official code)", epoch, tally["out"], tally["steps"], tally["max_abs"], clip)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state.update(prev_acc=dict(self.prev_acc), B=None if self.B is None else dict(self.B),
                     cls_optimizer=self.cls_optimizer.state_dict() if self.cls_optimizer is not None else None)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.prev_acc = dict(state["prev_acc"])
        self.B = None if state["B"] is None else dict(state["B"])
        if state.get("cls_optimizer") is not None and self.cls_optimizer is not None:
            self.cls_optimizer.load_state_dict(state["cls_optimizer"])
