"""The processed-pickle format of MulT and MMSA: the form in which CMU-MOSEI (and CMU-MOSI and CH-SIMS) feature
sequences circulate, read into one cleaned `Source`.

A file is a dict ``{train, valid, test} -> {audio, vision, text | text_bert, labels | regression_labels, id, ...}``;
whether it is MulT's or MMSA's is told from its keys. `read_source` loads one, checks every split (scores, shapes
shared across splits, ids) and casts each feature sequence to float32 with its non-finite values set to 0 and
counted. Which file to read, the labels made from the scores and the prepared cache are the dataset's own
(data/cmu_mosei.py). Reference: docs/datasets.md#cmu-mosei-cmu_mosei
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmbalance.data import finite
from mmbalance.data.batch import ModalitySpec
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

# the pickles' split names; "valid" is what MulT and MMSA write, the others are accepted leniently
SPLIT_KEYS = {"train": ("train",), "val": ("valid", "val", "dev", "validation"), "test": ("test",)}
MODALITY_KEYS = {"audio": ("audio",), "vision": ("vision", "visual"), "text": ("text",)}
# sentiment score keys: MulT writes `labels` (N, 1, 1), MMSA `regression_labels` (N,)
LABEL_KEYS = {"mult": ("labels", "regression_labels"), "mmsa": ("regression_labels", "labels")}


def load_pickle(path: Path) -> dict:
    """Unpickle a MulT/MMSA file (it runs code from the file: only open pickles you trust, as with any .pkl)."""
    try:
        with open(path, "rb") as f:
            try:
                data = pickle.load(f)
            except UnicodeDecodeError:  # a Python-2 era pickle of numpy arrays
                f.seek(0)
                data = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"CMU-MOSEI pickle {str(path)!r} does not exist") from None
    except (OSError, EOFError, ValueError, AttributeError, ImportError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot read CMU-MOSEI pickle {str(path)!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict of splits {{train, valid, test}}, got {type(data).__name__}")
    return data


def clean_float32(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 (the array itself when it already is writable float32) with every -inf/+inf/NaN set to 0, and how
    many were replaced. finite.nonfinite_rows scans it chunk-wise: no full-size mask for multi-GB arrays."""
    x = np.asarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()
    bad = finite.nonfinite_rows(x)
    for row in bad:
        block = x[row]
        block[~np.isfinite(block)] = 0.0
    return x, sum(nan + inf for nan, inf in bad.values())


def _ids(split_data: dict, n: int, split: str, where: str) -> list[str]:
    """Sample ids as strings: MMSA stores a list of 'video$_$clip' strings, MulT an array (N,) or (N, k) of
    bytes whose columns (video id, segment...) are joined with '_'; without `id`, '<split>_<row>'."""
    if split_data.get("id") is None:
        return [f"{split}_{i}" for i in range(n)]
    arr = np.asarray(split_data["id"], dtype=object)
    if arr.ndim == 0 or len(arr) != n:
        raise DataError(f"{where}: `id` has {arr.shape} entries but there are {n} samples")
    rows = arr[:, None] if arr.ndim == 1 else arr.reshape(n, -1)
    return ["_".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row) for row in rows]


@dataclass
class SplitData:
    arrays: dict[str, np.ndarray | Path]  # in memory (the pickle) or .npy files (the prepared cache)
    y: np.ndarray  # (N,) float32 sentiment score
    ids: list[str]


@dataclass
class Source:
    """One release file, cleaned: per split arrays, scores and ids, plus what was found (from the pickle, or as
    the prepared cache recorded it)."""

    file: Path | str
    layout: str  # mult | mmsa
    aligned: bool | None
    splits: dict[str, SplitData] = field(default_factory=dict)
    specs: dict[str, ModalitySpec] = field(default_factory=dict)
    text_source: str | None = None
    replaced: dict[str, int] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    origin: str = "raw pickle"
    replaced_in: list[tuple[str, int]] = field(default_factory=list)  # ("<file> ['<split>'] `<key>`", count) > 0


def _key(split_data: dict, keys: tuple[str, ...], what: str, where: str) -> str:
    """The first of `keys` present in the split; DataError naming them all when none is."""
    key = next((k for k in keys if k in split_data), None)
    if key is None:
        raise DataError(f"{where}: no {what} key: looked for {' or '.join(map(repr, keys))} "
                        f"(found keys {sorted(map(str, split_data))})")
    return key


def _split_table(data: dict, path: Path) -> tuple[dict[str, tuple[str, dict]], str]:
    """({our split: (the pickle's split name, its dict)}, layout told from the keys)."""
    table = {}
    for split, keys in SPLIT_KEYS.items():
        key = next((k for k in keys if k in data), None)
        if key is None:
            raise DataError(f"{path}: no {' / '.join(repr(k) for k in keys)} split (found keys "
                            f"{sorted(map(str, data))}); expected a dict {{train, valid, test}} of arrays")
        if not isinstance(data[key], dict):
            raise DataError(f"{path}: split {key!r} is a {type(data[key]).__name__}, expected a dict of arrays")
        table[split] = (key, data[key])
    keys = set().union(*(d.keys() for _, d in table.values()))
    if "regression_labels" in keys or "text_bert" in keys:
        return table, "mmsa"
    if "labels" in keys:
        return table, "mult"
    raise DataError(f"{path}: no sentiment labels: looked for 'labels' (MulT) or 'regression_labels' (MMSA); "
                    f"found keys {sorted(map(str, keys))}")


def _text_key(split_data: dict, text_key: str, where: str) -> str:
    """Which pickle key feeds the text modality. auto: `text` (GloVe 300-d in MulT, BERT 768-d features in
    MMSA); a file with only MMSA's `text_bert` token ids needs text_key=text_bert (a `tokens` modality)."""
    if text_key != "auto":
        if text_key not in split_data:
            raise DataError(f"{where}: dataset.text_key={text_key!r} but the split has no {text_key!r} "
                            f"(found keys {sorted(map(str, split_data))})")
        return text_key
    if _key(split_data, ("text", "text_bert"), "text", where) == "text_bert":
        raise DataError(
            f"{where}: no `text` feature sequence (the 768-d BERT features of MMSA files); only `text_bert` "
            "BERT token ids (N, 3, L) are present. Set dataset.text_key=text_bert to use them as a `tokens` "
            "modality (needs a backbone.encoders.tokens encoder), or leave text out with "
            "dataset.modalities=[audio,vision]")
    return "text"


def _scores(split_data: dict, layout: str, where: str, score_range: tuple[float, float]) -> np.ndarray:
    """The split's sentiment scores, (N,) float32: MulT stores them (N, 1, 1), MMSA (N,); N >= 1, each finite and
    within `score_range` (the dataset's scale)."""
    key = _key(split_data, LABEL_KEYS[layout], "sentiment", where)
    y = np.asarray(split_data[key], dtype=np.float64)
    n = int(y.shape[0]) if y.ndim else 0
    if y.size != n:
        raise DataError(f"{where}: `{key}` has shape {y.shape}; expected one sentiment score per sample, "
                        "(N,), (N, 1) or (N, 1, 1)")
    if n == 0:
        raise DataError(f"{where}: the split has no samples (`{key}` is empty); every split needs some")
    if not np.isfinite(y).all():
        raise DataError(f"{where}: `{key}` has {int((~np.isfinite(y)).sum())} non-finite scores")
    low, high = score_range
    if y.min() < low or y.max() > high:
        # another scale (a rescaled or different dataset's file) would make every label and metric wrong quietly
        raise DataError(f"{where}: `{key}` holds scores in [{y.min():g}, {y.max():g}], "
                        f"{int(((y < low) | (y > high)).sum())} of them outside the dataset's [{low:g}, {high:g}]; "
                        "the file is not on the dataset's scale (rescaled, or another dataset's scores)")
    return y.reshape(n).astype(np.float32)


def _features(split_data: dict, key: str, n: int, where: str) -> tuple[np.ndarray, ModalitySpec, int]:
    """The split's array under `key` for its n samples: (array, spec, how many non-finite values were replaced)."""
    x = np.asarray(split_data[key])
    split_data[key] = None  # drop the pickle's reference: a float64 original is freed as soon as it is cast
    if key == "text_bert":
        # MMSA: rows are input ids, attention mask, segment ids; the `tokens` kind wants ids, 0 = [PAD]
        if x.ndim != 3 or x.shape[0] != n or x.shape[1] < 1:
            raise DataError(f"{where}: `text_bert` has shape {x.shape}; expected ({n}, 3, L) BERT inputs")
        ids = np.ascontiguousarray(x[:, 0, :]).astype(np.int64)
        return ids, ModalitySpec("tokens", (int(ids.shape[1]),)), 0
    if x.ndim != 3 or x.shape[0] != n:
        raise DataError(f"{where}: `{key}` has shape {x.shape}; expected ({n}, T, D) feature sequences "
                        f"matching the {n} labels")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: `{key}` has dtype {x.dtype}; expected numbers")
    x, count = clean_float32(x)
    return x, ModalitySpec("sequence", (int(x.shape[1]), int(x.shape[2]))), count


def read_source(path: Path, modalities: list[str], text_key: str, layout_hint: str, aligned: bool | None,
                score_range: tuple[float, float]) -> Source:
    """Load, validate and clean one MulT/MMSA pickle. Its arrays are consumed (cast in place where possible) so
    peak memory stays near the file's size. `score_range`: the dataset's score scale; a score outside it is an
    error."""
    table, layout = _split_table(load_pickle(path), path)
    if layout_hint in ("mult", "mmsa") and layout != layout_hint:
        log.warning("%s: dataset.layout=%s but its keys look like %s; reading it as %s", path, layout_hint,
                    layout, layout)
    src = Source(path, layout, aligned, replaced=dict.fromkeys(modalities, 0))
    for split, (name, d) in table.items():
        where = f"{path} [{name!r}]"
        y = _scores(d, layout, where, score_range)
        arrays = {}
        for m in modalities:
            key = _text_key(d, text_key, where) if m == "text" else _key(d, MODALITY_KEYS[m], m, where)
            arrays[m], spec, count = _features(d, key, len(y), where)
            src.replaced[m] += count
            if count:
                src.replaced_in.append((f"{where} `{key}`", count))
            if src.specs.setdefault(m, spec) != spec:
                raise DataError(f"{where}: `{key}` per-sample shape {spec.shape} differs from the train split's "
                                f"{src.specs[m].shape}; every split must share one shape")
        src.splits[split] = SplitData(arrays, y, _ids(d, len(y), split, where))
    src.notes["lengths_present"] = sorted(k for k in table["train"][1] if str(k).endswith("_lengths"))
    text = src.specs.get("text")
    if text is not None and text.kind == "tokens":
        src.text_source = "text_bert (BERT token ids)"
    elif text is not None:
        src.text_source = f"`text` {text.shape[1]}-d " + ("GloVe (MulT)" if layout == "mult" else
                                                          "BERT features (MMSA)")
    if aligned is None and len(modalities) >= 2:
        src.aligned = len({src.specs[m].shape[0] for m in modalities if src.specs[m].kind == "sequence"}) == 1
    return src
