"""The one place that turns `_target_` config nodes into objects, and validates them all first.

Validation binds every node's keys to its target's signature (torchtune's approach) and reports every
problem at once, so a user fixes a config in one go instead of one traceback at a time.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmbalance.errors import ConfigError, UserError

# Arguments the code supplies at build time, per config section (not expected in the YAML).
RUNTIME_ARGS = {
    "dataset": set(),
    "method": set(),
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
    "encoder": {"in_shape"},
}

ROOT_SCHEMA = {  # key: (type, allowed values or None)
    "seed": (int, None),
    "trainer.epochs": (int, None),
    "trainer.batch_size": (int, None),
    "trainer.grad_clip": ((int, float, type(None)), None),
    "eval.select_on": (str, ("val", "test")),
    "eval.select_metric": (str, ("acc", "macro_f1")),
    "eval.shapley_every": (int, None),
    "eval.flops": (bool, None),
    "masking": (str, ("input", "feature")),
    "hardware.device": (str, None),
    "hardware.precision": (str, ("fp32", "bf16")),
    "hardware.num_workers": (int, None),
    "hardware.pin_memory": (bool, None),
    "backbone.fusion": (str, ("concat", "sum", "film", "gated")),
}
OPTIONAL_SCHEMA = {  # checked only when present (hardware=ddp sets them)
    "hardware.distributed": (bool, None),
    "hardware.backend": (str, ("nccl", "gloo")),
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
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not inspect.Parameter.empty:
            continue
        if name not in keys and name not in runtime:
            problems.append(f"{where}: {target_path} needs argument {name!r} (set {where}.{name}=...)")


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


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
    for key, (types, allowed) in {**ROOT_SCHEMA, **OPTIONAL_SCHEMA}.items():
        present, value = _get(cfg, key)
        if not present:
            if key in ROOT_SCHEMA:
                problems.append(f"{key}: missing from the run config")
            continue
        if isinstance(value, (DictConfig, ListConfig)) or not isinstance(value, types) or (
            isinstance(value, bool) and types is int
        ):
            problems.append(f"{key}={value!r}: expected {_type_name(types)}")
        elif allowed is not None and value not in allowed:
            problems.append(f"{key}={value!r}: expected one of {list(allowed)}")
    for key in ("trainer.epochs", "trainer.batch_size"):
        present, value = _get(cfg, key)
        if present and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"{key}={value}: expected a positive integer")
    if problems:
        raise ConfigError(problems)


def _type_name(types) -> str:
    if isinstance(types, tuple):
        return " or ".join("null" if t is type(None) else t.__name__ for t in types)
    return types.__name__
