"""Run identity: what determines a run's result, so a run folder can never be resumed or re-used by another run.

A run's identity is its resolved config minus the settings that only say *where* or *how visibly* it runs
(output paths, progress bars, data-loading workers, the resume policy itself), plus the package version.
The dataset's own identity (classes, modalities, split sizes, a digest of the labels) is recorded beside it
and compared when a checkpoint is resumed, since it is only known once the data is built.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

# Settings that do not change what a run computes. Everything else in the resolved config is identity.
NON_IDENTITY_KEYS = (
    "hydra",                  # Hydra's own node (not part of the task config, listed for safety)
    "paths",                  # where data, outputs and caches live
    "resume",                 # the policy that reads this identity
    "tags",                   # free-form labels for reports
    "optimized_metric",       # what a sweeper reads back, not what the run does
    "logger",                 # experiment loggers only mirror the results
    "trainer.progress_bar",
    "hardware.num_workers",   # the sampler's order does not depend on workers (tested in test_train)
    "hardware.pin_memory",
    # CPU threads and how idle ones wait (engine/threads.py): `auto` resolves per machine, and a run resumed on
    # another node must not be refused for it (thread counts only reorder float reductions)
    "hardware.threads",
    "hardware.wait_policy",
)

RESUME_MODES = ("auto", "never", "force", "reevaluate")
SUPERSEDED = "superseded"  # where resume=never moves a folder's previous files (engine/run_folder.py)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict/list config; lists are indexed ("parts.0")."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        child = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)) and len(value) == 0:
            out[child] = value
        else:
            out.update(flatten(value, child))
    return out


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_IDENTITY_KEYS)


def run_identity(config: dict, version: str) -> dict[str, Any]:
    """{"digest": short hash, "config": {flat key: value}} of a resolved run config (a plain dict)."""
    items = {k: v for k, v in flatten(config).items() if not _excluded(k)}
    items["mmbalance.version"] = version
    return {"digest": _digest(items), "config": items}


def data_identity(splits) -> dict[str, Any]:
    """What the model sees of a dataset: classes, modality kinds and shapes, split sizes and a digest of the
    labels of every split whose dataset exposes them (cheap: no sample is loaded)."""
    out: dict[str, Any] = {
        "num_classes": int(splits.num_classes),
        "modalities": {m: [spec.kind, list(spec.shape)] for m, spec in splits.modalities.items()},
    }
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        out[f"{split}.size"] = len(ds)
        labels = getattr(ds, "labels", None)
        if labels is not None and hasattr(labels, "numpy"):
            out[f"{split}.labels"] = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]
    return out


def differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 12) -> list[str]:
    """Human-readable "key: old -> new" lines for the keys whose values differ."""
    keys = sorted(set(recorded) | set(current))
    lines = []
    for key in keys:
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if _canonical(old) != _canonical(new):
            lines.append(f"{key}: {old!r} -> {new!r}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def describe(record: dict | None) -> str:
    """One line naming a run by its command-line overrides (or 'the defaults') and its folder."""
    if not record:
        return "an unknown run"
    overrides = record.get("overrides") or []
    what = " ".join(overrides) if overrides else "the default config"
    where = record.get("run_dir")
    return f"`{what}`" + (f" (written in {where})" if where else "")


def refusal(where, owner: str, diff: list[str]) -> str:
    """The one message that refuses a run folder's file (metrics.json, a checkpoint) written by another run:
    whose it is (`owner`), every key that differs, and the ways forward."""
    lines = "\n".join(f"    {d}" for d in diff)
    return (
        f"{where} belongs to another run: {owner}; this run differs in:\n{lines}\n"
        "  Nothing was changed. Choose another folder (hydra.run.dir=... / hydra.sweep.dir=...), or re-run with "
        f"resume=never to start fresh here (the existing files move to {SUPERSEDED}/), or resume=force to "
        "continue from its checkpoint anyway."
    )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _digest(items: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(items).encode()).hexdigest()[:16]


# ---- sweep job folders ----

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")
MAX_JOB_DIR = 96


def _names_no_folder(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "logger" or key.startswith("logger.")


def job_dir_name(overrides: list[str] | tuple[str, ...]) -> str:
    """The folder of one sweep job, from its overrides: sorted, so the same job lands in the same folder
    whatever the order of the sweep's arguments; filesystem-safe (`/`, spaces, quotes become `_`); kept
    short (a long name keeps its start and gains a digest of the whole). No overrides: "default".

    Top-level keys (method=, seed=, dataset=) sort before nested ones (method.alpha=, trainer.epochs=), so a
    shortened name still starts with what usually tells the jobs of a sweep apart. Overrides of keys outside the
    run identity that only say where results are mirrored (`logger`) name no folder: a sweep re-run with other
    loggers finds its finished jobs."""
    parts = sorted((str(o) for o in overrides if not _names_no_folder(str(o))),
                   key=lambda o: (o.split("=", 1)[0].count("."), o))
    if not parts:
        return "default"
    name = _UNSAFE.sub("_", ",".join(parts)).strip("._") or "job"
    if len(name) > MAX_JOB_DIR:
        digest = hashlib.sha256(",".join(parts).encode()).hexdigest()[:10]
        name = f"{name[:MAX_JOB_DIR - 11].rstrip('._,')}-{digest}"
    return name
