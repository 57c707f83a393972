"""Run folders read back into one table (`load_runs`), and the order and number format every table shares.

Reads only each run's `metrics.json` (see DESIGN.md, "Results contract"). Runs group by (dataset, method,
variant), where the variant names the settings that differ: a method's own (`method.*`: an alpha sweep, a unimodal
run per modality) between the runs of that method, and every other one (the epochs, the optimizer, another
precision or world size, other data) between any runs of the dataset, whatever their method, so that rows trained
differently never look alike; that second part is the row's `context`, which a baseline must share to be the row's
reference. This needs no knowledge of the methods. What
counts as a setting is the run's identity (`engine/identity.py`, the one list of what determines a result), so a
run the report counts as a repeat of another (same settings and seed) is one that training would take for the
same run. Free of torch, so `mmbalance report` starts fast.
"""

from __future__ import annotations

import hashlib
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

from mmbalance.engine.identity import canonical, comparable_data, run_identity
from mmbalance.engine.run_folder import SUPERSEDED
from mmbalance.errors import UserError

__all__ = ["DASH", "FORCED", "GROUP_KEYS", "METHOD_ORDER", "MAE_POINTS", "PERCENT", "STATUSES", "counted",
           "forced_over_another_run", "format_pm", "is_regression", "load_runs", "natural_key", "order_key",
           "output_folder", "value_scale"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GROUP_KEYS = ["dataset", "method", "variant"]
# The statuses train.py writes; any other (or none) is read as "unknown", and "unreadable" and "forced" are the
# report's own.
STATUSES = ("completed", "failed", "interrupted", "running")
# A completed run that `resume=force` continued or re-tested from another run's folder (metrics.json
# `forced_resume`: a baseline's checkpoint re-tested under method=ogm_ge records ogm_ge's settings and the baseline's
# numbers) is no run of the settings it records: every reader (`report`, `gap`, the studies) leaves it out of the
# statistics, as it leaves out failed runs, with the reason FORCED_REASON names.
FORCED = "forced"
FORCED_REASON = "resume=force over another run"
# What a forced resume may change and still be the run it records: more epochs (docs/reliability.md: a finished run
# trained on with a larger `trainer.epochs` and resume=force equals a run that had that many epochs from the start),
# and what the report never separates runs by (the code's version, the report-only switches below).
EXTENDS = "trainer.epochs"

# What separates runs is the run identity (`engine/identity.run_identity`: the resolved config minus where and how
# visibly a run runs -- paths, loggers, progress bar, data-loading workers, thread counts -- with data locations
# counted below their `paths.*` folder), plus the world size, which the config does not hold (`hardware=ddp` takes it
# from torchrun; trainer.batch_size is per rank, so it sets the global batch). Nothing here adds a second list of
# what changes a result. On top of the identity the report only decides how runs are *counted* and *labelled*:
# Seeds (seed, dataset.seed, dataset.split_seed, method.kmeans_seed) are not variants but replicates: they tell
# repeats apart.
SEED_SUFFIX = "_seed"
# A switch of what a run reports, not of what it computes: a run without FLOP counts (eval.flops=false) belongs with
# its measured peers, its missing count shown as not measured (the identity keeps it: a record with and without
# counts are different records).
# Likewise how often the validation Shapley values are computed (eval.shapley_every: history.csv columns; training
# never reads them): docs/reliability.md lists both.
REPORT_ONLY_KEYS = frozenset({"eval.flops", "eval.shapley_every"})
# A hybrid's computed copy of its parts' settings: `parts` and `method.<part>.<key>` name what differs.
DERIVED_PREFIX = "method.resolved."
WORLD_SIZE = "world_size"  # top level of metrics.json; absent before hardware=ddp existed, i.e. one process
# The data a run was trained on, as a setting: only where runs with the same dataset settings recorded different
# `data_identity` (a features file overwritten in place), as a letter per distinct data (A, B, ...; `_mark_data`).
DATA = "data"
EXTRA_SETTINGS = (WORLD_SIZE, DATA)  # settings that are no config key: named as they are, last

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


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key))
        else:
            out[key] = v
    return out


def _canonical(value: Any) -> str:
    if value is _MISSING:
        return "\0missing"
    return canonical(value)  # as the run identity compares them: `alpha=1` and `alpha=1.0` are one setting


def _format_value(value: Any) -> str:
    if value is _MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # short where that is exact: the label is the group key, 0.1000001 is not 0.1
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _result_settings(config: dict, world_size: Any = None) -> dict[str, Any]:
    """{flat config key: value} of the settings that determine a run's result, as its identity has them
    (`engine/identity.run_identity`: locations below their `paths.*` folder, bookkeeping left out; a list is one
    value, as `flatten_config` keeps it), without the report-only switches (REPORT_ONLY_KEYS), plus `world_size`
    (None: one process)."""
    identity = run_identity(config, version="")["config"]
    identity.pop("mmbalance.version", None)  # the code's version is no setting of the experiment (nor is git_sha)
    # the identity indexes list items ("method.parts.0"): a list counts when any of its items does
    listed = {key.rsplit(".", n)[0] for key in identity for n in range(1, key.count(".") + 1)}
    out: dict[str, Any] = {}
    for key, value in flatten_config(config).items():
        if key in REPORT_ONLY_KEYS:
            continue
        if key in identity:
            out[key] = identity[key]  # a location as `${paths.data_dir}/cremad`: moving the data keeps the run
        elif key in listed:
            out[key] = value
    out[WORLD_SIZE] = 1 if world_size is None else world_size
    return out


def _labels_a_variant(key: str) -> bool:
    """A setting that may name a variant: not a replicate's seed, not a derived copy of other settings."""
    last = key.split(".")[-1]
    return not (last == "seed" or last.endswith(SEED_SUFFIX) or key.startswith(DERIVED_PREFIX))


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


def _is_method_setting(key: str) -> bool:
    """A setting of the method itself (`method.*`): what a method's runs may vary without leaving its row set."""
    return key == "method" or key.startswith("method.")


def _variant_parts(records: list[dict[str, Any]], keep, decide_from: list[dict[str, Any]] | None = None
                   ) -> tuple[list[dict[str, str]], list[str]]:
    """Per record, {name: "short=value"} of the settings (`_result_settings`, those with `keep(key)`) that differ
    among `decide_from` (default: `records`); and the full names of what differs (config-group choices, then keys).

    A config-group choice (backbone=resnet18, hardware=ddp) names the settings of its node that differ, when they
    do; a choice whose settings are all the same (logger=csv vs tensorboard, hardware=cpu vs gpu overridden to the
    same device and precision) names nothing. A setting under a named choice that differs between runs of the same
    choice is named too, so two runs share a label only when their settings are the same. A choice's name is
    `choice:<group>`."""
    with_config = [r for r in (records if decide_from is None else decide_from) if r["_settings"] is not None]
    if len(with_config) < 2:
        return [{} for _ in records], []

    keys: list[str] = []
    seen = set()
    for r in with_config:
        for k in r["_settings"]:
            if k not in seen and keep(k):
                seen.add(k)
                keys.append(k)
    keys.sort(key=lambda k: k in EXTRA_SETTINGS)  # config order, the world size and the data last
    varying = [k for k in keys if _labels_a_variant(k)
               and len({_canonical(r["_settings"].get(k, _MISSING)) for r in with_config}) > 1]

    choice_keys: list[str] = []
    for r in with_config:
        choice_keys += [k for k in r["_choices"] if k not in choice_keys]

    def node(choice: str) -> str:
        return choice.replace("/", ".") + "."

    varying_choices = [
        c for c in choice_keys
        if len({_canonical(r["_choices"].get(c, _MISSING)) for r in with_config}) > 1
        and any(k.startswith(node(c)) for k in varying)
    ]

    def differs_within_choice(key: str, choice: str) -> bool:
        by_choice: dict[str, set[str]] = {}
        for r in with_config:
            by_choice.setdefault(_canonical(r["_choices"].get(choice, _MISSING)), set()).add(
                _canonical(r["_settings"].get(key, _MISSING)))
        return any(len(values) > 1 for values in by_choice.values())

    # A swapped config group (another backbone) is named by its choice, not by its every key.
    varying = [k for k in varying
               if all(differs_within_choice(k, c) for c in varying_choices if k.startswith(node(c)))]
    short = _short_names([k for k in varying if k not in EXTRA_SETTINGS],
                         [k for r in with_config for k in r["_config"]])
    short.update({k: k for k in EXTRA_SETTINGS})

    out = []
    for r in records:
        if r["_settings"] is None:
            out.append({})
            continue
        parts = {f"choice:{c}": f"{c.split('/')[-1]}={_format_value(r['_choices'].get(c, _MISSING))}"
                 for c in varying_choices}
        parts.update({k: f"{short[k]}={_format_value(r['_settings'].get(k, _MISSING))}" for k in varying})
        out.append(parts)
    return out, [f"choice:{c}" for c in varying_choices] + varying


def _label_order(records: list[dict[str, Any]]) -> dict[str, int]:
    """The order of a label's parts: config-group choices, then settings in config order, the extras last."""
    names: list[str] = []
    for r in records:
        names += [f"choice:{c}" for c in r["_choices"] if f"choice:{c}" not in names]
    keys: list[str] = []
    for r in records:
        keys += [k for k in (r["_settings"] or {}) if k not in keys]
    keys.sort(key=lambda k: k in EXTRA_SETTINGS)
    return {name: i for i, name in enumerate(names + keys)}


def _join(parts: dict[str, str], order: dict[str, int]) -> str:
    return ", ".join(text for _, text in sorted(parts.items(), key=lambda item: order.get(item[0], len(order))))


def _name(part: str) -> str:
    """The full name of a label part: a key (`trainer.epochs`) or a config group (`backbone`)."""
    return part.removeprefix("choice:")


def _label_runs(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Set each run's `variant` and `context`; returns {dataset: the settings outside the methods' own that differ
    between runs of several methods on it}.

    The variant names every setting that differs between the runs: a method's own settings (`method.*`) as they
    differ between its runs, and every other setting (epochs, optimizer, backbone, data, world size, ...) as it
    differs between *any* runs of the dataset, whatever their method, so a method trained for 2 epochs never
    sits unlabelled beside a baseline trained for 3. `context` is that second part alone: rows compared with each
    other (a baseline as a reference) must share it."""
    for r in records:
        r["variant"], r["context"] = "", ""
    by_dataset: dict[str, list[dict]] = {}
    for r in records:
        if r["method"]:
            by_dataset.setdefault(r["dataset"], []).append(r)
    differing: dict[str, list[str]] = {}
    for dataset, runs in by_dataset.items():
        order = _label_order(runs)
        # the context is decided among the completed runs, the ones the tables compare: a run that failed on a bad
        # value (optimizer.lr=-1) must not label every method's completed rows with its setting; it is counted in
        # the row it agrees with on what the completed runs vary, and listed with its error. A method's own
        # settings are decided among all its runs: an alpha whose every run failed keeps a row of its own
        completed = [r for r in runs if r["status"] == "completed"]
        context, names = _variant_parts(runs, lambda k: not _is_method_setting(k), completed)
        by_method: dict[str, list[int]] = {}
        for i, r in enumerate(runs):
            by_method.setdefault(r["method"], []).append(i)
        own: list[dict[str, str]] = [{} for _ in runs]
        for rows in by_method.values():
            for i, parts in zip(rows, _variant_parts([runs[i] for i in rows], _is_method_setting)[0]):
                own[i] = parts
        for r, c, o in zip(runs, context, own):
            r["context"] = _join(c, order)
            r["variant"] = ", ".join(p for p in (_join(o, order), r["context"]) if p)  # the method's own first
        names = [_name(n) for n in names if n != DATA]  # runs on different data have their own warning
        if names and len(by_method) > 1:
            differing[dataset] = names
    return differing


def _data_digest(identity: dict) -> str:
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()[:8]


def _mark_data(records: list[dict[str, Any]]) -> list[str]:
    """Runs with the same dataset settings (every `dataset.*` setting, its seeds included) should have read the
    same data; where their recorded `data_identity` differs (a features file overwritten in place between runs),
    each gets the setting DATA, a letter per distinct data of its dataset settings in path order ("A", "B", ...),
    on every run of that dataset that records its data: they are never averaged together nor taken for repeats.
    Returns one line per such set of runs, naming them."""
    buckets: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: r["run_dir"]):
        if r["method"] and r["_settings"] is not None and isinstance(r.get("_data"), dict):
            dataset_settings = {k: v for k, v in r["_settings"].items() if k.startswith("dataset.")}
            buckets.setdefault((r["dataset"], _canonical(dataset_settings)), []).append(r)
    for runs in buckets.values():  # a key that some runs' records predate is compared by none of them
        for r, data in zip(runs, comparable_data(*(r["_data"] for r in runs))):
            r["_data"] = data
    digests = {key: list(dict.fromkeys(_data_digest(r["_data"]) for r in runs)) for key, runs in buckets.items()}
    conflicted = {dataset for (dataset, _), found in digests.items() if len(found) > 1}
    lines = []
    for key, runs in buckets.items():
        if key[0] not in conflicted:
            continue
        letters = {d: chr(ord("A") + i) if i < 26 else str(i + 1) for i, d in enumerate(digests[key])}
        for r in runs:
            r["_settings"][DATA] = letters[_data_digest(r["_data"])]
        if len(letters) < 2:
            continue
        first = runs[0]["_data"]
        differ = sorted({k for r in runs for k in set(first) | set(r["_data"])
                         if _canonical(first.get(k, _MISSING)) != _canonical(r["_data"].get(k, _MISSING))})
        each = "; ".join(f"data {letter} ({digest}): " + ", ".join(
            r["run_dir"] for r in runs if _data_digest(r["_data"]) == digest) for digest, letter in letters.items())
        lines.append(f"runs on {key[0]} with the same dataset settings were trained on different data (their "
                     f"data_identity differs in {', '.join(differ)}): {each}")
    return lines


def _record(file: Path) -> dict[str, Any]:
    run_dir = str(file.parent)
    try:
        data = _read_metrics(file)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        return {"run_dir": run_dir, "status": "unreadable", "error": f"{type(e).__name__}: {e}",
                "method_family": None, "_choices": {}, "_config": None, "_settings": None, "_metrics": {}}
    choices = data.get("choices") or {}
    config = data.get("config")
    seed = data.get("seed")
    if seed is None and isinstance(config, dict):
        seed = config.get("seed")
    metrics = {k: _as_number(v) for k, v in (data.get("metrics") or {}).items()
               if v is None or isinstance(v, (int, float, str))}
    if isinstance(config, dict) and (config.get("eval") or {}).get("flops") is False:
        # not measured (eval.flops=false): whatever number the record holds (older trainers wrote 0.0) is no FLOP count
        metrics.update({k: math.nan for k in metrics if k.startswith("flops/")})
    status, error = data.get("status"), data.get("error")
    if status not in STATUSES:
        status, error = "unknown", error or (f"status {status!r} is not one train.py writes" if status
                                             else "no status recorded")
    elif status == "completed" and not metrics:
        status, error = "unknown", "recorded as completed, but without metrics"
    elif status == "completed" and "forced_resume" in data:
        over = forced_over_another_run(data["forced_resume"])
        if over:
            status, error = FORCED, f"{FORCED_REASON}: {'; '.join(over)}"
    return {
        "run_dir": run_dir,  # where it lies now, not where it was written (results get copied)
        "status": status,
        "error": error,
        "method_family": data.get("method_family"),
        "seed": seed,
        "wall_time_s": data.get("wall_time_s"),
        "git_sha": data.get("git_sha"),
        "overrides": " ".join(map(str, data.get("overrides") or [])),
        "_choices": {k: v for k, v in choices.items() if not str(k).startswith("hydra/")},
        "_config": flatten_config(config) if isinstance(config, dict) else None,
        "_settings": _result_settings(config, data.get(WORLD_SIZE)) if isinstance(config, dict) else None,
        "_data": data.get("data_identity"),  # what the data were (engine/identity.data_identity); None: not recorded
        "_metrics": metrics,
    }


def forced_over_another_run(forced: Any) -> list[str]:
    """The differences ("key: old -> new", as train.py records them in `forced_resume`) that make a `resume=force`
    run another run's continuation; [] when it is the run it records: only more epochs (an extension, documented to
    equal the uninterrupted run) or what the report never separates runs by (`mmbalance.version`, REPORT_ONLY_KEYS).
    A record it cannot read (no differences listed, "... and N more") is another run's."""
    differences = forced.get("differences") if isinstance(forced, dict) else None
    if not isinstance(differences, list) or not differences:
        return ["its differences are not recorded"]
    over = []
    for line in map(str, differences):
        key, _, change = line.partition(": ")
        if key == "mmbalance.version" or key in REPORT_ONLY_KEYS:
            continue
        if key == EXTENDS:
            old, _, new = change.partition(" -> ")
            try:
                if int(old) < int(new):
                    continue
            except ValueError:
                pass
        over.append(line)
    return over


def _method_name(record: dict[str, Any]) -> str:
    """The method's config choice; a hybrid composed on the command line (method=compose method.parts=[a,b]) is
    named by its parts, `compose[a+b]`: different parts are different methods, never a knob of one method's
    balance curve."""
    choice = str(record["_choices"].get("method") or "?")
    parts = (record["_config"] or {}).get("method.parts")
    if choice == "compose" and isinstance(parts, list) and parts:
        return f"compose[{'+'.join(map(str, parts))}]"
    return choice


def _mark_repeats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `repeat_of` on every completed run whose (dataset, method, settings, seed) an earlier run by path already
    has: a copied folder or the same config re-run elsewhere is not an independent sample. The settings are the
    run's identity with its seeds (`_result_settings`), so runs that differ in anything that changes a result
    (precision, device, world size, ...) are never repeats. Returns the repeats."""
    first: dict[tuple, str] = {}
    repeats = []
    for r in sorted(records, key=lambda r: r["run_dir"]):
        r["repeat_of"] = None
        if r["status"] != "completed" or r["seed"] is None:  # without a seed a repeat cannot be told apart
            continue
        key = (r["dataset"], r["method"], _canonical(r["seed"]), _canonical(r["_settings"]))
        if key in first:
            r["repeat_of"] = first[key]
            repeats.append(r)
        else:
            first[key] = r["run_dir"]
    return repeats


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run found in or below `paths`: run_dir, status, error, choices, seed, variant, context (the
    variant's part outside the method's own settings), repeat_of, metrics.

    Failed runs are included; a metrics.json that cannot be read becomes a row with status
    "unreadable" and the reason in `error`; one with a status train.py does not write, or completed without
    metrics, has status "unknown"; a completed run that `resume=force` made of another run (`forced_resume`, other
    than an extension to more epochs) has status "forced" ("resume=force over another run: <differences>" in
    `error`): none of them is counted, nor taken for a repeat. A completed run with the variant and seed(s) of
    another (the first by path) names it in `repeat_of`: statistics count it once. The metric column names are in
    `df.attrs["metrics"]`; the settings outside the methods' own that differ between methods, per dataset, in
    `attrs["setting_differences"]`, and the runs with the same dataset settings but different recorded data in
    `attrs["data_conflicts"]`.
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

    for r in records:  # a run without any choice (unreadable, `{}`) names no group
        grouped = r["status"] != "unreadable" and bool(r["_choices"])
        r["dataset"] = str(r["_choices"].get("dataset") or "?") if grouped else ""
        r["method"] = _method_name(r) if grouped else ""
    forced = [r for r in records if r["status"] == FORCED]
    if forced:
        log.warning("%d run(s) were made by resume=force from another run's folder and are not counted (their "
                    "metrics.json records settings their results were not trained with): %s", len(forced),
                    "; ".join(f"{r['run_dir']} ({r['error']})" for r in forced))
    data_conflicts = _mark_data(records)
    for line in data_conflicts:
        log.warning("%s; they are not averaged together: each data is a variant of its own (data=A, B, ...)", line)
    differing = _label_runs(records)
    for dataset, names in differing.items():
        log.warning("runs on %s differ in %s, outside their methods' own settings: every row is labelled with "
                    "them, and a row is compared only with a baseline of the same settings", dataset,
                    ", ".join(names))
    repeats = _mark_repeats(records)
    if repeats:
        log.warning("%d completed run(s) repeat the variant and seed of another run and are not counted again "
                    "(each counts once, the first by path): %s", len(repeats),
                    "; ".join(f"{r['run_dir']} repeats {r['repeat_of']}" for r in repeats))

    choice_cols: list[str] = []
    metric_cols: list[str] = []
    for r in records:
        choice_cols += [k for k in r["_choices"] if k not in ("dataset", "method") and k not in choice_cols]
        metric_cols += [k for k in r["_metrics"] if k not in metric_cols]
    base_cols = ["run_dir", "status", "error", "dataset", "method", "method_family", *choice_cols, "seed", "variant",
                 "context", "repeat_of"]
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
    df.attrs["n_repeats"] = len(repeats)
    df.attrs["setting_differences"] = differing  # {dataset: [setting, ...]} outside the methods' own
    df.attrs["data_conflicts"] = data_conflicts
    return df


def counted(df: pd.DataFrame) -> pd.Series:
    """The runs statistics count: completed, and not a repeat of another run's variant and seed (`repeat_of`)."""
    if "repeat_of" not in df:  # a frame read back from an older runs.csv
        return df["status"] == "completed"
    return (df["status"] == "completed") & df["repeat_of"].isna()


def output_folder(paths: Sequence[Path], out_dir: str | Path | None) -> Path:
    """The folder a command writes into (`out_dir`, else the first path when it is a folder, else the folder of
    the first path: a run's metrics.json given alone reports into its run folder, as the run folder itself would,
    never into whatever folder the command was typed in), created; UserError naming it when it cannot be (a file
    of that name, no permission)."""
    out = Path(out_dir) if out_dir is not None else (paths[0] if paths[0].is_dir() else paths[0].parent)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; give another output folder (--out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    return out


# ---------------------------------------------------------------------------------- ordering and format


def natural_key(text: str) -> tuple:
    """Sort `alpha=0.3` before `alpha=1` before `alpha=10`."""
    tokens = re.split(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return tuple((0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(tokens) if t)


def order_key(dataset: str, method: str, variant: str) -> tuple:
    """Table order: by dataset, the references first, then methods alphabetically, variants naturally."""
    return (dataset, METHOD_ORDER.get(method, len(METHOD_ORDER)), method, natural_key(variant))


# How a value of the Shapley family (φ, imbalance) is shown, as (factor, digits): a classification run's are shares of
# accuracy, in %; a regression run's (dataset.task=regression) are MAE points, since its Shapley value is v = -MAE
# (metrics/shapley.py), so they are numbers in the score's own unit and never share a percentage column or axis.
PERCENT = (100.0, 1)
MAE_POINTS = (1.0, 3)
# A regression run's imbalance is in MAE points, its accuracy the acc-2 (non-negative) in %: a dataset's regression
# runs are a table (summary.md) or column group (benchmark) of their own, named so, never shared with classification.
REGRESSION_SUFFIX = " (regression)"


def is_regression(row: Any) -> bool:
    """Whether a summary row (`test/mae.mean`) or a run (`test/mae`) is of a regression run: it has a test MAE."""
    value = row.get("test/mae.mean", row.get("test/mae", math.nan))
    return value is not None and bool(pd.notna(value))


def task_dataset(row: Any) -> str:
    """The dataset a row is tabled under: `<dataset> (regression)` for a regression run's row, else the dataset."""
    return row["dataset"] + REGRESSION_SUFFIX if is_regression(row) else row["dataset"]


def value_scale(row: Any) -> tuple[float, int]:
    """(factor, digits) of the row's φ and imbalance: PERCENT, or MAE_POINTS for a regression run."""
    return MAE_POINTS if is_regression(row) else PERCENT


def with_count(text: str, k: Any, n: Any) -> str:
    """A table cell that says so when its mean is over only k of the row's n runs (a value some runs lack)."""
    return f"{text} (n={int(k)})" if pd.notna(k) and pd.notna(n) and 0 < int(k) < int(n) else text


def format_pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± std" scaled and rounded; DASH for what is not available (a std needs n >= 2)."""
    if mean is None or not np.isfinite(mean):
        return DASH
    m = f"{mean * scale:.{digits}f}"
    s = f"{std * scale:.{digits}f}" if std is not None and np.isfinite(std) else DASH
    return f"{m} ± {s}"
