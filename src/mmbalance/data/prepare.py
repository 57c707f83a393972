"""`mmbalance prepare <dataset> --root RAW [--out PREPARED] [--workers N] [--set key=value ...]`.

One command per benchmark dataset turns the raw tree a user downloaded into the prepared cache its loader reads
fast; docs/datasets.md ("The prepared folder") lists what it writes. A preparer is
`mmbalance.data.<key>.prepare(ctx: PrepareContext, **options) -> dict` with its key in `PREPARERS`. It validates
the raw tree (a `DataError` naming the path when no known layout matches), writes through `ctx.folder` (a
`PreparedFolder`, which the loaders read back), extracts in parallel with `ctx.map`, keeps finished outputs
unless `ctx.force`, and records corrupt, missing or non-finite media with `ctx.problem`: skipped with a count and
listed in prepare_report.txt, never silently. Its summary is printed and saved as prepare_summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbalance.errors import DataError, UserError

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

    @property
    def folder(self) -> PreparedFolder:
        return PreparedFolder(self.out, self.dataset)

    def problem(self, path: str | Path, why: str) -> None:
        """Record a missing or unreadable media file; it is skipped and listed in prepare_report.txt."""
        self.problems.append((str(path), why))

    def map(self, fn: Callable, items: Sequence, desc: str) -> list:
        """fn(item) for every item, on `workers` processes, in order, with a progress bar. `fn` must be a
        module-level function (it is pickled to the workers). An exception inside `fn` propagates; functions that
        may meet bad media return an error marker instead and let the caller record it with `problem()`."""
        from tqdm import tqdm

        serial = self.workers <= 1 or len(items) <= 1
        with contextlib.nullcontext() if serial else ProcessPoolExecutor(max_workers=self.workers) as pool:
            results = map(fn, items) if serial else \
                pool.map(fn, items, chunksize=max(1, len(items) // (self.workers * 16)))
            return list(tqdm(results, total=len(items), desc=desc, disable=not self.progress, leave=False,
                             file=sys.stderr))


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
        return self

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
                            f"cache; run {self.command} again (without --set cache=false)")
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


def resolve_prepared(root: str | Path | None, prepared: str | Path | None) -> Path | None:
    """The prepared folder a builder reads: `prepared` itself; None = decode the raw tree under `root`;
    'auto' (every dataset config's default) = ROOT/mmbalance_prepared when `mmbalance prepare` finished writing
    it there (its prepare_summary.json exists), else None. So after a default `prepare`, the preset plus
    `paths.data_dir=...` is the whole command."""
    if prepared is None or str(prepared) == "":
        return None
    if str(prepared) != "auto":
        return Path(prepared).expanduser()
    if root is None:
        return None
    folder = Path(root).expanduser() / DEFAULT_OUT
    return folder if (folder / SUMMARY).is_file() else None


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


def write_report(ctx: PrepareContext, stopped: bool = False) -> None:
    """prepare_report.txt: one line per skipped file (path<TAB>reason), or a line saying there were none; when the
    preparer `stopped` with an error, the problems recorded until then and a last line saying so."""
    report = [f"{p}\t{why}" for p, why in ctx.problems] or ["# no missing or unreadable media"]
    if stopped:
        report.append(f"# prepare {ctx.dataset} stopped with an error before finishing; this lists the problems "
                      "recorded until then")
    ctx.folder.write_text(REPORT, "\n".join(report) + "\n")


def run_prepare(dataset: str, root: str | Path, out: str | Path | None = None, workers: int = 1,
                force: bool = False, progress: bool = True, **options) -> dict:
    """Programmatic `mmbalance prepare`: returns the summary (also saved as prepare_summary.json)."""
    fn = resolve(dataset)
    root = Path(root).expanduser()
    out = Path(out).expanduser() if out else root / DEFAULT_OUT
    ctx = PrepareContext(root=root, out=out, workers=max(1, int(workers)), force=force, progress=progress,
                         dataset=dataset)
    if not root.is_dir():
        raise DataError(f"--root {str(root)!r} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        summary = dict(fn(ctx, **options) or {})
    except BaseException:  # an error (or Ctrl-C) may cite the report ("no usable clip"): keep what was found
        write_report(ctx, stopped=True)
        raise
    write_report(ctx)
    summary.update(dataset=dataset, root=str(root), out=str(out), skipped=len(ctx.problems),
                   report=str(out / REPORT), seconds=round(time.time() - started, 2))
    ctx.folder.write_json(SUMMARY, summary)
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
    except TypeError as exc:  # an unknown --set option reaches the preparer's signature
        if "unexpected keyword argument" in str(exc):
            import inspect

            known = [p for p in inspect.signature(resolve(args.dataset)).parameters if p != "ctx"]
            print(f"error: prepare {args.dataset}: {exc}; its --set options are: {', '.join(known)}", file=sys.stderr)
            return 2
        raise
    for key, value in summary.items():
        print(f"{key}: {value}")
    if summary["skipped"]:
        print(f"{summary['skipped']} missing or unreadable media skipped; listed in {summary['report']}")
    return 0

