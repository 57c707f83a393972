"""The one place that turns `_target_` config nodes into objects, and validates them all first.

Validation binds every node's keys to its target's signature (torchtune's approach), checks every value
against the parameter's type hint and declared range (`mmbalance.constraints`), and reports every problem at
once, so a user fixes a config in one go instead of one traceback (or a silently useless run) at a time.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmbalance.constraints import (NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability,
                                   Range, value_problems)
from mmbalance.engine.identity import RESUME_MODES
from mmbalance.errors import ConfigError, UserError

# Arguments the code supplies at build time, per config section (not expected in the YAML).
RUNTIME_ARGS = {
    "dataset": set(),
    "method": set(),
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
    "encoder": {"in_shape"},
}

# key: the type hint its value must satisfy; root_schema() adds the keys whose choices a registry holds
ROOT_SCHEMA = {
    "seed": NonNegativeInt,
    "trainer.epochs": PositiveInt,
    "trainer.batch_size": PositiveInt,
    "trainer.grad_clip": PositiveFloat | None,
    "eval.select_on": Literal["val", "test"],
    # classification: acc | macro_f1; regression (metrics/regression.py SELECT_METRICS): mae | corr | ...
    "eval.select_metric": Literal["acc", "macro_f1", "mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_nonzero",
                                  "f1_nonzero", "acc7", "acc5"],
    "eval.shapley_every": NonNegativeInt,
    "eval.flops": bool,
    "masking": Literal["input", "feature"],
    "hardware.device": str,
    "hardware.precision": Literal["fp32", "bf16"],
    "hardware.num_workers": NonNegativeInt,
    "hardware.pin_memory": bool,
}
OPTIONAL_SCHEMA = {  # checked only when present: the code has a default for each (hardware=ddp sets the first two)
    "hardware.distributed": bool,
    "hardware.backend": Literal["nccl", "gloo"],
    # the thread policy (engine/threads.py); absent means auto
    "hardware.threads": PositiveInt | Literal["auto"],
    "hardware.wait_policy": Literal["passive", "active", "auto"],
    "trainer.drop_last": bool,
    "trainer.progress_bar": bool | Literal["auto"],
    "resume": Literal[RESUME_MODES],
    "tags": list,
    "optimized_metric": str | None,
}
# Root sections checked elsewhere: `_target_` nodes against their signatures, the logger group by engine/loggers.py;
# paths are free-form folders; `hydra` is Hydra's own node (present when a config is composed with it)
OTHER_ROOT_KEYS = ("backbone", "dataset", "method", "optimizer", "scheduler", "logger", "paths", "hydra")
# Sections whose every key is in the schemas above: a key they do not list is one no code reads (a typo added
# with `+`, which Hydra's struct mode lets through)
CLOSED_SECTIONS = ("", "trainer", "eval", "hardware")

# Ranges of torch optimizer and scheduler arguments, by name: torch's own hints carry types but no ranges
# (and accept tensors a config cannot hold). They replace torch's hint for the arguments listed here.
_BELOW_ONE = Annotated[float, Range(ge=0, lt=1)]  # a decay factor that still forgets
TORCH_ARGUMENTS = {
    "lr": PositiveFloat,
    "momentum": _BELOW_ONE,
    "dampening": Probability,
    "weight_decay": NonNegativeFloat,
    "eps": PositiveFloat,
    "betas": tuple[_BELOW_ONE, _BELOW_ONE],
    "step_size": PositiveInt,
    "gamma": PositiveFloat,
    "last_epoch": Annotated[int, Range(ge=-1)],
}


def build(node: DictConfig, **runtime_kwargs) -> Any:
    """Instantiate a `_target_` node, passing the arguments only the code knows (parameters, shapes).

    Every object in a run is built through here. Nodes marked `_partial_: true` become a partial that is
    called with the runtime arguments at once.
    """
    try:
        if node.get("_partial_", False):
            return instantiate(node)(**runtime_kwargs)
        return instantiate(node, **runtime_kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, UserError):  # our own clear message, not Hydra's wrapper around it
            raise exc.__cause__ from None
        raise


def _check_target(where: str, node: Any, runtime: set[str], problems: list[str]) -> None:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        problems.append(f"{where}: expected a config node with a `_target_`, got {OmegaConf.to_yaml(node).strip()!r}")
        return
    target_path = node["_target_"]
    try:
        target = get_object(target_path)
    except Exception as exc:
        problems.append(f"{where}._target_: cannot import {target_path!r} ({exc})")
        return
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    keys = [k for k in node.keys() if not str(k).startswith("_")]
    for key in keys:
        if OmegaConf.is_missing(node, key):
            problems.append(f"{where}.{key} is required (set it, e.g. {where}.{key}=...)")
        if key not in params and not takes_kwargs:
            problems.append(
                f"{where}.{key}: {target_path} has no argument {key!r} (accepted: {', '.join(accepted) or 'none'})"
            )
        if key in runtime:
            problems.append(f"{where}.{key}: supplied by mmbalance at build time; remove it from the config")
    hints = _parameter_hints(target)
    for key in keys:
        if key in params and key in hints and key not in runtime and not OmegaConf.is_missing(node, key):
            problems.extend(_check_key(node, key, f"{where}.{key}", hints[key]))
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not inspect.Parameter.empty:
            continue
        if name not in keys and name not in runtime:
            problems.append(f"{where}: {target_path} needs argument {name!r} (set {where}.{name}=...)")
    nested = getattr(target, "nested_configs", None)  # a hybrid method's parts (methods/compose.py)
    if callable(nested):
        problems.extend(_resolved_problems(where, node))
        try:
            children = nested(where, node)
        except Exception:  # an unresolvable part list is reported by the key check above
            children = []
        for child_where, child in children:
            _check_target(child_where, child, runtime, problems)


# ---- hybrid methods: `resolved: ${mmbalance_compose_parts:}` in conf/method/compose.yaml and the hybrid_* files ----

# conf/ at the repository root (as cli.CONF_DIR; not imported from there, which would close an import circle)
_METHOD_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "method"


def compose_parts(*, _parent_: DictConfig) -> DictConfig:
    """{part: its full config} for the hybrid method node `_parent_`: conf/method/<part>.yaml for each name in
    its `parts`, with the node's `<part>` settings (`method.<part>.<key>=...`) merged on top. The hybrid's
    resolved config (and so the run identity) holds every part's hyper-parameters this way. A name without a
    config file is left out here and refused, with the registered names, when the method is built.

    A DictConfig, not a dict: `OmegaConf.resolve` (`--cfg job --resolve`) writes a resolver's value back into the
    node, which takes a config node but not a plain dict; read as a container it is the same plain dict."""
    out: dict[str, dict[str, Any]] = {}
    for name in _parent_.get("parts") or []:
        if not isinstance(name, str) or not (_METHOD_CONFIGS / f"{name}.yaml").is_file():
            continue
        node = OmegaConf.load(_METHOD_CONFIGS / f"{name}.yaml")
        node.pop("defaults", None)
        own = _parent_.get(name)
        if isinstance(own, DictConfig):
            node = OmegaConf.merge(node, own)
        out[name] = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create(out)


def _resolved_problems(where: str, node: DictConfig) -> list[str]:
    """A hybrid's `resolved` must be what `compose_parts` computes from its parts and their settings: the hybrid
    builds its parts from `resolved`, while metrics.json and the run identity also record `<part>.<key>`, so a
    `resolved` set by hand would train with settings the record does not show. An override equal to the computed
    value is harmless and passes."""
    if "resolved" not in node or OmegaConf.is_interpolation(node, "resolved"):
        return []  # the usual case: computed by the resolver, nothing set by hand
    try:
        given = OmegaConf.to_container(node.resolved, resolve=True) if isinstance(node.resolved, DictConfig) \
            else node.resolved
        computed = OmegaConf.to_container(compose_parts(_parent_=node), resolve=True)
    except Exception:  # an unresolvable part list or setting is reported by the key checks
        return []
    if given == computed or not (isinstance(given, dict) and all(isinstance(v, dict) for v in given.values())):
        return []  # the same, or not a map of maps: the type check names that one
    settings = []  # the part settings that would give the hand-set values
    for part, values in (given if isinstance(given, dict) else {}).items():
        own = node.get(part)
        for key, value in (values if isinstance(values, dict) else {}).items():
            if part in computed and computed[part].get(key) != value:
                plus = "" if isinstance(own, DictConfig) and key in own else "+"  # a key the node lacks is added
                settings.append(f"{plus}{where}.{part}.{key}={_override_value(value)}")
    instead = f"; set {' '.join(settings)} instead" if settings else \
        f"; set {where}.parts=[...] and {where}.<part>.<key>=... instead"
    return [f"{where}.resolved is computed from {where}.parts and {where}.<part>.<key>, do not set it{instead}"]


def _override_value(value: Any) -> str:
    """`value` as a Hydra command-line override writes it."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


OmegaConf.register_new_resolver("mmbalance_compose_parts", compose_parts, replace=True)


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def root_schema() -> dict[str, Any]:
    """ROOT_SCHEMA and the keys whose choices a registry holds: `backbone.fusion` is a key of models/fusion.py's
    FUSIONS."""
    from mmbalance.models.fusion import FUSIONS  # torch loads with it: validation happens when a run is built

    return {**ROOT_SCHEMA, "backbone.fusion": Literal[tuple(FUSIONS)]}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in the run config; return None when it is sound."""
    problems: list[str] = []
    for section in ("dataset", "method", "optimizer"):
        if cfg.get(section) is None:
            problems.append(f"{section}: missing; choose one with {section}=<option>")
        else:
            _check_target(section, cfg[section], RUNTIME_ARGS[section], problems)
    if cfg.get("scheduler") is not None:
        _check_target("scheduler", cfg.scheduler, RUNTIME_ARGS["scheduler"], problems)
    encoders = cfg.get("backbone", {}).get("encoders") if cfg.get("backbone") is not None else None
    if not encoders:
        problems.append("backbone.encoders: missing; choose a backbone with backbone=<option>")
    else:
        for kind, node in encoders.items():
            _check_target(f"backbone.encoders.{kind}", node, RUNTIME_ARGS["encoder"], problems)
    required = root_schema()
    for key, hint in {**required, **OPTIONAL_SCHEMA}.items():
        parent, _, name = key.rpartition(".")
        present, node = _get(cfg, parent) if parent else (True, cfg)
        if not present or not isinstance(node, DictConfig) or name not in node:
            if key in required:
                problems.append(f"{key}: missing from the run config")
            continue
        problems.extend(_check_key(node, name, key, hint))
    problems.extend(_fusion_kwargs_problems(cfg.get("backbone")))
    problems.extend(_unknown_keys(cfg, [*required, *OPTIONAL_SCHEMA]))
    problems.extend(_optimized_metric_problems(cfg.get("optimized_metric")))
    if problems:
        raise ConfigError(problems)


def _fusion_kwargs_problems(backbone: Any) -> list[str]:
    """`backbone.fusion_kwargs` against the chosen fusion head's own arguments (its hidden size, ...): a key it
    does not take, or a value of another type, before the data and model are built."""
    from mmbalance.models.fusion import FUSIONS

    if not isinstance(backbone, DictConfig) or backbone.get("fusion") not in FUSIONS:
        return []  # an unknown fusion is reported by the schema check
    kwargs = backbone.get("fusion_kwargs")
    if not kwargs:
        return []
    if not isinstance(kwargs, DictConfig):
        return [f"backbone.fusion_kwargs: expected a mapping of argument: value, got {kwargs!r}"]
    fusion = FUSIONS[backbone.fusion]
    own = [n for n in inspect.signature(fusion).parameters if n not in ("self", "dims", "num_classes")]
    hints = _parameter_hints(fusion)
    problems = []
    for key in map(str, kwargs.keys()):
        where = f"backbone.fusion_kwargs.{key}"
        if key not in own:
            close = difflib.get_close_matches(key, own, n=1)
            problems.append(f"{where}: backbone.fusion={backbone.fusion} takes no argument {key!r} ("
                            + (f"did you mean {close[0]}? " if close else "")
                            + f"it takes: {', '.join(own) or 'none'})")
        elif key in hints:
            problems.extend(_check_key(kwargs, key, where, hints[key]))
    return problems


def _optimized_metric_problems(key: Any) -> list[str]:
    """What a sweeper reads back must be a validation metric (tuning on test would leak it into the tables) of a
    name some run can have: checked before training, not after the trial spent its time."""
    from mmbalance.metrics.regression import METRICS  # every split metric: the classification ones included

    if not isinstance(key, str):
        return []  # None means val/acc; a non-string is reported by the schema check
    split, _, rest = key.partition("/")
    name = rest.split("/")[0]
    # per-modality keys: val/acc/<modality>, val/mae/<modality>, val/shapley/<modality>, val/value/<coalition>
    known = (*METRICS, "imbalance", "shapley", "value")
    if split == "val" and name in known:
        return []
    if split == "test":
        return [f"optimized_metric: {key!r} is a test metric; a sweeper must tune on validation, never on test "
                f"(use val/{rest})"]
    return [f"optimized_metric: expected val/<metric> with a metric among {', '.join(known)} "
            f"(e.g. val/acc, val/mae/audio), got {key!r}"]


def _unknown_keys(cfg: DictConfig, schema: list[str]) -> list[str]:
    """A problem for each key of CLOSED_SECTIONS that the schema lacks, naming the closest known keys: by the
    key's own name, in any section (`trainer.select_metric` means eval.select_metric)."""
    known = {*schema, *(key.split(".")[0] for key in schema), *OTHER_ROOT_KEYS}
    problems = []
    for section in CLOSED_SECTIONS:
        node = cfg.get(section) if section else cfg
        if not isinstance(node, DictConfig):
            continue
        by_name: dict[str, list[str]] = {}
        for full in sorted(known if not section else schema):  # a root typo may be a section's name
            by_name.setdefault(full.rpartition(".")[2], []).append(full)
        for key in map(str, node.keys()):
            where = f"{section}.{key}" if section else key
            if where in known:
                continue
            close = [full for name in difflib.get_close_matches(key, by_name, n=3) for full in by_name[name]]
            problems.append(f"{where}: unknown key, no code reads it; " + (
                f"did you mean {' or '.join(close)}?" if close else
                f"the known keys here: {', '.join(sorted(k for k in known if k.rpartition('.')[0] == section))}"))
    return problems


# ---- values against type hints ----


def _parameter_hints(target: Any) -> dict[str, Any]:
    """The target's parameter hints with their `Annotated` ranges; TORCH_ARGUMENTS for torch's own targets."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # a third-party hint that does not resolve here: check the parameters without it
        hints = {}
    hints.pop("return", None)
    if getattr(target, "__module__", "").split(".")[0] == "torch":
        hints.update(TORCH_ARGUMENTS)
    return hints


def _check_key(node: DictConfig, key: str, where: str, hint: Any) -> list[str]:
    try:  # reading the key resolves interpolations; a container becomes plain lists and dicts
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception as exc:
        return [f"{where}: cannot resolve its value ({exc})"]
    return value_problems(where, value, hint)
