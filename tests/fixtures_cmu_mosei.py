"""Tiny CMU-MOSEI pickles in the two native layouts (MulT and MMSA), with hand-written sentiment scores.

Real MulT/MMSA structure: a dict {train, valid, test} of per-split dicts of numpy arrays. Sizes: 12/4/4
samples, T = 6 steps (unaligned: audio 10, vision 8), dims 74 (audio) / 35 (vision) / 300 (MulT GloVe
text) / 768 (MMSA BERT text). Non-finite values are planted at known places.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

# sentiment scores per split; they include y == 0 and the half-way points of the 7-class rounding
Y = {
    "train": [-3.0, -2.5, -4 / 3, -1 / 3, 0.0, 0.0, 1 / 3, 0.5, 1.5, 2.5, 3.0, -0.5],
    "valid": [0.0, -1.0, 1.0, 0.0],
    "test": [-2 / 3, 0.0, 2.0, 1.0],
}
# hand-computed labels, per mode and split (our split names)
EXPECTED = {
    "binary_nonneg": {  # y < 0 -> 0, else 1 (0 is "non-negative")
        "train": [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
        "val": [1, 0, 1, 1],
        "test": [0, 1, 1, 1],
    },
    "binary_drop_zero": {  # y == 0 removed, then y > 0
        "train": [0, 0, 0, 0, 1, 1, 1, 1, 1, 0],
        "val": [0, 1],
        "test": [0, 1, 1],
    },
    "7class": {  # round-half-to-even of clip(y, -3, 3), + 3: -2.5 -> -2, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
        "train": [0, 1, 2, 3, 3, 3, 3, 3, 5, 5, 6, 3],
        "val": [3, 2, 4, 3],
        "test": [2, 3, 5, 4],
    },
}
KEPT_DROP_ZERO = {"train": [0, 1, 2, 3, 6, 7, 8, 9, 10, 11], "val": [1, 2], "test": [0, 2, 3]}
OUR_SPLIT = {"train": "train", "valid": "val", "test": "test"}
# planted non-finite values: (split, modality, index) -> value
PLANTED = [
    ("train", "audio", (0, 0, slice(0, 3)), -np.inf),  # COVAREP's -inf (3 values)
    ("valid", "vision", (1, 2, 0), np.nan),
    ("test", "text", (2, 1, 5), np.inf),
]
REPLACED = {"audio": 3, "vision": 1, "text": 1}


def _features(rng, n, steps, dims, dtype):
    return {m: rng.standard_normal((n, steps[m], dims[m])).astype(dtype) for m in dims}


def _plant(data):
    for split, m, idx, value in PLANTED:
        data[split][m][idx] = value


def write_mult(root: Path, aligned: bool = True, dtype=np.float64, seed: int = 0) -> Path:
    """<root>/mosei_senti_data.pkl (aligned) or mosei_senti_data_noalign.pkl, MulT's structure."""
    rng = np.random.default_rng(seed)
    steps = {"audio": 6, "vision": 6, "text": 6} if aligned else {"audio": 10, "vision": 8, "text": 6}
    data = {}
    for split, ys in Y.items():
        n = len(ys)
        d = _features(rng, n, steps, {"audio": 74, "vision": 35, "text": 300}, dtype)
        d["labels"] = np.asarray(ys, dtype=np.float32).reshape(n, 1, 1)
        # MulT's id: (N, 2) [video id, segment] as bytes
        d["id"] = np.array([[f"vid{split}{i}".encode(), str(i).encode()] for i in range(n)], dtype=object)
        data[split] = d
    _plant(data)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ("mosei_senti_data.pkl" if aligned else "mosei_senti_data_noalign.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def write_mmsa(root: Path, aligned: bool = True, seed: int = 1, with_text: bool = True, drop: tuple = ()) -> Path:
    """<root>/MOSEI/Processed/aligned_50.pkl or unaligned_50.pkl, MMSA's key names; `drop` removes keys."""
    rng = np.random.default_rng(seed)
    steps = {"audio": 6, "vision": 6, "text": 6} if aligned else {"audio": 10, "vision": 8, "text": 6}
    data = {}
    for split, ys in Y.items():
        n = len(ys)
        d = _features(rng, n, steps, {"audio": 74, "vision": 35, "text": 768}, np.float32)
        ids = rng.integers(1, 30522, size=(n, 6)).astype(np.float32)
        d["text_bert"] = np.stack([ids, np.ones_like(ids), np.zeros_like(ids)], axis=1)  # (N, 3, L)
        d["regression_labels"] = np.asarray(ys, dtype=np.float32)
        d["classification_labels"] = np.sign(np.asarray(ys)).astype(np.float32) + 1
        d["audio_lengths"] = [steps["audio"]] * n
        d["vision_lengths"] = [steps["vision"]] * n
        d["id"] = [f"vid{split}{i}$_${i}" for i in range(n)]
        d["raw_text"] = np.array([f"sentence {i}" for i in range(n)])
        d["annotations"] = ["Neutral"] * n
        data[split] = d
    _plant(data)
    for split in data:
        if not with_text:
            del data[split]["text"]
        for key in drop:
            data[split].pop(key, None)
    folder = root / "MOSEI" / "Processed"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("aligned_50.pkl" if aligned else "unaligned_50.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def cleaned(path: Path) -> dict:
    """The pickle's arrays as the loader should deliver them: float32, non-finite -> 0 (our split names)."""
    with open(path, "rb") as f:
        data = pickle.load(f)
    out = {}
    for split, d in data.items():
        out[OUR_SPLIT[split]] = {m: np.nan_to_num(np.asarray(d[m], dtype=np.float32), nan=0.0, posinf=0.0,
                                                  neginf=0.0)
                                 for m in ("audio", "vision", "text") if m in d}
    return out
