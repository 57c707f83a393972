"""CREMA-D (Cao et al. 2014): 7,442 clips, 91 actors, 6 emotions; audio + visual.

What is CREMA-D's own: its layout table (the release, OGM-GE's and BalanceBenchmark's trees), clip names that
carry the emotion and the actor, its two label maps, its split rules (split files, stratified, speaker-disjoint)
and OGM-GE's audio recipe. Reference (layouts, recipes, label maps, splits, prepare): docs/datasets.md#crema-d-cremad
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from mmbalance.data import media
from mmbalance.data.batch import DataSplits, stratified_split
from mmbalance.data.clips import AudioReader, Clip, av_readers, clip_splits
from mmbalance.data.layout import (Candidate, DirIndex, candidate_list, dataset_root, find_media, first_present,
                                   option_path, prepare_clips, prepared_splits, walk_dirs)
from mmbalance.data.prepare import PreparedFolder, resolve_prepared
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
# OGM-GE / BalanceBenchmark's order, and MMPareto / Diagnosing's
LABEL_MAPS = {"ogmge": ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"], "sorted": sorted(EMOTIONS)}
# <actor>_<sentence>_<EMO>_<level>, e.g. 1001_DFA_ANG_XX (levels LO, MD, HI, XX)
CLIP_NAME = re.compile(r"^(?P<actor>\d+)_(?P<sentence>[A-Za-z]+)_(?P<emotion>[A-Za-z]{3})_(?P<level>[A-Za-z]+)$")
SPLIT_MODES = ("auto", "files", "stratified", "speaker")
# the layout table, in preference order: frame folders over decoding the flv; a pre-computed spectrogram (the
# BalanceBenchmark layout) over the wav, over the flv's own audio track
VISUAL = (("jpgdir", ("visual", "Image-01-FPS")), ("video", ("VideoFlash",)))
AUDIO = (("array", ("audio",)), ("wav", ("AudioWAV",)), ("video", ("VideoFlash",)))
AUDIO_KINDS = {"auto": ("array", "wav", "video"), "wav": ("wav",), "pt": ("array",), "video": ("video",)}
LAYOUTS = {"raw": ("VideoFlash", "AudioWAV"), "ogmge": ("Image-01-FPS", "AudioWAV"),  # name -> (visual, audio)
           "balancebenchmark": ("visual", "audio")}
KIND_NAMES = {"jpgdir": "frame folders", "video": "videos", "wav": "wav files", "array": "spectrogram arrays"}
# folders that hold media, never split files: not searched for train.csv/test.csv
MEDIA_DIRS = {"AudioWAV", "AudioMP3", "VideoFlash", "Image-01-FPS", "visual", "audio", "frames"}


def parse_clip_name(name: str) -> tuple[str, str] | None:
    """(actor, EMO) from a CREMA-D clip name, or None when the name does not follow the convention."""
    m = CLIP_NAME.match(name)
    return (m["actor"], m["emotion"].upper()) if m and m["emotion"].upper() in EMOTIONS else None


def class_names_for(label_map: str) -> list[str]:
    if label_map not in LABEL_MAPS:
        raise DataError(f"dataset.label_map={label_map!r}; expected one of {sorted(LABEL_MAPS)}")
    return list(LABEL_MAPS[label_map])


# ---------------------------------------------------------------------------------------------------------------
# layout detection


@dataclass
class Layout:
    name: str  # raw | ogmge | balancebenchmark | mixed
    base: Path
    visual: Candidate
    audio: Candidate
    index: DirIndex

    def names(self) -> set[str]:
        """Every clip name either modality's folder has a file (or frame folder) for."""
        return {i for c in (self.visual, self.audio) for i in self.index.stems(c.folder_for(self.base, ""), c.suffix,
                                                                               c.is_dir)}

    def describe(self, modality: str) -> str:
        c = getattr(self, modality)
        return f"{KIND_NAMES[c.kind]}{f' ({c.suffix})' if c.suffix else ''} in {c.folder_for(self.base, '')}"


def detect_layout(root: str | Path, layout: str = "auto", audio: str = "auto", visual_dir: str | None = None,
                  audio_dir: str | None = None) -> Layout:
    """Where the CREMA-D media are: `root` or the first folder below it with both modalities (the layout table's
    order), and which known layout matched; `audio` forces one kind, a pinned folder's content decides its kind."""
    # absolute: a pinned visual_dir/audio_dir is resolved against the root here, and a layout Candidate joins a
    # relative folder to the root again (`dataset.root=raw dataset.visual_dir=frames` looked in raw/raw/frames)
    root = dataset_root(root, "CREMA-D").absolute()
    if layout not in ("auto", *LAYOUTS):
        raise DataError(f"dataset.layout={layout!r}; expected auto or one of {sorted(LAYOUTS)}")
    if audio not in AUDIO_KINDS:
        raise DataError(f"dataset.audio={audio!r}; expected auto, wav, pt or video")
    tables = {"visual": VISUAL, "audio": [(k, f) for k, f in AUDIO if k in AUDIO_KINDS[audio]]}
    pinned = {"visual": option_path(root, visual_dir), "audio": option_path(root, audio_dir)}
    if layout != "auto":  # the named layout's folders (its audio kind unless `audio` forces one)
        folders = LAYOUTS[layout]
        if pinned["visual"] is None:
            tables["visual"] = [("video" if layout == "raw" else "jpgdir", (folders[0],))]
        if pinned["audio"] is None and audio == "auto":
            tables["audio"] = [("array" if layout == "balancebenchmark" else "wav", (folders[1],))]
    tables = {m: candidate_list(table, pinned[m]) for m, table in tables.items()}
    index = DirIndex()
    below = [folder for folder, _ in walk_dirs(root, 1, descend=lambda n: n not in MEDIA_DIRS)[1:]]
    for base in [root, *sorted(below, key=lambda p: media.natural_key(p.name))]:
        found = {m: first_present(base, cands, index) for m, cands in tables.items()}
        for m, cands in tables.items():
            if found[m] is None and pinned[m] is not None:
                kinds = " / ".join(k for k, _ in cands)
                raise DataError(f"dataset.{m}_dir: {str(pinned[m])!r} holds no {kinds} media for CREMA-D")
        vis, aud = found["visual"], found["audio"]
        if vis is not None and aud is not None:
            pair = (Path(vis.folder).name, Path(aud.folder).name)
            return Layout(next((n for n, f in LAYOUTS.items() if f == pair), "mixed"), base, vis, aud, index)
    expected = (f"{LAYOUTS[layout][0]}/ and {LAYOUTS[layout][1]}/ (layout {layout!r})" if layout != "auto" else
                "AudioWAV/ + VideoFlash/ (raw release), Image-01-FPS/ + AudioWAV/ (OGM-GE) or visual/ + audio/ "
                "(MMPareto / BalanceBenchmark)")
    raise DataError(f"CREMA-D: no known layout under {str(root)!r}: expected {expected}, in it or one folder below"
                    + (f"; audio={audio!r} was requested" if audio != "auto" else ""))


# ---------------------------------------------------------------------------------------------------------------
# splits


def find_split_files(root: Path, train_split: str | None, test_split: str | None,
                     val_split: str | None) -> dict[str, Path] | None:
    """The given split files, else ``train.csv`` + ``test.csv`` found together under root (3 levels deep, media
    folders skipped); None when there are none."""
    given = {s: option_path(root, v, f"{s}_split", "split file")
             for s, v in (("train", train_split), ("test", test_split), ("val", val_split)) if v not in (None, "")}
    if given:
        if "train" not in given or "test" not in given:
            raise DataError("dataset.train_split and dataset.test_split must be given together "
                            f"(got {', '.join(f'{k}={str(v)!r}' for k, v in given.items())})")
        return given
    for folder, entries in walk_dirs(root, 3, descend=lambda n: n not in MEDIA_DIRS):
        names = {e.name for e in entries if e.is_file()}
        if {"train.csv", "test.csv"} <= names:
            return {"train": folder / "train.csv", "test": folder / "test.csv"}
        if "train.csv" in names or "test.csv" in names:  # half a pair: never silently fall back to a generated split
            found, lost = ("train.csv", "test.csv") if "train.csv" in names else ("test.csv", "train.csv")
            raise DataError(f"{str(folder / found)!r} has no {lost} beside it ({str(folder / lost)!r} is missing): "
                            "split files come in pairs; restore it, or use dataset.split=stratified")
    return None


def read_split_files(files: dict[str, Path]) -> dict[str, str]:
    """{clip id: split} from OGM-GE style lists (``<clip>,<EMO>``)."""
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


def split_files_for(root: Path, split: str, train_split, test_split, val_split) -> dict[str, Path] | None:
    """The split files `split` uses, or None when it generates the split (`generated_split`)."""
    if split not in SPLIT_MODES:
        raise DataError(f"dataset.split={split!r}; expected one of {SPLIT_MODES}")
    if split in ("stratified", "speaker"):
        if any(v not in (None, "") for v in (train_split, test_split, val_split)):
            raise DataError(f"dataset.split={split!r} generates the split; remove train_split/test_split/val_split "
                            "or use split=files")
        return None
    files = find_split_files(root, train_split, test_split, val_split)
    if files is None and split == "files":
        raise DataError(f"split=files: no split files given and no train.csv + test.csv found under "
                        f"{str(root)!r}; set dataset.train_split / dataset.test_split or use split=stratified")
    return files


def make_readers(kinds: dict[str, str], clips: list[Clip], *, frames: int = 2, image_size: int = 224,
                 augment: str = "none", video_fps: float = 1.0, pad_mode: str = "reflect") -> dict:
    """OGM-GE CramedDataset's audio recipe -> (1, 257, 188), or the stored arrays as they are."""
    return av_readers(kinds, clips, lambda kind: AudioReader(kind, "stft_log", sr=22050, seconds=3.0, n_fft=512,
                                                             hop_length=353, pad_mode=pad_mode),
                      frames=frames, image_size=image_size, augment=augment, video_fps=video_fps)


# ---------------------------------------------------------------------------------------------------------------
# the builder and prepare


def discover(root, layout: str, audio: str, visual_dir, audio_dir, class_names: list[str], split: str,
             split_files: tuple, test_fraction: float, val_fraction: float, split_seed: int
             ) -> tuple[Layout, list[Clip], dict, list[tuple[str, str]]]:
    """(the layout, its complete clips with their splits, notes with the counts, every missing or unreadable
    file). Without split files the clip set is every name either modality has, so that a clip with its wav but no
    video is counted missing, not silently dropped."""
    lay = detect_layout(root, layout, audio, visual_dir, audio_dir)
    on_disk = lay.names()
    files = split_files_for(Path(str(root)).expanduser(), split, *split_files)
    if files is not None:
        split_of = read_split_files(files)
        split_desc = "split files " + ", ".join(f"{k}={v}" for k, v in files.items())
    else:  # drawn below, once the complete clips are known
        split_of, split_desc = dict.fromkeys(on_disk, "train"), "generated"
    ignored = sorted(n for n in split_of if parse_clip_name(n) is None)
    entries = [Clip(i, class_names.index(parse_clip_name(i)[1]), split_of[i]) for i in
               sorted(set(split_of) - set(ignored), key=media.natural_key)]
    cands = {"audio": lay.audio, "visual": lay.visual}
    found = find_media(lay.base, entries, None, {m: [(c.kind, [c])] for m, c in cands.items()}, layout=lay.name,
                       split_source=split_desc, dataset="CREMA-D", classes=class_names)
    missing = [(path, f"missing {m} file") for _, lack in found.missing for m, path in lack]
    empty = {c.id: [m for m, p in c.sources.items() if (not os.listdir(p) if cands[m].is_dir else
                                                        os.path.getsize(p) == 0)] for c in found.clips}
    unreadable = [(c.sources[m], f"unreadable {m}: empty " + ("folder" if cands[m].is_dir else "file"))
                  for c in found.clips for m in empty[c.id]]
    clips = [c for c in found.clips if not empty[c.id]]
    if files is None and clips:
        # A generated split is drawn over the complete clips only (both modalities there and non-empty), never
        # over every name on disk: these are exactly the clips prepare writes into manifest.csv, so the raw tree
        # and its prepared folder split the same clips the same way (a clip missing a file cannot shift the draw)
        drawn, split_desc = generated_split([c.id for c in clips], split if split == "speaker" else "stratified",
                                            test_fraction, val_fraction, split_seed)
        clips = [Clip(c.id, c.label, drawn[c.id], c.sources) for c in clips]
    notes = {"layout": lay.name, "base": str(lay.base), "visual": lay.describe("visual"),
             "audio": lay.describe("audio"), "clips": len(clips), "missing_files": len(missing),
             "unreadable_files": len(unreadable), "ignored_names": len(ignored),
             "not_in_split_files": len(on_disk - set(split_of) - set(ignored)) if files is not None else 0,
             "split": split_desc}
    problems = missing + unreadable + [(n, "not a CREMA-D clip name (<actor>_<sentence>_<EMO>_<level>); ignored")
                                       for n in ignored[:20]]
    return lay, clips, notes, problems


def build_cremad(root: str, prepared: str | None = None,
                 layout: Literal["auto", "raw", "ogmge", "balancebenchmark"] = "auto",
                 audio: Literal["auto", "wav", "pt", "video"] = "auto", visual_dir: str | None = None,
                 audio_dir: str | None = None, label_map: Literal["ogmge", "sorted"] = "ogmge",
                 split: Literal[SPLIT_MODES] = "auto", train_split: str | None = None, test_split: str | None = None,
                 val_split: str | None = None, test_fraction: Fraction = 0.1, val_fraction: Fraction = 0.1,
                 split_seed: NonNegativeInt = 0, frames: PositiveInt = 2, image_size: PositiveInt = 224,
                 augment: media.Augment = "crop_flip", video_fps: PositiveFloat = 1.0,
                 pad_mode: media.PadMode = "reflect") -> DataSplits:
    """CREMA-D as DataSplits with modalities audio (1, F, T) and visual (frames, 3, S, S), from the raw tree
    under `root` or the `mmbalance prepare cremad` folder `prepared` (whose media options are prepare's)."""
    prepared = resolve_prepared(root, prepared, "cremad")  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    class_names = class_names_for(label_map)
    split_files = (train_split, test_split, val_split)
    if prepared is not None:
        folder = PreparedFolder(prepared, "cremad").require()
        if split not in SPLIT_MODES:
            raise DataError(f"dataset.split={split!r}; expected one of {SPLIT_MODES}")
        if any(v not in (None, "") for v in split_files):
            raise DataError("with dataset.prepared, the split files are the ones given to `mmbalance prepare`; "
                            "remove dataset.train_split/test_split/val_split or prepare again with them")
        rows = folder.rows(["id", "label", "split", "emotion"])
        split_of = {r["id"]: r["split"] for r in rows}
        if split in ("auto", "files"):
            prepared_split = folder.summary.get("split", "manifest.csv")
            split_desc = "as prepared: " + prepared_split
            if split == "auto" and prepared_split.startswith(("stratified", "speaker")):
                mode = prepared_split.split(" ", 1)[0]
                _, asked = generated_split([r["id"] for r in rows], mode, test_fraction, val_fraction, split_seed)
                if asked != prepared_split:  # the raw tree would draw the config's; say that this folder does not
                    log.warning("%s: split=auto keeps the split prepare drew (%s), not the one this config's "
                                "test_fraction/val_fraction/split_seed draw (%s); set dataset.split=%s to draw it",
                                folder.path, prepared_split, asked, mode)
        else:
            drawn, split_desc = generated_split([r["id"] for r in rows], split, test_fraction, val_fraction, split_seed)
            # when the descriptions agree, prepare drew this very split (same rule, fractions and seed) over the
            # complete clips, before a video that failed to decode left the manifest: its draw is the raw tree's
            if split_desc != folder.summary.get("split"):
                split_of = drawn
        if folder.cache_meta(required=False) is None:  # cache=false: the loader reads the cache only
            raise DataError(f"dataset.prepared {str(folder.path)!r} holds no cache (it was prepared with --set "
                            f"cache=false); run {folder.command} again without cache=false, or set "
                            "dataset.prepared=null to decode the raw tree")
        clips = [Clip(r["id"], class_names.index(r["emotion"]), split_of[r["id"]], {}) for r in rows]
        kinds = {m: rows[0].get(f"{m}_kind") for m in ("audio", "visual")}
        notes = {"split": split_desc, "label_map": label_map, "classes": class_names,
                 "classes_json": folder.classes(), "audio_recipe": folder.summary.get("audio_recipe")}
        # the readers this config decodes the prepared media with: their recipe (pad_mode, the rate videos were
        # extracted at) must be the one the folder was prepared with, else it is refused (refuse_other_recipe)
        recipe = (lambda: make_readers(kinds, clips, frames=frames, image_size=image_size, augment=augment,
                                       video_fps=video_fps, pad_mode=pad_mode)) if all(kinds.values()) else None
        splits = prepared_splits(folder, clips, class_names, frames=frames, image_size=image_size, augment=augment,
                                 val_fraction=val_fraction, split_seed=split_seed, notes=notes, recipe=recipe)
    else:
        lay, clips, notes, problems = discover(root, layout, audio, visual_dir, audio_dir, class_names, split,
                                               split_files, test_fraction, val_fraction, split_seed)
        if not clips:
            raise DataError(f"CREMA-D: no complete clip (audio and visual) under {str(lay.base)!r} "
                            f"({notes['visual']}; {notes['audio']})")
        readers = make_readers({"audio": lay.audio.kind, "visual": lay.visual.kind}, clips, frames=frames,
                               image_size=image_size, augment=augment, video_fps=video_fps, pad_mode=pad_mode)
        for path, why in problems[:10]:
            log.warning("CREMA-D: %s: %s", path, why)
        log.info("CREMA-D: layout %s under %s: %d clips, %d missing and %d unreadable files", lay.name, lay.base,
                 len(clips), notes["missing_files"], notes["unreadable_files"])
        splits = clip_splits(clips, readers, class_names, val_fraction=val_fraction, split_seed=split_seed,
                             notes={**notes, "label_map": label_map, "classes": class_names})
    if "speaker" in splits.notes["split"] and any(c.split == "val" for c in clips):
        splits.val_source = "speaker-disjoint validation actors (carved from the training actors)"
    return splits


def prepare(ctx, layout: Literal[("auto", *LAYOUTS)] = "auto", audio: Literal[tuple(AUDIO_KINDS)] = "auto",
            visual_dir: str | None = None, audio_dir: str | None = None,
            label_map: Literal[tuple(LABEL_MAPS)] = "ogmge", split: Literal[SPLIT_MODES] = "auto",
            train_split: str | None = None, test_split: str | None = None, val_split: str | None = None,
            test_fraction: Fraction = 0.1, val_fraction: Fraction = 0.1, split_seed: NonNegativeInt = 0,
            extract_fps: PositiveFloat = 1.0, image_size: PositiveInt = 224, max_frames: PositiveInt = 4,
            pad_mode: media.PadMode = "reflect", cache: bool = True) -> dict:
    """`mmbalance prepare cremad` (layout.prepare_clips): manifest.csv adds emotion and actor; `max_frames` 4 at
    1 fps keeps every frame of CREMA-D's 1-5 s clips."""
    class_names = class_names_for(label_map)
    lay, clips, notes, problems = discover(ctx.root, layout, audio, visual_dir, audio_dir, class_names, split,
                                           (train_split, test_split, val_split), test_fraction, val_fraction,
                                           split_seed)
    summary = prepare_clips(ctx, "cremad", clips, {"audio": lay.audio.kind, "visual": lay.visual.kind}, class_names,
                            problems=problems, summary={**notes, "label_map": label_map}, size=image_size,
                            cache_readers=(lambda kinds, clips: make_readers(kinds, clips, image_size=image_size,
                                                                             pad_mode=pad_mode)) if cache else None,
                            max_frames=max_frames, params=(22050, float(extract_fps), 0),
                            columns=lambda c: {"emotion": class_names[c.label], "actor": parse_clip_name(c.id)[0]})
    summary.update({f"{s}_clips": n for s, n in summary["manifest_clips"].items()},
                   frames_existing=summary.get("extract_skipped_existing", 0),
                   video_failed=summary.get("extract_failed", 0))
    if cache:
        shape = PreparedFolder(ctx.out).cache_meta()["modalities"]["audio"]["shape"]
        summary["audio_recipe"] = (f"pre-computed array {tuple(shape)}" if lay.audio.kind == "array" else
                                   f"OGM-GE stft_log 22050 Hz 3 s n_fft 512 hop 353 pad_mode {pad_mode}")
    return summary
