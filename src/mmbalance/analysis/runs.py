"""Run folders read back into one table (`load_runs`), and the order and number format every table shares.

Reads only each run's `metrics.json` (see DESIGN.md, "Results contract"). Runs group by (dataset, method,
variant), where the variant names the config values that differ between runs of the same dataset and method
(an alpha sweep, a unimodal run per modality) without any knowledge of the methods. Free of torch, so
`mmbalance report` starts fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmbalance.engine.run_folder import SUPERSEDED
from mmbalance.errors import UserError

__all__ = ["DASH", "GROUP_KEYS", "METHOD_ORDER", "format_pm", "load_runs", "natural_key", "order_key"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GROUP_KEYS = ["dataset", "method", "variant"]

# Config keys that never define a variant: they change per run or per machine, not per experiment.
NON_VARIANT_PREFIXES = ("paths", "hydra", "hardware", "logger", "loggers", "callbacks")
NON_VARIANT_NAMES = frozenset({
    "seed", "tags", "task_name", "run_dir", "output_dir", "log_dir", "ckpt_path", "resume",
    "git_sha", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
    "device", "devices", "accelerator",
})
NON_VARIANT_SUFFIXES = ("_seed", "_dir", "_path", "_file")
# Choices that are not part of the experiment's identity (its config values still count).
NON_VARIANT_CHOICES = frozenset({"dataset", "method", "hardware", "sweep", "experiment"})

# Method order in tables: the references first, then everything else alphabetically.
METHOD_ORDER = {"baseline": 0, "unimodal": 1}

_MISSING = object()
DASH = "–"

# --------------------------------------------------------------------------------------------- loading


def _find_metrics_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name == METRICS_FILE:
            return [path]
        raise UserError(f"{path}: expected a run folder, a folder of runs or a {METRICS_FILE} file")
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    found = []
    for root, dirs, files in os.walk(path):  # os.walk does not follow symlinks: no loops
        # a run's superseded/ holds results that a `resume=never` re-run replaced, not runs of this study
        dirs[:] = sorted(d for d in dirs if d != SUPERSEDED)
        if METRICS_FILE in files:
            found.append(Path(root) / METRICS_FILE)
    if not found:
        raise UserError(f"{path}: no runs found (no {METRICS_FILE} in it or below it)")
    return found


def _read_metrics(file: Path) -> dict[str, Any]:
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    for key in ("choices", "config", "metrics"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"'{key}' must be an object, got {type(data[key]).__name__}")
    return data


def _as_number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _canonical(value: Any) -> str:
    if value is _MISSING:
        return "\0missing"
    return json.dumps(value, sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    if value is _MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _is_non_variant_key(key: str) -> bool:
    parts = key.split(".")
    last = parts[-1]
    return (
        parts[0] in NON_VARIANT_PREFIXES
        # a hybrid's computed copy of its parts' settings: `parts` and `method.<part>.<key>` name what differs
        or key.startswith("method.resolved.")
        or last in NON_VARIANT_NAMES
        or last.endswith(NON_VARIANT_SUFFIXES)
    )


def _short_names(keys: Sequence[str], all_keys: Iterable[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other config key ends with."""
    split_all = [k.split(".") for k in set(all_keys)]
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = parts[-n:]
            clashes = sum(1 for other in split_all if other[-n:] == suffix)
            if clashes <= 1:
                break
        names[key] = ".".join(parts[-n:])
    return names


def _variants(records: list[dict[str, Any]]) -> list[str]:
    """One variant string per record of the same (dataset, method): the config values that differ."""
    with_config = [r for r in records if r["_config"] is not None]
    if len(with_config) < 2:
        return ["" for _ in records]

    choice_keys: list[str] = []
    for r in with_config:
        choice_keys += [k for k in r["_choices"] if k not in choice_keys]
    varying_choices = [
        k for k in choice_keys
        if k not in NON_VARIANT_CHOICES and not k.startswith("hydra/")
        and len({_canonical(r["_choices"].get(k, _MISSING)) for r in with_config}) > 1
    ]
    # A swapped config group (another backbone) is named by its choice, not by its every key.
    covered = tuple(k.replace("/", ".") + "." for k in varying_choices)

    config_keys: list[str] = []
    seen = set()
    for r in with_config:
        for k in r["_config"]:
            if k not in seen:
                seen.add(k)
                config_keys.append(k)
    varying_keys = []
    for k in config_keys:
        if _is_non_variant_key(k) or k.startswith(covered):
            continue
        values = [r["_config"].get(k, _MISSING) for r in with_config]
        if len({_canonical(v) for v in values}) < 2:
            continue
        present = [v for v in values if v is not _MISSING]
        if present and all(isinstance(v, str) and os.path.isabs(v) for v in present):
            continue  # per-run paths (output folders) are bookkeeping
        varying_keys.append(k)
    short = _short_names(varying_keys, config_keys)

    out = []
    for r in records:
        if r["_config"] is None:
            out.append("")
            continue
        parts = [f"{k.split('/')[-1]}={_format_value(r['_choices'].get(k, _MISSING))}" for k in varying_choices]
        parts += [f"{short[k]}={_format_value(r['_config'].get(k, _MISSING))}" for k in varying_keys]
        out.append(", ".join(parts))
    return out


def _record(file: Path) -> dict[str, Any]:
    run_dir = str(file.parent)
    try:
        data = _read_metrics(file)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        return {"run_dir": run_dir, "status": "unreadable", "error": f"{type(e).__name__}: {e}",
                "method_family": None, "_choices": {}, "_config": None, "_metrics": {}}
    choices = data.get("choices") or {}
    config = data.get("config")
    seed = data.get("seed")
    if seed is None and isinstance(config, dict):
        seed = config.get("seed")
    metrics = {k: _as_number(v) for k, v in (data.get("metrics") or {}).items()
               if v is None or isinstance(v, (int, float, str))}
    return {
        "run_dir": run_dir,  # where it lies now, not where it was written (results get copied)
        "status": str(data.get("status") or "unknown"),
        "error": data.get("error"),
        "method_family": data.get("method_family"),
        "seed": seed,
        "wall_time_s": data.get("wall_time_s"),
        "git_sha": data.get("git_sha"),
        "overrides": " ".join(map(str, data.get("overrides") or [])),
        "_choices": {k: v for k, v in choices.items() if not str(k).startswith("hydra/")},
        "_config": _flatten(config) if isinstance(config, dict) else None,
        "_metrics": metrics,
    }


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run found in or below `paths`: run_dir, status, error, choices, seed, variant, metrics.

    Failed runs are included; a metrics.json that cannot be read becomes a row with status
    "unreadable" and the reason in `error`. The metric column names are in `df.attrs["metrics"]`.
    Raises UserError for a path that holds no runs.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        for f in _find_metrics_files(Path(p)):
            key = f.resolve()
            if key not in seen:  # a sweep folder and a run inside it, given together
                seen.add(key)
                files.append(f)

    records = [_record(f) for f in files]
    n_unreadable = sum(r["status"] == "unreadable" for r in records)
    if n_unreadable:
        log.warning("%d of %d metrics.json file(s) could not be read; listed with status 'unreadable'",
                    n_unreadable, len(records))

    for r in records:
        r["dataset"] = str(r["_choices"].get("dataset") or "?") if r["status"] != "unreadable" else ""
        r["method"] = str(r["_choices"].get("method") or "?") if r["status"] != "unreadable" else ""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["status"] != "unreadable":
            groups.setdefault((r["dataset"], r["method"]), []).append(r)
    for r in records:
        r["variant"] = ""
    for group in groups.values():
        for r, v in zip(group, _variants(group)):
            r["variant"] = v

    choice_cols: list[str] = []
    metric_cols: list[str] = []
    for r in records:
        choice_cols += [k for k in r["_choices"] if k not in ("dataset", "method") and k not in choice_cols]
        metric_cols += [k for k in r["_metrics"] if k not in metric_cols]
    base_cols = ["run_dir", "status", "error", "dataset", "method", "method_family", *choice_cols, "seed", "variant"]
    tail_cols = ["wall_time_s", "git_sha", "overrides"]
    rows = []
    for r in records:
        row = {c: r.get(c) for c in base_cols + tail_cols}
        row.update({c: r["_choices"].get(c) for c in choice_cols})
        row.update(r["_metrics"])
        rows.append(row)
    df = pd.DataFrame(rows, columns=base_cols + tail_cols + metric_cols)
    for c in metric_cols + ["wall_time_s"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df.attrs["metrics"] = metric_cols
    df.attrs["n_unreadable"] = n_unreadable
    return df


# ---------------------------------------------------------------------------------- ordering and format


def natural_key(text: str) -> tuple:
    """Sort `alpha=0.3` before `alpha=1` before `alpha=10`."""
    tokens = re.split(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return tuple((0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(tokens) if t)


def order_key(dataset: str, method: str, variant: str) -> tuple:
    """Table order: by dataset, the references first, then methods alphabetically, variants naturally."""
    return (dataset, METHOD_ORDER.get(method, len(METHOD_ORDER)), method, natural_key(variant))


def format_pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± std" scaled and rounded; DASH for what is not available (a std needs n >= 2)."""
    if mean is None or not np.isfinite(mean):
        return DASH
    m = f"{mean * scale:.{digits}f}"
    s = f"{std * scale:.{digits}f}" if std is not None and np.isfinite(std) else DASH
    return f"{m} ± {s}"
