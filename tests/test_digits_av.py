"""The digits_av demo dataset: shapes, splits, determinism, the clip cache, pairing, text, missing eSpeak."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from mmbalance.data import digits_av, spoken_digits
from mmbalance.data.batch import DataSplits, collate_batch
from mmbalance.data.digits_av import build_digits_av
from mmbalance.data.spoken_digits import clip_cache_path, load_clip_bank
from mmbalance.errors import DataError

# A small clip bank (12 clips per digit) keeps the cold build well under a second; the default bank
# (180 per digit) goes through the same code and is built by the slow test at the bottom.
SMALL = dict(clips_per_digit=12)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    pytest.importorskip("espeakng_loader")
    return tmp_path_factory.mktemp("mmbalance_cache")


@pytest.fixture(scope="module")
def splits(cache_dir) -> DataSplits:
    return build_digits_av(cache_dir=cache_dir, **SMALL)


def digits_av_labels():
    from sklearn.datasets import load_digits

    return load_digits().target


def test_shapes_kinds_dtypes(splits):
    assert list(splits.modalities) == ["audio", "image"]  # audio first: the dominant modality
    assert splits.modalities["audio"].kind == "spectrogram"
    assert splits.modalities["audio"].shape == (1, digits_av.N_MELS, 32)
    assert splits.modalities["image"].kind == "image"
    assert splits.modalities["image"].shape == (1, 8, 8)
    assert splits.num_classes == 10
    assert splits.class_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for ds in (splits.train, splits.val, splits.test):
        for m, spec in splits.modalities.items():
            x = ds.inputs[m]
            assert x.dtype == torch.float16
            assert tuple(x.shape[1:]) == spec.shape
            assert torch.isfinite(x.float()).all()
    batch = collate_batch([splits.train[i] for i in range(4)])
    assert batch.inputs["audio"].dtype == torch.float32
    assert batch.inputs["audio"].shape == (4, 1, digits_av.N_MELS, 32)
    # the spectrogram is standardised with training statistics
    a = splits.train.inputs["audio"].float()
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05


def test_splits_sizes_stratified_disjoint(splits):
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert n == 1797
    assert abs(len(splits.test) - 0.2 * 1797) <= 10
    assert abs(len(splits.val) - 0.1 * (1797 - len(splits.test))) <= 10
    ids = [set(ds.image_ids.tolist()) for ds in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(range(1797))
    for ds, frac in ((splits.test, 0.2), (splits.val, 0.08)):
        counts = np.bincount(ds.labels.numpy(), minlength=10)
        assert counts.min() >= 1
        # stratified: every class holds about the same fraction of its samples
        per_class = np.bincount(digits_av_labels(), minlength=10)
        assert np.all(np.abs(counts - frac * per_class) <= 0.03 * per_class + 1)


def test_pairing_image_and_clip_labels_agree(splits, cache_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    bank, hit = load_clip_bank(cache_dir, **SMALL)
    assert hit
    for ds in (splits.train, splits.val, splits.test):
        labels = ds.labels.numpy()
        assert np.array_equal(digits.target[ds.image_ids], labels)
        assert np.array_equal(bank.labels[ds.clip_ids], labels)
    # the image tensor is that digit plus noise of the requested std
    ds = splits.train
    clean = digits.images[ds.image_ids][:, None].astype(np.float32) / 16.0
    residual = ds.inputs["image"].float().numpy() - clean
    assert abs(residual.std() - 0.55) < 0.02
    assert abs(residual.mean()) < 0.02


def test_determinism_and_seed_dependence(splits, cache_dir):
    again = build_digits_av(cache_dir=cache_dir, **SMALL)
    for name in ("train", "val", "test"):
        a, b = getattr(splits, name), getattr(again, name)
        assert torch.equal(a.labels, b.labels)
        assert np.array_equal(a.clip_ids, b.clip_ids)
        for m in splits.modalities:
            assert torch.equal(a.inputs[m], b.inputs[m])
    other = build_digits_av(cache_dir=cache_dir, split_seed=1, **SMALL)
    assert not torch.equal(other.test.inputs["image"][:5], splits.test.inputs["image"][:5])


def test_cache_is_reused_without_synthesis(splits, cache_dir, monkeypatch):
    path = clip_cache_path(cache_dir, **SMALL)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file behind

    def boom(*a, **k):
        raise AssertionError("the synthesiser must not run when the cache holds the clips")

    monkeypatch.setattr(spoken_digits, "synthesise_clips", boom)
    t = time.perf_counter()
    cached = build_digits_av(cache_dir=cache_dir, **SMALL)
    assert time.perf_counter() - t < 10
    assert cached.notes["clip_cache_hit"] is True


def test_corrupt_cache_is_rebuilt(tmp_path):
    pytest.importorskip("espeakng_loader")
    path = clip_cache_path(tmp_path, clips_per_digit=2)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz file")
    bank, hit = load_clip_bank(tmp_path, clips_per_digit=2)
    assert not hit and len(bank) == 20
    bank2, hit2 = load_clip_bank(tmp_path, clips_per_digit=2)
    assert hit2 and np.array_equal(bank.audio, bank2.audio)


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path))
    assert clip_cache_path(None) == tmp_path / "digits_av" / "clips_v1.npz"
    monkeypatch.delenv("MMBALANCE_CACHE")
    assert clip_cache_path(None).parent.parent.name == "mmbalance"


def test_text_adds_a_weak_third_modality(splits, cache_dir):
    tri = build_digits_av(cache_dir=cache_dir, text=True, **SMALL)
    assert list(tri.modalities) == ["audio", "image", "text"]
    spec = tri.modalities["text"]
    assert spec.kind == "vector" and spec.shape == (len(digits_av.TEXT_VOCAB),)
    assert tri.train.inputs["text"].shape == (len(tri.train), spec.shape[0])
    # the other modalities are unchanged by adding text
    assert torch.equal(tri.train.inputs["audio"], splits.train.inputs["audio"])
    # text is weak: the best possible rule on it (majority label per distinct vector) stays near 40 %
    x = tri.train.inputs["text"].numpy()[:, :4]
    y = tri.train.labels.numpy()
    keys = [tuple(r) for r in x]
    best = {}
    for k, label in zip(keys, y):
        best.setdefault(k, []).append(label)
    correct = sum(np.bincount(v).max() for v in best.values())
    assert correct / len(y) < 0.45


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes `import espeakng_loader` fail
    monkeypatch.setattr(spoken_digits, "_ESPEAK_STATE", {})  # forget a library loaded earlier in this process
    with pytest.raises(DataError, match=r'pip install "mmbalance\[demo\]"'):
        build_digits_av(cache_dir=tmp_path / "empty", **SMALL)


@pytest.mark.slow
def test_default_bank_builds_cold_in_well_under_a_minute(tmp_path):
    pytest.importorskip("espeakng_loader")
    t = time.perf_counter()
    splits = build_digits_av(cache_dir=tmp_path)
    assert time.perf_counter() - t < 30
    bank, hit = load_clip_bank(tmp_path)
    assert hit and len(bank) == 1800
    assert np.array_equal(np.bincount(bank.labels), [180] * 10)
    assert len(set(bank.voices.tolist())) == len(spoken_digits.ACCENTS) * len(spoken_digits.VARIANTS)
    assert splits.notes["clip_cache_hit"] is False
