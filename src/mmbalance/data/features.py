"""Bring your own features: one .npz file with `label`, optional `split`, and one array per modality."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from mmbalance.data.batch import DataSplits, ModalitySpec, MultimodalDataset, stratified_split
from mmbalance.data.finite import check_arrays
from mmbalance.errors import DataError

FORMAT = (
    "an .npz with `label` (N,) integer classes, optional `split` (N,) of 'train'/'val'/'test', "
    "and every other key a modality of shape (N, D) or (N, T, D)"
)


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
                return {k: data[k] for k in data.files}
        except EOFError:
            found = "a truncated file"
        except zipfile.BadZipFile as exc:
            found = f"a truncated or damaged zip archive ({exc})"
        except (OSError, ValueError, KeyError, zipfile.LargeZipFile, NotImplementedError) as exc:
            found = str(exc)  # numpy's own words
            if "Object arrays" in found:  # object arrays load only through pickle, which runs code from the file
                found = "an array of dtype object, which needs pickle; save strings as a '<U' array, numbers as numbers"
    raise DataError(f"dataset.path: features file {str(file)!r} is not a readable .npz ({found}); expected {FORMAT}")


def build_features(
    path: str,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    modalities: list[str] | None = None,
    standardize: bool = True,
) -> DataSplits:
    """Load a features file (see FORMAT).

    Without `split`, a stratified test split (`test_fraction`) and validation split (`val_fraction` of
    the rest) are carved with `split_seed`; with a `split` that has no 'val', validation is carved from
    'train'. `modalities` picks and orders the modality keys (default: file order).

    `standardize` (default) scales every feature to zero mean and unit variance with the *train* split's
    statistics (per feature; a sequence's over samples and steps; a constant feature is only centred): real
    feature files mix scales (areas in the thousands beside ratios below one), which an SGD-trained MLP does
    not survive, while a logistic regression on standardised features does. False feeds the values as stored.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"dataset.path: features file {str(file)!r} does not exist (expected {FORMAT})")
    arrays = read_npz(file)
    if "label" not in arrays:
        raise DataError(f"{file}: no `label` array (found {sorted(arrays)}); expected {FORMAT}")
    labels = arrays.pop("label")
    split = arrays.pop("split", None)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: `label` must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{file}: `label` has negative values; expected classes 0..C-1")
    n = len(labels)
    names = list(modalities) if modalities else list(arrays)
    if not names:
        raise DataError(f"{file}: no modality arrays besides `label`/`split`; expected {FORMAT}")
    specs = {}
    for name in names:
        if name not in arrays:
            raise DataError(f"dataset.modalities: {name!r} is not in {file} (found {sorted(arrays)})")
        x = arrays[name]
        if x.shape[0] != n or x.ndim not in (2, 3):
            raise DataError(f"{file}: `{name}` has shape {x.shape}; expected ({n}, D) or ({n}, T, D)")
        if x.dtype not in (np.float16, np.float32):
            # what the model sees (samples are read as float32): a float64 value past 3.4e38 is Inf there, so the
            # finite check below must see it as Inf too
            with np.errstate(over="ignore"):
                arrays[name] = x.astype(np.float32)
        specs[name] = ModalitySpec("vector" if x.ndim == 2 else "sequence", tuple(x.shape[1:]))
    full = MultimodalDataset({m: arrays[m] for m in names}, labels)
    if split is None:
        train_val, test = stratified_split(labels, test_fraction, split_seed)
        val_source = f"carved from the file (stratified: test {test_fraction:.0%}, val {val_fraction:.0%})"
    else:
        split = split.astype(str)
        unknown = sorted(set(split) - {"train", "val", "test"})
        if len(split) != n or unknown:
            raise DataError(f"{file}: `split` must be (N,) of 'train'/'val'/'test' (unexpected {unknown})")
        train_val = np.flatnonzero(split != "test")
        test = np.flatnonzero(split == "test")
        if not len(test):
            raise DataError(f"{file}: `split` has no 'test' samples")
        val_source = "the file's `split`"
    if split is not None and (split == "val").any():
        train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    else:
        keep, held = stratified_split(labels[train_val], val_fraction, split_seed + 1)
        train, val = train_val[keep], train_val[held]
        if split is not None:
            val_source = f"carved from the file's train split (stratified, {val_fraction:.0%})"
    check_arrays(f"features file {str(file)!r}", {m: arrays[m] for m in names},
                 {"train": train, "val": val, "test": test}, "clean or drop those rows")
    if standardize:
        for m in names:
            x = arrays[m]
            rows = x[train].astype(np.float64).reshape(-1, x.shape[-1])
            mean, std = rows.mean(0), rows.std(0)
            std[std == 0] = 1.0
            full.inputs[m] = torch.as_tensor(((x - mean) / std).astype(np.float32))
    num_classes = int(labels.max()) + 1
    return DataSplits(
        full.subset(train), full.subset(val), full.subset(test), specs, num_classes,
        [str(c) for c in range(num_classes)], val_source=val_source,
        notes={"standardize": "per feature, train-split mean and std" if standardize else "off"},
    )
