"""dataset.task=regression: the metrics on hand-computed numbers, the loss helper, the Shapley value (-MAE), the
selection criterion, methods declaring or refusing the task, and tiny end-to-end runs on the CMU-MOSEI fixture."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from fixtures_cmu_mosei import Y, write_mult
from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.evaluation import evaluate
from mmbalance.errors import UserError
from mmbalance.methods import registered_methods
from mmbalance.methods.baseline import Baseline
from mmbalance.metrics.regression import (METRICS, pearson, regression_metrics, resolve_loss, selection_metric,
                                          weighted_f1)
from mmbalance.metrics.shapley import coalitions, shapley_values

# eight scores with ties at .5 (rounded half to even), zero labels, a prediction of exactly 0 and one beyond 3
PRED = [3.7, -0.4, 0.0, 0.5, -1.5, 2.6, 0.2, -2.5]
TRUE = [3.0, -1.0, 0.0, -0.5, -1.5, 2.5, 0.0, -2.0]


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_computed_numbers():
    m = regression_metrics(t(PRED), t(TRUE))
    assert set(m) == set(METRICS)
    # |p - y| = .7 .6 0 1 0 .1 .2 .5
    assert m["mae"] == pytest.approx(3.1 / 8)
    # >= 0: p T F T T F T T F, y T F T F F T T F -> only sample 3 (p 0.5, y -0.5) disagrees
    assert m["acc2_nonneg"] == m["acc"] == pytest.approx(7 / 8)
    # non-negative: TP 4 FP 1 FN 0 -> 8/9 (support 4); negative: TP 3 FP 0 FN 1 -> 6/7 (support 4)
    assert m["f1_nonneg"] == pytest.approx((8 / 9 * 4 + 6 / 7 * 4) / 8)
    assert m["macro_f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    # zero labels (samples 2 and 6) left out; > 0: p T F T F T F, y T F F F T F -> 5 of 6
    assert m["acc2_nonzero"] == pytest.approx(5 / 6)
    # positive: TP 2 FP 1 FN 0 -> 4/5 (support 2); negative: TP 3 FP 0 FN 1 -> 6/7 (support 4)
    assert m["f1_nonzero"] == pytest.approx((4 / 5 * 2 + 6 / 7 * 4) / 6)
    # clip to [-3, 3], round half to even: p 3 -0 0 0 -2 3 0 -2 vs y 3 -1 0 -0 -2 2 0 -2 -> samples 1, 5 differ
    # (3.7 matches 3.0 only because it is clipped; 0.5 -> 0, -1.5 -> -2, -2.5 -> -2, 2.5 -> 2)
    assert m["acc7"] == pytest.approx(6 / 8)
    # clip to [-2, 2]: p 2 -0 0 0 -2 2 0 -2 vs y 2 -1 0 -0 -2 2 0 -2 -> only sample 1 differs
    assert m["acc5"] == pytest.approx(7 / 8)
    assert m["corr"] == pytest.approx(np.corrcoef(PRED, TRUE)[0, 1], abs=1e-6)


def test_pearson_by_hand_and_undefined_for_constants():
    # centred p = -1 0 1, y = -1 1 0: r = 1 / sqrt(2 * 2)
    assert pearson(t([1, 2, 3]), t([1, 3, 2])) == pytest.approx(0.5)
    assert pearson(t([1, 1, 1]), t([1, 3, 2])) is None
    assert pearson(t([1.0]), t([2.0])) is None
    assert regression_metrics(t([0.4, 0.4]), t([1.0, -1.0]))["corr"] is None


def test_zero_prediction_and_zero_labels_in_the_two_acc2_conventions():
    # a prediction of exactly 0 is non-negative (>= 0) but not positive (> 0)
    m = regression_metrics(t([0.0, 0.0]), t([1.0, -1.0]))
    assert m["acc2_nonneg"] == pytest.approx(0.5) and m["acc2_nonzero"] == pytest.approx(0.5)
    # only zero labels: nothing is left for the non-zero convention
    m = regression_metrics(t([0.3, -0.3]), t([0.0, 0.0]))
    assert m["acc2_nonzero"] is None and m["f1_nonzero"] is None
    assert m["acc2_nonneg"] == pytest.approx(0.5)


def test_weighted_f1_weighs_by_true_support_like_sklearn():
    # true: 3 positive, 1 negative; pred all positive -> positive F1 = 6/7, negative F1 = 0
    assert weighted_f1(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 0])) == pytest.approx(6 / 7 * 3 / 4)
    assert weighted_f1(torch.tensor([1, 1]), torch.tensor([1, 1])) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- task and loss


def test_loss_and_selection_resolution():
    assert resolve_loss("classification") == "cross_entropy" and resolve_loss("regression") == "l1"
    assert resolve_loss("regression", "mse") == "mse"
    with pytest.raises(UserError, match=r"dataset.loss='l1' does not train dataset.task=classification"):
        resolve_loss("classification", "l1")
    with pytest.raises(UserError, match=r"dataset.task='ranking'"):
        resolve_loss("ranking")
    assert selection_metric("classification", "macro_f1") == "macro_f1"
    assert selection_metric("regression", "acc") == "mae"  # the run config's default means the lowest val MAE
    assert selection_metric("regression", "corr") == "corr"
    with pytest.raises(UserError, match="eval.select_metric=mae is a regression metric"):
        selection_metric("classification", "mae")


def test_baseline_task_loss_is_l1_or_mse_of_the_one_output():
    out = torch.tensor([[1.0], [-2.0], [0.5]])
    y = torch.tensor([0.0, -1.0, 0.5])
    method = Baseline()
    method.set_task("regression")
    assert method.loss_name == "l1" and method.loss_key == "l1"
    assert float(method.task_loss(out, y)) == pytest.approx((1 + 1 + 0) / 3)
    method.set_task("regression", "mse")
    assert float(method.task_loss(out, y)) == pytest.approx((1 + 1 + 0) / 3)
    assert float(method.task_loss(out * 2, y)) == pytest.approx((4 + 9 + 0.25) / 3)
    with pytest.raises(UserError, match="integer class labels, not float scores"):
        method.task_loss(out, y.long())
    classifier = Baseline()  # the default task: cross-entropy, unchanged
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert float(classifier.task_loss(logits, torch.tensor([0, 1]))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))))


def test_every_registered_method_declares_regression_or_refuses_it_naming_itself():
    declared = []
    for name, cls in registered_methods().items():
        method = object.__new__(cls)  # the task check reads class attributes only
        if "regression" in cls.tasks:
            declared.append(name)
            continue
        with pytest.raises(UserError, match=rf"^method {name} does not support dataset.task=regression: \w"):
            method.set_task("regression", "auto")
    assert {"baseline", "unimodal", "mmpareto"} <= set(declared)
    assert not {"ogm_ge", "agm", "pmr", "mmcosine", "cml", "mbsd", "valuation"} & set(declared)


# --------------------------------------------------------------------------------------------- Shapley


class _Run:
    """The part of the run context that evaluate() reads."""

    def __init__(self, model, method):
        self.model, self.method, self.device, self.num_classes = model, method, torch.device("cpu"), 1

    def autocast(self):
        return contextlib.nullcontext()


def _loader(mods, n=20, batch=8):
    x = inputs(mods, n)
    y = torch.linspace(-3, 3, n)
    return [Batch({m: v[i:i + batch] for m, v in x.items()}, y[i:i + batch], torch.arange(i, min(i + batch, n)))
            for i in range(0, n, batch)]


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_regression_shapley_is_exact_over_negative_mae(mods, fusion):
    model = tiny_model(mods, fusion=fusion, classes=1).eval()
    method = Baseline()
    method.set_task("regression")
    loader = _loader(mods)
    out = evaluate(_Run(model, method), loader, "test", shapley=True)
    y = torch.cat([b.label for b in loader])
    naive = {}
    with torch.no_grad():
        for s in coalitions(mods):
            absent = [m for m in mods if m not in s]
            pred = torch.cat([model(b.inputs, absent=absent).logits[:, 0] for b in loader])
            naive[s] = -float((pred - y).abs().mean())
    phi = shapley_values(naive, mods)
    for m in mods:
        assert out[f"test/shapley/{m}"] == pytest.approx(phi[m], abs=1e-6)
    assert out["test/mae"] == pytest.approx(-naive[frozenset(mods)], abs=1e-6)
    # v(empty) is the constant prediction of the all-absent model; efficiency: sum phi = MAE(empty) - MAE(all)
    assert out["test/value/empty"] == pytest.approx(naive[frozenset()], abs=1e-6)
    assert sum(out[f"test/shapley/{m}"] for m in mods) == pytest.approx(
        out["test/value/empty"] * -1 - out["test/mae"], abs=1e-6)
    pairs = list(itertools.combinations([phi[m] for m in mods], 2))
    assert out["test/imbalance"] == pytest.approx(sum(abs(a - b) for a, b in pairs) / len(pairs), abs=1e-6)
    for m in mods:  # per-modality scores: the concat head's slices, or the modality alone (gated)
        assert {f"test/mae/{m}", f"test/corr/{m}", f"test/acc/{m}"} <= set(out)
    if fusion == "gated":
        alone = frozenset([mods[0]])
        assert out[f"test/mae/{mods[0]}"] == pytest.approx(-naive[alone], abs=1e-6)


# ----------------------------------------------------------------------------------- end-to-end runs

# a tiny MulT-shaped model: the preset's structure, small enough for the CPU test budget
TINY = ["trainer.epochs=3", "trainer.batch_size=4", "trainer.progress_bar=false", "hardware=cpu", "eval.flops=false",
        "backbone.encoders.sequence.d_model=10", "backbone.encoders.sequence.dim_feedforward=16",
        "backbone.encoders.sequence.layers=1"]


def _train(tmp_path, overrides, method="baseline"):
    from mmbalance.train import train

    write_mult(tmp_path / "data" / "cmu_mosei", aligned=False)
    args = [f"paths.data_dir={tmp_path / 'data'}", *TINY, *overrides]
    cfg = compose_cfg(args, fast=False)
    return train(cfg, tmp_path / "run", {"dataset": "cmu_mosei", "method": method}, args)


@pytest.fixture(scope="module")
def mult_run(tmp_path_factory):
    """One tiny run of the MulT preset (3 epochs), shared by the tests that read its folder."""
    tmp_path = tmp_path_factory.mktemp("mult")
    return tmp_path, _train(tmp_path, ["experiment=mult_cmu_mosei"])


def test_mult_preset_trains_regression_end_to_end_with_every_metric(mult_run):
    tmp_path, results = mult_run
    assert results["status"] == "completed"
    assert (results["task"], results["loss"], results["select_metric"]) == ("regression", "l1", "mae")
    assert results["split_sizes"] == {"train": len(Y["train"]), "val": len(Y["valid"]), "test": len(Y["test"])}
    assert results["dataset_notes"]["score_signs"]["val"] == [1, 2, 1]  # valid: 0, -1, 1, 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    for split in ("test", "val"):
        for name in METRICS:
            assert f"{split}/{name}" in metrics, f"{split}/{name}"
    for m in ("audio", "vision", "text"):
        for key in (f"test/mae/{m}", f"test/corr/{m}", f"test/acc/{m}", f"test/shapley/{m}"):
            assert key in metrics
    assert metrics["test/imbalance"] is not None and metrics["test/value/empty"] <= 0
    # the test split (-2/3, 0, 2, 1) has one zero label: acc-2 non-zero is over three samples
    assert metrics["test/acc2_nonzero"] * 3 == pytest.approx(round(metrics["test/acc2_nonzero"] * 3))
    with open(tmp_path / "run" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 3 and all(f"val/{k}" in history[0] for k in ("mae", "corr", "acc7", "f1_nonzero"))
    assert "train/loss" in history[0]
    val_mae = [float(r["val/mae"]) for r in history]
    assert metrics["best_epoch"] == int(np.argmin(val_mae))  # the lowest validation MAE is selected
    assert metrics["val/mae"] == pytest.approx(min(val_mae))


def test_the_report_shows_the_regression_metrics(mult_run):
    from mmbalance.analysis.report import format_runs_table, write_report

    tmp_path, _ = mult_run
    report = write_report([tmp_path / "run"], tmp_path / "report")
    markdown = report["markdown"]
    assert "| MAE | corr | acc-2 ≥0 | F1 ≥0 | acc-2 ≠0 | F1 ≠0 | acc-7 |" in markdown
    assert "MAE audio" in markdown and "MAE points" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| baseline |"))
    mae = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test/mae"]
    assert f"| {mae:.3f} ± –" in row  # MAE as a number, not a percentage
    table = format_runs_table(report["runs"])
    assert table.splitlines()[0].split()[:6] == ["method", "variant", "seed", "acc%", "mae", "corr"]


def test_mmpareto_trains_regression_with_the_l1_loss(tmp_path):
    results = _train(tmp_path, ["experiment=mult_cmu_mosei", "method=mmpareto", "trainer.epochs=1",
                                "dataset.modalities=[audio,text]"], method="mmpareto")
    assert results["status"] == "completed" and results["modalities"] == ["audio", "text"]
    with open(tmp_path / "run" / "history.csv") as f:
        row = next(csv.DictReader(f))
    for key in ("train/l1/fused", "train/l1/audio", "train/l1/text", "train/pareto/cos/audio"):
        assert np.isfinite(float(row[key])), key
    metrics = results["metrics"]
    assert np.isfinite(metrics["test/mae"]) and "test/shapley/text" in metrics


def test_a_method_that_needs_class_probabilities_refuses_regression_before_training(tmp_path):
    with pytest.raises(UserError) as info:
        _train(tmp_path, ["experiment=mult_cmu_mosei", "method=ogm_ge"], method="ogm_ge")
    assert str(info.value) == (
        "method ogm_ge does not support dataset.task=regression: its modulation coefficients come from each "
        "modality's softmax probability of the true class. method=baseline supports every task")
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results["status"] == "failed" and not (tmp_path / "run" / "history.csv").exists()


def test_a_regression_loss_for_classification_is_refused(tmp_path):
    with pytest.raises(UserError, match="dataset.loss='mse' does not train dataset.task=classification"):
        _train(tmp_path, ["experiment=paper_cmu_mosei", "dataset.loss=mse"])
