"""Tiny REAL audio-visual media for tests: wav files, jpg frame folders, flv/mp4 videos, HDF5 of jpeg bytes.

Every writer produces a file that the real decoders read (soundfile, PIL, PyAV, h5py); nothing is mocked.
The content is deterministic for a given `seed` and can carry a class signal (`tone_hz` for audio,
`colour` for frames) so a loader's output can be checked against what was written. Keep sizes small:
tests build a handful of clips of 32-64 px and 1-3 s.

Importable standalone (`from fixtures_av import write_wav`, tests/ is on sys.path under pytest) or as
`tests.fixtures_av`. Function names and signatures are stable: other dataset tests use them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "frame_image", "tone", "write_wav", "write_frames", "write_video", "write_hdf5_frames", "write_corrupt",
]


def frame_image(size: int | Sequence[int] = 32, colour: Sequence[int] | None = None, index: int = 0, seed: int = 0):
    """A PIL RGB image (width, height = size) with a smooth gradient plus a bright square whose position moves
    with `index` (so consecutive frames differ and horizontal flips are detectable). `colour` tints it."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img = _background(w, h, None if colour is None else tuple(int(c) for c in colour), seed).copy()
    side = max(2, min(w, h) // 4)
    x0 = (index * max(1, side // 2)) % max(1, w - side)
    img[h // 4:h // 4 + side, x0:x0 + side] = 255
    return Image.fromarray(img, "RGB")


@functools.lru_cache(maxsize=32)
def _background(w: int, h: int, colour: tuple | None, seed: int) -> np.ndarray:
    """The gradient behind `frame_image` (cached: a video reuses it for every frame)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(colour if colour is not None else rng.integers(40, 200, 3), dtype=np.float32)
    x = np.linspace(0.6, 1.0, w, dtype=np.float32)[None, :, None]  # brighter to the right
    y = np.linspace(0.0, 20.0, h, dtype=np.float32)[:, None, None]
    return np.clip(base[None, None, :] * x + y, 0, 255).astype(np.uint8)


def tone(seconds: float, sr: int, hz: float = 440.0, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    """A float32 mono sine at `hz` plus a little noise (deterministic for `seed`)."""
    n = max(1, int(round(seconds * sr)))
    t = np.arange(n, dtype=np.float64) / sr
    noise = np.random.default_rng(seed).normal(0.0, 0.01, n)
    return (amplitude * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def write_wav(path: str | Path, seconds: float = 1.0, sr: int = 16000, hz: float = 440.0, seed: int = 0,
              channels: int = 1, subtype: str = "PCM_16") -> Path:
    """A real wav file (soundfile), `channels` identical channels of `tone(...)`. Returns the path."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = tone(seconds, sr, hz, seed=seed)
    data = wave if channels == 1 else np.repeat(wave[:, None], channels, axis=1)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def write_frames(folder: str | Path, n: int = 3, size: int | Sequence[int] = 32, template: str = "frame_{:05d}.jpg",
                 start: int = 1, colour: Sequence[int] | None = None, seed: int = 0, quality: int = 95) -> list[Path]:
    """A folder of `n` jpg frames named `template.format(start + i)` (default frame_00001.jpg, ... as ffmpeg
    writes them). Returns the paths in frame order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / template.format(start + i)
        frame_image(size, colour, i, seed).save(p, quality=quality)
        paths.append(p)
    return paths


# container format -> (video codec, audio codec) that PyAV's bundled FFmpeg encodes
_CODECS = {"flv": ("flv", "adpcm_swf"), "mp4": ("mpeg4", "aac"), "avi": ("mpeg4", "pcm_s16le"),
           "mkv": ("mpeg4", "pcm_s16le")}


def write_video(path: str | Path, seconds: float = 2.0, fps: int = 10, size: int | Sequence[int] = (64, 48),
                with_audio: bool = True, codec: str | None = None, audio_codec: str | None = None,
                sr: int = 22050, hz: float = 440.0, colour: Sequence[int] | None = None, seed: int = 0) -> Path:
    """A short real video (PyAV) with a video stream and, if `with_audio`, a mono audio stream of `tone(...)`.

    The container follows the suffix (.flv: FLV1 video + ADPCM audio, like CREMA-D's VideoFlash; .mp4: MPEG-4
    Part 2 + AAC; .avi/.mkv: MPEG-4 + PCM); `codec`/`audio_codec` override. Width and height must be even.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower()
    vcodec, acodec = _CODECS.get(fmt, ("mpeg4", "aac"))
    vcodec, acodec = codec or vcodec, audio_codec or acodec
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    with av.open(str(path), "w", format={"mkv": "matroska"}.get(fmt, fmt)) as container:
        vs = container.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        astream = None
        if with_audio:
            astream = container.add_stream(acodec, rate=sr, layout="mono")
        for i in range(max(1, int(round(seconds * fps)))):
            frame = av.VideoFrame.from_image(frame_image((w, h), colour, i, seed))
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if astream is not None:
            _encode_audio(container, astream, tone(seconds, sr, hz, seed=seed), sr)
    return path


def _encode_audio(container, stream, wave: np.ndarray, sr: int) -> None:
    """Encode mono float samples in chunks of the encoder's frame size, converting to its sample format."""
    import av

    resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=sr)
    chunk = 1024
    pts = 0
    for start in range(0, len(wave), chunk):
        block = wave[start:start + chunk]
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = sr
        frame.pts = pts
        frame.time_base = Fraction(1, sr)
        pts += len(block)
        for out in resampler.resample(frame):
            for packet in stream.encode(out):
                container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_hdf5_frames(path: str | Path, n: int = 3, size: int | Sequence[int] = 32, key: str = "video",
                      colour: Sequence[int] | None = None, seed: int = 0) -> Path:
    """An HDF5 file whose dataset `key` holds `n` JPEG byte strings (variable-length uint8), the format
    GeWu-Lab/AV_preprocess_tool writes (BalancedAV, BML Kinetics-Sounds)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = []
    for i in range(n):
        buf = io.BytesIO()
        frame_image(size, colour, i, seed).save(buf, format="JPEG", quality=95)
        encoded.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(key, (n,), dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for i, e in enumerate(encoded):
            ds[i] = e
    return path


def write_corrupt(path: str | Path, content: bytes = b"this is not a media file\x00\x01\x02") -> Path:
    """A file with the right name and garbage inside (a truncated download): decoders must report it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path
