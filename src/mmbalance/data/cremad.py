"""CREMA-D (Cao et al. 2014): 7,442 clips of 91 actors speaking 12 sentences with 6 emotions; audio + visual.

Reads any of the three on-disk layouts people have (datasets.md §2), autodetected, there or one level below
`root`:

* raw release  (CheyneyComputerScience/CREMA-D): ``AudioWAV/<clip>.wav`` + ``VideoFlash/<clip>.flv``; frames are
  decoded from the flv with PyAV at ``video_fps`` (slow on every access: run ``mmbalance prepare cremad``);
* OGM-GE       ``Image-01-FPS/<clip>/<absframe:05d>.jpg`` (1 fps) + ``AudioWAV/<clip>.wav``
  (+ ``train.csv``/``test.csv``);
* MMPareto / BalanceBenchmark ``visual/<clip>/frame_00001.jpg ..`` + ``audio/<clip>.pt`` (a pre-computed spectrogram)
  (+ ``stat.csv``/``train.csv``/``test.csv``).

Clip names are ``<actor>_<sentence>_<EMO>_<level>`` (``1001_DFA_ANG_XX``): the emotion and the speaker come from
the name, so no metadata file is needed.

Recipes (the defaults reproduce the references):
* audio from wav: OGM-GE's ``CramedDataset`` -- 22,050 Hz, tiled to 3 s, |STFT| with n_fft 512, hop 353, Hann,
  centred, log(|S| + 1e-7) -> (1, 257, 188). ``pad_mode`` is explicit: OGM-GE (2022) ran librosa < 0.10, whose
  centre padding was 'reflect' (the default here); 'constant' matches librosa >= 0.10 (datasets.md §6.4);
* audio from ``.pt``: the BalanceBenchmark / MMPareto array used as it is (its recipe is undocumented; a
  maintainer said it is OGM-GE's Kinetics-Sounds fbank script, stored as .pt);
* visual: ``frames`` frames per clip (BalanceBenchmark's CREMA-D ``fps: 2`` = 2 frames): the clip's frames are
  split into that many segments, a random frame of each in training and the centre one at evaluation;
  RandomResizedCrop + horizontal flip drawn once per clip in training, Resize((S, S)) at evaluation, ImageNet
  normalisation; (T, 3, S, S) with S = ``image_size`` (224 in the paper).

Label maps (persisted in ``classes.json`` by prepare, recorded in the run's notes):
* ``ogmge`` (default): NEU HAP SAD FEA DIS ANG -> 0..5, hard-coded by OGM-GE and by BalanceBenchmark, whose
  protocol our ``paper_cremad`` preset reproduces -- so per-class numbers line up with those papers;
* ``sorted``: ANG DIS FEA HAP NEU SAD -> 0..5, MMPareto / Diagnosing (``sorted(stat.csv)``).

Splits (``split``):
* ``auto``: user split files when found (``train.csv`` + ``test.csv`` under root, or given by path), else
  ``stratified``;
* ``files``: split files required (a DataError names what is missing);
* ``stratified``: a seeded per-emotion split, ``test_fraction`` (10 %, like OGM-GE's 744 / 7,442) held out;
  like OGM-GE's lists it is NOT speaker-independent;
* ``speaker``: speaker-disjoint by actor id (new; recommended when the claim is generalisation to new people):
  ``test_fraction`` of the actors are test actors, ``val_fraction`` of the rest validation actors.
Validation is carved from train (stratified, seeded, ``val_fraction``) unless a ``val_split`` file is given or
the split is by speaker (DECISIONS "Protocol").
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbalance.data import media
from mmbalance.data.batch import DataSplits, stratified_split
from mmbalance.data.clips import (CACHE_META, AudioReader, Clip, FrameReader, clip_splits, probe_array_shape,
                                  write_clip_cache)
from mmbalance.data.prepare import (read_classes, read_json, read_manifest, resolve_prepared, write_classes,
                                    write_manifest)
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
LABEL_MAPS = {
    "ogmge": ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"],  # OGM-GE / BalanceBenchmark
    "sorted": sorted(EMOTIONS),  # MMPareto / Diagnosing
}
# <actor>_<sentence>_<EMO>_<level>, e.g. 1001_DFA_ANG_XX (levels LO, MD, HI, XX)
CLIP_NAME = re.compile(r"^(?P<actor>\d+)_(?P<sentence>[A-Za-z]+)_(?P<emotion>[A-Za-z]{3})_(?P<level>[A-Za-z]+)$")
SPLIT_MODES = ("auto", "files", "stratified", "speaker")
LAYOUTS = {  # name -> (visual folder, audio folder)
    "raw": ("VideoFlash", "AudioWAV"),
    "ogmge": ("Image-01-FPS", "AudioWAV"),
    "balancebenchmark": ("visual", "audio"),
}
ARRAY_SUFFIXES = (".pt", ".npy", ".pkl")
# folders that hold media, never split files: not searched for train.csv/test.csv
_MEDIA_DIRS = {"AudioWAV", "AudioMP3", "VideoFlash", "Image-01-FPS", "visual", "audio", "frames"}


def parse_clip_name(name: str) -> tuple[str, str] | None:
    """(actor, EMO) from a CREMA-D clip name, or None when the name does not follow the convention."""
    m = CLIP_NAME.match(name)
    if m is None or m["emotion"].upper() not in EMOTIONS:
        return None
    return m["actor"], m["emotion"].upper()


def class_names_for(label_map: str) -> list[str]:
    if label_map not in LABEL_MAPS:
        raise DataError(f"dataset.label_map={label_map!r}; expected one of {sorted(LABEL_MAPS)}")
    return list(LABEL_MAPS[label_map])


# ---------------------------------------------------------------------------------------------------------------
# layout detection


@dataclass
class Source:
    """Where one modality's files are: `kind` jpgdir (a frame folder per clip), video (.flv), wav, array."""

    kind: str
    folder: Path
    suffix: str = ""

    def path(self, clip_id: str) -> Path:
        return self.folder / (clip_id if self.kind == "jpgdir" else clip_id + self.suffix)

    def ids(self) -> dict[str, Path]:
        """Every clip this folder has a file (or frame folder) for."""
        out = {}
        with os.scandir(self.folder) as it:
            for e in it:
                if self.kind == "jpgdir":
                    if e.is_dir() and not e.name.endswith(".tmp"):
                        out[e.name] = Path(e.path)
                elif e.name.lower().endswith(self.suffix) and e.is_file():
                    out[e.name[: -len(self.suffix)]] = Path(e.path)
        return out

    def describe(self) -> str:
        what = {"jpgdir": "frame folders", "video": f"videos ({self.suffix})", "wav": "wav files",
                "array": f"spectrogram arrays ({self.suffix})"}[self.kind]
        return f"{what} in {self.folder}"


def _has(folder: Path, kind: str) -> str | None:
    """The suffix (or '' for frame folders) when `folder` holds media of `kind`, else None. Reads only until
    the first match, so probing a 7,442-clip folder is cheap."""
    if not folder.is_dir():
        return None
    with os.scandir(folder) as it:
        for e in it:
            name = e.name.lower()
            if kind == "jpgdir" and e.is_dir():
                return ""
            if kind == "video" and name.endswith(".flv"):
                return ".flv"
            if kind == "wav" and name.endswith(".wav"):
                return ".wav"
            if kind == "array":
                for s in ARRAY_SUFFIXES:
                    if name.endswith(s):
                        return s
    return None


def _source(folder: Path, kind: str) -> Source | None:
    suffix = _has(folder, kind)
    return None if suffix is None else Source(kind, folder, suffix)


def _resolve_dir(root: Path, value: str | None) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else root / p


@dataclass
class Layout:
    name: str  # raw | ogmge | balancebenchmark | mixed
    base: Path
    visual: Source
    audio: Source


def detect_layout(root: str | Path, layout: str = "auto", audio: str = "auto", visual_dir: str | None = None,
                  audio_dir: str | None = None) -> Layout:
    """Find the CREMA-D media under `root` (or one folder below it) and say which known layout matched.

    Visual preference: frame folders (``visual/``, then ``Image-01-FPS/``) over decoding ``VideoFlash/*.flv``.
    Audio (`audio`): auto = ``audio/*.pt`` when present (the BalanceBenchmark layout), else ``AudioWAV/*.wav``,
    else the flv's own audio track; wav | pt | video force one. `visual_dir` / `audio_dir` (relative to root
    or absolute) override the folders; their content decides the kind.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"CREMA-D root {str(root)!r} does not exist or is not a folder")
    if layout not in ("auto", *LAYOUTS):
        raise DataError(f"dataset.layout={layout!r}; expected auto or one of {sorted(LAYOUTS)}")
    if audio not in ("auto", "wav", "pt", "video"):
        raise DataError(f"dataset.audio={audio!r}; expected auto, wav, pt or video")
    bases = [root] + sorted((p for p in root.iterdir() if p.is_dir() and p.name not in _MEDIA_DIRS),
                            key=lambda p: media.natural_key(p.name))
    audio_kinds = {"auto": ("array", "wav", "video"), "wav": ("wav",), "pt": ("array",), "video": ("video",)}[audio]
    audio_folders = {"array": "audio", "wav": "AudioWAV", "video": "VideoFlash"}

    def explicit(value, kinds, what) -> Source:
        folder = _resolve_dir(root, value)
        for kind in kinds:
            src = _source(folder, kind)
            if src is not None:
                return src
        raise DataError(f"dataset.{what}: {str(folder)!r} holds no {' / '.join(kinds)} media for CREMA-D")

    for base in bases:
        if visual_dir:
            vis = explicit(visual_dir, ("jpgdir", "video"), "visual_dir")
        elif layout != "auto":
            vis = _source(base / LAYOUTS[layout][0], "video" if layout == "raw" else "jpgdir")
        else:
            vis = (_source(base / "visual", "jpgdir") or _source(base / "Image-01-FPS", "jpgdir")
                   or _source(base / "VideoFlash", "video"))
        if vis is None:
            continue
        if audio_dir:
            aud = explicit(audio_dir, audio_kinds, "audio_dir")
        elif layout != "auto" and audio == "auto":
            kind = "array" if layout == "balancebenchmark" else "wav"
            aud = _source(base / LAYOUTS[layout][1], kind)
        else:
            aud = next((s for k in audio_kinds if (s := _source(base / audio_folders[k], k)) is not None), None)
        if aud is None:
            continue
        name = next((n for n, (v, a) in LAYOUTS.items() if vis.folder.name == v and aud.folder.name == a), "mixed")
        return Layout(name, base, vis, aud)
    if layout != "auto":
        v, a = LAYOUTS[layout]
        expected = f"{v}/ and {a}/ (layout {layout!r})"
    else:
        expected = ("AudioWAV/ + VideoFlash/ (raw release), Image-01-FPS/ + AudioWAV/ (OGM-GE) or "
                    "visual/ + audio/ (MMPareto / BalanceBenchmark)")
    raise DataError(f"CREMA-D: no known layout under {str(root)!r}: expected {expected}, in it or one folder below"
                    + (f"; audio={audio!r} was requested" if audio != "auto" else ""))


# ---------------------------------------------------------------------------------------------------------------
# splits


def find_split_files(root: Path, train_split: str | None, test_split: str | None,
                     val_split: str | None) -> dict[str, Path] | None:
    """The split files to use: the given paths (relative to root or absolute; each must exist), else
    ``train.csv`` + ``test.csv`` found together in one folder under root (3 levels deep, media folders skipped).
    None when nothing was given and nothing found."""
    given = {s: _resolve_dir(root, v) for s, v in (("train", train_split), ("test", test_split), ("val", val_split))
             if v not in (None, "")}
    if given:
        for split, path in given.items():
            if not path.is_file():
                raise DataError(f"dataset.{split}_split: split file {str(path)!r} does not exist")
        if "train" not in given or "test" not in given:
            raise DataError("dataset.train_split and dataset.test_split must be given together "
                            f"(got {', '.join(f'{k}={str(v)!r}' for k, v in given.items())})")
        return given
    if not root.is_dir():
        return None
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if d not in _MEDIA_DIRS and not d.startswith(".") and depth < 3)
        if "train.csv" in files and "test.csv" in files:
            return {"train": Path(folder) / "train.csv", "test": Path(folder) / "test.csv"}
    return None


def read_split_files(files: dict[str, Path]) -> dict[str, str]:
    """{clip id: split} from OGM-GE style lists (``<clip>,<EMO>``, UTF-8 with BOM, optional header). A label
    field that is an emotion code must agree with the clip name; a clip may be in one list only."""
    split_of: dict[str, str] = {}
    where: dict[str, Path] = {}
    for split, path in files.items():
        for clip_id, label in media.read_split_file(path):
            clip_id = Path(clip_id).stem if clip_id.lower().endswith((".wav", ".flv")) else clip_id
            parsed = parse_clip_name(clip_id)
            if parsed is None:
                raise DataError(f"{path}: {clip_id!r} is not a CREMA-D clip name (<actor>_<sentence>_<EMO>_<level>)")
            if label.upper() in EMOTIONS and label.upper() != parsed[1]:
                raise DataError(f"{path}: clip {clip_id!r} is labelled {label!r} but its name says {parsed[1]}")
            if clip_id in split_of and where[clip_id] != path:
                raise DataError(f"clip {clip_id!r} is in two split files: {where[clip_id]} and {path}")
            split_of[clip_id], where[clip_id] = split, path
    return split_of


def generated_split(ids: list[str], mode: str, test_fraction: float, val_fraction: float,
                    seed: int) -> tuple[dict[str, str], str]:
    """{clip id: split} for a generated split and its description. Deterministic for the same ids and seed
    (ids are sorted first, so the filesystem's listing order does not matter)."""
    ids = sorted(ids, key=media.natural_key)
    parsed = [parse_clip_name(i) for i in ids]
    if mode == "stratified":
        labels = np.array([EMOTIONS.index(p[1]) for p in parsed])
        keep, held = stratified_split(labels, test_fraction, seed)
        out = {ids[i]: "train" for i in keep} | {ids[i]: "test" for i in held}
        return out, f"stratified by emotion, test {test_fraction:.0%}, seed {seed} (not speaker-independent)"
    actors = sorted({p[0] for p in parsed}, key=media.natural_key)
    if len(actors) < 2:
        raise DataError(f"split=speaker needs clips of at least 2 actors; found {len(actors)}")
    order = [actors[i] for i in np.random.default_rng(seed).permutation(len(actors))]
    n_test = min(len(actors) - 1, max(1, int(round(test_fraction * len(actors)))))
    rest = len(actors) - n_test
    n_val = min(rest - 1, max(1, int(round(val_fraction * rest)))) if rest >= 2 and val_fraction > 0 else 0
    split_of_actor = {a: "test" for a in order[:n_test]} | {a: "val" for a in order[n_test:n_test + n_val]}
    out = {i: split_of_actor.get(p[0], "train") for i, p in zip(ids, parsed)}
    desc = (f"speaker-disjoint by actor, seed {seed}: {rest - n_val} train / {n_val} val / {n_test} test actors "
            f"(test actors {sorted(order[:n_test], key=media.natural_key)})")
    return out, desc


def assign_splits(root: Path, ids: list[str], split: str, train_split, test_split, val_split,
                  test_fraction: float, val_fraction: float, seed: int) -> tuple[dict[str, str], str]:
    if split not in SPLIT_MODES:
        raise DataError(f"dataset.split={split!r}; expected one of {SPLIT_MODES}")
    files = None
    if split in ("auto", "files"):
        files = find_split_files(root, train_split, test_split, val_split)
        if files is None and split == "files":
            raise DataError(f"split=files: no split files given and no train.csv + test.csv found under "
                            f"{str(root)!r}; set dataset.train_split / dataset.test_split or use split=stratified")
    elif any(v not in (None, "") for v in (train_split, test_split, val_split)):
        raise DataError(f"dataset.split={split!r} generates the split; remove train_split/test_split/val_split "
                        "or use split=files")
    if files is not None:
        return read_split_files(files), "split files " + ", ".join(f"{k}={v}" for k, v in files.items())
    return generated_split(ids, "speaker" if split == "speaker" else "stratified", test_fraction, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------------
# clip list


def collect_clips(layout: Layout, split_of: dict[str, str], class_names: list[str],
                  ids_from_files: bool) -> tuple[list[Clip], dict, list[tuple[str, str]]]:
    """The clips whose files are all present, plus counts and the list of (path, why) for the others.

    Without split files the clip set is every name either modality has (so a clip with its wav but no video is
    counted missing, not silently dropped). Empty files and empty frame folders count as unreadable; full
    decoding is checked by `prepare` (corrupt files found on the fly raise a DataError naming the clip).
    """
    have = {"visual": layout.visual.ids(), "audio": layout.audio.ids()}
    names = set(split_of) if ids_from_files else set(have["visual"]) | set(have["audio"])
    problems: list[tuple[str, str]] = []
    ignored = sorted(n for n in names if parse_clip_name(n) is None)
    clips, missing, unreadable = [], 0, 0
    unlisted = len((set(have["visual"]) | set(have["audio"])) - set(split_of) - set(ignored)) if ids_from_files else 0
    for clip_id in sorted(set(names) - set(ignored), key=media.natural_key):
        if clip_id not in split_of:
            continue
        sources, bad = {}, False
        for m, src in (("audio", layout.audio), ("visual", layout.visual)):
            path = have[m].get(clip_id)
            if path is None:
                problems.append((str(src.path(clip_id)), f"missing {m} file"))
                missing, bad = missing + 1, True
                continue
            empty = (not any(True for _ in os.scandir(path))) if src.kind == "jpgdir" else path.stat().st_size == 0
            if empty:
                problems.append((str(path), f"unreadable {m}: empty " + ("folder" if src.kind == "jpgdir" else "file")))
                unreadable, bad = unreadable + 1, True
                continue
            sources[m] = str(path)
        if not bad:
            clips.append(Clip(clip_id, class_names.index(parse_clip_name(clip_id)[1]), split_of[clip_id], sources))
    # clips on disk that the split files do not list are not part of the benchmark (counted, not used)
    counts = {"clips": len(clips), "missing_files": missing, "unreadable_files": unreadable,
              "ignored_names": len(ignored), "not_in_split_files": unlisted}
    if ignored:
        problems += [(n, "not a CREMA-D clip name (<actor>_<sentence>_<EMO>_<level>); ignored") for n in ignored[:20]]
    return clips, counts, problems


# ---------------------------------------------------------------------------------------------------------------
# readers


def make_readers(visual_kind: str, audio_kind: str, *, frames: int, image_size: int, augment: str,
                 video_fps: float, pad_mode: str, audio_shape: tuple[int, ...] | None = None) -> dict:
    """audio first, then visual (the concat order of OGM-GE and BalanceBenchmark)."""
    if audio_kind == "array":
        audio = AudioReader(source="array", shape=audio_shape)
    else:
        # OGM-GE CramedDataset: 22,050 Hz, 3 s tiled from the start (deterministic in training too), n_fft 512, hop 353
        audio = AudioReader(source=audio_kind, recipe="stft_log", sr=22050, seconds=3.0, n_fft=512, hop_length=353,
                            pad_mode=pad_mode, fit="tile", crop="start", shape=audio_shape)
    visual = FrameReader(source="video" if visual_kind == "video" else "jpgdir", frames=frames, size=image_size,
                         augment=augment, fps=video_fps)
    return {"audio": audio, "visual": visual}


# ---------------------------------------------------------------------------------------------------------------
# the builder


def build_cremad(root: str, prepared: str | None = None, layout: str = "auto", audio: str = "auto",
                 visual_dir: str | None = None, audio_dir: str | None = None, label_map: str = "ogmge",
                 split: str = "auto", train_split: str | None = None, test_split: str | None = None,
                 val_split: str | None = None, test_fraction: float = 0.1, val_fraction: float = 0.1,
                 split_seed: int = 0, frames: int = 2, image_size: int = 224, augment: str = "crop_flip",
                 video_fps: float = 1.0, pad_mode: str = "reflect") -> DataSplits:
    """CREMA-D as DataSplits with modalities audio (1, F, T) and visual (frames, 3, image_size, image_size).

    `prepared`: a folder written by ``mmbalance prepare cremad`` (manifest.csv, classes.json, the memory-mapped
    cache): read without any decoding. The media options (layout, audio, pad_mode, video_fps) are then the ones
    given to prepare; ``split=auto`` keeps the prepared split, ``stratified``/``speaker`` regenerate it from the
    manifest with `split_seed`. Otherwise the raw tree under `root` is decoded on access (see the module
    docstring for layouts, recipes, label maps and splits). `frames` follows BalanceBenchmark (2); `video_fps`
    is the rate frames are decoded from flv videos when no frame folders exist (OGM-GE extracts 1 fps).
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    class_names = class_names_for(label_map)
    if prepared not in (None, ""):
        return _build_prepared(Path(str(prepared)).expanduser(), class_names, label_map, split=split,
                               test_fraction=test_fraction, val_fraction=val_fraction, split_seed=split_seed,
                               frames=frames, image_size=image_size, augment=augment,
                               split_files=(train_split, test_split, val_split))
    root_p = Path(str(root)).expanduser()
    found = detect_layout(root_p, layout, audio, visual_dir, audio_dir)
    all_ids = [i for i in set(found.visual.ids()) | set(found.audio.ids()) if parse_clip_name(i)]
    split_of, split_desc = assign_splits(root_p, all_ids, split, train_split, test_split, val_split,
                                         test_fraction, val_fraction, split_seed)
    from_files = split_desc.startswith("split files")
    clips, counts, problems = collect_clips(found, split_of, class_names, from_files)
    if not clips:
        raise DataError(f"CREMA-D: no complete clip (audio and visual) under {str(found.base)!r} "
                        f"({found.visual.describe()}; {found.audio.describe()})")
    shape = probe_array_shape([c.sources["audio"] for c in clips]) if found.audio.kind == "array" else None
    readers = make_readers(found.visual.kind, found.audio.kind, frames=frames, image_size=image_size,
                           augment=augment, video_fps=video_fps, pad_mode=pad_mode, audio_shape=shape)
    notes = {"layout": found.name, "base": str(found.base), "visual": found.visual.describe(),
             "audio": found.audio.describe(), **counts, "split": split_desc, "label_map": label_map,
             "classes": class_names}
    for path, why in problems[:10]:
        log.warning("CREMA-D: %s: %s", path, why)
    log.info("CREMA-D: layout %s under %s: %d clips, %d missing and %d unreadable files", found.name, found.base,
             counts["clips"], counts["missing_files"], counts["unreadable_files"])
    splits = clip_splits(clips, readers, class_names, val_fraction=val_fraction, split_seed=split_seed, notes=notes)
    if split == "speaker" and any(c.split == "val" for c in clips):
        splits.val_source = "speaker-disjoint validation actors (carved from the training actors)"
    return splits


def _build_prepared(prep: Path, class_names: list[str], label_map: str, *, split: str, test_fraction: float,
                    val_fraction: float, split_seed: int, frames: int, image_size: int, augment: str,
                    split_files) -> DataSplits:
    if not prep.is_dir():
        raise DataError(f"dataset.prepared {str(prep)!r} does not exist; run `mmbalance prepare cremad --root RAW "
                        f"--out {prep}` first")
    if split not in SPLIT_MODES:
        raise DataError(f"dataset.split={split!r}; expected one of {SPLIT_MODES}")
    if any(v not in (None, "") for v in split_files):
        raise DataError("with dataset.prepared, the split files are the ones given to `mmbalance prepare`; "
                        "remove dataset.train_split/test_split/val_split or prepare again with them")
    rows = read_manifest(prep)
    if not rows or "emotion" not in rows[0]:
        raise DataError(f"{prep / 'manifest.csv'}: no CREMA-D clips (expected columns id, label, split, emotion, "
                        "...); was it written by `mmbalance prepare cremad`?")
    persisted = read_classes(prep)
    meta_path = prep / CACHE_META
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: {prep} has a manifest but no cache; run `mmbalance prepare cremad` "
                        "again (without --set cache=false)")
    meta = read_json(meta_path)
    summary = read_json(prep / "prepare_summary.json", optional=True)
    if split in ("auto", "files"):
        split_of = {r["id"]: r["split"] for r in rows}
        split_desc = "as prepared: " + summary.get("split", "manifest.csv")
    else:
        split_of, split_desc = generated_split([r["id"] for r in rows], split, test_fraction, val_fraction,
                                               split_seed)
    clips = [Clip(r["id"], class_names.index(r["emotion"]), split_of[r["id"]], {}) for r in rows]
    audio_shape = tuple(meta["modalities"]["audio"]["shape"])
    readers = {"audio": AudioReader(source="array", shape=audio_shape),
               "visual": FrameReader(source="jpgdir", frames=frames, size=image_size, augment=augment)}
    notes = {"layout": "prepared", "prepared": str(prep), "clips": len(clips), "split": split_desc,
             "label_map": label_map, "classes": class_names, "classes_json": persisted,
             "cache_frame_size": meta.get("size"), "audio_recipe": summary.get("audio_recipe")}
    splits = clip_splits(clips, readers, class_names, val_fraction=val_fraction, split_seed=split_seed,
                         cache_dir=prep, notes=notes)
    if split == "speaker" or "speaker" in split_desc:
        if any(c.split == "val" for c in clips):
            splits.val_source = "speaker-disjoint validation actors (carved from the training actors)"
    return splits


# ---------------------------------------------------------------------------------------------------------------
# prepare


def _extract_frames(task: tuple) -> tuple[str, int, str | None]:
    """Worker: decode one flv at `fps` into <dest>/frame_00001.jpg ... (written to a .tmp folder and renamed,
    so a folder that exists is complete). Returns (clip id, frames, error or None); -1 frames = skipped."""
    clip_id, video, dest, fps, force = task
    try:
        return clip_id, media.extract_frames(video, dest, fps, force=force), None
    except DataError as exc:
        return clip_id, 0, str(exc)


def prepare(ctx, layout: str = "auto", audio: str = "auto", visual_dir: str | None = None,
            audio_dir: str | None = None, label_map: str = "ogmge", split: str = "auto",
            train_split: str | None = None, test_split: str | None = None, val_split: str | None = None,
            test_fraction: float = 0.1, val_fraction: float = 0.1, split_seed: int = 0, extract_fps: float = 1.0,
            image_size: int = 224, max_frames: int = 4, pad_mode: str = "reflect", cache: bool = True) -> dict:
    """`mmbalance prepare cremad --root RAW --out PREP [--set key=value ...]`.

    1. detect the layout and list the clips (missing or empty files -> prepare_report.txt);
    2. decide the split (files, stratified or speaker; see the module docstring) -> manifest.csv
       (id, label, split, emotion, actor, audio, visual) and classes.json (`label_map`);
    3. when the only video is ``VideoFlash/*.flv``, decode frames at `extract_fps` (1, like OGM-GE) with PyAV
       into ``<out>/frames/<clip>/frame_%05d.jpg`` (existing folders are kept; a corrupt flv is reported
       and its clip skipped);
    4. `cache` (default): the memory-mapped cache the loader reads (`write_clip_cache`): up to `max_frames`
       frames per clip at `image_size`² uint8 (CREMA-D clips are 1-5 s: 4 frames at 1 fps keep them all) and
       the OGM-GE (1, 257, 188) spectrogram (or the .pt array) as float16.
    Disk: 7,442 × (4 × 150 kB + 97 kB) ≈ 5.2 GB of cache at 224 px, plus ≈ 0.5 GB of extracted jpg frames.
    """
    class_names = class_names_for(label_map)
    found = detect_layout(ctx.root, layout, audio, visual_dir, audio_dir)
    all_ids = [i for i in set(found.visual.ids()) | set(found.audio.ids()) if parse_clip_name(i)]
    split_of, split_desc = assign_splits(ctx.root, all_ids, split, train_split, test_split, val_split,
                                         test_fraction, val_fraction, split_seed)
    clips, counts, problems = collect_clips(found, split_of, class_names, split_desc.startswith("split files"))
    for path, why in problems:
        ctx.problem(path, why)
    extracted = {"frames_extracted": 0, "frames_existing": 0, "video_failed": 0}
    if found.visual.kind == "video":
        frames_dir = ctx.out / "frames"
        tasks = [(c.id, c.sources["visual"], str(frames_dir / c.id), float(extract_fps), ctx.force) for c in clips]
        failed = set()
        for clip_id, n, error in ctx.map(_extract_frames, tasks, desc="extracting frames"):
            if error is not None:
                ctx.problem(str(found.visual.path(clip_id)), error)
                failed.add(clip_id)
                extracted["video_failed"] += 1
            else:
                extracted["frames_existing" if n < 0 else "frames_extracted"] += 1
        clips = [c for c in clips if c.id not in failed]
        for c in clips:
            c.sources["visual"] = str(frames_dir / c.id)
    if not clips:
        raise DataError(f"CREMA-D: no usable clip under {str(found.base)!r}; see {ctx.out / 'prepare_report.txt'}")
    rows = [{"id": c.id, "label": c.label, "split": c.split, "emotion": class_names[c.label],
             "actor": parse_clip_name(c.id)[0], "audio": c.sources["audio"], "visual": c.sources["visual"]}
            for c in clips]
    write_manifest(ctx.out, rows, ["id", "label", "split", "emotion", "actor", "audio", "visual"])
    write_classes(ctx.out, class_names)
    summary = {"layout": found.name, "base": str(found.base), "visual": found.visual.describe(),
               "audio": found.audio.describe(), **counts, "label_map": label_map, "split": split_desc,
               **{f"{s}_clips": sum(c.split == s for c in clips) for s in ("train", "val", "test")}, **extracted}
    if cache:
        shape = probe_array_shape([c.sources["audio"] for c in clips]) if found.audio.kind == "array" else None
        readers = make_readers("jpgdir", found.audio.kind, frames=2, image_size=image_size, augment="none",
                               video_fps=extract_fps, pad_mode=pad_mode, audio_shape=shape)
        summary.update(write_clip_cache(ctx, clips, readers, size=int(image_size), max_frames=int(max_frames)))
        summary["audio_recipe"] = ("pre-computed array " + str(shape)) if shape else \
            f"OGM-GE stft_log 22050 Hz 3 s n_fft 512 hop 353 pad_mode {pad_mode}"
    return summary
