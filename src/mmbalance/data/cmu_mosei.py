"""CMU-MOSEI sentiment: audio (COVAREP), vision (FACET) and text (GloVe or BERT) feature sequences.

What is CMU-MOSEI's own: where MulT and MMSA keep its processed pickle (aligned or not; reading and cleaning the
pickle format is data/sentiment_pickles.py), the sentiment labels (three class conventions, or the score itself
for regression) and its memory-mappable prepared cache.
Reference (layouts, labels, tasks, the prepared cache): docs/datasets.md#cmu-mosei-cmu_mosei
"""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

from mmbalance.data import finite
from mmbalance.data.batch import ArrayDataset, DataSplits, ModalitySpec
from mmbalance.data.layout import option_path
from mmbalance.data.prepare import CACHE_META, CLASSES, MANIFEST, PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.data.sentiment_pickles import Source, SplitData, read_source
from mmbalance.errors import DataError, UserError
from mmbalance.metrics.regression import resolve_loss

log = logging.getLogger("mmbalance")

MODALITIES = ("audio", "vision", "text")
SPLITS = ("train", "val", "test")
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
# manifest.csv's column holding each mode's labels (empty where the mode drops the sample)
LABEL_COLUMNS = {"binary_nonneg": "y2_nonneg", "binary_drop_zero": "y2_nonzero", "7class": "y7"}
# the internal label mode of dataset.task=regression: the float scores themselves, one model output
REGRESSION = "regression"
CACHE_VERSION = 1
SCORE_RANGE = (-3.0, 3.0)  # CMU-MOSEI's sentiment scale: annotators rate -3 (very negative) .. +3 (very positive)
VAL_SOURCE = "CMU-MOSEI's own validation split ('valid' in the pickle)"


def sentiment_labels(y: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(class labels int64 for the kept samples, keep mask) of sentiment scores `y` under a LABEL_MODES mode."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    keep = y != 0 if mode == "binary_drop_zero" else np.ones(len(y), dtype=bool)
    labels = np.round(np.clip(y, -3.0, 3.0)) + 3 if mode == "7class" else y[keep] >= 0
    return labels.astype(np.int64), keep


def _check_options(layout: str, label_mode: str, text_key: str, modalities) -> list[str]:
    for name, value, allowed in (("layout", layout, list(LAYOUTS)), ("label_mode", label_mode, sorted(LABEL_MODES)),
                                 ("text_key", text_key, list(TEXT_KEYS))):
        if value not in allowed:
            raise UserError(f"dataset.{name}={value!r}; expected one of {allowed}")
    mods = list(modalities) if modalities else list(MODALITIES)
    if len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
        raise UserError(f"dataset.modalities={mods}; expected distinct names out of {list(MODALITIES)}")
    return mods


def _alignment(aligned: bool | None) -> str:
    return "alignment unknown" if aligned is None else "aligned" if aligned else "unaligned"


# ---------------------------------------------------------------------------------------------------------------
# finding and reading the pickle


def _aligned_from_name(name: str) -> bool | None:
    name = name.lower()
    if "noalign" in name or "unaligned" in name:
        return False
    if "aligned" in name or name == "mosei_senti_data.pkl":
        return True
    return None


def find_source(root: str | Path, aligned: bool = False, layout: str = "auto") -> tuple[Path, str, bool | None]:
    """(pickle path, layout, aligned) for `root`: a folder in a known layout, or the .pkl file itself (layout
    "file", refined from its keys on load). Layout "auto" prefers MulT's file to MMSA's (BalanceBenchmark reads it)."""
    root, aligned = Path(root).expanduser(), bool(aligned)
    if root.is_file():
        return root, "file", _aligned_from_name(root.name)
    if not root.is_dir():
        raise DataError(f"dataset.root {str(root)!r} does not exist; expected a folder holding "
                        f"mosei_senti_data[_noalign].pkl (MulT) or MOSEI/Processed/[un]aligned_50.pkl (MMSA), "
                        "or the path of such a .pkl")
    layouts = ("mult", "mmsa") if layout == "auto" else (layout,)
    candidates = {a: [(name, root / rel) for name in layouts for rel in FILES[(name, a)]] for a in (True, False)}
    for name, path in candidates[aligned]:
        if path.is_file():
            return path, name, aligned
    other = [path for _, path in candidates[not aligned] if path.is_file()]
    found = sorted(p.relative_to(root).as_posix() for pattern in ("*.pkl", "*/*.pkl", "*/*/*.pkl", "*.csd")
                   for p in root.glob(pattern))[:12]
    hint = ""
    if other:
        hint = (f" The {_alignment(not aligned)} file {other[0]} exists: set dataset.aligned={str(not aligned).lower()}"
                " to use it.")
    elif any(f.endswith(".csd") for f in found):
        hint = (" CMU-MultimodalSDK .csd files are not read directly: use the MulT or MMSA processed pickle "
                "(see README: Datasets).")
    raise DataError(
        f"dataset.root {str(root)!r}: no CMU-MOSEI {_alignment(aligned)} pickle found (layout={layout}); looked "
        f"for {', '.join(str(p) for _, p in candidates[aligned])}. Found: {', '.join(found) or 'no .pkl/.csd files'}."
        + hint
    )


# ---------------------------------------------------------------------------------------------------------------
# the builder


def _make_split(s: SplitData, label_mode: str) -> tuple[ArrayDataset, int]:
    """The split's dataset and how many samples label_mode dropped."""
    if label_mode == REGRESSION:  # every sample, its score as the label
        return ArrayDataset(s.arrays, np.arange(len(s.y)), s.y, s.ids, regression=True), 0
    labels, keep = sentiment_labels(s.y, label_mode)
    rows = np.flatnonzero(keep)
    return ArrayDataset(s.arrays, rows, labels, [s.ids[r] for r in rows]), int((~keep).sum())


def build_cmu_mosei(root: str | None = None, prepared: str | None = None, aligned: bool = False,
                    layout: Literal[LAYOUTS] = "auto",
                    label_mode: Literal["binary_nonneg", "binary_drop_zero", "7class"] = "binary_nonneg",
                    modalities: list[Literal[MODALITIES]] | None = None, text_key: Literal[TEXT_KEYS] = "auto",
                    task: Literal["classification", "regression"] = "classification",
                    loss: Literal["auto", "cross_entropy", "l1", "mse"] = "auto") -> DataSplits:
    """CMU-MOSEI as DataSplits of (T, D) `sequence` modalities audio, vision, text (in `modalities` order); `loss`,
    the task's training loss, is read by the run. The options: conf/dataset/cmu_mosei.yaml and docs/datasets.md."""
    prepared = resolve_prepared(root, prepared, "cmu_mosei")  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    mods = _check_options(layout, label_mode, text_key, modalities)
    resolve_loss(task, loss)  # an unknown task, or a loss that does not fit it, is refused before any file is read
    if task == "regression":
        label_mode = REGRESSION  # from here on the "label mode" of float scores
    if prepared:
        src = _read_prepared(PreparedFolder(prepared, "cmu_mosei"), aligned, mods, text_key, root, layout)
    elif not root:
        raise UserError("dataset.root is not set: point it at the CMU-MOSEI folder or .pkl, or set dataset.prepared")
    else:
        path, found_layout, file_aligned = find_source(root, aligned, layout)
        src = read_source(path, mods, text_key, layout, file_aligned, score_range=SCORE_RANGE)
        src.layout = src.layout if found_layout == "file" else found_layout
    datasets, dropped = {}, {}
    for split, s in src.splits.items():
        datasets[split], dropped[split] = _make_split(s, label_mode)
    # prepare wrote these arrays cleaned (sentiment_pickles.read_source): a NaN/Inf here means they were changed
    if prepared:
        parts = [(m, s, d.sources[m], d.rows) for m in mods for s, d in datasets.items()]
        parts += [("y_reg", s, prepared / s / "y_reg.npy", None) for s in SPLITS]
        finite.check_cached(f"prepared CMU-MOSEI cache {str(prepared)!r} (<split>/<key>.npy)", parts,
                            "the arrays were changed after `mmbalance prepare cmu_mosei`; prepare again with --force")
    names = ["sentiment score"] if label_mode == REGRESSION else list(LABEL_MODES[label_mode])
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], {m: src.specs[m] for m in mods},
                      len(names), names, val_source=VAL_SOURCE, notes=_notes(src, label_mode, dropped, datasets))


def _notes(src: Source, label_mode: str, dropped: dict, datasets: dict) -> dict:
    notes = {"layout": src.layout, "file": str(src.file), "aligned": src.aligned, "source": src.origin,
             "label_mode": label_mode, "text": src.text_source, "nonfinite_replaced": dict(src.replaced)}
    if label_mode == REGRESSION:
        # label_mode does not apply to scores; how many are negative, zero, positive per split: the zeros are
        # what the two acc-2 conventions treat apart
        notes.update(task="regression", label_mode=None, score_signs={
            s: [int((d.labels < 0).sum()), int((d.labels == 0).sum()), int((d.labels > 0).sum())]
            for s, d in datasets.items()})
    else:
        notes["class_counts"] = {s: np.bincount(d.labels.numpy(), minlength=len(LABEL_MODES[label_mode])).tolist()
                                 for s, d in datasets.items()}
    if label_mode == "binary_drop_zero":
        notes["dropped_zero"] = dict(dropped)
    log.info("cmu_mosei: %s layout (%s, %s), %s; non-finite values replaced by 0: %s", src.layout,
             _alignment(src.aligned), notes["file"], src.origin, src.replaced)
    return {**notes, **src.notes}


# ---------------------------------------------------------------------------------------------------------------
# the prepared cache


def _read_meta(folder: PreparedFolder) -> dict | None:
    """cache.json when the folder holds a complete CMU-MOSEI cache (prepare writes it last), else None."""
    try:
        meta = folder.json(CACHE_META)
    except DataError:
        return None
    return meta if isinstance(meta, dict) and meta.get("dataset") == "cmu_mosei" else None


def _prepared_labels(folder: PreparedFolder) -> dict[str, SplitData]:
    """Each split's ids (manifest.csv) and scores (<split>/y_reg.npy), without its feature arrays."""
    rows = folder.rows()
    ids = {s: [r["id"] for r in rows if r["split"] == s] for s in SPLITS}
    return {s: SplitData({}, folder.array(f"{s}/y_reg.npy", mmap_mode=None), ids[s]) for s in SPLITS}


def _stale_source(meta: dict, root, aligned: bool, layout: str) -> str | None:
    """What shows that the cache is not made from the pickle a raw build would read (None when nothing does): that
    pickle (the one `root` names, else the one prepare recorded) has another size or mtime than cache.json records.
    Neither there: the cache stands alone (copied elsewhere without its source)."""
    stamp, path = meta["source"], Path(meta["source"]["path"])
    if root:
        with contextlib.suppress(DataError):  # root holds no such pickle: compare with the recorded one
            path = find_source(root, aligned, layout)[0]
    try:
        st = path.stat()
    except OSError:
        return None

    def described(size: int, mtime_ns: int) -> str:
        return f"{size} bytes, modified {datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec='seconds')}"

    if (st.st_size, st.st_mtime_ns) == (stamp["size"], stamp["mtime_ns"]):
        return None
    return (f"it was prepared from {stamp['path']} ({described(stamp['size'], stamp['mtime_ns'])}), but the pickle "
            f"{path} is {described(st.st_size, st.st_mtime_ns)}")


def _read_prepared(prep: PreparedFolder, aligned: bool, mods: list[str], text_key: str, root, layout: str) -> Source:
    """The cache as a Source whose arrays are its .npy files, once it is checked to fit the options and to be
    made from the pickle `root` names (or the one it recorded)."""
    folder, meta = prep.path, _read_meta(prep)
    where = f"dataset.prepared {str(folder)!r}"
    if meta is None:
        raise DataError(f"{where} is not a prepared CMU-MOSEI cache ({CACHE_META} missing or not from cmu_mosei); "
                        "run `mmbalance prepare cmu_mosei --root RAW --out NEW_FOLDER` and set dataset.prepared to "
                        "NEW_FOLDER, or, if this folder holds the pickle, set dataset.root to it and "
                        "dataset.prepared=null")
    if meta.get("aligned") is not None and bool(meta["aligned"]) != bool(aligned):
        raise DataError(f"{where} holds the {_alignment(meta['aligned'])} features but dataset.aligned="
                        f"{str(bool(aligned)).lower()}; set dataset.aligned={str(bool(meta['aligned'])).lower()}, "
                        "set dataset.prepared=null to read the pickle itself, or prepare the other file into another "
                        "folder (--set aligned=...) and point dataset.prepared at it")
    stale = _stale_source(meta, root, aligned, layout)
    if stale:  # a cache silently used for a changed pickle would train on the old data
        raise DataError(f"{where} is out of date: {stale}. Prepare again (`mmbalance prepare cmu_mosei --root "
                        f"{root or meta['source']['path']} --out {folder}`, with the options it was prepared with: it "
                        "rebuilds the cache), or set dataset.prepared=null to read the pickle itself")
    if text_key != "auto" and "text" in mods and meta.get("text_key") not in ("auto", text_key):
        raise DataError(f"{where} was prepared with text_key={meta.get('text_key')}; dataset.text_key={text_key} "
                        "needs another prepare run")
    missing = [m for m in mods if m not in meta["shapes"]]
    if missing:
        raise DataError(f"{where} has no {missing} (it holds {list(meta['shapes'])}); prepare again with those "
                        "modalities")
    specs = {m: ModalitySpec(meta["kinds"][m], tuple(meta["shapes"][m])) for m in meta["shapes"]}
    splits = _prepared_labels(prep)
    for split, s in splits.items():
        if s.y.ndim != 1 or len(s.y) != len(s.ids):
            raise DataError(f"{folder / MANIFEST}: {len(s.ids)} {split} rows but {folder / split / 'y_reg.npy'} has "
                            f"{len(s.y)} scores; run prepare again (--force)")
        for m in mods:
            s.arrays[m] = folder / split / f"{m}.npy"
            shape = prep.array(f"{split}/{m}.npy").shape
            if shape != (len(s.y), *specs[m].shape):
                raise DataError(f"{s.arrays[m]}: shape {shape}, expected {(len(s.y), *specs[m].shape)}; run prepare "
                                "again (--force)")
    return Source(meta["source"]["path"], meta["layout"], meta.get("aligned"), splits, specs, meta.get("text"),
                  meta.get("nonfinite_replaced", {}), meta.get("notes", {}), f"prepared cache {folder}")


def _write_labels(out: PreparedFolder, splits: dict[str, SplitData], label_mode: str) -> None:
    """manifest.csv (id, label under label_mode, split, y_reg and the label under every mode) and classes.json:
    the only outputs that depend on label_mode."""
    rows = []
    for split, s in splits.items():
        cols = {}
        for mode, col in LABEL_COLUMNS.items():
            labels, keep = sentiment_labels(s.y, mode)
            cols[col] = np.full(len(keep), "", dtype=object)
            cols[col][keep] = labels.astype(str)
        rows += [{"id": sample_id, "label": cols[LABEL_COLUMNS[label_mode]][i], "split": split,
                  "y_reg": f"{float(s.y[i]):.6g}", **{c: v[i] for c, v in cols.items()}}
                 for i, sample_id in enumerate(s.ids)]
    out.write_manifest(rows, ["id", "label", "split", "y_reg", *LABEL_COLUMNS.values()])
    out.write_classes(LABEL_MODES[label_mode])


def prepare(ctx: PrepareContext, aligned: bool = False, layout: str = "auto", label_mode: str = "binary_nonneg",
            text_key: str = "auto", modalities: list[str] | None = None, file: str | None = None) -> dict:
    """Unpickle the MulT/MMSA file once and write the cleaned, memory-mappable cache (its files and options:
    docs/datasets.md, "The prepared cache"). Idempotent: when cache.json records the same source file (path, size,
    mtime) and options, the arrays are kept and only the label files are rewritten; --force rebuilds everything."""
    mods = _check_options(layout, label_mode, text_key, modalities)
    source = option_path(ctx.root, file) if file else ctx.root
    if file and not source.is_file():
        raise DataError(f"prepare cmu_mosei --set file={file}: {str(source)!r} is not a file")
    path, found_layout, file_aligned = find_source(source, aligned, layout)
    out, st = ctx.folder, path.stat()
    stamp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    options = {"modalities": mods, "text_key": text_key, "layout": layout}
    meta = _read_meta(out)
    if (not ctx.force and meta is not None and meta.get("version") == CACHE_VERSION and meta["source"] == stamp
            and meta["options"] == options
            and out.has(MANIFEST, CLASSES, *(f"{s}/{m}.npy" for s in SPLITS for m in [*meta["shapes"], "y_reg"]))):
        _write_labels(out, _prepared_labels(out), label_mode)
        _note_replaced(ctx, meta.get("nonfinite_where", []))
        return _summary(meta, label_mode, cache="up to date (kept; labels rewritten)")

    src = read_source(path, mods, text_key, layout, file_aligned, score_range=SCORE_RANGE)
    src.layout = src.layout if found_layout == "file" else found_layout
    _note_replaced(ctx, src.replaced_in)
    (out.path / CACHE_META).unlink(missing_ok=True)  # written last: its presence marks a complete cache
    from tqdm import tqdm

    # Sequential on purpose: the arrays live in this process, and ctx.map would pickle gigabytes to workers.
    with tqdm(total=len(SPLITS) * (len(mods) + 1), desc="writing cache", disable=not ctx.progress, leave=False,
              file=sys.stderr) as bar:
        for split, s in src.splits.items():
            # clean_float32 and read_source made every array finite: record that instead of re-reading GBs;
            # each array is dropped once written
            for name in [*mods, "y_reg"]:
                array = s.y if name == "y_reg" else s.arrays.pop(name)
                out.write_array(f"{split}/{name}.npy", array, finite_checked=True)
                bar.update()
    _write_labels(out, src.splits, label_mode)
    meta = {"dataset": "cmu_mosei", "version": CACHE_VERSION, "source": stamp, "options": options,
            "layout": src.layout, "aligned": src.aligned, "text_key": text_key, "text": src.text_source,
            "kinds": {m: src.specs[m].kind for m in mods}, "shapes": {m: list(src.specs[m].shape) for m in mods},
            "counts": {s: len(d.y) for s, d in src.splits.items()}, "nonfinite_replaced": src.replaced,
            "nonfinite_where": src.replaced_in, "notes": src.notes, "classes": LABEL_MODES}
    out.write_json(CACHE_META, meta)
    log.info("cmu_mosei prepare: %s (%s layout), %d samples, non-finite replaced %s", path, src.layout,
             sum(meta["counts"].values()), src.replaced)
    return _summary(meta, label_mode, cache="written")


def _note_replaced(ctx: PrepareContext, replaced_in) -> None:
    """Each array whose non-finite values the cache holds as 0: kept, but changed, so prepare_report.txt lists it
    (on a run that keeps the cache too, from cache.json)."""
    for where, count in replaced_in:
        ctx.note(where, f"{count} non-finite values (NaN, +-Inf) replaced by 0")


def _summary(meta: dict, label_mode: str, cache: str) -> dict:
    counts = meta["counts"]
    return {"layout": meta["layout"], "file": meta["source"]["path"], "aligned": meta["aligned"],
            "clips": sum(counts.values()), **{s: counts[s] for s in SPLITS},
            "modalities": {m: f"{meta['kinds'][m]} {meta['shapes'][m]}" for m in meta["shapes"]},
            "text": meta["text"], "nonfinite_replaced": meta["nonfinite_replaced"], "label_mode": label_mode,
            "cache": cache}
