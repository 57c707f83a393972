"""CMU-MOSEI sentiment: audio (COVAREP), vision (FACET) and text (GloVe or BERT) feature sequences.

CMU-MOSEI is distributed as feature sequences, not media. mmbalance reads the processed pickles that the
imbalance papers use (reference: datasets.md §1.7, §2 "MOSEI"):

* MulT (yaohungt/Multimodal-Transformer; the BalanceBenchmark recipe): ``<root>/mosei_senti_data.pkl``
  (word-aligned, 50 steps) or ``<root>/mosei_senti_data_noalign.pkl``; a dict
  ``{train, valid, test} -> {text, audio, vision, labels, id}`` with text GloVe 300-d, audio COVAREP 74-d,
  vision FACET 35-d, ``labels`` (N, 1, 1) sentiment in [-3, 3].
* MMSA (thuiar/MMSA): ``<root>/MOSEI/Processed/{aligned_50,unaligned_50}.pkl``; the same split dict with
  ``text`` (BERT-base last hidden states, 768-d per MMSA's ``feature_dims``), ``text_bert`` ((N, 3, L) BERT
  input ids, attention mask, segment ids), ``audio``, ``vision``, ``regression_labels`` (N,),
  ``classification_labels``, ``audio_lengths``, ``vision_lengths``, ``id``, ``raw_text``, ``annotations``.
* ``root`` may also be the .pkl file itself; its format is then told from its keys.

Sequence lengths and feature sizes are read from the file (never assumed): aligned files have 50 steps for
every modality, unaligned ones longer audio/vision sequences (about 500/500 in MulT's, 500/375 in MMSA's).
Features are used as stored -- never re-aligned. Every float modality is cast to float32 and non-finite values
(COVAREP has -inf; some releases have NaN) are replaced by 0, as BalanceBenchmark does for audio -inf; the
counts replaced are reported in ``DataSplits.notes``. Unaligned MMSA files are zero-padded; their
``*_lengths`` are not used (the TransformerEncoder attends over the full padded length, like the peer).

Labels (``label_mode``) from the sentiment score y in [-3, 3]:

* ``binary_nonneg`` (default; BalanceBenchmark's ``acc2``): y < 0 -> 0 "negative", else 1 "non-negative" --
  a neutral y == 0 counts as positive;
* ``binary_drop_zero`` (the other common "Acc-2" protocol): samples with y == 0 are removed from every split,
  then y > 0 -> 1 "positive", y < 0 -> 0 "negative";
* ``7class``: clip to [-3, 3] and round to the nearest integer (numpy's round-half-to-even, as MulT's and
  MMSA's Acc-7 evaluation), shifted to 0..6 with class names "-3" .. "+3".

Task (``task``): ``classification`` (the default, BalanceBenchmark's protocol) uses the ``label_mode`` classes above;
``regression`` (MulT's and MMSA's protocol) keeps every sample and its score y in [-3, 3] as a float label, the
model gets one output (``num_classes`` 1) and trains with ``loss`` (auto = L1, as MulT; or mse); ``label_mode`` does
not apply (the shared ``collate_batch`` keeps float labels float). Metrics: ``mmbalance.metrics.regression``.

Splits: MOSEI's own train / valid / test (a settled choice, docs/architecture.md: its own validation split is used for model selection).

``mmbalance prepare cmu_mosei --root RAW --out PREP`` unpickles once and writes a memory-mappable cache:
``<split>/<modality>.npy`` (float32, or int64 token ids) and ``<split>/y_reg.npy`` for split in
train/val/test, ``manifest.csv`` (id, label, split, y_reg and the label under every mode), ``classes.json``
and ``cache.json`` (source file stamp, layout, shapes); ``build_cmu_mosei(prepared=PREP)`` then reads it with
``np.load(mmap_mode='r')`` instead of unpickling gigabytes. Prepare writes those arrays cleaned, so a build
that finds NaN/Inf in them (the finite-input check of data/finite.py, recorded next to each array) raises a
DataError instead of replacing them: the files were changed after prepare.
"""

from __future__ import annotations

import logging
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.data import finite
from mmbalance.data.batch import DataSplits, ModalitySpec
from mmbalance.data.layout import option_path
from mmbalance.data.prepare import CACHE_META, CLASSES, MANIFEST, PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.errors import DataError, UserError
from mmbalance.metrics.regression import TASKS, resolve_loss

log = logging.getLogger("mmbalance")

MODALITIES = ("audio", "vision", "text")
SPLITS = ("train", "val", "test")
# the pickles' split names; "valid" is what MulT and MMSA write, the others are accepted leniently
SPLIT_KEYS = {"train": ("train",), "val": ("valid", "val", "dev", "validation"), "test": ("test",)}
MODALITY_KEYS = {"audio": ("audio",), "vision": ("vision", "visual"), "text": ("text",)}
# sentiment score keys: MulT writes `labels` (N, 1, 1), MMSA `regression_labels` (N,)
LABEL_KEYS = {"mult": ("labels", "regression_labels"), "mmsa": ("regression_labels", "labels")}
# where each layout keeps its file, relative to root; the MMSA candidates also accept root = MOSEI/ or Processed/
FILES = {
    ("mult", True): ("mosei_senti_data.pkl",),
    ("mult", False): ("mosei_senti_data_noalign.pkl",),
    ("mmsa", True): ("MOSEI/Processed/aligned_50.pkl", "Processed/aligned_50.pkl", "aligned_50.pkl"),
    ("mmsa", False): ("MOSEI/Processed/unaligned_50.pkl", "Processed/unaligned_50.pkl", "unaligned_50.pkl"),
}
LAYOUTS = ("auto", "mult", "mmsa")
TEXT_KEYS = ("auto", "text", "text_bert")
LABEL_MODES = {
    "binary_nonneg": ["negative", "non-negative"],
    "binary_drop_zero": ["negative", "positive"],
    "7class": ["-3", "-2", "-1", "0", "+1", "+2", "+3"],
}
# the internal label mode of dataset.task=regression: the float scores themselves, one model output
REGRESSION = "regression"
CACHE_VERSION = 1
VAL_SOURCE = "CMU-MOSEI's own validation split ('valid' in the pickle)"
_CHUNK = 1024  # samples per cleaning step: bounds the temporary isfinite mask for multi-GB arrays


# ---------------------------------------------------------------------------------------------------------------
# labels


def sentiment_labels(y: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(class labels int64 for the kept samples, keep mask) of sentiment scores `y` under `label_mode`."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if mode == "binary_nonneg":
        return (y >= 0).astype(np.int64), np.ones(len(y), dtype=bool)
    if mode == "binary_drop_zero":
        keep = y != 0
        return (y[keep] > 0).astype(np.int64), keep
    if mode == "7class":
        return (np.round(np.clip(y, -3.0, 3.0)) + 3).astype(np.int64), np.ones(len(y), dtype=bool)
    raise UserError(f"dataset.label_mode={mode!r}; expected one of {sorted(LABEL_MODES)}")


def _all_label_columns(y: np.ndarray) -> dict[str, list[str]]:
    """The manifest's per-mode label columns (empty where binary_drop_zero drops the sample)."""
    n = len(y)
    cols = {}
    for mode, col in (("binary_nonneg", "y2_nonneg"), ("binary_drop_zero", "y2_nonzero"), ("7class", "y7")):
        labels, keep = sentiment_labels(y, mode)
        full = np.full(n, "", dtype=object)
        full[keep] = labels.astype(str)
        cols[col] = full.tolist()
    return cols


# ---------------------------------------------------------------------------------------------------------------
# finding and reading the pickle


def _check_options(layout: str, label_mode: str, text_key: str, modalities) -> list[str]:
    if layout not in LAYOUTS:
        raise UserError(f"dataset.layout={layout!r}; expected one of {list(LAYOUTS)}")
    if label_mode not in LABEL_MODES:
        raise UserError(f"dataset.label_mode={label_mode!r}; expected one of {sorted(LABEL_MODES)}")
    if text_key not in TEXT_KEYS:
        raise UserError(f"dataset.text_key={text_key!r}; expected one of {list(TEXT_KEYS)}")
    mods = list(modalities) if modalities else list(MODALITIES)
    bad = [m for m in mods if m not in MODALITIES]
    if bad or len(set(mods)) != len(mods) or not mods:
        raise UserError(f"dataset.modalities={mods}; expected distinct names out of {list(MODALITIES)}")
    return mods


def _aligned_from_name(name: str) -> bool | None:
    name = name.lower()
    if "noalign" in name or "unaligned" in name:
        return False
    if "aligned" in name or name == "mosei_senti_data.pkl":
        return True
    return None


def find_source(root: str | Path, aligned: bool = False, layout: str = "auto") -> tuple[Path, str, bool | None]:
    """(pickle path, layout, aligned) for `root`: a folder in a known layout, or the .pkl file itself.

    With layout "auto" the MulT file is preferred over the MMSA one when both exist (BalanceBenchmark reads
    MulT's). layout is "mult", "mmsa" or, for a file given directly, "file" (refined from its keys on load).
    """
    root = Path(root).expanduser()
    if root.is_file():
        return root, "file", _aligned_from_name(root.name)
    if not root.is_dir():
        raise DataError(f"dataset.root {str(root)!r} does not exist; expected a folder holding "
                        f"mosei_senti_data[_noalign].pkl (MulT) or MOSEI/Processed/[un]aligned_50.pkl (MMSA), "
                        "or the path of such a .pkl")
    layouts = ("mult", "mmsa") if layout == "auto" else (layout,)
    for name in layouts:
        for rel in FILES[(name, bool(aligned))]:
            if (root / rel).is_file():
                return root / rel, name, bool(aligned)
    tried = [str(root / rel) for name in layouts for rel in FILES[(name, bool(aligned))]]
    other = [str(root / rel) for name in layouts for rel in FILES[(name, not aligned)] if (root / rel).is_file()]
    found = sorted(p.relative_to(root).as_posix() for pattern in ("*.pkl", "*/*.pkl", "*/*/*.pkl", "*.csd")
                   for p in root.glob(pattern))[:12]
    hint = ""
    if other:
        hint = (f" The {'unaligned' if aligned else 'aligned'} file {other[0]} exists: set "
                f"dataset.aligned={str(not aligned).lower()} to use it.")
    elif any(f.endswith(".csd") for f in found):
        hint = (" CMU-MultimodalSDK .csd files are not read directly: use the MulT or MMSA processed pickle "
                "(see README: Datasets).")
    raise DataError(
        f"dataset.root {str(root)!r}: no CMU-MOSEI {'aligned' if aligned else 'unaligned'} pickle found "
        f"(layout={layout}); looked for {', '.join(tried)}. Found: {', '.join(found) or 'no .pkl/.csd files'}."
        + hint
    )


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
    """float32 copy (or the same array when it already is float32) with every -inf/+inf/NaN set to 0, and
    how many were replaced. Works chunk-wise so the temporary mask stays small for multi-GB arrays."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    elif not x.flags.writeable:
        x = x.copy()
    replaced = 0
    for start in range(0, len(x), _CHUNK):
        block = x[start:start + _CHUNK]
        bad = ~np.isfinite(block)
        n = int(bad.sum())
        if n:
            block[bad] = 0.0
            replaced += n
    return x, replaced


def _to_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _ids(split_data: dict, n: int, split: str, where: str) -> list[str]:
    """Sample ids as strings: MMSA stores a list of 'video$_$clip' strings, MulT an array (N,) or (N, k)
    whose columns (video id, segment...) are joined with '_'; without `id`, '<split>_<row>'."""
    raw = split_data.get("id")
    if raw is None:
        return [f"{split}_{i}" for i in range(n)]
    arr = np.asarray(raw, dtype=object)
    if arr.ndim == 0 or len(arr) != n:
        raise DataError(f"{where}: `id` has {arr.shape} entries but there are {n} samples")
    if arr.ndim == 1:
        return [_to_str(v) for v in arr]
    return ["_".join(_to_str(v) for v in row) for row in arr.reshape(n, -1)]


@dataclass
class SplitData:
    arrays: dict[str, np.ndarray]
    y: np.ndarray  # (N,) float32 sentiment score
    ids: list[str]


@dataclass
class Source:
    """A loaded pickle, cleaned: per split arrays, scores and ids, plus what was found."""

    file: Path
    layout: str  # mult | mmsa
    aligned: bool | None
    splits: dict[str, SplitData]
    specs: dict[str, ModalitySpec]
    text_source: str | None
    replaced: dict[str, int] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def _split_table(data: dict, path: Path) -> dict[str, dict]:
    table = {}
    for split, keys in SPLIT_KEYS.items():
        key = next((k for k in keys if k in data), None)
        if key is None:
            raise DataError(f"{path}: no {' / '.join(repr(k) for k in keys)} split (found keys "
                            f"{sorted(map(str, data))}); expected a dict {{train, valid, test}} of arrays")
        if not isinstance(data[key], dict):
            raise DataError(f"{path}: split {key!r} is a {type(data[key]).__name__}, expected a dict of arrays")
        table[split] = (key, data[key])
    return table


def _detect_layout(table: dict, path: Path) -> str:
    keys = set().union(*(d.keys() for _, d in table.values()))
    if "regression_labels" in keys or "text_bert" in keys:
        return "mmsa"
    if "labels" in keys:
        return "mult"
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
    if "text" in split_data:
        return "text"
    if "text_bert" in split_data:
        raise DataError(
            f"{where}: no `text` feature sequence (the 768-d BERT features of MMSA files); only `text_bert` "
            "BERT token ids (N, 3, L) are present. Set dataset.text_key=text_bert to use them as a `tokens` "
            "modality (needs a backbone.encoders.tokens encoder), or leave text out with "
            "dataset.modalities=[audio,vision]")
    raise DataError(f"{where}: no text key: looked for 'text' or 'text_bert' (found keys "
                    f"{sorted(map(str, split_data))})")


def read_source(path: Path, modalities: list[str], text_key: str = "auto", layout_hint: str = "auto",
                aligned: bool | None = None) -> Source:
    """Load, validate and clean one MulT/MMSA pickle (see the module docstring). The pickle's arrays are
    consumed (cast in place where possible) so peak memory stays near the file's size."""
    data = load_pickle(path)
    table = _split_table(data, path)
    layout = _detect_layout(table, path)
    if layout_hint in ("mult", "mmsa") and layout != layout_hint:
        log.warning("%s: dataset.layout=%s but its keys look like %s; reading it as %s", path, layout_hint,
                    layout, layout)
    splits, specs, replaced, text_source, notes = {}, {}, {m: 0 for m in modalities}, None, {}
    for split, (key, d) in table.items():
        where = f"{path} [{key!r}]"
        label_key = next((k for k in LABEL_KEYS[layout] if k in d), None)
        if label_key is None:
            raise DataError(f"{where}: no sentiment key: looked for {' or '.join(map(repr, LABEL_KEYS[layout]))} "
                            f"(found keys {sorted(map(str, d))})")
        y = np.asarray(d[label_key], dtype=np.float64)
        n = int(y.shape[0]) if y.ndim else 0
        y = y.reshape(n, -1) if n else y.reshape(0, 1)
        if y.shape[1] != 1:
            raise DataError(f"{where}: `{label_key}` has shape {np.shape(d[label_key])}; expected one sentiment "
                            "score per sample, (N,), (N, 1) or (N, 1, 1)")
        y = y[:, 0]
        if not np.isfinite(y).all():
            raise DataError(f"{where}: `{label_key}` has {int((~np.isfinite(y)).sum())} non-finite scores")
        arrays = {}
        for m in modalities:
            if m == "text":
                k = _text_key(d, text_key, where)
            else:
                k = next((c for c in MODALITY_KEYS[m] if c in d), None)
                if k is None:
                    raise DataError(f"{where}: no {m} key: looked for {' or '.join(map(repr, MODALITY_KEYS[m]))} "
                                    f"(found keys {sorted(map(str, d))})")
            x = np.asarray(d[k])
            if m == "text" and k == "text_bert":
                # MMSA: rows are input ids, attention mask, segment ids; the `tokens` kind wants ids, 0 = [PAD]
                if x.ndim != 3 or x.shape[0] != n or x.shape[1] < 1:
                    raise DataError(f"{where}: `text_bert` has shape {x.shape}; expected ({n}, 3, L) BERT inputs")
                x = np.ascontiguousarray(x[:, 0, :]).astype(np.int64)
                spec = ModalitySpec("tokens", (int(x.shape[1]),))
                text_source = "text_bert (BERT token ids)"
            else:
                if x.ndim != 3 or x.shape[0] != n:
                    raise DataError(f"{where}: `{k}` has shape {x.shape}; expected ({n}, T, D) feature sequences "
                                    f"matching the {n} labels")
                if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                    raise DataError(f"{where}: `{k}` has dtype {x.dtype}; expected numbers")
                x, count = clean_float32(x)
                replaced[m] += count
                spec = ModalitySpec("sequence", (int(x.shape[1]), int(x.shape[2])))
                if m == "text":
                    text_source = f"`text` {x.shape[2]}-d " + ("GloVe (MulT)" if layout == "mult" else
                                                                "BERT features (MMSA)")
            d[k] = None  # drop the pickle's reference: a float64 original is freed as soon as it is cast
            if m in specs and specs[m] != spec:
                raise DataError(f"{where}: `{k}` per-sample shape {spec.shape} differs from the train split's "
                                f"{specs[m].shape}; every split must share one shape")
            specs[m] = spec
            arrays[m] = x
        splits[split] = SplitData(arrays, y.astype(np.float32), _ids(d, n, split, where))
        if split == "train":
            notes["lengths_present"] = sorted(k for k in d if str(k).endswith("_lengths"))
    if aligned is None:
        steps = {specs[m].shape[0] for m in modalities if specs[m].kind == "sequence"}
        aligned = None if len(modalities) < 2 else len(steps) == 1
    return Source(path, layout, aligned, splits, specs, text_source, replaced, notes)


# ---------------------------------------------------------------------------------------------------------------
# the dataset


class SequenceDataset(Dataset):
    """Samples `rows` of per-modality arrays (in memory, or .npy files opened lazily as read-only memmaps so
    that DataLoader workers each map the file instead of receiving a pickled copy).

    Labels are int64 classes, or float32 scores with `regression` (a sample's label is then a Python float,
    which `collate_batch` keeps float)."""

    def __init__(self, sources: dict[str, np.ndarray | Path], rows: np.ndarray, labels: np.ndarray,
                 ids: list[str], regression: bool = False):
        self.sources = dict(sources)
        self.rows = np.asarray(rows, dtype=np.int64)
        # classes are read by methods that stratify; scores by the regression loss and metrics
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32 if regression else torch.long)
        self.ids = list(ids)
        if not (len(self.rows) == len(self.labels) == len(self.ids)):
            raise ValueError("rows, labels and ids must have the same length")
        self._open: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._open is None:
            self._open = {m: np.load(s, mmap_mode="r") if isinstance(s, Path) else s for m, s in self.sources.items()}
        return self._open

    def __getstate__(self):
        return {**self.__dict__, "_open": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row, inputs = int(self.rows[i]), {}
        for m, a in self.arrays().items():
            # np.array copies: a writable tensor, never a view into the read-only memmap
            inputs[m] = torch.from_numpy(np.array(a[row], dtype=np.int64 if a.dtype.kind in "iu" else np.float32))
        return {"inputs": inputs, "label": self.labels[i].item(), "index": i}


def _make_split(sources: dict, y: np.ndarray, ids: list[str], label_mode: str) -> tuple[SequenceDataset, int]:
    if label_mode == REGRESSION:  # every sample, its score as the label
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        return SequenceDataset(sources, np.arange(len(y)), y, list(ids), regression=True), 0
    labels, keep = sentiment_labels(y, label_mode)
    rows = np.flatnonzero(keep)
    return SequenceDataset(sources, rows, labels, [ids[r] for r in rows]), int((~keep).sum())


def build_cmu_mosei(
    root: str | None = None,
    prepared: str | None = None,
    aligned: bool = False,
    layout: str = "auto",
    label_mode: str = "binary_nonneg",
    modalities: list[str] | None = None,
    text_key: str = "auto",
    task: Literal["classification", "regression"] = "classification",
    loss: Literal["auto", "cross_entropy", "l1", "mse"] = "auto",
) -> DataSplits:
    """CMU-MOSEI as DataSplits of (T, D) `sequence` modalities audio, vision, text (in `modalities` order).

    root: a folder in the MulT or MMSA layout, or the .pkl itself; prepared: the folder written by
    `mmbalance prepare cmu_mosei` (read memory-mapped; root is then not opened). aligned picks the aligned
    (50 steps) or unaligned pickle; BalanceBenchmark's recipe is `if_align: false`, hence the default.
    layout: auto | mult | mmsa. label_mode: binary_nonneg (BalanceBenchmark, 0 counts as non-negative) |
    binary_drop_zero | 7class (see the module docstring). text_key: auto (`text` features) | text |
    text_bert (MMSA token ids as a `tokens` modality). task: classification (the `label_mode` classes) |
    regression (float scores, one model output; `label_mode` does not apply). loss: the training loss of the
    task, read by the run (auto: cross-entropy, or L1 for regression as MulT; l1 | mse for regression).
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    mods = _check_options(layout, label_mode, text_key, modalities)
    if task not in TASKS:
        raise UserError(f"dataset.task={task!r}; expected one of {list(TASKS)}")
    resolve_loss(task, loss)  # a loss that does not fit the task is refused here, before any file is read
    if task == "regression":
        label_mode = REGRESSION  # from here on the "label mode" of float scores
    if prepared:
        return _build_prepared(Path(prepared).expanduser(), aligned, label_mode, mods, text_key)
    if not root:
        raise UserError("dataset.root is not set: point it at the CMU-MOSEI folder or .pkl, or set dataset.prepared")
    path, found_layout, file_aligned = find_source(root, aligned, layout)
    src = read_source(path, mods, text_key, layout, file_aligned)
    datasets, dropped = {}, {}
    for split in SPLITS:
        s = src.splits[split]
        datasets[split], dropped[split] = _make_split(s.arrays, s.y, s.ids, label_mode)
    notes = _notes(src.layout if found_layout == "file" else found_layout, str(path), src.aligned, label_mode,
                   src.text_source, src.replaced, dropped, datasets, "raw pickle")
    notes.update(src.notes)
    return _splits(datasets, src.specs, mods, label_mode, notes)


def _notes(layout, file, aligned, label_mode, text_source, replaced, dropped, datasets, source) -> dict:
    notes = {
        "layout": layout,
        "file": file,
        "aligned": aligned,
        "source": source,
        "label_mode": label_mode,
        "text": text_source,
        "nonfinite_replaced": dict(replaced),
    }
    if label_mode == REGRESSION:
        notes["task"] = "regression"
        notes["label_mode"] = None  # label_mode does not apply to scores
        # how many scores are negative, zero, positive: the zeros are what the two acc-2 conventions treat apart
        notes["score_signs"] = {s: [int((d.labels < 0).sum()), int((d.labels == 0).sum()), int((d.labels > 0).sum())]
                                for s, d in datasets.items()}
    else:
        notes["class_counts"] = {s: np.bincount(d.labels.numpy(), minlength=len(LABEL_MODES[label_mode])).tolist()
                                 for s, d in datasets.items()}
    if label_mode == "binary_drop_zero":
        notes["dropped_zero"] = dict(dropped)
    log.info("cmu_mosei: %s layout (%s, %s), %s; non-finite values replaced by 0: %s", layout,
             "aligned" if aligned else "unaligned" if aligned is not None else "alignment unknown", file, source,
             replaced)
    return notes


def _splits(datasets, specs, mods, label_mode, notes) -> DataSplits:
    # regression: one output, the predicted score
    names = ["sentiment score"] if label_mode == REGRESSION else list(LABEL_MODES[label_mode])
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], {m: specs[m] for m in mods},
                      len(names), names, val_source=VAL_SOURCE, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# the prepared cache


def _read_meta(folder: PreparedFolder) -> dict | None:
    """cache.json when the folder holds a complete CMU-MOSEI cache (prepare writes it last), else None."""
    try:
        meta = folder.json(CACHE_META)
    except DataError:
        return None
    return meta if isinstance(meta, dict) and meta.get("dataset") == "cmu_mosei" else None


def _build_prepared(folder: Path, aligned: bool, label_mode: str, mods: list[str], text_key: str) -> DataSplits:
    prep = PreparedFolder(folder, "cmu_mosei")
    meta = _read_meta(prep)
    if meta is None:
        raise DataError(f"dataset.prepared {str(folder)!r} is not a prepared CMU-MOSEI cache ({CACHE_META} missing "
                        "or not from cmu_mosei); run `mmbalance prepare cmu_mosei --root RAW --out "
                        f"{folder}` first")
    if meta.get("aligned") is not None and bool(meta["aligned"]) != bool(aligned):
        kind = "aligned" if meta["aligned"] else "unaligned"
        raise DataError(f"dataset.prepared {str(folder)!r} holds the {kind} features but dataset.aligned="
                        f"{str(bool(aligned)).lower()}; set dataset.aligned={str(bool(meta['aligned'])).lower()} or "
                        f"prepare the other file into another folder (--set aligned=...)")
    if text_key != "auto" and "text" in mods and meta.get("text_key") not in ("auto", text_key):
        raise DataError(f"dataset.prepared {str(folder)!r} was prepared with text_key={meta.get('text_key')}; "
                        f"dataset.text_key={text_key} needs another prepare run")
    missing = [m for m in mods if m not in meta["shapes"]]
    if missing:
        raise DataError(f"dataset.prepared {str(folder)!r} has no {missing} (it holds {list(meta['shapes'])}); "
                        "prepare again with those modalities")
    specs = {m: ModalitySpec(meta["kinds"][m], tuple(meta["shapes"][m])) for m in meta["shapes"]}
    rows = prep.rows()
    ids = {s: [r["id"] for r in rows if r["split"] == s] for s in SPLITS}
    datasets, dropped = {}, {}
    for split in SPLITS:
        sub = folder / split
        y_path = sub / "y_reg.npy"
        if not y_path.is_file():
            raise DataError(f"{y_path} is missing: the prepared cache is incomplete; run prepare again")
        y = finite.open_npy(y_path, mmap_mode=None)
        if y.ndim != 1 or len(y) != len(ids[split]):
            raise DataError(f"{folder / MANIFEST}: {len(ids[split])} {split} rows but {y_path} has {len(y)} "
                            "scores; run prepare again (--force)")
        sources = {}
        for m in mods:
            path = sub / f"{m}.npy"
            head = finite.open_npy(path)
            if head.shape != (len(y), *specs[m].shape):
                raise DataError(f"{path}: shape {head.shape}, expected {(len(y), *specs[m].shape)}; run prepare "
                                "again (--force)")
            sources[m] = path
        datasets[split], dropped[split] = _make_split(sources, y, ids[split], label_mode)
    # prepare wrote these arrays cleaned (clean_float32), so a NaN/Inf here means they were changed since
    parts = [(m, s, folder / s / f"{m}.npy", datasets[s].rows) for m in mods for s in SPLITS]
    parts += [("y_reg", s, folder / s / "y_reg.npy", None) for s in SPLITS]
    finite.check_cached(f"prepared CMU-MOSEI cache {str(folder)!r} (<split>/<key>.npy)", parts,
                        "the arrays were changed after `mmbalance prepare cmu_mosei`; prepare again with --force")
    notes = _notes(meta["layout"], meta["source"]["path"], meta.get("aligned"), label_mode, meta.get("text"),
                   meta.get("nonfinite_replaced", {}), dropped, datasets, f"prepared cache {folder}")
    notes.update(meta.get("notes", {}))
    return _splits(datasets, specs, mods, label_mode, notes)


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_labels(out: PreparedFolder, ids: dict[str, list[str]], y: dict[str, np.ndarray], label_mode: str) -> None:
    """manifest.csv (id, label under label_mode -- empty where the mode drops the sample --, split, y_reg and
    the label under every mode) and classes.json; the only outputs that depend on label_mode."""
    rows = []
    for split in SPLITS:
        labels, keep = sentiment_labels(y[split], label_mode)
        label = np.full(len(keep), "", dtype=object)
        label[keep] = labels.astype(str)
        cols = _all_label_columns(y[split])
        for i, sample_id in enumerate(ids[split]):
            rows.append({"id": sample_id, "label": label[i], "split": split, "y_reg": f"{float(y[split][i]):.6g}",
                         **{c: v[i] for c, v in cols.items()}})
    out.write_manifest(rows, ["id", "label", "split", "y_reg", "y2_nonneg", "y2_nonzero", "y7"])
    out.write_classes(LABEL_MODES[label_mode])


def prepare(ctx: PrepareContext, aligned: bool = False, layout: str = "auto", label_mode: str = "binary_nonneg",
            text_key: str = "auto", modalities: list[str] | None = None, file: str | None = None) -> dict:
    """Unpickle the MulT/MMSA file once, cast to float32, replace non-finite values by 0, and write the
    memory-mappable cache (see the module docstring). Never re-aligns.

    Options (`--set key=value`): aligned (false: the unaligned file, BalanceBenchmark's recipe), layout
    (auto | mult | mmsa), label_mode (only manifest.csv/classes.json depend on it), text_key, modalities, and
    file (a .pkl path, absolute or relative to --root, when the file has a non-standard name).
    Idempotent: when cache.json records the same source file (path, size, mtime) and options, the arrays are
    kept and only the label files are rewritten; --force rebuilds everything.
    """
    mods = _check_options(layout, label_mode, text_key, modalities)
    if file:
        path = option_path(ctx.root, file)
        if not path.is_file():
            raise DataError(f"prepare cmu_mosei --set file={file}: {str(path)!r} is not a file")
        path, found_layout, file_aligned = path, "file", _aligned_from_name(path.name)
    else:
        path, found_layout, file_aligned = find_source(ctx.root, aligned, layout)
    out = Path(ctx.out)
    stamp = _stamp(path)
    options = {"modalities": mods, "text_key": text_key, "layout": layout}
    meta = _read_meta(ctx.folder)
    if (not ctx.force and meta is not None and meta.get("version") == CACHE_VERSION and meta["source"] == stamp
            and meta["options"] == options and _complete(out, meta)):
        y = {s: ctx.folder.array(f"{s}/y_reg.npy", mmap_mode=None) for s in SPLITS}
        rows = ctx.folder.rows()
        ids = {s: [r["id"] for r in rows if r["split"] == s] for s in SPLITS}
        _write_labels(ctx.folder, ids, y, label_mode)
        return _summary(meta, label_mode, cache="up to date (kept; labels rewritten)")

    src = read_source(path, mods, text_key, layout, file_aligned)
    (out / CACHE_META).unlink(missing_ok=True)  # written last: its presence marks a complete cache
    total = sum(len(src.splits[s].y) for s in SPLITS)
    from tqdm import tqdm

    # Sequential on purpose: the arrays live in this process, and ctx.map would pickle gigabytes to workers.
    with tqdm(total=len(SPLITS) * (len(mods) + 1), desc="writing cache", disable=not ctx.progress, leave=False,
              file=sys.stderr) as bar:
        for split in SPLITS:
            s = src.splits[split]
            # clean_float32 and read_source made every array finite: record that instead of re-reading GBs
            for m in mods:
                ctx.folder.write_array(f"{split}/{m}.npy", s.arrays[m], finite_checked=True)
                s.arrays[m] = None
                bar.update()
            ctx.folder.write_array(f"{split}/y_reg.npy", s.y, finite_checked=True)
            bar.update()
    _write_labels(ctx.folder, {s: src.splits[s].ids for s in SPLITS}, {s: src.splits[s].y for s in SPLITS}, label_mode)
    layout_name = src.layout if found_layout == "file" else found_layout
    meta = {
        "dataset": "cmu_mosei",
        "version": CACHE_VERSION,
        "source": stamp,
        "options": options,
        "layout": layout_name,
        "aligned": src.aligned,
        "text_key": text_key,
        "text": src.text_source,
        "kinds": {m: src.specs[m].kind for m in mods},
        "shapes": {m: list(src.specs[m].shape) for m in mods},
        "counts": {s: len(src.splits[s].y) for s in SPLITS},
        "nonfinite_replaced": src.replaced,
        "notes": src.notes,
        "classes": LABEL_MODES,
    }
    ctx.folder.write_json(CACHE_META, meta)
    log.info("cmu_mosei prepare: %s (%s layout), %d samples, non-finite replaced %s", path, layout_name, total,
             src.replaced)
    return _summary(meta, label_mode, cache="written")


def _complete(out: Path, meta: dict) -> bool:
    files = [out / MANIFEST, out / CLASSES] + [out / s / f"{m}.npy" for s in SPLITS for m in
                                               [*meta["shapes"], "y_reg"]]
    return all(f.is_file() for f in files)


def _summary(meta: dict, label_mode: str, cache: str) -> dict:
    counts = meta["counts"]
    return {
        "layout": meta["layout"],
        "file": meta["source"]["path"],
        "aligned": meta["aligned"],
        "clips": sum(counts.values()),
        **{s: counts[s] for s in SPLITS},
        "modalities": {m: f"{meta['kinds'][m]} {meta['shapes'][m]}" for m in meta["shapes"]},
        "text": meta["text"],
        "nonfinite_replaced": meta["nonfinite_replaced"],
        "label_mode": label_mode,
        "cache": cache,
    }
