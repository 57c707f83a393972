"""Bring-your-own features files: splits, kinds, and clear errors."""

import numpy as np
import pytest

from mmbalance.data.features import build_features
from mmbalance.errors import DataError


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
