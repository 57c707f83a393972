"""Kinetics-Sounds (KS): 31 sound-making action classes of Kinetics-400, audio + visual (datasets.md §1.1).

Clip ids are cvdf's ``<ytid>_<start:06d>_<end:06d>`` (e.g. ``--4-0ihtnBU_000058_000068``); the 31 classes are
those of BML_TPAMI2024 ``KS.json``, numbered in alphabetical order (``KS_CLASSES``; persisted in classes.json).

Accepted layouts under ``root`` (autodetected by their split files; the media folders are probed, see
``KS_VISUAL``/``KS_AUDIO``; ``visual_dir``/``audio_dir`` override the folders):

* ``ogmge``            ``my_train.txt``/``my_test.txt`` (lines ``<id>,10,<label_idx>``),
                       ``visual/<id>/frame_00001.jpg..`` (1 fps), ``audio_spec/<id>.npy`` (OGM-GE
                       ``process_audio.py``: a (1024, 128) Kaldi fbank);
* ``balancebenchmark`` ``ks_{train,test}_overlap.txt``, ``{train,test}.txt`` or ``.csv`` (lines ``<id> <label>``) with
                       frame folders and ``.npy`` arrays (``visual[/_]{split}``, ``audio[/_]{split}`` or shared
                       folders);
* ``bml``              ``KS_train_val.json`` (ActivityNet schema, subsets training/validation/testing), ``<id>.hdf5``
                       (dataset ``video`` = 1 fps JPEG bytes) and ``<id>.pkl`` |STFT| (AV_preprocess_tool);
* ``cvdf``             the raw Kinetics download: ``{train,val,test}/<id>.mp4`` + ``annotations/{train,val|validate,
                       test}.csv`` (Kinetics csv, filtered to the 31 classes); audio and frames decoded with PyAV.
                       Kinetics' own train/val/test become train/val/test; without a labelled test csv, Kinetics' val
                       is the test set (as in the KS literature) and validation is carved from train.

Split files may be comma- or whitespace-separated: the clip id is the basename of the first field, the label the
last field (an integer index into ``KS_CLASSES`` or a class name, spaces or underscores). BML's validation subset
(and Kinetics' own val csv for ``cvdf``) is used as the validation split; otherwise validation is carved from train
(stratified, seeded, ``val_fraction``; DECISIONS "Protocol"). A clip whose media are missing is counted (notes,
log, prepare_report.txt) and left out, never fatal.

Recipes (OGM-GE / BalanceBenchmark ``KS_dataset.py``):
* visual: ``frames`` = 3 frames per clip, one per segment (random in training, centre at evaluation),
  RandomResizedCrop + horizontal flip drawn once per clip in training, Resize((S, S)) at evaluation, ImageNet
  normalisation -> (3, 3, S, S), S = ``image_size`` (224); frames from video are decoded at 1 fps;
* audio from wav or video: OGM-GE ``process_audio.py`` -- 16 kHz, DC removed, Kaldi fbank (htk_compat, Hanning,
  25 / 10 ms, 128 mel bins, no dither), zero-padded or cut to 1024 frames, normalised (x + 4.503877) / (2 * 5.141276)
  -> (1, 128, 1024) (frequency first);
* audio from a stored array (``.npy``/``.pkl``/``.pt``): used as it is, frequency first ((1024, 128) is transposed).
  BML's ``.pkl`` holds a linear |STFT| (257, 1003), not a log spectrogram.

The layout-probing and mp4-extraction helpers here are shared with ``mmbalance.data.vggsound``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import (CACHE_META, AudioReader, Clip, FrameReader, clip_splits, probe_array_shape,
                                  write_clip_cache)
from mmbalance.data.prepare import (read_classes, read_json, read_manifest, resolve_prepared, write_classes,
                                    write_manifest, write_text_atomic)
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

# BML_TPAMI2024 code/dataset/KS.json, alphabetical: integer labels are positions in this list
KS_CLASSES = [
    "blowing_nose", "blowing_out_candles", "bowling", "chopping_wood", "dribbling_basketball", "laughing",
    "mowing_lawn", "playing_accordion", "playing_bagpipes", "playing_bass_guitar", "playing_clarinet",
    "playing_drums", "playing_guitar", "playing_harmonica", "playing_keyboard", "playing_organ", "playing_piano",
    "playing_saxophone", "playing_trombone", "playing_trumpet", "playing_violin", "playing_xylophone",
    "ripping_paper", "shoveling_snow", "shuffling_cards", "singing", "stomping_grapes", "tap_dancing",
    "tapping_guitar", "tapping_pen", "tickling",
]

MODALITIES = ("audio", "visual")  # the fusion head's concat order (BalanceBenchmark's audio, visual)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "validate": "val", "test": "test", "testing": "test"}
MEDIA_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".flv", ".wav", ".npy", ".pkl", ".pt", ".hdf5", ".h5"}
RECIPE = "recipe.json"  # the audio/visual recipe a prepared folder was written with
MANIFEST_COLUMNS = ["id", "label", "split", "label_name", "audio", "visual", "audio_kind", "visual_kind"]

# ---------------------------------------------------------------------------------------------------------------
# layout probing (shared with vggsound): which folder holds each clip's media, in which format

# file-name suffix per media kind; a frame folder may be named `<id>.mp4` (OGM-GE's VGGSound frame extractor)
KIND_SUFFIXES = {"jpgdir": ("", ".mp4"), "hdf5": (".hdf5", ".h5"), "video": (".mp4", ".mkv", ".webm"),
                 "array": (".npy", ".pkl", ".pt"), "wav": (".wav",)}
VIDEO_FOLDERS = ("{split}", "train", "val", "validate", "test", "videos", "video", "mp4")

# (kind, folders) in priority order: on a tie in found clips the earlier kind wins. `{split}` = train|val|test.
KS_VISUAL = (
    ("jpgdir", ("visual", "visual/{split}", "visual_{split}", "{split}/visual", "frames", "Image-01-FPS")),
    ("hdf5", ("hdf5", "visual_hdf5", "video_hdf5", "HDF5", "visual", "{split}/hdf5")),
    ("video", VIDEO_FOLDERS),
)
KS_AUDIO = (
    ("array", ("audio_spec", "audio", "audio/{split}", "audio_{split}", "{split}/audio", "audio_pkl", "pkl",
               "fbank")),
    ("wav", ("audio", "audio_wav", "wav", "audio/{split}", "audio_{split}", "{split}/audio")),
    ("video", VIDEO_FOLDERS),
)


@dataclass(frozen=True)
class Candidate:
    """A place a clip's media may be: `<folder>/<clip name><suffix>` (a folder for kind jpgdir)."""

    folder: str  # relative to the root, or absolute; `{split}` is replaced by the clip's split
    suffix: str
    kind: str  # jpgdir | hdf5 | video (visual); array | wav | video (audio)

    @property
    def is_dir(self) -> bool:
        return self.kind == "jpgdir"

    def folder_for(self, root: Path, split: str) -> Path:
        path = Path(self.folder.format(split=split))
        return path if path.is_absolute() else root / path


def candidate_list(kinds: Sequence[tuple[str, Sequence[str]]], override: str | None = None
                   ) -> list[tuple[str, list[Candidate]]]:
    """[(kind, candidates)] in priority order; `override` (a user's visual_dir/audio_dir) replaces the folders."""
    return [(kind, [Candidate(f, s, kind) for f in ([str(override)] if override else folders)
                    for s in KIND_SUFFIXES[kind]]) for kind, folders in kinds]


class DirIndex:
    """Lists every probed folder once (name -> is a folder), so resolving 200k clips costs set intersections,
    not 200k x candidates stat calls (VGGSound folders hold ~200k entries)."""

    def __init__(self):
        self._listing: dict[Path, dict[str, bool]] = {}
        self._stems: dict[tuple, set[str]] = {}

    def listing(self, folder: Path) -> dict[str, bool]:
        if folder not in self._listing:
            entries: dict[str, bool] = {}
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        try:
                            entries[entry.name] = entry.is_dir()
                        except OSError:
                            continue
            except OSError:
                pass
            self._listing[folder] = entries
        return self._listing[folder]

    def stems(self, folder: Path, suffix: str, is_dir: bool) -> set[str]:
        key = (folder, suffix, is_dir)
        if key not in self._stems:
            n = len(suffix)
            self._stems[key] = {name[:len(name) - n] for name, d in self.listing(folder).items()
                                if d == is_dir and name.endswith(suffix) and len(name) > n}
        return self._stems[key]


@dataclass
class Resolved:
    """Where one modality's media were found: the kind, a path per clip (None = missing), the folders used."""

    kind: str
    paths: list[str | None]
    folders: list[str]
    first: Candidate

    @property
    def found(self) -> int:
        return sum(p is not None for p in self.paths)

    def describe(self) -> str:
        return ", ".join(self.folders) or "-"


def _shown(folder: Path, root: Path) -> str:
    try:
        return str(folder.relative_to(root)) or "."
    except ValueError:
        return str(folder)


def resolve_modality(root: Path, clips: Sequence[Clip], names: Sequence[Sequence[str]],
                     priority: list[tuple[str, list[Candidate]]], index: DirIndex) -> Resolved:
    """For each kind, union its candidate folders (first hit per clip wins); keep the kind that finds the most
    clips. `names[i]` are clip i's accepted file names (VGGSound: plain and zero-padded start)."""
    by_split: dict[str, dict[str, list[int]]] = {}
    for i, (clip, clip_names) in enumerate(zip(clips, names)):
        wanted = by_split.setdefault(clip.split, {})
        for name in clip_names:
            wanted.setdefault(name, []).append(i)
    best: Resolved | None = None
    for kind, cands in priority:
        paths: list[str | None] = [None] * len(clips)
        folders: list[str] = []
        first = None
        for cand in cands:
            for split, wanted in by_split.items():
                folder = cand.folder_for(root, split)
                common = wanted.keys() & index.stems(folder, cand.suffix, cand.is_dir)
                hit, prefix, suffix = False, str(folder) + os.sep, cand.suffix  # plain strings: 200k Paths are slow
                for name in sorted(common):  # sorted: the same file wins on every run
                    for i in wanted[name]:
                        if paths[i] is None:
                            paths[i], hit = prefix + name + suffix, True
                if hit:
                    first = first or cand
                    shown = f"{_shown(cand.folder_for(root, '{split}'), root)}/<id>{cand.suffix}" + \
                        ("/" if cand.is_dir else "")
                    if shown not in folders:
                        folders.append(shown)
        resolved = Resolved(kind, paths, folders, first or cands[0])
        if best is None or resolved.found > best.found:
            best = resolved
    assert best is not None
    return best


@dataclass
class Discovery:
    """The clips of a raw tree: which layout matched, the complete clips, and the ones left out."""

    layout: str
    split_source: str
    clips: list[Clip]  # every modality found
    kinds: dict[str, str]  # modality -> media kind
    where: dict[str, str]  # modality -> description of the folders used
    missing: list[tuple[Clip, list[tuple[str, str]]]] = field(default_factory=list)  # clip, [(modality, path)]
    total: int = 0
    extra_notes: dict = field(default_factory=dict)

    def counts(self) -> dict:
        found = {s: sum(c.split == s for c in self.clips) for s in ("train", "val", "test")}
        lost = {s: sum(c.split == s for c, _ in self.missing) for s in ("train", "val", "test")}
        by_modality = {m: sum(any(mm == m for mm, _ in lack) for _, lack in self.missing) for m in MODALITIES}
        return {"clips_listed": self.total, "clips": {s: n for s, n in found.items() if n},
                "missing_clips": len(self.missing), "missing_by_split": {s: n for s, n in lost.items() if n},
                "missing_by_modality": by_modality}

    def notes(self) -> dict:
        examples = [path for _, lack in self.missing[:10] for _, path in lack[:1]]
        return {"layout": self.layout, "split_source": self.split_source,
                "sources": {m: f"{self.kinds[m]}: {self.where[m]}" for m in MODALITIES}, **self.counts(),
                "missing_examples": examples, **self.extra_notes}

    def log(self, dataset: str) -> None:
        c = self.counts()
        log.info("%s: layout %s (%s); %s; %d of %d listed clips found, %d missing", dataset, self.layout,
                 self.split_source, "; ".join(f"{m} {self.kinds[m]} in {self.where[m]}" for m in MODALITIES),
                 len(self.clips), self.total, c["missing_clips"])
        for clip, lack in self.missing[:5]:
            log.warning("%s: clip %s left out: no %s", dataset, clip.id, ", ".join(f"{m} ({p})" for m, p in lack))


def find_media(root: Path, entries: Sequence[Clip], names: Sequence[Sequence[str]],
               priorities: dict[str, list[tuple[str, list[Candidate]]]], *, layout: str, split_source: str,
               dataset: str) -> Discovery:
    """Resolve every modality of every listed clip; clips lacking a modality are counted as missing."""
    index = DirIndex()
    resolved = {m: resolve_modality(root, entries, names, priorities[m], index) for m in MODALITIES}
    for m, r in resolved.items():
        if r.found == 0:
            kinds = "; ".join(f"{k}: " + ", ".join(sorted({_shown(c.folder_for(root, '{split}'), root) + '/<id>'
                                                          + c.suffix for c in cands}))
                              for k, cands in priorities[m])
            raise DataError(f"{dataset}: no {m} file for any of the {len(entries)} clips listed in {split_source} "
                            f"under {str(root)!r} ({layout} layout); looked for {kinds}")
    clips, missing = [], []
    for i, entry in enumerate(entries):
        lack = []
        for m, r in resolved.items():
            if r.paths[i] is None:
                lack.append((m, str(r.first.folder_for(root, entry.split) / (names[i][0] + r.first.suffix))))
        if lack:
            missing.append((entry, lack))
        else:
            clips.append(Clip(entry.id, entry.label, entry.split, {m: r.paths[i] for m, r in resolved.items()}))
    return Discovery(layout, split_source, clips, {m: r.kind for m, r in resolved.items()},
                     {m: r.describe() for m, r in resolved.items()}, missing, len(entries))


# ---------------------------------------------------------------------------------------------------------------
# split files and labels


def clip_id(field_value: str) -> str:
    """The clip id of a split file's first field: its basename, without a media extension."""
    name = field_value.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in MEDIA_EXTENSIONS else name


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip().strip("'\"").lower())


KS_INDEX = {name: i for i, name in enumerate(KS_CLASSES)}


def ks_label(value: str, where: str) -> int:
    """An integer index into KS_CLASSES, or a class name ('playing bass guitar' or 'playing_bass_guitar')."""
    v = value.strip().strip("'\"")
    if re.fullmatch(r"\d+", v):
        if int(v) >= len(KS_CLASSES):
            raise DataError(f"{where}: label {v} is out of range; Kinetics-Sounds has {len(KS_CLASSES)} classes "
                            f"(0..{len(KS_CLASSES) - 1}, alphabetical)")
        return int(v)
    if _normalise(v) not in KS_INDEX:
        raise DataError(f"{where}: label {v!r} is not one of the {len(KS_CLASSES)} Kinetics-Sounds classes "
                        f"({', '.join(KS_CLASSES[:3])}, ...)")
    return KS_INDEX[_normalise(v)]


def _entries_from_list(path: Path, split: str) -> list[Clip]:
    return [Clip(clip_id(i), ks_label(label, f"{path}, clip {i!r}"), split, {})
            for i, label in media.read_split_file(path)]


def _entries_from_json(path: Path) -> list[Clip]:
    entries = []
    for key, entry in media.read_json_database(path).items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: database entry {key!r} is not an object")
        subset = SPLIT_NAMES.get(str(entry.get("subset", "")).lower())
        if subset is None:
            raise DataError(f"{path}: clip {key!r} has subset {entry.get('subset')!r}; expected training, "
                            "validation or testing")
        label = entry.get("label")
        if label is None and entry.get("annotations"):  # ActivityNet proper: annotations[0].label
            label = entry["annotations"][0].get("label")
        if label is None:
            raise DataError(f"{path}: clip {key!r} has no label")
        entries.append(Clip(clip_id(key), ks_label(str(label), f"{path}, clip {key!r}"), subset, {}))
    return entries


def _is_kinetics_csv(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8-sig") as f:
            return "youtube_id" in f.readline()
    except OSError:
        return False


def read_kinetics_csv(path: Path, split: str) -> tuple[list[Clip], int, int]:
    """Kinetics annotation csv (label,youtube_id,time_start,time_end,split): clips of the 31 KS classes with id
    `<ytid>_<start:06d>_<end:06d>` (cvdf's file names). Returns (clips, other-class rows, unlabelled rows)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"youtube_id", "time_start", "time_end"} <= columns:
            raise DataError(f"{path}: expected a Kinetics annotation csv with columns label, youtube_id, "
                            f"time_start, time_end (found {sorted(columns)})")
        clips, other, unlabelled = [], 0, 0
        for row in reader:
            label = (row.get("label") or "").strip()
            if not label:
                unlabelled += 1
                continue
            if _normalise(label) not in KS_INDEX:
                other += 1
                continue
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                cid = f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}"
            except (TypeError, ValueError):
                raise DataError(f"{path}: row {row} has no integer time_start/time_end") from None
            clips.append(Clip(cid, KS_INDEX[_normalise(label)], split, {}))
    return clips, other, unlabelled


def _root(root: str | Path | None, dataset: str) -> Path:
    if root in (None, ""):
        raise DataError(f"{dataset}: dataset.root is not set (set dataset.root=... or paths.data_dir=...)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"{dataset}: dataset root {str(path)!r} is not a folder (set dataset.root=... or "
                        f"paths.data_dir=...)")
    return path


def _given(root: Path, value: str | None) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def ks_split_entries(root: Path, train_list: str | None = None, val_list: str | None = None,
                     test_list: str | None = None, annotations: str | None = None) -> tuple[str, str, list[Clip], dict]:
    """(layout, split source, listed clips without sources, notes) from the first split source found."""
    ann = _given(root, annotations)
    if ann is not None:
        return "bml", ann.name, _entries_from_json(ann), {}
    given = {s: _given(root, v) for s, v in (("train", train_list), ("val", val_list), ("test", test_list))}
    if given["train"] or given["test"]:
        for s in ("train", "test"):
            if given[s] is None:
                raise DataError(f"Kinetics-Sounds: dataset.{s}_list is not set (train_list and test_list go together)")
        files = {s: p for s, p in given.items() if p is not None}
        layout = "ogmge" if files["train"].name.startswith("my_") else "balancebenchmark"
        return layout, ", ".join(str(p) for p in files.values()), \
            [e for s, p in files.items() for e in _entries_from_list(p, s)], {}
    if (root / "KS_train_val.json").is_file():
        return "bml", "KS_train_val.json", _entries_from_json(root / "KS_train_val.json"), {}
    for layout, (train, test, val) in (("ogmge", ("my_train.txt", "my_test.txt", "my_val.txt")),
                                       ("balancebenchmark", ("ks_train_overlap.txt", "ks_test_overlap.txt",
                                                             "ks_val_overlap.txt")),
                                       ("balancebenchmark", ("train.txt", "test.txt", "val.txt")),
                                       ("balancebenchmark", ("train.csv", "test.csv", "val.csv"))):
        if not (root / train).is_file() or _is_kinetics_csv(root / train):
            continue
        if not (root / test).is_file():
            raise DataError(f"Kinetics-Sounds: {str(root / test)!r} does not exist ({train} was found: the "
                            f"{layout} layout needs both split files)")
        files = {"train": root / train, "test": root / test}
        if (root / val).is_file():
            files["val"] = root / val
        return layout, ", ".join(p.name for p in files.values()), \
            [e for s, p in files.items() for e in _entries_from_list(p, s)], {}
    for folder in (root / "annotations", root):
        if (folder / "train.csv").is_file() and _is_kinetics_csv(folder / "train.csv"):
            return _cvdf_entries(folder)
    raise DataError(f"Kinetics-Sounds: no split file under {str(root)!r}; expected one of: KS_train_val.json (BML), "
                    "my_train.txt + my_test.txt (OGM-GE), ks_train_overlap.txt / train.txt / train.csv + the test "
                    "file (BalanceBenchmark), annotations/train.csv (Kinetics, cvdf); or give the split files with the "
                    "options train_list + test_list (or annotations)")


def _cvdf_entries(folder: Path) -> tuple[str, str, list[Clip], dict]:
    entries, files, other, unlabelled = [], [], 0, 0
    for name, split in (("train.csv", "train"), ("val.csv", "val"), ("validate.csv", "val"), ("test.csv", "test")):
        if (folder / name).is_file():
            clips, o, u = read_kinetics_csv(folder / name, split)
            entries += clips
            other, unlabelled = other + o, unlabelled + u
            files.append(name)
    notes = {"kinetics_rows_other_classes": other, "kinetics_rows_unlabelled": unlabelled}
    if not any(c.split == "test" for c in entries) and any(c.split == "val" for c in entries):
        # no labelled Kinetics test csv: Kinetics' validation clips are the test set (as in the KS literature)
        entries = [Clip(c.id, c.label, "test" if c.split == "val" else c.split, {}) for c in entries]
        notes["kinetics_val_used_as_test"] = True
    return "cvdf", f"{_shown(folder, folder.parent)}/{{{','.join(files)}}}", entries, notes


# ---------------------------------------------------------------------------------------------------------------
# readers


class ArrayAudioReader(AudioReader):
    """A stored spectrogram (.npy/.pkl/.pt) used as it is; every clip must have the first clip's shape (a clip
    that does not is one DataError naming its file, not a collate crash)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__(source="array", shape=tuple(shape))

    def __call__(self, path: str, train: bool, generator=None):
        x = super().__call__(path, train, generator)
        if tuple(x.shape) != self.shape:
            raise DataError(f"{path}: spectrogram of shape {tuple(x.shape)}, expected {self.shape} like the other "
                            "clips")
        return x


def ks_audio_reader(kind: str, paths: Sequence[str], *, sample_rate: int, num_mel_bins: int,
                    audio_target_frames: int) -> AudioReader:
    if kind == "array":
        return ArrayAudioReader(probe_array_shape(paths))
    return AudioReader(source=kind, recipe="kaldi_fbank", sr=sample_rate, num_mel_bins=num_mel_bins,
                       target_frames=audio_target_frames)


# ---------------------------------------------------------------------------------------------------------------
# the prepared folder (shared with vggsound)


def manifest_rows(out: Path, clips: Sequence[Clip], kinds: dict[str, str], classes: Sequence[str]) -> list[dict]:
    def rel(path: str) -> str:  # inside the prepared folder: relative, so the folder can be moved
        try:
            return str(Path(path).resolve().relative_to(out.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    return [{"id": c.id, "label": c.label, "split": c.split, "label_name": classes[c.label],
             **{m: rel(c.sources[m]) for m in MODALITIES}, **{f"{m}_kind": kinds[m] for m in MODALITIES}}
            for c in clips]


def read_prepared(folder: Path, dataset: str) -> tuple[list[Clip], list[str], dict[str, str]]:
    """(clips with absolute sources, class names, modality -> kind) from manifest.csv + classes.json."""
    if not folder.is_dir():
        raise DataError(f"dataset.prepared {str(folder)!r} is not a folder; run `mmbalance prepare {dataset} "
                        f"--root RAW --out {folder}` first")
    rows = read_manifest(folder)
    classes = read_classes(folder)
    missing = [c for c in MANIFEST_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{folder / 'manifest.csv'}: columns {missing} are missing; prepare it again with "
                        f"`mmbalance prepare {dataset}`")
    clips, kinds = [], {m: rows[0][f"{m}_kind"] for m in MODALITIES} if rows else {}
    for row in rows:
        label = int(row["label"])
        if not 0 <= label < len(classes):
            raise DataError(f"{folder / 'manifest.csv'}: clip {row['id']!r} has label {label}, but classes.json "
                            f"lists {len(classes)} classes")
        sources = {m: str(p if (p := Path(row[m])).is_absolute() else folder / p) for m in MODALITIES}
        clips.append(Clip(row["id"], label, row["split"], sources))
    if not clips:
        raise DataError(f"{folder / 'manifest.csv'} lists no clips")
    return clips, classes, kinds


def build_prepared(folder: str | Path, dataset: str, *, audio_reader: Callable[[str, list[Clip]], AudioReader],
                   frames: int, image_size: int, augment: str, video_fps: float, val_fraction: float,
                   split_seed: int) -> tuple[DataSplits, bool]:
    """DataSplits from a folder `prepare` wrote: the memory-mapped cache when it has one (no decoding), else the
    manifest's extracted files decoded on access. Returns (splits, whether the cache is used)."""
    folder = Path(str(folder)).expanduser()
    clips, classes, kinds = read_prepared(folder, dataset)
    cached = (folder / CACHE_META).is_file()
    if cached:
        meta = read_json(folder / CACHE_META)
        readers = {"audio": AudioReader(source="array", shape=tuple(meta["modalities"]["audio"]["shape"])),
                   "visual": FrameReader(frames=frames, size=image_size, augment=augment)}
        # clips the cache lacks are counted (notes["uncached_clips"]) and logged by clip_splits
        extra = {"cache_frame_size": meta.get("size"), "cache_max_frames": meta.get("max_frames")}
    else:
        readers = {"audio": audio_reader(kinds["audio"], clips),
                   "visual": FrameReader(source=kinds["visual"], frames=frames, size=image_size, augment=augment,
                                         fps=video_fps)}
        extra = {}
    summary = read_json(folder / "prepare_summary.json", optional=True)
    notes = {"layout": "prepared", "prepared": str(folder), "source_layout": summary.get("layout"),
             "cache": cached, "sources": {m: kinds[m] for m in MODALITIES},
             "clips": {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")},
             "missing_clips": summary.get("missing_clips"), **extra}
    log.info("%s: prepared folder %s (%s), %d clips", dataset, folder, "cache" if cached else "decoded on access",
             len(clips))
    splits = clip_splits(clips, readers, classes, val_fraction=val_fraction, split_seed=split_seed,
                         cache_dir=folder if cached else None, notes=notes)
    return splits, cached


# ---------------------------------------------------------------------------------------------------------------
# prepare (shared with vggsound)


def parse_shard(shard) -> tuple[int, int] | None:
    """'i/n' -> (i, n): the i-th (0-based) of n interleaved shards of the clip list."""
    if shard in (None, "", False):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"prepare --set shard={shard!r}: expected i/n with 0 <= i < n, e.g. shard=0/4")
    return int(m.group(1)), int(m.group(2))


def _extract_clip(task: tuple) -> tuple[int, str | None, str | None, bool, bool]:
    """Worker: a video's audio -> 16 kHz mono wav and its frames at `fps` -> frame_00001.jpg ... Both are written
    to a temporary name and renamed, so an output that exists is complete (re-runs skip it).
    Returns (index, failing path or None, error or None, wrote audio, wrote frames)."""
    i, audio_video, frames_video, wav, frames_dir, sr, fps, short_side, force = task
    wrote_audio = wrote_frames = False
    if audio_video is not None:
        try:
            wrote_audio = media.extract_wav(audio_video, wav, sr, force)
        except DataError as exc:
            return i, audio_video, str(exc), False, False
    if frames_video is not None:
        try:
            wrote_frames = media.extract_frames(frames_video, frames_dir, fps, short_side, force) >= 0
        except DataError as exc:
            return i, frames_video, str(exc), wrote_audio, False
    return i, None, None, wrote_audio, wrote_frames


def extract_media(ctx, clips: list[Clip], kinds: dict[str, str], *, sample_rate: int, fps: float,
                  short_side: int) -> tuple[list[Clip], dict[str, str], dict]:
    """For modalities read from video: audio -> `<out>/audio/<id>.wav` (mono, `sample_rate`), frames ->
    `<out>/frames/<id>/frame_%05d.jpg` at `fps` (the centre of each 1/fps interval). Existing outputs are skipped
    (resumable); a video that fails to decode is recorded with ctx.problem and its clip dropped."""
    need_audio, need_frames = kinds["audio"] == "video", kinds["visual"] == "video"
    if not (need_audio or need_frames):
        return clips, kinds, {}
    out = Path(ctx.out)
    tasks = [(i, c.sources["audio"] if need_audio else None, c.sources["visual"] if need_frames else None,
              str(out / "audio" / f"{c.id}.wav"), str(out / "frames" / c.id), int(sample_rate), float(fps),
              int(short_side or 0), bool(ctx.force)) for i, c in enumerate(clips)]
    kept, stats = [], {"audio_extracted": 0, "frames_extracted": 0, "extract_skipped_existing": 0,
                       "extract_failed": 0}
    for i, bad_path, error, wrote_audio, wrote_frames in ctx.map(_extract_clip, tasks, desc="extracting media"):
        if error is not None:
            ctx.problem(bad_path, error)
            stats["extract_failed"] += 1
            continue
        stats["audio_extracted"] += wrote_audio
        stats["frames_extracted"] += wrote_frames
        stats["extract_skipped_existing"] += not (wrote_audio or wrote_frames)
        c = clips[i]
        sources = dict(c.sources)
        if need_audio:
            sources["audio"] = tasks[i][3]
        if need_frames:
            sources["visual"] = tasks[i][4]
        kept.append(Clip(c.id, c.label, c.split, sources))
    kinds = {"audio": "wav" if need_audio else kinds["audio"], "visual": "jpgdir" if need_frames else kinds["visual"]}
    return kept, kinds, stats


def prepare_clips(ctx, dataset: str, disc: Discovery, classes: list[str], *,
                  cache_readers: Callable[[dict[str, str], list[Clip]], dict], recipe: dict, sample_rate: int,
                  fps: float, short_side: int, cache: bool, size: int, max_frames: int, shard) -> dict:
    """The common prepare steps: report missing clips, extract from video (optionally one shard), write
    classes.json, manifest.csv, recipe.json and the clip cache."""
    for clip, lack in disc.missing:
        by_path: dict[str, list[str]] = {}
        for m, path in lack:  # a raw video missing is one file for both modalities
            by_path.setdefault(path, []).append(f"{m} ({disc.kinds[m]})")
        for path, what in by_path.items():
            ctx.problem(path, f"missing: no {' or '.join(what)} for clip {clip.id}")
    summary = {"layout": disc.layout, "split_source": disc.split_source, "formats": dict(disc.kinds),
               **disc.counts(), **disc.extra_notes}
    clips = disc.clips
    part = parse_shard(shard)
    write_classes(ctx.out, classes)
    if part is not None:
        i, n = part
        shard_clips = clips[i::n]
        _, _, stats = extract_media(ctx, shard_clips, disc.kinds, sample_rate=sample_rate, fps=fps,
                                    short_side=short_side)
        summary.update(stats, shard=f"{i}/{n}", shard_clips=len(shard_clips),
                       next_step=f"when every shard is done, run `mmbalance prepare {dataset}` again without "
                                 "shard: it skips what was extracted and writes manifest.csv and the cache")
        return summary
    clips, kinds, stats = extract_media(ctx, clips, disc.kinds, sample_rate=sample_rate, fps=fps,
                                        short_side=short_side)
    summary.update(stats, prepared_formats=kinds)
    write_manifest(ctx.out, manifest_rows(Path(ctx.out), clips, kinds, classes), MANIFEST_COLUMNS)
    write_text_atomic(Path(ctx.out) / RECIPE, json.dumps(recipe, indent=1) + "\n")
    summary["manifest_clips"] = {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")}
    if cache and clips:
        summary.update(write_clip_cache(ctx, clips, cache_readers(kinds, clips), size=int(size),
                                        max_frames=int(max_frames)))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Kinetics-Sounds


def discover_ks(root: str | Path, train_list: str | None = None, val_list: str | None = None,
                test_list: str | None = None, annotations: str | None = None, visual_dir: str | None = None,
                audio_dir: str | None = None) -> Discovery:
    """Find the Kinetics-Sounds clips under `root`: split source, media folders and formats, missing clips."""
    root = _root(root, "Kinetics-Sounds")
    layout, source, entries, extra = ks_split_entries(root, train_list, val_list, test_list, annotations)
    if not entries:
        raise DataError(f"Kinetics-Sounds: {source} under {str(root)!r} lists no clip of the 31 classes")
    seen, unique = set(), []
    for e in entries:  # a clip listed twice (e.g. in train and test) is kept once, where it first appears
        if e.id not in seen:
            seen.add(e.id)
            unique.append(e)
    priorities = {"visual": candidate_list(KS_VISUAL, visual_dir), "audio": candidate_list(KS_AUDIO, audio_dir)}
    disc = find_media(root, unique, [[e.id] for e in unique], priorities, layout=layout, split_source=source,
                      dataset="Kinetics-Sounds")
    disc.extra_notes.update(extra, duplicates_dropped=len(entries) - len(unique))
    return disc


def build_kinetics_sounds(root: str | None, prepared: str | None = None, train_list: str | None = None,
                          val_list: str | None = None, test_list: str | None = None, annotations: str | None = None,
                          visual_dir: str | None = None, audio_dir: str | None = None, frames: int = 3,
                          image_size: int = 224, augment: str = "crop_flip", video_fps: float = 1.0,
                          sample_rate: int = 16000, num_mel_bins: int = 128, audio_target_frames: int = 1024,
                          val_fraction: float = 0.1, split_seed: int = 0) -> DataSplits:
    """Kinetics-Sounds as DataSplits with modalities audio (1, F, T) and visual (frames, 3, S, S).

    `prepared`: a folder written by ``mmbalance prepare kinetics_sounds`` (read from its cache, no decoding);
    otherwise the raw tree under `root` in any layout of the module docstring, decoded on access. Defaults follow
    OGM-GE / BalanceBenchmark: 3 frames at 224 px, the (1, 128, 1024) Kaldi fbank at 16 kHz when audio is decoded
    from wav/video (`audio_target_frames`, `num_mel_bins`, `sample_rate` change it), the stored array otherwise.
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    def audio_reader(kind: str, clips: list[Clip]) -> AudioReader:
        return ks_audio_reader(kind, [c.sources["audio"] for c in clips], sample_rate=sample_rate,
                               num_mel_bins=num_mel_bins, audio_target_frames=audio_target_frames)

    if prepared not in (None, ""):
        splits, _ = build_prepared(prepared, "kinetics_sounds", audio_reader=audio_reader, frames=frames,
                                   image_size=image_size, augment=augment, video_fps=video_fps,
                                   val_fraction=val_fraction, split_seed=split_seed)
        return splits
    disc = discover_ks(root, train_list, val_list, test_list, annotations, visual_dir, audio_dir)
    disc.log("Kinetics-Sounds")
    readers = {"audio": audio_reader(disc.kinds["audio"], disc.clips),
               "visual": FrameReader(source=disc.kinds["visual"], frames=frames, size=image_size, augment=augment,
                                     fps=video_fps)}
    return clip_splits(disc.clips, readers, KS_CLASSES, val_fraction=val_fraction, split_seed=split_seed,
                       notes=disc.notes())


def prepare(ctx, train_list: str | None = None, val_list: str | None = None, test_list: str | None = None,
            annotations: str | None = None, visual_dir: str | None = None, audio_dir: str | None = None,
            fps: float = 1.0, short_side: int = 0, sample_rate: int = 16000, num_mel_bins: int = 128,
            audio_target_frames: int = 1024, cache: bool = True, size: int = 224, max_frames: int = 10,
            shard: str | None = None) -> dict:
    """`mmbalance prepare kinetics_sounds --root RAW --out PREP [--set key=value ...]`.

    1. find the layout and the clips (split files, media folders); missing media -> prepare_report.txt;
    2. from raw video (cvdf): audio -> ``<out>/audio/<id>.wav`` (mono, `sample_rate` 16 kHz) and frames at `fps`
       (1) -> ``<out>/frames/<id>/frame_%05d.jpg`` (optionally `short_side` px), with PyAV; existing outputs are
       skipped; `shard=i/n` extracts only every n-th clip from the i-th (run shards in parallel, then once
       without shard);
    3. classes.json (the 31 classes), manifest.csv, recipe.json;
    4. `cache` (default on): the memory-mapped cache (`size` px frames, up to `max_frames` per clip; the audio
       recipe's (1, 128, 1024) fbank in float16, or the stored arrays) that ``dataset.prepared`` reads.
    """
    disc = discover_ks(ctx.root, train_list, val_list, test_list, annotations, visual_dir, audio_dir)

    def cache_readers(kinds: dict[str, str], clips: list[Clip]) -> dict:
        audio = ks_audio_reader(kinds["audio"], [c.sources["audio"] for c in clips], sample_rate=sample_rate,
                                num_mel_bins=num_mel_bins, audio_target_frames=audio_target_frames)
        return {"audio": audio, "visual": FrameReader(source=kinds["visual"], size=int(size), fps=fps)}

    recipe = {"audio": {"recipe": "kaldi_fbank", "sample_rate": sample_rate, "num_mel_bins": num_mel_bins,
                        "target_frames": audio_target_frames} if disc.kinds["audio"] != "array"
              else {"recipe": "stored array"}, "visual": {"fps": fps}}
    return prepare_clips(ctx, "kinetics_sounds", disc, KS_CLASSES, cache_readers=cache_readers, recipe=recipe,
                         sample_rate=sample_rate, fps=fps, short_side=short_side, cache=cache, size=size,
                         max_frames=max_frames, shard=shard)
