"""VGGSound (Chen et al. 2020): ~200k 10 s YouTube clips of 309 sound classes; audio + visual.

What is VGGSound's own: its clip list (the official vggsound.csv; classes are its sorted label names), file names
with a plain or zero-padded start, its layout table (OGM-GE, BalanceBenchmark, raw mp4) and OGM-GE's audio recipe
with a deterministic evaluation window. Reference (layouts, recipes, prepare): docs/datasets.md#vggsound-vggsound
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from mmbalance.data import media
from mmbalance.data.batch import DataSplits, ModalitySpec
from mmbalance.data.clips import AudioReader, Clip, ModalityMap, av_readers
from mmbalance.data.layout import (VIDEO_FOLDERS, Discovery, build_clips, candidate_list, dataset_root, find_media,
                                   option_path, prepare_discovered, wav_and_frames)
from mmbalance.data.prepare import PreparedFolder, record_listing
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

# the layout table: per modality, (kind, folders) in priority order; `{split}` = train|test
VIDEO_OR_SPLIT = VIDEO_FOLDERS + ("{split}-videos/{split}-set", "{split}-videos")
VGG_VISUAL = (
    ("jpgdir", ("{split}-videos/{split}-set-img/Image-01-FPS", "video_{split}_root", "video_{split}",
                "visual_{split}", "{split}/frames", "frames", "visual", "Image-01-FPS")),
    ("video", VIDEO_OR_SPLIT),
)
VGG_AUDIO = (
    ("wav", ("{split}-audios/{split}-set", "audio_{split}", "audio", "wav", "{split}/audio")),
    ("array", ("audio_{split}_root", "audio_{split}", "audio", "{split}/audio", "spec")),
    ("video", VIDEO_OR_SPLIT),
)
LAYOUTS = {("jpgdir", "wav"): "ogmge", ("jpgdir", "array"): "balancebenchmark"}  # (visual, audio) kinds -> layout


def read_vggsound_csv(path: Path) -> list[tuple[str, int, str, str]]:
    """(ytid, start_seconds, label, split) rows of vggsound.csv; a header row, if any, is skipped."""
    if not path.is_file():
        raise DataError(f"VGGSound: clip list {str(path)!r} does not exist (the official vggsound.csv: ytid, "
                        "start_seconds, label, train|test; set dataset.csv_path=... if it lives elsewhere)")
    record_listing(path)
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 4:
                raise DataError(f"{path}, line {n}: expected ytid,start_seconds,label,train|test; got {row}")
            ytid, start, split = row[0].strip(), row[1].strip(), row[-1].strip().lower()
            label = ",".join(row[2:-1]).strip()  # an unquoted label with commas spans several fields
            try:
                start_s = int(float(start))
            except ValueError:
                if n == 1:
                    continue  # a header line
                raise DataError(f"{path}, line {n}: start_seconds {start!r} is not a number") from None
            if split not in ("train", "test"):
                raise DataError(f"{path}, line {n}: split {split!r}; expected train or test")
            rows.append((ytid, start_s, label, split))
    if not rows:
        raise DataError(f"{path} lists no clips")
    return rows


def discover_vggsound(root, csv_path: str | None = None, visual_dir: str | None = None,
                      audio_dir: str | None = None) -> Discovery:
    """The clips found under `root`, with the sorted class names of the whole csv."""
    root = dataset_root(root, "VGGSound")
    path = option_path(root, csv_path) or root / "vggsound.csv"
    rows = read_vggsound_csv(path)
    classes = sorted({label for _, _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    entries = [Clip(f"{ytid}_{start}", index[label], split, {}) for ytid, start, label, split in rows]
    # a clip's files are named by OGM-GE's plain start, or the zero-padded one many downloaders write
    padded = {f"{ytid}_{start}": f"{ytid}_{start:06d}" for ytid, start, _, _ in rows}
    names = [[c.id] if padded[c.id] == c.id else [c.id, padded[c.id]] for c in entries]
    tables = {"audio": candidate_list(VGG_AUDIO, audio_dir), "visual": candidate_list(VGG_VISUAL, visual_dir)}
    found = find_media(root, entries, names, tables, split_source=path.name, dataset="VGGSound", classes=classes,
                       layout=lambda kinds: LAYOUTS.get((kinds["visual"], kinds["audio"]),
                                                        "raw" if kinds["visual"] == "video" else "mixed"),
                       drop_duplicates=True)
    found.extra_notes["num_classes"] = len(classes)
    return found


# ---------------------------------------------------------------------------------------------------------------
# audio: the whole clip's spectrogram, then a window


class AudioWindow(ModalityMap):
    """Cuts `frames` STFT frames out of each item's audio spectrogram: a random window in training, the centre
    window at evaluation (deterministic)."""

    def __init__(self, base, frames: int, train: bool):
        super().__init__(base, "audio", train)
        self.frames = int(frames)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        extra = x.shape[-1] - self.frames
        if extra <= 0:
            return x
        start = int(torch.randint(extra + 1, (1,))) if self.train else extra // 2
        return x[..., start:start + self.frames].contiguous()


def stft_reader(kind: str, *, sample_rate: int, clip_seconds: float, n_fft: int, hop_length: int,
                pad_mode: str) -> AudioReader:
    """OGM-GE's VGGSound waveform recipe over the whole (tiled) clip; the training window is cut afterwards."""
    return AudioReader(kind, "stft_log", sr=sample_rate, seconds=clip_seconds, n_fft=n_fft, hop_length=hop_length,
                       pad_mode=pad_mode)


def build_vggsound(root: str | None, prepared: str | None = None, csv_path: str | None = None,
                   visual_dir: str | None = None, audio_dir: str | None = None, frames: PositiveInt = 3,
                   image_size: PositiveInt = 224, augment: media.Augment = "crop_flip", video_fps: PositiveFloat = 1.0,
                   sample_rate: PositiveInt = 16000, audio_seconds: PositiveFloat = 5.0,
                   clip_seconds: PositiveFloat = 10.0, n_fft: PositiveInt = 256, hop_length: PositiveInt = 128,
                   pad_mode: media.PadMode = "reflect", val_fraction: Fraction = 0.1,
                   split_seed: NonNegativeInt = 0) -> DataSplits:
    """VGGSound as DataSplits with modalities audio (1, n_fft/2+1, T) and visual (frames, 3, S, S), from the raw
    tree under `root` or the ``mmbalance prepare vggsound`` folder `prepared` (its cache, or decoded on access)."""
    if audio_seconds > clip_seconds:
        raise DataError(f"VGGSound: dataset.audio_seconds={audio_seconds} is longer than dataset.clip_seconds="
                        f"{clip_seconds}")
    stft = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, n_fft=n_fft, hop_length=hop_length,
                pad_mode=pad_mode)
    splits, kinds = build_clips(
        "vggsound", root, prepared, lambda: discover_vggsound(root, csv_path, visual_dir, audio_dir),
        lambda kinds, clips: av_readers(kinds, clips, lambda kind: stft_reader(kind, **stft), frames=frames,
                                        image_size=image_size, augment=augment, video_fps=video_fps),
        val_fraction=val_fraction, split_seed=split_seed, frames=frames, image_size=image_size, augment=augment)
    if kinds["audio"] == "array":  # a stored spectrogram is used as it is
        return splits
    # a cache holds the spectrograms of the recipe it was written with (recipe.json): the window follows it
    cached = PreparedFolder(splits.notes["prepared"]).json("recipe.json", optional=True).get("audio", {}) \
        if splits.notes.get("cache") else {}
    differs = {k: cached[k] for k, v in stft.items() if k in cached and cached[k] != v}
    if differs:
        log.warning("VGGSound: the cache in %s was prepared with %s; it is used as prepared", splits.notes["prepared"],
                    ", ".join(f"{k}={a} (config {stft[k]})" for k, a in differs.items()))
        splits.notes["cache_recipe_differs"] = differs
    used = {**stft, **differs}
    # a centred STFT over audio_seconds (5 s at 16 kHz, hop 128 -> 626 frames)
    window = int(round(int(used["sample_rate"]) * audio_seconds)) // int(used["hop_length"]) + 1
    splits.notes["audio_window_frames"] = window
    spec = splits.modalities["audio"]
    if spec.shape[-1] > window:
        splits.train, splits.val, splits.test = (AudioWindow(getattr(splits, s), window, train=s == "train")
                                                 for s in ("train", "val", "test"))
        splits.modalities["audio"] = ModalitySpec(spec.kind, (*spec.shape[:-1], window))
    return splits


def prepare(ctx, csv_path: str | None = None, visual_dir: str | None = None, audio_dir: str | None = None,
            fps: PositiveFloat = 1.0, short_side: NonNegativeInt = 0, sample_rate: PositiveInt = 16000,
            clip_seconds: PositiveFloat = 10.0, n_fft: PositiveInt = 256, hop_length: PositiveInt = 128,
            pad_mode: media.PadMode = "reflect", cache: bool = False, size: PositiveInt = 224,
            max_frames: PositiveInt = 10, shard: str | None = None) -> dict:
    """`mmbalance prepare vggsound` (layout.prepare_discovered): mp4s decoded once into wav + frames; `cache` is off by
    default (the whole set would take ~300 GB): the prepared folder is then decoded on access, as OGM-GE does."""
    found = discover_vggsound(ctx.root, csv_path, visual_dir, audio_dir)
    stft = dict(sample_rate=int(sample_rate), clip_seconds=float(clip_seconds), n_fft=int(n_fft),
                hop_length=int(hop_length), pad_mode=str(pad_mode))
    summary = prepare_discovered(ctx, "vggsound", found, shard=shard, size=size, max_frames=max_frames,
                                 cache_readers=(lambda kinds, clips: av_readers(
                                     kinds, clips, lambda kind: stft_reader(kind, **stft), image_size=int(size),
                                     video_fps=fps)) if cache else None,
                                 **wav_and_frames(found.kinds, {"recipe": "stft_log", **stft}, sample_rate, fps,
                                                  short_side))
    return {**summary, "num_classes": len(found.classes)}
