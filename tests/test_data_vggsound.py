"""VGGSound: the csv class map, plain and zero-padded clip names, missing clips (link rot), every layout from a
real fixture tree (wav + OGM-GE frame folders named <id>.mp4, BalanceBenchmark .npy, raw mp4), the audio window
rule (random in training, centre at evaluation), sharded prepare -> cache, clear errors, one CLI run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from fixtures_av import write_corrupt, write_frames, write_video, write_wav
from mmbalance.data.clips import CachedClipDataset, ClipDataset
from mmbalance.data.prepare import run_prepare
from mmbalance.data.vggsound import build_vggsound, stft_reader
from mmbalance.errors import DataError

# csv order is NOT sorted (OGM-GE would number classes by first appearance); one label holds commas
ROWS = [  # ytid, start, label, split, file name zero-padded?
    ("-AbCdEfGhI1", 30, "playing cello", "train", False),
    ("BbCdEfGhI_2", 5, "playing cello", "train", True),
    ("CbCdEfGhI-3", 120, "playing cello", "test", False),
    ("DbCdEfGhIj4", 0, "dog barking", "train", True),
    ("EbCdEfGhIj5", 40, "dog barking", "train", False),
    ("FbCdEfGhIj6", 10, "dog barking", "test", True),
    ("GbCdEfGhIj7", 20, "engine accelerating, revving, vroom", "train", False),
    ("HbCdEfGhIj8", 7, "engine accelerating, revving, vroom", "train", True),
    ("IbCdEfGhIj9", 300, "engine accelerating, revving, vroom", "test", False),
]
MISSING = ("ZzGoneFromYT", 50, "dog barking", "train")  # listed in the csv, never downloaded
SORTED = ["dog barking", "engine accelerating, revving, vroom", "playing cello"]
COLOURS = {SORTED[0]: (200, 40, 40), SORTED[1]: (40, 200, 40), SORTED[2]: (40, 40, 200)}
TINY = dict(sample_rate=8000, clip_seconds=2.0, audio_seconds=1.0, n_fft=64, hop_length=64)  # (1, 33, 126)


def cid(ytid, start):
    return f"{ytid}_{start}"


def fname(ytid, start, padded):
    return f"{ytid}_{start:06d}" if padded else f"{ytid}_{start}"


def expected():
    return {cid(y, s): (SORTED.index(lab), split) for y, s, lab, split, _ in ROWS}


def _csv(root):
    lines = [f'{y},{s},"{lab}",{split}' if "," in lab else f"{y},{s},{lab},{split}"
             for y, s, lab, split in [r[:4] for r in ROWS] + [MISSING]]
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")


def _ogmge_tree(root):
    """OGM-GE: {train,test}-audios/{train,test}-set/<id>.wav and
    {train,test}-videos/{train,test}-set-img/Image-01-FPS/<id>.mp4/<n:05d>.jpg (the folder name ends in .mp4)."""
    root.mkdir(parents=True, exist_ok=True)
    _csv(root)
    for n, (y, s, lab, split, padded) in enumerate(ROWS):
        name = fname(y, s, padded)
        write_wav(root / f"{split}-audios" / f"{split}-set" / f"{name}.wav", seconds=1.5, sr=16000,
                  hz=300 + 150 * n, seed=n)
        write_frames(root / f"{split}-videos" / f"{split}-set-img" / "Image-01-FPS" / f"{name}.mp4", n=4, size=32,
                     template="{:05d}.jpg", colour=COLOURS[lab], seed=n)
    return root


@pytest.fixture(scope="module")
def ogmge(tmp_path_factory):
    return _ogmge_tree(tmp_path_factory.mktemp("vgg_ogmge"))


def _ids_labels(ds) -> list[tuple[str, int]]:
    ds = getattr(ds, "base", ds)  # the audio-window wrapper
    if isinstance(ds, ClipDataset):
        return [(c.id, c.label) for c in ds.clips]
    assert isinstance(ds, CachedClipDataset)
    ids = json.loads((ds.cache_dir / "cache.json").read_text())["ids"]
    return [(ids[r], int(lab)) for r, lab in zip(ds.rows, ds.labels)]


def test_ogmge_layout_sorted_classes_padded_names_and_missing_clips(ogmge):
    splits = build_vggsound(str(ogmge), image_size=32, **TINY)
    assert splits.class_names == SORTED and splits.num_classes == 3
    assert splits.notes["layout"] == "ogmge" and splits.notes["num_classes"] == 3
    # both naming conventions resolve; the never-downloaded clip is counted, not fatal
    assert splits.notes["clips"] == {"train": 6, "test": 3}
    assert splits.notes["missing_clips"] == 1 and splits.notes["missing_by_split"] == {"train": 1}
    sources = {c.id: c.sources for c in splits.test.base.clips + splits.train.base.clips + splits.val.base.clips}
    assert sources[cid("FbCdEfGhIj6", 10)]["audio"].endswith("test-set/FbCdEfGhIj6_000010.wav")
    assert sources[cid("FbCdEfGhIj6", 10)]["visual"].endswith("Image-01-FPS/FbCdEfGhIj6_000010.mp4")
    assert sources[cid("CbCdEfGhI-3", 120)]["audio"].endswith("test-set/CbCdEfGhI-3_120.wav")
    want = expected()
    assert {i: lab for i, lab in _ids_labels(splits.test)} == {i: v[0] for i, v in want.items() if v[1] == "test"}
    assert len(splits.train) + len(splits.val) == 6 and splits.val_source.startswith("carved from train")
    assert splits.modalities["audio"].shape == (1, 33, 126) and splits.modalities["visual"].shape == (3, 3, 32, 32)


def test_audio_window_is_random_in_training_and_the_centre_at_evaluation(ogmge):
    splits = build_vggsound(str(ogmge), image_size=32, **TINY)
    clip = splits.test.base.clips[0]
    full = stft_reader("wav", sample_rate=8000, clip_seconds=2.0, n_fft=64, hop_length=64, pad_mode="reflect")(
        clip.sources["audio"], train=False)
    assert full.shape == (1, 33, 251)  # the 1.5 s wav tiled to 2 s
    x = splits.test[0]["inputs"]["audio"]
    assert torch.equal(x, full[..., 62:188]) and torch.equal(splits.test[0]["inputs"]["audio"], x)
    train_clip = splits.train.base.clips[0]
    full_t = stft_reader("wav", sample_rate=8000, clip_seconds=2.0, n_fft=64, hop_length=64, pad_mode="reflect")(
        train_clip.sources["audio"], train=False)
    torch.manual_seed(0)
    starts = set()
    for _ in range(6):
        w = splits.train[0]["inputs"]["audio"]
        hits = [s for s in range(126) if torch.equal(w, full_t[..., s:s + 126])]
        assert hits, "a training window is a crop of the whole clip's spectrogram"
        starts.add(hits[0])
    assert len(starts) > 1


def test_balancebenchmark_layout_frame_folders_and_npy(tmp_path):
    _csv(tmp_path)
    for n, (y, s, lab, split, padded) in enumerate(ROWS):
        name = fname(y, s, padded)
        write_frames(tmp_path / f"video_{split}_root" / name, n=5, size=32, colour=COLOURS[lab], seed=n)
        (tmp_path / f"audio_{split}_root").mkdir(exist_ok=True)
        np.save(tmp_path / f"audio_{split}_root" / f"{name}.npy",
                np.random.default_rng(n).normal(size=(33, 40)).astype(np.float32))
    splits = build_vggsound(str(tmp_path), image_size=32)
    assert splits.notes["layout"] == "balancebenchmark" and splits.notes["missing_clips"] == 1
    assert splits.modalities["audio"].shape == (1, 33, 40)  # stored arrays are used as they are
    assert "audio_window_frames" not in splits.notes
    item = splits.test[0]
    assert item["inputs"]["audio"].shape == (1, 33, 40) and item["inputs"]["visual"].shape == (3, 3, 32, 32)


@pytest.fixture(scope="module")
def raw_mp4(tmp_path_factory):
    """Raw download: {train,test}/<ytid>_<start:06d>.mp4 (MPEG-4 + AAC)."""
    root = tmp_path_factory.mktemp("vgg_raw")
    _csv(root)
    for n, (y, s, lab, split, _) in enumerate(ROWS):
        write_video(root / split / f"{fname(y, s, True)}.mp4", seconds=2.0, fps=4, size=(48, 32), sr=16000,
                    hz=300 + 150 * n, colour=COLOURS[lab], seed=n)
    return root


def test_raw_mp4_sharded_prepare_then_cache_gives_the_same_clips(raw_mp4, tmp_path):
    raw = build_vggsound(str(raw_mp4), image_size=32, **TINY)
    assert raw.notes["layout"] == "raw" and raw.notes["missing_clips"] == 1
    x = raw.test[0]["inputs"]
    assert x["audio"].shape == (1, 33, 126) and x["visual"].shape == (3, 3, 32, 32)

    out = tmp_path / "prep"
    opts = dict(workers=1, progress=False, size=32, max_frames=3, **{k: v for k, v in TINY.items()
                                                                     if k != "audio_seconds"})
    first = run_prepare("vggsound", raw_mp4, out, shard="0/2", **opts)
    assert first["shard"] == "0/2" and first["shard_clips"] == 5 and first["audio_extracted"] == 5
    assert not (out / "manifest.csv").exists()
    second = run_prepare("vggsound", raw_mp4, out, shard="1/2", **opts)
    assert second["shard_clips"] == 4 and second["frames_extracted"] == 4
    final = run_prepare("vggsound", raw_mp4, out, cache=True, **opts)
    assert final["extract_skipped_existing"] == 9 and final["cached"] == 9 and final["missing_clips"] == 1
    assert "ZzGoneFromYT" in (out / "prepare_report.txt").read_text()
    assert json.loads((out / "classes.json").read_text())["classes"] == SORTED

    prepared = build_vggsound(None, prepared=str(out), image_size=32, **TINY)
    assert prepared.notes["cache"] is True and prepared.modalities["audio"].shape == (1, 33, 126)
    for split in ("train", "val", "test"):
        assert _ids_labels(getattr(prepared, split)) == _ids_labels(getattr(raw, split))
    y = prepared.test[0]["inputs"]
    # the cache holds the whole clip's spectrogram from the extracted 16-bit wav (float16); the eval window is the
    # same one. Compared as magnitudes: log(|S| + 1e-7) magnifies the 16-bit rounding in near-silent bins
    assert torch.allclose(y["audio"].exp(), x["audio"].exp(), rtol=0.02, atol=1e-3)

    uncached = tmp_path / "nocache"
    run_prepare("vggsound", raw_mp4, uncached, **opts)  # cache=false (the VGGSound default): wav + jpg decoded
    decoded = build_vggsound(None, prepared=str(uncached), image_size=32, **TINY)
    assert decoded.notes["cache"] is False and decoded.notes["sources"] == {"audio": "wav", "visual": "jpgdir"}
    assert _ids_labels(decoded.test) == _ids_labels(raw.test)
    assert torch.equal(decoded.test[0]["inputs"]["audio"], decoded.test[0]["inputs"]["audio"])


def test_errors_name_the_path(tmp_path, ogmge):
    with pytest.raises(DataError, match="dataset root '.*nowhere' is not a folder"):
        build_vggsound(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=f"clip list '{tmp_path}/vggsound.csv' does not exist"):
        build_vggsound(str(tmp_path))
    (tmp_path / "vggsound.csv").write_text("abc,1,dog barking,validation\n")
    with pytest.raises(DataError, match="vggsound.csv, line 1: split 'validation'; expected train or test"):
        build_vggsound(str(tmp_path))
    root = _ogmge_tree(tmp_path / "corrupt")
    bad = root / "test-audios" / "test-set" / f"{fname('CbCdEfGhI-3', 120, False)}.wav"
    write_corrupt(bad)
    splits = build_vggsound(str(root), image_size=32, **TINY)
    k = [c.id for c in splits.test.base.clips].index(cid("CbCdEfGhI-3", 120))
    with pytest.raises(DataError, match=str(bad)):
        splits.test[k]


def test_cli_paper_preset_trains_one_epoch(ogmge, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "vggsound").symlink_to(ogmge)
    run = tmp_path / "run"
    proc = run_cli(["experiment=paper_vggsound", "method=ogm_ge", f"paths.data_dir={data}", "trainer.epochs=1",
                    "trainer.batch_size=4", "dataset.image_size=32", "backbone=small", "hardware=cpu",
                    *[f"dataset.{k}={v}" for k, v in TINY.items()], "eval.flops=false", "eval.shapley_every=0",
                    "trainer.progress_bar=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "completed" and metrics["dataset_notes"]["layout"] == "ogmge"
    assert metrics["dataset_notes"]["missing_clips"] == 1
    assert metrics["split_sizes"] == {"train": 3, "val": 3, "test": 3}
