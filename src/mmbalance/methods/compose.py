"""Hybrid strategies: registered methods composed into one (`method=compose method.parts=[ogm_ge,mbsd]`)."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mmbalance.errors import ConfigError, UserError
from mmbalance.methods.base import Method

#: hooks of which at most one part may bring its own version (the hybrid uses that part's)
OWNED_HOOKS = ("training_step", "forward", "backward", "eval_fuse")
#: why a second owner cannot work, per hook
_WHY = {
    "training_step": "each takes over the whole training step, and a step can only be taken over once",
    "forward": "each replaces the forward pass, and the step has one forward",
    "backward": "each replaces the backward pass, and the step has one backward",
    "eval_fuse": "each replaces how the model predicts (eval_fuse), and a run predicts one way",
}
#: hooks a training_step takeover never calls on the other parts
_STEP_HOOKS = ("forward", "loss", "backward", "on_after_backward")


def overrides(part: Method, hook: str) -> bool:
    """Whether the part's class brings its own `hook` (the base class's no-op or template does not count)."""
    return getattr(type(part), hook) is not getattr(Method, hook)


def logged_key(part: Method, key: str) -> str:
    """The name a hybrid logs `part`'s `key` under: `<part>/<key>`, so two parts' keys never collide, except a key
    that already carries the part's name (MLGM's `mlgm/k/audio`), which keeps the name it has when the method runs
    alone."""
    return key if key.startswith(f"{part.name}/") else f"{part.name}/{key}"


def composition_problems(parts: list[Method]) -> list[str]:
    """Every reason these parts cannot be composed, one line each (empty when they can)."""
    problems = []
    for hook in OWNED_HOOKS:
        owners = [p.name for p in parts if overrides(p, hook)]
        if len(owners) > 1:
            problems.append(f"{' and '.join(owners)} clash at `{hook}`: {_WHY[hook]}")
    takers = [p for p in parts if overrides(p, "training_step")]
    if len(takers) == 1:
        taker = takers[0]
        for p in parts:
            hooks = [h for h in _STEP_HOOKS if p is not taker and overrides(p, h)]
            if hooks:
                problems.append(
                    f"{taker.name} and {p.name} clash: {taker.name} takes over the training step, so {p.name}'s "
                    f"{', '.join(f'`{h}`' for h in hooks)} would never run")
    owners = [p for p in parts if overrides(p, "backward")]
    if len(owners) == 1:
        owner = owners[0]
        for p in parts:
            if p is not owner and overrides(p, "loss"):
                problems.append(
                    f"{owner.name} and {p.name} clash: {owner.name} replaces the backward pass and computes the "
                    f"gradients from its own losses only, so {p.name}'s loss would never reach them")
    return problems


def part_error(error: UserError, index: int, name: str) -> UserError:
    """`error`, raised by building part `name` (method.parts[index]), as the hybrid reports it: each problem
    prefixed with the part, and the part's options named by the path a user sets them by, `method.<part>.<key>`
    (the part itself names them `method.<key>`, as when it runs alone)."""
    def placed(text: str) -> str:
        return f"method.parts[{index}] ({name}): " + re.sub(r"\bmethod\.(?=[A-Za-z_])", f"method.{name}.", text)

    if isinstance(error, ConfigError):
        return ConfigError([placed(p) for p in error.problems])
    return UserError(placed(str(error)))


class Compose(Method):
    """A hybrid strategy: registered methods (the parts) composed into one.

    Parts: `parts` lists registered method keys in the order their hooks run; `resolved` holds each part's full
    hyper-parameters (filled in by the config from conf/method/<part>.yaml, with `method.<part>.<key>` on top:
    see `mmbalance.config.compose_parts`), so the run's resolved config and its identity cover all of them.

    How the hooks combine (the strictest part wins where they constrain the run):
    - `select_modalities` chains in order; `check_modalities` and `set_task` ask every part (the tasks are those
      every part trains); `max_modalities` is the smallest, `min_modalities` the largest, and
      `needs_unimodal_logits` holds if any part needs them.
    - `hold_out` (a part's held-out part of the training split) runs for every part, in order, before any part's
      `setup`, so whatever the order no part's `setup` (valuation keeping the training set, UMT's teachers) sees
      another part's held-out samples; a part's `setup` may not rebuild `run.train_loader` itself (refused).
    - `setup`, `on_epoch_start`, `on_epoch_end` (data stage) run every part's, in order.
    - `loss`: every part that brings its own computes it on the same forward output; "loss" (what is minimised)
      is the sum of their "loss" terms and each part's keys are logged as `<part>/<key>` (a key that already
      carries the part's name keeps the name it has alone: `logged_key`). Without such a part
      it is the plain fused cross-entropy. Each part's objective counts its own fused CE (summing two objective
      methods counts it twice, on purpose: each part's objective is kept whole).
    - `on_after_backward` (gradient edits) runs every part's, in order.
    - `forward`, `backward`, `eval_fuse`, `training_step`, and replacing `run.model`: at most one part each.
      A part that predicts internally (valuation's Shapley pass) predicts the hybrid's way.
    Refused before training, in one UserError naming the parts and the stage: two owners of one of those hooks;
    a `training_step` takeover next to a part whose step hooks it would skip; a backward replacement next to
    another part's loss; unknown, repeated or nested (compose) parts; a part whose constructor refuses its
    settings (the part's error, prefixed `method.parts[i] (<part>): ` with its options named `method.<part>.<key>`).
    Two parts replacing the model, and a part whose `setup` rebuilds the training loader, are refused in `setup`,
    before the first step.

    The parts keep their own names (errors, logged keys); the hybrid's `family` records them, e.g.
    "hybrid: ogm_ge (optimization) + mbsd (objective)", and lands in metrics.json as `method_family`.
    """

    # The registry's family of hybrids; a built hybrid reports its parts' families instead (see `family` above).
    family = "hybrid"
    # every task a part may support; a built hybrid trains those all its parts declare (`set_task`)
    tasks = ("classification", "regression")

    def __init__(self, parts: list[str], resolved: dict[str, dict[str, Any]] | None = None, **settings: Any):
        from mmbalance.config import build
        from mmbalance.methods import registered_methods

        names = [str(p) for p in (parts or [])]
        registry = registered_methods()
        problems = []
        if not names:
            problems.append("method.parts is empty; list the methods to compose, e.g. method.parts=[ogm_ge,mbsd]")
        unknown = [n for n in names if n not in registry]
        if unknown:
            problems.append(f"method.parts: no registered method {', '.join(map(repr, unknown))} "
                            f"(registered: {', '.join(k for k in registry if k != 'compose')})")
        if "compose" in names:
            problems.append("method.parts: compose cannot be a part of itself; list the methods directly")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append(f"method.parts: {', '.join(repeated)} listed more than once; a method is one part")
        stray = sorted(k for k in settings if k not in names)
        if stray:
            problems.append(f"method.{stray[0]}: settings of a method that is not a part (parts: {', '.join(names)})")
        if problems:
            raise UserError("method=compose: " + "; ".join(problems))
        resolved = _plain(resolved) or {}
        self.parts: list[Method] = []
        for index, name in enumerate(names):
            node = resolved.get(name)
            if node is None:  # built by hand (tests): the part's own defaults plus any settings given
                node = {"_target_": f"{registry[name].__module__}.{registry[name].__qualname__}",
                        **(_plain(settings.get(name)) or {})}
            try:
                part = build(OmegaConf.create(node))
            except UserError as e:  # a part's own check (e.g. MLGM's window): name the part and its settings' path
                raise part_error(e, index, name) from e
            if type(part) is not registry[name]:
                raise UserError(f"method.resolved.{name}._target_ builds {type(part).__name__}, not method {name}")
            self.parts.append(part)
        clashes = composition_problems(self.parts)
        if clashes:
            raise UserError(f"method=compose cannot combine {' + '.join(names)}: " + "; ".join(clashes))
        self.family = "hybrid: " + " + ".join(f"{p.name} ({p.family})" for p in self.parts)
        limits = [p.max_modalities for p in self.parts if p.max_modalities is not None]
        self.max_modalities = min(limits) if limits else None
        self.min_modalities = max(p.min_modalities for p in self.parts)
        self.needs_unimodal_logits = any(p.needs_unimodal_logits for p in self.parts)
        self.counts_own_setup_flops = any(p.counts_own_setup_flops for p in self.parts)
        self.tasks = tuple(t for t in Compose.tasks if all(t in p.tasks for p in self.parts))
        self.owner = {hook: next((p for p in self.parts if overrides(p, hook)), None) for hook in OWNED_HOOKS}
        self.loss_parts = [p for p in self.parts if overrides(p, "loss")]
        self.model_owner: str | None = None
        self._part_losses: dict[str, dict[str, Tensor]] = {}
        for p in self.parts:  # a part that predicts internally predicts the way the hybrid does
            if p is not self.owner["eval_fuse"]:
                p.eval_fuse = self.eval_fuse

    @property
    def part_names(self) -> list[str]:
        return [p.name for p in self.parts]

    @staticmethod
    def nested_configs(where: str, node: DictConfig) -> list[tuple[str, DictConfig]]:
        """(where, node) of each part's resolved config, for `mmbalance.config.validate` to check every part's
        keys and values like a method's (named `method.<part>.<key>`, the path a user sets them by)."""
        resolved = node.get("resolved")
        if not isinstance(resolved, (dict, DictConfig)):
            return []
        return [(f"{where}.{name}", OmegaConf.create(_plain(part))) for name, part in resolved.items()
                if isinstance(part, (dict, DictConfig))]

    # ---- before the model exists ----
    def set_task(self, task, loss="auto"):
        for p in self.parts:  # a part that does not train the task refuses it, saying why
            p.set_task(task, loss)
        super().set_task(task, loss)

    def select_modalities(self, available):
        selected = list(available)
        for p in self.parts:
            selected = p.select_modalities(selected)
        return selected

    def check_modalities(self, modalities):
        for p in self.parts:
            p.check_modalities(modalities)

    # ---- once ----
    def setup(self, run):
        # every part's held-out data first: a part's setup may read the training set (valuation keeps it and
        # re-samples it every epoch, UMT trains its teachers on it), and must see it without any held-out sample
        for p in self.parts:
            p.hold_out_once(run)
        train_loader = run.train_loader
        replaced = []
        for index, p in enumerate(self.parts):
            before = run.model
            try:
                if self.counts_own_setup_flops and not p.counts_own_setup_flops:
                    with run.flops.measure("method_setup"):
                        p.setup(run)
                else:
                    p.setup(run)
            except UserError as e:  # a part refusing the model or data (a fusion, a modality) names itself
                raise part_error(e, index, p.name) from e
            if run.train_loader is not train_loader:
                raise UserError(
                    f"method=compose cannot combine {' + '.join(self.part_names)}: {p.name} rebuilds the training "
                    f"loader in its setup, after the parts before it may have read the training set; a method that "
                    f"holds out training data does it in `hold_out`, which a hybrid runs for every part first")
            if run.model is not before:
                replaced.append(p.name)
                if len(replaced) > 1:
                    raise UserError(f"method=compose cannot combine {' + '.join(self.part_names)}: "
                                    f"{' and '.join(replaced)} clash at the model: each replaces run.model")
        self.model_owner = replaced[0] if replaced else None

    # ---- data stage ----
    def on_epoch_start(self, run, epoch):
        for p in self.parts:
            p.on_epoch_start(run, epoch)

    def on_epoch_end(self, run, epoch):
        for p in self.parts:
            p.on_epoch_end(run, epoch)

    # ---- forward and loss ----
    def forward(self, run, batch):
        owner = self.owner["forward"]
        return owner.forward(run, batch) if owner is not None else super().forward(run, batch)

    def loss(self, run, batch, out):
        self._part_losses = {}
        if not self.loss_parts:
            return super().loss(run, batch, out)
        total = None
        named: dict[str, Tensor] = {}
        for p in self.loss_parts:
            own = p.loss(run, batch, out)
            self._part_losses[p.name] = own
            total = own["loss"] if total is None else total + own["loss"]
            named.update({logged_key(p, k): v for k, v in own.items()})
        return {"loss": total, **named}

    # ---- gradient stage ----
    def backward(self, run, losses):
        owner = self.owner["backward"]
        if owner is None:
            return super().backward(run, losses)
        own = self._part_losses.get(owner.name, losses)
        owner.backward(run, own)
        if own is not losses:  # keys the owner logs from its backward (MMPareto's pareto/...)
            losses.update({logged_key(owner, k): v for k, v in own.items() if logged_key(owner, k) not in losses})

    def on_after_backward(self, run, batch, out):
        for p in self.parts:
            p.on_after_backward(run, batch, out)

    def training_step(self, run, batch):
        owner = self.owner["training_step"]
        if owner is None:
            return super().training_step(run, batch)
        stats = owner.training_step(run, batch)
        return {"loss": stats["loss"], **{logged_key(owner, k): v for k, v in stats.items()}}

    # ---- prediction ----
    def eval_fuse(self, run, features):
        owner = self.owner["eval_fuse"]
        return owner.eval_fuse(run, features) if owner is not None else Method.eval_fuse(self, run, features)

    # ---- owned modules and resume ----
    def owned_modules(self):
        return {f"{p.name}/{k}": m for p in self.parts for k, m in p.owned_modules().items()}

    def state_dict(self):
        return {"parts": {p.name: p.state_dict() for p in self.parts}, "model_owner": self.model_owner}

    def load_state_dict(self, state):
        saved = state.get("parts", {})
        missing = [p.name for p in self.parts if p.name not in saved]
        if missing:
            raise UserError(f"the checkpoint's hybrid has no state for part(s) {', '.join(missing)}; it was saved by "
                            f"another composition (parts: {', '.join(saved) or 'none'})")
        for p in self.parts:
            p.load_state_dict(saved[p.name])


def _plain(node: Any) -> Any:
    """A plain dict/list of a config node (resolved), or the value itself."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node
