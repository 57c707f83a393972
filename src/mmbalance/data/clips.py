"""Audio-visual clip datasets: one list of clips, per-modality readers, and the prepared cache.

Every audio-visual benchmark dataset (CREMA-D, Kinetics-Sounds, VGGSound, BalancedAV, UCF-101) is a list of
`Clip`s -- id, label, split and one source path per modality -- plus a reader per modality that turns a
source into a tensor. Two paths feed the model: `ClipDataset` decodes the user's files on every access;
`CachedClipDataset` reads the memory-mapped arrays `mmbalance prepare` wrote (`write_clip_cache`: frames uint8,
spectrograms float16) with the same sampling and transforms, without any decoding -- so a GPU is not starved by
jpeg/video decoding. `clip_splits` turns a clip list into DataSplits over either path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data import finite, media
from mmbalance.data.batch import DataSplits, ModalitySpec, carved_val_source, stratified_split
from mmbalance.data.prepare import CACHE_META, PreparedFolder
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

SPLITS = ("train", "val", "test")


@dataclass
class Clip:
    """One sample: `sources[modality]` is the path of its file or folder."""

    id: str
    label: int
    split: str  # train | val | test
    sources: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# readers: a clip's sources -> tensor


class FrameReader:
    """Frames reader: T frames sampled segment-wise from a clip, transformed as one clip (see ClipDataset).

    source: 'jpgdir' (a folder of frame images, sorted naturally), 'hdf5' (jpeg bytes in dataset `video`),
    'video' (decoded with PyAV at `fps`). `streams` {source key: file-name prefix}: several folders read as the
    channels of one frame (default: the modality's own source); with `flow` they are the grey u and v planes of
    optical flow, scaled to [-1, 1], u negated on a flip.
    """

    kind = "frames"

    def __init__(self, source: str = "jpgdir", frames: int = 3, size: int = 224, augment: str = "crop_flip",
                 fps: float = 1.0, streams: dict[str, str] | None = None, flow: bool = False):
        if source not in ("jpgdir", "hdf5", "video"):
            raise ValueError(f"FrameReader source={source!r}; expected jpgdir, hdf5 or video")
        if augment not in media.ClipTransform.AUGMENTS:
            raise UserError(f"dataset.augment={augment!r}; expected one of {media.ClipTransform.AUGMENTS}")
        self.source, self.frames, self.size, self.augment, self.fps = source, int(frames), int(size), augment, fps
        self.streams, self.flow = dict(streams or {}), bool(flow)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.frames, 2 if self.flow else 3, self.size, self.size)

    def cache_recipe(self) -> dict:
        """What the cached frames depend on besides the cache's frame size (attribute name -> value): recorded in
        cache.json, so a changed recipe rebuilds the cache and a config that asks for another one is refused. The
        frame count, augmentation and file-name prefixes shape sampling, not the stored frames."""
        return {"flow": self.flow, **({"fps": self.fps} if self.source == "video" else {})}

    def transform(self, train: bool) -> media.ClipTransform:
        return media.ClipTransform(self.size, train, self.augment if train else "none",
                                   "flow" if self.flow else "imagenet", flow_pairs=self.flow)

    def items(self, clip: Clip, modality: str) -> list[list]:
        """Every frame of each stream of the clip, lazily decodable (paths, jpeg bytes or PIL images)."""
        out = []
        for key, prefix in (self.streams or {modality: ""}).items():
            path = clip.sources[key]
            out.append(media.list_frames(path, prefix) if self.source == "jpgdir" else
                       media.images_from_hdf5(path) if self.source == "hdf5" else
                       media.decode_video_frames(path, self.fps))
        return out

    def images(self, items: list[list], j: int) -> list:
        """Frame j of every stream: one RGB image, or the u and v grey images (interleaved, ClipTransform's
        flow_pairs)."""
        mode = "L" if self.flow else "RGB"
        return [x[j] if not isinstance(x[j], (str, Path, bytes)) else media.read_image(x[j], mode) for x in items]

    def cache_rows(self, clip: Clip, modality: str, size: int, max_frames: int) -> tuple[np.ndarray, int, int]:
        """The clip's frames as the cache keeps them: every frame up to `max_frames` (evenly spread over the clip
        when it has more), each resized to size x size; uint8 (max_frames, C, size, size), the count kept and the
        clip's own count."""
        import torchvision.transforms.v2.functional as TF

        items = self.items(clip, modality)
        n = min(map(len, items))
        pick = np.linspace(0, n - 1, max_frames).round().astype(int) if n > max_frames else range(n)
        out = np.zeros((max_frames, self.shape[1], size, size), dtype=np.uint8)
        for k, j in enumerate(pick):
            out[k] = np.concatenate([TF.resize(TF.pil_to_tensor(img), [size, size], antialias=True).numpy()
                                     for img in self.images(items, j)])
        return out, len(pick), n


class AudioReader:
    """Audio reader: a waveform (wav via soundfile, any container via PyAV) turned into a spectrogram by `recipe`,
    or a stored spectrogram array (.npy/.pkl/.pt) used as it is.

    recipes (each dataset's parameters: docs/datasets.md): 'stft_log' (log|STFT| of the clip tiled to `seconds`),
    'stft_magnitude' (AV_preprocess_tool's plain |STFT|: a short clip completed by repeating its last second),
    'kaldi_fbank' (OGM-GE's fbank). Arrays are returned as (1, F, T) float32; `shape` pins them: a clip of another
    shape is a DataError naming it, not a collate crash. `frames` (STFT recipes; 'stft_magnitude' always, by
    default to its own width): every spectrogram, stored ones too, cut or zero-padded (silence) on the right to
    that many columns, so arrays of any width batch together.
    """

    kind = "spectrogram"

    def __init__(self, source: str = "wav", recipe: str = "stft_log", sr: int = 22050, seconds: float = 3.0,
                 n_fft: int = 512, hop_length: int = 353, pad_mode: str = "constant", num_mel_bins: int = 128,
                 target_frames: int = 1024, shape: Sequence[int] | None = None, frames: int | None = None,
                 shape_from: Sequence[str | None] = ()):
        if source not in ("wav", "video", "array"):
            raise ValueError(f"AudioReader source={source!r}; expected wav, video or array")
        if recipe not in ("stft_log", "stft_magnitude", "kaldi_fbank"):
            raise ValueError(f"AudioReader recipe={recipe!r}; expected stft_log, stft_magnitude or kaldi_fbank")
        if frames and recipe == "kaldi_fbank":
            raise ValueError("AudioReader: kaldi_fbank fits its own width (target_frames), not `frames`")
        self.source, self.recipe, self.sr, self.seconds = source, recipe, int(sr), float(seconds)
        self.n_fft, self.hop_length, self.pad_mode = int(n_fft), int(hop_length), pad_mode
        self.num_mel_bins, self.target_frames = int(num_mel_bins), int(target_frames)
        self._shape = tuple(shape) if shape is not None else None
        # stored arrays whose first readable one gives `shape`, read when the shape is first needed: building the
        # reader only to compare its recipe (a prepared folder whose raw tree is gone) reads no file
        self._shape_from = tuple(shape_from) if shape is None else ()
        # the width every spectrogram is fitted to (None: as the recipe makes it, or as stored)
        self.frames = int(frames) if frames else None
        if self.frames is None and recipe == "stft_magnitude":  # AV_preprocess_tool's |STFT| has a fixed width
            self.frames = self.stft_frames

    @property
    def stft_frames(self) -> int:
        """The width of the STFT recipes' spectrogram: a centred STFT of `seconds` at `sr`."""
        return int(round(self.sr * self.seconds)) // self.hop_length + 1

    @property
    def shape(self) -> tuple[int, ...]:
        if self._shape is None and self._shape_from:
            self._shape, self._shape_from = _stored_shape(self._shape_from), ()
        if self._shape is not None:
            return self._shape
        if self.recipe == "kaldi_fbank":
            return (1, self.num_mel_bins, self.target_frames)
        return (1, self.n_fft // 2 + 1, self.frames or self.stft_frames)

    def cache_recipe(self) -> dict:
        """What the cached spectrograms depend on (attribute name -> value), as `FrameReader.cache_recipe`: a stored
        array only on the width it is fitted to; a computed one on every parameter of its recipe."""
        if self.source == "array":
            return {"source": "array", "frames": self.frames, **({"n_fft": self.n_fft} if self.frames else {})}
        if self.recipe == "kaldi_fbank":
            return {"source": self.source, "recipe": self.recipe, "sr": self.sr, "num_mel_bins": self.num_mel_bins,
                    "target_frames": self.target_frames}
        return {"source": self.source, "recipe": self.recipe, "sr": self.sr, "seconds": self.seconds,
                "n_fft": self.n_fft, "hop_length": self.hop_length, "pad_mode": self.pad_mode, "frames": self.frames}

    def __call__(self, path: str, train: bool = False) -> Tensor:
        if self.source == "array":
            x = spectrogram_from_array(media.load_array(path), path)
            if self.frames is not None:
                return self.fit(x, path)
            shape = self.shape if self._shape is not None or self._shape_from else None
            if shape is not None and tuple(x.shape) != shape:
                raise DataError(f"{path}: spectrogram of shape {tuple(x.shape)}, expected {shape} like the "
                                "other clips")
            return x
        wave = media.read_wav(path, self.sr)[0] if self.source == "wav" else media.decode_audio(path, self.sr)
        if self.recipe == "kaldi_fbank":
            return media.kaldi_fbank(wave, self.sr, self.num_mel_bins, self.target_frames)
        length = int(round(self.sr * self.seconds))
        if self.recipe == "stft_magnitude":  # AV_preprocess_tool repeats a short clip's last second, not the clip
            wave = media.fit_length(wave, length, tail=self.sr)
            spec = media.stft_magnitude(wave, self.n_fft, self.hop_length, self.pad_mode).unsqueeze(0)
        else:
            spec = media.stft_log_spectrogram(media.fit_length(wave, length), self.n_fft, self.hop_length,
                                              self.pad_mode)
        return spec if self.frames is None else self.fit(spec, path)

    def fit(self, spec: Tensor, path: str) -> Tensor:
        """`spec` cut, or zero-padded (silence) on the right, to `frames` columns; its frequency bins must be the
        recipe's (a stored array made with another n_fft is a DataError naming the file)."""
        if spec.shape[1] != self.shape[1]:
            raise DataError(f"{path}: spectrogram has {spec.shape[1]} frequency bins, expected {self.shape[1]} "
                            f"(|STFT| with n_fft {self.n_fft}); shape {tuple(spec.shape)}")
        return torch.nn.functional.pad(spec, (0, max(0, self.frames - spec.shape[-1])))[..., :self.frames].contiguous()


# conventional mel-bin counts; a linear STFT has n_fft / 2 + 1 bins (odd: 129, 257, 513), never one of these
MEL_BIN_COUNTS = (40, 64, 80, 96, 128)


def spectrogram_from_array(x: np.ndarray, path: str = "") -> Tensor:
    """A stored spectrogram as (1, F, T) float32 (mmbalance keeps frequency first). The one time-first format in
    the reference repos is OGM-GE's Kaldi fbank, (1024 frames, 128 mel bins): a 2-D array whose second axis is a
    mel-bin count and whose first is longer is transposed; a linear |STFT| such as (257, 188) never is."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise DataError(f"{path}: expected a 2-D spectrogram (or (1, F, T)), got shape {x.shape}")
    if x.shape[1] in MEL_BIN_COUNTS and x.shape[0] > x.shape[1]:
        x = x.T
    if not np.isfinite(x).all():  # a stored array is used as it is: its NaN/Inf would reach the model
        raise DataError(f"{path}: the stored spectrogram holds {int(np.isnan(x).sum())} NaN and "
                        f"{int(np.isinf(x).sum())} Inf values; fix or remove that file")
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0)


def _stored_shape(paths: Sequence[str | None]) -> tuple[int, ...]:
    """The (1, F, T) shape of the first readable stored spectrogram among `paths` (None: a clip without a file)."""
    first_error = None
    for path in paths:
        if path is None:
            continue
        try:
            return tuple(spectrogram_from_array(media.load_array(path), path).shape)
        except DataError as exc:
            first_error = first_error or exc
    raise first_error or DataError("no clip to read a stored spectrogram's shape from")


def av_readers(kinds: dict[str, str], clips: Sequence[Clip], audio: Callable[[str], AudioReader], *,
               frames: int = 3, image_size: int = 224, augment: str = "none", video_fps: float = 1.0) -> dict:
    """Audio, then visual (the fusion order of OGM-GE and BalanceBenchmark): stored spectrogram arrays used as they
    are (pinned to the shape of the first readable one of the first 8 clips), else `audio(kind)`, the dataset's
    recipe; frames of `kinds['visual']`, videos decoded at `video_fps`."""
    sound = (AudioReader(source="array", shape_from=[c.sources.get("audio") for c in clips[:8]])
             if kinds["audio"] == "array" else audio(kinds["audio"]))
    return {"audio": sound, "visual": FrameReader(kinds["visual"], frames, image_size, augment, video_fps)}


Reader = FrameReader | AudioReader


# ---------------------------------------------------------------------------------------------------------------
# datasets


def _frames_input(reader: FrameReader, frames: list, train: bool, drawn: dict, generator) -> Tensor:
    """A modality's sampled frames through its transform with the clip's one augmentation draw: the first frame
    modality draws it, the others reuse it (UCF-101: one flip and crop for RGB and optical flow)."""
    tf, hw = reader.transform(train), media.frame_size(frames[0])
    if not drawn:
        drawn.update(params=tf.draw(*hw, generator), hw=hw)
    return tf(frames, params=media.move_crop(drawn["params"], drawn["hw"], hw))


class ClipDataset(Dataset):
    """Decodes each clip's sources on access. Items follow the batch format ({inputs, label, index})."""

    def __init__(self, clips: Sequence[Clip], readers: dict[str, Reader], train: bool):
        self.clips, self.readers, self.train = list(clips), readers, train

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def item(self, i: int, generator: torch.Generator | None = None) -> dict:
        """Item i, its frame sampling and augmentation drawn from `generator` (default: torch's global one)."""
        clip, inputs, drawn = self.clips[i], {}, {}
        for m, reader in self.readers.items():
            try:
                if reader.kind == "frames":  # sampled segment-wise over the clip's frames
                    items = reader.items(clip, m)
                    idx = media.segment_indices(min(map(len, items)), reader.frames, self.train, generator)
                    frames = [image for j in idx for image in reader.images(items, j)]
                    inputs[m] = _frames_input(reader, frames, self.train, drawn, generator)
                else:
                    inputs[m] = reader(clip.sources[m], self.train)
            except DataError as exc:
                raise DataError(f"clip {clip.id!r} ({m}): {exc}") from None
        return {"inputs": inputs, "label": clip.label, "index": i}


class CachedClipDataset(Dataset):
    """Reads the prepared cache (see `write_clip_cache`) with the same sampling and transforms as the raw path."""

    def __init__(self, cache_dir: str | Path, rows: np.ndarray, clips: Sequence[Clip], readers: dict[str, Reader],
                 train: bool):
        self.cache_dir, self.rows, self.clips = Path(cache_dir), np.asarray(rows), list(clips)
        self.labels, self.readers, self.train = np.array([c.label for c in self.clips]), readers, train
        self._arrays: dict[str, np.ndarray] | None = None  # opened lazily: memmaps do not pickle to workers well

    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = {m: np.load(self.cache_dir / f"{m}.npy", mmap_mode="r") for m in self.readers}
            self._arrays["_n_frames"] = np.load(self.cache_dir / "n_frames.npy")
            # n_frames' columns follow the cache's modalities: a run may read fewer than were cached
            self._arrays["_columns"] = list(PreparedFolder(self.cache_dir).json(CACHE_META)["modalities"])
        return self._arrays

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def item(self, i: int, generator: torch.Generator | None = None) -> dict:
        row, arrays, inputs, drawn = int(self.rows[i]), self.arrays(), {}, {}
        for m, reader in self.readers.items():
            if reader.kind == "frames":  # uint8 (k, C, S, S), sampled segment-wise like the raw path
                n = int(arrays["_n_frames"][row, arrays["_columns"].index(m)])
                idx = media.segment_indices(max(n, 1), reader.frames, self.train, generator)
                frames = torch.from_numpy(np.ascontiguousarray(arrays[m][row, idx]))
                inputs[m] = _frames_input(reader, list(frames), self.train, drawn, generator)
            else:  # copy the float16 row out of the memmap, then widen with torch (4x faster than numpy's cast)
                inputs[m] = torch.from_numpy(np.array(arrays[m][row])).float()
        return {"inputs": inputs, "label": int(self.labels[i]), "index": i}


class ModalityMap(Dataset):
    """Changes one modality of another dataset's items (`apply`, defined by a subclass), so that the raw and the
    prepared path share one switch; the wrapped dataset's attributes (clips, rows, ...) show through."""

    def __init__(self, base: Dataset, modality: str = "audio", train: bool = False):
        self.base, self.modality, self.train = base, modality, bool(train)

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        item["inputs"][self.modality] = self.apply(item["inputs"][self.modality])
        return item

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


# ---------------------------------------------------------------------------------------------------------------
# the prepared cache


def _source_path(clip: Clip, modality: str, reader: Reader, error: str = "") -> str:
    """The file or folder of `modality` that prepare_report.txt names for a clip it leaves out (its `path` column):
    of a modality read from several streams (optical flow's u and v), the one the error names."""
    keys = list(getattr(reader, "streams", None) or {modality: ""})
    paths = [clip.sources[k] for k in keys if k in clip.sources]
    return next((p for p in paths if p in error), paths[0] if paths else clip.id)


def _cache_one(task: tuple) -> tuple[int, str | None, str | None, bool]:
    """Worker: decode one clip and write its rows into the cache memmaps. Returns (row, failing path or None, error
    or None, whether a frame modality had more frames than the cache keeps)."""
    row, clip, readers, cache_dir, size, max_frames, shapes = task
    subsampled = False
    for j, (m, reader) in enumerate(readers.items()):
        try:
            if reader.kind == "frames":
                value, n, total = reader.cache_rows(clip, m, size, max_frames)
                subsampled |= total > n
                counts = np.load(Path(cache_dir) / "n_frames.npy", mmap_mode="r+")
                counts[row, j] = n
                counts.flush()
            else:
                value = reader(clip.sources[m], train=False).numpy()
                if value.shape != shapes[m]:
                    return row, clip.sources[m], (f"clip {clip.id} ({m}): spectrogram shape {value.shape}, expected "
                                                  f"{shapes[m]} like the other clips"), False
                value = value.astype(np.float16)
                if not np.isfinite(value).all():  # float16 ends at 65504: a loud magnitude overflows to Inf
                    return row, clip.sources[m], (f"clip {clip.id} ({m}): its spectrogram holds "
                                                  f"{int(np.isnan(value).sum())} NaN and {int(np.isinf(value).sum())} "
                                                  "Inf values in float16"), False
        except DataError as exc:
            return row, _source_path(clip, m, reader, str(exc)), f"clip {clip.id} ({m}): {exc}", False
        array = np.load(Path(cache_dir) / f"{m}.npy", mmap_mode="r+")
        array[row] = value
        array.flush()
    return row, None, None, subsampled


def _stamp(path: str) -> str:
    """A file's size and modification time; for a folder (frames), those of every entry in it, by name: a frame
    overwritten in place changes neither the folder's size nor its modification time."""
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return f"{st.st_size}:{st.st_mtime_ns}"
        with os.scandir(path) as it:  # DirEntry.stat() is cached: one stat per entry
            entries = [f"{e.name}/{e.stat().st_size}:{e.stat().st_mtime_ns}" for e in it]
    except OSError:  # a file gone since the clips were listed: its clip fails to decode and is reported
        return "missing"
    return "dir[" + "|".join(sorted(entries)) + "]"


def sources_digest(clips: Sequence[Clip]) -> str:
    """A digest of every clip's media: its id, each modality's path, and that file's size and modification time
    (of a frame folder, every file's name, size and modification time). cache.json keeps it, so a cache is rebuilt
    when the clips come from another tree, another media kind or files changed since (a re-extraction, a replaced
    download, frames overwritten in place), never mixed with the new media."""
    digest = hashlib.sha1()
    for clip in clips:
        digest.update(clip.id.encode() + b"\0")
        for key, path in sorted(clip.sources.items()):  # the same file however rooted
            digest.update(f"{key}={os.path.abspath(path)}|{_stamp(path)}\0".encode())
    return digest.hexdigest()


def cache_files(meta: dict | None) -> list[str]:
    """The files of a clip cache (those `write_clip_cache` writes), by the modalities its cache.json names."""
    mods = list((meta or {}).get("modalities", {}))
    return [CACHE_META, "done.npy", "n_frames.npy", *(f"{m}.npy" for m in mods),
            *(finite.sidecar_path(Path(f"{m}.npy")).name for m in mods)]


def write_clip_cache(ctx, clips: Sequence[Clip], readers: dict[str, Reader], size: int = 224,
                     max_frames: int = 10) -> dict:
    """Decode every clip once into memory-mapped arrays in ctx.out (resumable: rows already done are skipped).

    Frames: `FrameReader.cache_rows`, uint8 (N, max_frames, C, S, S) in `<modality>.npy`, the true counts in
    `n_frames.npy`; spectrograms: the reader's evaluation output (deterministic), float16 (N, 1, F, T). Clips that
    fail to decode, or whose spectrogram is not finite, are reported with ctx.problem and stay not-done in
    done.npy: the loaders skip them, with a count, and the next prepare retries them.

    cache.json records what the rows were made from (`meta`); rows are resumed only when all of it is unchanged,
    so one cache never holds rows of two builds.
    """
    from numpy.lib.format import open_memmap

    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = PreparedFolder(out)
    n = len(clips)
    shapes = {m: (max_frames, r.shape[1], size, size) if r.kind == "frames" else tuple(r.shape)
              for m, r in readers.items()}
    meta = {"ids": [c.id for c in clips], "size": size, "max_frames": max_frames,
            "modalities": {m: {"kind": r.kind, "shape": list(shapes[m])} for m, r in readers.items()},
            "recipe": {m: r.cache_recipe() for m, r in readers.items()}, "sources": sources_digest(clips)}
    meta_path, done_path = out / CACHE_META, out / "done.npy"
    try:  # an unreadable cache.json means the cache is rebuilt, not trusted
        fresh = ctx.force or json.loads(meta_path.read_text()) != meta or not done_path.is_file()
    except (OSError, ValueError):
        fresh = True
    if fresh:
        # cache.json goes first and comes back last: a prepare stopped in between leaves no cache.json, so neither
        # a loader nor the next prepare takes the blank rows for the old build's
        meta_path.unlink(missing_ok=True)
        for m, shape in shapes.items():
            open_memmap(out / f"{m}.npy", mode="w+", dtype=np.uint8 if len(shape) == 4 else np.float16,
                        shape=(n, *shape)).flush()
        folder.write_array("n_frames.npy", np.zeros((n, len(readers)), dtype=np.int16))
        folder.write_array("done.npy", np.zeros(n, dtype=bool))
        folder.write_text(CACHE_META, json.dumps(meta))
    done = np.load(done_path)
    todo = [i for i in range(n) if not done[i]]
    failed = subsampled = 0
    for start in range(0, len(todo), 256):  # done.npy is saved after every chunk: an interrupted prepare resumes
        tasks = [(i, clips[i], readers, str(out), size, max_frames, shapes) for i in todo[start:start + 256]]
        for row, path, error, fewer in ctx.map(_cache_one, tasks, desc="caching clips"):
            subsampled += fewer
            if error is None:
                done[row] = True
            else:
                failed += 1
                ctx.problem(path, error)
        folder.write_array("done.npy", done)
    # Scan each array once here (it is fresh in the page cache) and record the result next to it. Rows that hold
    # NaN/Inf although done (cached before this check, or changed since) are reported and marked not-done.
    dropped: set[int] = set()
    for m, reader in readers.items():
        for row, (nan, inf) in sorted(finite.cached_row_counts(out / f"{m}.npy").items()):
            if done[row]:
                ctx.problem(_source_path(clips[row], m, reader), f"clip {clips[row].id} ({m}): its cached row "
                            f"holds {nan} NaN and {inf} Inf values; left out")
                dropped.add(row)
    if dropped:
        done[sorted(dropped)] = False
        folder.write_array("done.npy", done)
    if subsampled:  # segment sampling then draws from the kept frames, not from all the clip's frames
        log.warning("%s: %d of the %d clips cached now have more than max_frames=%d frames: the cache keeps %d of "
                    "each, evenly spread, and training samples its frames from those (the raw path samples from all "
                    "of them); prepare with a larger --set max_frames for the raw path's sampling", out, subsampled,
                    len(todo), max_frames, max_frames)
    usable = {s: int(sum(bool(done[i]) for i, c in enumerate(clips) if c.split == s)) for s in SPLITS}
    return {"cached": int(done.sum()), "cache_failed": failed, "cache_skipped_existing": n - len(todo),
            "cache_clips_subsampled": subsampled,
            "cache_nonfinite": len(dropped), "cache_frame_size": size, "cache_max_frames": max_frames,
            "usable_clips": usable}


def load_clip_cache(cache_dir: str | Path, clips: Sequence[Clip]) -> tuple[np.ndarray, list[Clip]]:
    """Map clips to cache rows by id; clips whose row is not done (they failed to decode at prepare, and are listed
    in its prepare_report.txt) are dropped. A clip the cache does not hold at all is a DataError: the cache was
    written for another clip list than the one given, and leaving such clips out would shrink the splits silently."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / CACHE_META
    if not meta_path.is_file():
        raise DataError(f"{cache_dir}: no prepared cache ({CACHE_META} missing); run `mmbalance prepare` first")
    meta = PreparedFolder(cache_dir).json(CACHE_META)
    done = finite.open_npy(cache_dir / "done.npy", mmap_mode=None)
    if not isinstance(meta, dict) or len(meta.get("ids", ())) != len(done):
        raise DataError(f"{meta_path}: its `ids` do not match {cache_dir / 'done.npy'}; run `mmbalance prepare` "
                        "again with --force")
    row_of = {i: r for r, i in enumerate(meta["ids"])}
    absent = [c.id for c in clips if c.id not in row_of]
    if absent:
        raise DataError(f"{meta_path}: the cache holds no row for {len(absent)} of the clips listed (e.g. "
                        f"{', '.join(absent[:3])}): it was written for another clip list than manifest.csv; run "
                        "`mmbalance prepare` again")
    kept = [c for c in clips if done[row_of[c.id]]]
    return np.array([row_of[c.id] for c in kept], dtype=np.int64), kept


# ---------------------------------------------------------------------------------------------------------------
# splits


def clip_splits(clips: Sequence[Clip], readers: dict[str, Reader], class_names: list[str], *, val_fraction: float,
                split_seed: int, cache_dir: str | Path | None = None, notes: dict | None = None) -> DataSplits:
    """DataSplits from clips whose split is train/val/test. Without any 'val' clip, validation is carved from
    train (stratified, seeded, `val_fraction`: the settled choice); otherwise the dataset's own is used.

    `cache_dir`: read the prepared cache there (clips it lacks -- they failed to decode at prepare -- are left
    out, counted in the notes and the log, never silently) after the finite-input check of the rows used."""
    by_split = {s: [c for c in clips if c.split == s] for s in SPLITS}
    if not by_split["train"] or not by_split["test"]:
        raise DataError(f"the clip list has {len(by_split['train'])} train and {len(by_split['test'])} test clips; "
                        "both must be non-empty")
    if by_split["val"]:
        val_source = "the dataset's own validation split"
    else:
        train = by_split["train"]
        labels = np.array([c.label for c in train])
        keep, held = stratified_split(labels, val_fraction, split_seed)
        by_split["train"], by_split["val"] = [train[i] for i in keep], [train[i] for i in held]
        val_source = carved_val_source(labels, held, val_fraction, split_seed)
    notes = dict(notes or {})
    if cache_dir is None:
        datasets = {s: ClipDataset(by_split[s], readers, s == "train") for s in SPLITS}
    else:
        datasets, uncached = {}, []
        for s in SPLITS:
            rows, kept = load_clip_cache(cache_dir, by_split[s])
            kept_ids = {c.id for c in kept}
            uncached += [c.id for c in by_split[s] if c.id not in kept_ids]
            datasets[s] = CachedClipDataset(cache_dir, rows, kept, readers, s == "train")
        if uncached:
            log.warning("%s: %d clips of manifest.csv are left out: prepare could not cache them (they failed to "
                        "decode or were not finite; each is listed in %s): %s%s", cache_dir, len(uncached),
                        Path(cache_dir) / "prepare_report.txt", ", ".join(uncached[:5]),
                        " ..." if len(uncached) > 5 else "")
        notes.update(uncached_clips=len(uncached), cached_clips=sum(len(d) for d in datasets.values()))
        # uint8 frames hold no NaN and are not read, but this opens every array: a broken one fails here
        used = [(m, s, Path(cache_dir) / f"{m}.npy", d.rows) for m in readers for s, d in datasets.items()]
        finite.check_cached(f"prepared cache {str(cache_dir)!r} (<modality>.npy)", used,
                            "the cache was changed after `mmbalance prepare` checked it; run prepare again (it lists, "
                            "leaves out and re-decodes such clips)")
    specs = {m: ModalitySpec(r.kind, tuple(r.shape)) for m, r in readers.items()}
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], specs, len(class_names),
                      list(class_names), val_source=val_source, notes=notes)
