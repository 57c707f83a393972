"""The method (strategy) interface: no-op hooks at the data, forward, loss and gradient stages.

A method overrides only what its paper changes. The trainer calls, per epoch:

    on_epoch_start(run, epoch)                         data stage (may rebuild run.train_loader)
    for batch: training_step(run, batch)               the template below; MLA/ReconBoost take it over
        forward -> loss -> run.zero_grad -> backward -> on_after_backward -> run.optimizer_step (sync, clip, step)
    on_epoch_end(run, epoch)

and `eval_fuse(run, features)` whenever it predicts (validation, test, the Shapley metric). Before the first epoch
`setup(run)` runs once; a method that holds out part of the training split does that in `hold_out(run)`, which
`setup` runs first (and a hybrid runs for every part before any part's `setup`).

Modalities: a method declares the fewest (`min_modalities`: two for a method that balances modalities, one for the
reference family) and the most (`max_modalities`) it trains on; `check_modalities` refuses the others before the
model is built.

Tasks: a method declares the dataset tasks it trains (`tasks`); the run calls `set_task` before it builds the
model, and a method refuses a task it does not declare, saying why (`regression_refusal`). Losses go through
`task_loss`: cross-entropy of class logits, or for `dataset.task=regression` the L1/MSE of the head's one output
against the float score.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.constraints import checked_arguments
from mmbalance.data.batch import Batch
from mmbalance.errors import ConfigError, UserError
from mmbalance.metrics.regression import LOSS_KEYS, regression_loss, resolve_loss
from mmbalance.models.fusion import fusion_choices, fusion_key
from mmbalance.models.multimodal import Output

if TYPE_CHECKING:  # the run context lives in the engine; methods only read it
    from mmbalance.engine.run import Run


# The BalanceBenchmark taxonomy: the stage a method acts at, in the order the registry and reports list them;
# "hybrid" after it: `compose`, registered methods combined (a built hybrid records its parts' families).
FAMILIES = ("reference", "data", "feed-forward", "objective", "optimization", "hybrid")
# The families that balance nothing (baseline, unimodal): the only ones that train on a single modality
UNBALANCED_FAMILIES = ("reference",)
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five")


def registry_key(cls: type) -> str | None:
    """The registry key of a method class: the module name of the nearest class in its MRO that declares its own
    `family` (methods/<key>.py, conf/method/<key>.yaml); None for a class that declares none."""
    for c in cls.__mro__:
        if "family" in vars(c) and c is not Method:
            return c.__module__.rpartition(".")[2]
    return None


class Method:
    """Base: plain joint training with the fused cross-entropy, or the regression loss (exactly `baseline`)."""

    #: one of FAMILIES. Declaring it in the class body is what registers a class of methods/<key>.py as method <key>
    family: str = "unregistered"
    #: most modalities this method supports (None = any); the run refuses more with a clear error
    max_modalities: int | None = None
    #: fewest modalities this method trains on; the run refuses fewer with a clear error. A method that balances
    #: modalities has nothing to balance on one: it would train as a baseline with its own noise, held-out data or
    #: extra heads on top, silently. So a class that declares a family gets 2, the reference family (nothing to
    #: balance) 1, unless it declares its own (`__init_subclass__`); Method itself is exactly baseline
    min_modalities: int = 1
    #: whether the method needs per-modality logits from the fusion head (concat/sum fusion)
    needs_unimodal_logits: bool = False
    # (the option value that makes the method need them, the value that does not): a method that needs them only
    # under one of its options names both when a fusion without per-modality logits refuses it
    unimodal_logits_option: tuple[str, str] | None = None
    #: True when `setup` adds its own FLOPs to `run.flops` (e.g. UMT's teacher training, counted like the trainer
    #: counts steps); otherwise the trainer measures all of `setup`, which slows long setups under the counter
    counts_own_setup_flops: bool = False
    #: the dataset tasks (`dataset.task`) the method trains; `set_task` refuses the others before training
    tasks: tuple[str, ...] = ("classification",)
    #: why a classification-only method refuses dataset.task=regression, completing "method X does not support
    #: dataset.task=regression: ..." (what it needs class probabilities or class labels for). None: the general
    #: reason, which names the registered methods that do train regression (`regression_advice`)
    regression_refusal: str | None = None
    #: set by `set_task`: the run's task and its training loss (cross_entropy | l1 | mse)
    task: str = "classification"
    loss_name: str = "cross_entropy"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__ and cls.family not in FAMILIES:  # at import: the method's own run sees it too
            raise TypeError(f"{cls.__module__}.{cls.__name__}.family = {cls.family!r}; expected one of {FAMILIES}")
        # A method's options are declared once, in its constructor's signature (types, `Range`s, `Literal`
        # choices): config validation checks them before a run, and this makes the constructor check them too,
        # so a method built from Python refuses what the command line refuses, with the same message.
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_arguments(cls.__init__, "method.")
        # One rule for every method, present and future: declaring a family is declaring a balancing method (two
        # modalities at least) unless the family balances nothing; a hybrid takes its parts' (methods/compose.py)
        if "family" in cls.__dict__ and "min_modalities" not in cls.__dict__:
            cls.min_modalities = 1 if cls.family in UNBALANCED_FAMILIES else 2

    # ---- before the model exists ----
    def set_task(self, task: str, loss: str = "auto") -> None:
        """Train `task` with `loss` (`dataset.task`, `dataset.loss`); a UserError when the method does not
        declare the task. The run calls it once, before it builds the model."""
        loss = resolve_loss(task, loss)
        if task not in self.tasks:
            if task == "regression" and self.regression_refusal is None:
                raise UserError(f"method {self.name} does not support dataset.task=regression: it is declared for "
                                f"{', '.join(self.tasks)} only (a balancing rule may read class probabilities or "
                                f"labels, which a regression score lacks). {regression_advice()}")
            why = self.regression_refusal if task == "regression" else f"it trains only {', '.join(self.tasks)}"
            raise UserError(f"method {self.name} does not support dataset.task={task}: {why}. method=baseline "
                            f"supports every task")
        self.task, self.loss_name = task, loss

    @property
    def loss_key(self) -> str:
        """The prefix of per-head loss names in the log: "ce", "l1" or "mse"."""
        return LOSS_KEYS[self.loss_name]

    def task_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The supervised loss of one head's output: cross-entropy of (B, C) logits against class labels, or,
        for dataset.task=regression, the L1 or MSE of the (B, 1) output against the float scores."""
        if self.task == "regression":
            return regression_loss(self.loss_name, output, target)
        return F.cross_entropy(output, target)

    def select_modalities(self, available: list[str]) -> list[str]:
        """Which of the dataset's modalities the model is built from (unimodal training keeps one)."""
        return list(available)

    def check_modalities(self, modalities: list[str]) -> None:
        if self.max_modalities is not None and len(modalities) > self.max_modalities:
            raise UserError(
                f"method {self.name} supports at most {self.max_modalities} modalities, but the dataset gives "
                f"{len(modalities)} ({', '.join(modalities)}); choose a dataset with fewer modalities"
            )
        if len(modalities) < self.min_modalities:
            need = self.min_modalities
            advice = ("with one modality there is nothing to balance: train it with method=baseline, or choose a "
                      "dataset with more modalities" if len(modalities) <= 1 else
                      "choose a dataset with more modalities")
            raise UserError(
                f"method {self.name} balances modalities against each other, so it needs at least "
                f"{_COUNT_WORDS[need] if need < len(_COUNT_WORDS) else need}, but the run has {len(modalities)} "
                f"({', '.join(modalities) or 'none'}); {advice}"
            )

    @property
    def name(self) -> str:
        """The registry key (= the config name), or the class name of a method outside the registry."""
        return registry_key(type(self)) or type(self).__name__

    # ---- once ----
    def hold_out(self, run: Run) -> None:
        """Data stage, once, before any `setup`: a method that trains without part of the training split (data it
        holds out to measure generalisation) removes that part here, rebuilding `run.train_loader` on the rest.

        It is a hook of its own, not part of `setup`, because other methods read the training set in their
        `setup` (valuation keeps it to re-sample every epoch, UMT trains its teachers on it, PMR draws its first
        prototypes from it): a hybrid runs every part's `hold_out` before any part's `setup`, so no part sees
        another part's held-out samples, whatever the order of the parts. Not called directly: `setup` (and a
        hybrid) run it through `hold_out_once`."""

    def hold_out_once(self, run: Run) -> None:
        """`hold_out`, the first time it is asked for: by `setup`, and before that by a hybrid holding this part."""
        if not self.__dict__.get("_held_out", False):
            self._held_out = True
            self.hold_out(run)

    def setup(self, run: Run) -> None:
        self.hold_out_once(run)  # a no-op when a hybrid ran it before every part's setup
        if self.needs_unimodal_logits and not run.model.fusion.has_unimodal_logits:
            chosen, other = self.unimodal_logits_option or ("", "")
            raise UserError(
                f"method {self.name} needs per-modality logits" + (f" ({chosen})" if chosen else "") + ", which "
                f"backbone.fusion={fusion_key(run.model.fusion)} does not define; use backbone.fusion="
                f"{fusion_choices('has_unimodal_logits')}" + (f", or {other}" if other else "")
            )

    # ---- data stage ----
    def on_epoch_start(self, run: Run, epoch: int) -> None:
        pass

    # ---- forward stage ----
    def forward(self, run: Run, batch: Batch) -> Output:
        return run.model(batch.inputs)

    # ---- loss stage ----
    def loss(self, run: Run, batch: Batch, out: Output) -> dict[str, Tensor]:
        """"loss" is what is minimised; every other key is logged (epoch means in history.csv)."""
        return {"loss": self.task_loss(out.logits, batch.label)}

    # ---- gradient stage ----
    def backward(self, run: Run, losses: dict[str, Tensor]) -> None:
        losses["loss"].backward()

    def on_after_backward(self, run: Run, batch: Batch, out: Output) -> None:
        """Edit `.grad` in place here (OGM-GE, AGM, Greedy) before clipping and the optimizer step."""

    # ---- the step template ----
    def training_step(self, run: Run, batch: Batch) -> dict[str, Tensor]:
        with run.autocast():
            out = self.forward(run, batch)
            losses = self.loss(run, batch, out)
        run.zero_grad()
        self.backward(run, losses)
        self.on_after_backward(run, batch, out)
        run.optimizer_step()  # average over ranks (hardware=ddp), clip, step: a takeover ends its updates so too
        return {k: v.detach() for k, v in losses.items()}

    # ---- prediction ----
    def eval_fuse(self, run: Run, features: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Fused and per-modality logits from pooled features, at evaluation.

        It takes features rather than a batch so the Shapley metric can reuse one encoder pass for all
        2^M coalitions. Methods that predict differently (MMCosine, MLA's fusion) override it.
        """
        model = run.model
        unimodal = model.unimodal_logits(features) if model.fusion.has_unimodal_logits else None
        return model.fuse(features), unimodal

    def on_epoch_end(self, run: Run, epoch: int) -> None:
        pass

    # ---- method-owned trainable parts (extra heads, learnable weights) ----
    def register_module(self, run: Run, name: str, module: nn.Module, optimize: bool = True) -> nn.Module:
        """Adopt a trainable module the method owns: moved to the run's device, added to `run.optimizer` as
        its own parameter group (unless `optimize=False`), and saved/restored with the method's state.

        Call it from `setup` (which runs before a resume restores the optimizer, so the groups match).
        """
        module = module.to(run.device)
        self.__dict__.setdefault("_owned", {})[name] = module
        if optimize:
            run.optimizer.add_param_group({"params": list(module.parameters())})
        return module

    def owned_modules(self) -> dict[str, nn.Module]:
        return dict(self.__dict__.get("_owned", {}))

    # ---- resume ----
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume. Subclasses extend the dict returned by super().state_dict()."""
        return {"modules": {k: m.state_dict() for k, m in self.owned_modules().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module_state in state.get("modules", {}).items():
            owned = self.owned_modules()
            if name in owned:
                owned[name].load_state_dict(module_state)


# the method registry (mmbalance.methods.registered_methods), handed over by mmbalance.methods as it is imported,
# which is always before this module is used: importing it here would be an import cycle
registry: Callable[[], dict[str, type[Method]]] | None = None


def regression_advice() -> str:
    """What to use instead for dataset.task=regression: the registered methods whose `tasks` include it."""
    methods = registry() if registry is not None else {}
    names = [f"{key} (when every part does)" if cls.family == "hybrid" else key
             for key, cls in methods.items() if "regression" in cls.tasks]
    return f"Use a method that trains it: {', '.join(names)}"


def refuse_inactive_options(cls: type, given: dict[str, Any], switch: str, value: str, active: str) -> None:
    """A ConfigError when options that act only with `method.<switch>=<active>` are set away from their defaults
    while `method.<switch>=<value>`: the run would ignore them, and runs that differ only in them (a sweep over
    method.alpha_lr with the scheduled LFM, say) would be one result recorded under several settings. `given`:
    the options that act only then, with the values the method was built with."""
    if value == active:
        return
    defaults = inspect.signature(cls.__init__).parameters
    changed = [f"method.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in given.items()
               if v != defaults[k].default]
    if changed:
        raise ConfigError([f"{', '.join(changed)}: only used with method.{switch}={active}, and this run has "
                           f"method.{switch}={value}, which would ignore {'them' if len(changed) > 1 else 'it'}; set "
                           f"method.{switch}={active}, or leave {'them' if len(changed) > 1 else 'it'} at the default"])


def refuse_empty_window(starts: int, ends: int | None, open_end: bool = False) -> None:
    """A ConfigError, naming both options, when the 0-based inclusive epoch window `method.modulation_starts` ..
    `method.modulation_ends` is empty (starts > ends): the run would silently never modulate. `open_end`: the
    method takes modulation_ends=null for a window without an end (MLGM), which the message offers."""
    if ends is not None and starts > ends:
        raise ConfigError([f"method.modulation_starts={starts} is after method.modulation_ends={ends}: the "
                           f"modulation window (0-based epochs, both inclusive) would be empty; use modulation_starts "
                           f"<= modulation_ends" + (", or modulation_ends=null for no end" if open_end else "")])


def true_class_scores(logits: dict[str, Tensor], label: Tensor) -> dict[str, Tensor]:
    """s_m = sum_i softmax(o_m)_i[y_i], the per-modality confidence of OGM/PMR/OPM (a batch sum, detached)."""
    return {
        m: torch.softmax(o.detach().float(), dim=1).gather(1, label[:, None]).sum() for m, o in logits.items()
    }
