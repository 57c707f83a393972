"""The shared audio-visual core (media.py, clips.py) on real files: sorting, sampling, transforms, audio
recipes, split files, and the prepared cache (round trip, resume, bad media)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_av import frame_image, tone, write_corrupt, write_frames, write_hdf5_frames, write_video, write_wav
from mmbalance.data import media
from mmbalance.data.clips import (AudioReader, CachedClipDataset, Clip, ClipDataset, FrameReader, clip_splits,
                                  load_clip_cache, write_clip_cache)
from mmbalance.data.prepare import PrepareContext
from mmbalance.errors import DataError

# ---------------------------------------------------------------------------------------------------------------
# files and frames


def test_natural_sort_orders_numbers_numerically(tmp_path):
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "frame_100.jpg", "Frame_3.jpg"]
    assert sorted(names, key=media.natural_key) == ["frame_1.jpg", "frame_2.jpg", "Frame_3.jpg", "frame_10.jpg",
                                                    "frame_100.jpg"]
    # a real folder, written in shuffled order, with a non-image file and a flow prefix beside the frames
    for i in (10, 2, 1, 11):
        frame_image(16, index=i).save(tmp_path / f"img_{i}.jpg")
        frame_image(16, index=i).save(tmp_path / f"flow_x_{i}.jpg")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [p.name for p in media.list_frames(tmp_path, "img_")] == ["img_1.jpg", "img_2.jpg", "img_10.jpg",
                                                                     "img_11.jpg"]
    assert len(media.list_frames(tmp_path)) == 8
    with pytest.raises(DataError, match="missing_folder"):
        media.list_frames(tmp_path / "missing_folder")
    with pytest.raises(DataError, match="no image files starting with 'rgb_'"):
        media.list_frames(tmp_path, "rgb_")


def test_segment_indices_random_in_training_centre_at_eval():
    # 10 frames in 3 segments [0,3) [3,6) [6,10): eval takes the centres, training one frame inside each
    assert media.segment_indices(10, 3, train=False) == [1, 4, 7]
    assert media.segment_indices(2, 2, train=False) == [0, 1]  # CREMA-D: 2 frames at 1 fps, 2 segments
    seen = [set(), set(), set()]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = media.segment_indices(10, 3, train=True, generator=g)
        for s, (i, (lo, hi)) in enumerate(zip(idx, [(0, 3), (3, 6), (6, 10)])):
            assert lo <= i < hi
            seen[s].add(i)
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8, 9}]  # every frame of a segment is reachable
    # fewer frames than segments: frames repeat in order, never out of range
    assert media.segment_indices(1, 3, train=False) == [0, 0, 0]
    assert all(0 <= i < 2 for i in media.segment_indices(2, 5, train=True))
    with pytest.raises(ValueError):
        media.segment_indices(0, 2, train=False)


def _asymmetric_frames(n=3, size=(40, 30)):
    return [frame_image(size, colour=(200, 60, 30), index=0) for _ in range(n)]


def test_one_augmentation_per_clip_all_frames_flipped_or_none():
    frames = _asymmetric_frames()
    plain = media.ClipTransform(24, train=False)(frames)
    mirrored = plain.flip(-1)
    assert not torch.allclose(plain, mirrored)  # the fixture is left-right asymmetric
    flips = 0
    tf = media.ClipTransform(24, train=True, augment="resize_flip")
    for seed in range(16):
        out = tf(frames, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 3, 24, 24)
        if torch.allclose(out, mirrored):
            flips += 1
        else:
            assert torch.allclose(out, plain)  # no frame flipped on its own
    assert 0 < flips < 16
    # crop_flip: the same crop box for every frame of the clip (identical frames stay identical)
    crop = media.ClipTransform(24, train=True, augment="crop_flip")
    for seed in range(8):
        out = crop(frames, torch.Generator().manual_seed(seed))
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_flow_flip_negates_u():
    u = torch.full((1, 8, 8), 200, dtype=torch.uint8)  # +72.5 px/255 of rightward motion
    v = torch.full((1, 8, 8), 100, dtype=torch.uint8)
    tf = media.ClipTransform(8, train=True, augment="resize_flip", normalize="flow", flow_pairs=True)
    outs = [tf([u, v], torch.Generator().manual_seed(s)) for s in range(12)]
    signs = {round(float(o[0, 0].mean()), 3) for o in outs}
    assert signs == {round(200 / 127.5 - 1, 3), round(55 / 127.5 - 1, 3)}  # u and 255 - u: the flip happened
    assert all(torch.allclose(o[0, 1], torch.full((8, 8), 100 / 127.5 - 1)) for o in outs)  # v unchanged


def _frames(reader: FrameReader, path: Path, train: bool, generator=None) -> torch.Tensor:
    """One clip's frames read as ClipDataset reads them."""
    clip = Clip("c", 0, "train" if train else "test", {"visual": str(path)})
    return ClipDataset([clip], {"visual": reader}, train).item(0, generator)["inputs"]["visual"]


def test_eval_is_deterministic_and_normalised(tmp_path):
    write_frames(tmp_path / "clip", n=5, size=(48, 36))
    reader = FrameReader("jpgdir", frames=2, size=32)
    a, b = _frames(reader, tmp_path / "clip", train=False), _frames(reader, tmp_path / "clip", train=False)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    # ImageNet normalisation: a white pixel maps to (1 - mean) / std
    white = media.ClipTransform(4)([torch.full((3, 4, 4), 255, dtype=torch.uint8)])
    expected = (1 - torch.tensor(media.IMAGENET_MEAN)) / torch.tensor(media.IMAGENET_STD)
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-5)
    # training differs between draws (crop + flip), eval never does
    g = torch.Generator().manual_seed(1)
    trains = [_frames(reader, tmp_path / "clip", train=True, generator=g) for _ in range(4)]
    assert any(not torch.equal(trains[0], t) for t in trains[1:])


def test_frame_sources_agree(tmp_path):
    """jpg folder, HDF5 of jpeg bytes and a decoded video give the same kind of (T, 3, S, S) tensor."""
    write_frames(tmp_path / "jpg", n=4, size=32)
    write_hdf5_frames(tmp_path / "clip.hdf5", n=4, size=32)
    write_video(tmp_path / "clip.mp4", seconds=3, fps=8, size=(32, 32))
    outs = {
        "jpgdir": _frames(FrameReader("jpgdir", 3, 16), tmp_path / "jpg", False),
        "hdf5": _frames(FrameReader("hdf5", 3, 16), tmp_path / "clip.hdf5", False),
        "video": _frames(FrameReader("video", 3, 16, fps=1), tmp_path / "clip.mp4", False),
    }
    assert all(o.shape == (3, 3, 16, 16) for o in outs.values())
    # the same jpeg bytes in a folder and in HDF5 decode identically
    assert torch.equal(outs["jpgdir"], outs["hdf5"])
    assert len(media.decode_video_frames(tmp_path / "clip.mp4", fps=1)) == 3  # at 0.5, 1.5, 2.5 s
    assert len(media.decode_video_frames(tmp_path / "clip.mp4", fps=2)) == 6


# ---------------------------------------------------------------------------------------------------------------
# audio


def test_stft_shapes_of_the_reference_recipes(tmp_path):
    # OGM-GE CREMA-D: 22,050 Hz, 3 s tiled, n_fft 512, hop 353 -> (257, 188)
    wav = write_wav(tmp_path / "a.wav", seconds=1.3, sr=16000, hz=500)
    reader = AudioReader("wav", "stft_log", sr=22050, seconds=3, n_fft=512, hop_length=353)
    spec = reader(str(wav), train=False)
    assert spec.shape == reader.shape == (1, 257, 188)
    # the 500 Hz tone is the loudest band: bin 500 / (22050 / 512) = 11.6
    assert abs(int(spec[0].mean(1).argmax()) - 11.6) <= 1
    # OGM-GE VGGSound: 16 kHz, 5 s, n_fft 256, hop 128 -> (129, 626)
    wave = media.fit_length(tone(2.0, 16000), 16000 * 5)
    assert media.stft_log_spectrogram(wave, 256, 128).shape == (1, 129, 626)
    # pad_mode is explicit and matters only at the edges
    r = media.stft_log_spectrogram(wave, 256, 128, pad_mode="reflect")
    c = media.stft_log_spectrogram(wave, 256, 128, pad_mode="constant")
    assert torch.allclose(r[..., 2:-2], c[..., 2:-2]) and not torch.allclose(r[..., 0], c[..., 0])


def test_fit_length_tiles_the_clip_or_its_tail():
    x = np.arange(3, dtype=np.float32)
    assert media.fit_length(x, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert media.fit_length(x, 7, tail=2).tolist() == [0, 1, 2, 1, 2, 1, 2]  # AV_preprocess_tool: the last second
    assert media.fit_length(x, 5, tail=8).tolist() == [0, 1, 2, 0, 1]  # a clip shorter than its tail: all of it
    assert media.fit_length(np.arange(10.0), 4).tolist() == [0, 1, 2, 3]


def test_kaldi_fbank_shape():
    fb = media.kaldi_fbank(tone(2.0, 16000), 16000)
    assert fb.shape == (1, 128, 1024)  # OGM-GE Kinetics-Sounds: 128 mel bins, padded to 1024 frames
    pad = torch.full_like(fb[0, :, 300:], (0 - media.FBANK_MEAN) / (2 * media.FBANK_STD))
    assert torch.allclose(fb[0, :, 300:], pad)  # zero padding after 2 s (about 200 frames)
    assert media.kaldi_fbank(tone(0.5, 16000), 16000, num_mel_bins=64, target_frames=40).shape == (1, 64, 40)


def test_audio_from_video_and_arrays(tmp_path):
    video = write_video(tmp_path / "c.flv", seconds=1.0, fps=10, sr=22050)
    spec = AudioReader("video", "stft_log", sr=22050, seconds=3)(str(video), train=False)
    assert spec.shape == (1, 257, 188) and torch.isfinite(spec).all()
    # stored arrays: (T, F) OGM-GE fbank is transposed to frequency-first; .pt and .pkl load too
    np.save(tmp_path / "fb.npy", np.zeros((1024, 128), np.float32))
    torch.save(torch.zeros(257, 1003), tmp_path / "s.pt")  # BML |STFT| (F, T): kept
    assert AudioReader("array")(str(tmp_path / "fb.npy"), False).shape == (1, 128, 1024)
    assert AudioReader("array")(str(tmp_path / "s.pt"), False).shape == (1, 257, 1003)
    with pytest.raises(DataError, match="nothere.npy"):
        AudioReader("array")(str(tmp_path / "nothere.npy"), False)


# ---------------------------------------------------------------------------------------------------------------
# split files


def test_split_file_formats(tmp_path):
    # OGM-GE CREMA-D: comma, UTF-8 with BOM, no header
    (tmp_path / "a.csv").write_text("1001_DFA_ANG_XX,ANG\n1002_IEO_HAP_HI,HAP\n", encoding="utf-8-sig")
    assert media.read_split_file(tmp_path / "a.csv") == [("1001_DFA_ANG_XX", "ANG"), ("1002_IEO_HAP_HI", "HAP")]
    # comma with a header and KS's middle column
    (tmp_path / "b.csv").write_text("id,duration,label\nabc_000010_000020,10,3\n\n")
    assert media.read_split_file(tmp_path / "b.csv") == [("abc_000010_000020", "3")]
    # whitespace (BalanceBenchmark KS, UCF-101) and a one-column list
    (tmp_path / "c.txt").write_text("vid1  5\nvid2\t7\n")
    assert media.read_split_file(tmp_path / "c.txt") == [("vid1", "5"), ("vid2", "7")]
    (tmp_path / "d.txt").write_text("Class/v_x.avi\n")
    assert media.read_split_file(tmp_path / "d.txt") == [("Class/v_x.avi", "")]
    # ActivityNet-style json: the database with its subsets
    db = {"labels": ["a", "b"], "database": {"x1": {"subset": "training", "label": "b"}}}
    (tmp_path / "e.json").write_text(json.dumps(db))
    assert media.read_annotation(tmp_path / "e.json") == ([("x1", "b", "train")], ["a", "b"])
    with pytest.raises(DataError, match="gone.csv"):
        media.read_split_file(tmp_path / "gone.csv")
    (tmp_path / "empty.csv").write_text("id,label\n")
    with pytest.raises(DataError, match="no entries"):
        media.read_split_file(tmp_path / "empty.csv")


# ---------------------------------------------------------------------------------------------------------------
# the prepared cache


def _clip_tree(tmp_path: Path, n: int = 6) -> list[Clip]:
    clips = []
    for i in range(n):
        cid = f"clip{i}"
        write_frames(tmp_path / "frames" / cid, n=2 + i % 3, size=(40, 32), seed=i)
        write_wav(tmp_path / "wav" / f"{cid}.wav", seconds=0.5 + 0.2 * i, sr=16000, hz=300 + 100 * i, seed=i)
        clips.append(Clip(cid, i % 2, "test" if i >= n - 2 else "train",
                          {"audio": str(tmp_path / "wav" / f"{cid}.wav"), "visual": str(tmp_path / "frames" / cid)}))
    return clips


def _readers(size=24):
    return {"audio": AudioReader("wav", "stft_log", sr=8000, seconds=1, n_fft=256, hop_length=128),
            "visual": FrameReader("jpgdir", frames=2, size=size)}


def test_cache_round_trip_matches_raw(tmp_path):
    clips, readers = _clip_tree(tmp_path), _readers()
    ctx = PrepareContext(tmp_path, tmp_path / "prep", progress=False)
    summary = write_clip_cache(ctx, clips, readers, size=24, max_frames=4)
    assert summary["cached"] == 6 and summary["cache_failed"] == 0 and not ctx.problems
    rows, kept = load_clip_cache(ctx.out, clips)
    assert [c.id for c in kept] == [c.id for c in clips]
    raw = ClipDataset(clips, readers, train=False)
    cached = CachedClipDataset(ctx.out, rows, kept, readers, train=False)
    for i in range(len(clips)):
        a, b = raw[i], cached[i]
        assert a["label"] == b["label"] and a["index"] == b["index"] == i
        # frames: the cache stores the eval resize, so eval output is identical; audio is float16
        assert torch.equal(a["inputs"]["visual"], b["inputs"]["visual"])
        assert torch.allclose(a["inputs"]["audio"], b["inputs"]["audio"], atol=1e-2, rtol=1e-3)
    # training on the cache samples and augments like the raw path: right shape, varies between draws
    train = CachedClipDataset(ctx.out, rows, kept, readers, train=True)
    torch.manual_seed(0)
    draws = [train[4]["inputs"]["visual"] for _ in range(6)]
    assert draws[0].shape == (2, 3, 24, 24) and any(not torch.equal(draws[0], d) for d in draws[1:])
    # clip_splits over the cache: validation carved from train, test as given
    splits = clip_splits(clips, readers, ["a", "b"], val_fraction=0.25, split_seed=0, cache_dir=ctx.out)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 2, 2)
    assert splits.modalities["visual"].shape == (2, 3, 24, 24) and splits.modalities["audio"].shape == (1, 129, 63)


def test_write_clip_cache_resumes_and_redoes_on_change(tmp_path):
    clips, readers = _clip_tree(tmp_path), _readers()
    ctx = PrepareContext(tmp_path, tmp_path / "prep", progress=False)
    write_clip_cache(ctx, clips, readers, size=24, max_frames=4)
    frames = np.load(ctx.out / "visual.npy").copy()
    # an interrupted run: rows 2 and 3 not done (and blank); the rerun redoes only those
    done = np.load(ctx.out / "done.npy")
    done[[2, 3]] = False
    np.save(ctx.out / "done.npy", done)
    mm = np.load(ctx.out / "visual.npy", mmap_mode="r+")
    mm[[2, 3]] = 0
    mm.flush()
    del mm
    summary = write_clip_cache(ctx, clips, readers, size=24, max_frames=4)
    assert summary["cache_skipped_existing"] == 4 and summary["cached"] == 6
    assert np.array_equal(np.load(ctx.out / "visual.npy"), frames)
    # nothing left to do: everything skipped
    assert write_clip_cache(ctx, clips, readers, size=24, max_frames=4)["cache_skipped_existing"] == 6
    # a different frame size is a different cache: rebuilt from scratch
    summary = write_clip_cache(ctx, clips, _readers(16), size=16, max_frames=4)
    assert summary["cache_skipped_existing"] == 0 and np.load(ctx.out / "visual.npy").shape == (6, 4, 3, 16, 16)
    assert json.loads((ctx.out / "cache.json").read_text())["size"] == 16
    n_frames = np.load(ctx.out / "n_frames.npy")
    assert n_frames[:, 1].tolist() == [2 + i % 3 for i in range(6)]


def test_bad_media_recorded_via_problem_and_skipped(tmp_path):
    clips, readers = _clip_tree(tmp_path), _readers()
    write_corrupt(clips[1].sources["audio"])  # a truncated wav
    write_corrupt(Path(clips[2].sources["visual"]) / "frame_00001.jpg")  # a broken jpeg
    clips.append(Clip("gone", 0, "train", {"audio": str(tmp_path / "gone.wav"), "visual": str(tmp_path / "gone")}))
    ctx = PrepareContext(tmp_path, tmp_path / "prep", progress=False)
    summary = write_clip_cache(ctx, clips, readers, size=24, max_frames=4)
    assert summary["cached"] == 4 and summary["cache_failed"] == 3
    # the report's path column names the failing file or frame folder; the text names the clip and modality
    problems = {Path(p).name: why for p, why in ctx.problems}
    assert set(problems) == {"clip1.wav", "clip2", "gone.wav"}
    assert problems["clip1.wav"].startswith("clip clip1 (audio): ")
    assert problems["clip2"].startswith("clip clip2 (visual): ") and "frame_00001.jpg" in problems["clip2"]
    assert problems["gone.wav"].startswith("clip gone (audio): ")
    rows, kept = load_clip_cache(ctx.out, clips)
    assert [c.id for c in kept] == ["clip0", "clip3", "clip4", "clip5"]
    # the raw path names the file
    with pytest.raises(DataError, match="clip1.wav"):
        ClipDataset(clips, readers, train=False)[1]
    with pytest.raises(DataError, match="no prepared cache"):
        load_clip_cache(tmp_path / "nowhere", clips)


def test_stored_spectrograms_keep_frequency_first_and_only_the_time_first_fbank_is_transposed():
    from mmbalance.data.clips import spectrogram_from_array

    assert spectrogram_from_array(np.zeros((1024, 128))).shape == (1, 128, 1024)  # OGM-GE's Kaldi fbank (T, F)
    assert spectrogram_from_array(np.zeros((257, 188))).shape == (1, 257, 188)  # OGM-GE CREMA-D |STFT| (F, T)
    assert spectrogram_from_array(np.zeros((257, 1003))).shape == (1, 257, 1003)  # BML / BalancedAV
    assert spectrogram_from_array(np.zeros((1, 129, 626))).shape == (1, 129, 626)  # VGGSound, with channel


def test_resolve_prepared_rule(tmp_path):
    from mmbalance.data.prepare import resolve_prepared

    assert resolve_prepared(tmp_path, None) is None
    assert resolve_prepared(tmp_path, tmp_path / "x") == tmp_path / "x"  # an explicit folder is taken as given
    assert resolve_prepared(tmp_path, "auto") is None  # nothing prepared yet
    (tmp_path / "mmbalance_prepared").mkdir()
    assert resolve_prepared(tmp_path, "auto") is None  # a prepare that did not finish is not used
    (tmp_path / "mmbalance_prepared" / "prepare_summary.json").write_text("{}")
    assert resolve_prepared(tmp_path, "auto") == tmp_path / "mmbalance_prepared"
