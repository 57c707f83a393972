"""Media decoding, frame sampling, clip transforms and audio recipes shared by every benchmark dataset.

Every reader raises a `DataError` naming the file, so loaders and `prepare` can report and skip bad media. The
module exists to avoid the reference loaders' pitfalls (unsorted frame lists, per-frame augmentation, flow not
flipped with its RGB clip, librosa's changed STFT padding); docs/datasets.md, "Common to the audio-visual
datasets", states the rules it follows.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mmbalance.data.prepare import record_listing
from mmbalance.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet normalisation of 0..255 values as one multiply-add: x / (255 std) - mean / std
_IMAGENET_SCALE = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
_IMAGENET_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# -- files and frames
def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: frame_2.jpg < frame_10.jpg."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]


def list_frames(folder: str | Path, prefix: str = "") -> list[Path]:
    """The image files in `folder` (optionally only names starting with `prefix`), sorted naturally."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"frame folder {str(folder)!r} does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name.startswith(prefix)]
    if not files:
        raise DataError(f"frame folder {str(folder)!r} has no image files"
                        + (f" starting with {prefix!r}" if prefix else ""))
    return sorted(files, key=lambda p: natural_key(p.name))


def read_image(source: str | Path | bytes, mode: str = "RGB"):
    """A PIL image from a file path or encoded bytes, converted to `mode` ('RGB' or 'L')."""
    from PIL import Image, UnidentifiedImageError

    encoded = isinstance(source, (bytes, bytearray, np.ndarray))
    try:
        with Image.open(io.BytesIO(bytes(source)) if encoded else source) as img:
            return img.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {'jpeg bytes' if encoded else repr(str(source))}: {exc}") from None


def images_from_hdf5(path: str | Path) -> list[bytes]:
    """The encoded frames of AV_preprocess_tool's HDF5 format: dataset `video` = one JPEG byte string per frame."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "video" not in f:
                raise DataError(f"{path}: HDF5 file has no dataset 'video' (found {sorted(f.keys())})")
            return [bytes(np.asarray(x, dtype=np.uint8)) for x in f["video"][()]]
    except (OSError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read HDF5 frames from {str(path)!r}: {exc}") from None


def load_array(path: str | Path) -> np.ndarray:
    """A pre-computed feature array from .npy, .pkl/.pickle or .pt (the formats the reference repos use)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix in (".pkl", ".pickle"):
            with path.open("rb") as f:
                value = pickle.load(f)
        elif path.suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"{path}: unknown feature format {path.suffix!r}; expected .npy, .pkl or .pt")
    except FileNotFoundError:
        raise DataError(f"feature file {str(path)!r} does not exist") from None
    # IndexError/KeyError/TypeError/AttributeError: what torch's weights-only unpickler and pickle raise on garbage
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, RuntimeError, IndexError, KeyError, TypeError,
            AttributeError) as exc:
        raise DataError(f"cannot read feature file {str(path)!r}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# -- audio and video decoding
@functools.lru_cache(maxsize=16)
def _resampler(sr: int, target: int):
    """torchaudio's sinc resampler with its kernel built once per rate pair (the functional form rebuilds it on
    every call, 3/4 of the cost of resampling a CREMA-D clip)."""
    import torchaudio.transforms as AT

    return AT.Resample(sr, target)


def read_wav(path: str | Path, sr: int | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate (resampled to `sr` when given), via soundfile."""
    import soundfile as sf

    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, sf.LibsndfileError) as exc:
        raise DataError(f"cannot read audio file {str(path)!r}: {exc}") from None
    wave, rate = wave.mean(axis=1), int(rate)
    if sr is None or rate == sr:
        return wave, rate
    with torch.no_grad():
        return _resampler(rate, int(sr))(torch.from_numpy(wave)).numpy(), sr


def decode_audio(path: str | Path, sr: int = 16000) -> np.ndarray:
    """Mono float32 samples at `sr` from any container PyAV reads (mp4, flv, mp3, wav ...)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            chunks = [out.to_ndarray().reshape(-1) for frame in itertools.chain(container.decode(audio=0), [None])
                      for out in resampler.resample(frame)]  # None: flush the resampler
    except av.error.FFmpegError as exc:
        raise DataError(f"cannot decode audio from {str(path)!r}: {exc}") from None
    if not chunks:
        raise DataError(f"{path}: the audio stream has no samples")
    return np.concatenate(chunks).astype(np.float32)


def decode_video_frames(path: str | Path, fps: float = 1.0) -> list:
    """PIL RGB frames sampled at `fps`: the first decoded frame at or after each time (i + 0.5) / fps,
    i.e. the centre of each 1/fps interval (AV_preprocess_tool's convention)."""
    import av

    if not fps > 0:  # the sampling times are multiples of 1 / fps (prepare's --set options are checked before)
        raise DataError(f"cannot sample frames of {str(path)!r} at fps={fps}; expected a rate > 0")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            next_t = 0.5 / fps
            for frame in container.decode(stream):
                if (frame.time or 0.0) + 1e-6 >= next_t:
                    frames.append(frame.to_image())
                    next_t += 1.0 / fps
            if not frames:  # clip shorter than half an interval: keep its first frame
                container.seek(0)
                frames = [frame.to_image() for frame in itertools.islice(container.decode(stream), 1)]
    except av.error.FFmpegError as exc:
        raise DataError(f"cannot decode video {str(path)!r}: {exc}") from None
    if not frames:
        raise DataError(f"{path}: the video stream has no frames")
    return frames


def extract_frames(video: str | Path, dest: str | Path, fps: float = 1.0, short_side: int = 0) -> int:
    """Decode `video` at `fps` into dest/frame_00001.jpg ... (ffmpeg's `-vf fps=1 frame_%05d.jpg` naming, which
    MMPareto / BalanceBenchmark read), optionally shrunk to `short_side`, replacing dest. Written to a temporary
    folder and renamed, so a folder that exists is complete. Returns the number of frames written; raises DataError
    when the video cannot be decoded."""
    dest = Path(dest)
    images = decode_video_frames(video, fps)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, img in enumerate(images, 1):
        if short_side and min(img.size) > short_side:
            scale = short_side / min(img.size)
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)))
        img.save(tmp / f"frame_{k:05d}.jpg", quality=95)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return len(images)


def extract_wav(video: str | Path, wav: str | Path, sr: int = 16000) -> None:
    """The audio track of `video` as a mono 16-bit wav at `sr` (like `ffmpeg -acodec pcm_s16le -ar 16000`),
    written atomically over `wav`."""
    import soundfile as sf

    wav = Path(wav)
    wave = decode_audio(video, sr)
    wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(wav.name + ".tmp.wav")
    sf.write(tmp, np.clip(wave, -1.0, 1.0), sr, subtype="PCM_16")
    os.replace(tmp, wav)


# -- audio recipes
def fit_length(wave: np.ndarray, length: int, tail: int | None = None) -> np.ndarray:
    """Exactly `length` samples: a short clip is completed by repeating it (OGM-GE's tiling), or only its last
    `tail` samples (AV_preprocess_tool repeats the last second); a long one is cut."""
    if len(wave) == 0:
        raise DataError("empty audio clip")
    if len(wave) < length:
        repeat = wave[-tail:] if tail else wave
        wave = np.concatenate([wave, np.tile(repeat, -(-(length - len(wave)) // len(repeat)))])
    return wave[:length]


def stft_magnitude(wave: np.ndarray, n_fft: int = 512, hop_length: int = 440, pad_mode: str = "reflect") -> Tensor:
    """|STFT| (n_fft // 2 + 1, frames) with a Hann window, centred with an explicit `pad_mode` ('constant'
    matches librosa >= 0.10, 'reflect' older librosa and AV_preprocess_tool)."""
    x = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
    return torch.stft(x, n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft), center=True,
                      pad_mode=pad_mode, return_complex=True).abs()


def stft_log_spectrogram(wave: np.ndarray, n_fft: int = 512, hop_length: int = 353, pad_mode: str = "constant",
                         eps: float = 1e-7) -> Tensor:
    """log(|STFT| + eps) of the wave clipped to [-1, 1], shape (1, n_fft // 2 + 1, frames): OGM-GE's CREMA-D and
    VGGSound recipe (docs/datasets.md gives their parameters)."""
    return torch.log(stft_magnitude(np.clip(wave, -1.0, 1.0), n_fft, hop_length, pad_mode) + eps).unsqueeze(0)


# OGM-GE's KS recipe normalises the fbank with the AudioSet statistics (mean -4.503877, std 5.141276)
FBANK_MEAN, FBANK_STD = -4.503877, 5.141276


def kaldi_fbank(wave: np.ndarray, sr: int, num_mel_bins: int = 128, target_frames: int = 1024) -> Tensor:
    """OGM-GE's Kinetics-Sounds Kaldi log-mel fbank, zero-padded or cut to `target_frames` and normalised as
    (x - mean) / (2 std); (1, num_mel_bins, target_frames), frequency first like every spectrogram in mmbalance
    (OGM-GE stores (frames, bins))."""
    from torchaudio.compliance import kaldi

    x = torch.as_tensor(wave, dtype=torch.float32)
    fb = kaldi.fbank((x - x.mean()).unsqueeze(0), htk_compat=True, sample_frequency=sr, use_energy=False,
                     window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)
    fb = torch.nn.functional.pad(fb, (0, 0, 0, max(0, target_frames - fb.shape[0])))[:target_frames]
    return ((fb - FBANK_MEAN) / (FBANK_STD * 2)).T.unsqueeze(0).contiguous()


# -- sampling and transforms
def segment_indices(n: int, k: int, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """k frame indices out of n: split [0, n) into k equal segments and take a random frame of each in
    training, its centre frame at evaluation (deterministic). With n < k, frames repeat in order."""
    if n <= 0:
        raise ValueError("segment_indices: a clip needs at least one frame")
    edges = np.floor(np.linspace(0, n, k + 1)).astype(int).tolist()  # ends with n exactly
    out = []
    for lo, hi in zip(edges, edges[1:]):
        hi = max(hi, lo + 1)  # a segment shorter than a frame (n < k) takes the frame it starts in
        out.append(lo + int(torch.randint(hi - lo, (1,), generator=generator)) if train else (lo + hi - 1) // 2)
    return out


def frame_size(frame) -> tuple[int, int]:
    """(height, width) of a PIL image or a (C, H, W) tensor."""
    return tuple(frame.shape[-2:]) if isinstance(frame, Tensor) else (frame.height, frame.width)


def move_crop(params: dict, src: tuple[int, int], dst: tuple[int, int]) -> dict:
    """Augmentation parameters drawn on a src-sized frame, for a dst-sized one: the crop box (top, left, h, w)
    is scaled (RGB and flow jpgs may differ in size); flip and angle carry over unchanged."""
    if params.get("crop") is None or src == dst:
        return params
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    top, left, h, w = params["crop"]
    return {**params, "crop": (int(round(top * sy)), int(round(left * sx)), max(1, int(round(h * sy))),
                               max(1, int(round(w * sx))))}


class ClipTransform:
    """Turns the sampled frames of one clip into a (T, C, S, S) float tensor, with ONE augmentation per clip.

    `augment` (training only; evaluation is always a deterministic Resize((S, S))):
      * 'crop_flip'   RandomResizedCrop(S) + horizontal flip (OGM-GE / BalanceBenchmark audio-visual recipe);
      * 'resize_flip' Resize((S, S)) + horizontal flip (BalanceBenchmark UCF-101);
      * 'rotate_flip' RandomRotation(30) + Resize((S, S)) + flip (BalanceBenchmark FOOD-101);
      * 'none'        Resize((S, S)).
    `normalize`: 'imagenet' (RGB), 'flow' (x / 127.5 - 1, so zero motion is 0), or 'none' (x / 255).
    `flow_pairs=True` means frames come as interleaved (u, v) grey images (or (2, H, W) tensors): a flip mirrors
    both and negates u (the horizontal displacement), which keeps the flow consistent with a flipped RGB clip.
    Frames may be PIL images or uint8 tensors (C, H, W) (the prepared cache).
    """

    AUGMENTS = ("crop_flip", "resize_flip", "rotate_flip", "none")

    def __init__(self, size: int = 224, train: bool = False, augment: str = "crop_flip",
                 normalize: str = "imagenet", flow_pairs: bool = False):
        if augment not in self.AUGMENTS:
            raise ValueError(f"ClipTransform augment={augment!r}; expected one of {self.AUGMENTS}")
        if normalize not in ("imagenet", "flow", "none"):
            raise ValueError(f"ClipTransform normalize={normalize!r}; expected imagenet, flow or none")
        self.size, self.train, self.augment = int(size), bool(train), augment
        self.normalize, self.flow_pairs = normalize, flow_pairs

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """The clip's augmentation parameters (drawn once, applied to every frame)."""
        p: dict = {"flip": False, "crop": None, "angle": 0.0}
        if not self.train or self.augment == "none":
            return p
        p["flip"] = bool(torch.rand(1, generator=generator) < 0.5)
        if self.augment == "crop_flip":
            p["crop"] = _random_resized_crop_box(height, width, generator)
        elif self.augment == "rotate_flip":
            p["angle"] = float(torch.empty(1).uniform_(-30.0, 30.0, generator=generator))
        return p

    def __call__(self, frames: Sequence, generator: torch.Generator | None = None,
                 params: dict | None = None) -> Tensor:
        """`params`: augmentation parameters from `draw` to use instead of drawing new ones, so two streams of
        one clip (UCF-101 RGB and optical flow) share one flip/crop."""
        import torchvision.transforms.v2.functional as TF

        x = torch.stack([f if isinstance(f, Tensor) else TF.pil_to_tensor(f) for f in frames])  # (N, C, H, W) uint8
        p = self.draw(x.shape[-2], x.shape[-1], generator) if params is None else params
        if p["angle"]:
            x = TF.rotate(x, p["angle"])
        if p["crop"] is not None:
            top, left, h, w = p["crop"]
            x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        elif x.shape[-2:] != (self.size, self.size):
            x = TF.resize(x, [self.size, self.size], antialias=True)
        if p["flip"]:
            x = x.flip(-1)
        x = x.float() if x.dtype != torch.float32 else x.clone()  # a fresh tensor: normalised in place below
        if self.flow_pairs:
            x = x.reshape(-1, 1, self.size, self.size)  # interleaved u, v (cached flow comes as (2, S, S) frames)
            if p["flip"]:
                x[0::2] = 255.0 - x[0::2]  # u: horizontal motion changes sign under a mirror
            x = x.reshape(-1, 2, self.size, self.size)  # (T, 2, S, S)
        if self.normalize == "imagenet":  # (x - 255 mean) / (255 std), in place (no temporaries)
            x.mul_(_IMAGENET_SCALE).add_(_IMAGENET_SHIFT)
        elif self.normalize == "flow":
            x.div_(127.5).sub_(1.0)
        else:
            x.div_(255.0)
        return x


# the builders' choices of augmentation and of torch.stft's centre padding, as config validation checks them
Augment = Literal[ClipTransform.AUGMENTS]
PadMode = Literal["reflect", "constant", "replicate", "circular"]


def _random_resized_crop_box(height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box rule with its defaults (scale 0.08-1, ratio 3/4-4/3), drawn from
    `generator` so a clip's frames share it."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.08, 1.0, generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


# -- split files
_HEADER_WORDS = {"label", "labels", "class", "emotion", "emo", "category", "target", "y", "id", "name", "path"}


def read_split_file(path: str | Path) -> list[tuple[str, str]]:
    """(id, label) pairs from a split file in any of the text formats the reference repos ship: comma-separated
    csv with or without a header (OGM-GE CREMA-D `<clip>,<EMO>`; KS `<id>,10,<label>`), whitespace-separated lines
    (BalanceBenchmark KS `<id> <label>`; UCF-101 `Class/v_x.avi 1`) or one id per line (UCF-101 testlist: label
    '', the caller derives it). The id is the first field, the label the last; a first row with a header word
    first or last is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {str(path)!r} does not exist")
    record_listing(path)
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    comma = bool(lines) and "," in lines[0]
    rows = []
    for n, fields in enumerate(csv.reader(io.StringIO(text)) if comma else map(str.split, lines)):
        fields = [f.strip() for f in fields if f.strip() != ""]
        if fields and not (n == 0 and {fields[0].lower(), fields[-1].lower()} & _HEADER_WORDS):
            rows.append((fields[0], fields[-1] if len(fields) > 1 else ""))
    if not rows:
        raise DataError(f"split file {str(path)!r} has no entries")
    return rows


SUBSETS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "validate": "val",
           "test": "test", "testing": "test"}


def read_annotation(path: str | Path) -> tuple[list[tuple[str, str, str]], list | None]:
    """(id, label name, split) of every clip of an ActivityNet-style annotation json (BML's KS_train_val.json,
    BalancedAV's: ``{"labels": [...], "database": {id: {"subset", "label"}}}``), and its `labels` list if any.
    The subset is one of `SUBSETS`; the label is `label`, or, in ActivityNet proper, `annotations[0].label`."""
    path = Path(path)
    record_listing(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data["database"], dict):
            raise TypeError("`database` is not an object")
    except FileNotFoundError:
        raise DataError(f"annotation file {str(path)!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected json {{\"database\": {{id: {{\"subset\", \"label\"}}}}}} ({exc})") from None
    out = []
    for key, entry in data["database"].items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: database entry {key!r} is not an object")
        split = SUBSETS.get(str(entry.get("subset", "")).strip().lower())
        if split is None:
            raise DataError(f"{path}: clip {key!r} has subset {entry.get('subset')!r}; expected training, "
                            "validation or testing")
        label = entry.get("label")
        if label is None and entry.get("annotations"):
            label = entry["annotations"][0].get("label")
        if label is None:
            raise DataError(f"{path}: clip {key!r} has no label")
        out.append((str(key), str(label), split))
    return out, data.get("labels")
