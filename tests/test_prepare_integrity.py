"""A prepared folder is a record (docs/datasets.md, "The prepared folder"): `mmbalance prepare` never leaves a cache
that mixes two builds or two recipes, never writes into another dataset's folder, marks its folder before writing
anything else, checks its --set options before it starts, and names each file it skips; a loader reads only a
folder whose last prepare finished and whose recipe is the config's. Tiny generated trees, each case a few
seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_av import write_corrupt, write_video, write_wav
from fixtures_contract import bav_video_tree, ks_cvdf_tree, vgg_raw_tree
from mmbalance.data.balanced_av import build_balanced_av
from mmbalance.data.clips import CachedClipDataset, ClipDataset
from mmbalance.data.cremad import build_cremad
from mmbalance.data.kinetics_sounds import build_kinetics_sounds
from mmbalance.data.prepare import PrepareContext, main as prepare_main, run_prepare, write_report
from mmbalance.data.vggsound import build_vggsound
from mmbalance.errors import DataError
from test_data_cremad import EMOS, SIZE, bb_tree, clip_ids
from test_data_kinetics_sounds import _ogmge_tree as ks_ogmge_tree
from test_data_vggsound import TINY, _ogmge_tree as vgg_ogmge_tree

TINY_PREP = {k: v for k, v in TINY.items() if k != "audio_seconds"}  # prepare's options of the VGGSound recipe


def cremad_tree(root: Path, seed: int = 0) -> Path:
    """BalanceBenchmark's CREMA-D tree (frames + audio/<clip>.pt) with the release's AudioWAV/ beside it. The .pt
    arrays have the shape of the OGM-GE wav recipe's spectrogram, (257, 188), so a cache made from either holds
    arrays of the same shape, and only the recipe tells them apart."""
    bb_tree(root)
    for i, cid in enumerate(clip_ids()):
        spec = torch.randn(257, 188, generator=torch.Generator().manual_seed(seed + i))
        torch.save(spec, root / "audio" / f"{cid}.pt")
        write_wav(root / "AudioWAV" / f"{cid}.wav", 1.0, 16000, hz=EMOS[cid.split("_")[2]] + seed, seed=seed + i)
    return root


def prepare_cli(*args: str) -> tuple[int, str]:
    """`mmbalance prepare ...` in this process: (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = prepare_main([*args, "--workers", "1", "--no-progress"])
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# the cache is rebuilt when its source or recipe changes, resumed only when nothing did


def test_a_changed_source_layout_or_recipe_rebuilds_the_cache_an_unchanged_one_is_kept(tmp_path):
    root, out = cremad_tree(tmp_path / "bb"), tmp_path / "prep"
    common = dict(workers=1, progress=False, image_size=SIZE)
    assert run_prepare("cremad", root, out, **common)["cached"] == 12
    from_pt = np.load(out / "audio.npy")
    assert run_prepare("cremad", root, out, **common)["cache_skipped_existing"] == 12  # nothing changed: kept

    # another media kind for the same clips (same ids, same array shape): rebuilt from the wav files
    wav = run_prepare("cremad", root, out, audio="wav", **common)
    assert wav["cache_skipped_existing"] == 0 and wav["cached"] == 12
    reflect = np.load(out / "audio.npy")
    assert not np.array_equal(reflect, from_pt)
    raw = build_cremad(str(root), audio="wav", image_size=SIZE, prepared=None)
    cached = build_cremad(str(root), audio="wav", image_size=SIZE, prepared=str(out))
    assert isinstance(cached.test, CachedClipDataset)
    assert torch.allclose(cached.test[0]["inputs"]["audio"], raw.test[0]["inputs"]["audio"], atol=2e-2, rtol=1e-2)

    # another recipe of the same files: rebuilt
    constant = run_prepare("cremad", root, out, audio="wav", pad_mode="constant", **common)
    assert constant["cache_skipped_existing"] == 0
    assert not np.array_equal(np.load(out / "audio.npy"), reflect)
    assert json.loads((out / "cache.json").read_text())["recipe"]["audio"]["pad_mode"] == "constant"

    # another raw tree (the same clip names, other recordings) into the same folder: rebuilt
    other = cremad_tree(tmp_path / "other", seed=100)
    moved = run_prepare("cremad", other, out, audio="wav", pad_mode="constant", **common)
    assert moved["cache_skipped_existing"] == 0 and moved["cached"] == 12


def test_videos_extracted_with_other_options_are_extracted_again_and_a_config_must_ask_for_their_rate(tmp_path):
    root, out = vgg_raw_tree(tmp_path / "raw"), tmp_path / "prep"
    common = dict(workers=1, progress=False, size=SIZE, max_frames=3, **TINY_PREP)
    assert run_prepare("vggsound", root, out, **common)["frames_extracted"] == 9
    again = run_prepare("vggsound", root, out, fps=2, **common)
    assert again["frames_extracted"] == 9 and again["audio_extracted"] == 0  # only the changed modality
    assert json.loads((out / "extract.json").read_text())["visual"]["fps"] == 2
    with pytest.raises(DataError, match=r"visual: dataset\.video_fps \(frame rate of the videos\) 2\.0 there, 1\.0 in "
                                        r"this config(.|\n)*--set fps=1\.0"):
        build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY)
    assert len(build_vggsound(None, prepared=str(out), image_size=SIZE, video_fps=2, **TINY).test) == 3


def test_a_folder_without_cache_whose_audio_was_extracted_at_another_rate_is_refused(tmp_path, caplog):
    """Without a cache only extract.json records how the wavs were made: a config of another sample rate would
    resample them on reading and train on other inputs than it records. Frames shrunk below the config's size are
    upscaled: a warning, since short_side is a prepare option the config does not have."""
    root, out = vgg_raw_tree(tmp_path / "raw"), tmp_path / "prep"
    run_prepare("vggsound", root, out, workers=1, progress=False, short_side=8,
                **{**TINY_PREP, "sample_rate": 4000})
    with pytest.raises(DataError, match=r"audio: dataset\.sample_rate \(sample rate\) 4000 there, 8000 in this "
                                        r"config(.|\n)*--set sample_rate=8000"):
        build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY)
    with caplog.at_level("WARNING", logger="mmbalance"):
        splits = build_vggsound(None, prepared=str(out), image_size=SIZE, **{**TINY, "sample_rate": 4000})
    assert len(splits.test) == 3
    assert any(f"extracted with short_side 8, smaller than the {SIZE} px this config reads" in r.getMessage()
               for r in caplog.records)


def test_a_prepare_without_cache_keeps_a_matching_cache_and_removes_one_of_other_clips(tmp_path):
    root, out = vgg_ogmge_tree(tmp_path / "raw"), tmp_path / "prep"
    common = dict(workers=1, progress=False, size=SIZE, max_frames=4, **TINY_PREP)
    run_prepare("vggsound", root, out, cache=True, **common)
    assert run_prepare("vggsound", root, out, **common)["cache"].startswith("kept")
    assert build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY).notes["cache"] is True
    next(root.glob("train-audios/train-set/*.wav")).unlink()  # one clip fewer: the cache is of another clip list
    summary = run_prepare("vggsound", root, out, **common)
    assert summary["cache"].startswith("removed") and not (out / "cache.json").exists()
    assert not (out / "audio.npy").exists()
    decoded = build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY)
    assert decoded.notes["cache"] is False and decoded.notes["clips"]["train"] + decoded.notes["clips"]["test"] == 8


# ---------------------------------------------------------------------------------------------------------------
# a loader reads a folder only when its last prepare finished


KILLED_BEFORE_THE_CACHE = ("import os, sys; import mmbalance.data.layout as layout; "
                           "layout.write_clip_cache = lambda *a, **k: os._exit(9); "
                           "from mmbalance.data.prepare import main; sys.exit(main(sys.argv[1:]))")


def test_a_prepare_killed_midway_is_named_not_read_and_rerunning_it_completes_it(tmp_path):
    root = cremad_tree(tmp_path / "bb")
    run_prepare("cremad", root, None, workers=1, progress=False, image_size=SIZE)
    auto = dict(image_size=SIZE, prepared="auto")  # every dataset config's default
    assert isinstance(build_cremad(str(root), **auto).test, CachedClipDataset)  # the finished folder
    # kill -9 after the new manifest, before the cache: the old cache (32 px) and summary must not be read for it
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_THE_CACHE, "cremad", "--root", str(root),
                             "--set", "image_size=48", "--workers", "1", "--no-progress"], capture_output=True)
    assert killed.returncode == 9
    folder = root / "mmbalance_prepared"
    assert not (folder / "prepare_summary.json").exists()
    for size in (SIZE, 48):
        with pytest.raises(DataError, match=rf"the prepare into {folder} did not finish: it was stopped \(killed\), "
                                            rf"or is still running\. Run `mmbalance prepare cremad --root {root} "
                                            rf"--out {folder} --set image_size=48` to complete it"):
            build_cremad(str(root), image_size=size, prepared="auto")
        with pytest.raises(DataError, match="did not finish"):
            build_cremad(str(root), image_size=size, prepared=str(folder))  # named explicitly: the same
    assert isinstance(build_cremad(str(root), image_size=48, prepared=None).test, ClipDataset)
    assert run_prepare("cremad", root, None, workers=1, progress=False, image_size=48)["cached"] == 12
    assert build_cremad(str(root), image_size=48, prepared="auto").test.cache_dir == folder


def test_a_folder_only_shard_runs_wrote_is_named_unfinished_and_the_raw_tree_still_reads(tmp_path):
    root = ks_cvdf_tree(tmp_path / "raw")
    summary = run_prepare("kinetics_sounds", root, None, workers=1, progress=False, size=SIZE, shard="0/2")
    assert summary["shard"] == "0/2" and not (root / "mmbalance_prepared" / "prepare_summary.json").exists()
    with pytest.raises(DataError, match=r"only shard runs wrote it \(the last one: shard 0/2\)(.|\n)*Run `mmbalance "
                                        r"prepare kinetics_sounds .* --set size=32` to complete it"):
        build_kinetics_sounds(str(root), image_size=SIZE, prepared="auto")
    assert len(build_kinetics_sounds(str(root), image_size=SIZE, prepared=None).test) == 3


def test_an_interrupted_first_prepare_is_never_read_as_raw_data(tmp_path, monkeypatch):
    """BalancedAV's prepare copies the annotation json into its folder first: stopped right after, that folder holds
    a second annotation json, which the raw loader must not see (it marks the folder before writing anything)."""
    import mmbalance.data.balanced_av as bav

    root = bav_video_tree(tmp_path / "raw")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bav, "prepare_discovered", stop)
    with pytest.raises(KeyboardInterrupt):
        run_prepare("balanced_av", root, None, workers=1, progress=False, size=SIZE)
    assert (root / "mmbalance_prepared" / "annotation.json").is_file()
    raw = build_balanced_av(str(root), image_size=SIZE, prepared=None)
    assert raw.notes["layout"] == "video" and raw.notes["annotation"] == str(root / "balanced.json")
    with pytest.raises(DataError, match=r"did not finish: it was interrupted \(Ctrl-C\)"):
        build_balanced_av(str(root), image_size=SIZE, prepared="auto")


# ---------------------------------------------------------------------------------------------------------------
# whose folder it is, and which recipe it holds


def test_prepare_refuses_another_datasets_folder_and_a_folder_of_other_files(tmp_path):
    cremad, out = cremad_tree(tmp_path / "bb"), tmp_path / "shared"
    run_prepare("cremad", cremad, out, workers=1, progress=False, image_size=SIZE)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ks = ks_ogmge_tree(tmp_path / "ks")
    code, err = prepare_cli("kinetics_sounds", "--root", str(ks), "--out", str(out))
    assert code == 2 and f"--out '{out}' holds the prepared cremad folder; `mmbalance prepare kinetics_sounds` " \
                          "there would replace its manifest and cache" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    code, err = prepare_cli("kinetics_sounds", "--root", str(ks), "--out", str(cremad))  # the CREMA-D raw tree
    assert code == 2 and "is not empty and was not written by `mmbalance prepare`" in err, err
    assert not (cremad / "manifest.csv").exists()


def test_a_config_whose_recipe_differs_from_the_prepared_one_is_refused_naming_the_options(tmp_path):
    root, out = vgg_ogmge_tree(tmp_path / "raw"), tmp_path / "prep"
    run_prepare("vggsound", root, out, workers=1, progress=False, size=SIZE, max_frames=4, cache=True, **TINY_PREP)
    with pytest.raises(DataError) as err:
        build_vggsound(None, prepared=str(out), image_size=2 * SIZE, **{**TINY, "pad_mode": "constant"})
    message = str(err.value)
    assert "audio: dataset.pad_mode (STFT padding) \"reflect\" there, \"constant\" in this config" in message
    assert "visual: dataset.image_size (frame size) 32 there, 64 in this config" in message
    assert "--set pad_mode=constant" in message and "--set size=64" in message
    assert "dataset.prepared=null" in message
    used = build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY)
    assert used.notes["cache_recipe"]["audio"]["pad_mode"] == "reflect"  # the record says what was read

    bb = tmp_path / "bb"
    run_prepare("cremad", cremad_tree(bb), None, workers=1, progress=False, image_size=SIZE)
    with pytest.raises(DataError, match=r"visual: dataset\.image_size \(frame size\) 32 there, 96 in this config"):
        build_cremad(str(bb), image_size=96, prepared="auto")  # was upsampled from the 32 px cache without a word


# ---------------------------------------------------------------------------------------------------------------
# split lists, the report, the options


def test_a_clip_listed_twice_is_kept_once_when_identical_and_an_error_when_the_listings_differ(tmp_path):
    root = ks_ogmge_tree(tmp_path / "ks")
    train = (root / "my_train.txt").read_text().splitlines()
    (root / "my_train.txt").write_text("\n".join([*train, train[0]]) + "\n")
    assert build_kinetics_sounds(str(root), image_size=SIZE).notes["duplicates_dropped"] == 1
    clip = train[0].split(",")[0]
    with open(root / "my_test.txt", "a") as f:
        f.write(f"{clip},10,30\n")  # the training clip again, as a test clip of another class
    with pytest.raises(DataError, match=rf"clip '{clip}' is listed twice in my_train.txt, my_test.txt with different "
                                        r"splits and labels: as train 'bowling' and as test 'tickling'"):
        build_kinetics_sounds(str(root), image_size=SIZE)


def test_the_report_names_the_file_of_each_clip_left_out_and_the_summary_counts_the_usable_clips(tmp_path):
    root = cremad_tree(tmp_path / "bb")
    bad = write_corrupt(root / "audio" / f"{clip_ids()[1]}.pt")
    summary = run_prepare("cremad", root, tmp_path / "prep", workers=1, progress=False, image_size=SIZE)
    lines = (tmp_path / "prep" / "prepare_report.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(bad)]
    assert f"clip {clip_ids()[1]} (audio): cannot read feature file" in lines[0]
    assert summary["cache_failed"] == 1 and sum(summary["usable_clips"].values()) == 11
    assert sum(summary["manifest_clips"].values()) == 12  # the manifest keeps it: the next prepare retries it

    ctx = PrepareContext(tmp_path, tmp_path / "notes", progress=False)
    ctx.note("/data/x.pkl", "train/audio: 5 non-finite values replaced by 0")
    write_report(ctx)
    assert (ctx.out / "prepare_report.txt").read_text().splitlines() == [
        "# no missing or unreadable media", "/data/x.pkl\ttrain/audio: 5 non-finite values replaced by 0"]


def test_prepare_checks_its_options_against_the_builders_hints_before_writing_anything(tmp_path):
    root = cremad_tree(tmp_path / "bb")
    out = tmp_path / "prep"
    code, err = prepare_cli("cremad", "--root", str(root), "--out", str(out), "--set", "extract_fps=0",
                            "--set", "pad_mode=foo", "--set", "image_size=abc")
    assert code == 2, err
    assert "--set extract_fps=0: expected > 0" in err
    assert "--set pad_mode='foo': expected one of ['reflect', 'constant', 'replicate', 'circular']" in err
    assert "--set image_size='abc': expected an integer (int)" in err
    assert "Traceback" not in err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# extracted media record what they were made from: options, source file, root


def _frame_counts(out: Path) -> set[int]:
    return {len(list(d.glob("*.jpg"))) for d in (out / "frames").iterdir() if d.is_dir()}


def test_shard_runs_with_other_options_never_leave_frames_of_two_rates(tmp_path):
    """shard 0/2 at fps 1, shard 1/2 at fps 2, then the final run at fps 2: the final run decodes shard 0's clips
    again (their records name fps 1) instead of keeping them as existing; a shard checks its own clips likewise."""
    root, out = vgg_raw_tree(tmp_path / "raw"), tmp_path / "prep"
    common = dict(workers=1, progress=False, size=SIZE, max_frames=4, **TINY_PREP)
    assert run_prepare("vggsound", root, out, shard="0/2", **common)["frames_extracted"] == 5
    second = run_prepare("vggsound", root, out, shard="1/2", fps=2, **common)
    assert second["frames_extracted"] == 4
    assert _frame_counts(out) == {2, 4}  # 2 s videos: 2 frames at 1 fps, 4 at 2 fps
    final = run_prepare("vggsound", root, out, fps=2, **common)
    assert final["extract_skipped_existing"] == 4 and _frame_counts(out) == {4}
    assert final["extract_redone"] == 5 and second["extract_options"]["visual"]["fps"] == 2
    assert final["extract_redone_why"] == {"other_options": 5} and final["frames_extracted"] == 5
    assert final["audio_extracted"] == 0  # the audio was made with the same options: kept
    records = [json.loads(p.read_text()) for p in (out / "extract" / "frames").glob("*.json")]
    assert len(records) == 9 and {r["recipe"]["fps"] for r in records} == {2}
    assert len(build_vggsound(None, prepared=str(out), image_size=SIZE, video_fps=2, **TINY).test) == 3
    # a shard with other options than those its clips were decoded with decodes them again, never skips them
    shard = run_prepare("vggsound", root, out, shard="1/2", **common)
    assert shard["extract_redone_why"] == {"other_options": 4} and shard["extract_skipped_existing"] == 0


def test_a_replaced_source_video_is_extracted_again_and_the_cache_rebuilt(tmp_path):
    from test_data_cremad import ACTORS, raw_tree

    ids = clip_ids(ACTORS[:3])
    root, out = raw_tree(tmp_path / "raw", ids), tmp_path / "prep"
    common = dict(workers=1, progress=False, image_size=SIZE)
    assert run_prepare("cremad", root, out, **common)["frames_extracted"] == 9
    assert len(list((out / "frames" / ids[2]).glob("*.jpg"))) == 2  # 2.5 s at 1 fps
    write_video(root / "VideoFlash" / f"{ids[2]}.flv", seconds=3.5, fps=10, size=(48, 40), hz=500.0, seed=7)
    again = run_prepare("cremad", root, out, **common)
    assert again["frames_extracted"] == 1 and again["extract_redone_why"] == {"other_source": 1}
    assert again["frames_existing"] == 8
    assert len(list((out / "frames" / ids[2]).glob("*.jpg"))) == 3  # the new video's frames, not the old ones
    assert again["cache_skipped_existing"] == 0 and again["cached"] == 9  # its media changed: rebuilt
    assert run_prepare("cremad", root, out, **common)["cache_skipped_existing"] == 9  # and nothing since


def test_another_root_with_the_same_clip_ids_is_extracted_again_not_mixed(tmp_path, caplog):
    first, out = vgg_raw_tree(tmp_path / "first"), tmp_path / "prep"
    second = vgg_raw_tree(tmp_path / "second")
    for video in second.glob("*/*.mp4"):  # the same clip ids, other (longer) videos
        write_video(video, seconds=3.0, fps=4, size=(48, 32), sr=16000, hz=900.0)
    common = dict(workers=1, progress=False, size=SIZE, max_frames=4, cache=True, **TINY_PREP)
    run_prepare("vggsound", first, out, **common)
    assert _frame_counts(out) == {2}
    moved = run_prepare("vggsound", second, out, **common)
    assert moved["frames_extracted"] == moved["audio_extracted"] == 9 and moved["extract_skipped_existing"] == 0
    assert moved["extract_redone_why"] == {"other_source": 18}  # every frames folder and wav
    assert moved["root_changed"].startswith(f"{first.absolute()} -> {second.absolute()}")
    assert f"was prepared from --root {first.absolute()}" in caplog.text
    assert _frame_counts(out) == {3}
    import soundfile as sf

    assert {round(sf.info(str(p)).duration, 1) for p in (out / "audio").glob("*.wav")} == {3.0}
    assert moved["cache_skipped_existing"] == 0 and moved["cached"] == 9
    assert json.loads((out / "prepare_status.json").read_text())["root"] == str(second.absolute())


def test_frames_overwritten_in_place_change_the_digest_and_rebuild_the_cache(tmp_path):
    from mmbalance.data.clips import Clip, sources_digest

    root, out = cremad_tree(tmp_path / "bb"), tmp_path / "prep"
    common = dict(workers=1, progress=False, image_size=SIZE)
    assert run_prepare("cremad", root, out, **common)["cached"] == 12
    folder = root / "visual" / clip_ids()[3]
    clip = Clip("x", 0, "train", {"visual": str(folder)})
    before, folder_stat = sources_digest([clip]), folder.stat()
    frame = sorted(folder.glob("*.jpg"))[1]
    data = frame.read_bytes()
    frame.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same name and size, new content
    import os

    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    assert (folder.stat().st_size, folder.stat().st_mtime_ns) == (folder_stat.st_size, folder_stat.st_mtime_ns)
    assert sources_digest([clip]) != before
    assert run_prepare("cremad", root, out, **common)["cache_skipped_existing"] == 0


# ---------------------------------------------------------------------------------------------------------------
# a loader names another dataset's folder; every report line names its clip


def test_a_loader_pointed_at_another_datasets_folder_says_so_first(tmp_path):
    ks, out = ks_ogmge_tree(tmp_path / "ks"), tmp_path / "ks_prep"
    run_prepare("kinetics_sounds", ks, out, workers=1, progress=False, size=SIZE, max_frames=4)
    with pytest.raises(DataError, match=rf"^{out} holds the prepared kinetics_sounds dataset, not cremad; "):
        build_cremad(None, prepared=str(out), image_size=SIZE)
    with pytest.raises(DataError, match=rf"^{out} holds the prepared kinetics_sounds dataset, not vggsound; "):
        build_vggsound(None, prepared=str(out), image_size=SIZE, **TINY)
    # before the folder's own state: an unfinished prepare of another dataset is named as that, not as unfinished
    status = json.loads((out / "prepare_status.json").read_text())
    (out / "prepare_status.json").write_text(json.dumps({**status, "status": "running"}))
    with pytest.raises(DataError, match=r"holds the prepared kinetics_sounds dataset, not balanced_av"):
        build_balanced_av(None, prepared=str(out), image_size=SIZE)


def test_every_report_line_of_clip_media_names_its_clip(tmp_path):
    from test_data_cremad import ACTORS, raw_tree

    ids = clip_ids(ACTORS[:3])
    root = raw_tree(tmp_path / "raw", ids)
    (root / "AudioWAV" / f"{ids[0]}.wav").write_bytes(b"")  # an empty wav
    bad = write_corrupt(root / "VideoFlash" / f"{ids[4]}.flv")  # an undecodable video
    run_prepare("cremad", root, tmp_path / "prep", workers=1, progress=False, image_size=SIZE)
    lines = dict(line.split("\t") for line in (tmp_path / "prep" / "prepare_report.txt").read_text().splitlines())
    assert lines[str(root / "AudioWAV" / f"{ids[0]}.wav")] == f"unreadable audio: empty file (clip {ids[0]})"
    assert lines[str(bad)].startswith(f"clip {ids[4]} (visual): cannot decode video '{bad}'")

    vgg = vgg_raw_tree(tmp_path / "vgg")
    write_corrupt(next(vgg.glob("test/*.mp4")))
    run_prepare("vggsound", vgg, tmp_path / "vgg_prep", workers=1, progress=False, size=SIZE, **TINY_PREP)
    report = (tmp_path / "vgg_prep" / "prepare_report.txt").read_text().splitlines()
    assert len(report) == 2 and all(line.split("\t")[1].startswith("clip ") for line in report), report
    assert any("clip ZzGoneFromYT_50 (audio, visual): missing: no audio (video) or visual (video) file" in line
               for line in report), report


def test_a_folder_whose_clip_list_changed_after_prepare_is_refused_as_out_of_date(tmp_path):
    """The split lists prepare read are recorded by content (listed_from): an edited list (a clip moved from test to
    train) refuses the folder, naming the file and the command that brings it up to date; a file rewritten with the
    same content (touched, or the tree copied) is not a change, and a raw tree that is gone is not checked."""
    import os

    root, out = bb_tree(tmp_path / "bb"), tmp_path / "prep"
    summary = run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE)
    listed = summary["listed_from"]
    assert set(listed) == {str((root / "train.csv").absolute()), str((root / "test.csv").absolute())}
    build_cremad(None, prepared=str(out), image_size=SIZE)
    test_csv = root / "test.csv"
    text = test_csv.read_text()
    test_csv.write_text(text)  # the same content, a new modification time
    os.utime(test_csv, (1, 1))
    build_cremad(None, prepared=str(out), image_size=SIZE)
    first, *rest = text.splitlines(keepends=True)
    test_csv.write_text("".join(rest))  # a clip leaves the test list
    (root / "train.csv").write_text((root / "train.csv").read_text() + first)
    with pytest.raises(DataError, match=r"is out of date: .*(train|test)\.csv.* changed after `mmbalance prepare` "
                                        r"read the clip list(.|\n)*Run `mmbalance prepare cremad --root .*` again"):
        build_cremad(None, prepared=str(out), image_size=SIZE)
    again = run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE)
    assert again["cache_skipped_existing"] == 12  # the clips' cached rows stand; the manifest holds the new split
    assert len(build_cremad(None, prepared=str(out), image_size=SIZE).test) == len(rest)
    shutil.rmtree(root)  # the prepared folder works without its raw tree
    assert len(build_cremad(None, prepared=str(out), image_size=SIZE).test) == len(rest)
