"""Run identity: what determines a run's result, so a run folder can never be resumed or re-used by another run.

A run's identity is its resolved config minus the settings that only say *where* or *how visibly* it runs
(output paths, progress bars, data-loading workers, the resume policy itself), plus the package version.
A value that lies under one of the `paths.*` folders counts by its place below that folder
(`${paths.data_dir}/cremad`), so moving the data or the cache elsewhere keeps the run the same; cache and output
folders never count.
The dataset's own identity (classes, modalities, split sizes, a digest of the labels) is recorded beside it
and compared when a checkpoint is resumed, since it is only known once the data is built.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

# Settings that do not change what a run computes. Everything else in the resolved config is identity. The one list
# (read through `outside_identity`): a sweep job's folder is not named by overrides of these keys (`job_dir_name`).
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


# Folders that hold only what a run can rebuild or what it writes: a key so named (`dataset.cache_dir`), or a value
# under a `paths.*` folder so named (`paths.cache_dir`), is never identity.
BOOKKEEPING_DIRS = ("cache_dir", "output_dir")
_DROP = object()


def outside_identity(key: str) -> bool:
    """Whether a flat config key (`trainer.progress_bar`, `dataset.cache_dir`) is left out of the run identity: the
    one rule behind `run_identity`, `differences` and the sweep job folders (`job_dir_name`)."""
    return key.endswith(BOOKKEEPING_DIRS) or any(key == k or key.startswith(k + ".") for k in NON_IDENTITY_KEYS)


def _path_roots(config: dict) -> list[tuple[str, str]]:
    """[(resolved folder, its `paths` key)] of the config's `paths` node, longest first (a cache inside the data
    folder is the cache). A resolved config no longer shows its `${paths.*}` interpolations, and a recorded one
    (metrics.json) never did, but its `paths` values are what they resolved to, so they name them back."""
    paths = config.get("paths") if isinstance(config, dict) else None
    roots = [(value.rstrip("/"), key) for key, value in flatten(paths or {}).items()
             if isinstance(value, str) and value.strip("./")]  # "", ".", "/" would match every path
    return sorted(roots, key=lambda r: -len(r[0]))


def _relocated(value: Any, roots: list[tuple[str, str]]) -> Any:
    """A string under a `paths.*` folder as `${paths.<key>}/<rest>` (its place below the folder, not the folder's
    place), _DROP under a cache or output folder, anything else as it is."""
    if isinstance(value, str):
        for root, key in roots:
            if value == root or value.startswith(root + "/"):
                return _DROP if key.endswith(BOOKKEEPING_DIRS) else f"${{paths.{key}}}{value[len(root):]}"
    return value


def run_identity(config: dict, version: str) -> dict[str, Any]:
    """{"digest": short hash, "config": {flat key: value}} of a resolved run config (a plain dict).

    A data location counts only below its `paths.*` folder: moving the data folder keeps the run, and what was
    read there is checked by the dataset's identity (`data_identity`), compared when the run resumes."""
    roots = _path_roots(config)
    items = {k: _relocated(v, roots) for k, v in flatten(config).items() if not outside_identity(k)}
    items = {k: v for k, v in items.items() if v is not _DROP}
    items["mmbalance.version"] = version
    return {"digest": _digest(items), "config": items}


# data-identity keys added after records were first written: compared only where both identities hold one
LATER_DATA_KEYS = ("content",)


def data_identity(splits) -> dict[str, Any]:
    """What the model sees of a dataset: classes, modality kinds and shapes, split sizes, a digest of the
    labels of every split whose dataset exposes them (cheap: no sample is loaded), and the digest of the data's
    content where its builder has one at hand (`notes["content_digest"]`: a features file's bytes)."""
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
    if (splits.notes or {}).get("content_digest"):
        out["content"] = splits.notes["content_digest"]
    return out


def comparable_data(*identities: dict) -> list[dict]:
    """The data identities without the `LATER_DATA_KEYS` that not all of them hold, while those that hold one agree
    on it: a record written before the key existed is not other data for lacking it, but two that hold it and
    differ are other data, and stay apart (a record without it then stands apart from both)."""
    held = {k: {canonical((i or {})[k]) for i in identities if k in (i or {})} for k in LATER_DATA_KEYS}
    drop = [k for k in LATER_DATA_KEYS if len(held[k]) <= 1 and not all(k in (i or {}) for i in identities)]
    return [{k: v for k, v in (i or {}).items() if k not in drop} for i in identities]


def differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 12) -> list[str]:
    """Human-readable "key: old -> new" lines for the keys whose values differ.

    A record written before locations counted below their `paths.*` folder (and cache folders not at all) holds
    cache keys and absolute locations: such a key is not a difference, and an absolute location matches the
    current `${paths.<key>}/<rest>` when it ends with the same rest (the data read there are compared by the
    dataset's identity when the run resumes)."""
    keys = sorted(k for k in set(recorded) | set(current) if not outside_identity(k))
    lines = []
    for key in keys:
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if canonical(old) != canonical(new) and not _located_alike(old, new):
            lines.append(f"{key}: {old!r} -> {new!r}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _located_alike(old: Any, new: Any) -> bool:
    relocated = re.fullmatch(r"\$\{paths\.[\w.]+\}(/.*)?", new) if isinstance(new, str) else None
    return bool(relocated) and isinstance(old, str) and old.startswith("/") and old.endswith(relocated[1] or "")


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


def _same_number(value: Any) -> Any:
    """`value` with every whole float as an int, in nested dicts and lists too: `method.alpha=1` and
    `method.alpha=1.0` are one setting (Hydra keeps the type as typed), so one run and one report row."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_same_number(v) for v in value]
    return value


def canonical(value: Any) -> str:
    """The one text form in which two settings (or identities) are compared: sorted keys, whole floats as ints."""
    return json.dumps(_same_number(value), sort_keys=True, default=repr)


def _digest(items: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(items).encode()).hexdigest()[:16]


# ---- sweep job folders ----

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")
MAX_JOB_DIR = 96
# `group=option/sub`: a top-level key choosing a config of a nested group (experiment=demo/baseline)
_GROUP_CHOICE = re.compile(r"\+?[A-Za-z_][\w-]*=[\w-]+(/[\w-]+)+")


def _override_key(override: str) -> str:
    """The config key an override sets: `+trainer.progress_bar=false` -> `trainer.progress_bar`, `~logger` ->
    `logger`; a config-group choice sets its group's node (`logger=csv` -> `logger`, `hydra/launcher=basic` ->
    `hydra.launcher`, where a group's options land unless they name another package)."""
    return override.split("=", 1)[0].lstrip("+~").replace("/", ".")


def _names_no_folder(override: str) -> bool:
    """Whether an override sets only keys outside the run identity (`outside_identity`, the rule the identity
    itself uses): `resume=`, `trainer.progress_bar=`, `hardware.num_workers=`, `*cache_dir=`,
    `logger=`, `logger.*=` ... Such an override cannot make another run, so it must not make another folder.

    A config-group choice counts by its group's node as a whole: `logger=csv` sets nothing else and names no
    folder, while `hardware=gpu` also sets identity keys (`hardware.device`, `hardware.precision`)
    and names the folder, as does any choice of a group that is not wholly outside the identity (`trainer=`,
    `experiment=`, `sweep=`, whose options may set any key). A choice placed into another package
    (`group@pkg=option`) always names the folder: where it lands is not read here.

    Except `paths` (`paths.data_dir=`, `paths=`): a data location is outside the identity because moved data are the
    same run, which a resume confirms by rebuilding the data and comparing them. A finished job is skipped without
    that, so a sweep over data folders (`-m paths.data_dir=/data/v1,/data/v2`) must keep one folder per location,
    or the second location's job would be skipped as the first one's run."""
    key = _override_key(override)
    return "@" not in key and outside_identity(key) and key.split(".", 1)[0] != "paths"


def _legacy_names_no_folder(override: str) -> bool:
    """The rule of sweeps named before every key outside the identity was left out: only the loggers."""
    key = _override_key(override)
    return key == "logger" or key.startswith("logger.")


def _job_parts(overrides, leave_out=_names_no_folder) -> list[str]:
    return sorted((str(o) for o in overrides if not leave_out(str(o))),
                  key=lambda o: (o.split("=", 1)[0].count("."), o))


def job_dir_name(overrides: list[str] | tuple[str, ...]) -> str:
    """The folder of one sweep job, from its overrides: sorted, so the same job lands in the same folder
    whatever the order of the sweep's arguments; filesystem-safe (`/`, spaces, quotes become `_`); unique: a
    name that making it safe changed (`dataset.path=/a/b.npz` and `dataset.path=/a_b.npz` both read
    `dataset.path=_a_b.npz`) or that is too long (it keeps its start) gains a digest of the whole. No overrides:
    "default".

    The folders of sweeps named before names were unique are found again: a top-level `key=a/b`, how a nested
    config-group choice reads (`experiment=demo/baseline`), becomes `key=a_b` without a digest, as it always did
    (it could only meet a choice named `a_b` of the same group); a job whose name without the digest already
    holds its run (its metrics.json) keeps that folder, and a job whose plain name holds the run of another
    job, named into it that way, takes the name with the digest.

    Top-level keys (method=, seed=, dataset=) sort before nested ones (method.alpha=, trainer.epochs=), so a
    shortened name still starts with what usually tells the jobs of a sweep apart. An override of a key outside
    the run identity (`_names_no_folder`: resume=, trainer.progress_bar=, hardware.num_workers=, logger= ...)
    names no folder: a sweep re-run with resume=reevaluate, other loggers or other workers finds its jobs.

    A sweep named when only `logger` overrides were left out is found again too: when this job's folder holds
    no run yet and the folder the old rule names holds this job's run (the same overrides), that one is used."""
    parts = _job_parts(overrides)
    name = _folder_name(parts, _names_no_folder)
    legacy = _job_parts(overrides, _legacy_names_no_folder)
    if legacy != parts and _held_job(name, _names_no_folder) is None:
        old = _folder_name(legacy, _legacy_names_no_folder)
        if _held_job(old, _legacy_names_no_folder) == legacy:
            return old
    return name


def _folder_name(parts: list[str], leave_out) -> str:
    """The (safe, unique) folder name of a job's sorted overrides, as `job_dir_name` describes it."""
    if not parts:
        return "default"
    whole = ",".join(parts)
    name = _UNSAFE.sub("_", whole).strip("._") or "job"
    readable = ",".join(p.replace("/", "_") if _GROUP_CHOICE.fullmatch(p) else p for p in parts)
    if len(name) > MAX_JOB_DIR:
        unique = False
    else:
        held = _held_job(name, leave_out)
        unique = held == parts if name != readable else held in (None, parts)
    if not unique:
        digest = hashlib.sha256(whole.encode()).hexdigest()[:10]
        name = f"{name[:MAX_JOB_DIR - 11].rstrip('._,')}-{digest}"
    return name


def _held_job(name: str, leave_out=_names_no_folder) -> list[str] | None:
    """The overrides of the run in folder `name` of the running sweep (its metrics.json), less those `leave_out`
    names no folder; None: no such run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        record = json.loads((Path(HydraConfig.get().sweep.dir) / name / "metrics.json").read_text())
        return _job_parts(record["overrides"], leave_out)
    except Exception:  # noqa: BLE001 - not a sweep, no such folder, an unreadable record: nothing known
        return None
