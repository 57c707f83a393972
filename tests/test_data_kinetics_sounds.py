"""Kinetics-Sounds: every accepted layout read from a real fixture tree (jpg folders, .npy/.pkl arrays, HDF5 of
jpeg bytes, mp4 with an AAC track), prepare -> cache -> the same clips, clear errors, one CLI run."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from fixtures_av import write_corrupt, write_frames, write_hdf5_frames
from mmbalance.data.clips import CachedClipDataset, ClipDataset
from mmbalance.data.kinetics_sounds import KS_CLASSES, build_kinetics_sounds
from mmbalance.data.prepare import run_prepare
from mmbalance.errors import DataError

# three classes, two training clips each and one test clip each (cvdf ids: <ytid>_<start:06d>_<end:06d>)
CLASSES = {2: "bowling", 11: "playing_drums", 30: "tickling"}
COLOURS = {2: (200, 40, 40), 11: (40, 200, 40), 30: (40, 40, 200)}
TRAIN = [(f"-tr{c:02d}x{k}AbCd_0000{10 + k}_0000{20 + k}", c) for c in CLASSES for k in range(2)]
TEST = [(f"te{c:02d}_YtId9_000030_000040", c) for c in CLASSES]
SPEC = (96, 40)  # a stored (frames, mel bins) fbank, OGM-GE's orientation, kept small


def _spec(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=SPEC).astype(np.float32)


def _ogmge_tree(root):
    """OGM-GE: my_train.txt/my_test.txt "<id>,10,<label_idx>", visual/<id>/frame_0000k.jpg, audio_spec/<id>.npy."""
    (root / "visual").mkdir(parents=True)
    (root / "audio_spec").mkdir()
    for name, rows in (("my_train.txt", TRAIN), ("my_test.txt", TEST)):
        (root / name).write_text("".join(f"{i},10,{c}\n" for i, c in rows))
    for n, (i, c) in enumerate(TRAIN + TEST):
        write_frames(root / "visual" / i, n=4, size=32, colour=COLOURS[c], seed=n)
        np.save(root / "audio_spec" / f"{i}.npy", _spec(n))
    return root


@pytest.fixture(scope="module")
def ogmge(tmp_path_factory):
    return _ogmge_tree(tmp_path_factory.mktemp("ks_ogmge"))


def _ids_labels(ds) -> list[tuple[str, int]]:
    if isinstance(ds, ClipDataset):
        return [(c.id, c.label) for c in ds.clips]
    assert isinstance(ds, CachedClipDataset)
    ids = json.loads((ds.cache_dir / "cache.json").read_text())["ids"]
    return [(ids[r], int(lab)) for r, lab in zip(ds.rows, ds.labels)]


def test_the_31_class_map_is_alphabetical_and_fixed():
    assert len(KS_CLASSES) == 31 and KS_CLASSES == sorted(KS_CLASSES)
    assert (KS_CLASSES[0], KS_CLASSES[2], KS_CLASSES[11], KS_CLASSES[30]) == \
        ("blowing_nose", "bowling", "playing_drums", "tickling")


def test_ogmge_layout_shapes_labels_and_sampling(ogmge):
    splits = build_kinetics_sounds(str(ogmge), image_size=32)
    assert splits.notes["layout"] == "ogmge" and splits.notes["missing_clips"] == 0
    assert splits.notes["sources"] == {"audio": "array: audio_spec/<id>.npy", "visual": "jpgdir: visual/<id>/"}
    assert splits.num_classes == 31 and splits.class_names == KS_CLASSES
    assert splits.modalities["audio"].shape == (1, 40, 96)  # (frames, mel bins) stored -> frequency first
    assert splits.modalities["visual"].shape == (3, 3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 3)
    assert splits.val_source.startswith("carved from train")
    assert sorted(_ids_labels(splits.test)) == sorted(TEST)
    assert sorted(_ids_labels(splits.train) + _ids_labels(splits.val)) == sorted(TRAIN)
    item = splits.test[0]
    clip = splits.test.clips[0]
    assert item["label"] == dict(TEST)[clip.id]
    n = [i for i, _ in TRAIN + TEST].index(clip.id)
    assert torch.equal(item["inputs"]["audio"], torch.from_numpy(_spec(n).T).unsqueeze(0))
    # evaluation is deterministic (centre frame of each segment, Resize); training draws a crop/flip per clip
    assert torch.equal(splits.test[0]["inputs"]["visual"], item["inputs"]["visual"])
    torch.manual_seed(0)
    draws = [splits.train[0]["inputs"]["visual"] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_balancebenchmark_layout_with_per_split_folders_and_a_missing_clip(tmp_path):
    """BalanceBenchmark: space-separated "<id> <label>" lists (label an index or a class name), frame folders and
    .npy arrays in per-split folders; a clip without audio is counted and left out, not fatal."""
    (tmp_path / "ks_train_overlap.txt").write_text("".join(f"{i} {c}\n" for i, c in TRAIN))
    (tmp_path / "ks_test_overlap.txt").write_text("".join(f"path/to/{i}.mp4 {CLASSES[c]}\n"
                                                          for i, c in TEST))
    for split, rows in (("train", TRAIN), ("test", TEST)):
        (tmp_path / f"audio_{split}").mkdir()
        for n, (i, c) in enumerate(rows):
            write_frames(tmp_path / f"visual_{split}" / i, n=3, size=32, colour=COLOURS[c])
            if (i, c) != TRAIN[0]:  # this clip's audio is missing
                np.save(tmp_path / f"audio_{split}" / f"{i}.npy", _spec(n))
    splits = build_kinetics_sounds(str(tmp_path), image_size=32)
    assert splits.notes["layout"] == "balancebenchmark"
    assert splits.notes["missing_clips"] == 1 and splits.notes["missing_by_modality"] == {"audio": 1, "visual": 0}
    assert splits.notes["missing_examples"] == [str(tmp_path / "audio_train" / f"{TRAIN[0][0]}.npy")]
    assert sorted(_ids_labels(splits.test)) == sorted(TEST)  # class names and paths in the list resolve
    assert len(splits.train) + len(splits.val) == len(TRAIN) - 1
    assert splits.test[1]["inputs"]["visual"].shape == (3, 3, 32, 32)


def test_bml_layout_json_hdf5_pkl_uses_its_own_validation_split(tmp_path):
    subsets = {"training": TRAIN[:4], "validation": TRAIN[4:], "testing": TEST}
    database = {i: {"subset": s, "label": CLASSES[c]} for s, rows in subsets.items() for i, c in rows}
    (tmp_path / "KS_train_val.json").write_text(json.dumps({"labels": KS_CLASSES, "database": database}))
    for n, (i, c) in enumerate(TRAIN + TEST):
        write_hdf5_frames(tmp_path / "hdf5" / f"{i}.hdf5", n=3, size=32, colour=COLOURS[c])
        (tmp_path / "audio_pkl").mkdir(exist_ok=True)
        with open(tmp_path / "audio_pkl" / f"{i}.pkl", "wb") as f:
            pickle.dump(np.abs(_spec(n).T[:9]), f)  # |STFT| (bins, frames), like AV_preprocess_tool's (257, 1003)
    splits = build_kinetics_sounds(str(tmp_path), image_size=32)
    assert splits.notes["layout"] == "bml"
    assert splits.notes["sources"]["visual"] == "hdf5: hdf5/<id>.hdf5"
    assert splits.val_source == "the dataset's own validation split"
    assert sorted(_ids_labels(splits.val)) == sorted(TRAIN[4:])
    assert splits.modalities["audio"].shape == (1, 9, 96)
    batch = splits.val[0]
    assert batch["inputs"]["visual"].shape == (3, 3, 32, 32) and batch["label"] == TRAIN[4][1]


def _kinetics_csv(path, rows, split):
    lines = ["label,youtube_id,time_start,time_end,split"]
    for i, c in rows:
        ytid, start, end = i.rsplit("_", 2)
        lines.append(f"{CLASSES[c].replace('_', ' ')},{ytid},{int(start)},{int(end)},{split}")
    lines.append(f"abseiling,NotKs123456,0,10,{split}")  # a Kinetics-400 class outside Kinetics-Sounds
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cvdf(tmp_path_factory):
    """The raw Kinetics download: annotations/{train,validate}.csv + {train,val}/<id>.mp4 (MPEG-4 + AAC)."""
    from fixtures_contract import ks_cvdf_tree  # one tree description for this test and the contract test

    return ks_cvdf_tree(tmp_path_factory.mktemp("ks_cvdf"))


TINY_FBANK = dict(audio_target_frames=48, num_mel_bins=32)


def test_cvdf_raw_mp4_prepare_cache_gives_the_same_clips(cvdf, tmp_path):
    raw = build_kinetics_sounds(str(cvdf), image_size=32, **TINY_FBANK)
    assert raw.notes["layout"] == "cvdf" and raw.notes["kinetics_val_used_as_test"]
    assert raw.notes["kinetics_rows_other_classes"] == 2
    assert raw.notes["sources"]["audio"].startswith("video") and raw.notes["sources"]["visual"].startswith("video")
    assert raw.modalities["audio"].shape == (1, 32, 48)
    x = raw.test[0]["inputs"]
    assert x["audio"].shape == (1, 32, 48) and x["visual"].shape == (3, 3, 32, 32)

    out = tmp_path / "prep"
    summary = run_prepare("kinetics_sounds", cvdf, out, workers=1, progress=False, size=32, max_frames=4,
                          **TINY_FBANK)
    assert summary["layout"] == "cvdf" and summary["audio_extracted"] == summary["frames_extracted"] == 9
    assert summary["cached"] == 9 and summary["prepared_formats"] == {"audio": "wav", "visual": "jpgdir"}
    clip = TEST[0][0]
    assert (out / "audio" / f"{clip}.wav").is_file()
    assert sorted(p.name for p in (out / "frames" / clip).iterdir()) == ["frame_00001.jpg", "frame_00002.jpg"]
    assert json.loads((out / "classes.json").read_text())["classes"] == KS_CLASSES

    prepared = build_kinetics_sounds(None, prepared=str(out), image_size=32, **TINY_FBANK)
    assert prepared.notes["layout"] == "prepared" and prepared.notes["cache"] is True
    for split in ("train", "val", "test"):
        assert _ids_labels(getattr(prepared, split)) == _ids_labels(getattr(raw, split))
    cached_x = prepared.test[0]["inputs"]
    assert cached_x["visual"].shape == (3, 3, 32, 32)
    # the cached fbank comes from the extracted 16-bit wav: the same recipe as decoding the mp4 directly
    assert torch.allclose(cached_x["audio"], x["audio"], atol=0.02)

    again = run_prepare("kinetics_sounds", cvdf, out, workers=1, progress=False, size=32, max_frames=4, **TINY_FBANK)
    assert again["extract_skipped_existing"] == 9 and again["cache_skipped_existing"] == 9
    assert again["audio_extracted"] == 0


def test_prepare_records_a_corrupt_file_and_the_cache_drops_the_clip(tmp_path):
    root = _ogmge_tree(tmp_path / "raw")
    bad = root / "visual" / TEST[1][0] / "frame_00002.jpg"
    write_corrupt(bad)
    summary = run_prepare("kinetics_sounds", root, tmp_path / "prep", workers=1, progress=False, size=32,
                          max_frames=4)
    assert summary["layout"] == "ogmge" and summary["cache_failed"] == 1 and summary["skipped"] == 1
    report = (tmp_path / "prep" / "prepare_report.txt").read_text()
    assert str(bad) in report
    prepared = build_kinetics_sounds(None, prepared=str(tmp_path / "prep"), image_size=32)
    assert prepared.notes["uncached_clips"] == 1
    assert TEST[1][0] not in [i for i, _ in _ids_labels(prepared.test)]


def test_corrupt_media_on_access_is_a_data_error_naming_the_file(tmp_path):
    root = _ogmge_tree(tmp_path)
    write_corrupt(root / "audio_spec" / f"{TEST[0][0]}.npy")
    write_corrupt(root / "visual" / TEST[1][0] / "frame_00002.jpg")
    splits = build_kinetics_sounds(str(root), image_size=32)
    by_id = {c.id: k for k, c in enumerate(splits.test.clips)}
    with pytest.raises(DataError, match=f"{TEST[0][0]}.npy"):
        splits.test[by_id[TEST[0][0]]]
    with pytest.raises(DataError, match="frame_00002.jpg"):
        splits.test[by_id[TEST[1][0]]]


def test_missing_split_file_and_wrong_root_are_clear_errors(tmp_path, ogmge):
    with pytest.raises(DataError, match="dataset root '.*nowhere' is not a folder"):
        build_kinetics_sounds(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no split file under"):
        build_kinetics_sounds(str(tmp_path))
    (tmp_path / "my_train.txt").write_text(f"{TRAIN[0][0]},10,2\n")
    with pytest.raises(DataError, match="my_test.txt' does not exist"):
        build_kinetics_sounds(str(tmp_path))
    with pytest.raises(DataError, match="split file '.*nope.txt' does not exist"):
        build_kinetics_sounds(str(ogmge), train_list="nope.txt", test_list="my_test.txt")
    (tmp_path / "bad_label.txt").write_text("abc_000001_000011,10,31\n")
    with pytest.raises(DataError, match="bad_label.txt, clip 'abc_000001_000011': label 31 is out of range"):
        build_kinetics_sounds(str(ogmge), train_list=str(tmp_path / "bad_label.txt"), test_list="my_test.txt")
    with pytest.raises(DataError, match="no visual file for any of the"):
        build_kinetics_sounds(str(ogmge), visual_dir="elsewhere")
    with pytest.raises(DataError, match="dataset.prepared '.*nothing' is not a folder"):
        build_kinetics_sounds(None, prepared=str(tmp_path / "nothing"))


def test_cli_paper_preset_trains_one_epoch(ogmge, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "kinetics_sounds").symlink_to(ogmge)
    run = tmp_path / "run"
    proc = run_cli(["experiment=paper_kinetics_sounds", "method=ogm_ge", f"paths.data_dir={data}",
                    "trainer.epochs=1", "trainer.batch_size=4", "dataset.image_size=32", "backbone=small",
                    "hardware=cpu", "eval.flops=false", "eval.shapley_every=0", "trainer.progress_bar=false",
                    f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    assert metrics["dataset_notes"]["layout"] == "ogmge"
    assert metrics["split_sizes"] == {"train": 3, "val": 3, "test": 3}
