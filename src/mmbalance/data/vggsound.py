"""VGGSound (Chen et al. 2020): ~200k 10 s YouTube clips of 309 sound classes, audio + visual (datasets.md §1.4).

The clip list is the official ``vggsound.csv`` (no header; ``ytid, start_seconds, label, train|test``; labels may
hold commas, so it is read as real csv). Classes are the SORTED label names of the whole csv (OGM-GE numbers them
by first appearance, which changes with the csv; datasets.md §6.3) and are persisted in classes.json. Clip ids are
``<ytid>_<start>`` (OGM-GE's naming); files named with a zero-padded start ``<ytid>_<start:06d>`` (many
downloaders) are found too. Link rot is normal: clips whose media are missing are counted per split (notes, log,
prepare_report.txt) and left out, never fatal.

Accepted layouts under ``root`` (media folders probed; ``visual_dir``/``audio_dir`` override them):

* ``ogmge``            ``{train,test}-audios/{train,test}-set/<id>.wav`` (16 kHz, OGM-GE ``mp4_to_wav.py``) and
                       ``{train,test}-videos/{train,test}-set-img/Image-01-FPS/<id>.mp4/<n:05d>.jpg`` (1 fps; the
                       frame FOLDER name ends in .mp4);
* ``balancebenchmark`` ``video_{train,test}_root/<id>/`` frame folders + ``audio_{train,test}_root/<id>.npy``;
* ``raw``              ``{train,test}/<id>.mp4`` (or ``video/``): audio and frames decoded with PyAV.

Recipes (OGM-GE ``VGGSoundDataset.py``; datasets.md §1.4):
* audio from wav or video: 16 kHz mono, tiled to at least ``clip_seconds`` (10 s) and cut to it, clipped to
  [-1, 1], |STFT| (n_fft 256, hop 128, Hann, centred, explicit ``pad_mode``), log(|S| + 1e-7); then a window of
  ``audio_seconds`` (5 s -> 626 frames) is taken: a random window in training (starts in [0, 5 s], like OGM-GE)
  and the CENTRE window at evaluation (OGM-GE crops randomly at test time too: non-deterministic, §6.5) ->
  (1, 129, 626). The window is cut from the spectrogram of the whole 10 s, at hop-aligned starts (8 ms steps),
  so the raw and the prepared paths give identical tensors; OGM-GE computes the STFT of the cropped wave, which
  differs only in the two edge frames (centre padding instead of the neighbouring audio);
* audio from a stored array (BalanceBenchmark ``.npy``): used as it is;
* visual: 3 frames, one per segment (random in training, centre at evaluation), RandomResizedCrop + flip once per
  clip in training, Resize at evaluation, ImageNet normalisation -> (3, 3, S, S).
Validation is carved from train (stratified, seeded, ``val_fraction``): VGGSound has no validation split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from mmbalance.data.batch import DataSplits, ModalitySpec
from mmbalance.data.clips import AudioReader, Clip, FrameReader, ModalityMap, clip_splits, stored_audio
from mmbalance.data.layout import (VIDEO_FOLDERS, Discovery, candidate_list, dataset_root, find_media,
                                   option_path, prepare_clips, prepared_clips, prepared_splits)
from mmbalance.data.prepare import PreparedFolder, resolve_prepared
from mmbalance.errors import DataError

log = logging.getLogger("mmbalance")

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


def read_vggsound_csv(path: Path) -> list[tuple[str, int, str, str]]:
    """(ytid, start_seconds, label, split) rows of vggsound.csv; a header row, if any, is skipped."""
    if not path.is_file():
        raise DataError(f"VGGSound: clip list {str(path)!r} does not exist (the official vggsound.csv: ytid, "
                        "start_seconds, label, train|test; set dataset.csv_path=... if it lives elsewhere)")
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
                      audio_dir: str | None = None) -> tuple[Discovery, list[str]]:
    """(clips found under `root`, the sorted class names of the whole csv)."""
    root = dataset_root(root, "VGGSound")
    path = option_path(root, csv_path) or root / "vggsound.csv"
    rows = read_vggsound_csv(path)
    classes = sorted({label for _, _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    entries, names, seen = [], [], set()
    for ytid, start, label, split in rows:
        cid = f"{ytid}_{start}"
        if cid in seen:
            continue
        seen.add(cid)
        entries.append(Clip(cid, index[label], split, {}))
        padded = f"{ytid}_{start:06d}"
        names.append([cid] if padded == cid else [cid, padded])  # OGM-GE's plain name, then the zero-padded one
    tables = {"audio": candidate_list(VGG_AUDIO, audio_dir), "visual": candidate_list(VGG_VISUAL, visual_dir)}
    disc = find_media(root, entries, names, tables, layout="?", split_source=path.name, dataset="VGGSound")
    disc.layout = {"jpgdir": {"wav": "ogmge", "array": "balancebenchmark"}}.get(disc.kinds["visual"], {}).get(
        disc.kinds["audio"], "raw" if disc.kinds["visual"] == "video" else "mixed")
    disc.extra_notes.update(duplicates_dropped=len(rows) - len(entries), num_classes=len(classes))
    return disc, classes


# ---------------------------------------------------------------------------------------------------------------
# audio: the whole clip's spectrogram, then a window


def window_frames(sample_rate: int, seconds: float, hop_length: int) -> int:
    """STFT frames of a centred STFT over `seconds` of audio (5 s at 16 kHz, hop 128 -> 626)."""
    return int(round(sample_rate * seconds)) // int(hop_length) + 1


class AudioWindow(ModalityMap):
    """Cuts `frames` STFT frames out of each item's audio spectrogram: a random window in training, the centre
    window at evaluation (deterministic)."""

    def __init__(self, base, frames: int, train: bool, modality: str = "audio"):
        super().__init__(base, modality, train)
        self.frames = int(frames)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        extra = x.shape[-1] - self.frames
        if extra <= 0:
            return x
        start = int(torch.randint(extra + 1, (1,))) if self.train else extra // 2
        return x[..., start:start + self.frames].contiguous()


def _window(splits: DataSplits, frames: int) -> DataSplits:
    spec = splits.modalities["audio"]
    if spec.shape[-1] <= frames:
        return splits
    splits.train = AudioWindow(splits.train, frames, train=True)
    splits.val = AudioWindow(splits.val, frames, train=False)
    splits.test = AudioWindow(splits.test, frames, train=False)
    splits.modalities["audio"] = ModalitySpec(spec.kind, (*spec.shape[:-1], frames))
    return splits


def stft_reader(kind: str, *, sample_rate: int, clip_seconds: float, n_fft: int, hop_length: int,
                pad_mode: str) -> AudioReader:
    """OGM-GE's VGGSound waveform recipe over the whole (tiled) clip; the training window is cut afterwards."""
    return AudioReader(source=kind, recipe="stft_log", sr=sample_rate, seconds=clip_seconds, n_fft=n_fft,
                       hop_length=hop_length, pad_mode=pad_mode, fit="tile", crop="start")


def vgg_readers(kinds: dict[str, str], clips: list[Clip], *, frames: int = 3, image_size: int = 224,
                augment: str = "none", video_fps: float = 1.0, **stft) -> dict:
    audio = stored_audio([c.sources["audio"] for c in clips]) if kinds["audio"] == "array" else \
        stft_reader(kinds["audio"], **stft)
    return {"audio": audio, "visual": FrameReader(source=kinds["visual"], frames=frames, size=image_size,
                                                  augment=augment, fps=video_fps)}


def build_vggsound(root: str | None, prepared: str | None = None, csv_path: str | None = None,
                   visual_dir: str | None = None, audio_dir: str | None = None, frames: int = 3,
                   image_size: int = 224, augment: str = "crop_flip", video_fps: float = 1.0,
                   sample_rate: int = 16000, audio_seconds: float = 5.0, clip_seconds: float = 10.0,
                   n_fft: int = 256, hop_length: int = 128, pad_mode: str = "reflect", val_fraction: float = 0.1,
                   split_seed: int = 0) -> DataSplits:
    """VGGSound as DataSplits with modalities audio (1, n_fft/2+1, T) and visual (frames, 3, S, S).

    `prepared`: a folder written by ``mmbalance prepare vggsound`` (its cache, or its extracted wav + frames
    decoded on access when prepared with cache=false); otherwise the raw tree under `root`. Defaults follow
    OGM-GE: 16 kHz, 5 s windows of a 10 s clip, n_fft 256, hop 128 -> (1, 129, 626); 3 frames at 224 px.
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    if audio_seconds > clip_seconds:
        raise DataError(f"VGGSound: dataset.audio_seconds={audio_seconds} is longer than dataset.clip_seconds="
                        f"{clip_seconds}")
    stft = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, n_fft=n_fft, hop_length=hop_length,
                pad_mode=pad_mode)
    visual = dict(frames=frames, image_size=image_size, augment=augment)
    sr, hop = sample_rate, hop_length
    if prepared is not None:
        folder = PreparedFolder(prepared, "vggsound").require()
        clips, classes, kinds = prepared_clips(folder, ("audio", "visual"))
        splits = prepared_splits(folder, clips, classes, val_fraction=val_fraction, split_seed=split_seed,
                                 notes={"sources": kinds}, decode=lambda: vgg_readers(kinds, clips, **visual,
                                                                                       video_fps=video_fps, **stft),
                                 **visual)
        recipe = folder.json("recipe.json", optional=True).get("audio", {})
        if splits.notes["cache"] and recipe:  # the cache holds the recipe it was written with
            sr, hop = int(recipe.get("sample_rate", sr)), int(recipe.get("hop_length", hop))
            differs = {k: (recipe.get(k), v) for k, v in stft.items() if k in recipe and recipe[k] != v}
            if differs:
                log.warning("VGGSound: the cache in %s was prepared with %s; it is used as prepared", prepared,
                            ", ".join(f"{k}={a} (config {b})" for k, (a, b) in differs.items()))
                splits.notes["cache_recipe_differs"] = {k: a for k, (a, _) in differs.items()}
    else:
        disc, classes = discover_vggsound(root, csv_path, visual_dir, audio_dir)
        disc.log("VGGSound")
        kinds = disc.kinds
        splits = clip_splits(disc.clips, vgg_readers(kinds, disc.clips, **visual, video_fps=video_fps, **stft),
                             classes, val_fraction=val_fraction, split_seed=split_seed, notes=disc.notes())
    if kinds["audio"] == "array":
        return splits
    splits.notes["audio_window_frames"] = window_frames(sr, audio_seconds, hop)
    return _window(splits, splits.notes["audio_window_frames"])


def prepare(ctx, csv_path: str | None = None, visual_dir: str | None = None, audio_dir: str | None = None,
            fps: float = 1.0, short_side: int = 0, sample_rate: int = 16000, clip_seconds: float = 10.0,
            n_fft: int = 256, hop_length: int = 128, pad_mode: str = "reflect", cache: bool = False,
            size: int = 224, max_frames: int = 10, shard: str | None = None) -> dict:
    """`mmbalance prepare vggsound --root RAW --out PREP [--set key=value ...]`.

    1. read vggsound.csv (sorted classes -> classes.json), find each clip's media under either name
       (``<ytid>_<start>`` or ``<ytid>_<start:06d>``); missing clips (link rot) -> prepare_report.txt, counted;
    2. from mp4: audio -> ``<out>/audio/<id>.wav`` (16 kHz mono, like OGM-GE's ``mp4_to_wav.py``) and frames at
       `fps` (1) -> ``<out>/frames/<id>/frame_%05d.jpg``, PyAV; existing outputs are skipped, so it resumes;
       `shard=i/n` processes only every n-th clip from the i-th (run the n shards anywhere, then once without
       shard to write the manifest);
    3. manifest.csv, recipe.json;
    4. `cache` (default OFF for VGGSound: 224 px x 10 frames is ~1.5 MB a clip, ~300 GB for the whole set):
       the memory-mapped cache of frames and the whole-clip log-STFT (1, 129, 1251) in float16. Without it,
       ``dataset.prepared`` decodes the extracted wav + jpg on access, as OGM-GE does.
    """
    disc, classes = discover_vggsound(ctx.root, csv_path, visual_dir, audio_dir)
    stft = dict(sample_rate=int(sample_rate), clip_seconds=float(clip_seconds), n_fft=int(n_fft),
                hop_length=int(hop_length), pad_mode=str(pad_mode))
    recipe = {"audio": {"recipe": "stft_log", **stft} if disc.kinds["audio"] != "array"
              else {"recipe": "stored array"}, "visual": {"fps": fps}}
    summary = prepare_clips(ctx, "vggsound", disc.clips, disc.kinds, classes, summary=disc.notes(),
                            problems=disc.problems(), recipe=recipe, shard=shard, size=size, max_frames=max_frames,
                            cache_readers=(lambda kinds, clips: vgg_readers(kinds, clips, image_size=int(size),
                                                                           video_fps=fps, **stft)) if cache else None,
                            params=(int(sample_rate), float(fps), int(short_side or 0)))
    return {**summary, "num_classes": len(classes)}
