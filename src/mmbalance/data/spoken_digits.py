"""The clean clip bank of the digits_av demo: the digit words spoken by eSpeak NG, synthesised once and cached.

60 voices (5 English accents x 12 variants) x 3 speaking rates, random pitch, trimmed, resampled to 8 kHz and
stored back to back as int16 in ``<cache>/digits_av/clips_v1.npz`` (atomic; a missing, damaged or foreign file
is synthesised again). eSpeak NG is not bit-reproducible, so the cache is what makes runs repeatable. It comes
from the optional ``espeakng-loader`` package (the demo extra, GPL-3.0, never vendored), loaded through ctypes
only when the bank has to be synthesised. Reference: docs/datasets.md#the-demo-digits_av
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmbalance.errors import DataError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# eSpeak NG voice pool: accents × variants ('' is the accent's default voice).
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m7", "+klatt", "+croak")
RATES = (120, 170, 220)  # words per minute
PITCH_RANGE = (25, 85)  # eSpeak pitch parameter, 0–100

SAMPLE_RATE = 8000  # Hz, after resampling
WINDOW_SAMPLES = SAMPLE_RATE  # the longest clip kept: the 1 s window digits_av places each clip in

CLIP_CACHE_VERSION = 1

_ESPEAK_LOCK = threading.Lock()
_ESPEAK_STATE: dict = {}  # the library is process-global: initialise it once


@dataclass
class ClipBank:
    """Clean clips at SAMPLE_RATE, stored back to back: clip i is audio[offsets[i]:offsets[i+1]] (int16)."""

    audio: np.ndarray  # (total,) int16
    offsets: np.ndarray  # (n_clips + 1,) int64
    labels: np.ndarray  # (n_clips,) int64
    voices: np.ndarray  # (n_clips,) str, e.g. "en-us+f3"
    rates: np.ndarray  # (n_clips,) int64
    pitches: np.ndarray  # (n_clips,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def clip(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i] : self.offsets[i + 1]]


# ---------------------------------------------------------------------------------------------------------
# cache


def _clip_config(clips_per_digit: int, synth_seed: int) -> dict:
    return {"version": CLIP_CACHE_VERSION, "accents": list(ACCENTS), "variants": list(VARIANTS), "rates": list(RATES),
            "pitch_range": list(PITCH_RANGE), "sample_rate": SAMPLE_RATE, "clips_per_digit": int(clips_per_digit),
            "synth_seed": int(synth_seed)}


def clip_cache_path(cache_dir: str | os.PathLike | None, clips_per_digit: int = 180, synth_seed: int = 0) -> Path:
    """Where the clean clip bank for these settings lives (`cache_dir` default: `$MMBALANCE_CACHE`, else
    `~/.cache/mmbalance`). The default settings give `clips_v1.npz`; others add a short hash of the settings."""
    if cache_dir is None:
        cache_dir = os.environ.get("MMBALANCE_CACHE") or Path.home() / ".cache" / "mmbalance"
    root = Path(cache_dir).expanduser()
    name = f"clips_v{CLIP_CACHE_VERSION}"
    if clips_per_digit != 180 or synth_seed != 0:
        cfg = json.dumps(_clip_config(clips_per_digit, synth_seed), sort_keys=True)
        name += "_" + hashlib.sha1(cfg.encode()).hexdigest()[:10]
    return root / "digits_av" / f"{name}.npz"


def _save_bank(path: Path, bank: ClipBank, cfg: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, audio=bank.audio, offsets=bank.offsets, labels=bank.labels, voices=bank.voices.astype("U"),
                     rates=bank.rates, pitches=bank.pitches, config=np.array(json.dumps(cfg, sort_keys=True)))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the cache ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_bank(path: Path, cfg: dict) -> ClipBank | None:
    """The cached bank, or None when it is missing, unreadable or made with other settings."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["config"])) != cfg:
                return None
            bank = ClipBank(z["audio"], *(z[k].astype(np.int64) for k in ("offsets", "labels")), z["voices"],
                            *(z[k].astype(np.int64) for k in ("rates", "pitches")))
    except Exception:  # a truncated or foreign file: treat as a miss and rebuild
        return None
    if len(bank.offsets) != len(bank.labels) + 1 or bank.offsets[-1] != len(bank.audio):
        return None
    return bank


# ---------------------------------------------------------------------------------------------------------
# eSpeak NG through ctypes

_SYNTH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_INT, _UINT, _PTR, _STR = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p
_SIGNATURES = {  # libespeak-ng function -> (restype, argtypes); None: left as ctypes' default
    "espeak_Initialize": (_INT, [_INT, _INT, _STR, _INT]),
    "espeak_SetSynthCallback": (None, [_SYNTH_CB]),
    "espeak_SetVoiceByName": (_INT, [_STR]),
    "espeak_SetParameter": (_INT, [_INT, _INT, _INT]),
    "espeak_Synth": (_INT, [_STR, ctypes.c_size_t, _UINT, _INT, _UINT, _UINT, _PTR, _PTR]),
    "espeak_Synchronize": (_INT, None),
}


def _espeak():
    """Load and initialise libespeak-ng once per process; returns (lib, sample_rate, chunk list)."""
    if _ESPEAK_STATE:
        return _ESPEAK_STATE["lib"], _ESPEAK_STATE["rate"], _ESPEAK_STATE["chunks"]
    try:
        import espeakng_loader as loader
    except ImportError as e:
        raise DataError("the digits_av demo data needs eSpeak NG to synthesise its spoken digits, and the package "
                        '`espeakng-loader` is not installed; run: pip install "mmbalance[demo]"') from e
    try:
        lib = ctypes.CDLL(loader.get_library_path())
        data_path = loader.get_data_path()
    except (OSError, RuntimeError) as e:
        raise DataError(f"could not load eSpeak NG from espeakng-loader: {e}") from e
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        if restype is not None:
            fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes
    audio_output_synchronous = 2
    rate = lib.espeak_Initialize(audio_output_synchronous, 0, data_path.encode(), 0)
    if rate <= 0:
        raise DataError(f"eSpeak NG failed to initialise (data path {data_path})")
    chunks: list[np.ndarray] = []

    def callback(wav, n, _events):
        if wav and n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on synthesising

    cb = _SYNTH_CB(callback)
    lib.espeak_SetSynthCallback(cb)
    _ESPEAK_STATE.update(lib=lib, rate=rate, chunks=chunks, callback=cb)  # keep the callback alive
    return lib, rate, chunks


def _speak(lib, chunks: list, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    espeak_rate, espeak_pitch, pos_character = 1, 3, 1  # espeak_PARAMETER and espeak_POSITION_TYPE values
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise DataError(f"eSpeak NG has no voice {voice!r}")
    lib.espeak_SetParameter(espeak_rate, int(rate), 0)
    lib.espeak_SetParameter(espeak_pitch, int(pitch), 0)
    chunks.clear()
    buf = text.encode() + b"\0"
    if lib.espeak_Synth(buf, len(buf), 0, pos_character, 0, 0, None, None) != 0:
        raise DataError(f"eSpeak NG failed to speak {text!r} with voice {voice!r}")
    lib.espeak_Synchronize()
    out = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    chunks.clear()
    return out


def _trim(x: np.ndarray, rel_threshold: float = 0.01, margin: int = 200) -> np.ndarray:
    """Cut leading and trailing near-silence (below rel_threshold × peak), keeping `margin` samples."""
    a = np.abs(x)
    nz = np.flatnonzero(a > rel_threshold * a.max()) if a.size and a.max() > 0 else np.zeros(0, int)
    return x if nz.size == 0 else x[max(nz[0] - margin, 0) : nz[-1] + 1 + margin]


def synthesise_clips(clips_per_digit: int = 180, synth_seed: int = 0) -> ClipBank:
    """Speak every digit word `clips_per_digit` times, cycling through voices × rates with random pitch, and
    resample to SAMPLE_RATE with torchaudio. Takes a few seconds."""
    import torchaudio.functional as AF

    rng = np.random.default_rng([synth_seed, 7919])
    combos = [(a + v, r) for a in ACCENTS for v in VARIANTS for r in RATES]
    raw, meta = [], []  # meta: (label, voice, rate, pitch) per clip
    with _ESPEAK_LOCK:
        lib, src_rate, chunks = _espeak()
        for label, word in enumerate(DIGIT_WORDS):
            order = rng.permutation(len(combos))
            for j in range(clips_per_digit):
                voice, rate = combos[order[j % len(combos)]]
                pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
                raw.append(_trim(_speak(lib, chunks, word, voice, rate, pitch)))
                meta.append((label, voice, rate, pitch))
    out = []
    for start in range(0, len(raw), 256):  # resample in padded batches: one conv per batch, not one call per clip
        group = raw[start : start + 256]
        pad = np.zeros((len(group), max(len(x) for x in group)), np.float32)
        for k, x in enumerate(group):
            pad[k, : len(x)] = x.astype(np.float32) / 32768.0
        res = AF.resample(torch.from_numpy(pad), src_rate, SAMPLE_RATE).numpy()
        for k, x in enumerate(group):
            n = min(int(np.ceil(len(x) * SAMPLE_RATE / src_rate)), WINDOW_SAMPLES, res.shape[1])
            out.append(np.clip(np.round(res[k, :n] * 32767.0), -32768, 32767).astype(np.int16))
    offsets = np.cumsum([0, *map(len, out)], dtype=np.int64)
    labels, voices, rates, pitches = zip(*meta)
    return ClipBank(np.concatenate(out), offsets, np.asarray(labels, np.int64), np.asarray(voices),
                    np.asarray(rates, np.int64), np.asarray(pitches, np.int64))


def load_clip_bank(cache_dir: str | os.PathLike | None = None, clips_per_digit: int = 180, synth_seed: int = 0):
    """The clean clip bank from the cache, synthesised (and cached) on a miss. Returns (bank, cache_hit)."""
    path, cfg = clip_cache_path(cache_dir, clips_per_digit, synth_seed), _clip_config(clips_per_digit, synth_seed)
    bank = _load_bank(path, cfg)
    if bank is not None:
        return bank, True
    bank = synthesise_clips(clips_per_digit, synth_seed)
    try:
        _save_bank(path, bank, cfg)
    except OSError as e:  # an unwritable cache must not stop the build
        warnings.warn(f"digits_av: could not write the clip cache {path}: {e}", stacklevel=2)
    return bank, False
