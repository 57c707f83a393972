"""Tiny trees for the layouts whose tests build them inline (no generator function to import), for the dataset
contract test (tests/test_dataset_contract.py). Every other layout comes from the existing generators:
fixtures_av, fixtures_food101, fixtures_cmu_mosei and the `*_tree` functions of tests/test_data_*.py.

The constants (clip ids, classes, colours, spectrogram contents) are the ones the dataset's own test module uses,
imported from it, so one tree description serves both tests.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from fixtures_av import write_frames, write_hdf5_frames, write_video

# ---------------------------------------------------------------------------------------------------------------
# Kinetics-Sounds


def ks_balancebenchmark_tree(root: Path) -> Path:
    """BalanceBenchmark: "<id> <label>" lists (train: label index; test: a path and the class name), frame folders
    and .npy arrays in per-split folders."""
    from test_data_kinetics_sounds import CLASSES, COLOURS, TEST, TRAIN, _spec

    root.mkdir(parents=True, exist_ok=True)
    (root / "ks_train_overlap.txt").write_text("".join(f"{i} {c}\n" for i, c in TRAIN))
    (root / "ks_test_overlap.txt").write_text("".join(f"path/to/{i}.mp4 {CLASSES[c]}\n" for i, c in TEST))
    for split, rows in (("train", TRAIN), ("test", TEST)):
        (root / f"audio_{split}").mkdir(exist_ok=True)
        for n, (i, c) in enumerate(rows):
            write_frames(root / f"visual_{split}" / i, n=3, size=32, colour=COLOURS[c], seed=n)
            np.save(root / f"audio_{split}" / f"{i}.npy", _spec(n))
    return root


def ks_bml_tree(root: Path) -> Path:
    """BML: KS_train_val.json (training / validation / testing subsets) + hdf5/<id>.hdf5 + audio_pkl/<id>.pkl."""
    from test_data_kinetics_sounds import CLASSES, COLOURS, TEST, TRAIN, _spec

    root.mkdir(parents=True, exist_ok=True)
    subsets = {"training": TRAIN[:4], "validation": TRAIN[4:], "testing": TEST}
    database = {i: {"subset": s, "label": CLASSES[c]} for s, rows in subsets.items() for i, c in rows}
    (root / "KS_train_val.json").write_text(json.dumps({"database": database}))
    (root / "audio_pkl").mkdir(exist_ok=True)
    for n, (i, c) in enumerate(TRAIN + TEST):
        write_hdf5_frames(root / "hdf5" / f"{i}.hdf5", n=3, size=32, colour=COLOURS[c], seed=n)
        with open(root / "audio_pkl" / f"{i}.pkl", "wb") as f:
            pickle.dump(np.abs(_spec(n).T[:9]), f)
    return root


def ks_cvdf_tree(root: Path) -> Path:
    """The raw Kinetics download: annotations/{train,validate}.csv + {train,val}/<id>.mp4 (MPEG-4 + AAC)."""
    from test_data_kinetics_sounds import COLOURS, TEST, TRAIN, _kinetics_csv

    _kinetics_csv(root / "annotations" / "train.csv", TRAIN, "train")
    _kinetics_csv(root / "annotations" / "validate.csv", TEST, "val")
    for n, (i, c) in enumerate(TRAIN + TEST):
        folder = "train" if (i, c) in TRAIN else "val"
        write_video(root / folder / f"{i}.mp4", seconds=2.0, fps=4, size=(48, 32), sr=16000,
                    hz=300.0 + 200 * n, colour=COLOURS[c], seed=n)
    return root


# ---------------------------------------------------------------------------------------------------------------
# VGGSound


def vgg_balancebenchmark_tree(root: Path) -> Path:
    """vggsound.csv + video_{split}_root/<id>/frame_*.jpg + audio_{split}_root/<id>.npy."""
    from test_data_vggsound import COLOURS, ROWS, _csv, fname

    root.mkdir(parents=True, exist_ok=True)
    _csv(root)
    for n, (y, s, lab, split, padded) in enumerate(ROWS):
        name = fname(y, s, padded)
        write_frames(root / f"video_{split}_root" / name, n=4, size=32, colour=COLOURS[lab], seed=n)
        (root / f"audio_{split}_root").mkdir(exist_ok=True)
        np.save(root / f"audio_{split}_root" / f"{name}.npy",
                np.random.default_rng(n).normal(size=(33, 40)).astype(np.float32))
    return root


def vgg_raw_tree(root: Path) -> Path:
    """vggsound.csv + {train,test}/<ytid>_<start:06d>.mp4 (MPEG-4 + AAC)."""
    from test_data_vggsound import COLOURS, ROWS, _csv, fname

    root.mkdir(parents=True, exist_ok=True)
    _csv(root)
    for n, (y, s, lab, split, _) in enumerate(ROWS):
        write_video(root / split / f"{fname(y, s, True)}.mp4", seconds=2.0, fps=4, size=(48, 32), sr=16000,
                    hz=300 + 150 * n, colour=COLOURS[lab], seed=n)
    return root


# ---------------------------------------------------------------------------------------------------------------
# BalancedAV


def bav_video_tree(root: Path) -> Path:
    """The raw release: balanced.json at the root + videos/<id>.mp4 (2 s, 10 fps, audio); 2 classes, one clip per
    class and subset."""
    from test_data_balanced_av import COLOURS, LABELS, SUBSETS, clip_ids

    root.mkdir(parents=True, exist_ok=True)
    db = {i: {"subset": s, "label": LABELS[c]} for c in range(2) for i, s in zip(clip_ids(c)[2:], SUBSETS[2:])}
    (root / "balanced.json").write_text(json.dumps({"labels": LABELS[:2], "database": db}))
    for i, e in db.items():
        c = LABELS.index(e["label"])
        write_video(root / "videos" / f"{i}.mp4", seconds=2.0, fps=10, size=(48, 32), hz=300.0 * (c + 1),
                    colour=COLOURS[c], seed=c)
    return root


# ---------------------------------------------------------------------------------------------------------------
# bring-your-own features


def features_npz(root: Path, with_split: bool) -> Path:
    """<root>/features.npz: `label` (40,) in 4 classes, `audio` (40, 6) vectors, `text` (40, 5, 3) sequences, and
    with `with_split` a `split` array of 24 train / 6 val / 10 test."""
    rng = np.random.default_rng(0)
    n = 40
    arrays = dict(label=np.arange(n) % 4, audio=rng.normal(size=(n, 6)).astype(np.float32),
                  text=rng.normal(size=(n, 5, 3)).astype(np.float32))
    if with_split:
        arrays["split"] = np.array(["train"] * 24 + ["val"] * 6 + ["test"] * 10)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "features.npz"
    np.savez(path, **arrays)
    return path
