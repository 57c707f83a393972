"""Training runs end to end: results contract, determinism, resume, failures, the CLI and a sweep + report."""

import csv
import json

import pytest

from conftest import FAST, REPO, THREE, read_metrics, run_cli, train_in_process, without_times
from mmbalance.errors import DataError, UserError



def test_a_run_writes_every_metric_and_artifact(tmp_path):
    results = train_in_process(tmp_path, ["method=ogm_ge", *THREE])
    m = results["metrics"]
    assert results["status"] == "completed" and results["modalities"] == ["audio", "visual", "text"]
    for key in ["test/acc", "test/macro_f1", "test/imbalance", "val/acc", "flops/train_total",
                "flops/forward_per_sample", "best_epoch"]:
        assert m[key] is not None, key
    for mod in ("audio", "visual", "text"):
        assert 0 <= m[f"test/acc/{mod}"] <= 1 and f"test/shapley/{mod}" in m
    phi = sum(m[f"test/shapley/{mod}"] for mod in ("audio", "visual", "text"))
    assert phi == pytest.approx(m["test/acc"] - m["test/value/empty"])
    assert m["flops/train_total"] > 0 and m["flops/train/train_steps"] == m["flops/train_total"]
    on_disk = read_metrics(tmp_path)
    assert on_disk["status"] == "completed" and on_disk["config"]["method"]["alpha"] == 0.8
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "flops_fvcore.txt").exists()
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"train/loss", "val/acc", "val/acc/text", "val/imbalance", "lr"} <= set(rows[0])


def test_train_flops_are_the_measured_step_scaled_to_every_sample(tmp_path):
    m = train_in_process(tmp_path, ["eval.shapley_every=0"])["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    samples = sum(int(r["train/samples"]) for r in rows)
    per_sample = float(rows[0]["flops/train_so_far"]) / int(rows[0]["train/samples"])
    assert m["flops/train_total"] == pytest.approx(per_sample * samples)
    # a training step (forward + backward) costs about three forward passes per sample
    assert 2.0 < per_sample / m["flops/forward_per_sample"] < 3.5


def test_a_stat_logged_on_some_steps_is_averaged_over_those_steps_only(tmp_path, monkeypatch):
    """CGGM's coefficients need a previous step: the epoch mean of such a stat must not count the steps that did
    not log it as zeros."""
    import torch

    from mmbalance.methods.baseline import Baseline

    plain_step = Baseline.training_step

    def step_logging_late(self, run, batch):
        stats = plain_step(self, run, batch)
        if run.step % 3:  # not on the first step of the epoch (3 steps of 32 per epoch)
            stats["late"] = torch.tensor(2.0)
        return stats

    monkeypatch.setattr(Baseline, "training_step", step_logging_late)
    train_in_process(tmp_path, ["dataset.num_samples=120", "eval.flops=false"])
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [float(r["train/late"]) for r in rows] == [2.0, 2.0]


def test_same_seed_same_metrics_and_another_seed_differs(tmp_path):
    a = train_in_process(tmp_path / "a", ["method=ogm_ge"])["metrics"]
    b = train_in_process(tmp_path / "b", ["method=ogm_ge"])["metrics"]
    c = train_in_process(tmp_path / "c", ["method=ogm_ge", "seed=1"])["metrics"]
    assert without_times(a) == without_times(b)
    assert a["val/shapley/audio"] != c["val/shapley/audio"] or a["test/acc"] != c["test/acc"]


def test_extending_a_finished_run_needs_resume_force_and_gives_the_uninterrupted_result(tmp_path):
    straight = train_in_process(tmp_path / "straight", ["method=ogm_ge", "trainer.epochs=3"])["metrics"]
    train_in_process(tmp_path / "resumed", ["method=ogm_ge", "trainer.epochs=1"])
    with pytest.raises(UserError, match=r"trainer.epochs: 1 -> 3"):  # another identity: refused, nothing changed
        train_in_process(tmp_path / "resumed", ["method=ogm_ge", "trainer.epochs=3"])
    assert read_metrics(tmp_path / "resumed")["status"] == "completed"
    resumed = train_in_process(tmp_path / "resumed", ["method=ogm_ge", "trainer.epochs=3", "resume=force"])
    assert without_times(resumed["metrics"]) == without_times(straight)
    assert resumed["forced_resume"]["differences"] == ["trainer.epochs: 1 -> 3"]


def test_a_failed_run_says_so_in_metrics_json(tmp_path):
    with pytest.raises(DataError, match="no `label` array"):
        import numpy as np

        np.savez(tmp_path / "f.npz", audio=np.zeros((10, 3)))
        train_in_process(tmp_path / "run", ["dataset=features", f"dataset.path={tmp_path / 'f.npz'}"], fast=False)
    results = read_metrics(tmp_path / "run")
    assert results["status"] == "failed" and "DataError" in results["error"] and results["metrics"] == {}


def test_a_method_given_too_many_modalities_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="at most 2 modalities"):
        train_in_process(tmp_path, ["method._target_=helpers.TwoModalityMethod", *THREE])
    assert read_metrics(tmp_path)["status"] == "failed"


def test_selecting_on_test_is_recorded(tmp_path):
    results = train_in_process(tmp_path, ["eval.select_on=test", "trainer.epochs=1"])
    assert results["select_on"] == "test" and "test/acc" in results["metrics"]


# ---------------------------------------------------------------- the command line


def test_cli_missing_data_path_is_one_clear_message_and_no_success(tmp_path):
    proc = run_cli(["dataset=features", "dataset.path=/nonexistent/feats.npz", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert "error: dataset.path: features file '/nonexistent/feats.npz' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_metrics(tmp_path)["status"] == "failed"


def test_cli_unknown_method_lists_the_options(tmp_path):
    proc = run_cli(["method=no_such_method", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert "method has no option 'no_such_method'" in proc.stderr and "ogm_ge" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_cli_null_for_a_config_group_is_one_message_with_its_options(tmp_path):
    proc = run_cli(["logger=null", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: logger=null: a config group takes one of its options (auto, csv, mlflow, "
                                   "tensorboard, wandb) or a list of them ([] for none); `~logger` drops the group")
    assert not (tmp_path / "metrics.json").exists()


def test_cli_unknown_group_option_is_one_message_with_the_closest_name_or_the_variant(tmp_path):
    proc = run_cli(["method=amss_plus", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "Config search path" not in proc.stderr
    assert proc.stderr.startswith("error: method=amss_plus: method has no option 'amss_plus' (did you mean "
                                  "`method=amss method.variant=amss_plus`?); its options are: agm, amco, amss,")
    proc = run_cli(["-m", "logger=[csv,tensorbord]", f"hydra.sweep.dir={tmp_path}"], tmp_path)
    assert proc.stderr.strip() == ("error: logger=[csv,tensorbord]: logger has no option 'tensorbord' (did you mean "
                                   "tensorboard?); its options are: auto, csv, mlflow, tensorboard, wandb")
    assert not list(tmp_path.iterdir())  # refused before Hydra made any folder


def test_cli_sweep_then_report_gives_one_row_per_method_with_n_2(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=baseline,ogm_ge", "seed=0,1", *FAST, "trainer.epochs=1",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 4 and all(json.loads(p.read_text())["status"] == "completed" for p in runs)
    (first_job,) = sweep.glob("dataset=synthetic,method=baseline,seed=0,*")  # jobs are named by their overrides
    assert (first_job / "train.log").read_text().count("epoch 0") == 1
    report = run_cli(["report", str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| baseline") or line.startswith("| ogm_ge")]
    assert len(rows) == 2 and all(row.split("|")[3].strip() == "2" for row in rows), report.stdout
    assert (sweep / "summary.md").exists() and (sweep / "acc_vs_imbalance.png").exists()


def test_gpu_hardware_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="hardware.device='cuda' but CUDA is not available"):
        train_in_process(tmp_path, ["hardware=gpu"])
    assert read_metrics(tmp_path)["status"] == "failed"


def test_gradient_clipping_bounds_the_update(tmp_path):
    import torch

    from mmbalance.engine.run import Run

    model = torch.nn.Linear(3, 1)
    model.weight.grad = torch.full_like(model.weight, 10.0)
    model.bias.grad = torch.full_like(model.bias, 10.0)
    run = Run(model=model, method=None, optimizer=None, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=2, grad_clip=1.0)
    run.clip_gradients()
    total = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()
    assert total == pytest.approx(1.0, rel=1e-5)


def test_a_failing_job_in_a_sweep_is_recorded_and_the_others_still_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=unimodal", "method.modality=video,audio", *FAST, "trainer.epochs=1",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode != 0  # the sweep reports its failure...
    statuses = {json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")}
    assert statuses == {"failed", "completed"}  # ...but the audio job still ran and says so
    (video_job,) = sweep.glob("*method.modality=video*")
    assert "method.modality='video' is not a modality of this dataset" in (video_job / "train.log").read_text()


def test_validation_shapley_every_n_epochs_and_the_last(tmp_path):
    train_in_process(tmp_path, ["eval.shapley_every=2", "trainer.epochs=3"])
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [bool(r.get("val/imbalance")) for r in rows] == [False, True, True]


def test_the_record_names_the_commit_and_whether_the_source_differed_from_it():
    import subprocess

    from mmbalance.train import _git_sha

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    assert _git_sha() == head + ("-dirty" if changed else "")


def test_what_a_builder_returns_is_checked_before_training(tmp_path):
    """A new dataset's builder meets these first: labels past its classes were an IndexError in the first epoch,
    and a (splits, kinds) tuple an AttributeError."""
    from mmbalance.data.synthetic import build_synthetic
    from mmbalance.errors import UserError
    from mmbalance.train import check_splits

    splits = build_synthetic()
    check_splits(splits, "build_synthetic")
    with pytest.raises(UserError, match=r"returned tuple, expected DataSplits"):
        check_splits((splits, {}), "build_synthetic")
    splits.num_classes -= 1
    splits.class_names = splits.class_names[:-1]
    with pytest.raises(UserError, match=r"split has labels from 0 to \d+, outside its \d+ classes"):
        check_splits(splits, "build_synthetic")
    splits.class_names = []
    with pytest.raises(UserError, match=r"gives 0 class names for \d+ classes"):
        check_splits(splits, "build_synthetic")
