"""`digits_av`: a small, real, offline audio-visual demo dataset with a built-in modality imbalance.

* **image** – the 1,797 real handwritten digits shipped with scikit-learn (UCI optdigits, 8×8, scaled to
  [0, 1]) plus fixed per-sample Gaussian noise of std `image_noise` (the first imbalance knob).
* **audio** – the digit word ("zero" … "nine") spoken by eSpeak NG (real output of a rule-based TTS engine,
  not recorded speech). A bank of clean clips (60 voices = 5 English accents × 12 voice variants, 3 speaking
  rates, random pitch; 180 clips per digit) is synthesised once and cached. Each image is paired with a
  random clip of the same label, placed at a random offset in a 1 s window at 8 kHz, with white noise at
  `audio_snr_db` dB (the second knob), and turned into a standardised log-mel spectrogram (torchaudio).
* **text** (optional, `text=True`) – a weak bag-of-words cue: one parity word (even/odd) and one size word
  (small = 0–4, large = 5–9), each flipped with probability `text_noise`, plus random filler words. Even a
  perfect reader can only tell one of four groups apart, so text alone is capped at 40 % accuracy.

With the defaults (image σ 0.55, audio 20 dB) audio dominates. Measured with mmbalance's own demo study
(`make run`: backbone=small, concat fusion, SGD lr 0.01 momentum 0.9, batch 64, 15 epochs, seeds 0-2):
audio alone 97.1 %, image alone 65.0 %, joint 95.7 %, and inside the joint model the image branch (its
slice of the head + b/2) reaches only 41.4 %: the under-optimised weak modality that the balancing methods
target.

eSpeak NG comes from the optional PyPI package ``espeakng-loader`` (``pip install "mmbalance[demo]"``),
imported only when the clip bank has to be synthesised. It is GPL-3.0 and is never vendored.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmbalance.data.batch import DataSplits, ModalitySpec, MultimodalDataset, stratified_split
from mmbalance.data.finite import check_arrays
from mmbalance.errors import DataError, UserError

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# eSpeak NG voice pool: accents × variants ('' is the accent's default voice).
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m7", "+klatt", "+croak")
RATES = (120, 170, 220)  # words per minute
PITCH_RANGE = (25, 85)  # eSpeak pitch parameter, 0–100

SAMPLE_RATE = 8000  # Hz, after resampling
WINDOW_SAMPLES = SAMPLE_RATE  # the 1 s window each clip is placed in

# Log-mel recipe (torchaudio.transforms.MelSpectrogram on the 1 s window at 8 kHz): (1, 40, 32).
N_FFT = 256
HOP_LENGTH = 256
N_MELS = 40
F_MIN = 50.0

# Text cue vocabulary: the four informative words first, then fillers.
TEXT_VOCAB = ("even", "odd", "small", "large", "a", "the", "number", "digit", "this", "is", "value", "here")
N_FILLERS = 3  # filler words drawn per phrase (with replacement, counted)

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


class DigitsAVDataset(MultimodalDataset):
    """A `MultimodalDataset` that also remembers where each sample came from:
    `image_ids[i]` indexes `sklearn.datasets.load_digits()`, `clip_ids[i]` indexes the clean clip bank."""

    def __init__(self, inputs, labels, image_ids: np.ndarray, clip_ids: np.ndarray):
        super().__init__(inputs, labels)
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.clip_ids = np.asarray(clip_ids, dtype=np.int64)

    def subset(self, indices: np.ndarray) -> "DigitsAVDataset":
        idx = np.asarray(indices, dtype=np.int64)
        t = torch.as_tensor(idx)
        return DigitsAVDataset(
            {m: x[t] for m, x in self.inputs.items()}, self.labels[t], self.image_ids[idx], self.clip_ids[idx]
        )


# ---------------------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    """`$MMBALANCE_CACHE`, else `~/.cache/mmbalance`."""
    env = os.environ.get("MMBALANCE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmbalance"


def _clip_config(clips_per_digit: int, synth_seed: int) -> dict:
    return {
        "version": CLIP_CACHE_VERSION,
        "accents": list(ACCENTS),
        "variants": list(VARIANTS),
        "rates": list(RATES),
        "pitch_range": list(PITCH_RANGE),
        "sample_rate": SAMPLE_RATE,
        "clips_per_digit": int(clips_per_digit),
        "synth_seed": int(synth_seed),
    }


def clip_cache_path(cache_dir: str | os.PathLike | None, clips_per_digit: int = 180, synth_seed: int = 0) -> Path:
    """Where the clean clip bank for these settings lives. The default settings give `clips_v1.npz`;
    other settings add a short hash of the configuration to the name."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cfg = _clip_config(clips_per_digit, synth_seed)
    if clips_per_digit == 180 and synth_seed == 0:
        name = f"clips_v{CLIP_CACHE_VERSION}.npz"
    else:
        digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
        name = f"clips_v{CLIP_CACHE_VERSION}_{digest}.npz"
    return root / "digits_av" / name


def _save_bank(path: Path, bank: ClipBank, cfg: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                audio=bank.audio,
                offsets=bank.offsets,
                labels=bank.labels,
                voices=bank.voices.astype("U"),
                rates=bank.rates,
                pitches=bank.pitches,
                config=np.array(json.dumps(cfg, sort_keys=True)),
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the cache ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_bank(path: Path, cfg: dict) -> ClipBank | None:
    """The cached bank, or None when it is missing, unreadable or made with other settings."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["config"])) != json.loads(json.dumps(cfg, sort_keys=True)):
                return None
            bank = ClipBank(
                audio=z["audio"],
                offsets=z["offsets"].astype(np.int64),
                labels=z["labels"].astype(np.int64),
                voices=z["voices"],
                rates=z["rates"].astype(np.int64),
                pitches=z["pitches"].astype(np.int64),
            )
    except Exception:  # a truncated or foreign file: treat as a miss and rebuild
        return None
    if len(bank.offsets) != len(bank.labels) + 1 or bank.offsets[-1] != len(bank.audio):
        return None
    return bank


# ---------------------------------------------------------------------------------------------------------
# eSpeak NG through ctypes


def _import_espeak():
    try:
        import espeakng_loader
    except ImportError as e:
        raise DataError(
            "the digits_av demo data needs eSpeak NG to synthesise its spoken digits, and the package "
            '`espeakng-loader` is not installed; run: pip install "mmbalance[demo]"'
        ) from e
    return espeakng_loader


_SYNTH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _espeak():
    """Load and initialise libespeak-ng once per process; returns (lib, sample_rate, chunk list)."""
    if _ESPEAK_STATE:
        return _ESPEAK_STATE["lib"], _ESPEAK_STATE["rate"], _ESPEAK_STATE["chunks"]
    loader = _import_espeak()
    try:
        lib = ctypes.CDLL(loader.get_library_path())
        data_path = loader.get_data_path()
    except (OSError, RuntimeError) as e:
        raise DataError(f"could not load eSpeak NG from espeakng-loader: {e}") from e
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CB]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_Synchronize.restype = ctypes.c_int
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
    espeak_rate, espeak_pitch = 1, 3  # espeak_PARAMETER values
    pos_character = 1
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
    if nz.size == 0:
        return x
    return x[max(nz[0] - margin, 0) : nz[-1] + 1 + margin]


def synthesise_clips(clips_per_digit: int = 180, synth_seed: int = 0) -> ClipBank:
    """Speak every digit word `clips_per_digit` times, cycling through voices × rates with random pitch, and
    resample to SAMPLE_RATE with torchaudio. Takes a few seconds."""
    import torchaudio.functional as AF

    rng = np.random.default_rng([synth_seed, 7919])
    combos = [(a + v, r) for a in ACCENTS for v in VARIANTS for r in RATES]
    raw, labels, voices, rates, pitches = [], [], [], [], []
    with _ESPEAK_LOCK:
        lib, src_rate, chunks = _espeak()
        for label, word in enumerate(CLASS_NAMES):
            order = rng.permutation(len(combos))
            for j in range(clips_per_digit):
                voice, rate = combos[order[j % len(combos)]]
                pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
                raw.append(_trim(_speak(lib, chunks, word, voice, rate, pitch)))
                labels.append(label)
                voices.append(voice)
                rates.append(rate)
                pitches.append(pitch)
    # Resample in padded batches (one conv per batch rather than one call per clip).
    out = []
    for start in range(0, len(raw), 256):
        group = raw[start : start + 256]
        longest = max(len(x) for x in group)
        pad = np.zeros((len(group), longest), np.float32)
        for k, x in enumerate(group):
            pad[k, : len(x)] = x.astype(np.float32) / 32768.0
        res = AF.resample(torch.from_numpy(pad), src_rate, SAMPLE_RATE).numpy()
        for k, x in enumerate(group):
            n = min(int(np.ceil(len(x) * SAMPLE_RATE / src_rate)), WINDOW_SAMPLES, res.shape[1])
            out.append(np.clip(np.round(res[k, :n] * 32767.0), -32768, 32767).astype(np.int16))
    offsets = np.zeros(len(out) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in out])
    return ClipBank(
        audio=np.concatenate(out),
        offsets=offsets,
        labels=np.asarray(labels, np.int64),
        voices=np.asarray(voices),
        rates=np.asarray(rates, np.int64),
        pitches=np.asarray(pitches, np.int64),
    )


def load_clip_bank(cache_dir: str | os.PathLike | None = None, clips_per_digit: int = 180, synth_seed: int = 0):
    """The clean clip bank from the cache, synthesised (and cached) on a miss. Returns (bank, cache_hit)."""
    path = clip_cache_path(cache_dir, clips_per_digit, synth_seed)
    cfg = _clip_config(clips_per_digit, synth_seed)
    bank = _load_bank(path, cfg)
    if bank is not None:
        return bank, True
    bank = synthesise_clips(clips_per_digit, synth_seed)
    try:
        _save_bank(path, bank, cfg)
    except OSError as e:  # an unwritable cache must not stop the build
        import warnings

        warnings.warn(f"digits_av: could not write the clip cache {path}: {e}", stacklevel=2)
    return bank, False


# ---------------------------------------------------------------------------------------------------------
# mixing and features


def _mix_audio(bank: ClipBank, clip_ids: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """(N, WINDOW_SAMPLES) float32: each clip (scaled to unit RMS over its own length) at a random offset in
    a silent 1 s window, plus white noise whose power is `snr_db` dB below the clip's."""
    n = len(clip_ids)
    wave = np.zeros((n, WINDOW_SAMPLES), np.float32)
    starts = rng.random(n)
    for i, c in enumerate(clip_ids):
        x = bank.clip(int(c)).astype(np.float32)
        x = x[:WINDOW_SAMPLES]
        x /= max(float(np.sqrt(np.mean(x * x))), 1e-8)
        s = int(starts[i] * (WINDOW_SAMPLES - len(x) + 1))
        wave[i, s : s + len(x)] = x
    noise_std = 10.0 ** (-snr_db / 20.0)
    wave += noise_std * rng.standard_normal((n, WINDOW_SAMPLES), dtype=np.float32)
    return wave


def _log_mel(wave: np.ndarray) -> np.ndarray:
    """(N, WINDOW_SAMPLES) → (N, 1, N_MELS, T) log-mel spectrogram (natural log of power + 1e-6)."""
    import torchaudio.transforms as AT

    mel = AT.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, f_min=F_MIN, n_mels=N_MELS, power=2.0
    )
    with torch.no_grad():
        spec = mel(torch.from_numpy(wave))
    return torch.log(spec + 1e-6).unsqueeze(1).numpy()


def _text_cue(labels: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(N, len(TEXT_VOCAB)) float32 word counts: parity word, size word (each flipped with prob `noise`),
    and N_FILLERS random filler words."""
    n = len(labels)
    x = np.zeros((n, len(TEXT_VOCAB)), np.float32)
    odd = (labels % 2 == 1) ^ (rng.random(n) < noise)
    large = (labels >= 5) ^ (rng.random(n) < noise)
    x[np.arange(n), odd.astype(int)] += 1  # 0 even, 1 odd
    x[np.arange(n), 2 + large.astype(int)] += 1  # 2 small, 3 large
    fillers = rng.integers(4, len(TEXT_VOCAB), size=(n, N_FILLERS))
    for k in range(N_FILLERS):
        np.add.at(x, (np.arange(n), fillers[:, k]), 1)
    return x


# ---------------------------------------------------------------------------------------------------------
# public builder


def build_digits_av(
    *,
    image_noise: float = 0.55,
    audio_snr_db: float = 20.0,
    text: bool = False,
    text_noise: float = 0.1,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    clips_per_digit: int = 180,
    synth_seed: int = 0,
) -> DataSplits:
    """Build the digits_av demo dataset (see the module docstring).

    image_noise: std of the fixed Gaussian noise added to the [0, 1] images (imbalance knob 1).
    audio_snr_db: signal-to-noise ratio of the white noise in the 1 s audio window (imbalance knob 2).
    text: add the weak third modality "text" (a bag-of-words vector; text alone ≤ 40 % accuracy).
    text_noise: probability of flipping each of the two informative text words.
    test_fraction: stratified test split; val_fraction: stratified validation split, as a fraction of the
        remaining (non-test) samples.
    split_seed: seeds the splits and everything drawn per sample (image noise, clip pairing, offsets, audio
        noise, text), so equal arguments give identical arrays.
    cache_dir: root of the cache (default `$MMBALANCE_CACHE`, else `~/.cache/mmbalance`); the clean clips are
        kept in `<cache_dir>/digits_av/clips_v1.npz`. The mix and features are rebuilt on every call (< 1 s).
    clips_per_digit, synth_seed: size and pitch seed of the clean clip bank (part of the cache key).

    Modalities, in this order: "audio" (1, 40, 32) log-mel spectrogram standardised with train-split
    statistics, "image" (1, 8, 8), and with text=True "text" (12,). Inputs are stored as float16.
    Each split is a `DigitsAVDataset` with `image_ids` and `clip_ids` giving every sample's provenance.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"digits_av: test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"digits_av: val_fraction must be in [0, 1), got {val_fraction}")
    if image_noise < 0:
        raise UserError(f"digits_av: image_noise must be >= 0, got {image_noise}")
    if not 0.0 <= text_noise <= 1.0:
        raise UserError(f"digits_av: text_noise must be in [0, 1], got {text_noise}")
    if clips_per_digit < 1:
        raise UserError(f"digits_av: clips_per_digit must be >= 1, got {clips_per_digit}")

    bank, cache_hit = load_clip_bank(cache_dir, clips_per_digit, synth_seed)

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    n = len(labels)
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]

    # Independent random streams per quantity, all derived from split_seed.
    def stream(tag: int) -> np.random.Generator:
        return np.random.default_rng([int(split_seed), tag])

    images = images + np.float32(image_noise) * stream(1).standard_normal(images.shape, dtype=np.float32)

    # Pair each image with a random clean clip of the same label.
    pair_rng = stream(2)
    clip_ids = np.empty(n, np.int64)
    for c in range(len(CLASS_NAMES)):
        where = np.flatnonzero(labels == c)
        pool = np.flatnonzero(bank.labels == c)
        if pool.size == 0:
            raise DataError(f"digits_av: the clip bank has no clip for {CLASS_NAMES[c]!r}")
        clip_ids[where] = pool[pair_rng.integers(0, pool.size, size=where.size)]

    wave = _mix_audio(bank, clip_ids, float(audio_snr_db), stream(3))
    audio = _log_mel(wave)

    # Splits: fixed stratified test split, then validation carved from the rest.
    rest, test_idx = stratified_split(labels, test_fraction, split_seed)
    if val_fraction > 0:
        keep, held = stratified_split(labels[rest], val_fraction, split_seed + 1)
        train_idx, val_idx = rest[keep], rest[held]
    else:
        train_idx, val_idx = rest, rest[:0]

    mean = float(audio[train_idx].mean())
    std = float(audio[train_idx].std()) or 1.0
    audio = (audio - mean) / std

    inputs = {"audio": audio.astype(np.float16), "image": images.astype(np.float16)}
    modalities = {
        "audio": ModalitySpec("spectrogram", tuple(audio.shape[1:])),
        "image": ModalitySpec("image", tuple(images.shape[1:])),
    }
    if text:
        inputs["text"] = _text_cue(labels, float(text_noise), stream(4)).astype(np.float16)
        modalities["text"] = ModalitySpec("vector", (len(TEXT_VOCAB),))

    # float16 storage turns values past 65504 into Inf: a huge image_noise would otherwise train on them
    check_arrays(f"digits_av demo data (clip bank {clip_cache_path(cache_dir, clips_per_digit, synth_seed)})",
                 inputs, {"train": train_idx, "val": val_idx, "test": test_idx},
                 "lower image_noise (inputs are float16, finite up to 65504), or delete the clip bank to rebuild it")
    full = DigitsAVDataset(inputs, labels, np.arange(n), clip_ids)
    notes = {
        "dataset": "digits_av",
        "image": "sklearn load_digits (UCI optdigits, real handwriting), 8x8 scaled to [0,1], "
        f"+ fixed Gaussian noise std {image_noise}",
        "audio": f"eSpeak NG digit words ({len(ACCENTS)} accents x {len(VARIANTS)} variants, rates {list(RATES)} "
        f"wpm, pitch {PITCH_RANGE[0]}-{PITCH_RANGE[1]}), {len(bank)} clean clips resampled to {SAMPLE_RATE} Hz, "
        f"random offset in a 1 s window, white noise at {audio_snr_db} dB SNR",
        "audio_features": f"torchaudio MelSpectrogram n_fft={N_FFT} hop={HOP_LENGTH} n_mels={N_MELS} "
        f"f_min={F_MIN}, log(power+1e-6), standardised with train mean {mean:.4f} std {std:.4f}",
        "image_noise": float(image_noise),
        "audio_snr_db": float(audio_snr_db),
        "split_seed": int(split_seed),
        "clip_cache": str(clip_cache_path(cache_dir, clips_per_digit, synth_seed)),
        "clip_cache_hit": bool(cache_hit),
        "split_sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
        "dtype": "float16",
    }
    if text:
        notes["text"] = (
            f"bag of words over {list(TEXT_VOCAB)}: parity + size word (each flipped w.p. {text_noise}) "
            f"+ {N_FILLERS} fillers; text-only accuracy capped at 40 %"
        )
    return DataSplits(
        train=full.subset(train_idx),
        val=full.subset(val_idx),
        test=full.subset(test_idx),
        modalities=modalities,
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        val_source=f"carved from train (stratified, {val_fraction:.0%}, seed {split_seed + 1})",
        notes=notes,
    )
