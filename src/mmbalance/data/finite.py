"""The one non-finite input check every loader's build runs: NaN/Inf counted per modality key and split, raised
as one DataError that names the file and lists every offending (key, split, count) with the first few offending
row indices of each split (`ROWS_SHOWN`), so the rows can be found and cleaned.

Without it a NaN in training rows surfaces as "training diverged" (blaming the optimiser) and one in test rows
as a completed run at chance accuracy.

In-memory data (features files, synthetic, digits_av) is scanned on every build: it is small.
Prepared caches can be tens of GB, so they are scanned chunk-wise (`SCAN_CHUNK_BYTES` at a time, never the
whole array in memory) and the per-row result is kept in a small sidecar `<array>.finite.json` next to the
array, stamped with the array file's size and mtime. A build reads the sidecar and re-scans only when it is
missing, unreadable or stale (the array was rewritten since; size + mtime is the same trust `make` places in a
file, at no cost, where hashing would read the whole cache). `mmbalance prepare` writes the sidecars, so runs
never scan; a cache prepared before this check is scanned once by its first run (a read-only folder: by every
run, which is correct, only slower). Integer arrays (uint8 frames, token ids) cannot hold NaN/Inf and are
skipped without reading them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from mmbalance.errors import DataError

SPLIT_ORDER = ("train", "val", "test")
SCAN_CHUNK_BYTES = 64 << 20
SIDECAR_SUFFIX = ".finite.json"
SIDECAR_VERSION = 1
ROWS_SHOWN = 5  # offending row indices named per (key, split); the rest are counted

# {row: (NaN count, Inf count)} for the rows that hold any; clean rows are not listed
RowCounts = dict[int, tuple[int, int]]


def can_hold_nonfinite(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating)


def nonfinite_rows(x) -> RowCounts:
    """The rows of `x` (N, ...) holding NaN or Inf, with their counts. Read `SCAN_CHUNK_BYTES` at a time, so a
    memory-mapped array is never resident as a whole."""
    if not can_hold_nonfinite(x.dtype) or len(x) == 0:
        return {}
    row_bytes = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize)
    step = max(1, SCAN_CHUNK_BYTES // row_bytes)
    out: RowCounts = {}
    for start in range(0, len(x), step):
        block = np.asarray(x[start:start + step])
        if np.isfinite(block).all():  # the common case: one pass, no per-row counts
            continue
        block = block.reshape(len(block), -1)
        nan, inf = np.isnan(block).sum(1), np.isinf(block).sum(1)
        for i in np.flatnonzero(nan + inf):
            out[start + int(i)] = (int(nan[i]), int(inf[i]))
    return out


def _row_list(rows: list[int]) -> str:
    """[3, 17] -> 'rows 3, 17'; past ROWS_SHOWN: 'rows 0, 1, 2, 3, 4 and 19 more'."""
    shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN])
    more = f" and {len(rows) - ROWS_SHOWN} more" if len(rows) > ROWS_SHOWN else ""
    return f"{'row' if len(rows) == 1 else 'rows'} {shown}{more}"


def _raise_if_nonfinite(source: str, hits: Iterable[tuple[str, str, RowCounts, Iterable[int] | None]],
                        advice: str) -> None:
    """`hits`: (key, split, the array's RowCounts, rows of it that split uses or None for all). One DataError
    listing every non-zero NaN/Inf count per key and split, with the first offending rows of each split, e.g.
    "features file 'x.npz': non-finite values in `audio`: 3 NaN in train, 1 Inf in test (row 0 of train; row 45
    of test); row indices count from 0 in the arrays; clean or drop those rows"."""
    counts: dict[str, dict[str, list[int]]] = {}  # {key: {split: [NaN, Inf]}}
    bad_rows: dict[str, dict[str, set[int]]] = {}
    for key, split, bad, rows in hits:
        # the offending rows the split uses (None: every row), each as often as `rows` lists it
        used = list(bad) if not bad or rows is None else [r for r in np.asarray(rows).tolist() if r in bad]
        total = counts.setdefault(key, {}).setdefault(split, [0, 0])
        total[0] += sum(bad[r][0] for r in used)
        total[1] += sum(bad[r][1] for r in used)
        bad_rows.setdefault(key, {}).setdefault(split, set()).update(used)
    parts = []
    for key, by_split in counts.items():
        order = [s for s in SPLIT_ORDER if s in by_split] + [s for s in by_split if s not in SPLIT_ORDER]
        found = [f"{n} {kind} in {s}" for s in order for n, kind in zip(by_split[s], ("NaN", "Inf")) if n]
        if found:
            where = [f"{_row_list(sorted(r))} of {s}" for s in order if (r := bad_rows[key][s])]
            parts.append(f"`{key}`: " + ", ".join(found) + (f" ({'; '.join(where)})" if where else ""))
    if parts:
        raise DataError(f"{source}: non-finite values in " + "; in ".join(parts)
                        + f"; row indices count from 0 in the arrays; {advice}")


def check_arrays(source: str, arrays: Mapping[str, object], splits: Mapping[str, np.ndarray], advice: str) -> None:
    """In-memory arrays {key: (N, ...)} whose rows `splits` {split: row indices} are used: raise when any is
    non-finite (see `_raise_if_nonfinite`)."""
    bad = {key: nonfinite_rows(x) for key, x in arrays.items()}
    _raise_if_nonfinite(source, ((key, s, b, r) for key, b in bad.items() for s, r in splits.items()), advice)


# ---------------------------------------------------------------------------------------------------------------
# prepared caches: .npy files with a sidecar


def open_npy(path: str | Path, mmap_mode: str | None = "r") -> np.ndarray:
    """A prepared .npy array (memory-mapped by default); DataError naming the file when it is missing, truncated
    or not an .npy."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"prepared array {str(path)!r} is missing; run `mmbalance prepare` again") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"prepared array {str(path)!r} is not a readable .npy array ({exc}); run `mmbalance "
                        "prepare` again with --force") from None


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"version": SIDECAR_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_row_counts(path: str | Path, bad: RowCounts) -> None:
    """Write the sidecar of the array at `path`: its stamp and `bad`. Best effort: an unwritable folder only
    means the next build scans again. A unique temporary name keeps concurrent runs of a sweep from mixing."""
    path = Path(path)
    body = {**_stamp(path), "rows": {str(r): list(c) for r, c in sorted(bad.items())}}
    side = sidecar_path(path)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body) + "\n")
        os.replace(tmp, side)
    except OSError:
        tmp.unlink(missing_ok=True)


def _recorded(path: Path) -> RowCounts | None:
    """The sidecar's row counts when they were taken of the array as it is now, else None."""
    try:
        body = json.loads(sidecar_path(path).read_text())
        if {k: body.get(k) for k in ("version", "size", "mtime_ns")} != _stamp(path):
            return None
        return {int(r): (int(c[0]), int(c[1])) for r, c in body["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def cached_row_counts(path: str | Path) -> RowCounts:
    """The non-finite rows of the prepared array at `path`: from its sidecar when current, else by a chunked
    scan whose result is recorded in the sidecar."""
    path = Path(path)
    array = open_npy(path)
    if not can_hold_nonfinite(array.dtype):
        return {}
    bad = _recorded(path)
    if bad is None:
        bad = nonfinite_rows(array)
        record_row_counts(path, bad)
    return bad


def check_cached(source: str, parts: Iterable[tuple[str, str, Path, np.ndarray | None]], advice: str) -> None:
    """Prepared arrays: `parts` = (key, split, .npy path, rows of it that split uses or None for all). Raise one
    DataError naming `source` when any used row holds NaN/Inf."""
    parts = list(parts)
    # one file serves several splits: read its sidecar (or scan) once
    per_file = {path: cached_row_counts(path) for path in dict.fromkeys(path for _, _, path, _ in parts)}
    _raise_if_nonfinite(source, ((key, split, per_file[path], rows) for key, split, path, rows in parts), advice)
