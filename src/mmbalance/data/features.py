"""Bring your own features: one .npz file with `label`, optional `split` and `classes`, and one numeric array per
modality (docs/datasets.md#your-own-features-features). `label` holds classes (dataset.task=classification, the
default) or, with dataset.task=regression, a float score per row (one model output, the regression metrics and
losses of CMU-MOSEI's regression task)."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from mmbalance.constraints import Fraction, NonNegativeInt
from mmbalance.data.batch import ArrayDataset, DataSplits, ModalitySpec, MultimodalDataset, stratified_split
from mmbalance.data.finite import check_arrays
from mmbalance.errors import DataError, UserError
from mmbalance.metrics.regression import resolve_loss

log = logging.getLogger("mmbalance")

FORMAT = (
    "an .npz with `label` (N,) integer classes (float scores with dataset.task=regression), optional `split` (N,) "
    "of 'train'/'val'/'test', optional `classes` (C,) class names, and every other key a numeric modality of shape "
    "(N, D) or (N, T, D)"
)
SCORE_NAME = "score"  # the one output of a regression run (class_names)
# what a modality array of another dtype kind holds (numpy's dtype.kind); bool, int and float are read as float32
NOT_NUMBERS = {"U": "strings", "S": "byte strings", "c": "complex numbers; store the real and imaginary parts as "
               "separate features", "M": "dates", "m": "time spans", "V": "structured records"}


def _file_digest(file: Path) -> str:
    """sha256 of the file's bytes (16 hex digits), read in chunks: a features file may be gigabytes."""
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at `file`; one DataError naming the file for anything else (empty, truncated,
    text, a plain .npy, arrays that need pickle)."""
    try:
        with file.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise DataError(f"dataset.path: cannot read features file {str(file)!r} ({exc})") from None
    if not head:
        found = "an empty file"
    elif head.startswith(b"\x93NUMPY"):
        found = "a single .npy array, not named arrays"
    elif not head.startswith(b"PK"):  # every .npz is a zip archive
        found = f"not a zip archive of .npy arrays; it starts with {head!r}"
    else:
        try:
            with np.load(file, allow_pickle=False) as data:
                arrays, pickled = {}, []
                for key in data.files:
                    try:
                        arrays[key] = data[key]
                    except ValueError as exc:
                        if "Object arrays" not in str(exc):
                            raise
                        pickled.append(key)
            if not pickled:
                return arrays
            # object arrays load only through pickle, which can run code from the file: never enabled here
            found = (f"{', '.join(f'`{k}`' for k in pickled)}: an array of dtype object, which needs pickle "
                     "(np.load(allow_pickle=True)), and mmbalance never unpickles a data file, since pickle can run "
                     "code from it; save numbers as a numeric array (np.asarray(x, dtype=np.float32)), `split` and "
                     "`classes` as strings (dtype '<U')")
        except EOFError:
            found = "a truncated file"
        except zipfile.BadZipFile as exc:
            found = f"a truncated or damaged zip archive ({exc})"
        except (OSError, ValueError, KeyError, zipfile.LargeZipFile, NotImplementedError) as exc:
            found = str(exc)  # numpy's own words
    raise DataError(f"dataset.path: features file {str(file)!r} is not a readable .npz ({found}); expected {FORMAT}")


def build_features(
    path: str,
    test_fraction: Fraction = 0.2,
    val_fraction: Fraction = 0.1,
    split_seed: NonNegativeInt = 0,
    modalities: list[str] | None = None,
    standardize: bool = True,
    task: Literal["classification", "regression"] = "classification",
    loss: Literal["auto", "cross_entropy", "l1", "mse"] = "auto",
) -> DataSplits:
    """Load a features file (see FORMAT; splits and tasks: docs/datasets.md#your-own-features-features).
    `modalities` picks and orders the modality keys (default: file order); `loss` is read by the run.

    `standardize` scales every feature with the *train* split's mean and std (a sequence's over samples and steps;
    a constant feature is only centred): real feature files mix scales (areas in the thousands beside ratios below
    one), which an SGD-trained MLP does not survive, while a logistic regression on standardised features does.
    """
    resolve_loss(task, loss)  # an unknown task, or a loss that does not fit it, is refused before any file is read
    regression = task == "regression"
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise DataError(f"dataset.path: features file {str(file)!r} {what} (expected {FORMAT})")
    arrays = read_npz(file)
    if "label" not in arrays:
        raise DataError(f"{file}: no `label` array (found {sorted(arrays)}); expected {FORMAT}")
    labels = arrays.pop("label")
    split = arrays.pop("split", None)
    class_names = arrays.pop("classes", None)
    labels = _scores(file, labels, class_names) if regression else _classes(file, labels)
    num_classes = 1 if regression else int(labels.max()) + 1
    if class_names is not None:  # the file's own class list (never with regression): its length is C
        if class_names.ndim != 1 or len(set(class_names.tolist())) != len(class_names):
            raise DataError(f"{file}: `classes` must be a 1-D array of distinct class names, got shape "
                            f"{class_names.shape} dtype {class_names.dtype} with "
                            f"{len(set(class_names.ravel().tolist()))} distinct values")
        if len(class_names) < num_classes:
            raise DataError(f"{file}: `label` goes up to {num_classes - 1}, but `classes` lists {len(class_names)} "
                            f"classes; expected labels 0..{len(class_names) - 1}")
        num_classes = len(class_names)
    n = len(labels)
    names = list(modalities) if modalities else list(arrays)
    # a key that is not a modality (sample ids, a per-row value) fails the file: name the ones that would work
    leave_out = "" if modalities else _leave_out_hint(arrays, n)
    if not names:
        raise DataError(f"{file}: no modality arrays besides `label`/`split`/`classes`; expected {FORMAT}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:  # one array cannot be two modalities: the run would silently have one modality fewer
        raise UserError(f"dataset.modalities={names}: {twice} named more than once; name each modality once")
    specs = {}
    for name in names:
        if name not in arrays:
            raise DataError(f"dataset.modalities: {name!r} is not in {file} (found {sorted(arrays)})")
        x = arrays[name]
        if x.dtype.kind not in "biuf":
            raise DataError(f"{file}: `{name}` has dtype {x.dtype} ({NOT_NUMBERS.get(x.dtype.kind, 'not numbers')}); "
                            f"expected a modality of numbers (float, int or bool, read as float32){leave_out}")
        if not _modality_shaped(x, n):
            raise DataError(f"{file}: `{name}` has shape {x.shape}; expected ({n}, D) or ({n}, T, D) with D and T "
                            f"at least 1{leave_out}")
        if x.dtype not in (np.float16, np.float32):
            # what the model sees (samples are read as float32): a float64 value past 3.4e38 is Inf there, so the
            # finite check below must see it as Inf too
            with np.errstate(over="ignore"):
                arrays[name] = x.astype(np.float32)
        specs[name] = ModalitySpec("vector" if x.ndim == 2 else "sequence", tuple(x.shape[1:]))
    carve = _random_split if regression else stratified_split
    how = "random" if regression else "stratified"
    if split is None:
        train_val, test = carve(labels, test_fraction, split_seed)
        val_source = f"carved from the file ({how}: test {test_fraction:.0%}, val {val_fraction:.0%})"
    else:
        found = split.dtype
        split = split.astype(str)
        unknown = sorted(set(split.ravel().tolist()) - {"train", "val", "test"})
        if split.shape != (n,) or unknown:
            raise DataError(f"{file}: `split` must be ({n},) strings of 'train'/'val'/'test', got shape {split.shape} "
                            f"dtype {found} (unexpected values {unknown[:5]})")
        train_val = np.flatnonzero(split != "test")
        test = np.flatnonzero(split == "test")
        for part in ("train", "test"):  # the model trains and is tested on the file's own split: both needed
            if not (split == part).any():
                raise DataError(f"{file}: `split` has no {part!r} samples (it has {dict(Counter(split.tolist()))}); "
                                "expected train, test and optionally val rows")
        val_source = "the file's `split`"
    if split is not None and (split == "val").any():
        train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    else:
        keep, held = carve(labels[train_val], val_fraction, split_seed + 1)
        train, val = train_val[keep], train_val[held]
        if split is not None:
            val_source = f"carved from the file's train split ({how}, {val_fraction:.0%})"
    inputs = {m: arrays[m] for m in names}
    check_arrays(f"features file {str(file)!r}", inputs, {"train": train, "val": val, "test": test},
                 "clean or drop those rows")
    if standardize:
        for m in names:
            x = arrays[m]
            rows = x[train].astype(np.float64).reshape(-1, x.shape[-1])
            mean, std = rows.mean(0), rows.std(0)
            std[std == 0] = 1.0
            inputs[m] = ((x - mean) / std).astype(np.float32)
    notes = {"standardize": "per feature, train-split mean and std" if standardize else "off",
             # the run's data identity: a file overwritten in place with other features is other data
             "content_digest": _file_digest(file)}
    if regression:  # float scores: ArrayDataset keeps them float (MultimodalDataset's labels are classes)
        notes.update(task="regression", score_range=[float(labels.min()), float(labels.max())])
        parts = [ArrayDataset(inputs, rows, labels[rows], [str(r) for r in rows.tolist()], regression=True)
                 for rows in (train, val, test)]
        return DataSplits(*parts, specs, 1, [SCORE_NAME], val_source=val_source, notes=notes)
    full = MultimodalDataset(inputs, labels)
    empty = sorted(set(range(num_classes)) - set(labels.tolist()))
    if empty:  # usually an off label encoding (1-based, a subset's original ids); macro-F1 pays for it
        notes["empty_classes"] = empty
        declared = class_names is not None
        log.warning("%s: classes %s of 0..%d have no sample in any split (the classes are %s); macro-F1 averages "
                    "over all %d classes with F1 = 0 for each empty one, so it cannot exceed %.2f. If the labels "
                    "are not 0..C-1, re-encode them (np.unique(label, return_inverse=True))%s", file, _ranges(empty),
                    num_classes - 1, "the file's `classes`" if declared else "0..max(label)", num_classes,
                    1 - len(empty) / num_classes, "" if declared else "; to declare the classes, save their names "
                    "as `classes`")
    label_names = [str(c) for c in (class_names if class_names is not None else range(num_classes))]
    return DataSplits(full.subset(train), full.subset(val), full.subset(test), specs, num_classes, label_names,
                      val_source=val_source, notes=notes)


def _classes(file: Path, labels: np.ndarray) -> np.ndarray:
    """`label` as int64 classes 0..C-1: integers, or floats that are all whole numbers (`label.astype(float)`,
    read without loss); a DataError saying what is wrong otherwise."""
    if labels.ndim == 1 and labels.dtype.kind == "f" and len(labels):
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if len(bad):
            r = int(bad[0])
            raise DataError(f"{file}: `label` has {len(bad)} value(s) that are not whole numbers (row {r}: "
                            f"{float(labels[r])}); expected whole-number classes 0..C-1; float scores to regress on "
                            "need dataset.task=regression")
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        hint = ("; class names? encode them as 0..C-1, e.g. `names, label = np.unique(label, return_inverse=True)`, "
                "and save the names as `classes`" if labels.dtype.kind in "USO" else "")
        raise DataError(f"{file}: `label` must be a 1-D integer array, got shape {labels.shape} dtype "
                        f"{labels.dtype}{hint}")
    if not len(labels) or labels.min() < 0:
        raise DataError(f"{file}: `label` {'is empty' if not len(labels) else 'has negative values'}; expected "
                        "classes 0..C-1, one per sample")
    return labels


def _scores(file: Path, labels: np.ndarray, class_names: np.ndarray | None) -> np.ndarray:
    """`label` as float32 regression scores (dataset.task=regression): 1-D numbers, every one finite."""
    if class_names is not None:
        raise DataError(f"{file}: dataset.task=regression, but the file has `classes`: regression scores have no "
                        "classes; drop `classes`, or train the classes with dataset.task=classification")
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or not len(labels):
        raise DataError(f"{file}: dataset.task=regression: `label` must be a non-empty 1-D array of numbers (one "
                        f"score per row), got shape {labels.shape} dtype {labels.dtype}")
    with np.errstate(over="ignore"):
        scores = labels.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        rows = ", ".join(str(r) for r in bad[:5].tolist()) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{file}: `label` has {len(bad)} non-finite score(s) (NaN/Inf, or beyond float32) at rows "
                        f"{rows} (counting from 0); clean or drop those rows")
    return scores


def _random_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split` over one class: regression scores have no classes to stratify on."""
    return stratified_split(np.zeros(len(labels)), fraction, seed)


def _modality_shaped(x: np.ndarray, n: int) -> bool:
    return x.ndim in (2, 3) and x.shape[0] == n and 0 not in x.shape[1:]


def _leave_out_hint(arrays: dict[str, np.ndarray], n: int) -> str:
    """For a file whose every key is read as a modality (no dataset.modalities): the override that keeps only the
    keys shaped and typed as modalities, leaving out the others (sample ids, per-row values); "" when none is."""
    good = [k for k, x in arrays.items() if x.dtype.kind in "biuf" and _modality_shaped(x, n)]
    if not good or len(good) == len(arrays):
        return ""
    return (f"; if it is not a modality (a sample id, a per-row value), leave it out by naming the modalities: "
            f"dataset.modalities=[{','.join(good)}]")


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 4] -> '0-2, 4': a long list of empty classes stays one readable line."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
