"""CREMA-D on tiny fixture trees in each native layout, through the real loader and the real prepare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from fixtures_av import write_corrupt, write_frames, write_video, write_wav
from mmbalance.data.clips import CachedClipDataset, ClipDataset
from mmbalance.data.cremad import LABEL_MAPS, build_cremad, parse_clip_name
from mmbalance.data.prepare import run_prepare
from mmbalance.errors import DataError, UserError

ACTORS = ("1001", "1002", "1003", "1004")
EMOS = {"ANG": 300.0, "HAP": 700.0, "SAD": 1100.0}  # a tone per emotion, so audio carries the class
SIZE = 32


def clip_ids(actors=ACTORS, emos=tuple(EMOS)):
    return [f"{a}_DFA_{e}_XX" for a in actors for e in emos]


def raw_tree(root: Path, ids=None) -> Path:
    """The CREMA-D release: AudioWAV/<clip>.wav (16 kHz) + VideoFlash/<clip>.flv (FLV1, 2.5 s)."""
    for i, cid in enumerate(ids or clip_ids()):
        hz = EMOS[cid.split("_")[2]]
        write_wav(root / "AudioWAV" / f"{cid}.wav", 1.2, 16000, hz=hz, seed=i)
        write_video(root / "VideoFlash" / f"{cid}.flv", seconds=2.5, fps=10, size=(48, 40), hz=hz, seed=i)
    return root


def ogmge_tree(root: Path) -> Path:
    """OGM-GE: Image-01-FPS/<clip>/<absframe:05d>.jpg at 1 fps of 30 fps video, AudioWAV, and the split csvs
    (`<clip>,<EMO>`, UTF-8 with BOM) in data/CREMAD/ as in the OGM-GE repository."""
    ids = clip_ids()
    for i, cid in enumerate(ids):
        write_frames(root / "Image-01-FPS" / cid, n=3, size=(48, 40), template="{:05d}.jpg", start=0, seed=i)
        for k, p in enumerate(sorted((root / "Image-01-FPS" / cid).iterdir())):  # 00000, 00030, 00060
            p.rename(p.with_name(f"{k * 30:05d}.jpg.tmp"))
        for p in (root / "Image-01-FPS" / cid).iterdir():
            p.rename(p.with_name(p.name[:-4]))
        write_wav(root / "AudioWAV" / f"{cid}.wav", 1.0, 16000, hz=EMOS[cid.split("_")[2]], seed=i)
    lists = root / "data" / "CREMAD"
    lists.mkdir(parents=True)
    test = [c for c in ids if c.startswith("1004")]
    (lists / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in ids if c not in test)
                                     + "1005_DFA_NEU_XX,NEU\n", encoding="utf-8-sig")  # listed, not on disk
    (lists / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in test), encoding="utf-8-sig")
    return root


def bb_tree(root: Path) -> Path:
    """MMPareto / BalanceBenchmark: visual/<clip>/frame_0000k.jpg + audio/<clip>.pt + stat/train/test.csv."""
    ids = clip_ids()
    (root / "audio").mkdir(parents=True)
    for i, cid in enumerate(ids):
        write_frames(root / "visual" / cid, n=3, size=(40, 40), seed=i)
        torch.save(torch.randn(300, 128, generator=torch.Generator().manual_seed(i)), root / "audio" / f"{cid}.pt")
    (root / "stat.csv").write_text("\n".join(sorted(EMOS)) + "\n")
    (root / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in ids if not c.startswith("1001")))
    (root / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in ids if c.startswith("1001")))
    return root


def ids_and_labels(ds) -> list[tuple[str, int]]:
    if isinstance(ds, ClipDataset):
        return [(c.id, c.label) for c in ds.clips]
    assert isinstance(ds, CachedClipDataset)
    meta = json.loads((ds.cache_dir / "cache.json").read_text())
    return [(meta["ids"][r], int(lab)) for r, lab in zip(ds.rows, ds.labels)]


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return raw_tree(tmp_path_factory.mktemp("cremad") / "raw")


# ---------------------------------------------------------------------------------------------------------------
# layouts


def test_raw_layout_decodes_flv_and_wav(raw_root):
    s = build_cremad(str(raw_root), image_size=SIZE)
    assert s.notes["layout"] == "raw" and s.notes["clips"] == 12 and s.notes["missing_files"] == 0
    assert list(s.modalities) == ["audio", "visual"]
    assert s.modalities["audio"].shape == (1, 257, 188) and s.modalities["visual"].shape == (2, 3, SIZE, SIZE)
    assert s.num_classes == 6 and s.class_names == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    # generated stratified split: one test clip per emotion, validation carved from train
    assert (len(s.train), len(s.val), len(s.test)) == (6, 3, 3) and "carved from train" in s.val_source
    item = s.test[0]
    cid, label = s.test.clips[0].id, s.test.clips[0].label
    assert label == s.class_names.index(parse_clip_name(cid)[1]) == item["label"]
    assert item["inputs"]["visual"].shape == (2, 3, SIZE, SIZE) and item["inputs"]["audio"].shape == (1, 257, 188)
    # the emotion's tone is the loudest band of the OGM-GE spectrogram (22,050 Hz / 512 bins)
    hz = EMOS[parse_clip_name(cid)[1]]
    assert abs(int(item["inputs"]["audio"][0].mean(1).argmax()) - hz / (22050 / 512)) <= 1
    # evaluation is deterministic, training is not
    assert torch.equal(s.test[0]["inputs"]["visual"], s.test[0]["inputs"]["visual"])
    # the split does not depend on the order files are listed: same ids on a second build
    assert [c.id for c in build_cremad(str(raw_root), image_size=SIZE).test.clips] == [c.id for c in s.test.clips]


def test_ogmge_layout_with_split_files_found_under_root(tmp_path):
    root = ogmge_tree(tmp_path / "ogm")
    s = build_cremad(str(root), image_size=SIZE)
    assert s.notes["layout"] == "ogmge" and "data/CREMAD/train.csv" in s.notes["split"]
    assert s.notes["missing_files"] == 2  # 1005_DFA_NEU_XX is listed but has neither wav nor frames
    assert s.notes["not_in_split_files"] == 0
    assert {c.id[:4] for c in s.test.clips} == {"1004"} and len(s.test) == 3
    assert len(s.train) + len(s.val) == 9
    # frames named by absolute index (00000, 00030, 00060) are sorted naturally; eval picks segment centres
    x = s.test[0]["inputs"]["visual"]
    assert x.shape == (2, 3, SIZE, SIZE)
    # an explicit split file path works too (relative to root)
    s2 = build_cremad(str(root), image_size=SIZE, split="files", train_split="data/CREMAD/train.csv",
                      test_split="data/CREMAD/test.csv")
    assert [c.id for c in s2.test.clips] == [c.id for c in s.test.clips]


def test_balancebenchmark_layout_reads_pt_audio_with_sorted_labels(tmp_path):
    root = bb_tree(tmp_path / "bb")
    s = build_cremad(str(root), image_size=SIZE, label_map="sorted")
    assert s.notes["layout"] == "balancebenchmark" and "spectrogram arrays (.pt)" in s.notes["audio"]
    assert s.modalities["audio"].shape == (1, 128, 300)  # (T, F) fbank stored frames-first, read frequency-first
    assert s.class_names == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert {c.id[:4] for c in s.test.clips} == {"1001"}
    # a clip on disk that no split file lists is counted, not used
    (root / "visual" / "1009_DFA_ANG_XX").mkdir()
    torch.save(torch.zeros(300, 128), root / "audio" / "1009_DFA_ANG_XX.pt")
    s = build_cremad(str(root), image_size=SIZE, label_map="sorted")
    assert s.notes["not_in_split_files"] == 1 and s.notes["clips"] == 12
    for c in s.test.clips:
        assert c.label == LABEL_MAPS["sorted"].index(parse_clip_name(c.id)[1])
    assert s.test[1]["inputs"]["audio"].shape == (1, 128, 300)
    # audio=wav with no AudioWAV folder: a clear error naming the root
    with pytest.raises(DataError, match=r"no known layout under '.*bb'.*audio='wav'"):
        build_cremad(str(root), audio="wav")


def test_label_maps_differ_only_in_order(raw_root):
    a = build_cremad(str(raw_root), image_size=SIZE, label_map="ogmge")
    b = build_cremad(str(raw_root), image_size=SIZE, label_map="sorted")
    for ca, cb in zip(a.test.clips, b.test.clips):
        assert ca.id == cb.id and a.class_names[ca.label] == b.class_names[cb.label]
    assert {"ANG": 5, "NEU": 0} == {e: a.class_names.index(e) for e in ("ANG", "NEU")}
    assert {"ANG": 0, "NEU": 4} == {e: b.class_names.index(e) for e in ("ANG", "NEU")}
    with pytest.raises(DataError, match="label_map='alphabetical'"):
        build_cremad(str(raw_root), label_map="alphabetical")


def test_speaker_split_has_disjoint_actors(raw_root):
    s = build_cremad(str(raw_root), image_size=SIZE, split="speaker", test_fraction=0.25, val_fraction=0.34)
    actors = {name: {c.id.split("_")[0] for c in getattr(s, name).clips} for name in ("train", "val", "test")}
    assert all(actors.values())
    assert not (actors["train"] & actors["val"] or actors["train"] & actors["test"] or actors["val"] & actors["test"])
    assert set().union(*actors.values()) == set(ACTORS)
    assert "speaker-disjoint" in s.val_source and "speaker-disjoint" in s.notes["split"]
    again = build_cremad(str(raw_root), image_size=SIZE, split="speaker", test_fraction=0.25, val_fraction=0.34)
    assert [c.id for c in again.test.clips] == [c.id for c in s.test.clips]  # seeded


# ---------------------------------------------------------------------------------------------------------------
# prepare and the cache


def test_prepare_extracts_frames_caches_and_matches_raw(raw_root, tmp_path):
    out = tmp_path / "prep"
    summary = run_prepare("cremad", raw_root, out, workers=1, progress=False, image_size=SIZE)
    assert summary["layout"] == "raw" and summary["frames_extracted"] == 12 and summary["cached"] == 12
    assert summary["skipped"] == 0 and summary["train_clips"] + summary["test_clips"] == 12
    assert sorted(p.name for p in (out / "frames" / "1001_DFA_ANG_XX").iterdir()) == ["frame_00001.jpg",
                                                                                    "frame_00002.jpg"]
    assert json.loads((out / "classes.json").read_text())["classes"] == LABEL_MAPS["ogmge"]
    raw = build_cremad(str(raw_root), image_size=SIZE)
    prep = build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    assert prep.notes["layout"] == "prepared" and prep.modalities == raw.modalities
    for split in ("train", "val", "test"):
        assert ids_and_labels(getattr(prep, split)) == ids_and_labels(getattr(raw, split))
    for i in range(len(raw.test)):
        a, b = raw.test[i], prep.test[i]
        assert a["label"] == b["label"]
        # audio: float16 of the same spectrogram; visual: flv decode vs jpg (q95) extracted frames
        assert torch.allclose(a["inputs"]["audio"], b["inputs"]["audio"], atol=2e-2, rtol=1e-2)
        assert (a["inputs"]["visual"] - b["inputs"]["visual"]).abs().mean() < 0.05
    # a second prepare keeps the frames and the cache
    again = run_prepare("cremad", raw_root, out, workers=1, progress=False, image_size=SIZE)
    assert again["frames_existing"] == 12 and again["frames_extracted"] == 0
    assert again["cache_skipped_existing"] == 12
    # a different split at build time recomputes from the manifest, still on the cache
    spk = build_cremad("/nonexistent", prepared=str(out), image_size=SIZE, split="speaker")
    assert isinstance(spk.test, CachedClipDataset) and "speaker-disjoint" in spk.val_source


def test_corrupt_flv_is_reported_and_skipped(tmp_path):
    ids = clip_ids(ACTORS[:3])
    root = raw_tree(tmp_path / "raw", ids)
    bad = write_corrupt(root / "VideoFlash" / f"{ids[4]}.flv")
    (root / "AudioWAV" / f"{ids[0]}.wav").unlink()  # a missing wav
    summary = run_prepare("cremad", root, tmp_path / "prep", workers=1, progress=False, image_size=SIZE)
    assert summary["video_failed"] == 1 and summary["missing_files"] == 1 and summary["cached"] == 7
    report = (tmp_path / "prep" / "prepare_report.txt").read_text()
    assert str(bad) in report and f"{ids[0]}.wav\tmissing audio file" in report
    rows = (tmp_path / "prep" / "manifest.csv").read_text()
    assert ids[4] not in rows and ids[0] not in rows
    # the raw loader names the corrupt file when it meets it
    s = build_cremad(str(root), image_size=SIZE, split="speaker", test_fraction=0.34, val_fraction=0.0)
    ds = next(d for d in (s.train, s.val, s.test) if any(c.id == ids[4] for c in d.clips))
    k = next(i for i, c in enumerate(ds.clips) if c.id == ids[4])
    with pytest.raises(DataError, match=str(bad)):
        ds[k]


def test_errors_name_the_path(tmp_path, raw_root):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_cremad(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    (empty / "AudioWAV").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"no known layout under '{empty}'"):
        build_cremad(str(empty))
    with pytest.raises(DataError, match=r"split file '.*lists/train\.csv' does not exist"):
        build_cremad(str(raw_root), train_split=str(tmp_path / "lists" / "train.csv"),
                     test_split=str(tmp_path / "lists" / "test.csv"))
    with pytest.raises(DataError, match="no split files given and no train.csv"):
        build_cremad(str(raw_root), split="files")
    with pytest.raises(DataError, match=str(tmp_path / "noprep")):
        build_cremad(str(raw_root), prepared=str(tmp_path / "noprep"))
    (tmp_path / "bad.csv").write_text("1001_DFA_ANG_XX,HAP\n")
    (tmp_path / "t.csv").write_text("1002_DFA_ANG_XX,ANG\n")
    with pytest.raises(DataError, match=r"bad\.csv: clip '1001_DFA_ANG_XX' is labelled 'HAP'"):
        build_cremad(str(raw_root), train_split=str(tmp_path / "bad.csv"), test_split=str(tmp_path / "t.csv"))


def test_cli_one_epoch_paper_preset(raw_root, tmp_path):
    proc = run_cli(["experiment=paper_cremad", f"dataset.root={raw_root}", f"dataset.image_size={SIZE}",
                    "trainer.epochs=1", "trainer.batch_size=4", "backbone=small", "hardware=cpu",
                    "trainer.progress_bar=false", "eval.flops=false", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert m["status"] == "completed" and m["modalities"] == ["audio", "visual"]
    cfg = m["config"]
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["trainer"]["epochs"] == 1 and cfg["dataset"]["frames"] == 2
    assert np.isfinite(m["metrics"]["test/acc"])


def test_prepared_auto_reads_the_default_prepare_folder_once_it_is_complete(tmp_path):
    """`prepared: auto` (every dataset config's default) uses ROOT/mmbalance_prepared after a default prepare."""
    root = raw_tree(tmp_path / "raw", ids=clip_ids(actors=("1001", "1002")))
    before = build_cremad(str(root), prepared="auto", image_size=SIZE)
    assert isinstance(before.test, ClipDataset) and before.notes["layout"] == "raw"
    run_prepare("cremad", root, None, workers=1, progress=False, image_size=SIZE)  # --out defaults to ROOT/...
    after = build_cremad(str(root), prepared="auto", image_size=SIZE)
    assert isinstance(after.test, CachedClipDataset) and after.notes["layout"] == "prepared"
    assert ids_and_labels(after.test) == ids_and_labels(before.test)
    # null still decodes the raw tree
    assert isinstance(build_cremad(str(root), prepared=None, image_size=SIZE).test, ClipDataset)


def test_a_generated_split_is_the_same_on_the_raw_tree_and_its_prepared_folder(tmp_path):
    """Clips with a missing or undecodable video: split=stratified (and speaker) draws over the complete clips on
    both paths, and the prepared folder keeps prepare's own draw of the same rule, so every path agrees."""
    ids = clip_ids()
    root = raw_tree(tmp_path / "raw", ids)
    for cid in (ids[0], ids[7]):  # two clips lose their video: they are in no split
        (root / "VideoFlash" / f"{cid}.flv").unlink()
    write_corrupt(root / "VideoFlash" / f"{ids[5]}.flv")  # complete on disk, fails to decode at prepare
    run_prepare("cremad", root, None, workers=1, progress=False, image_size=SIZE)

    def split_ids(**options):  # the raw path still lists the undecodable clip (it fails when read): left aside
        s = build_cremad(str(root), image_size=SIZE, split_seed=0, **options)
        return {name: sorted(c.id for d in parts for c in d.clips if c.id != ids[5])
                for name, parts in (("train+val", (s.train, s.val)), ("test", (s.test,)))}

    raw = split_ids(prepared=None, split="stratified")
    assert ids[0] not in raw["train+val"] + raw["test"]
    assert split_ids(prepared="auto", split="stratified") == raw == split_ids(prepared="auto", split="auto")
    assert split_ids(prepared="auto", split="speaker") == split_ids(prepared=None, split="speaker")


def test_split_auto_on_a_prepared_folder_says_when_the_configs_split_options_go_unused(tmp_path, caplog):
    """The raw tree draws the config's test_fraction; a prepared folder under split=auto keeps prepare's draw."""
    root = raw_tree(tmp_path / "raw")
    run_prepare("cremad", root, None, workers=1, progress=False, image_size=SIZE)
    with caplog.at_level("WARNING", logger="mmbalance"):
        build_cremad(str(root), prepared="auto", image_size=SIZE)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="mmbalance"):
        build_cremad(str(root), prepared="auto", image_size=SIZE, test_fraction=0.5)
    assert "split=auto keeps the split prepare drew (stratified by emotion, test 10%" in caplog.text
    assert "set dataset.split=stratified to draw it" in caplog.text


def test_a_relative_root_with_pinned_folders(raw_root, monkeypatch):
    """`dataset.root=raw dataset.visual_dir=VideoFlash`: the pinned folder is relative to the root, once."""
    monkeypatch.chdir(raw_root.parent)
    s = build_cremad(raw_root.name, image_size=SIZE, visual_dir="VideoFlash", audio_dir="AudioWAV")
    assert s.notes["clips"] == 12 and s.notes["layout"] == "raw"


def test_a_folder_prepared_with_another_recipe_is_refused_naming_each_option(tmp_path):
    """pad_mode and the rate the flv videos were extracted at are the folder's recipe: a config that asks for others
    is refused (it trained on them before, with metrics.json recording the config's values), and one that asks
    for them reads the folder."""
    root = raw_tree(tmp_path / "raw", ids=clip_ids(actors=("1001", "1002")))
    out = tmp_path / "prep"
    run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE, pad_mode="constant", extract_fps=2)
    with pytest.raises(DataError) as err:
        build_cremad(str(root), prepared=str(out), image_size=SIZE)
    message = str(err.value)
    assert 'audio: dataset.pad_mode (STFT padding) "constant" there, "reflect" in this config' in message, message
    assert "visual: dataset.video_fps (frame rate of the videos) 2.0 there, 1.0 in this config" in message, message
    assert "--set pad_mode=reflect" in message and "--set extract_fps=1.0" in message
    assert "dataset.prepared=null" in message
    with pytest.raises(DataError, match=r"dataset\.video_fps .* 2\.0 there, 1\.0 in this config"):
        build_cremad(str(root), prepared=str(out), image_size=SIZE, pad_mode="constant")
    same = build_cremad(str(root), prepared=str(out), image_size=SIZE, pad_mode="constant", video_fps=2.0)
    assert isinstance(same.test, CachedClipDataset) and same.notes["cache_recipe"]["audio"]["pad_mode"] == "constant"


def test_a_folder_prepared_without_cache_is_refused_offering_the_raw_tree(tmp_path):
    root = bb_tree(tmp_path / "bb")
    run_prepare("cremad", root, None, workers=1, progress=False, image_size=SIZE, cache=False)
    with pytest.raises(DataError, match=r"holds no cache .*cache=false.*or set dataset\.prepared=null to decode the "
                                        r"raw tree"):
        build_cremad(str(root), prepared="auto", image_size=SIZE)
    assert isinstance(build_cremad(str(root), prepared=None, image_size=SIZE).test, ClipDataset)


def test_prepare_refuses_a_frame_count_below_one_before_writing_anything(raw_root, tmp_path):
    for value in (0, -1):
        with pytest.raises(UserError, match=rf"--set max_frames={value}: expected >= 1"):
            run_prepare("cremad", raw_root, tmp_path / "prep", workers=1, progress=False, max_frames=value)
        assert not (tmp_path / "prep").exists()
