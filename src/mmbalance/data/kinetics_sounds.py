"""Kinetics-Sounds (KS): the 31 sound-making action classes of Kinetics-400; audio + visual.

What is Kinetics-Sounds' own: its class list, its layout table (OGM-GE, BalanceBenchmark, BML, the raw cvdf
download), its split sources (split files, BML's json, Kinetics' csv) with their label parsing, and OGM-GE's
Kaldi fbank recipe. Reference (layouts, split files, recipes, prepare): docs/datasets.md#kinetics-sounds-kinetics_sounds
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Annotated

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range
from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import AudioReader, Clip, av_readers
from mmbalance.data.layout import (KIND_SUFFIXES, VIDEO_FOLDERS, Discovery, build_clips, candidate_list, dataset_root,
                                   find_media, option_path, prepare_discovered, shown, wav_and_frames)
from mmbalance.data.prepare import record_listing
from mmbalance.errors import DataError

# BML_TPAMI2024 code/dataset/KS.json, alphabetical: integer labels are positions in this list
KS_CLASSES = [
    "blowing_nose", "blowing_out_candles", "bowling", "chopping_wood", "dribbling_basketball", "laughing",
    "mowing_lawn", "playing_accordion", "playing_bagpipes", "playing_bass_guitar", "playing_clarinet",
    "playing_drums", "playing_guitar", "playing_harmonica", "playing_keyboard", "playing_organ", "playing_piano",
    "playing_saxophone", "playing_trombone", "playing_trumpet", "playing_violin", "playing_xylophone",
    "ripping_paper", "shoveling_snow", "shuffling_cards", "singing", "stomping_grapes", "tap_dancing",
    "tapping_guitar", "tapping_pen", "tickling",
]
KS_INDEX = {name: i for i, name in enumerate(KS_CLASSES)}
# Kaldi's fbank frames audio in 25 ms windows shifted by 10 ms: the shift must hold a sample (torchaudio asserts)
KaldiSampleRate = Annotated[int, Range(ge=100)]

# a split file's first field may name the clip's media file: these extensions are stripped from the id
MEDIA_EXTENSIONS = {suffix for suffixes in KIND_SUFFIXES.values() for suffix in suffixes if suffix}

# split lists at the root, tried in this order: (layout, train, test, optional val); a Kinetics csv named train.csv
# is the cvdf layout instead
SPLIT_FILES = (("ogmge", "my_train.txt", "my_test.txt", "my_val.txt"),
               ("balancebenchmark", "ks_train_overlap.txt", "ks_test_overlap.txt", "ks_val_overlap.txt"),
               ("balancebenchmark", "train.txt", "test.txt", "val.txt"),
               ("balancebenchmark", "train.csv", "test.csv", "val.csv"))
# the layout table: per modality, (kind, folders) in priority order; on a tie in found clips the earlier kind
# wins. `{split}` = train|val|test. The modalities' order is the fusion head's (BalanceBenchmark's audio, visual).
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


# ---------------------------------------------------------------------------------------------------------------
# split sources and labels


def clip_id(field_value: str) -> str:
    """The clip id of a split file's first field: its basename, without a media extension."""
    name = field_value.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in MEDIA_EXTENSIONS else name


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip().strip("'\"").lower())


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


def _entry(path: Path, listed_id: str, label: str, split: str) -> Clip:
    """A clip of a split file or json: its id and label parsed, errors naming the file and the clip."""
    return Clip(clip_id(listed_id), ks_label(label, f"{path}, clip {listed_id!r}"), split, {})


def _entries_from_lists(files: dict[str, Path]) -> list[Clip]:
    return [_entry(path, i, label, split) for split, path in files.items() for i, label in media.read_split_file(path)]


def _is_kinetics_csv(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8-sig") as f:
            return "youtube_id" in f.readline()
    except OSError:
        return False


def read_kinetics_csv(path: Path, split: str, skipped: dict[str, int]) -> list[Clip]:
    """The clips of the 31 classes in a Kinetics annotation csv, named as cvdf names their files
    (`<ytid>_<start:06d>_<end:06d>`); rows of other classes and unlabelled ones are counted in `skipped`."""
    record_listing(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"youtube_id", "time_start", "time_end"} <= columns:
            raise DataError(f"{path}: expected a Kinetics annotation csv with columns label, youtube_id, "
                            f"time_start, time_end (found {sorted(columns)})")
        clips = []
        for row in reader:
            label = (row.get("label") or "").strip()
            if not label:
                skipped["kinetics_rows_unlabelled"] += 1
                continue
            if _normalise(label) not in KS_INDEX:
                skipped["kinetics_rows_other_classes"] += 1
                continue
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                cid = f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}"
            except (TypeError, ValueError):
                raise DataError(f"{path}: row {row} has no integer time_start/time_end") from None
            clips.append(Clip(cid, KS_INDEX[_normalise(label)], split, {}))
    return clips


def _cvdf_entries(folder: Path) -> tuple[str, str, list[Clip], dict]:
    entries, files = [], []
    notes = {"kinetics_rows_other_classes": 0, "kinetics_rows_unlabelled": 0}
    for name, split in (("train.csv", "train"), ("val.csv", "val"), ("validate.csv", "val"), ("test.csv", "test")):
        if (folder / name).is_file():
            entries += read_kinetics_csv(folder / name, split, notes)
            files.append(name)
    if not any(c.split == "test" for c in entries) and any(c.split == "val" for c in entries):
        # no labelled Kinetics test csv: Kinetics' validation clips are the test set (as in the KS literature)
        entries = [Clip(c.id, c.label, "test" if c.split == "val" else c.split, {}) for c in entries]
        notes["kinetics_val_used_as_test"] = True
    return "cvdf", f"{shown(folder, folder.parent)}/{{{','.join(files)}}}", entries, notes


def ks_split_entries(root: Path, train_list: str | None = None, val_list: str | None = None,
                     test_list: str | None = None, annotations: str | None = None) -> tuple[str, str, list[Clip], dict]:
    """(layout, split source, listed clips without sources, notes) from the first split source found: the
    options, then BML's json, the split files at the root, a Kinetics csv."""
    ann = option_path(root, annotations)
    if ann is None and not (train_list or test_list) and (root / "KS_train_val.json").is_file():
        ann = root / "KS_train_val.json"  # BML's json, unless split lists were given
    if ann is not None:
        return "bml", ann.name, [_entry(ann, i, label, split) for i, label, split in media.read_annotation(ann)[0]], {}
    if train_list or test_list:
        given = {s: option_path(root, v) for s, v in (("train", train_list), ("val", val_list), ("test", test_list))}
        for s in ("train", "test"):
            if given[s] is None:
                raise DataError(f"Kinetics-Sounds: dataset.{s}_list is not set (train_list and test_list go together)")
        files = {s: p for s, p in given.items() if p is not None}
        layout = "ogmge" if files["train"].name.startswith("my_") else "balancebenchmark"
        return layout, ", ".join(str(p) for p in files.values()), _entries_from_lists(files), {}
    for layout, train, test, val in SPLIT_FILES:
        if not (root / train).is_file() or _is_kinetics_csv(root / train):
            continue
        if not (root / test).is_file():
            raise DataError(f"Kinetics-Sounds: {str(root / test)!r} does not exist ({train} was found: the "
                            f"{layout} layout needs both split files)")
        files = {"train": root / train, "test": root / test}
        if (root / val).is_file():
            files["val"] = root / val
        return layout, ", ".join(p.name for p in files.values()), _entries_from_lists(files), {}
    for folder in (root / "annotations", root):
        if (folder / "train.csv").is_file() and _is_kinetics_csv(folder / "train.csv"):
            return _cvdf_entries(folder)
    raise DataError(f"Kinetics-Sounds: no split file under {str(root)!r}; expected one of: KS_train_val.json (BML), "
                    "my_train.txt + my_test.txt (OGM-GE), ks_train_overlap.txt / train.txt / train.csv + the test "
                    "file (BalanceBenchmark), annotations/train.csv (Kinetics, cvdf); or give the split files with the "
                    "options train_list + test_list (or annotations)")


# ---------------------------------------------------------------------------------------------------------------
# discovery, recipes, builder, prepare


def discover_ks(root: str | Path, train_list: str | None = None, val_list: str | None = None,
                test_list: str | None = None, annotations: str | None = None, visual_dir: str | None = None,
                audio_dir: str | None = None) -> Discovery:
    """Find the Kinetics-Sounds clips under `root`: split source, media folders and formats, missing clips."""
    root = dataset_root(root, "Kinetics-Sounds")
    layout, source, entries, extra = ks_split_entries(root, train_list, val_list, test_list, annotations)
    if not entries:
        raise DataError(f"Kinetics-Sounds: {source} under {str(root)!r} lists no clip of the 31 classes")
    tables = {"audio": candidate_list(KS_AUDIO, audio_dir), "visual": candidate_list(KS_VISUAL, visual_dir)}
    found = find_media(root, entries, None, tables, layout=layout, split_source=source, dataset="Kinetics-Sounds",
                       classes=KS_CLASSES, drop_duplicates=True)
    found.extra_notes.update(extra)
    return found


def ks_readers(kinds: dict[str, str], clips: list[Clip], *, frames: int = 3, image_size: int = 224,
               augment: str = "none", video_fps: float = 1.0, sample_rate: int = 16000, num_mel_bins: int = 128,
               audio_target_frames: int = 1024) -> dict:
    """OGM-GE's Kaldi fbank from wav or video, or the stored arrays as they are; frames segment-sampled."""
    return av_readers(kinds, clips, lambda kind: AudioReader(kind, "kaldi_fbank", sr=sample_rate,
                                                             num_mel_bins=num_mel_bins,
                                                             target_frames=audio_target_frames),
                      frames=frames, image_size=image_size, augment=augment, video_fps=video_fps)


def build_kinetics_sounds(root: str | None, prepared: str | None = None, train_list: str | None = None,
                          val_list: str | None = None, test_list: str | None = None, annotations: str | None = None,
                          visual_dir: str | None = None, audio_dir: str | None = None, frames: PositiveInt = 3,
                          image_size: PositiveInt = 224, augment: media.Augment = "crop_flip",
                          video_fps: PositiveFloat = 1.0, sample_rate: KaldiSampleRate = 16000,
                          num_mel_bins: Annotated[int, Range(ge=3)] = 128,  # Kaldi's mel filterbank needs 3 or more
                          audio_target_frames: PositiveInt = 1024, val_fraction: Fraction = 0.1,
                          split_seed: NonNegativeInt = 0) -> DataSplits:
    """Kinetics-Sounds as DataSplits with modalities audio (1, F, T) and visual (frames, 3, S, S), from the
    ``mmbalance prepare kinetics_sounds`` folder `prepared` or the raw tree under `root`."""
    recipe = dict(frames=frames, image_size=image_size, augment=augment, video_fps=video_fps,
                  sample_rate=sample_rate, num_mel_bins=num_mel_bins, audio_target_frames=audio_target_frames)
    return build_clips("kinetics_sounds", root, prepared,
                       lambda: discover_ks(root, train_list, val_list, test_list, annotations, visual_dir, audio_dir),
                       lambda kinds, clips: ks_readers(kinds, clips, **recipe), val_fraction=val_fraction,
                       split_seed=split_seed, frames=frames, image_size=image_size, augment=augment)[0]


def prepare(ctx, train_list: str | None = None, val_list: str | None = None, test_list: str | None = None,
            annotations: str | None = None, visual_dir: str | None = None, audio_dir: str | None = None,
            fps: PositiveFloat = 1.0, short_side: NonNegativeInt = 0, sample_rate: KaldiSampleRate = 16000,
            num_mel_bins: Annotated[int, Range(ge=3)] = 128, audio_target_frames: PositiveInt = 1024,
            cache: bool = True, size: PositiveInt = 224, max_frames: PositiveInt = 10,
            shard: str | None = None) -> dict:
    """`mmbalance prepare kinetics_sounds` (layout.prepare_discovered): raw videos decoded once into wav + frames,
    then, with `cache`, the frames and the fbank spectrograms (or the stored arrays)."""
    found = discover_ks(ctx.root, train_list, val_list, test_list, annotations, visual_dir, audio_dir)
    fbank = dict(sample_rate=sample_rate, num_mel_bins=num_mel_bins, audio_target_frames=audio_target_frames)
    audio = {"recipe": "kaldi_fbank", "sample_rate": sample_rate, "num_mel_bins": num_mel_bins,
             "target_frames": audio_target_frames}
    return prepare_discovered(ctx, "kinetics_sounds", found, shard=shard, size=size, max_frames=max_frames,
                              cache_readers=(lambda kinds, clips: ks_readers(kinds, clips, image_size=int(size),
                                                                            video_fps=fps, **fbank)) if cache else None,
                              **wav_and_frames(found.kinds, audio, sample_rate, fps, short_side))
