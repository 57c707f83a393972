"""`mmbalance prepare <dataset> --root RAW [--out PREPARED] [--workers N] [--set key=value ...]`.

One command per benchmark dataset turns the raw tree a user downloaded into the prepared cache its loader reads
fast; docs/datasets.md ("The prepared folder") lists what it writes. A preparer is
`mmbalance.data.<key>.prepare(ctx: PrepareContext, **options) -> dict` with its key in `PREPARERS`. It validates
the raw tree (a `DataError` naming the path when no known layout matches), writes through `ctx.folder` (a
`PreparedFolder`, which the loaders read back), extracts in parallel with `ctx.map`, keeps finished outputs
unless `ctx.force`, and records corrupt, missing or non-finite media with `ctx.problem`: skipped with a count and
listed in prepare_report.txt, never silently. Its summary is printed and saved as prepare_summary.json.

A prepared folder is a record of one prepare: prepare_status.json, written before anything else, says which dataset
it belongs to, the command that writes it and whether that command finished; a loader reads only a folder whose
last prepare finished (`resolve_prepared`), and a prepare refuses a folder that holds another dataset's output.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import inspect
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

# Explicit and import-free, like the method registry (a key equals a file name and a config name); the module
# is imported only when its dataset is prepared, so `prepare --help` stays fast. tests/test_prepare_command.py
# checks that each key's config builds from mmbalance.data.<key> and that no other module defines `prepare`.
PREPARERS = ("balanced_av", "cmu_mosei", "cremad", "food101", "kinetics_sounds", "ucf101", "vggsound")

DEFAULT_OUT = "mmbalance_prepared"  # prepare's --out when none is given, and where `prepared: auto` looks
MANIFEST = "manifest.csv"
CLASSES = "classes.json"
REPORT = "prepare_report.txt"
SUMMARY = "prepare_summary.json"
CACHE_META = "cache.json"  # a prepared folder's array cache: what it holds and how it was made
# written first by every prepare and last when it finishes: the dataset, the command and whether it finished
STATUS = "prepare_status.json"
# files by which a folder is recognised as prepare's output (also one an earlier mmbalance wrote, without STATUS)
OUTPUT_FILES = (STATUS, SUMMARY, MANIFEST, CACHE_META, CLASSES, REPORT, "recipe.json")
# a --set option named differently from the dataset builder's parameter it sets: checked against that hint
BUILDER_NAMES = {"size": "image_size", "fps": "video_fps", "extract_fps": "video_fps"}


# the clip-list files read while `run_prepare` runs: {absolute path: [size, sha1]}; None outside a prepare
_listings: dict[str, list] | None = None


def record_listing(path: str | Path) -> None:
    """Note a file a dataset's clip list (ids, labels, splits) is read from. During `mmbalance prepare` its size and
    content digest go into the summary (`listed_from`), so a loader can tell that the folder is out of date when the
    file changed afterwards (`PreparedFolder.require`). A no-op outside a prepare (the raw path reads it anyway)."""
    if _listings is not None:
        _listings[os.path.abspath(path)] = _listing_stamp(path)


def _listing_stamp(path: str | Path) -> list | None:
    """[size, sha1 of the content] (content, not modification time: a copied tree or a touched file is unchanged);
    None when the file cannot be read."""
    import hashlib

    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return [len(data), hashlib.sha1(data).hexdigest()]


@dataclass
class PrepareContext:
    """What a preparer gets: the raw root, the output folder, and how to run."""

    root: Path
    out: Path
    workers: int = 1
    force: bool = False
    progress: bool = True
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    dataset: str = ""
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what was changed)

    @property
    def folder(self) -> PreparedFolder:
        return PreparedFolder(self.out, self.dataset)

    def problem(self, path: str | Path, why: str) -> None:
        """Record a missing or unreadable media file; it is skipped and listed in prepare_report.txt."""
        self.problems.append((str(path), why))

    def note(self, path: str | Path, what: str) -> None:
        """Record an item that is kept but was changed (non-finite values replaced, say): listed in
        prepare_report.txt after the skipped ones, not counted as skipped. `what` says what was changed."""
        self.notes.append((str(path), what))

    def map(self, fn: Callable, items: Sequence, desc: str) -> list:
        """fn(item) for every item, on `workers` processes, in order, with a progress bar. `fn` must be a
        module-level function (it is pickled to the workers). An exception inside `fn` propagates; functions that
        may meet bad media return an error marker instead and let the caller record it with `problem()`."""
        from tqdm import tqdm

        def run(results) -> list:
            return list(tqdm(results, total=len(items), desc=desc, disable=not self.progress, leave=False,
                             file=sys.stderr))

        if self.workers <= 1 or len(items) <= 1:
            return run(map(fn, items))
        # the workers ignore Ctrl-C (the terminal sends it to them too): only this process stops, with one line
        # (`main`), instead of a traceback per worker; what is queued is cancelled, not waited for
        pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_ignore_interrupt)
        try:
            results = run(pool.map(fn, items, chunksize=max(1, len(items) // (self.workers * 16))))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results


def _ignore_interrupt() -> None:
    """A `PrepareContext.map` worker's initializer: SIGINT is for the main process, which stops the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PreparedFolder:
    """The folder `mmbalance prepare` writes and a loader reads: manifest.csv (id, label, split, ...),
    classes.json, json side files (cache.json, recipe.json, prepare_summary.json, ...) and .npy arrays with their
    finite-check sidecars (data/finite.py). Every write is atomic; every read error names the file and the
    command that makes it."""

    def __init__(self, path: str | Path, dataset: str = ""):
        self.path, self.dataset = Path(path).expanduser(), dataset
        self.command = f"`mmbalance prepare {dataset}`" if dataset else "`mmbalance prepare` for this dataset"

    def require(self) -> PreparedFolder:
        if not self.path.is_dir():
            raise DataError(f"dataset.prepared {str(self.path)!r} is not a folder; run `mmbalance prepare "
                            f"{self.dataset or 'DATASET'} --root RAW --out {self.path}` first to write the prepared "
                            "folder, or set dataset.prepared=null to read the raw tree")
        check_dataset(self.path, self.dataset)
        self.check_listings()
        return self

    def check_listings(self) -> None:
        """A DataError when a file the clip list was read from (`listed_from`) has changed since the prepare: the
        folder's clips, labels and splits are then not the raw tree's. A file that is gone is not checked: a
        prepared folder is meant to work without its raw tree."""
        listed = self.summary.get("listed_from") or {}
        changed = [path for path, stamp in listed.items()
                   if os.path.exists(path) and _listing_stamp(path) != stamp]
        if changed:
            again = (prepare_state(self.path) or {}).get("complete_with")
            redo = f"`{again}`" if again else self.command
            raise DataError(f"dataset.prepared {str(self.path)!r} is out of date: {', '.join(changed[:3])}"
                            f"{' ...' if len(changed) > 3 else ''} changed after `mmbalance prepare` read the clip list "
                            f"from it, so the prepared clips, labels or splits are not the raw tree's. Run {redo} "
                            "again (what did not change is kept), or set dataset.prepared=null to read the raw tree")

    # -- reading

    def json(self, name: str, optional: bool = False) -> Any:
        """A json file of the folder ({} when `optional` and missing); DataError naming it when missing or invalid."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            if optional:
                return {}
            raise DataError(f"{path} is missing; run {self.command} first") from None
        except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            raise DataError(f"{path}: not readable json ({exc}); run {self.command} again with --force") from None

    @property
    def summary(self) -> dict:
        return self.json(SUMMARY, optional=True)

    def classes(self) -> list[str]:
        """classes.json: the explicit class-index map, persisted with the prepared data."""
        try:
            return list(self.json(CLASSES)["classes"])
        except (KeyError, TypeError) as exc:
            raise DataError(f"{self.path / CLASSES}: expected {{\"classes\": [names...]}} ({exc})") from None

    def rows(self, columns: Sequence[str] = ("id", "label", "split")) -> list[dict[str, str]]:
        """manifest.csv as dicts; DataError when it is missing, unreadable, empty or lacks one of `columns`."""
        path = self.path / MANIFEST
        if not path.is_file():
            raise DataError(f"{path} is missing; run {self.command} first")
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable manifest csv ({exc}); run {self.command} again") from None
        if not rows:
            raise DataError(f"{path} lists no clips; run {self.command} again")
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise DataError(f"{path}: columns {missing} are missing (found {list(rows[0])}); was it written by "
                            f"{self.command}? Prepare it again")
        return rows

    def cache_meta(self, required: bool = True) -> dict | None:
        """cache.json of the folder's array cache; None (or, when `required`, a DataError) without one."""
        if not (self.path / CACHE_META).is_file():
            if not required:
                return None
            raise DataError(f"{self.path / CACHE_META} is missing: dataset.prepared {str(self.path)!r} holds no "
                            f"cache; run {self.command} again (without --set cache=false), or set "
                            "dataset.prepared=null to decode the raw tree")
        return self.json(CACHE_META)

    def has(self, *names: str) -> bool:
        """Whether each of `names` is a file of the folder (an idempotent preparer's check before keeping them)."""
        return all((self.path / name).is_file() for name in names)

    def array(self, name: str, mmap_mode: str | None = "r"):
        from mmbalance.data.finite import open_npy

        return open_npy(self.path / name, mmap_mode=mmap_mode)

    # -- writing: to a temporary name, then renamed, so an interrupted prepare never leaves a half-written file

    @contextlib.contextmanager
    def _replacing(self, name: str, suffix: str = ".tmp"):
        """The temporary path to write `name` to; renamed over `name` when the block ends without an error."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + suffix)
        yield tmp
        os.replace(tmp, path)

    def write_text(self, name: str, text: str) -> None:
        with self._replacing(name) as tmp:
            tmp.write_text(text)

    def write_json(self, name: str, value: Any) -> None:
        self.write_text(name, json.dumps(value, indent=1, default=str) + "\n")

    def write_classes(self, classes: Sequence[str]) -> None:
        self.write_json(CLASSES, {"classes": list(classes)})

    def write_manifest(self, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
        """manifest.csv with a header; `columns` starts with id, label, split."""
        with self._replacing(MANIFEST) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write_array(self, name: str, array, finite_checked: bool = False) -> Path:
        """`finite_checked`: the caller made every value finite, which the sidecar records instead of a re-read."""
        import numpy as np

        from mmbalance.data import finite

        with self._replacing(name, ".tmp.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        path = self.path / name
        if finite_checked and finite.can_hold_nonfinite(np.asarray(array).dtype):
            finite.record_row_counts(path, {})
        return path


def prepare_state(folder: str | Path) -> dict | None:
    """What the last prepare into `folder` left: its prepare_status.json (`status` running, stopped, interrupted,
    shard or completed, the dataset, the command); for a folder an earlier mmbalance wrote, which has no status,
    {"status": "completed"} and its summary's dataset when it has prepare_summary.json; None when it holds neither."""
    folder = Path(folder)
    for name in (STATUS, SUMMARY):
        try:
            state = json.loads((folder / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):  # a damaged record is no proof that prepare finished
            return {"status": "unreadable", "file": name}
        if not isinstance(state, dict):
            return {"status": "unreadable", "file": name}
        return state if name == STATUS else {"status": "completed", "dataset": state.get("dataset")}
    return None


def unfinished(folder: Path, state: dict) -> str:
    """Why a loader cannot read `folder`, whose last prepare did not finish, and what finishes it."""
    status, again = state.get("status"), state.get("complete_with") or state.get("command")
    why = {"running": "it was stopped (killed), or is still running",
           "interrupted": "it was interrupted (Ctrl-C)",
           "stopped": f"it stopped with an error: {state.get('error')}",
           "shard": f"only shard runs wrote it (the last one: shard {state.get('shard')}), which extract media but "
                    "write no manifest or cache",
           "unreadable": f"{folder / str(state.get('file'))} is not readable json"}.get(status, f"status {status!r}")
    todo = f"Run `{again}` to complete it (what was finished is kept)" if again else \
        "Run `mmbalance prepare` into it again"
    return (f"the prepare into {folder} did not finish: {why}. {todo}, or set dataset.prepared=null to read the "
            "raw tree")


def check_dataset(folder: Path, dataset: str, state: dict | None = None) -> None:
    """A DataError when the prepared folder `folder` holds another dataset than `dataset` (its
    prepare_status.json, or the summary an earlier mmbalance wrote, names it): read as this dataset, it would fail
    later on missing columns or a recipe mismatch, or worse, not fail at all."""
    if not dataset:
        return
    state = prepare_state(folder) if state is None else state
    other = (state or {}).get("dataset")
    if other and other != dataset:
        raise DataError(f"{folder} holds the prepared {other} dataset, not {dataset}; point dataset.prepared at the "
                        f"folder `mmbalance prepare {dataset}` wrote (or run it: `mmbalance prepare {dataset} --root "
                        "RAW --out NEW_FOLDER`), or set dataset.prepared=null to read the raw tree")


def resolve_prepared(root: str | Path | None, prepared: str | Path | None, dataset: str = "") -> Path | None:
    """The prepared folder a builder reads: `prepared` itself; None = decode the raw tree under `root`;
    'auto' (every dataset config's default) = ROOT/mmbalance_prepared when `mmbalance prepare` wrote it there,
    else None. So after a default `prepare`, the preset plus `paths.data_dir=...` is the whole command.

    A folder whose last prepare did not finish (killed, stopped, only its shards run) is a DataError saying so and
    what completes it: its manifest, cache and summary may belong to two builds, or to none. With `dataset` (the
    builder's key), a folder of another dataset is a DataError saying so, before anything else is read
    (`PreparedFolder.require` checks it too)."""
    if prepared is None or str(prepared) == "":
        return None
    auto = str(prepared) == "auto"
    if auto and root is None:
        return None
    folder = Path(root).expanduser() / DEFAULT_OUT if auto else Path(prepared).expanduser()
    state = prepare_state(folder) if folder.is_dir() else None
    check_dataset(folder, dataset, state or {})
    if state is not None and state.get("status") != "completed":
        raise DataError(unfinished(folder, state))
    if auto and state is None:  # nothing prepared there (yet): the raw tree
        return None
    return folder  # an explicit folder that does not exist is PreparedFolder.require()'s error


def resolve(name: str) -> Callable:
    if name not in PREPARERS:
        raise UserError(f"prepare: unknown dataset {name!r}; expected one of {sorted(PREPARERS)}")
    return importlib.import_module(f"mmbalance.data.{name}").prepare


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """--set key=value pairs; values are parsed as YAML scalars (numbers, booleans, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"prepare --set {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(value)
    return options


def write_report(ctx: PrepareContext, stopped: bool = False, interrupted: bool = False) -> None:
    """prepare_report.txt: one line per skipped file (path<TAB>reason), or a line saying there were none, then one
    per item kept but changed (`ctx.note`); when the preparer `stopped` with an error (or was `interrupted` by
    Ctrl-C), the problems recorded until then and a last line saying so."""
    report = [f"{p}\t{why}" for p, why in ctx.problems] or ["# no missing or unreadable media"]
    report += [f"{p}\t{what}" for p, what in ctx.notes]
    if stopped or interrupted:
        how = "was interrupted (Ctrl-C)" if interrupted else "stopped with an error"
        report.append(f"# prepare {ctx.dataset} {how} before finishing; this lists the problems recorded until then")
    ctx.folder.write_text(REPORT, "\n".join(report) + "\n")


def builder(dataset: str) -> Callable | None:
    """The dataset's builder, `mmbalance.data.<key>.build_<key>` (its config's `_target_`)."""
    return getattr(importlib.import_module(f"mmbalance.data.{dataset}"), f"build_{dataset}", None)


def check_options(dataset: str, fn: Callable, options: dict[str, Any]) -> None:
    """Refuse, before anything is written, an option the preparer does not take and a value that its type hint or
    the dataset builder's hint of the same option (`BUILDER_NAMES`) refuses: the ranges config validation checks
    (mmbalance.constraints), so `--set extract_fps=0` is refused like `dataset.video_fps=0`."""
    import typing

    from mmbalance.constraints import value_problems

    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k != "ctx"}
    unknown = [k for k in options if k not in params]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise UserError(f"prepare {dataset}: unknown --set option {', '.join(map(repr, unknown))}; its --set "
                        f"options are: {', '.join(params)}")
    own = typing.get_type_hints(fn, include_extras=True)
    build = builder(dataset)
    built = typing.get_type_hints(build, include_extras=True) if build is not None else {}
    problems = []
    for key, value in options.items():
        found = value_problems(f"--set {key}", value, own[key]) if key in own else []
        name = key if key in built else BUILDER_NAMES.get(key)
        if not found and value is not None and name in built:
            found = value_problems(f"--set {key}", value, built[name])
        problems += found
    if problems:
        raise UserError(f"prepare {dataset}: " + "; ".join(problems))


def claim(out: Path, dataset: str) -> None:
    """Refuse an --out that prepare must not write into: a file, another dataset's prepared folder, or a folder of
    other files (a raw tree, say), whose manifest.csv or arrays would be overwritten. Nothing is written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; expected a folder for the prepared dataset")
    state = prepare_state(out)
    other = (state or {}).get("dataset")
    if other and other != dataset:
        raise UserError(f"--out {str(out)!r} holds the prepared {other} folder; `mmbalance prepare {dataset}` there "
                        f"would replace its manifest and cache. Choose another --out for {dataset}, or remove that "
                        "folder first")
    if state is None and not any((out / name).exists() for name in OUTPUT_FILES) and \
            any(not entry.name.startswith(".") for entry in os.scandir(out)):
        raise UserError(f"--out {str(out)!r} is not empty and was not written by `mmbalance prepare` (it has no "
                        f"{STATUS}); prepare writes {MANIFEST}, {CLASSES} and its cache there, which would "
                        "overwrite files of the same name. Choose a new or empty folder")


def recorded_root(out: Path) -> str | None:
    """The absolute --root the last prepare into `out` read (its prepare_status.json; the summary of an earlier
    mmbalance when that recorded an absolute one), or None."""
    for name in (STATUS, SUMMARY):
        try:
            root = json.loads((out / name).read_text()).get("root")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(root, str) and os.path.isabs(root):
            return root
    return None


def command_line(dataset: str, root: Path, out: Path, options: dict[str, Any]) -> str:
    """The `mmbalance prepare` command with these options, as a user would type it (values as YAML scalars)."""
    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, default=str)

    sets = [f"--set {shlex.quote(f'{k}={value(v)}')}" for k, v in options.items()]
    return " ".join([f"mmbalance prepare {dataset} --root {shlex.quote(str(root))} --out {shlex.quote(str(out))}",
                     *sets])


def run_prepare(dataset: str, root: str | Path, out: str | Path | None = None, workers: int = 1,
                force: bool = False, progress: bool = True, **options) -> dict:
    """Programmatic `mmbalance prepare`: returns the summary (also saved as prepare_summary.json).

    The options are checked and the folder claimed before anything is written. prepare_status.json then marks the
    folder as this dataset's, with the command, and status `running`; the previous summary goes (it described the
    folder before this prepare). At the end the summary is written and the status becomes `completed` (`shard`
    after a shard run, which writes no manifest or cache); an error or Ctrl-C records `stopped` / `interrupted`."""
    fn = resolve(dataset)
    root = Path(root).expanduser()
    out = Path(out).expanduser() if out else root / DEFAULT_OUT
    if not root.is_dir():
        hint = "; a single file is given as --root FOLDER --set file=NAME" if "file" in inspect.signature(fn).parameters \
            else ""
        raise DataError(f"--root {str(root)!r} is not a folder{hint}")
    check_options(dataset, fn, options)
    claim(out, dataset)
    ctx = PrepareContext(root=root, out=out, workers=max(1, int(workers)), force=force, progress=progress,
                         dataset=dataset)
    previous_root = recorded_root(out)
    out.mkdir(parents=True, exist_ok=True)
    shard = options.get("shard") not in (None, "", False)
    # absolute: the command is shown by loaders, which run from anywhere
    where = (root.absolute(), out.absolute())
    status = {"dataset": dataset, "status": "running", "command": command_line(dataset, *where, options),
              "complete_with": command_line(dataset, *where, {k: v for k, v in options.items() if k != "shard"}),
              "root": str(where[0]), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    moved = previous_root is not None and previous_root != str(where[0])
    if moved:  # nothing of the old tree is kept: each output records its source (layout.extract_media)
        log.warning("%s was prepared from --root %s; this prepare reads --root %s: every output extracted from the "
                    "old root is extracted again and the cache is rebuilt", out, previous_root, where[0])
    ctx.folder.write_json(STATUS, status)
    (out / SUMMARY).unlink(missing_ok=True)
    started = time.time()
    global _listings  # the clip-list files the preparer reads (`record_listing`), for the summary's listed_from
    _listings = {}
    try:
        summary = dict(fn(ctx, **options) or {})
        if _listings:
            summary["listed_from"] = _listings
    except BaseException as exc:  # an error (or Ctrl-C) may cite the report ("no usable clip"): keep what was found
        interrupted = isinstance(exc, KeyboardInterrupt)
        write_report(ctx, stopped=True, interrupted=interrupted)
        ctx.folder.write_json(STATUS, {**status, "status": "interrupted" if interrupted else "stopped",
                                       "error": str(exc) or type(exc).__name__})
        raise
    finally:
        _listings = None
    write_report(ctx)
    summary.update(dataset=dataset, root=str(root), out=str(out), skipped=len(ctx.problems),
                   report=str(out / REPORT), seconds=round(time.time() - started, 2))
    if moved:
        summary["root_changed"] = f"{previous_root} -> {where[0]}: outputs of the old root were extracted again"
    finished = {"finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if shard:  # its summary is kept in the status: the folder is not complete until the run without shard
        ctx.folder.write_json(STATUS, {**status, **finished, "status": "shard", "shard": summary.get("shard"),
                                       "summary": summary})
    else:
        ctx.folder.write_json(SUMMARY, summary)
        ctx.folder.write_json(STATUS, {**status, **finished, "status": "completed"})
    return summary


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmbalance prepare",
        description="Validate a dataset's raw tree and write the prepared cache its loader reads "
                    "(manifest.csv, classes.json, extracted frames and audio features). See README: Datasets.")
    parser.add_argument("dataset", choices=sorted(PREPARERS))
    parser.add_argument("--root", required=True, help="the raw dataset folder as downloaded")
    parser.add_argument("--out", default=None, help=f"prepared cache folder (default: ROOT/{DEFAULT_OUT}, which the "
                        "dataset configs' `prepared: auto` finds)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--force", action="store_true", help="redo outputs that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="a dataset-specific option (repeatable), e.g. --set fps=2")
    args = parser.parse_args(argv)
    try:
        summary = run_prepare(args.dataset, args.root, args.out, args.workers, args.force,
                              not args.no_progress, **parse_options(args.options))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one line, not a traceback: the folder records it (status `interrupted`)
        print(f"interrupted: prepare {args.dataset} stopped before finishing; run the same command to continue; "
              "what was finished is kept", file=sys.stderr)
        return 130
    for key, value in summary.items():
        print(f"{key}: {value}")
    if summary["skipped"]:
        print(f"{summary['skipped']} missing or unreadable media skipped; listed in {summary['report']}")
    return 0

