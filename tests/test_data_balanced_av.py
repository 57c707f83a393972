"""BalancedAV: both accepted layouts (AV_preprocess_tool hdf5 + pkl, raw mp4), its own validation subset, training
augmentation, deterministic evaluation, prepare -> cache, clear errors, and one CLI run of the paper preset.

Fixture trees use the real formats (HDF5 of JPEG bytes, pickled numpy |STFT|, mp4 written with PyAV) and the
real loader and preparer read them."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli
from fixtures_av import write_corrupt, write_hdf5_frames

from mmbalance.data import media
from mmbalance.data.balanced_av import LogAudio, build_balanced_av
from mmbalance.data.prepare import PreparedFolder, run_prepare
from mmbalance.errors import DataError

# the json's `labels` order is deliberately not alphabetical: it must be kept
LABELS = ["whistling", "clapping", "playing piano"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
SUBSETS = ["training", "training", "training", "validation", "testing"]
MISSING_ID = "nomedia_000001_000011"


def clip_ids(c: int) -> list[str]:
    """Ids in the release's mixed formats: <ytid>_<start6>_<end6>, <ytid>_<sec>, bare <ytid>."""
    return [f"-a{c}Bx_Y{k}_{10 * k:06d}_{10 * k + 10:06d}" if k % 3 == 0 else
            f"yt{c}{k}_{30 + k}" if k % 3 == 1 else f"Z{c}z{k}-q" for k in range(len(SUBSETS))]


def database() -> dict:
    db = {i: {"subset": s, "label": LABELS[c]} for c in range(3) for i, s in zip(clip_ids(c), SUBSETS)}
    db[MISSING_ID] = {"subset": "training", "label": LABELS[0]}  # annotated, but no media on disk
    return db


def spectrogram(label: int) -> np.ndarray:
    """A (257, 1003) magnitude whose level says the class (checked after loading and caching)."""
    rng = np.random.default_rng(label)
    return (label + 1.0 + 0.01 * rng.random((257, 1003))).astype(np.float32)


def write_preprocessed(root: Path, ids_labels: list[tuple[str, int]], frames: int = 10) -> None:
    for i, c in ids_labels:
        write_hdf5_frames(root / "all_frame" / f"{i}.hdf5", n=frames, size=32, colour=COLOURS[c], seed=c)
        (root / "all_spec").mkdir(parents=True, exist_ok=True)
        with open(root / "all_spec" / f"{i}.pkl", "wb") as f:
            pickle.dump(spectrogram(c), f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """<data>/balanced_av in the AV_preprocess_tool layout (json in a sub-folder, hdf5 + pkl folders)."""
    data = tmp_path_factory.mktemp("data")
    root = data / "balanced_av"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "Imbalance_train_test_val.json").write_text(
        json.dumps({"labels": LABELS, "database": database()}))
    write_preprocessed(root, [(i, c) for c in range(3) for i in clip_ids(c)])
    return data


@pytest.fixture(scope="module")
def root(data_dir) -> Path:
    return data_dir / "balanced_av"


@pytest.fixture(scope="module")
def raw(root):
    return build_balanced_av(str(root), image_size=32)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """The raw release: one mp4 per id (2 s, 10 fps, audio), plus the json at the root."""
    from fixtures_contract import bav_video_tree  # one tree description for this test and the contract test

    return bav_video_tree(tmp_path_factory.mktemp("bav_video"))


def ids_by_split(splits) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for s in ("train", "val", "test"):
        ds = getattr(splits, s)
        ds = ds.base if isinstance(ds, LogAudio) else ds
        if hasattr(ds, "clips"):
            out[s] = sorted((c.id, c.label) for c in ds.clips)
        else:  # CachedClipDataset: ids through the cache rows
            meta = json.loads((ds.cache_dir / "cache.json").read_text())
            out[s] = sorted((meta["ids"][r], int(y)) for r, y in zip(ds.rows, ds.labels))
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_av_preprocess_layout_classes_shapes_and_own_validation(raw, root):
    assert raw.notes["layout"] == "av_preprocess_tool"
    assert raw.notes["annotation"].endswith("Imbalance_train_test_val.json")
    assert raw.notes["visual_dir"] == str(root / "all_frame") and raw.notes["audio_dir"] == str(root / "all_spec")
    assert raw.class_names == LABELS and raw.num_classes == 3  # the json's order, not sorted
    assert raw.modalities["audio"].kind == "spectrogram" and raw.modalities["audio"].shape == (1, 257, 1003)
    assert raw.modalities["visual"].kind == "frames" and raw.modalities["visual"].shape == (3, 3, 32, 32)
    # the dataset's own validation subset is used (the peer's 'valid' never matched it)
    assert raw.val_source == "the dataset's own validation split"
    db = database()
    splits = ids_by_split(raw)
    want = {s: sorted((i, LABELS.index(e["label"])) for i, e in db.items() if e["subset"] == full and i != MISSING_ID)
            for s, full in (("train", "training"), ("val", "validation"), ("test", "testing"))}
    assert splits == want
    assert len(splits["train"]) == 9 and len(splits["val"]) == 3 and len(splits["test"]) == 3
    assert raw.notes["missing_media"] == 1 and MISSING_ID in raw.notes["missing_examples"][0]
    for ds in (raw.train, raw.test):
        for k in range(len(ds)):
            item = ds[k]
            assert item["inputs"]["audio"].shape == (1, 257, 1003)
            assert item["inputs"]["visual"].shape == (3, 3, 32, 32)
            # the magnitude as released (not log-scaled), and it belongs to this clip's class
            assert float(item["inputs"]["audio"].mean()) == pytest.approx(item["label"] + 1.0, abs=0.02)


def test_training_augments_and_evaluation_is_deterministic_centre_frames(raw):
    torch.manual_seed(0)
    train = [raw.train[0]["inputs"]["visual"] for _ in range(6)]
    assert any(not torch.equal(train[0], t) for t in train[1:])  # crop/flip/segment draws (the peer: none)
    a, b = raw.test[0]["inputs"]["visual"], raw.test[0]["inputs"]["visual"]
    assert torch.equal(a, b)
    # evaluation = the centre frame of each of 3 segments of the 10 frames, resized, ImageNet-normalised
    clip = raw.test.clips[0]
    frames = media.images_from_hdf5(clip.sources["visual"])
    idx = media.segment_indices(len(frames), 3, train=False)
    assert idx == [1, 4, 7]
    want = media.ClipTransform(32, False, "none", "imagenet")([media.read_image(frames[i]) for i in idx])
    assert torch.allclose(a, want)


def test_audio_log_option(root, raw):
    logged = build_balanced_av(str(root), image_size=32, audio_log=True)
    assert logged.notes["audio_log"] is True and raw.notes["audio_log"] is False
    x, y = logged.test[0]["inputs"]["audio"], raw.test[0]["inputs"]["audio"]
    assert torch.allclose(x, torch.log(y + 1e-7))


def test_prepare_cache_keeps_ids_labels_and_is_idempotent(root, raw, tmp_path):
    out = tmp_path / "prep"
    summary = run_prepare("balanced_av", root, out, progress=False, size=32)
    assert summary["layout"] == "av_preprocess_tool" and summary["clips"] == 15
    assert (summary["clips_train"], summary["clips_val"], summary["clips_test"]) == (9, 3, 3)
    assert summary["cached"] == 15 and summary["missing_media"] == 1 and summary["skipped"] == 1
    assert MISSING_ID in (out / "prepare_report.txt").read_text()
    assert PreparedFolder(out).classes() == LABELS
    assert {r["id"] for r in PreparedFolder(out).rows()} == {i for c in range(3) for i in clip_ids(c)}
    cached = build_balanced_av(prepared=str(out), image_size=32)
    assert cached.notes["source"] == "prepared" and cached.class_names == LABELS
    assert cached.val_source == "the dataset's own validation split"
    assert ids_by_split(cached) == ids_by_split(raw)
    assert cached.modalities == raw.modalities
    a, b = cached.test[1], raw.test[1]
    assert a["label"] == b["label"]
    assert torch.equal(a["inputs"]["visual"], b["inputs"]["visual"])  # uint8 frames at the same size
    assert torch.allclose(a["inputs"]["audio"], b["inputs"]["audio"], rtol=1e-3)  # float16 cache
    again = run_prepare("balanced_av", root, out, progress=False, size=32)
    assert again["cache_skipped_existing"] == 15 and again["cached"] == 15


def test_raw_video_layout_and_prepare_extracts_av_preprocess_tree(video_root, tmp_path):
    raw = build_balanced_av(str(video_root), image_size=32)
    assert raw.notes["layout"] == "video" and raw.notes["visual_dir"] == str(video_root / "videos")
    assert raw.modalities["audio"].shape == (1, 257, 1003)  # 10 s at 44.1 kHz, hop 440 (AV_preprocess_tool)
    assert len(raw.train) == 2 and len(raw.val) == 2 and len(raw.test) == 2
    item = raw.test[0]
    assert item["inputs"]["visual"].shape == (3, 3, 32, 32) and item["inputs"]["audio"].shape == (1, 257, 1003)

    out = tmp_path / "prep"
    summary = run_prepare("balanced_av", video_root, out, progress=False, size=32)
    assert summary["layout"] == "video" and summary["extracted"] == 6 and summary["cached"] == 6
    some = raw.test.clips[0].id
    with h5py.File(out / "visual" / f"{some}.hdf5", "r") as f:
        assert len(f["video"]) == 2  # 2 s at 1 fps
    spec = np.load(out / "audio" / f"{some}.npy")
    assert spec.shape == (257, 1003) and spec.dtype == np.float16
    # the extracted tree is an AV_preprocess_tool tree
    again = build_balanced_av(str(out), image_size=32)
    assert again.notes["layout"] == "av_preprocess_tool"
    assert ids_by_split(again) == ids_by_split(raw)
    # the tone's bin (300 or 600 Hz at 44.1 kHz / 512) carries the class, in the raw and in the cached audio
    cached = build_balanced_av(prepared=str(out), image_size=32)
    assert ids_by_split(cached) == ids_by_split(raw)
    for k in range(len(cached.test)):
        a = cached.test[k]
        peak = int(a["inputs"]["audio"][0].mean(dim=1).argmax())
        assert peak == round(300.0 * (a["label"] + 1) * 512 / 44100)
    assert torch.allclose(cached.test[0]["inputs"]["audio"], raw.test[0]["inputs"]["audio"], rtol=2e-3, atol=1e-3)
    second = run_prepare("balanced_av", video_root, out, progress=False, size=32)
    assert second["extract_skipped_existing"] == 6 and second["extracted"] == 0


def test_a_folder_prepared_with_another_stft_recipe_is_refused_naming_each_option(video_root, tmp_path):
    """The |STFT| arrays prepare computed from the videos are stored arrays; the folder still records every parameter
    they were computed with, so a config with another sample rate or hop refuses it instead of training on arrays
    that recipe never makes (`--set sr=22050` read with the default 44100 left half of every spectrogram silent)."""
    out = tmp_path / "prep"
    run_prepare("balanced_av", video_root, out, workers=1, progress=False, size=32, sr=22050, hop_length=880,
                audio_frames=502)
    assert json.loads((out / "recipe.json").read_text())["audio"] == {
        "recipe": "stft_magnitude", "sr": 22050, "seconds": 10.0, "n_fft": 512, "hop_length": 880,
        "pad_mode": "reflect", "frames": 502}
    with pytest.raises(DataError) as err:
        build_balanced_av(prepared=str(out), image_size=32)
    message = str(err.value)
    for line in ('audio: dataset.sr (sample rate) 22050 there, 44100 in this config',
                 'audio: dataset.hop_length (STFT hop) 880 there, 440 in this config',
                 'audio: dataset.audio_frames (spectrogram width) 502 there, 1003 in this config'):
        assert line in message, message
    assert all(f"--set {k}" in message for k in ("sr=44100", "hop_length=440", "audio_frames=1003"))
    assert "dataset.prepared=null" in message
    with pytest.raises(DataError) as err:  # the width alone does not make the arrays this config's
        build_balanced_av(prepared=str(out), image_size=32, audio_frames=502)
    assert "dataset.hop_length (STFT hop) 880 there, 440" in str(err.value)
    assert "dataset.sr (sample rate) 22050 there, 44100" in str(err.value)
    assert not any("audio_frames" in line for line in str(err.value).splitlines())
    same = build_balanced_av(prepared=str(out), image_size=32, sr=22050, hop_length=880, audio_frames=502)
    assert same.modalities["audio"].shape == (1, 257, 502)
    assert same.notes["cache_recipe"]["audio"]["sr"] == 22050


def small_tree(root: Path) -> list[str]:
    """Two classes, one clip per class and subset, 4 frames per clip."""
    ids = ["aa_000001_000011", "bb_5", "cc", "dd_7", "ee_000002_000012", "ff"]
    subsets = ["training", "training", "validation", "validation", "testing", "testing"]
    root.mkdir(parents=True, exist_ok=True)
    db = {i: {"subset": s, "label": LABELS[k % 2]} for k, (i, s) in enumerate(zip(ids, subsets))}
    (root / "ann.json").write_text(json.dumps({"labels": LABELS[:2], "database": db}))
    write_preprocessed(root, [(i, k % 2) for k, i in enumerate(ids)], frames=4)
    return ids


def item_of(splits, clip_id: str):
    """Read one clip by id from whichever split holds it (raises what the loader raises)."""
    for ds in (splits.train, splits.val, splits.test):
        for k, c in enumerate(ds.clips):
            if c.id == clip_id:
                return ds[k]
    raise KeyError(clip_id)


def test_corrupt_media_are_named_and_prepare_skips_them(tmp_path):
    root = tmp_path / "bav"
    ids = small_tree(root)
    bad_h5 = write_corrupt(root / "all_frame" / f"{ids[0]}.hdf5")
    bad_pkl = write_corrupt(root / "all_spec" / f"{ids[4]}.pkl")
    splits = build_balanced_av(str(root), image_size=32)
    with pytest.raises(DataError, match=str(bad_h5)):
        item_of(splits, ids[0])
    with pytest.raises(DataError, match=str(bad_pkl)):
        item_of(splits, ids[4])
    assert item_of(splits, ids[1])["label"] == 1
    summary = run_prepare("balanced_av", root, tmp_path / "prep", progress=False, size=32)
    assert summary["cache_failed"] == 2 and summary["cached"] == 4
    report = (tmp_path / "prep" / "prepare_report.txt").read_text()
    assert ids[0] in report and ids[4] in report and "HDF5" in report
    cached = build_balanced_av(prepared=str(tmp_path / "prep"), image_size=32)
    assert (len(cached.train), len(cached.val), len(cached.test)) == (1, 2, 1)  # the two bad clips are left out


def test_bad_trees_give_data_errors_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_balanced_av(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"{empty}.*annotation json"):
        build_balanced_av(str(empty))
    root = tmp_path / "bav"
    small_tree(root)
    with pytest.raises(DataError, match=str(root / "missing.json")):
        build_balanced_av(str(root), annotation="missing.json")
    shutil.rmtree(root / "all_spec")
    shutil.rmtree(root / "all_frame")
    with pytest.raises(DataError, match=rf"{root}: no BalancedAV media.*\.hdf5") as err:
        build_balanced_av(str(root))
    assert "<function" not in str(err.value)  # the layout is named by the media found: none here, so none named
    (root / "ann.json").write_text(json.dumps({"labels": ["x"], "database": {"a": {"subset": "dev", "label": "x"}}}))
    with pytest.raises(DataError, match=rf"{root / 'ann.json'}.*subset 'dev'"):
        build_balanced_av(str(root))


def test_cli_paper_preset_runs_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=paper_balanced_av", "method=ogm_ge", f"paths.data_dir={data_dir}",
                    f"paths.cache_dir={tmp_path / 'cache'}", "trainer.epochs=1", "trainer.batch_size=4",
                    "dataset.image_size=32", "dataset.audio_frames=64", "backbone=small", "hardware=cpu",
                    "trainer.progress_bar=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    assert metrics["val_source"] == "the dataset's own validation split"
    assert metrics["split_sizes"] == {"train": 9, "val": 3, "test": 3}
    assert metrics["dataset_notes"]["layout"] == "av_preprocess_tool"
    assert metrics["config"]["optimizer"]["lr"] == pytest.approx(5e-3)


def test_a_relative_root_finds_the_media(data_dir, raw, monkeypatch, tmp_path):
    """`dataset.root=balanced_av` / `prepare --root balanced_av`, relative to the working folder, with the media
    found in its sub-folders or pinned by a folder option (relative to the root); and a root path with braces."""
    monkeypatch.chdir(data_dir)
    assert ids_by_split(build_balanced_av("balanced_av", prepared=None, image_size=32)) == ids_by_split(raw)
    pinned = build_balanced_av("balanced_av", prepared=None, image_size=32, visual_dir="all_frame",
                               audio_dir="all_spec")
    assert ids_by_split(pinned) == ids_by_split(raw)
    summary = run_prepare("balanced_av", "balanced_av", tmp_path / "prep", workers=1, progress=False, cache=False)
    assert summary["clips"] == len(raw.train) + len(raw.val) + len(raw.test)
    braces = shutil.copytree(data_dir / "balanced_av", tmp_path / "{split}" / "balanced_av")  # any folder name
    assert ids_by_split(build_balanced_av(str(braces), prepared=None, image_size=32)) == ids_by_split(raw)
