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

* visual: 3 frames sampled segment-wise from the 1 fps frames (random frame per segment in training, the centre
  at evaluation); training RandomResizedCrop + horizontal flip drawn once per clip, evaluation Resize((S, S));
  ImageNet normalisation. The peer never augments (its train branch tests ``mode == 'training'``) -- we do;
* audio: |STFT| of exactly 10 s at 44.1 kHz (shorter clips are completed by repeating their last second),
  n_fft 512, hop 440, Hann window, centred with reflect padding -> (1, 257, 1003); stored arrays are fitted
  to ``audio_frames`` columns (cut, or zero-padded = silence);
* ``audio_log`` (default false): the released pickles hold the plain magnitude and both reference loaders
  (BalanceBenchmark, BML) feed it to the ResNet unchanged, so the paper's BalancedAV numbers were made without a
  log; ``audio_log: true`` applies log(|S| + 1e-7), the compression every OGM-GE audio recipe uses;
* splits: the json's own training / validation / testing subsets (DECISIONS: BalancedAV has its own validation
  split; the peer's ``mode + 'ing'`` match never finds ``validation``). Subset names ``train``/``val``/``valid``/
  ``test`` are accepted too. Only when no clip is in validation is a stratified 10 % carved from training;
* classes: the json's ``labels`` list in its order (sorted label names when it has none), persisted as
  ``classes.json`` by ``prepare``.

``mmbalance prepare balanced_av --root RAW --out PREP``: validates the tree (missing media are listed in
prepare_report.txt and skipped), for the ``video`` layout first extracts ``PREP/visual/<id>.hdf5`` (1 fps JPEG
bytes, quality 95) and ``PREP/audio/<id>.npy`` (float16 |STFT|) plus ``PREP/annotation.json`` -- an
av_preprocess_tool tree that ``build_balanced_av(root=PREP)`` also reads --, writes manifest.csv and
classes.json, and caches the clips (uint8 frames, float16 magnitude spectrograms) for
``build_balanced_av(prepared=PREP)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import CACHE_META, Clip, FrameReader, clip_splits, spectrogram_from_array, write_clip_cache
from mmbalance.data.prepare import (PrepareContext, read_classes, read_json, read_manifest, resolve_prepared,
                                    write_classes, write_manifest)
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

SUBSETS = {"training": "train", "train": "train", "validation": "val", "valid": "val", "val": "val",
           "testing": "test", "test": "test"}
VISUAL_SUFFIXES = (".hdf5", ".h5")
AUDIO_SUFFIXES = (".pkl", ".npy")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")
# files that mark a folder as mmbalance output (a prepared cache), never raw data to detect
_PREPARED_MARKERS = ("manifest.csv", CACHE_META, "prepare_summary.json")
LOG_EPS = 1e-7


# ---------------------------------------------------------------------------------------------------------------
# the audio recipe


def fit_last_second(wave: np.ndarray, length: int, sr: int) -> np.ndarray:
    """Exactly `length` samples; a short clip is completed by repeating its last second (AV_preprocess_tool)."""
    if len(wave) == 0:
        raise DataError("empty audio clip")
    if len(wave) < length:
        tail = wave[-min(sr, len(wave)):]
        reps = -(-(length - len(wave)) // len(tail))
        wave = np.concatenate([wave, np.tile(tail, reps)])
    return wave[:length]


def stft_magnitude(wave: np.ndarray, n_fft: int = 512, hop_length: int = 440, pad_mode: str = "reflect") -> Tensor:
    """|STFT| with a Hann window, centred (AV_preprocess_tool's librosa call: pad_mode 'reflect'), (F, frames)."""
    x = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft), center=True,
                      pad_mode=pad_mode, return_complex=True)
    return spec.abs()


def fit_frames(spec: Tensor, frames: int) -> Tensor:
    """(1, F, T) cut or zero-padded (silence) on the right to `frames` columns."""
    t = spec.shape[-1]
    if t > frames:
        return spec[..., :frames].contiguous()
    if t < frames:
        return torch.nn.functional.pad(spec, (0, frames - t))
    return spec


class MagnitudeReader:
    """The BalancedAV audio modality: an |STFT| magnitude (1, n_fft/2+1, `frames`), not log-scaled.

    source 'array': a stored spectrogram (.pkl from AV_preprocess_tool, or .npy) of shape (F, T) or (1, F, T);
    source 'video': the clip's audio decoded with PyAV at `sr`, made exactly `seconds` long by repeating its last
    second, |STFT| n_fft 512 / hop 440 (AV_preprocess_tool: 10 s at 44.1 kHz -> (257, 1003)).
    `shape` pins the output shape (the prepared cache's), otherwise it follows the recipe.
    """

    kind = "spectrogram"

    def __init__(self, source: str = "array", sr: int = 44100, seconds: float = 10.0, n_fft: int = 512,
                 hop_length: int = 440, frames: int | None = None, shape: tuple[int, ...] | None = None):
        if source not in ("array", "video"):
            raise ValueError(f"MagnitudeReader source={source!r}; expected array or video")
        self.source, self.sr, self.seconds = source, int(sr), float(seconds)
        self.n_fft, self.hop_length = int(n_fft), int(hop_length)
        natural = int(round(self.sr * self.seconds)) // self.hop_length + 1
        self.frames = int(frames) if frames else natural
        self._shape = tuple(shape) if shape is not None else None

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape or (1, self.n_fft // 2 + 1, self.frames)

    def __call__(self, path: str, train: bool = False, generator: torch.Generator | None = None) -> Tensor:
        if self.source == "array":
            spec = spectrogram_from_array(media.load_array(path), path)
        else:
            wave = fit_last_second(media.decode_audio(path, self.sr), int(round(self.sr * self.seconds)), self.sr)
            spec = stft_magnitude(wave, self.n_fft, self.hop_length).unsqueeze(0)
        if spec.shape[1] != self.shape[1]:
            raise DataError(f"{path}: spectrogram has {spec.shape[1]} frequency bins, expected {self.shape[1]} "
                            f"(|STFT| with n_fft {self.n_fft}); shape {tuple(spec.shape)}")
        return fit_frames(spec, self.shape[2])


class LogAudio(Dataset):
    """Applies log(x + 1e-7) to one modality of another dataset's items (``audio_log: true``), so the raw and the
    prepared path share one switch and the cache keeps the magnitude as released."""

    def __init__(self, base: Dataset, modality: str = "audio"):
        self.base, self.modality = base, modality

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        item["inputs"][self.modality] = torch.log(item["inputs"][self.modality].clamp_min(0) + LOG_EPS)
        return item


# ---------------------------------------------------------------------------------------------------------------
# annotation and layout


def _is_prepared(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _PREPARED_MARKERS)


def _candidate_dirs(root: Path, depth: int = 2, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """root and its sub-folders up to `depth` levels, without hidden folders, mmbalance prepared outputs and
    `exclude` (prepare's own --out, which may sit inside root and be half-written)."""
    excluded = {p.resolve() for p in exclude}
    out, level = [root], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                entries = sorted((e for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")),
                                 key=lambda e: e.name)
            except OSError:
                continue
            nxt += [Path(e.path) for e in entries
                    if not _is_prepared(Path(e.path)) and Path(e.path).resolve() not in excluded]
        out += nxt
        level = nxt
    return out


def find_annotation(root: Path, annotation: str | None = None, exclude: tuple[Path, ...] = ()) -> Path:
    """The annotation json: `annotation` (absolute, or relative to root), else the one json with a `database`
    found in root or its sub-folders (two levels)."""
    if annotation:
        path = Path(annotation).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(f"dataset.annotation: annotation json {str(path)!r} does not exist")
        return path
    found = []
    for d in _candidate_dirs(root, exclude=exclude):
        for p in sorted(d.glob("*.json")):
            if p.name in ("classes.json", CACHE_META, "prepare_summary.json"):
                continue
            try:
                if p.stat().st_size and "database" in json.loads(p.read_text()):
                    found.append(p)
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
    order, else the sorted label names. Unknown subsets or labels outside `labels` raise DataError."""
    database = media.read_json_database(path)  # DataError naming the file when it is not such a json
    labels = json.loads(Path(path).read_text()).get("labels")
    entries = []
    for clip_id, e in database.items():
        if not isinstance(e, dict) or "label" not in e or "subset" not in e:
            raise DataError(f"{path}: database[{clip_id!r}] must have \"subset\" and \"label\" (got {e!r})")
        subset = str(e["subset"]).strip().lower()
        if subset not in SUBSETS:
            raise DataError(f"{path}: database[{clip_id!r}] has subset {e['subset']!r}; expected one of "
                            "training, validation, testing")
        entries.append((str(clip_id), str(e["label"]), SUBSETS[subset]))
    if labels:
        classes = [str(c) for c in labels]
        if len(set(classes)) != len(classes):
            raise DataError(f"{path}: the `labels` list has duplicate names")
        unknown = sorted({lab for _, lab, _ in entries} - set(classes))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are used in `database` but missing from `labels`")
    else:
        classes = sorted({lab for _, lab, _ in entries})
    if not entries:
        raise DataError(f"{path}: `database` is empty")
    return classes, entries


@dataclass
class Layout:
    """Which layout matched and where its media live: {modality: folder} and the audio/video file suffixes."""

    name: str
    annotation: Path
    dirs: dict[str, Path]
    notes: dict = field(default_factory=dict)


def _stems(folder: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """{file stem: suffix} for the files of `folder` with one of `suffixes` (first suffix wins)."""
    out: dict[str, str] = {}
    try:
        for e in os.scandir(folder):
            stem, suffix = os.path.splitext(e.name)
            if suffix.lower() in suffixes and (stem not in out or suffixes.index(suffix.lower()) <
                                               suffixes.index(out[stem])):
                out[stem] = suffix.lower()
    except OSError:
        pass
    return out


def _best_dir(dirs: list[Path], ids: set[str], suffixes: tuple[str, ...]) -> tuple[Path | None, dict[str, str]]:
    """The folder holding the most `<id><suffix>` files, and its {stem: suffix}."""
    best, best_stems, best_hits = None, {}, 0
    for d in dirs:
        stems = _stems(d, suffixes)
        hits = len(ids.intersection(stems))
        if hits > best_hits:
            best, best_stems, best_hits = d, stems, hits
    return best, best_stems


def _pinned(root: Path, value: str | None, what: str) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise DataError(f"dataset.{what}: folder {str(path)!r} does not exist")
    return path


def find_clips(root: str | Path, annotation: str | None = None, visual_dir: str | None = None,
               audio_dir: str | None = None, video_dir: str | None = None, exclude: tuple[Path, ...] = ()
               ) -> tuple[list[Clip], list[str], Layout, list[tuple[str, str]]]:
    """Clips with their media (visual/audio sources), class names, the matched layout, and the
    (path, why) of every annotated clip whose media are missing (those clips are left out)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root: BalancedAV folder {str(root)!r} does not exist")
    ann = find_annotation(root, annotation, exclude)
    classes, entries = read_annotation(ann)
    ids = {e[0] for e in entries}
    dirs = _candidate_dirs(root, exclude=exclude)
    pinned = {k: _pinned(root, v, k) for k, v in
              (("visual_dir", visual_dir), ("audio_dir", audio_dir), ("video_dir", video_dir))}

    def locate(key: str, suffixes: tuple[str, ...]) -> tuple[Path | None, dict[str, str]]:
        if pinned[key] is not None:
            return pinned[key], _stems(pinned[key], suffixes)
        if pinned["video_dir"] is not None and key != "video_dir":
            return None, {}  # the user pinned the raw videos: read those
        return _best_dir(dirs, ids, suffixes)

    vis_dir, vis = locate("visual_dir", VISUAL_SUFFIXES)
    aud_dir, aud = locate("audio_dir", AUDIO_SUFFIXES)
    if vis_dir is not None and aud_dir is not None:
        layout = Layout("av_preprocess_tool", ann, {"visual": vis_dir, "audio": aud_dir})
        have = {"visual": vis, "audio": aud}
    else:
        vid_dir, vid = locate("video_dir", VIDEO_SUFFIXES)
        if vid_dir is None:
            example = next(iter(sorted(ids)))
            raise DataError(
                f"{root}: no BalancedAV media found for the {len(ids)} clips of {ann.name}: expected "
                f"<visual>/{example}.hdf5 + <audio>/{example}.pkl (AV_preprocess_tool) or <videos>/{example}.mp4 "
                f"in the root or a sub-folder (found visual: {vis_dir}, audio: {aud_dir}); set dataset.visual_dir/"
                "audio_dir or dataset.video_dir")
        layout = Layout("video", ann, {"visual": vid_dir, "audio": vid_dir})
        have = {"visual": vid, "audio": vid}
    label_of = {c: i for i, c in enumerate(classes)}
    clips, missing = [], []
    for clip_id, label, split in entries:
        gone = [m for m in ("visual", "audio") if clip_id not in have[m]]
        if gone:  # one entry per clip, naming its first missing file
            m = gone[0]
            suffix = (VISUAL_SUFFIXES[0] if m == "visual" else AUDIO_SUFFIXES[0]) \
                if layout.name == "av_preprocess_tool" else VIDEO_SUFFIXES[0]
            missing.append((str(layout.dirs[m] / f"{clip_id}{suffix}"),
                            f"{' and '.join(gone)} file missing for annotated clip {clip_id!r}"))
            continue
        sources = {m: str(layout.dirs[m] / f"{clip_id}{have[m][clip_id]}") for m in ("visual", "audio")}
        clips.append(Clip(clip_id, label_of[label], split, sources))
    if not clips:
        raise DataError(f"{root}: none of the {len(entries)} clips of {ann} has its media in the {layout.name} "
                        f"layout (looked in {', '.join(sorted({str(d) for d in layout.dirs.values()}))})")
    layout.notes = {"annotation": str(ann), **{f"{m}_dir": str(d) for m, d in layout.dirs.items()}}
    return clips, classes, layout, missing


def _readers(layout_name: str, frames: int, image_size: int, augment: str, sr: int, seconds: float, n_fft: int,
             hop_length: int, audio_frames: int | None, audio_shape=None) -> dict:
    video = layout_name == "video"
    return {
        "audio": MagnitudeReader("video" if video else "array", sr, seconds, n_fft, hop_length, audio_frames,
                                 audio_shape),
        "visual": FrameReader("video" if video else "hdf5", frames, image_size, augment, fps=1.0),
    }


def _counts(clips: list[Clip]) -> dict[str, int]:
    return {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------------------------
# the builder


def build_balanced_av(root: str | None = None, prepared: str | None = None, annotation: str | None = None,
                      visual_dir: str | None = None, audio_dir: str | None = None, video_dir: str | None = None,
                      frames: int = 3, image_size: int = 224, augment: str = "crop_flip", audio_log: bool = False,
                      sr: int = 44100, seconds: float = 10.0, n_fft: int = 512, hop_length: int = 440,
                      audio_frames: int | None = 1003, val_fraction: float = 0.1, split_seed: int = 0) -> DataSplits:
    """BalancedAV as DataSplits with modalities audio (spectrogram (1, 257, audio_frames)) and visual (frames
    (frames, 3, S, S)); recipe and layouts in the module docstring.

    root: the raw tree (any accepted layout); prepared: the `mmbalance prepare balanced_av --out` folder (fast
    path; root is then not read). augment: training augmentation of the frames (crop_flip: RandomResizedCrop +
    flip, the OGM-GE/BalanceBenchmark recipe; 'none' to switch it off). audio_log: log(|S| + 1e-7) instead of the
    released magnitude. sr/seconds/n_fft/hop_length: the STFT recipe for the raw `video` layout. audio_frames:
    the spectrogram width every clip is fitted to (1003 = 10 s at 44.1 kHz, hop 440). val_fraction/split_seed:
    only used when the json has no validation clips.
    """
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    if augment not in media.ClipTransform.AUGMENTS:
        raise UserError(f"dataset.augment={augment!r}; expected one of {media.ClipTransform.AUGMENTS}")
    if prepared:
        splits = _build_prepared(Path(prepared).expanduser(), frames, image_size, augment, val_fraction, split_seed)
    else:
        if not root:
            raise UserError("dataset.root is not set: point it at the BalancedAV folder, or set dataset.prepared")
        clips, classes, layout, missing = find_clips(root, annotation, visual_dir, audio_dir, video_dir)
        if missing:
            log.warning("balanced_av: %d annotated clips have missing media and are left out (first: %s)",
                        len(missing), missing[0][0])
        readers = _readers(layout.name, frames, image_size, augment, sr, seconds, n_fft, hop_length, audio_frames)
        notes = {"layout": layout.name, **layout.notes, "clips": _counts(clips), "missing_media": len(missing),
                 "missing_examples": [p for p, _ in missing[:5]], "source": "raw"}
        splits = clip_splits(clips, readers, classes, val_fraction=val_fraction, split_seed=split_seed, notes=notes)
        log.info("balanced_av: layout %s (%s), %d clips, %d with missing media left out", layout.name,
                 layout.annotation, len(clips), len(missing))
    splits.notes["audio_log"] = bool(audio_log)
    if audio_log:
        splits.train, splits.val, splits.test = (LogAudio(d) for d in (splits.train, splits.val, splits.test))
    return splits


def _build_prepared(folder: Path, frames: int, image_size: int, augment: str, val_fraction: float,
                    split_seed: int) -> DataSplits:
    meta_path = folder / CACHE_META
    if not meta_path.is_file():
        raise DataError(f"dataset.prepared {str(folder)!r} is not a prepared BalancedAV cache ({CACHE_META} "
                        "missing); run `mmbalance prepare balanced_av --root RAW --out <folder>`")
    meta = read_json(meta_path)
    if set(meta.get("modalities", {})) != {"audio", "visual"}:
        raise DataError(f"dataset.prepared {str(folder)!r} holds {sorted(meta.get('modalities', {}))}, not "
                        "BalancedAV's audio + visual cache")
    classes = read_classes(folder)
    clips = [Clip(r["id"], int(r["label"]), r["split"], {"visual": r["visual"], "audio": r["audio"]})
             for r in read_manifest(folder)]
    layout = read_json(folder / "prepare_summary.json", optional=True).get("layout", "unknown")
    readers = {"audio": MagnitudeReader(shape=tuple(meta["modalities"]["audio"]["shape"])),
               "visual": FrameReader("hdf5", frames, image_size, augment, fps=1.0)}
    notes = {"layout": f"prepared cache ({layout})", "prepared": str(folder), "clips": _counts(clips),
             "source": "prepared", "cache_frame_size": meta.get("size")}
    return clip_splits(clips, readers, classes, val_fraction=val_fraction, split_seed=split_seed,
                       cache_dir=folder, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# prepare


def _write_hdf5(path: Path, jpegs: list[bytes]) -> None:
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("video", (len(jpegs),), dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for i, b in enumerate(jpegs):
            ds[i] = np.frombuffer(b, dtype=np.uint8)
    os.replace(tmp, path)


def _extract_one(task: tuple) -> tuple[str, str | None, str | None, bool]:
    """Worker: one mp4 -> <out>/visual/<id>.hdf5 (1 fps JPEG bytes) + <out>/audio/<id>.npy (float16 |STFT|).
    Returns (id, error or None, failing path, whether anything was written). Each file is written to a .tmp and
    renamed, so an interrupted run never leaves a file that looks finished."""
    clip_id, video, out, sr, seconds, n_fft, hop, force = task
    out = Path(out)
    vis, aud = out / "visual" / f"{clip_id}.hdf5", out / "audio" / f"{clip_id}.npy"
    wrote = force or not (vis.is_file() and aud.is_file())
    try:
        if force or not vis.is_file():
            jpegs = []
            for img in media.decode_video_frames(video, fps=1.0):
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                jpegs.append(buf.getvalue())
            _write_hdf5(vis, jpegs)
        if force or not aud.is_file():
            reader = MagnitudeReader("video", sr, seconds, n_fft, hop)
            spec = reader(video)[0].numpy().astype(np.float16)
            tmp = aud.with_name(aud.name + ".tmp.npy")
            np.save(tmp, spec)
            os.replace(tmp, aud)
    except DataError as exc:
        return clip_id, str(exc), video, wrote
    return clip_id, None, None, wrote


def prepare(ctx: PrepareContext, annotation: str | None = None, visual_dir: str | None = None,
            audio_dir: str | None = None, video_dir: str | None = None, size: int = 224, max_frames: int = 10,
            sr: int = 44100, seconds: float = 10.0, n_fft: int = 512, hop_length: int = 440,
            audio_frames: int = 1003, cache: bool = True) -> dict:
    """`mmbalance prepare balanced_av`: validate, (video layout) extract hdf5 + npy, manifest, classes, cache.

    Options (--set key=value): annotation/visual_dir/audio_dir/video_dir pin the layout; size: cached frame side
    (224); max_frames: frames kept per clip (10 = 10 s at 1 fps); sr/seconds/n_fft/hop_length: the STFT recipe
    for raw videos (AV_preprocess_tool: 44100, 10, 512, 440); audio_frames: spectrogram width (1003);
    cache: false to stop after the manifest (and the extraction for raw videos).
    """
    clips, classes, layout, missing = find_clips(ctx.root, annotation, visual_dir, audio_dir, video_dir,
                                                 exclude=(ctx.out,))
    for path, why in missing:
        ctx.problem(path, why)
    summary: dict = {"layout": layout.name, "annotation": str(layout.annotation), "classes": len(classes),
                     "missing_media": len(missing)}
    if layout.name == "video":
        for sub in ("visual", "audio"):
            (ctx.out / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.annotation, ctx.out / "annotation.json")
        tasks = [(c.id, c.sources["visual"], str(ctx.out), sr, seconds, n_fft, hop_length, ctx.force) for c in clips]
        failed, existing = set(), 0
        for clip_id, error, path, wrote in ctx.map(_extract_one, tasks, desc="extracting frames and audio"):
            existing += not wrote
            if error is not None:
                failed.add(clip_id)
                ctx.problem(path, error)
        clips = [Clip(c.id, c.label, c.split, {"visual": str(ctx.out / "visual" / f"{c.id}.hdf5"),
                                               "audio": str(ctx.out / "audio" / f"{c.id}.npy")})
                 for c in clips if c.id not in failed]
        summary.update(extracted=len(clips) - existing, extract_skipped_existing=existing, extract_failed=len(failed),
                       extracted_to=f"{ctx.out}/visual/<id>.hdf5, {ctx.out}/audio/<id>.npy")
    write_manifest(ctx.out, ({"id": c.id, "label": c.label, "label_name": classes[c.label], "split": c.split,
                              "visual": c.sources["visual"], "audio": c.sources["audio"]} for c in clips),
                   ["id", "label", "label_name", "split", "visual", "audio"])
    write_classes(ctx.out, classes)
    summary.update(clips=len(clips), **{f"clips_{s}": n for s, n in _counts(clips).items()})
    if cache:
        readers = _readers("av_preprocess_tool", 3, size, "none", sr, seconds, n_fft, hop_length, audio_frames)
        summary.update(write_clip_cache(ctx, clips, readers, size=size, max_frames=max_frames))
    return summary
