"""`digits_av`: the small, real, offline audio-visual demo dataset with a built-in modality imbalance.

image: scikit-learn's real handwritten digits plus Gaussian noise (knob 1); audio: the digit word spoken by
eSpeak NG (the clip bank of data/spoken_digits.py) in white noise (knob 2), as a log-mel spectrogram; text
(optional): a weak bag-of-words cue capped at 40 %. Reference: docs/datasets.md#the-demo-digits_av; the
README's demo table (`make readme-tables`) gives its numbers.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mmbalance.constraints import Fraction, NonNegativeFloat, NonNegativeInt, PositiveInt, Probability
from mmbalance.data.batch import DataSplits, ModalitySpec, MultimodalDataset, carved_val_source, stratified_split
from mmbalance.data.finite import check_arrays
from mmbalance.data.spoken_digits import (ACCENTS, DIGIT_WORDS, PITCH_RANGE, RATES, SAMPLE_RATE, VARIANTS,
                                          WINDOW_SAMPLES, ClipBank, clip_cache_path, load_clip_bank)
from mmbalance.errors import DataError, UserError

# Log-mel recipe (torchaudio.transforms.MelSpectrogram on the 1 s window at 8 kHz): (1, 40, 32).
N_FFT, HOP_LENGTH, N_MELS, F_MIN = 256, 256, 40, 50.0

# Text cue vocabulary: the four informative words first, then fillers.
TEXT_VOCAB = ("even", "odd", "small", "large", "a", "the", "number", "digit", "this", "is", "value", "here")
N_FILLERS = 3  # filler words drawn per phrase (with replacement, counted)


# ---------------------------------------------------------------------------------------------------------
# mixing and features


def _mix_audio(bank: ClipBank, clip_ids: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """(N, WINDOW_SAMPLES) float32: each clip (scaled to unit RMS over its own length) at a random offset in
    a silent 1 s window, plus white noise whose power is `snr_db` dB below the clip's."""
    n = len(clip_ids)
    wave = np.zeros((n, WINDOW_SAMPLES), np.float32)
    starts = rng.random(n)
    for i, c in enumerate(clip_ids):
        x = bank.clip(int(c)).astype(np.float32)[:WINDOW_SAMPLES]
        x /= max(float(np.sqrt(np.mean(x * x))), 1e-8)
        s = int(starts[i] * (WINDOW_SAMPLES - len(x) + 1))
        wave[i, s : s + len(x)] = x
    wave += 10.0 ** (-snr_db / 20.0) * rng.standard_normal((n, WINDOW_SAMPLES), dtype=np.float32)
    return wave


def _log_mel(wave: np.ndarray) -> np.ndarray:
    """(N, WINDOW_SAMPLES) → (N, 1, N_MELS, T) log-mel spectrogram (natural log of power + 1e-6)."""
    import torchaudio.transforms as AT

    mel = AT.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, f_min=F_MIN, n_mels=N_MELS,
                            power=2.0)
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
    np.add.at(x, (np.arange(n)[:, None], rng.integers(4, len(TEXT_VOCAB), size=(n, N_FILLERS))), 1)  # fillers
    return x


# ---------------------------------------------------------------------------------------------------------
# public builder


def build_digits_av(*, image_noise: NonNegativeFloat = 0.55, audio_snr_db: float = 20.0, text: bool = False,
                    text_noise: Probability = 0.1, test_fraction: Fraction = 0.2,
                    val_fraction: Fraction = 0.1, split_seed: NonNegativeInt = 0,
                    cache_dir: str | os.PathLike | None = None, clips_per_digit: PositiveInt = 180,
                    synth_seed: NonNegativeInt = 0) -> DataSplits:
    """Build the digits_av demo dataset (see the module docstring). `val_fraction` is a share of the non-test
    samples. `split_seed` seeds the splits and everything drawn per sample (image noise, clip pairing, offsets,
    audio noise, text), so equal arguments give identical arrays; `cache_dir`, `clips_per_digit` and `synth_seed`
    key the clean clip bank (see `clip_cache_path`), while the mix and features are rebuilt on every call (< 1 s).

    Modalities, in this order: "audio" (1, 40, 32) log-mel standardised with train-split statistics, "image"
    (1, 8, 8), and with text=True "text" (12,); inputs are stored as float16. Each split is a `MultimodalDataset`
    with `image_ids` (into `load_digits()`) and `clip_ids` (into the clip bank), every sample's provenance.
    """
    from sklearn.datasets import load_digits

    for ok, rule in ((0.0 < test_fraction < 1.0, f"test_fraction must be in (0, 1), got {test_fraction}"),
                     (0.0 < val_fraction < 1.0, f"val_fraction must be in (0, 1), got {val_fraction}"),
                     (image_noise >= 0, f"image_noise must be >= 0, got {image_noise}"),
                     (0.0 <= text_noise <= 1.0, f"text_noise must be in [0, 1], got {text_noise}"),
                     (clips_per_digit >= 1, f"clips_per_digit must be >= 1, got {clips_per_digit}")):
        if not ok:
            raise UserError(f"digits_av: {rule}")
    bank, cache_hit = load_clip_bank(cache_dir, clips_per_digit, synth_seed)
    bank_path = clip_cache_path(cache_dir, clips_per_digit, synth_seed)
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    n = len(labels)

    def stream(tag: int) -> np.random.Generator:  # independent random streams per quantity, all from split_seed
        return np.random.default_rng([int(split_seed), tag])

    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    images = images + np.float32(image_noise) * stream(1).standard_normal(images.shape, dtype=np.float32)
    pair_rng = stream(2)  # pair each image with a random clean clip of the same label
    clip_ids = np.empty(n, np.int64)
    for c, word in enumerate(DIGIT_WORDS):
        where, pool = np.flatnonzero(labels == c), np.flatnonzero(bank.labels == c)
        if pool.size == 0:
            raise DataError(f"digits_av: the clip bank has no clip for {word!r}")
        clip_ids[where] = pool[pair_rng.integers(0, pool.size, size=where.size)]
    audio = _log_mel(_mix_audio(bank, clip_ids, float(audio_snr_db), stream(3)))

    rest, test_idx = stratified_split(labels, test_fraction, split_seed)  # then validation carved from the rest
    keep, held = stratified_split(labels[rest], val_fraction, split_seed + 1)  # val_fraction > 0: checked above
    train_idx, val_idx = rest[keep], rest[held]
    mean, std = float(audio[train_idx].mean()), float(audio[train_idx].std()) or 1.0
    audio = (audio - mean) / std

    inputs = {"audio": audio.astype(np.float16), "image": images.astype(np.float16)}
    modalities = {"audio": ModalitySpec("spectrogram", tuple(audio.shape[1:])),
                  "image": ModalitySpec("image", tuple(images.shape[1:]))}
    if text:
        inputs["text"] = _text_cue(labels, float(text_noise), stream(4)).astype(np.float16)
        modalities["text"] = ModalitySpec("vector", (len(TEXT_VOCAB),))
    # float16 storage turns values past 65504 into Inf: a huge image_noise would otherwise train on them
    check_arrays(f"digits_av demo data (clip bank {bank_path})", inputs,
                 {"train": train_idx, "val": val_idx, "test": test_idx},
                 "lower image_noise (inputs are float16, finite up to 65504), or delete the clip bank to rebuild it")
    full = MultimodalDataset(inputs, labels, image_ids=np.arange(n), clip_ids=clip_ids)
    notes = {
        "dataset": "digits_av",
        "image": "sklearn load_digits (UCI optdigits, real handwriting), 8x8 scaled to [0,1], "
        f"+ fixed Gaussian noise std {image_noise}",
        "audio": f"eSpeak NG digit words ({len(ACCENTS)} accents x {len(VARIANTS)} variants, rates {list(RATES)} "
        f"wpm, pitch {PITCH_RANGE[0]}-{PITCH_RANGE[1]}), {len(bank)} clean clips resampled to {SAMPLE_RATE} Hz, "
        f"random offset in a 1 s window, white noise at {audio_snr_db} dB SNR",
        "audio_features": f"torchaudio MelSpectrogram n_fft={N_FFT} hop={HOP_LENGTH} n_mels={N_MELS} "
        f"f_min={F_MIN}, log(power+1e-6), standardised with train mean {mean:.4f} std {std:.4f}",
        "image_noise": float(image_noise), "audio_snr_db": float(audio_snr_db), "split_seed": int(split_seed),
        "clip_cache": str(bank_path), "clip_cache_hit": bool(cache_hit),
        "split_sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)}, "dtype": "float16",
    }
    if text:
        notes["text"] = (f"bag of words over {list(TEXT_VOCAB)}: parity + size word (each flipped w.p. {text_noise}) "
                         f"+ {N_FILLERS} fillers; text-only accuracy capped at 40 %")
    return DataSplits(full.subset(train_idx), full.subset(val_idx), full.subset(test_idx), modalities,
                      len(DIGIT_WORDS), list(DIGIT_WORDS), notes=notes,
                      val_source=carved_val_source(labels[rest], held, val_fraction, split_seed + 1)
                      if len(val_idx) else "none (val_fraction=0)")
