"""Bring-your-own features files: splits, kinds, and clear errors."""

import json

import numpy as np
import pytest
import torch

from mmbalance.data.features import build_features
from mmbalance.errors import DataError, UserError


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_features_without_split_are_carved_stratified(tmp_path):
    rng = np.random.default_rng(0)
    f = write(tmp_path / "f.npz", label=np.arange(100) % 4, audio=rng.normal(size=(100, 6)),
              text=rng.normal(size=(100, 5, 3)).astype(np.float32))
    s = build_features(f)
    assert [s.modalities[m].kind for m in ("audio", "text")] == ["vector", "sequence"]
    assert s.modalities["text"].shape == (5, 3) and s.num_classes == 4
    assert (len(s.train), len(s.val), len(s.test)) == (72, 8, 20)
    sample = s.train[0]
    assert sample["inputs"]["audio"].shape == (6,) and sample["inputs"]["text"].shape == (5, 3)


def test_a_split_array_is_used_and_val_carved_from_train_when_missing(tmp_path):
    split = np.array(["train"] * 60 + ["test"] * 20)
    f = write(tmp_path / "f.npz", label=np.arange(80) % 2, split=split, a=np.zeros((80, 2)))
    s = build_features(f)
    assert len(s.test) == 20 and len(s.train) + len(s.val) == 60 and len(s.val) == 6
    split[:10] = "val"
    f = write(tmp_path / "g.npz", label=np.arange(80) % 2, split=split, a=np.zeros((80, 2)))
    s = build_features(f)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20) and s.val_source == "the file's `split`"


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist.*label"):
        build_features(str(tmp_path / "missing.npz"))
    f = write(tmp_path / "nolabel.npz", audio=np.zeros((4, 2)))
    with pytest.raises(DataError, match="no `label` array.*audio"):
        build_features(f)
    f = write(tmp_path / "bad.npz", label=np.arange(4), audio=np.zeros((3, 2)))
    with pytest.raises(DataError, match="`audio` has shape \\(3, 2\\)"):
        build_features(f)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        build_features(str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("key, array, message", [
    ("m", np.full((40, 3), "abc"), r"`m` has dtype <U3 \(strings\); expected a modality of numbers"),
    ("m", np.full((40, 3), b"ab"), r"`m` has dtype \|S2 \(byte strings\)"),
    ("m", np.ones((40, 2), complex), r"`m` has dtype complex128 \(complex numbers; store the real and imaginary"),
    ("m", np.zeros((40, 2), "datetime64[s]"), r"`m` has dtype datetime64\[s\] \(dates\)"),
    ("m", np.array([[1.0, None]] * 40, dtype=object), r"is not a readable .npz \(`m`: an array of dtype object, "
                                                       r"which needs pickle \(np.load\(allow_pickle=True\)\), and "
                                                       r"mmbalance never unpickles a data file"),
    ("label", np.array(["cat", "dog"] * 20), r"`label` must be a 1-D integer array, got shape \(40,\) dtype <U3; "
                                            r"class names\? encode them as 0..C-1"),
    ("split", np.arange(40, dtype=np.int64) % 3, r"`split` must be \(40,\) strings of 'train'/'val'/'test', got shape \(40,\) "
                                 r"dtype int64 \(unexpected values \['0', '1', '2'\]\)"),
])
def test_a_non_numeric_array_is_named_with_its_key_and_dtype(tmp_path, key, array, message):
    arrays = {"label": np.arange(40) % 2, "a": np.zeros((40, 2)), key: array}
    f = str(tmp_path / "f.npz")
    np.savez(f, **arrays)
    with pytest.raises(DataError, match=message) as err:
        build_features(f)
    assert f in str(err.value)


def test_bool_and_integer_modalities_are_read_as_float32(tmp_path):
    f = write(tmp_path / "f.npz", label=np.arange(40) % 2, flags=np.arange(80).reshape(40, 2) % 3 == 0,
              counts=np.arange(80, dtype=np.uint8).reshape(40, 2))
    s = build_features(f, standardize=False)
    assert s.train[0]["inputs"]["flags"].dtype == s.train[0]["inputs"]["counts"].dtype == torch.float32


def test_classes_without_samples_are_warned_about_and_a_classes_key_declares_them(tmp_path, caplog):
    rng = np.random.default_rng(0)
    label, x = np.array([5, 6, 7] * 20), rng.normal(size=(60, 2))
    with caplog.at_level("WARNING", logger="mmbalance"):
        s = build_features(write(tmp_path / "f.npz", label=label, a=x))
    assert s.num_classes == 8 and s.notes["empty_classes"] == [0, 1, 2, 3, 4]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "classes 0-4 of 0..7 have no sample in any split (the classes are 0..max(label))" in warning
    assert "macro-F1 averages over all 8 classes with F1 = 0 for each empty one, so it cannot exceed 0.38" in warning
    assert "np.unique(label, return_inverse=True)" in warning and "save their names as `classes`" in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="mmbalance"):  # re-encoded: no gap, no warning
        s = build_features(write(tmp_path / "g.npz", label=label - 5, a=x, classes=np.array(["fear", "joy", "sad"])))
    assert s.num_classes == 3 and s.class_names == ["fear", "joy", "sad"] and "empty_classes" not in s.notes
    assert not caplog.records
    s = build_features(write(tmp_path / "h.npz", label=label, a=x, classes=np.array(list("abcdefghij"))))
    assert s.num_classes == 10 and s.notes["empty_classes"] == [0, 1, 2, 3, 4, 8, 9]
    with pytest.raises(DataError, match=r"`label` goes up to 7, but `classes` lists 3 classes; expected labels 0..2"):
        build_features(write(tmp_path / "i.npz", label=label, a=x, classes=np.array(list("abc"))))
    with pytest.raises(DataError, match=r"`classes` must be a 1-D array of distinct class names"):
        build_features(write(tmp_path / "j.npz", label=label - 5, a=x, classes=np.array(list("aab"))))


def test_an_empty_modality_a_split_without_train_rows_and_a_modality_named_twice_are_refused(tmp_path):
    label = np.arange(40) % 2
    with pytest.raises(DataError, match=r"`b` has shape \(40, 0\); expected \(40, D\) or \(40, T, D\) with D and T "
                                        r"at least 1"):
        build_features(write(tmp_path / "empty.npz", label=label, a=np.zeros((40, 2)), b=np.zeros((40, 0))))
    split = np.array(["val"] * 30 + ["test"] * 10)
    with pytest.raises(DataError, match=r"notrain\.npz: `split` has no 'train' samples \(it has \{'val': 30, "
                                        r"'test': 10\}\)"):
        build_features(write(tmp_path / "notrain.npz", label=label, split=split, a=np.zeros((40, 2))))
    f = write(tmp_path / "f.npz", label=label, a=np.zeros((40, 2)), b=np.ones((40, 3)))
    with pytest.raises(UserError, match=r"dataset.modalities=\['a', 'a'\]: \['a'\] named more than once"):
        build_features(f, modalities=["a", "a"])


def test_macro_f1_of_a_huge_class_count_needs_no_class_by_class_matrix():
    """Labels {0, 1, 200000}: 200,001 classes. The per-class counts take O(C) memory (a C x C confusion matrix
    would be 320 GB), with the values the matrix gave."""
    from mmbalance.metrics.classification import macro_f1, per_class_f1

    k = 200_001
    target, preds = torch.tensor([0, 1, k - 1, k - 1]), torch.tensor([0, k - 1, k - 1, 1])
    f1 = per_class_f1(preds, target, k)
    # class 0: TP 1 -> 1; class 1: FP 1, FN 1 -> 0; class k-1: TP 1, FP 1, FN 1 -> 2/4; the empty classes 0
    assert f1.shape == (k,) and f1[[0, 1, k - 1]].tolist() == [1.0, 0.0, 0.5] and f1.sum() == 1.5
    assert macro_f1(preds, target, k) == 1.5 / k
    g = torch.Generator().manual_seed(0)  # the same values as the confusion matrix, exactly
    target, preds = torch.randint(0, 7, (500,), generator=g), torch.randint(0, 7, (500,), generator=g)
    confusion = torch.bincount(target * 7 + preds, minlength=49).reshape(7, 7).to(torch.float64)
    denom = confusion.sum(0) + confusion.sum(1)
    assert torch.equal(per_class_f1(preds, target, 7), 2 * confusion.diagonal() / denom)


# ------------------------------------------------------------------------------------------------ label kinds, extra keys


def test_an_extra_1d_key_suggests_dataset_modalities_listing_the_real_modality_keys(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(label=np.arange(400) % 2, audio=rng.normal(size=(400, 4)), video=rng.normal(size=(400, 2, 3)),
                  junk=np.arange(400))
    f = write(tmp_path / "f.npz", **arrays)
    with pytest.raises(DataError) as err:
        build_features(f)
    assert str(err.value) == (
        f"{f}: `junk` has shape (400,); expected (400, D) or (400, T, D) with D and T at least 1; if it is not a "
        "modality (a sample id, a per-row value), leave it out by naming the modalities: "
        "dataset.modalities=[audio,video]")
    assert list(build_features(f, modalities=["audio", "video"]).modalities) == ["audio", "video"]  # as suggested
    ids = write(tmp_path / "g.npz", **{**arrays, "junk": np.array([f"id{i}" for i in range(400)])})
    with pytest.raises(DataError, match=r"`junk` has dtype <U5 \(strings\).*dataset\.modalities=\[audio,video\]$"):
        build_features(ids)
    # modalities named explicitly: a bad one is the user's choice, no suggestion
    with pytest.raises(DataError) as err:
        build_features(f, modalities=["audio", "junk"])
    assert "dataset.modalities=[" not in str(err.value)


def test_whole_number_float_labels_are_read_as_classes_and_fractional_ones_are_refused_with_a_hint(tmp_path):
    rng = np.random.default_rng(0)
    label, x = np.arange(60) % 3, rng.normal(size=(60, 4))
    as_int = build_features(write(tmp_path / "i.npz", label=label, a=x))
    as_float = build_features(write(tmp_path / "f.npz", label=label.astype(float), a=x))
    assert as_float.num_classes == 3 and as_float.train.labels.dtype == torch.int64
    for part in ("train", "val", "test"):  # the same classes, the same splits: cast without loss
        assert torch.equal(getattr(as_int, part).labels, getattr(as_float, part).labels)
        assert torch.equal(getattr(as_int, part).inputs["a"], getattr(as_float, part).inputs["a"])
    half = label.astype(float)
    half[7] = 1.5
    with pytest.raises(DataError, match=r"`label` has 1 value\(s\) that are not whole numbers \(row 7: 1\.5\); "
                                        r"expected whole-number classes 0..C-1; float scores to regress on need "
                                        r"dataset.task=regression"):
        build_features(write(tmp_path / "h.npz", label=half, a=x))
    nan = label.astype(float)
    nan[2] = np.nan
    with pytest.raises(DataError, match=r"not whole numbers \(row 2: nan\)"):
        build_features(write(tmp_path / "n.npz", label=nan, a=x))


def regression_file(path, n=60, seed=0, **extra):
    rng = np.random.default_rng(seed)
    audio, video = rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)
    score = (audio[:, 0] + 0.3 * video[:, 0]).astype(np.float32)
    return write(path, label=score, audio=audio, video=video, **extra), score


def test_regression_scores_are_float_labels_of_one_output_with_a_random_split(tmp_path):
    f, score = regression_file(tmp_path / "r.npz", n=100)
    s = build_features(f, task="regression")
    assert s.num_classes == 1 and s.class_names == ["score"] and s.notes["task"] == "regression"
    assert (len(s.train), len(s.val), len(s.test)) == (72, 8, 20)  # test 20 %, val 10 % of the rest
    assert s.val_source == "carved from the file (random: test 20%, val 10%)"
    rows = np.concatenate([s.train.rows, s.val.rows, s.test.rows])
    assert sorted(rows.tolist()) == list(range(100))  # each row in one split
    sample = s.test[0]
    assert isinstance(sample["label"], float) and sample["label"] == pytest.approx(float(score[s.test.rows[0]]))
    assert s.train.labels.dtype == torch.float32
    assert sample["inputs"]["audio"].dtype == torch.float32 and sample["inputs"]["audio"].shape == (4,)
    # the file's own split, and the errors
    split = np.array(["train"] * 70 + ["val"] * 10 + ["test"] * 20)
    g, _ = regression_file(tmp_path / "s.npz", n=100, split=split)
    own = build_features(g, task="regression")
    assert (len(own.train), len(own.val), len(own.test)) == (70, 10, 20) and own.val_source == "the file's `split`"
    with pytest.raises(DataError, match=r"dataset.task=regression, but the file has `classes`"):
        build_features(regression_file(tmp_path / "c.npz", classes=np.array(["a", "b"]))[0], task="regression")
    bad = score.copy()
    bad[[4, 9]] = np.nan
    with pytest.raises(DataError, match=r"`label` has 2 non-finite score\(s\) .* at rows 4, 9 \(counting from 0\)"):
        build_features(write(tmp_path / "n.npz", label=bad, a=np.zeros((60, 2))), task="regression")
    with pytest.raises(DataError, match=r"not whole numbers .*need dataset.task=regression"):
        build_features(f)  # the same scores as classes: refused, pointing at the task
    with pytest.raises(UserError, match=r"dataset.loss='l1' does not train dataset.task=classification"):
        build_features(f, loss="l1")


def test_a_regression_features_file_trains_one_epoch_of_baseline(tmp_path):
    from conftest import train_in_process

    f, _ = regression_file(tmp_path / "r.npz")
    results = train_in_process(tmp_path / "run", [
        "dataset=features", f"dataset.path={f}", "++dataset.task=regression", "trainer.epochs=1",
        "trainer.batch_size=16", "trainer.progress_bar=false", "hardware=cpu", "eval.flops=false", "logger=csv"],
        fast=False)
    assert results["status"] == "completed"
    assert (results["task"], results["loss"], results["select_metric"]) == ("regression", "l1", "mae")
    assert results["dataset_notes"]["task"] == "regression" and results["modalities"] == ["audio", "video"]
    m = results["metrics"]
    assert np.isfinite(m["test/mae"]) and "test/corr" in m and "test/acc2_nonneg" in m
    assert np.isfinite(m["test/mae/audio"]) and m["test/imbalance"] is not None and m["test/value/empty"] <= 0


def test_a_run_records_the_class_names_of_its_features_file(tmp_path):
    """`classes` names the classes in the run's record: label i means metrics.json's class_names[i]."""
    from conftest import train_in_process

    rng = np.random.default_rng(0)
    f = write(tmp_path / "c.npz", label=np.arange(90) % 3, audio=rng.normal(size=(90, 4)).astype(np.float32),
              video=rng.normal(size=(90, 3)).astype(np.float32), classes=np.array(["fear", "joy", "sad"]))
    results = train_in_process(tmp_path / "run", [
        "dataset=features", f"dataset.path={f}", "trainer.epochs=1", "trainer.batch_size=16",
        "trainer.progress_bar=false", "hardware=cpu", "eval.flops=false", "logger=csv"], fast=False)
    assert results["status"] == "completed" and results["class_names"] == ["fear", "joy", "sad"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["class_names"] == ["fear", "joy", "sad"]


def test_a_features_path_that_is_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(DataError, match=r"dataset.path: features file '.*' is a folder, not a file"):
        build_features(str(tmp_path))


def test_the_data_identity_holds_the_files_content_digest(tmp_path):
    """Other features under the same labels (a file overwritten in place) are other data for resume, report and
    gap, which compare data identities."""
    from mmbalance.engine.identity import data_identity

    rng = np.random.default_rng(0)
    label = np.arange(60) % 3
    f = write(tmp_path / "f.npz", label=label, a=rng.normal(size=(60, 2)))
    first = data_identity(build_features(f))
    write(tmp_path / "f.npz", label=label, a=rng.normal(size=(60, 2)))
    second = data_identity(build_features(f))
    assert first["content"] != second["content"]
    assert {k: v for k, v in first.items() if k != "content"} == {k: v for k, v in second.items() if k != "content"}
