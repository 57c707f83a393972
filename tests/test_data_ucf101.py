"""UCF-101 (RGB + pre-computed optical flow): the three accepted layouts, split files and class maps, the joint
RGB/flow flip with u negated, deterministic evaluation, prepare -> cache, clear errors, one CLI run.

Fixture trees are real jpg folders (RGB via fixtures_av, 8-bit grey u/v flow written with PIL) in each native
layout; the real loader and preparer read them."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli
from fixtures_av import write_corrupt, write_frames
from PIL import Image

from mmbalance.data import media
from mmbalance.data.prepare import PreparedFolder, run_prepare
from mmbalance.data.ucf101 import build_ucf101
from mmbalance.errors import DataError

# HandstandPushups: the split files name its videos v_HandStandPushups_..., extractions often v_Handstand...
CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
N_RGB, N_FLOW = 6, 5  # per video; twostreamfusion flow has one frame fewer than RGB
W, H = 40, 32  # non-square frames, resized to S x S


def video_name(c: int, g: int) -> str:
    return f"v_{CLASSES[c].replace('Handstand', 'HandStand')}_g{g:02d}_c01"


def folder_name(c: int, g: int) -> str:
    return video_name(c, g).replace("HandStand", "Handstand")


def flow_images(k: int) -> tuple[Image.Image, Image.Image]:
    """u, v grey jpgs that are NOT left-right symmetric, and u is far from 128 (zero motion), so a flip that
    forgets to negate u, or flips only one of them, is visible."""
    xx = np.tile(np.arange(W, dtype=np.float32), (H, 1))
    yy = np.tile(np.arange(H, dtype=np.float32)[:, None], (1, W))
    u = 30.0 + 4.0 * xx + k
    v = 220.0 - 3.0 * xx + yy
    return (Image.fromarray(np.clip(u, 0, 255).astype(np.uint8), "L"),
            Image.fromarray(np.clip(v, 0, 255).astype(np.uint8), "L"))


def make_tree(root: Path, layout: str = "twostreamfusion") -> None:
    """3 classes x 4 groups; split 1: groups 1-3 train, 4 test; split 2: groups 2-4 train, 1 test."""
    split_dir = root / "ucfTrainTestlist"
    split_dir.mkdir(parents=True)
    (split_dir / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    for k, test_group in ((1, 4), (2, 1)):
        train = [f"{CLASSES[c]}/{video_name(c, g)}.avi {c + 1}"
                 for c in range(3) for g in range(1, 5) if g != test_group]
        test = [f"{CLASSES[c]}/{video_name(c, test_group)}.avi" for c in range(3)]
        (split_dir / f"trainlist0{k}.txt").write_text("\n".join(train) + "\n")
        (split_dir / f"testlist0{k}.txt").write_text("\n".join(test) + "\n")
    for c in range(3):
        for g in range(1, 5):
            name = folder_name(c, g)
            if layout == "twostreamfusion":
                rgb, u_dir, v_dir = (root / "jpegs_256" / name, root / "tvl1_flow" / "u" / name,
                                     root / "tvl1_flow" / "v" / name)
                rgb_t, u_t, v_t = "frame{:06d}.jpg", "frame{:06d}.jpg", "frame{:06d}.jpg"
            elif layout == "balancebenchmark":
                rgb, u_dir, v_dir = (root / "visual" / name, root / "flow" / "u" / name, root / "flow" / "v" / name)
                rgb_t, u_t, v_t = "frame_{:05d}.jpg", "frame{:06d}.jpg", "frame{:06d}.jpg"
            else:  # mmaction2 rawframes: RGB and flow in one folder, told apart by prefix
                rgb = u_dir = v_dir = root / "rawframes" / CLASSES[c] / name
                rgb_t, u_t, v_t = "img_{:05d}.jpg", "flow_x_{:05d}.jpg", "flow_y_{:05d}.jpg"
            write_frames(rgb, n=N_RGB, size=(W, H), template=rgb_t, colour=COLOURS[c], seed=c)
            u_dir.mkdir(parents=True, exist_ok=True)
            v_dir.mkdir(parents=True, exist_ok=True)
            for k in range(N_FLOW):
                u, v = flow_images(k)
                u.save(u_dir / u_t.format(k + 1), quality=95)
                v.save(v_dir / v_t.format(k + 1), quality=95)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    make_tree(data / "ucf101")
    return data


@pytest.fixture(scope="module")
def root(data_dir) -> Path:
    return data_dir / "ucf101"


@pytest.fixture(scope="module")
def raw(root):
    return build_ucf101(str(root), image_size=32)


def ids(splits) -> dict[str, list[tuple[str, int]]]:
    return {s: sorted((c.id, c.label) for c in getattr(splits, s).clips) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, rgb_kind, flow_kind", [
    ("twostreamfusion", "twostreamfusion jpegs_256", "twostreamfusion tvl1_flow u/v"),
    ("balancebenchmark", "BalanceBenchmark frame folders", "twostreamfusion tvl1_flow u/v"),
    ("mmaction", "mmaction rawframes", "mmaction rawframes flow_x/flow_y"),
])
def test_every_layout_loads_with_classind_classes(tmp_path, layout, rgb_kind, flow_kind):
    make_tree(tmp_path / "ucf", layout)
    splits = build_ucf101(str(tmp_path / "ucf"), image_size=32)
    assert splits.notes["visual_layout"] == rgb_kind and splits.notes["flow_layout"] == flow_kind
    assert splits.class_names == CLASSES and splits.num_classes == 3
    assert splits.modalities["visual"].kind == "frames" and splits.modalities["visual"].shape == (3, 3, 32, 32)
    assert splits.modalities["flow"].kind == "frames" and splits.modalities["flow"].shape == (3, 2, 32, 32)
    assert splits.notes["missing_videos"] == 0
    # testlist has no labels: they come from the class folder; the split-file names (HandStand) find the
    # extracted folders (Handstand)
    assert ids(splits)["test"] == sorted((video_name(c, 4), c) for c in range(3))
    assert len(splits.train) + len(splits.val) == 9 and len(splits.val) == 3
    # 3 of the 9 training videos (one per class, the minimum): the text states the share carved (clips.py)
    assert splits.val_source.startswith("carved from train (stratified, ")
    item = splits.test[2]
    assert item["inputs"]["visual"].shape == (3, 3, 32, 32) and item["inputs"]["flow"].shape == (3, 2, 32, 32)
    # RGB keeps its class colour (ImageNet-normalised: the dominant channel is the class's)
    mean = item["inputs"]["visual"].mean(dim=(0, 2, 3))
    assert int(mean.argmax()) == item["label"]
    # flow is scaled to [-1, 1] and u is the left-to-right ramp written to disk
    u = item["inputs"]["flow"][:, 0]
    assert u.min() >= -1.0 and u.max() <= 1.0 and bool((u[..., -1] > u[..., 0]).all())


@pytest.mark.parametrize("source", ["raw", "prepared"])
def test_flip_is_joint_and_negates_u_only(root, tmp_path, source):
    # frames = every frame, so the segment draw cannot change which frames are read: only the flip differs
    kw = dict(image_size=32, frames=N_RGB, flow_frames=N_FLOW)
    if source == "prepared":
        run_prepare("ucf101", root, tmp_path / "prep", progress=False, size=32)
        kw["prepared"] = str(tmp_path / "prep")
    else:
        kw["root"] = str(root)
    splits = build_ucf101(**kw)
    train = splits.train
    evaluation = copy.copy(train)
    evaluation.train = False
    ref = evaluation.item(0)["inputs"]
    u0, v0 = ref["flow"][:, 0], ref["flow"][:, 1]
    assert not torch.allclose(u0, u0.flip(-1), atol=0.05) and not torch.allclose(v0, v0.flip(-1), atol=0.05)
    seen = set()
    for seed in range(12):
        out = train.item(0, torch.Generator().manual_seed(seed))["inputs"]
        flipped = torch.allclose(out["visual"], ref["visual"].flip(-1), atol=1e-5)
        assert flipped or torch.allclose(out["visual"], ref["visual"], atol=1e-5)
        u, v = out["flow"][:, 0], out["flow"][:, 1]
        if flipped:  # RGB mirrored -> u mirrored AND negated, v only mirrored
            assert torch.allclose(u, -u0.flip(-1), atol=1e-5)
            assert torch.allclose(v, v0.flip(-1), atol=1e-5)
        else:
            assert torch.allclose(u, u0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
        seen.add(flipped)
    assert seen == {True, False}


def test_evaluation_is_deterministic_centre_frames(raw):
    torch.manual_seed(0)
    a = raw.test[1]["inputs"]
    torch.manual_seed(123)
    b = raw.test[1]["inputs"]
    assert torch.equal(a["visual"], b["visual"]) and torch.equal(a["flow"], b["flow"])
    clip = raw.test.clips[1]
    files = media.list_frames(clip.sources["visual"])
    idx = media.segment_indices(len(files), 3, train=False)
    assert idx == [0, 2, 4]  # centres of [0, 2), [2, 4), [4, 6)
    want = media.ClipTransform(32, False, "none", "imagenet")([media.read_image(files[i]) for i in idx])
    assert torch.allclose(a["visual"], want)
    # training draws differ (segment frames, flips)
    torch.manual_seed(0)
    draws = [raw.train[0]["inputs"]["visual"] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_prepare_cache_keeps_ids_labels_for_every_split(root, raw, tmp_path):
    out = tmp_path / "prep"
    summary = run_prepare("ucf101", root, out, progress=False, size=32)
    assert summary["videos"] == 12 and summary["cached"] == 12 and summary["missing_videos"] == 0
    assert summary["splits_in_manifest"] == [1, 2]
    assert PreparedFolder(out).classes() == CLASSES
    rows = PreparedFolder(out).rows()
    assert {r["n_visual"] for r in rows} == {str(N_RGB)} and {r["n_flow"] for r in rows} == {str(N_FLOW)}
    cached = build_ucf101(prepared=str(out), image_size=32)
    assert cached.notes["source"] == "prepared" and cached.class_names == CLASSES
    assert ids(cached) == ids(raw)
    a, b = cached.test[0], raw.test[0]
    assert a["label"] == b["label"]
    assert torch.allclose(a["inputs"]["flow"], b["inputs"]["flow"], atol=0.02)  # cached at 32 px, uint8
    assert torch.allclose(a["inputs"]["visual"], b["inputs"]["visual"], atol=0.1)
    # the cache's frame size is the folder's recipe: a config with another is refused, for every modality
    with pytest.raises(DataError) as err:
        build_ucf101(prepared=str(out), image_size=64)
    for m in ("visual", "flow"):
        assert f"{m}: dataset.image_size (frame size) 32 there, 64 in this config" in str(err.value)
    assert "--set size=64" in str(err.value) and "dataset.prepared=null" in str(err.value)
    # one cache serves split 2 too
    assert ids(build_ucf101(prepared=str(out), split=2, image_size=32)) == \
        ids(build_ucf101(str(root), split=2, image_size=32))
    again = run_prepare("ucf101", root, out, progress=False, size=32)
    assert again["cache_skipped_existing"] == 12


def test_a_cache_that_keeps_fewer_frames_than_the_clips_have_says_so(tmp_path, caplog):
    """Segment sampling then draws from the kept frames, not from all of a clip's: the prepare warns, counted."""
    root = tmp_path / "ucf"
    make_tree(root, "twostreamfusion")
    with caplog.at_level("WARNING", logger="mmbalance"):
        summary = run_prepare("ucf101", root, tmp_path / "prep", progress=False, size=32, max_frames=N_FLOW - 1)
    assert summary["cache_clips_subsampled"] == 12
    assert any(f"12 of the 12 clips cached now have more than max_frames={N_FLOW - 1} frames" in r.getMessage()
               for r in caplog.records)
    kept = run_prepare("ucf101", root, tmp_path / "all", progress=False, size=32, max_frames=N_RGB)
    assert kept["cache_clips_subsampled"] == 0


def test_missing_and_corrupt_frames(tmp_path):
    root = tmp_path / "ucf"
    make_tree(root)
    shutil.rmtree(root / "tvl1_flow" / "v" / folder_name(0, 1))  # a video without flow
    bad = write_corrupt(root / "jpegs_256" / folder_name(1, 4) / "frame000003.jpg")
    splits = build_ucf101(str(root), image_size=32)
    assert splits.notes["missing_videos"] == 1 and splits.notes["missing_examples"] == [video_name(0, 1)]
    k = next(i for i, c in enumerate(splits.test.clips) if c.id == video_name(1, 4))
    with pytest.raises(DataError, match=str(bad)):
        splits.test[k]
    summary = run_prepare("ucf101", root, tmp_path / "prep", progress=False, size=32)
    assert summary["missing_videos"] == 1 and summary["cache_failed"] == 1 and summary["cached"] == 10
    report = (tmp_path / "prep" / "prepare_report.txt").read_text()
    assert video_name(0, 1) in report and str(bad) in report


def test_bad_trees_give_data_errors_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_ucf101(str(tmp_path / "nowhere"))
    root = tmp_path / "ucf"
    make_tree(root)
    (root / "ucfTrainTestlist" / "trainlist01.txt").unlink()
    with pytest.raises(DataError, match=str(root / "ucfTrainTestlist" / "trainlist01.txt")):
        build_ucf101(str(root))
    assert len(build_ucf101(str(root), split=2).test) == 3  # the other split still works
    shutil.rmtree(root / "tvl1_flow")
    with pytest.raises(DataError, match=rf"{root}: no optical flow folders.*tvl1_flow"):
        build_ucf101(str(root), split=2)
    assert build_ucf101(str(root), split=2, modalities=["visual"]).modalities.keys() == {"visual"}
    shutil.rmtree(root / "ucfTrainTestlist")
    with pytest.raises(DataError, match=rf"{root}: no UCF-101 split files"):
        build_ucf101(str(root))


def test_cli_paper_preset_runs_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=paper_ucf101", "method=ogm_ge", f"paths.data_dir={data_dir}",
                    f"paths.cache_dir={tmp_path / 'cache'}", "trainer.epochs=1", "trainer.batch_size=4",
                    "dataset.image_size=32", "backbone=small", "hardware=cpu", "trainer.progress_bar=false",
                    f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    assert metrics["split_sizes"] == {"train": 6, "val": 3, "test": 3}
    assert metrics["dataset_notes"]["flow_layout"] == "twostreamfusion tvl1_flow u/v"
    assert metrics["config"]["optimizer"]["lr"] == pytest.approx(1e-2)


def test_a_crop_drawn_on_rgb_moves_to_a_differently_sized_flow_frame():
    p = {"flip": True, "crop": (10, 20, 100, 200), "angle": 0.0}
    assert media.move_crop(p, (256, 340), (128, 170)) == {"flip": True, "crop": (5, 10, 50, 100), "angle": 0.0}
    assert media.move_crop(p, (256, 340), (256, 340)) is p
    assert media.move_crop({"flip": False, "crop": None, "angle": 0.0}, (256, 340), (64, 64))["crop"] is None


def test_a_video_in_both_the_train_and_the_test_list_is_refused(tmp_path):
    """A video listed in trainlist and testlist would be trained and tested on: refused by the loader and by
    prepare (which reads every split's lists for its split1..3 columns), naming both files."""
    root = tmp_path / "ucf"
    make_tree(root)
    lists = root / "ucfTrainTestlist"
    with (lists / "testlist02.txt").open("a") as f:  # a split-2 training video (group 2), in other case
        f.write(f"{CLASSES[0]}/{video_name(0, 2).upper()}.avi\n")
    with pytest.raises(DataError, match=rf"{video_name(0, 2).upper()}' is listed twice, in .*trainlist02\.txt and "
                                        rf".*testlist02\.txt"):
        build_ucf101(str(root), split=2)
    assert len(build_ucf101(str(root), split=1, image_size=32).test) == 3  # split 1 is sound
    with pytest.raises(DataError, match="listed twice"):
        run_prepare("ucf101", root, tmp_path / "prep", workers=1, progress=False, cache=False)
