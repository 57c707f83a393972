"""The console lines of a run: each epoch's line and the final test line say which metric each number is, for
classification (unchanged) and regression (MAE, correlation, acc-2; imbalance in MAE points)."""

from __future__ import annotations

import csv
import json

import numpy as np

from conftest import run_cli
from mmbalance.cli import final_summary
from mmbalance.engine.trainer import modality_scores

MODS = ["audio", "vision"]
ROW = {"val/mae": 0.5698, "val/acc/audio": 0.9, "val/acc/vision": 0.75, "val/mae/audio": 0.405,
       "val/mae/vision": 0.6, "val/corr/audio": 0.31, "val/corr/vision": None}


def test_the_epoch_line_shows_the_headline_metric_per_modality():
    assert modality_scores(ROW, MODS, "classification", "acc") == "audio 0.900  vision 0.750"  # unchanged
    assert modality_scores(ROW, MODS, "classification", "macro_f1") == "audio 0.900  vision 0.750"
    # regression: the MAE per modality under an MAE headline, never the acc-2
    assert modality_scores(ROW, MODS, "regression", "mae") == "mae audio 0.405  vision 0.600"
    assert modality_scores(ROW, MODS, "regression", "corr") == "corr audio 0.310  vision n/a"
    assert modality_scores(ROW, MODS, "regression", "acc2_nonneg") == "acc-2 audio 0.900  vision 0.750"
    assert modality_scores(ROW, MODS, "regression", "acc7") == "mae audio 0.405  vision 0.600"  # no per-modality acc-7


def test_the_final_line_leads_with_the_task_metrics():
    classification = {"task": "classification", "select_metric": "acc",
                      "metrics": {"test/acc": 0.93333, "test/macro_f1": 0.9, "test/imbalance": 0.235}}
    assert final_summary(classification) == "test acc 0.9333  macro-F1 0.9000  imbalance 0.2350"  # unchanged
    assert final_summary({**classification, "metrics": {"test/acc": 0.5, "test/macro_f1": 0.5}}) == \
        "test acc 0.5000  macro-F1 0.5000  imbalance n/a"
    metrics = {"test/mae": 0.5698, "test/corr": 0.41, "test/acc2_nonneg": 0.75, "test/acc": 0.75,
               "test/macro_f1": 0.7, "test/acc7": 0.25, "test/imbalance": 0.235}
    regression = {"task": "regression", "select_metric": "mae", "metrics": metrics}
    assert final_summary(regression) == "test MAE 0.5698  corr 0.4100  acc-2 0.7500  imbalance 0.2350 MAE points"
    # another selection metric is shown too; an undefined correlation is n/a
    assert final_summary({**regression, "select_metric": "acc7", "metrics": {**metrics, "test/corr": None}}) == \
        "test MAE 0.5698  corr n/a  acc-2 0.7500  acc7 0.2500  imbalance 0.2350 MAE points"


def test_a_regression_run_prints_mae_per_modality_and_a_final_line_with_its_metrics(tmp_path):
    rng = np.random.default_rng(0)
    audio, vision = rng.normal(size=(60, 4)).astype(np.float32), rng.normal(size=(60, 3)).astype(np.float32)
    np.savez(tmp_path / "r.npz", label=audio[:, 0] + 0.3 * vision[:, 0], audio=audio, vision=vision)
    run = tmp_path / "run"
    proc = run_cli(["dataset=features", f"dataset.path={tmp_path / 'r.npz'}", "++dataset.task=regression",
                    "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress_bar=false", "hardware=cpu",
                    "eval.flops=false", "logger=csv", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = (run / "train.log").read_text()
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    epoch = next(line for line in log.splitlines() if "epoch 0  loss" in line)
    mae = {m: f"{float(row[f'val/mae/{m}']):.3f}" for m in MODS}
    assert f"val/mae {float(row['val/mae']):.4f}  mae audio {mae['audio']}  vision {mae['vision']}  (" in epoch

    m = json.loads((run / "metrics.json").read_text())["metrics"]
    final = next(line for line in log.splitlines() if "  -> " in line)
    assert (f"test MAE {m['test/mae']:.4f}  corr {m['test/corr']:.4f}  acc-2 {m['test/acc2_nonneg']:.4f}  "
            f"imbalance {m['test/imbalance']:.4f} MAE points  -> ") in final
