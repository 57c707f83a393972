"""CMU-MOSEI: both pickle layouts, the label conventions, the prepared cache, errors, and one CLI run."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from fixtures_cmu_mosei import EXPECTED, KEPT_DROP_ZERO, REPLACED, Y, cleaned, write_mmsa, write_mult
from mmbalance.data.batch import collate_batch
from mmbalance.data.cmu_mosei import build_cmu_mosei, prepare
from mmbalance.data.prepare import PrepareContext, run_prepare
from mmbalance.errors import DataError, UserError

SPLITS = ("train", "val", "test")


def stacked(ds) -> dict[str, np.ndarray]:
    batch = collate_batch([ds[i] for i in range(len(ds))])
    return {m: x.numpy() for m, x in batch.inputs.items()}


def labels(ds) -> list[int]:
    return [ds[i]["label"] for i in range(len(ds))]


def test_mult_unaligned_loads_with_shapes_from_the_file_and_cleaned_float32(tmp_path):
    path = write_mult(tmp_path, aligned=False, dtype=np.float64)
    splits = build_cmu_mosei(root=str(tmp_path))  # aligned=false is the default (BalanceBenchmark)
    assert splits.notes["layout"] == "mult" and splits.notes["file"] == str(path)
    assert splits.notes["aligned"] is False and splits.notes["text"].startswith("`text` 300-d GloVe")
    assert list(splits.modalities) == ["audio", "vision", "text"]
    assert {m: (s.kind, s.shape) for m, s in splits.modalities.items()} == {
        "audio": ("sequence", (10, 74)), "vision": ("sequence", (8, 35)), "text": ("sequence", (6, 300))}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    assert splits.val_source.startswith("CMU-MOSEI's own validation split")
    assert splits.num_classes == 2 and splits.class_names == ["negative", "non-negative"]
    assert splits.notes["nonfinite_replaced"] == REPLACED
    raw = cleaned(path)
    for split in SPLITS:
        got = stacked(getattr(splits, split))
        for m in ("audio", "vision", "text"):
            assert got[m].dtype == np.float32 and np.isfinite(got[m]).all()
            np.testing.assert_array_equal(got[m], raw[split][m])
    assert got["audio"].shape == (4, 10, 74)
    assert splits.train.ids[:2] == ["vidtrain0_0", "vidtrain1_1"]
    assert (stacked(splits.train)["audio"][0, 0, :3] == 0).all()  # the planted -inf


def test_mmsa_aligned_uses_the_768d_bert_feature_sequence(tmp_path):
    path = write_mmsa(tmp_path, aligned=True)
    splits = build_cmu_mosei(root=str(tmp_path), aligned=True, modalities=["text", "audio"])
    assert splits.notes["layout"] == "mmsa" and splits.notes["file"] == str(path) and splits.notes["aligned"]
    assert splits.notes["text"] == "`text` 768-d BERT features (MMSA)"
    assert list(splits.modalities) == ["text", "audio"]
    assert splits.modalities["text"].shape == (6, 768) and splits.modalities["audio"].shape == (6, 74)
    assert splits.notes["lengths_present"] == ["audio_lengths", "vision_lengths"]
    np.testing.assert_array_equal(stacked(splits.test)["text"], cleaned(path)["test"]["text"])
    assert splits.test.ids[0] == "vidtest0$_$0"
    assert labels(splits.val) == EXPECTED["binary_nonneg"]["val"]


def test_mmsa_token_ids_only_with_text_key_text_bert(tmp_path):
    write_mmsa(tmp_path, aligned=False, with_text=False)
    with pytest.raises(DataError, match=r"unaligned_50.pkl \['train'\]: no `text` feature sequence .*text_bert"):
        build_cmu_mosei(root=str(tmp_path))
    splits = build_cmu_mosei(root=str(tmp_path), text_key="text_bert")
    assert splits.modalities["text"].kind == "tokens" and splits.modalities["text"].shape == (6,)
    sample = splits.train[0]["inputs"]
    assert sample["text"].dtype == torch.int64 and (sample["text"] > 0).all()
    assert splits.modalities["audio"].shape == (10, 74) and splits.modalities["vision"].shape == (8, 35)
    assert splits.notes["aligned"] is False


def test_root_may_be_the_pickle_itself(tmp_path):
    path = write_mmsa(tmp_path, aligned=False)
    splits = build_cmu_mosei(root=str(path), aligned=True)  # the file wins; alignment from its name
    assert splits.notes["layout"] == "mmsa" and splits.notes["aligned"] is False
    renamed = tmp_path / "my_mosei.pkl"
    os.replace(write_mult(tmp_path / "m", aligned=True), renamed)
    splits = build_cmu_mosei(root=str(renamed))
    assert splits.notes["layout"] == "mult" and splits.notes["aligned"] is True  # equal step counts


@pytest.mark.parametrize("mode", ["binary_nonneg", "binary_drop_zero", "7class"])
def test_label_modes_match_hand_computed_labels(tmp_path, mode):
    path = write_mult(tmp_path, aligned=True)
    splits = build_cmu_mosei(root=str(tmp_path), aligned=True, label_mode=mode)
    for split in SPLITS:
        assert labels(getattr(splits, split)) == EXPECTED[mode][split], (mode, split)
    if mode == "binary_drop_zero":
        assert splits.class_names == ["negative", "positive"]
        assert splits.notes["dropped_zero"] == {"train": 2, "val": 2, "test": 1}
        # the kept samples are the right rows, features included
        raw = cleaned(path)
        for split in SPLITS:
            np.testing.assert_array_equal(stacked(getattr(splits, split))["vision"],
                                          raw[split]["vision"][KEPT_DROP_ZERO[split]])
    if mode == "7class":
        assert splits.num_classes == 7 and splits.class_names == ["-3", "-2", "-1", "0", "+1", "+2", "+3"]
    assert splits.notes["class_counts"]["val"] == np.bincount(EXPECTED[mode]["val"],
                                                              minlength=splits.num_classes).tolist()


@pytest.mark.parametrize("source", ["raw", "prepared"])
def test_regression_keeps_every_sample_with_its_float_score(tmp_path, source):
    write_mmsa(tmp_path / "raw", aligned=True)  # MMSA's (N,) regression_labels
    root = {"root": str(tmp_path / "raw")}
    if source == "prepared":
        run_prepare("cmu_mosei", tmp_path / "raw", tmp_path / "prep", progress=False, aligned=True,
                    label_mode="binary_drop_zero")
        root = {"prepared": str(tmp_path / "prep")}
    # label_mode does not apply to scores: every sample is kept, zeros included
    splits = build_cmu_mosei(**root, aligned=True, task="regression", label_mode="binary_drop_zero")
    assert splits.num_classes == 1 and splits.class_names == ["sentiment score"]  # one model output
    for ours, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds = getattr(splits, ours)
        assert len(ds) == len(Y[theirs]) and isinstance(ds[0]["label"], float)
        batch = collate_batch([ds[i] for i in range(len(ds))])  # the one collate every loader uses
        assert batch.label.dtype == torch.float32  # scores stay float, never truncated to classes
        np.testing.assert_array_equal(batch.label.numpy(), np.asarray(Y[theirs], dtype=np.float32))
    notes = splits.notes
    assert notes["task"] == "regression" and notes["label_mode"] is None and "class_counts" not in notes
    # negative, zero, positive scores per split (the zeros are what the two acc-2 conventions treat apart)
    assert notes["score_signs"] == {"train": [5, 2, 5], "val": [1, 2, 1], "test": [1, 1, 2]}


def test_task_and_loss_options_are_checked(tmp_path):
    write_mult(tmp_path, aligned=False)
    with pytest.raises(UserError, match=r"dataset.task='ordinal'; expected one of \['classification', 'regression'\]"):
        build_cmu_mosei(root=str(tmp_path), task="ordinal")
    with pytest.raises(UserError, match=r"dataset.loss='cross_entropy' does not train dataset.task=regression"):
        build_cmu_mosei(root=str(tmp_path), task="regression", loss="cross_entropy")
    splits = build_cmu_mosei(root=str(tmp_path))  # classification stays the default: BalanceBenchmark's 2 classes
    assert splits.num_classes == 2 and splits.train.labels.dtype == torch.int64
    assert collate_batch([splits.train[0]]).label.dtype == torch.int64


def test_prepare_writes_a_memmap_cache_that_reads_like_the_raw_pickle(tmp_path):
    raw_root, out = tmp_path / "raw", tmp_path / "prep"
    write_mult(raw_root, aligned=False)
    summary = run_prepare("cmu_mosei", raw_root, out, progress=False)
    assert summary["layout"] == "mult" and summary["cache"] == "written" and summary["aligned"] is False
    assert (summary["train"], summary["val"], summary["test"], summary["clips"]) == (12, 4, 4, 20)
    assert summary["nonfinite_replaced"] == REPLACED and summary["modalities"]["audio"] == "sequence [10, 74]"
    for split in SPLITS:
        for name in ("audio", "vision", "text", "y_reg"):
            assert (out / split / f"{name}.npy").is_file()
    assert np.load(out / "train" / "audio.npy", mmap_mode="r").dtype == np.float32
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["negative", "non-negative"]}
    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "label", "split", "y_reg", "y2_nonneg", "y2_nonzero", "y7"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["label"] for r in val] == ["1", "0", "1", "1"] and [r["y2_nonzero"] for r in val] == ["", "0", "1", ""]
    assert [r["y7"] for r in val] == ["3", "2", "4", "3"]

    raw = build_cmu_mosei(root=str(raw_root), label_mode="7class")
    fast = build_cmu_mosei(prepared=str(out), label_mode="7class")
    assert fast.notes["layout"] == "mult" and fast.notes["source"] == f"prepared cache {out}"
    assert fast.notes["nonfinite_replaced"] == REPLACED and fast.modalities == raw.modalities
    for split in SPLITS:
        a, b = getattr(raw, split), getattr(fast, split)
        assert a.ids == b.ids and labels(a) == labels(b)
        assert all(isinstance(s, os.PathLike) for s in b.sources.values())  # memory-mapped, not unpickled
        for m, x in stacked(a).items():
            np.testing.assert_array_equal(x, stacked(b)[m])
    # workers receive paths, not arrays
    clone = pickle.loads(pickle.dumps(fast.train))
    np.testing.assert_array_equal(clone[3]["inputs"]["text"].numpy(), fast.train[3]["inputs"]["text"].numpy())

    # idempotent: nothing is rewritten; a new label_mode only rewrites the label files
    before = (out / "train" / "audio.npy").stat().st_mtime_ns
    again = run_prepare("cmu_mosei", raw_root, out, progress=False, label_mode="binary_drop_zero")
    assert again["cache"].startswith("up to date") and (out / "train" / "audio.npy").stat().st_mtime_ns == before
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["negative", "positive"]}
    # a changed source (size/mtime) or --force rebuilds
    write_mult(raw_root, aligned=False, seed=5)
    assert run_prepare("cmu_mosei", raw_root, out, progress=False)["cache"] == "written"
    ctx = PrepareContext(root=raw_root, out=out, force=True, progress=False)
    assert prepare(ctx)["cache"] == "written"
    # the cache says which alignment it holds
    with pytest.raises(DataError, match="holds the unaligned features but dataset.aligned=true"):
        build_cmu_mosei(prepared=str(out), aligned=True)


def test_prepare_mmsa_with_an_explicit_file_option(tmp_path):
    path = write_mmsa(tmp_path / "raw", aligned=True)
    summary = run_prepare("cmu_mosei", tmp_path / "raw", tmp_path / "prep", progress=False,
                          file="MOSEI/Processed/aligned_50.pkl", modalities=["audio", "text"])
    assert summary["layout"] == "mmsa" and summary["file"] == str(path.resolve()) and summary["aligned"] is True
    splits = build_cmu_mosei(prepared=str(tmp_path / "prep"), aligned=True, modalities=["text"])
    assert list(splits.modalities) == ["text"] and splits.modalities["text"].shape == (6, 768)
    with pytest.raises(DataError, match=r"has no \['vision'\]"):
        build_cmu_mosei(prepared=str(tmp_path / "prep"), aligned=True)


def test_bad_roots_files_and_keys_are_clear_data_errors(tmp_path):
    with pytest.raises(DataError, match=f"dataset.root '{tmp_path / 'nope'}' does not exist"):
        build_cmu_mosei(root=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no CMU-MOSEI unaligned pickle found .*mosei_senti_data_noalign.pkl.*"
                                        r"MOSEI/Processed/unaligned_50.pkl.*no .pkl/.csd files"):
        build_cmu_mosei(root=str(tmp_path / "empty"))
    write_mult(tmp_path / "al", aligned=True)
    with pytest.raises(DataError, match="mosei_senti_data.pkl exists: set dataset.aligned=true"):
        build_cmu_mosei(root=str(tmp_path / "al"))
    bad = write_mmsa(tmp_path / "nov", aligned=True, drop=("vision",))
    with pytest.raises(DataError, match=rf"{bad} \['train'\]: no vision key: looked for 'vision' or 'visual'"):
        build_cmu_mosei(root=str(tmp_path / "nov"), aligned=True)
    nolab = write_mmsa(tmp_path / "nol", aligned=True, drop=("regression_labels",))
    with pytest.raises(DataError, match=rf"{nolab} \['train'\]: no sentiment key: looked for 'regression_labels'"):
        build_cmu_mosei(root=str(tmp_path / "nol"), aligned=True)
    path = write_mult(tmp_path / "nv", aligned=True)
    with open(path, "rb") as f:
        data = pickle.load(f)
    del data["valid"]
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DataError, match=rf"{path}: no 'valid' / 'val' / 'dev' / 'validation' split .*'test', 'train'"):
        build_cmu_mosei(root=str(tmp_path / "nv"), aligned=True)
    path.write_bytes(path.read_bytes()[:200])  # truncated download
    with pytest.raises(DataError, match=f"cannot read CMU-MOSEI pickle '{path}'"):
        build_cmu_mosei(root=str(tmp_path / "nv"), aligned=True)
    with pytest.raises(DataError, match=f"dataset.prepared '{tmp_path / 'empty'}' is not a prepared CMU-MOSEI cache") \
            as err:
        build_cmu_mosei(prepared=str(tmp_path / "empty"))
    # never the advice to prepare into that folder, which prepare refuses when it holds other files (the pickle)
    assert "--out NEW_FOLDER" in str(err.value) and "set dataset.root to it and dataset.prepared=null" in str(err.value)


def test_cli_paper_preset_trains_all_three_modalities(tmp_path):
    write_mult(tmp_path / "data" / "cmu_mosei", aligned=False)
    run = tmp_path / "run"
    proc = run_cli(["experiment=paper_cmu_mosei", f"paths.data_dir={tmp_path / 'data'}", "trainer.epochs=1",
                    "trainer.batch_size=4", "trainer.progress_bar=false", "hardware=cpu",
                    "backbone.encoders.sequence.d_model=16", "backbone.encoders.sequence.dim_feedforward=32",
                    "backbone.encoders.sequence.layers=1", "eval.flops=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_metrics(run)
    assert results["status"] == "completed" and results["modalities"] == ["audio", "vision", "text"]
    assert results["split_sizes"] == {"train": 12, "val": 4, "test": 4}
    assert results["val_source"].startswith("CMU-MOSEI's own validation split")
    assert results["dataset_notes"]["layout"] == "mult" and results["dataset_notes"]["nonfinite_replaced"] == REPLACED
    cfg = results["config"]
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["optimizer"]["momentum"] == 0.9
    assert cfg["scheduler"]["step_size"] == 30 and cfg["dataset"]["label_mode"] == "binary_nonneg"
    assert "test/acc" in results["metrics"]


def rewrite(path, change) -> None:
    """`change(data)` applied to the pickle at `path`, and its mtime moved on (as a real edit would)."""
    with open(path, "rb") as f:
        data = pickle.load(f)
    change(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_cache_whose_pickle_changed_is_refused_not_used(tmp_path):
    """cache.json's stamp (size, mtime) is compared with the pickle dataset.root names, else the recorded one."""
    import shutil

    def negate(data):
        for split in ("train", "test"):
            data[split]["labels"] = -data[split]["labels"]

    path = write_mult(tmp_path / "mult", aligned=False)
    run_prepare("cmu_mosei", tmp_path / "mult", None, progress=False)  # ROOT/mmbalance_prepared
    shutil.copytree(tmp_path / "mult", tmp_path / "stale")  # a copy keeps the mtimes: still up to date
    assert build_cmu_mosei(root=str(tmp_path / "stale"), prepared="auto").notes["source"].startswith("prepared")
    rewrite(tmp_path / "stale" / path.name, negate)
    with pytest.raises(DataError, match=r"mmbalance_prepared' is out of date: it was prepared from .*mult/mosei_senti_"
                                        r"data_noalign.pkl .*, but the pickle .*stale/mosei_senti_data_noalign.pkl is "
                                        r".*set dataset.prepared=null"):
        build_cmu_mosei(root=str(tmp_path / "stale"), prepared="auto", task="regression")
    scores = build_cmu_mosei(root=str(tmp_path / "stale"), prepared=None, task="regression").train.labels
    np.testing.assert_array_equal(scores.numpy(), -np.asarray(Y["train"], dtype=np.float32))
    # the pickle changed in place, the cache used on its own (no dataset.root): the recorded path is compared
    rewrite(path, negate)
    with pytest.raises(DataError, match="is out of date"):
        build_cmu_mosei(prepared=str(tmp_path / "mult" / "mmbalance_prepared"))
    run_prepare("cmu_mosei", tmp_path / "mult", None, progress=False)  # prepare again: used
    assert build_cmu_mosei(prepared=str(tmp_path / "mult" / "mmbalance_prepared")).train.labels.tolist() == [
        int(-y >= 0) for y in Y["train"]]
    # an aligned build beside an unaligned cache is told it can read the pickle itself
    write_mult(tmp_path / "mult", aligned=True)
    with pytest.raises(DataError, match=r"holds the unaligned features but dataset.aligned=true; set "
                                        r"dataset.aligned=false, set dataset.prepared=null to read the pickle itself"):
        build_cmu_mosei(root=str(tmp_path / "mult"), prepared="auto", aligned=True)


def test_scores_off_the_scale_and_an_empty_split_are_named(tmp_path):
    path = write_mult(tmp_path / "x10", aligned=False)
    rewrite(path, lambda data: data["valid"].update(labels=data["valid"]["labels"] * 10))
    message = rf"{path} \['valid'\]: `labels` holds scores in \[-10, 10\], 2 of them outside the dataset's \[-3, 3\]"
    with pytest.raises(DataError, match=message):
        build_cmu_mosei(root=str(tmp_path / "x10"), task="regression")
    with pytest.raises(DataError, match=message):  # prepare never caches them
        run_prepare("cmu_mosei", tmp_path / "x10", tmp_path / "prep", progress=False)
    path = write_mult(tmp_path / "empty", aligned=False)
    rewrite(path, lambda data: data["test"].update({k: v[:0] for k, v in data["test"].items()}))
    with pytest.raises(DataError, match=rf"{path} \['test'\]: the split has no samples \(`labels` is empty\)"):
        build_cmu_mosei(root=str(tmp_path / "empty"))


def test_prepare_report_lists_the_non_finite_values_it_replaced(tmp_path):
    path = write_mult(tmp_path / "raw", aligned=False)
    summary = run_prepare("cmu_mosei", tmp_path / "raw", tmp_path / "prep", progress=False)
    assert summary["skipped"] == 0  # replaced, not skipped
    report = (tmp_path / "prep" / "prepare_report.txt").read_text().splitlines()
    assert report == ["# no missing or unreadable media",
                      f"{path} ['train'] `audio`\t3 non-finite values (NaN, +-Inf) replaced by 0",
                      f"{path} ['valid'] `vision`\t1 non-finite values (NaN, +-Inf) replaced by 0",
                      f"{path} ['test'] `text`\t1 non-finite values (NaN, +-Inf) replaced by 0"]
    again = run_prepare("cmu_mosei", tmp_path / "raw", tmp_path / "prep", progress=False)  # the cache is kept
    assert again["cache"].startswith("up to date")
    assert (tmp_path / "prep" / "prepare_report.txt").read_text().splitlines() == report
