"""BalancedAV (Xia et al., CVPR-W 2023): 30 audio-visual event classes, a uniform per-sample modality discrepancy.

What is BalancedAV's own: its annotation json (classes, own train / val / test subsets), its two layouts
(AV_preprocess_tool's hdf5 + pickled |STFT|, or the raw videos), its |STFT| magnitude recipe (optionally logged)
and a prepare that writes an AV_preprocess_tool tree. Reference: docs/datasets.md#balancedav-balanced_av
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import AudioReader, Clip, FrameReader, ModalityMap
from mmbalance.data.layout import (Discovery, build_clips, candidate_list, dataset_root, find_media, option_path,
                                   prepare_discovered, walk_dirs)
from mmbalance.data.prepare import CACHE_META, CLASSES, SUMMARY, PrepareContext, PreparedFolder
from mmbalance.errors import DataError

# the layout table: AV_preprocess_tool's hdf5 frames and pickled |STFT| (or prepare's .npy), else the raw videos;
# the folders are the root and every folder two levels below it (or the pinned ones)
KINDS = {"audio": ("array", "video"), "visual": ("hdf5", "video")}
LAYOUTS = {("hdf5", "array"): "av_preprocess_tool", ("video", "video"): "video"}  # (visual, audio) kinds -> layout


# ---------------------------------------------------------------------------------------------------------------
# the audio recipe


def magnitude_reader(kind: str, sr: int, seconds: float, n_fft: int, hop_length: int,
                     frames: int | None = None, computed: bool = False) -> AudioReader:
    """The BalancedAV audio: an |STFT| magnitude (1, n_fft/2+1, `frames`), not log-scaled, stored (kind 'array')
    or computed from the video. `computed`: the stored arrays are prepare's, made with this recipe."""
    return (ComputedMagnitude if computed and kind == "array" else AudioReader)(
        kind, "stft_magnitude", sr=sr, seconds=seconds, n_fft=n_fft, hop_length=hop_length, pad_mode="reflect",
        frames=frames)


class ComputedMagnitude(AudioReader):
    """The |STFT| arrays `prepare` computed from the raw videos (`_write_npy`), read as stored arrays: their cache
    recipe records every parameter they were computed with, so a config that asks for another sample rate, hop,
    window or length refuses the folder (layout.recipe_differences) instead of training on those arrays."""

    def cache_recipe(self) -> dict:
        return {**super().cache_recipe(), "recipe": self.recipe, "sr": self.sr, "seconds": self.seconds,
                "n_fft": self.n_fft, "hop_length": self.hop_length, "pad_mode": self.pad_mode}


class LogAudio(ModalityMap):
    """log(x + 1e-7) of the audio (``audio_log: true``): a wrapper, so the cache keeps the magnitude as released."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.clamp_min(0) + 1e-7)


# ---------------------------------------------------------------------------------------------------------------
# annotation, layout, builder


def _is_annotation(path: Path) -> bool:
    """Whether `path` is a json object with a `database` (BalancedAV's annotation, not some other json)."""
    if path.name in (CLASSES, CACHE_META, SUMMARY):
        return False
    try:
        return path.stat().st_size > 0 and "database" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def find_annotation(root: Path, annotation: str | None, folders: list[tuple[Path, list[os.DirEntry]]]) -> Path:
    """The annotation json: `annotation` (absolute, or relative to root), else the one json with a `database`
    among the files of `folders` (walk_dirs' listing)."""
    if annotation:
        return option_path(root, annotation, "annotation", "annotation json")
    found = [Path(e.path) for _, entries in folders for e in entries
             if e.name.endswith(".json") and _is_annotation(Path(e.path))]
    if not found:
        raise DataError(f"{root}: no BalancedAV annotation json found (a .json with {{\"labels\", \"database\"}} "
                        "in the root or a sub-folder); set dataset.annotation=<path to the json>")
    if len(found) > 1:
        raise DataError(f"{root}: several annotation jsons found ({', '.join(map(str, found))}); "
                        "pick one with dataset.annotation=<path>")
    return found[0]


def read_annotation(path: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(class names, [(id, label name, split)]) from the annotation json. Classes: the json's `labels` list in its
    order, else the sorted label names; a label outside `labels` is a DataError."""
    entries, labels = media.read_annotation(path)  # DataError naming the file when it is not such a json
    if not entries:
        raise DataError(f"{path}: `database` is empty")
    if not labels:
        return sorted({lab for _, lab, _ in entries}), entries
    classes = [str(c) for c in labels]
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: the `labels` list has duplicate names")
    unknown = sorted({lab for _, lab, _ in entries} - set(classes))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are used in `database` but missing from `labels`")
    return classes, entries


def find_clips(root: str | Path, annotation: str | None = None, visual_dir: str | None = None,
               audio_dir: str | None = None, video_dir: str | None = None, exclude: tuple[Path, ...] = ()
               ) -> Discovery:
    """The annotated clips with their media: the layout, the complete clips, the ones left out, the classes."""
    # absolute: a pinned folder option is resolved against the root here, and a layout Candidate joins a relative
    # folder to the root again (`--root raw --set video_dir=videos` looked in raw/raw/videos)
    root = dataset_root(root, "BalancedAV").absolute()
    folders = walk_dirs(root, 2, exclude)
    ann = find_annotation(root, annotation, folders)
    classes, entries = read_annotation(ann)
    label_of = {c: i for i, c in enumerate(classes)}
    # relative to the root, as Candidate folders are: the root's own path never goes through their {split} format
    dirs = [folder.relative_to(root) for folder, _ in folders]
    pinned = {k: option_path(root, v, k) for k, v in (("visual_dir", visual_dir), ("audio_dir", audio_dir),
                                                      ("video_dir", video_dir))}
    if pinned["video_dir"] is not None and not (visual_dir or audio_dir):  # the user pinned the raw videos
        tables = {m: candidate_list([("video", dirs)], pinned["video_dir"]) for m in KINDS}
    else:
        tables = {m: candidate_list([(k, dirs) for k in kinds], pinned[f"{m}_dir"]) for m, kinds in KINDS.items()}
    found = find_media(root, [Clip(i, label_of[lab], split, {}) for i, lab, split in entries], None, tables,
                       split_source=ann.name, dataset="BalancedAV", classes=classes,
                       layout=lambda kinds: LAYOUTS.get((kinds["visual"], kinds["audio"]), "mixed"))
    found.extra_notes.update(annotation=str(ann), **{f"{m}_dir": str(d[0]) for m, d in found.dirs.items() if d},
                             missing_media=len(found.missing))
    return found


def bav_readers(kinds: dict[str, str], frames: int, image_size: int, augment: str, sr: int, seconds: float,
                n_fft: int, hop_length: int, audio_frames: int | None, computed: bool = False) -> dict:
    return {"audio": magnitude_reader(kinds["audio"], sr, seconds, n_fft, hop_length, audio_frames, computed),
            "visual": FrameReader(kinds["visual"], frames, image_size, augment, fps=1.0)}


def build_balanced_av(root: str | None = None, prepared: str | None = None, annotation: str | None = None,
                      visual_dir: str | None = None, audio_dir: str | None = None, video_dir: str | None = None,
                      frames: PositiveInt = 3, image_size: PositiveInt = 224,
                      augment: media.Augment = "crop_flip", audio_log: bool = False,
                      sr: PositiveInt = 44100, seconds: PositiveFloat = 10.0, n_fft: PositiveInt = 512,
                      hop_length: PositiveInt = 440, audio_frames: PositiveInt | None = 1003,
                      val_fraction: Fraction = 0.1, split_seed: NonNegativeInt = 0) -> DataSplits:
    """BalancedAV as DataSplits with modalities audio (spectrogram (1, 257, audio_frames)) and visual (frames
    (frames, 3, S, S)), from the raw tree under `root` or the `mmbalance prepare balanced_av` folder `prepared`."""
    splits, _ = build_clips(
        "balanced_av", root, prepared, lambda: find_clips(root, annotation, visual_dir, audio_dir, video_dir),
        lambda kinds, clips: bav_readers(kinds, frames, image_size, augment, sr, seconds, n_fft, hop_length,
                                         audio_frames), val_fraction=val_fraction, split_seed=split_seed,
        frames=frames, image_size=image_size, augment=augment, decode_prepared=False,
        notes={"source": "raw"})
    splits.notes["audio_log"] = bool(audio_log)
    if audio_log:
        splits.train, splits.val, splits.test = (LogAudio(d) for d in (splits.train, splits.val, splits.test))
    return splits


# ---------------------------------------------------------------------------------------------------------------
# prepare: the raw videos -> an AV_preprocess_tool tree


def _write_hdf5(video: str, dest: str, *_stft_params) -> None:
    """A video's 1 fps frames as JPEG bytes (quality 95) in dataset `video` of an .hdf5, renamed from a .tmp once
    complete so an interrupted run leaves no finished-looking file; extract_media decides what is redone."""
    import h5py

    dest = Path(dest)
    frames = media.decode_video_frames(video, fps=1.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("video", (len(frames),), dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for i, img in enumerate(frames):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            ds[i] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    os.replace(tmp, dest)


def _write_npy(video: str, dest: str, sr: int, seconds: float, n_fft: int, hop: int) -> None:
    """A video's |STFT| (`magnitude_reader`'s recipe) as float16 .npy, written atomically."""
    dest = Path(dest)
    spec = magnitude_reader("video", sr, seconds, n_fft, hop)(video)[0].numpy().astype(np.float16)
    PreparedFolder(dest.parent).write_array(dest.name, spec)


# what prepare decodes from the raw videos: an AV_preprocess_tool tree, which the raw loader reads too
TO_AV_PREPROCESS_TOOL = {"visual": ("hdf5", _write_hdf5, "hdf5", "visual/{id}.hdf5"),
                         "audio": ("npy", _write_npy, "array", "audio/{id}.npy")}


def prepare(ctx: PrepareContext, annotation: str | None = None, visual_dir: str | None = None,
            audio_dir: str | None = None, video_dir: str | None = None, size: PositiveInt = 224,
            max_frames: PositiveInt = 10, sr: PositiveInt = 44100, seconds: PositiveFloat = 10.0,
            n_fft: PositiveInt = 512, hop_length: PositiveInt = 440, audio_frames: PositiveInt = 1003,
            cache: bool = True) -> dict:
    """`mmbalance prepare balanced_av` (layout.prepare_discovered): raw videos decoded once into an AV_preprocess_tool
    tree (with the annotation json), whose |STFT| parameters are recorded for the loader to check."""
    found = find_clips(ctx.root, annotation, visual_dir, audio_dir, video_dir, exclude=(ctx.out,))
    if found.layout == "video":
        ctx.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found.extra_notes["annotation"], ctx.out / "annotation.json")
    computed = found.kinds["audio"] == "video"  # else the stored arrays of the raw tree, used as they are
    stft = {"recipe": "stft_magnitude", "sr": int(sr), "seconds": float(seconds), "n_fft": int(n_fft),
            "hop_length": int(hop_length), "pad_mode": "reflect"}
    recipe = {"audio": {**(stft if computed else {"recipe": "stored array"}), "frames": int(audio_frames)},
              "visual": {"fps": 1.0}}
    summary = prepare_discovered(ctx, "balanced_av", found, summary={"classes": len(found.classes)},
                                 cache_readers=(lambda kinds, clips: bav_readers(kinds, 3, size, "none", sr, seconds,
                                                                                n_fft, hop_length, audio_frames,
                                                                                computed))
                                 if cache else None, size=size, max_frames=max_frames, targets=TO_AV_PREPROCESS_TOOL,
                                 params=(sr, seconds, n_fft, hop_length), recipe=recipe)
    return {**summary, "clips": sum(summary["manifest_clips"].values()),
            **{f"clips_{s}": n for s, n in summary["manifest_clips"].items()}}
