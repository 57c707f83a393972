"""Runs that never lie about their data: non-finite inputs, unreadable files and corrupt media are one clear
error (or a named, counted skip), and no metric is computed on NaN logits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_av import write_corrupt, write_frames, write_wav
from fixtures_cmu_mosei import write_mult
from helpers import inputs, tiny_model
from mmbalance.data import finite
from mmbalance.data.batch import Batch
from mmbalance.data.cmu_mosei import build_cmu_mosei
from mmbalance.data.cremad import build_cremad
from mmbalance.data.features import build_features
from mmbalance.data.prepare import run_prepare
from mmbalance.data.synthetic import build_synthetic
from mmbalance.engine.evaluation import evaluate
from mmbalance.errors import DataError, NonFiniteError

SIZE = 16


# ---------------------------------------------------------------------------------------------------------------
# features files


def features_file(path: Path, audio: np.ndarray, video: np.ndarray | None = None) -> str:
    n = len(audio)
    split = np.array(["train"] * (n - 10) + ["test"] * 10)
    arrays = {"label": np.arange(n) % 2, "split": split, "audio": audio}
    if video is not None:
        arrays["video"] = video
    np.savez(path, **arrays)
    return str(path)


def test_nan_in_train_rows_and_inf_in_test_rows_are_one_error_naming_file_key_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    audio, video = rng.normal(size=(50, 4)), rng.normal(size=(50, 3)).astype(np.float32)
    audio[0, :3] = np.nan  # a train row: 3 NaN
    audio[45, 1] = np.inf  # a test row (the last 10 are test)
    video[44, 0] = -np.inf
    f = features_file(tmp_path / "x.npz", audio, video)
    with pytest.raises(DataError) as err:
        build_features(f)
    msg = str(err.value)
    assert msg.startswith(f"features file {f!r}: non-finite values in `audio`: 3 NaN in train, 1 Inf in test")
    assert "`video`: 1 Inf in test (row 44 of test)" in msg and msg.endswith("clean or drop those rows")
    assert "`audio`: 3 NaN in train, 1 Inf in test (row 0 of train; row 45 of test)" in msg
    assert " in val" not in msg  # a split without non-finite rows is not listed


def test_every_split_is_named_with_its_own_count_also_when_carved(tmp_path):
    # 2 classes x 20: test 25 % = 10 rows, validation 20 % of the other 30 = 6 rows, train 24; 2 NaN a row
    np.savez(tmp_path / "y.npz", label=np.arange(40) % 2, audio=np.full((40, 2), np.nan))
    with pytest.raises(DataError, match=r"`audio`: 48 NaN in train, 12 NaN in val, 20 NaN in test"):
        build_features(str(tmp_path / "y.npz"), test_fraction=0.25, val_fraction=0.2)


def test_a_float64_value_past_float32_range_counts_as_inf(tmp_path):
    audio = np.zeros((20, 3))
    audio[0, 0] = 1e300  # finite in the file, Inf once read as float32 like every sample
    np.savez(tmp_path / "o.npz", label=np.arange(20) % 2, split=np.array(["train"] * 10 + ["test"] * 10),
             audio=audio)
    with pytest.raises(DataError, match=r"`audio`: 1 Inf in train"):
        build_features(str(tmp_path / "o.npz"))


def test_clean_integer_features_pass(tmp_path):
    np.savez(tmp_path / "i.npz", label=np.arange(20) % 2, audio=np.ones((20, 3), dtype=np.int32))
    assert len(build_features(str(tmp_path / "i.npz")).test) == 4


@pytest.mark.parametrize("kind", ["empty", "text", "npy", "truncated", "object"])
def test_unreadable_features_file_is_one_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "empty":
        path.write_bytes(b"")
        expect = "an empty file"
    elif kind == "text":
        path.write_text("label,audio\n0,1.5\n")
        expect = "not a zip archive"
    elif kind == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros((4, 2)))
        expect = "a single .npy array"
    elif kind == "truncated":
        np.savez(tmp_path / "good.npz", label=np.arange(30) % 2, audio=np.zeros((30, 8)))
        path.write_bytes((tmp_path / "good.npz").read_bytes()[:300])
        expect = "truncated or damaged zip"
    else:
        np.savez(path, label=np.arange(4) % 2, audio=np.array([{}, 1, 2, 3], dtype=object))
        expect = "dtype object, which needs pickle"
    with pytest.raises(DataError) as err:
        build_features(str(path))
    msg = str(err.value)
    assert f"features file {str(path)!r} is not a readable .npz" in msg and expect in msg
    assert "expected an .npz with `label`" in msg


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_synthetic_data_with_an_overflowing_signal_is_refused():
    with pytest.raises(DataError, match=r"synthetic data: non-finite values in `audio`: .*Inf in train"):
        build_synthetic(signal={"audio": 1e39, "visual": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# the shared scan and its sidecar


def test_chunked_scan_counts_rows_and_the_sidecar_avoids_a_rescan(tmp_path, monkeypatch):
    monkeypatch.setattr(finite, "SCAN_CHUNK_BYTES", 64)  # 2 rows of 8 float32 per chunk: many chunks
    x = np.zeros((9, 8), dtype=np.float32)
    x[3, :2], x[8, 7] = np.nan, -np.inf
    path = tmp_path / "a.npy"
    np.save(path, x)
    assert finite.cached_row_counts(path) == {3: (2, 0), 8: (0, 1)}
    assert finite.sidecar_path(path).is_file()

    def no_scan(_):
        raise AssertionError("scanned although the sidecar is current")

    monkeypatch.setattr(finite, "nonfinite_rows", no_scan)
    assert finite.cached_row_counts(path) == {3: (2, 0), 8: (0, 1)}
    # the array changes (a later mtime): the sidecar is stale and the file is scanned again
    monkeypatch.undo()
    x[8, 7] = 0
    np.save(path, x)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert finite.cached_row_counts(path) == {3: (2, 0)}
    # an unreadable sidecar is a miss, not an error
    finite.sidecar_path(path).write_text("{not json")
    assert finite.cached_row_counts(path) == {3: (2, 0)}


def test_integer_arrays_are_never_scanned(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((4, 3), dtype=np.uint8))
    assert finite.cached_row_counts(tmp_path / "u.npy") == {}
    assert not finite.sidecar_path(tmp_path / "u.npy").exists()


def test_a_broken_prepared_array_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"prepared array '.*a\.npy' is not a readable \.npy"):
        finite.open_npy(tmp_path / "a.npy")


# ---------------------------------------------------------------------------------------------------------------
# prepared caches (CREMA-D's clip cache, CMU-MOSEI's per-split arrays)

CLIPS = [f"{a}_DFA_{e}_XX" for a in ("1001", "1002") for e in ("ANG", "HAP", "SAD")]


def cremad_tree(root: Path) -> Path:
    """The OGM-GE CREMA-D layout: Image-01-FPS/<clip>/ frames + AudioWAV/<clip>.wav (no video to decode)."""
    for i, cid in enumerate(CLIPS):
        write_frames(root / "Image-01-FPS" / cid, n=2, size=SIZE, seed=i)
        write_wav(root / "AudioWAV" / f"{cid}.wav", 0.5, 16000, hz=300.0 + 200 * i, seed=i)
    return root


@pytest.fixture(scope="module")
def cremad_prepared(tmp_path_factory):
    root = cremad_tree(tmp_path_factory.mktemp("cremad") / "raw")
    out = root.parent / "prep"
    run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE, max_frames=2)
    return root, out


def test_prepare_records_the_scan_and_a_nan_written_into_the_cache_later_is_refused(cremad_prepared, tmp_path,
                                                                                      monkeypatch):
    import shutil

    out = tmp_path / "prep"
    shutil.copytree(cremad_prepared[1], out)
    assert finite.sidecar_path(out / "audio.npy").is_file() and not finite.sidecar_path(out / "visual.npy").exists()
    monkeypatch.setattr(finite, "nonfinite_rows", lambda _: pytest.fail("a run rescanned a checked cache"))
    clean = build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    test_row = int(clean.test.rows[0])
    monkeypatch.undo()
    audio = np.load(out / "audio.npy", mmap_mode="r+")
    audio[test_row, 0, :4, 0] = np.nan
    audio.flush()
    del audio
    st = (out / "audio.npy").stat()
    os.utime(out / "audio.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edit made after prepare
    with pytest.raises(DataError) as err:
        build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    msg = str(err.value)
    assert msg.startswith(f"prepared cache {str(out)!r} (<modality>.npy): non-finite values in `audio`: 4 NaN in test")
    assert "run prepare again" in msg
    # as the message says: prepare again lists the clip and leaves it out (counted in the run's log and notes) ...
    root = cremad_prepared[0]
    summary = run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE, max_frames=2)
    assert summary["cache_nonfinite"] == 1 and summary["cached"] == len(CLIPS) - 1
    assert "(audio): its cached row holds 4 NaN and 0 Inf values" in (out / "prepare_report.txt").read_text()
    assert build_cremad("/nonexistent", prepared=str(out), image_size=SIZE).notes["uncached_clips"] == 1
    # ... and the next prepare decodes it again from the raw file
    summary = run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE, max_frames=2)
    assert summary["cache_nonfinite"] == 0 and summary["cached"] == len(CLIPS)
    assert build_cremad("/nonexistent", prepared=str(out), image_size=SIZE).notes["uncached_clips"] == 0


def test_a_corrupt_prepared_file_is_a_data_error_naming_it(cremad_prepared, tmp_path):
    import shutil

    out = tmp_path / "prep"
    shutil.copytree(cremad_prepared[1], out)
    (out / "done.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"'.*done\.npy' is not a readable \.npy"):
        build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    shutil.copy(cremad_prepared[1] / "done.npy", out / "done.npy")
    (out / "cache.json").write_text('{"ids": [')
    with pytest.raises(DataError, match=r"cache\.json: not readable json"):
        build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    (out / "manifest.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"manifest\.csv: not a readable manifest csv"):
        build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)


def test_mosei_prepared_cache_with_nan_is_refused_while_raw_nan_is_still_replaced(tmp_path):
    raw = tmp_path / "raw"
    write_mult(raw, aligned=False)
    raw_splits = build_cmu_mosei(str(raw))  # the pickle's -inf/NaN are replaced and counted, as documented
    assert sum(raw_splits.notes["nonfinite_replaced"].values()) > 0
    out = tmp_path / "prep"
    run_prepare("cmu_mosei", raw, out, progress=False)
    assert finite.sidecar_path(out / "val" / "audio.npy").is_file()
    build_cmu_mosei(prepared=str(out))
    vision = np.load(out / "val" / "vision.npy")
    vision[1, 0, 0] = np.nan
    np.save(out / "val" / "vision.npy", vision)
    st = (out / "val" / "vision.npy").stat()
    os.utime(out / "val" / "vision.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"prepared CMU-MOSEI cache .*: non-finite values in `vision`: 1 NaN in val "
                                        r"\(row 1 of val\); row indices count from 0 in the arrays"):
        build_cmu_mosei(prepared=str(out))


# ---------------------------------------------------------------------------------------------------------------
# corrupt media (CREMA-D from the raw tree)


def test_corrupt_and_truncated_wav_are_named_at_prepare_counted_and_logged_by_the_loader(tmp_path, caplog):
    root = cremad_tree(tmp_path / "raw")
    garbage = write_corrupt(root / "AudioWAV" / f"{CLIPS[1]}.wav")
    truncated = root / "AudioWAV" / f"{CLIPS[4]}.wav"
    truncated.write_bytes(truncated.read_bytes()[:20])  # a download cut inside the header
    out = tmp_path / "prep"
    summary = run_prepare("cremad", root, out, workers=1, progress=False, image_size=SIZE, max_frames=2)
    assert summary["cache_failed"] == 2 and summary["cached"] == 4 and summary["skipped"] == 2
    report = (out / "prepare_report.txt").read_text()
    assert str(garbage) in report and str(truncated) in report
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        s = build_cremad("/nonexistent", prepared=str(out), image_size=SIZE)
    assert s.notes["uncached_clips"] == 2 and len(s.train) + len(s.val) + len(s.test) == 4
    warning = next(r.getMessage() for r in caplog.records if "are left out" in r.getMessage())
    assert "2 clips" in warning and CLIPS[1] in warning and CLIPS[4] in warning
    # the raw loader: the clip's read is one DataError naming the clip and the file
    raw = build_cremad(str(root), image_size=SIZE)
    ds, k = next((d, k) for d in (raw.train, raw.val, raw.test) for k, c in enumerate(d.clips) if c.id == CLIPS[1])
    with pytest.raises(DataError, match=rf"clip '{CLIPS[1]}' \(audio\): .*{garbage.name}"):
        ds[k]


def test_a_stored_spectrogram_with_nan_is_named_and_left_out_at_prepare(tmp_path):
    root = tmp_path / "raw"
    for i, cid in enumerate(CLIPS):
        write_frames(root / "visual" / cid, n=2, size=SIZE, seed=i)
        x = torch.randn(40, 64, generator=torch.Generator().manual_seed(i))
        if i == 2:
            x[0, :5] = float("nan")
        (root / "audio").mkdir(exist_ok=True)
        torch.save(x, root / "audio" / f"{cid}.pt")
    summary = run_prepare("cremad", root, tmp_path / "prep", workers=1, progress=False, image_size=SIZE,
                          max_frames=2)
    assert summary["cache_failed"] == 1
    report = (tmp_path / "prep" / "prepare_report.txt").read_text()
    assert f"{CLIPS[2]}.pt" in report and "5 NaN" in report


# ---------------------------------------------------------------------------------------------------------------
# evaluation


class _Run:
    """The part of the run context that evaluate() reads."""

    def __init__(self, model):
        from mmbalance.methods.baseline import Baseline

        self.model, self.method, self.device, self.num_classes = model, Baseline(), torch.device("cpu"), 3

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _loader(x: dict, batch: int = 4) -> list[Batch]:
    n = len(next(iter(x.values())))
    y = torch.arange(n) % 3
    return [Batch({m: t[i:i + batch] for m, t in x.items()}, y[i:i + batch], torch.arange(i, min(i + batch, n)))
            for i in range(0, n, batch)]


def test_evaluation_refuses_to_report_metrics_on_nan_logits():
    model = tiny_model(("a", "b")).eval()
    x = inputs(("a", "b"), 10)
    assert evaluate(_Run(model), _loader(x), "test")["test/acc"] is not None  # finite: metrics as usual
    x["a"][7, 0] = float("nan")  # one sample of the third batch
    with pytest.raises(NonFiniteError) as err:
        evaluate(_Run(model), _loader(x), "val")
    msg = str(err.value)
    assert msg.startswith("evaluation on val: 1 of 10 samples have non-finite (NaN/Inf) logits (1 in the fused")
    assert "computed on NaN" in msg
    # the model's mode is restored even though the pass failed
    model.train()
    with pytest.raises(NonFiniteError):
        evaluate(_Run(model), _loader(x), "val", shapley=False)
    assert model.training


def test_evaluation_counts_a_coalition_whose_logits_alone_are_not_finite():
    model = tiny_model(("a", "b"), masking="feature").eval()
    x = inputs(("a", "b"), 6)
    run = _Run(model)

    def eval_fuse(run, features):  # finite with every modality, NaN once `b` is masked to zero
        logits, unimodal = model.fusion(features), None
        if bool((features["b"] == 0).all()):
            logits = logits * float("nan")
        return logits, unimodal

    run.method.eval_fuse = eval_fuse
    with pytest.raises(NonFiniteError, match=r"6 of 6 samples .*\(0 in the fused"):
        evaluate(run, _loader(x), "test")


def test_the_message_names_the_first_offending_rows_of_each_split_capped(tmp_path):
    rng = np.random.default_rng(0)
    top, side = rng.normal(size=(60, 3)), rng.normal(size=(60, 2))
    top[[3, 17], 1] = np.inf  # train rows (0-39)
    top[41, 0] = np.nan  # a val row (40-49)
    side[[0, 1, 2, 5, 8, 13, 21, 34], 0] = np.nan  # 8 train rows: the first 5 named, the rest counted
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    np.savez(tmp_path / "r.npz", label=np.arange(60) % 2, split=split, top=top, side=side)
    with pytest.raises(DataError) as err:
        build_features(str(tmp_path / "r.npz"))
    assert str(err.value) == (
        f"features file {str(tmp_path / 'r.npz')!r}: non-finite values in `top`: 2 Inf in train, 1 NaN in val "
        "(rows 3, 17 of train; row 41 of val); in `side`: 8 NaN in train (rows 0, 1, 2, 5, 8 and 3 more of train); "
        "row indices count from 0 in the arrays; clean or drop those rows")
