"""BalancedAV (Xia et al., CVPR-W 2023): 30-class audio-visual events with a uniform per-sample modality discrepancy.

Reference: datasets.md §1.3, §2 "BalancedAV", §5 "balancedav", §6 item 6. The release (OneDrive, linked from
gewu-lab.github.io/Balanced-Audiovisual-Dataset) comes with one ActivityNet-style annotation json::

    {"labels": [class names...], "database": {clip_id: {"subset": "training|validation|testing", "label": name}}}

(28,949 / 3,018 / 3,884 clips). Clip ids mix formats (``<ytid>_<start6>_<end6>``, ``<ytid>_<sec>``, bare
``<ytid>``); they are used as they are, as file stems.

Accepted layouts (autodetected under ``root``: the json and the media folders may sit in ``root`` or in
sub-folders up to two levels down; ``annotation``/``visual_dir``/``audio_dir``/``video_dir`` pin them):

* ``av_preprocess_tool`` -- the GeWu-Lab/AV_preprocess_tool outputs that BalanceBenchmark and BML read:
  ``<visual_dir>/<id>.hdf5`` (dataset ``video`` = JPEG bytes at 1 fps) and ``<audio_dir>/<id>.pkl`` (a pickled
  numpy |STFT|, (257, 1003), NOT log-scaled); ``<id>.npy`` audio (what ``prepare`` extracts) is accepted too;
* ``video`` -- the raw release, one ``<id>.mp4`` (or .mkv/.webm/.avi) per clip, decoded with PyAV on every
  access with the same recipe (slow: run ``mmbalance prepare balanced_av`` once instead).

Recipe (AV_preprocess_tool + BalanceBenchmark ``balance_dataset.py``, with the peer's two bugs fixed):

* visual: 3 frames of the 1 fps frames, the audio-visual frame recipe (clips.FrameReader). The peer never
  augments (its train branch tests ``mode == 'training'``) -- we do;
* audio: |STFT| of exactly 10 s at 44.1 kHz (shorter clips are completed by repeating their last second),
  n_fft 512, hop 440, Hann window, centred with reflect padding -> (1, 257, 1003); stored arrays are fitted
  to ``audio_frames`` columns (cut, or zero-padded = silence);
* ``audio_log`` (default false): the released pickles hold the plain magnitude and both reference loaders
  (BalanceBenchmark, BML) feed it to the ResNet unchanged, so the paper's BalancedAV numbers were made without a
  log; ``audio_log: true`` applies log(|S| + 1e-7), the compression every OGM-GE audio recipe uses;
* splits: the json's own training / validation / testing subsets (BalancedAV has its own validation split; the
  peer's ``mode + 'ing'`` match never finds ``validation``); ``train``/``val``/``valid``/``test`` are accepted too;
* classes: the json's ``labels`` list in its order (sorted label names when it has none).

``mmbalance prepare balanced_av`` first decodes the ``video`` layout into ``PREP/visual/<id>.hdf5`` (1 fps JPEG
bytes, quality 95), ``PREP/audio/<id>.npy`` (float16 |STFT|) and ``PREP/annotation.json`` -- an av_preprocess_tool
tree that ``build_balanced_av(root=PREP)`` also reads.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import Clip, FrameReader, ModalityMap, spectrogram_from_array
from mmbalance.data.layout import (Discovery, build_clips, candidate_list, dataset_root, find_media, option_path,
                                   prepare_clips, walk_dirs)
from mmbalance.data.prepare import CACHE_META, CLASSES, SUMMARY, PrepareContext
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

LOG_EPS = 1e-7
# the layout table: AV_preprocess_tool's hdf5 frames and pickled |STFT| (or prepare's .npy), else the raw videos;
# the folders are the root and every folder two levels below it (or the pinned ones)
KINDS = {"audio": ("array", "video"), "visual": ("hdf5", "video")}


# ---------------------------------------------------------------------------------------------------------------
# the audio recipe


class MagnitudeReader:
    """The BalancedAV audio modality: an |STFT| magnitude (1, n_fft/2+1, `frames`), not log-scaled.

    source 'array': a stored spectrogram (.pkl from AV_preprocess_tool, or .npy) of shape (F, T) or (1, F, T);
    source 'video': the clip's audio decoded with PyAV at `sr`, made exactly `seconds` long by repeating its last
    second, |STFT| n_fft 512 / hop 440 (AV_preprocess_tool: 10 s at 44.1 kHz -> (257, 1003)). The spectrogram is
    cut, or zero-padded (silence) on the right, to `frames` columns.
    """

    kind = "spectrogram"

    def __init__(self, source: str = "array", sr: int = 44100, seconds: float = 10.0, n_fft: int = 512,
                 hop_length: int = 440, frames: int | None = None):
        if source not in ("array", "video"):
            raise ValueError(f"MagnitudeReader source={source!r}; expected array or video")
        self.source, self.sr, self.seconds = source, int(sr), float(seconds)
        self.n_fft, self.hop_length = int(n_fft), int(hop_length)
        self.frames = int(frames) if frames else int(round(self.sr * self.seconds)) // self.hop_length + 1
        self.shape = (1, self.n_fft // 2 + 1, self.frames)

    def __call__(self, path: str, train: bool = False) -> Tensor:
        if self.source == "array":
            spec = spectrogram_from_array(media.load_array(path), path)
        else:
            wave = media.fit_length(media.decode_audio(path, self.sr), int(round(self.sr * self.seconds)), self.sr)
            spec = media.stft_magnitude(wave, self.n_fft, self.hop_length).unsqueeze(0)
        if spec.shape[1] != self.shape[1]:
            raise DataError(f"{path}: spectrogram has {spec.shape[1]} frequency bins, expected {self.shape[1]} "
                            f"(|STFT| with n_fft {self.n_fft}); shape {tuple(spec.shape)}")
        return torch.nn.functional.pad(spec, (0, max(0, self.frames - spec.shape[-1])))[..., :self.frames].contiguous()


class LogAudio(ModalityMap):
    """log(x + 1e-7) of the audio (``audio_log: true``): a wrapper, so the cache keeps the magnitude as released."""

    def apply(self, x: Tensor) -> Tensor:
        return torch.log(x.clamp_min(0) + LOG_EPS)


# ---------------------------------------------------------------------------------------------------------------
# annotation and layout


def find_annotation(root: Path, annotation: str | None = None, exclude: tuple[Path, ...] = ()) -> Path:
    """The annotation json: `annotation` (absolute, or relative to root), else the one json with a `database`
    found in root or its sub-folders (two levels)."""
    if annotation:
        return option_path(root, annotation, "annotation", "annotation json")
    found = []
    for folder, entries in walk_dirs(root, 2, exclude):
        for e in entries:
            if not e.name.endswith(".json") or e.name in (CLASSES, CACHE_META, SUMMARY):
                continue
            try:
                if e.stat().st_size and "database" in json.loads(Path(e.path).read_text()):
                    found.append(Path(e.path))
            except (OSError, ValueError, TypeError):
                continue
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
    root = dataset_root(root, "BalancedAV")
    ann = find_annotation(root, annotation, exclude)
    classes, entries = read_annotation(ann)
    label_of = {c: i for i, c in enumerate(classes)}
    dirs = [folder for folder, _ in walk_dirs(root, 2, exclude)]
    pinned = {k: option_path(root, v, k) for k, v in (("visual_dir", visual_dir), ("audio_dir", audio_dir),
                                                      ("video_dir", video_dir))}
    if pinned["video_dir"] is not None and not (visual_dir or audio_dir):  # the user pinned the raw videos
        tables = {m: [("video", [pinned["video_dir"]])] for m in KINDS}
    else:
        tables = {m: [(k, [pinned[f"{m}_dir"]] if pinned[f"{m}_dir"] else dirs) for k in kinds]
                  for m, kinds in KINDS.items()}
    found = find_media(root, [Clip(i, label_of[lab], split, {}) for i, lab, split in entries], None,
                       {m: candidate_list(t) for m, t in tables.items()}, split_source=ann.name,
                       dataset="BalancedAV", classes=classes,
                       layout=lambda kinds: {("hdf5", "array"): "av_preprocess_tool", ("video", "video"): "video"}.get(
                           (kinds["visual"], kinds["audio"]), "mixed"))
    found.extra_notes = {"annotation": str(ann), **{f"{m}_dir": str(d[0]) for m, d in found.dirs.items() if d},
                         "missing_media": len(found.missing)}
    return found


def bav_readers(kinds: dict[str, str], frames: int, image_size: int, augment: str, sr: int, seconds: float,
                n_fft: int, hop_length: int, audio_frames: int | None) -> dict:
    return {"audio": MagnitudeReader(kinds["audio"], sr, seconds, n_fft, hop_length, audio_frames),
            "visual": FrameReader(kinds["visual"], frames, image_size, augment, fps=1.0)}


def build_balanced_av(root: str | None = None, prepared: str | None = None, annotation: str | None = None,
                      visual_dir: str | None = None, audio_dir: str | None = None, video_dir: str | None = None,
                      frames: int = 3, image_size: int = 224, augment: str = "crop_flip", audio_log: bool = False,
                      sr: int = 44100, seconds: float = 10.0, n_fft: int = 512, hop_length: int = 440,
                      audio_frames: int | None = 1003, val_fraction: float = 0.1, split_seed: int = 0) -> DataSplits:
    """BalancedAV as DataSplits with modalities audio (spectrogram (1, 257, audio_frames)) and visual (frames
    (frames, 3, S, S)), from the raw tree under `root` or the `mmbalance prepare balanced_av` folder `prepared`.
    sr/seconds/n_fft/hop_length: the STFT recipe for the raw `video` layout; audio_frames: the spectrogram width
    every clip is fitted to (1003 = 10 s at 44.1 kHz, hop 440); audio_log: log(|S| + 1e-7) of the magnitude."""
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
# prepare


def _write_hdf5(video: str, dest: str, force: bool, sr: int, seconds: float, n_fft: int, hop: int) -> bool:
    """A video's frames at 1 fps as JPEG bytes (quality 95) in dataset `video` of an .hdf5, written to a .tmp and
    renamed, so an interrupted run never leaves a file that looks finished; kept unless `force`."""
    import h5py

    dest = Path(dest)
    if dest.is_file() and not force:
        return False
    jpegs = []
    for img in media.decode_video_frames(video, fps=1.0):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        jpegs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest.with_name(dest.name + ".tmp"), "w") as f:
        ds = f.create_dataset("video", (len(jpegs),), dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for i, b in enumerate(jpegs):
            ds[i] = b
    os.replace(dest.with_name(dest.name + ".tmp"), dest)
    return True


def _write_npy(video: str, dest: str, force: bool, sr: int, seconds: float, n_fft: int, hop: int) -> bool:
    """A video's |STFT| (the recipe above) as float16 .npy, written like `_write_hdf5`."""
    dest = Path(dest)
    if dest.is_file() and not force:
        return False
    spec = MagnitudeReader("video", sr, seconds, n_fft, hop)(video)[0].numpy().astype(np.float16)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.save(dest.with_name(dest.name + ".tmp.npy"), spec)
    os.replace(dest.with_name(dest.name + ".tmp.npy"), dest)
    return True


# what prepare decodes from the raw videos: an AV_preprocess_tool tree, which the raw loader reads too
TO_AV_PREPROCESS_TOOL = {"visual": ("hdf5", _write_hdf5, "hdf5", "visual/{id}.hdf5"),
                         "audio": ("npy", _write_npy, "array", "audio/{id}.npy")}


def prepare(ctx: PrepareContext, annotation: str | None = None, visual_dir: str | None = None,
            audio_dir: str | None = None, video_dir: str | None = None, size: int = 224, max_frames: int = 10,
            sr: int = 44100, seconds: float = 10.0, n_fft: int = 512, hop_length: int = 440,
            audio_frames: int = 1003, cache: bool = True) -> dict:
    """`mmbalance prepare balanced_av` (layout.prepare_clips): raw videos are decoded once into an
    AV_preprocess_tool tree (see the module docstring); `cache`: `size` px frames, up to `max_frames` per clip
    (10 = 10 s at 1 fps), and the |STFT| recipe (sr, seconds, n_fft, hop_length, audio_frames) in float16."""
    found = find_clips(ctx.root, annotation, visual_dir, audio_dir, video_dir, exclude=(ctx.out,))
    if found.layout == "video":
        ctx.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found.extra_notes["annotation"], ctx.out / "annotation.json")
    summary = prepare_clips(ctx, "balanced_av", found.clips, found.kinds, found.classes, problems=found.problems(),
                            summary={**found.notes(), "classes": len(found.classes)},
                            cache_readers=(lambda kinds, clips: bav_readers(kinds, 3, size, "none", sr, seconds,
                                                                           n_fft, hop_length, audio_frames))
                            if cache else None, size=size, max_frames=max_frames, targets=TO_AV_PREPROCESS_TOOL,
                            params=(sr, seconds, n_fft, hop_length))
    return {**summary, "clips": sum(summary["manifest_clips"].values()),
            **{f"clips_{s}": n for s, n in summary["manifest_clips"].items()}}
