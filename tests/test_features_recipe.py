"""The default recipe of `dataset=features` (bring your own features) against the reference a user compares with:
a logistic regression on the concatenated views, on real multi-view data (scikit-learn's handwritten digits cut
into 2 and 3 views of pixel rows)."""

import numpy as np
import pytest

from conftest import compose_cfg, train_in_process
from mmbalance.data.features import build_features

VIEWS = {2: ((0, 4), (4, 8)), 3: ((0, 3), (3, 6), (6, 8))}  # pixel rows of the 8x8 digit per view


def digits_views(tmp_path, n_views):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    rows = x.reshape(-1, 8, 8)
    views = {f"rows{a}{b}": rows[:, a:b].reshape(len(y), -1).astype(np.float32) for a, b in VIEWS[n_views]}
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    split = np.full(len(y), "train")
    split[test] = "test"
    file = tmp_path / f"digits{n_views}.npz"
    np.savez(file, label=y, split=split, **views)
    return file, np.concatenate(list(views.values()), 1), y, train, test


def test_the_features_defaults_are_the_feature_recipe():
    cfg = compose_cfg(["dataset=features", "dataset.path=x.npz"], fast=False)
    assert (cfg.optimizer._target_, cfg.trainer.epochs, cfg.dataset.standardize) == ("torch.optim.AdamW", 50, True)
    cfg = compose_cfg(["dataset=features", "dataset.path=x.npz", "optimizer=sgd", "trainer.epochs=3"], fast=False)
    assert (cfg.optimizer._target_, cfg.trainer.epochs) == ("torch.optim.SGD", 3)  # the command line still wins
    assert compose_cfg([], fast=False).optimizer._target_ == "torch.optim.SGD"  # other datasets keep theirs


def test_standardisation_uses_the_train_split_only(tmp_path):
    x = np.array([[1.0, 5.0], [3.0, 5.0], [100.0, 7.0], [-50.0, 0.0]], np.float32)
    np.savez(tmp_path / "f.npz", label=np.array([0, 1, 0, 1]), split=np.array(["train", "train", "val", "test"]), v=x)
    splits = build_features(str(tmp_path / "f.npz"))
    # train rows: mean (2, 5), std (1, 0 -> 1): (x - mean) / std, the constant feature only centred
    assert splits.train.inputs["v"].tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    assert (splits.val.inputs["v"].tolist(), splits.test.inputs["v"].tolist()) == ([[98.0, 2.0]], [[-52.0, -5.0]])
    assert splits.notes["standardize"] == "per feature, train-split mean and std"
    raw = build_features(str(tmp_path / "f.npz"), standardize=False)
    assert raw.train.inputs["v"].tolist() == x[:2].tolist()


@pytest.mark.parametrize("n_views", [2, 3])
def test_the_default_recipe_reaches_a_logistic_regression_on_the_concatenated_views(tmp_path, n_views):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    file, x, y, train, test = digits_views(tmp_path, n_views)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x[train], y[train])
    linear = probe.score(x[test], y[test])  # 0.967 for both view splits
    result = train_in_process(tmp_path / "run", ["dataset=features", f"dataset.path={file}", "trainer.progress_bar=false", "eval.flops=false", "eval.shapley_every=0"],
                              fast=False)
    assert result["metrics"]["test/acc"] >= linear
