"""Runs that never lie: run identity, results that survive re-runs, corrupt checkpoints, kills and Ctrl-C.

In-process cases inject faults by wrapping functions; the subprocess cases kill a real CLI run with SIGKILL
(tests/fault_driver.py) or SIGINT, then re-run the same command and compare with an uninterrupted run.
"""

import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, REPO, read_metrics, run_cli, train_in_process, without_times
from mmbalance.engine.checkpoint import WriteError, load_checkpoint, save_checkpoint
from mmbalance.engine.identity import job_dir_name, run_identity
from mmbalance.engine.run_folder import RunFolder
from mmbalance.errors import CheckpointError, ConfigError, RunFolderError, TrainingDiverged, UserError

OGM = ["method=ogm_ge", "trainer.epochs=3"]  # random noise in every step: resume must restore the RNG too



def history(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def interrupt_at_epoch(monkeypatch, epoch: int):
    """Ctrl-C as the given epoch starts training (in-process)."""
    from mmbalance.engine.trainer import Trainer

    original = Trainer.train_epoch

    def train_epoch(self, e):
        if e == epoch:
            raise KeyboardInterrupt
        return original(self, e)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def interrupted_at_epoch_2_of_3(monkeypatch, out: Path) -> None:
    """A 3-epoch run in `out`, Ctrl-C as its epoch 2 starts: checkpoints of epochs 0 and 1 on disk."""
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(out, ["trainer.epochs=3"])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def select_epoch(monkeypatch, epoch: int | None):
    """Make `epoch` the selected one (None: always the latest), whatever the validation scores."""
    from mmbalance.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "_improves", lambda self, score: epoch is None or self.history[-1]["epoch"] <= epoch)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock aside) with its bytes: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 3-epoch OGM-GE run every resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    return train_in_process(out, OGM), out


# ---------------------------------------------------------------- identity and re-runs

def test_job_folder_names_do_not_depend_on_argument_order():
    assert job_dir_name(["seed=0", "method=ogm_ge"]) == job_dir_name(["method=ogm_ge", "seed=0"]) == "method=ogm_ge,seed=0"
    assert job_dir_name(["method.alpha=0.1", "seed=0", "method=ogm_ge"]) == "method=ogm_ge,seed=0,method.alpha=0.1"
    # loggers only mirror results: choosing others must not move a job to a new folder
    assert job_dir_name(["method=ogm_ge", "seed=0", "logger=[tensorboard,mlflow]", "+logger.mlflow.tracking_uri=x"]) \
        == "method=ogm_ge,seed=0"
    assert job_dir_name(["experiment=demo/baseline", "seed=1"]) == "experiment=demo_baseline,seed=1"
    assert job_dir_name([]) == "default"
    long = job_dir_name([f"backbone.encoders.image.width={i}" for i in range(20)])
    assert len(long) <= 96 and long != job_dir_name([f"backbone.encoders.image.width={i}" for i in range(21)])
    assert "/" not in job_dir_name(["dataset.path=/data/x y.npz"])


def test_identity_ignores_where_and_how_visibly_a_run_runs():
    base = {"seed": 0, "method": {"alpha": 0.8}, "trainer": {"epochs": 3, "progress_bar": "auto"},
            "paths": {"data_dir": "/a"}, "hardware": {"num_workers": 0, "precision": "fp32"}}
    moved = {**base, "paths": {"data_dir": "/b"}, "trainer": {"epochs": 3, "progress_bar": False},
             "hardware": {"num_workers": 4, "precision": "fp32"}}
    assert run_identity(base, "1")["digest"] == run_identity(moved, "1")["digest"]
    for changed in ({**base, "seed": 1}, {**base, "hardware": {"num_workers": 0, "precision": "bf16"}}):
        assert run_identity(changed, "1")["digest"] != run_identity(base, "1")["digest"]
    assert run_identity(base, "1")["digest"] != run_identity(base, "2")["digest"]  # the package version


def test_a_completed_run_is_left_as_it_is_and_reevaluation_is_on_request(tmp_path, straight):
    first, _ = straight
    out = tmp_path / "run"
    done = train_in_process(out, OGM)
    before = (out / "metrics.json").read_bytes()
    again = train_in_process(out, OGM)
    assert (out / "metrics.json").read_bytes() == before and again["metrics"] == done["metrics"]
    redone = train_in_process(out, [*OGM, "resume=reevaluate"])
    assert without_times(redone["metrics"]) == without_times(done["metrics"])
    assert redone["processes"] == 2 and redone["wall_time_s"] > done["wall_time_s"]
    assert without_times(done["metrics"]) == without_times(first["metrics"])


def test_another_runs_folder_is_refused_naming_both_runs_and_the_keys(tmp_path):
    out = tmp_path / "run"
    train_in_process(out, ["trainer.epochs=1"])
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(RunFolderError) as err:
        train_in_process(out, ["trainer.epochs=1", "method=ogm_ge"])
    message = str(err.value)
    assert "belongs to another run" in message and "`trainer.epochs=1`" in message
    assert "method._target_: 'mmbalance.methods.baseline.Baseline' -> 'mmbalance.methods.ogm_ge.OGMGE'" in message
    assert "resume=never" in message and "resume=force" in message
    assert (out / "metrics.json").read_bytes() == before


def test_a_checkpoint_of_another_run_is_refused_even_without_its_metrics_json(tmp_path):
    out = tmp_path / "run"
    train_in_process(out, ["trainer.epochs=1", "seed=1"])
    (out / "metrics.json").unlink()
    with pytest.raises(RunFolderError, match=r"last.pt belongs to another run(.|\n)*seed: 1 -> 0"):
        train_in_process(out, ["trainer.epochs=1"])


def test_a_checkpoint_trained_on_another_number_of_processes_is_refused_at_resume(tmp_path, monkeypatch):
    """Two ranks' epochs then one rank's would mix two effective batch sizes in one record."""
    out = tmp_path / "run"
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["world_size"] == 1
    save_checkpoint({**state, "world_size": 2}, last)
    with pytest.raises(RunFolderError, match=r"last.pt belongs to another run(.|\n)*processes \(world size\): 2 -> 1"):
        train_in_process(out, ["trainer.epochs=3"])


def test_an_unfinished_run_of_another_number_of_processes_is_refused_before_anything_is_written(tmp_path,
                                                                                               monkeypatch):
    """Its metrics.json records the world size: the refusal comes from it before anything is written, so the
    record stays as it was (the checkpoint's refusal, later, rewrote it as `failed`)."""
    out = tmp_path / "run"
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    record = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**record, "world_size": 2}))
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(RunFolderError, match=r"metrics.json belongs to another run(.|\n)*"
                                             r"processes \(world size\): 2 -> 1"):
        train_in_process(out, ["trainer.epochs=3"])
    assert (out / "metrics.json").read_bytes() == before


def test_an_epoch_that_trains_on_no_sample_is_an_error_not_a_completed_run(tmp_path):
    """drop_last with a batch larger than the training split (per process under DDP) drops every batch: the run
    would complete with its untrained model's results."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"epoch 0 trained on no sample: trainer.drop_last=true drops the one, "
                                        r"incomplete batch of the \d+ training samples, as trainer.batch_size=100000"):
        train_in_process(out, ["trainer.epochs=1", "trainer.drop_last=true", "trainer.batch_size=100000"])
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and record["metrics"] == {}


@pytest.mark.parametrize("forced, match", [
    (["trainer.epochs=1"], r"trained for 2 epochs; trainer.epochs=1 cannot shorten it"),  # refused in _resume
    (["trainer.epochs=3", "backbone.encoders.image.width=16"], r"last.pt cannot be loaded into this run's model"),
    (["trainer.epochs=3", "optimizer.lr=-1"], r"optimizer.lr"),  # a bad value: refused before the trainer exists
])
def test_a_forced_resume_that_stops_before_training_leaves_the_folder_to_its_run(tmp_path, monkeypatch, forced, match):
    """resume=force over another run's unfinished folder: until it has loaded the checkpoint and starts training,
    the folder's record is the other run's, so that run's own command still resumes it."""
    out = tmp_path / "run"
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(UserError, match=match):
        train_in_process(out, [*forced, "seed=1", "resume=force"])
    assert (out / "metrics.json").read_bytes() == before
    resumed = train_in_process(out, ["trainer.epochs=3"])  # the folder's own run, without resume=force
    assert resumed["status"] == "completed" and resumed["resumed_from"]["epoch"] == 1
    assert "forced_resume" not in resumed


def test_a_changed_dataset_is_refused_at_resume(tmp_path, monkeypatch):
    path = tmp_path / "feats.npz"
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    np.savez(path, a=x, b=x[:, ::-1].copy(), label=labels)
    args = ["dataset=features", f"dataset.path={path}", "trainer.epochs=2", "trainer.progress_bar=false"]
    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tmp_path / "run", args, fast=False)
    monkeypatch.undo()
    np.savez(path, a=x, b=x[:, ::-1].copy(), label=(labels + 1) % 3)  # same shapes, other labels
    with pytest.raises(RunFolderError, match=r"dataset train.labels"):
        train_in_process(tmp_path / "run", args, fast=False)


def test_resume_never_moves_the_previous_files_aside(tmp_path):
    out = tmp_path / "run"
    old = train_in_process(out, ["trainer.epochs=1"])
    new = train_in_process(out, ["trainer.epochs=1", "method=ogm_ge", "resume=never"])
    (moved,) = (out / "superseded").iterdir()
    assert json.loads((moved / "metrics.json").read_text())["metrics"] == old["metrics"]
    assert (moved / "checkpoints" / "last.pt").exists()
    assert read_metrics(out)["status"] == "completed" and read_metrics(out)["choices"] == new["choices"]
    assert read_metrics(out)["config"]["method"]["alpha"] == 0.8


def test_an_unknown_resume_mode_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"resume='sometimes': expected one of \['auto', 'never', 'force', 'reevaluate'\]"):
        train_in_process(tmp_path, ["resume=sometimes"])


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    with RunFolder(tmp_path).locked():
        with pytest.raises(RunFolderError, match=f"{tmp_path} is in use by pid {os.getpid()}"):
            train_in_process(tmp_path, ["trainer.epochs=1"])
    assert not (tmp_path / "metrics.json").exists()


def test_a_run_is_never_shortened_and_the_refusal_changes_nothing(tmp_path, monkeypatch):
    done = tmp_path / "done"
    train_in_process(done, ["trainer.epochs=2"])
    before = files(done)
    with pytest.raises(RunFolderError) as err:
        train_in_process(done, ["trainer.epochs=1", "resume=force"])
    message = str(err.value)
    assert "metrics.json holds a run trained for 2 epochs; trainer.epochs=1 cannot shorten it" in message
    assert "resume=never" in message and "another folder" in message
    assert files(done) == before
    # an unfinished run: its checkpoint says how far it got
    part = tmp_path / "part"
    interrupted_at_epoch_2_of_3(monkeypatch, part)
    before = files(part / "checkpoints"), (part / "history.csv").read_bytes()
    with pytest.raises(RunFolderError, match=r"last.pt holds a run trained for 2 epochs; trainer.epochs=1 cannot"):
        train_in_process(part, ["trainer.epochs=1", "resume=force"])
    assert (files(part / "checkpoints"), (part / "history.csv").read_bytes()) == before


@pytest.mark.parametrize("bad", [["optimizer.lr=-1"], ["dataset.num_samples=4"]], ids=["config", "data"])
def test_resume_never_checks_the_new_run_before_moving_the_old_one_aside(tmp_path, bad):
    out = tmp_path / "run"
    train_in_process(out, ["trainer.epochs=1"])
    before = files(out)
    with pytest.raises(ConfigError if "lr" in bad[0] else UserError):
        train_in_process(out, ["trainer.epochs=1", "resume=never", *bad])
    assert files(out) == before and not (out / "superseded").exists()


def test_an_interrupted_extension_keeps_the_completed_record_and_says_so(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    done = train_in_process(out, ["trainer.epochs=2"])
    from mmbalance.engine.trainer import Trainer

    original, seen = Trainer.train_epoch, {}

    def train_epoch(self, epoch):  # Ctrl-C as epoch 3 starts; the record as it was while epoch 2 trained
        if epoch == 2:
            seen["during"] = read_metrics(out)
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", train_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(out, ["trainer.epochs=5", "resume=force"])
    assert seen["during"]["status"] == "completed" and seen["during"]["extension"]["status"] == "running"
    record = read_metrics(out)
    assert record["status"] == "completed" and record["metrics"] == done["metrics"] and record["metrics"]["epochs"] == 2
    assert record["extension"] == {"epochs": 5, "status": "interrupted", "error": "KeyboardInterrupt: "}
    assert len(history(out)) == 3  # the rows beyond `epochs` belong to the extension the record names
    assert "extension to 5 epochs interrupted" in caplog.text and "re-evaluation" not in caplog.text
    with pytest.raises(RunFolderError, match=r"an extension of it to 5 epochs that ended 'interrupted'; "
                                             r"resume=force finishes that extension"):  # re-run without force
        train_in_process(out, ["trainer.epochs=5"])
    finished = train_in_process(out, ["trainer.epochs=5", "resume=force"])
    assert finished["metrics"]["epochs"] == 5 and "extension" not in read_metrics(out)


# ---------------------------------------------------------------- interruptions and damaged files

def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, straight):
    expected, straight_dir = straight
    out = tmp_path / "run"
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, OGM)
    stopped = read_metrics(out)
    assert stopped["status"] == "interrupted" and stopped["metrics"] == {}
    monkeypatch.undo()
    resumed = train_in_process(out, OGM)
    assert without_times(resumed["metrics"]) == without_times(expected["metrics"])
    assert history(out) == history(straight_dir)
    assert resumed["processes"] == 2 and resumed["resumed_from"]["epoch"] == 1
    assert resumed["wall_time_s"] > stopped["wall_time_s"] * 0.5  # the first process's work is counted


def test_an_unreadable_last_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch, straight, caplog):
    expected, straight_dir = straight
    out = tmp_path / "run"
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, OGM)
    monkeypatch.undo()
    truncate(out / "checkpoints" / "last.pt")
    resumed = train_in_process(out, OGM)
    assert "last.pt" in caplog.text and "is unreadable" in caplog.text and "resuming from last.prev.pt (epoch 0)" in caplog.text
    assert without_times(resumed["metrics"]) == without_times(expected["metrics"])
    assert history(out) == history(straight_dir)


def test_no_readable_checkpoint_is_one_message_naming_the_files_and_nothing_is_deleted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, OGM)
    monkeypatch.undo()
    for name in ("last.pt", "last.prev.pt"):
        truncate(out / "checkpoints" / name)
    with pytest.raises(CheckpointError) as err:
        train_in_process(out, OGM)
    message = str(err.value)
    assert "checkpoints/last.pt" in message and "checkpoints/last.prev.pt" in message and "resume=never" in message
    assert read_metrics(out)["status"] == "failed" and (out / "checkpoints" / "last.pt").exists()


def test_a_failed_or_interrupted_reevaluation_keeps_the_completed_results(tmp_path, monkeypatch):
    out = tmp_path / "run"
    select_epoch(monkeypatch, 0)  # the selected epoch 0 is not the last: best.pt alone holds its weights
    train_in_process(out, ["trainer.epochs=2"])
    before = (out / "metrics.json").read_bytes()
    import mmbalance.engine.trainer as trainer

    def interrupted_test(run, loader, split, shapley=True):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "evaluate", interrupted_test)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(out, ["trainer.epochs=2", "resume=reevaluate"])
    assert (out / "metrics.json").read_bytes() == before
    truncate(out / "checkpoints" / "best.pt")
    truncate(out / "checkpoints" / "last.prev.pt")  # the other file that holds epoch 0 (last.pt holds epoch 1)
    with pytest.raises(CheckpointError, match=r"best.pt(.|\n)*selected epoch 0(.|\n)*resume=never"):
        train_in_process(out, ["trainer.epochs=2", "resume=reevaluate"])
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["missing", "another-epoch"])
def test_without_the_selected_epochs_weights_no_test_result_is_reported(tmp_path, monkeypatch, damage):
    """Killed after the selected epoch 0; best.pt then lost (or holding another epoch), and last.prev.pt, the other
    file that held epoch 0: testing the weights in memory (epoch 1's) would report them as epoch 0's. One error
    instead, naming the file and the way out."""
    out = tmp_path / "run"
    select_epoch(monkeypatch, 0)
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    truncate(out / "checkpoints" / "last.prev.pt")
    best = out / "checkpoints" / "best.pt"
    if damage == "missing":
        best.unlink()
    else:
        save_checkpoint({**load_checkpoint(best), "epoch": 1}, best)
    with pytest.raises(CheckpointError) as err:
        train_in_process(out, ["trainer.epochs=3"])
    message = str(err.value)
    assert "checkpoints/best.pt" in message and "selected epoch 0" in message and "resume=never" in message
    assert "the last checkpoint holds epoch 2" in message
    assert read_metrics(out)["status"] == "failed" and read_metrics(out)["metrics"] == {}


@pytest.mark.parametrize("damage", ["missing", "truncated", "another-epoch"])
def test_a_lost_best_pt_is_written_again_from_the_checkpoint_that_holds_the_selected_epoch(
        tmp_path, monkeypatch, caplog, damage):
    """Killed after the selected epoch 1, best.pt then lost: the re-run resumes from last.pt, which holds epoch 1,
    so best.pt is written again from it before epoch 2 replaces last.pt; the result equals the straight run's."""
    select_epoch(monkeypatch, 1)
    expected = train_in_process(tmp_path / "straight", ["trainer.epochs=3"])
    out = tmp_path / "run"
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    best = out / "checkpoints" / "best.pt"
    if damage == "missing":
        best.unlink()
    elif damage == "truncated":
        truncate(best)
    else:
        save_checkpoint({**load_checkpoint(best), "epoch": 0}, best)
    resumed = train_in_process(out, ["trainer.epochs=3"])
    assert resumed["metrics"]["best_epoch"] == 1 and load_checkpoint(best)["epoch"] == 1
    assert without_times(resumed["metrics"]) == without_times(expected["metrics"])
    assert "last.pt holds the selected epoch 1, so best.pt is written again from it" in caplog.text


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_reevaluation_without_best_pt_uses_last_pt_when_it_holds_the_selected_epoch(tmp_path, monkeypatch, caplog,
                                                                                      damage):
    out = tmp_path / "run"
    select_epoch(monkeypatch, None)  # the selected epoch is the last: last.pt holds its weights too
    done = train_in_process(out, ["trainer.epochs=2"])
    best = out / "checkpoints" / "best.pt"
    best.unlink() if damage == "missing" else truncate(best)
    redone = train_in_process(out, ["trainer.epochs=2", "resume=reevaluate"])
    assert redone["status"] == "completed" and without_times(redone["metrics"]) == without_times(done["metrics"])
    assert "best.pt" in caplog.text and "last.pt holds the selected epoch 1, so best.pt is written again" in caplog.text
    assert "no other file" not in caplog.text.lower()


def test_a_best_pt_behind_the_selected_last_epoch_is_not_tested_the_weights_in_memory_are(tmp_path, monkeypatch,
                                                                                         caplog):
    select_epoch(monkeypatch, None)
    expected = train_in_process(tmp_path / "straight", ["trainer.epochs=2"])
    import mmbalance.engine.trainer as trainer

    original = trainer.save_checkpoint

    def save_checkpoint(state, path, keep_previous=False):  # best.pt's write of epoch 1 is lost: it keeps epoch 0
        if path.name != "best.pt" or state["epoch"] == 0:
            original(state, path, keep_previous)

    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    done = train_in_process(tmp_path / "run", ["trainer.epochs=2"])
    assert without_times(done["metrics"]) == without_times(expected["metrics"])
    assert "holds epoch 0, not the selected epoch 1" in caplog.text and "last.pt holds its weights too" in caplog.text


def test_stale_temporaries_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".metrics.json.abc.tmp", tmp_path / "checkpoints" / ".last.pt.x1y2.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = tmp_path / "notes.tmp"  # not one of ours: a user's file stays
    keep.write_text("mine")
    train_in_process(tmp_path, ["trainer.epochs=1"])
    assert not any(p.exists() for p in stale) and keep.exists()


def test_divergence_is_an_expected_ending_that_names_the_remedy(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"training diverged(.|\n)*optimizer.lr"):
        train_in_process(tmp_path, ["optimizer.lr=1e12", "trainer.epochs=1"])
    assert read_metrics(tmp_path)["status"] == "failed"


def test_divergence_names_the_checkpoint_that_holds_the_epoch_before_or_says_there_is_none(tmp_path, monkeypatch):
    with pytest.raises(TrainingDiverged) as err:
        train_in_process(tmp_path / "first", ["optimizer.lr=1e12", "trainer.epochs=1"])
    assert "no checkpoint was written" in str(err.value) and "last.pt" not in str(err.value)
    assert not (tmp_path / "first" / "checkpoints").exists()
    from mmbalance.methods.base import Method

    original = Method.training_step

    def training_step(self, run, batch):  # the loss becomes NaN in epoch 1 only
        stats = original(self, run, batch)
        return {**stats, "loss": stats["loss"] * math.nan} if run.epoch == 1 else stats

    monkeypatch.setattr(Method, "training_step", training_step)
    with pytest.raises(TrainingDiverged, match=r"checkpoints/last.pt holds epoch 0"):
        train_in_process(tmp_path / "second", ["trainer.epochs=2"])


def test_flops_not_measured_are_recorded_as_none_never_as_zero(tmp_path):
    done = train_in_process(tmp_path, ["eval.flops=false"])
    assert {k: v for k, v in done["metrics"].items() if k.startswith("flops/")} == {"flops/train_total": None}
    assert read_metrics(tmp_path)["metrics"]["flops/train_total"] is None
    assert [row["flops/train_so_far"] for row in history(tmp_path)] == ["", ""]  # empty: not measured


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_full_disk_during_a_checkpoint_write_is_one_message_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, straight, failure):
    import shutil

    import torch

    import mmbalance.engine.checkpoint as checkpoint

    expected, _ = straight
    out = tmp_path / "run"
    original, writes = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second last.pt runs out of space part-way
        if "optimizer" in obj:
            writes.append(obj["epoch"])
            if len(writes) == 2:
                f.write(b"half a checkpoint")
                if failure == "torch":  # what torch raises on a full disk
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1988992 vs 1988880")
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        if failure == "torch":
            full = shutil.disk_usage(tmp_path)._replace(free=4096)
            patch.setattr(checkpoint.shutil, "disk_usage", lambda path: full)
        with pytest.raises(WriteError) as err:
            train_in_process(out, OGM)
    message = str(err.value)
    assert isinstance(err.value, UserError) and isinstance(err.value, OSError)  # one message; still a failed write
    assert f"could not write {out / 'checkpoints' / 'last.pt'}: the disk is full" in message
    assert "the previous last.pt is unchanged" in message and "free space" in message
    assert read_metrics(out)["status"] == "failed" and "the disk is full" in read_metrics(out)["error"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 0 and not list(out.rglob("*.tmp"))
    resumed = train_in_process(out, OGM)  # once there is space again
    assert without_times(resumed["metrics"]) == without_times(expected["metrics"])


def test_a_full_disk_while_writing_the_fvcore_table_is_the_disk_error_not_a_tracing_failure(tmp_path, monkeypatch,
                                                                                           caplog):
    import mmbalance.engine.checkpoint as checkpoint
    import mmbalance.train

    original = mmbalance.train.write_text

    def full(text, path):
        if path.name == "flops_fvcore.txt":
            def no_space(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            checkpoint._atomic(path, no_space)
        return original(text, path)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(mmbalance.train, "write_text", full)
        with pytest.raises(WriteError, match=r"flops_fvcore.txt: the disk is full"):
            train_in_process(out, ["eval.flops=true"])
    assert "could not trace" not in caplog.text
    assert not (out / "flops_fvcore.txt").exists() and not list(out.rglob("*.tmp"))
    assert read_metrics(out)["status"] == "failed"
    assert train_in_process(out, ["eval.flops=true"])["status"] == "completed"  # once there is space again
    assert "encoders." in (out / "flops_fvcore.txt").read_text()


# ---------------------------------------------------------------- the CLI: clean endings, kills, sweeps

def test_cli_an_expected_failure_prints_one_message_with_the_log_path(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    run_dir = tmp_path / "run"
    proc = run_cli(["dataset=features", f"dataset.path={empty}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count(str(empty)) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"(log: {run_dir / 'train.log'})" in proc.stderr
    assert "Traceback" in (run_dir / "train.log").read_text()
    assert read_metrics(run_dir)["status"] == "failed"


def test_cli_a_refused_start_leaves_the_runs_hydra_files_and_resume_never_moves_them_aside(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    assert run_cli(args, tmp_path).returncode == 0
    hydra = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    assert set(hydra) == {"config.yaml", "hydra.yaml", "overrides.yaml"} and b"trainer.epochs=1" in hydra["overrides.yaml"]
    refused = run_cli([*args, "method=ogm_ge"], tmp_path)
    assert refused.returncode == 1 and "belongs to another run" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra  # Hydra wrote it before
    log = (run_dir / "train.log").read_text()
    assert "a start was refused here: " in log and "Traceback" not in log
    assert run_cli([*args, "method=ogm_ge", "resume=never"], tmp_path).returncode == 0
    [old] = (run_dir / "superseded").iterdir()
    assert (old / ".hydra" / "overrides.yaml").read_bytes() == hydra["overrides.yaml"]
    assert b"method=ogm_ge" in (run_dir / ".hydra" / "overrides.yaml").read_bytes()


def run_driver(point: str, n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "tests" / "fault_driver.py"), point, str(n), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


KILL_POINTS = [
    pytest.param("after_checkpoint", 1, id="after-the-final-checkpoint"),
    pytest.param("checkpoint_write", 2, id="during-a-checkpoint-write"),
    pytest.param("train_step", 5, id="mid-epoch", marks=pytest.mark.slow),
    pytest.param("test_eval", 1, id="during-the-final-test", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def cli_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "straight"
    proc = run_cli([*FAST, *OGM, f"hydra.run.dir={out}"], out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("point,n", KILL_POINTS)
def test_kill_9_then_rerun_equals_the_uninterrupted_run(tmp_path, cli_straight, point, n):
    out = tmp_path / "run"
    args = [*FAST, *OGM, f"hydra.run.dir={out}"]
    killed = run_driver(point, n, args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_metrics(out)["status"] == "running"  # a killed process cannot say more; the re-run does
    rerun = run_cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert without_times(read_metrics(out)["metrics"]) == without_times(read_metrics(cli_straight)["metrics"])
    assert history(out) == history(cli_straight)
    assert not list(out.rglob("*.tmp"))


def sweep_folders(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def test_a_sweep_rerun_with_reordered_arguments_lands_each_job_in_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*FAST, "trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    first = run_cli(["-m", "method=baseline,ogm_ge", "seed=0,1", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sweep_folders(sweep)
    # the common overrides make the names long: shortened, they keep the swept keys first and gain a digest
    assert sorted(",".join(name.split(",")[:3]) for name in runs) == [
        "dataset=synthetic,method=baseline,seed=0", "dataset=synthetic,method=baseline,seed=1",
        "dataset=synthetic,method=ogm_ge,seed=0", "dataset=synthetic,method=ogm_ge,seed=1"]
    stamps = {name: (sweep / name / "metrics.json").stat().st_mtime_ns for name in runs}
    again = run_cli(["-m", "seed=0,1", "method=baseline,ogm_ge", *common], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sweep_folders(sweep) == runs  # every job found its own finished result and left it alone
    assert {name: (sweep / name / "metrics.json").stat().st_mtime_ns for name in runs} == stamps
    for name, record in runs.items():
        method, seed = name.split(",")[1:3]
        assert record["choices"]["method"] == method.split("=")[1] and record["seed"] == int(seed.split("=")[1])


@pytest.mark.slow
def test_ctrl_c_a_sweep_then_rerun_it_reordered_finishes_every_job_correctly(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*FAST, "trainer.epochs=8", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "mmbalance", "-m", "method=baseline,ogm_ge", "seed=0,1", *common],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # Ctrl-C once a job finished and another one is training (has a checkpoint)
        runs = sweep_folders(sweep) if sweep.exists() else {}
        if "completed" in [r["status"] for r in runs.values()] and any(
                r["status"] == "running" and (sweep / name / "checkpoints" / "last.pt").exists()
                for name, r in runs.items()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert "interrupted" in [r["status"] for r in sweep_folders(sweep).values()]
    again = run_cli(["-m", "seed=0,1", "method=baseline,ogm_ge", *common], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = sweep_folders(sweep)
    assert len(runs) == 4 and all(r["status"] == "completed" for r in runs.values())
    for i, record in enumerate(runs.values()):  # each folder holds the result of its own job, equal to a straight run
        single = tmp_path / "single" / str(i)
        assert run_cli([f"method={record['choices']['method']}", f"seed={record['seed']}", *FAST,
                        "trainer.epochs=8", f"hydra.run.dir={single}"], tmp_path).returncode == 0
        assert without_times(record["metrics"]) == without_times(read_metrics(single)["metrics"])


# ---------------------------------------------------------------- job folders name only the run identity


def test_job_folder_names_leave_out_every_override_outside_the_run_identity():
    from mmbalance.engine.identity import NON_IDENTITY_KEYS

    job = ["method=baseline", "seed=0", "trainer.epochs=2"]
    name = job_dir_name(job)
    assert name == "method=baseline,seed=0,trainer.epochs=2"
    outside = ["resume=reevaluate", "resume=never", "resume=force", "trainer.progress_bar=false",
               "hardware.num_workers=4", "+hardware.pin_memory=true", "hardware.threads=2", "hardware.wait_policy=active",
               "dataset.cache_dir=/tmp/c", "tags=[a,b]", "~tags",
               "optimized_metric=test/acc", "logger=csv", "logger.csv.flush=true", "hydra/launcher=basic"]
    for extra in outside:
        assert job_dir_name([extra, *job]) == name, extra
    assert job_dir_name([*outside, *job]) == name
    # the same list as the identity's, not a copy of it: every key it leaves out names no folder
    for key in NON_IDENTITY_KEYS:
        if key == "paths":  # a data location names the folder: a finished job is skipped without rebuilding its data
            continue
        assert job_dir_name([*job, f"{key}=x"]) == job_dir_name([*job, f"++{key}.sub=1"]) == name, key
    assert job_dir_name([*job, "paths.data_dir=/a"]) != job_dir_name([*job, "paths.data_dir=/b"])
    assert job_dir_name([*job, "paths=default"]) != name
    # what changes the identity still names the folder: a hardware choice sets the device and the precision
    assert job_dir_name([*job, "hardware=gpu"]) == "hardware=gpu,method=baseline,seed=0,trainer.epochs=2"
    for kept in ("hardware.precision=bf16", "trainer=long", "experiment=demo/baseline", "logger@trainer=csv"):
        assert job_dir_name([*job, kept]) != name, kept
    assert job_dir_name(["resume=never", "trainer.progress_bar=false"]) == "default"


def test_a_sweep_folder_named_with_overrides_outside_the_identity_is_found_again(tmp_path, monkeypatch):
    """Named when only `logger` overrides were left out: the same command finds the folder its run is in."""
    from hydra.core.hydra_config import HydraConfig

    class Sweep:
        sweep = type("S", (), {"dir": str(tmp_path)})

    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: Sweep))
    job = ["seed=0", "trainer.progress_bar=false", "logger=csv"]
    old = tmp_path / "seed=0,trainer.progress_bar=false"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"overrides": job}))
    assert job_dir_name(job) == old.name  # its own run: found again
    assert job_dir_name(["seed=0", "trainer.progress_bar=true"]) == "seed=0"  # another command: the new name
    assert job_dir_name(["seed=0", *job[1:], "resume=reevaluate"]) == "seed=0"
    (tmp_path / "seed=0").mkdir()  # once the new folder holds the run, it is the one
    (tmp_path / "seed=0" / "metrics.json").write_text(json.dumps({"overrides": ["seed=0"]}))
    assert job_dir_name(job) == "seed=0"


def test_a_sweep_rerun_with_resume_reevaluate_retests_its_jobs_in_their_folders(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*FAST, "method=baseline", "seed=0", "trainer.epochs=1", "eval.flops=false", f"hydra.sweep.dir={sweep}"]
    first = run_cli(["-m", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sweep_folders(sweep)
    (name, before), = runs.items()
    assert name.startswith("dataset=synthetic,method=baseline,seed=0,") and "progress_bar" not in name
    again = run_cli(["-m", *common, "resume=reevaluate", "hardware.num_workers=0"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    redone = sweep_folders(sweep)
    assert list(redone) == [name] and [p.name for p in sweep.iterdir() if p.is_dir()] == [name]
    assert redone[name]["processes"] == before["processes"] + 1  # re-tested there, not trained anew elsewhere
    assert without_times(redone[name]["metrics"]) == without_times(before["metrics"])


def test_a_reevaluation_without_best_pt_tests_the_other_checkpoint_that_holds_the_selected_epoch(
        tmp_path, monkeypatch, caplog):
    """4 epochs, the selected one 2: last.pt holds epoch 3 and last.prev.pt epoch 2, the same weights as best.pt."""
    from mmbalance.engine.trainer import Trainer

    out = tmp_path / "run"
    select_epoch(monkeypatch, 2)
    done = train_in_process(out, ["trainer.epochs=4"])
    best = out / "checkpoints" / "best.pt"
    assert done["metrics"]["best_epoch"] == 2 and load_checkpoint(out / "checkpoints" / "last.prev.pt")["epoch"] == 2
    best.write_bytes(b"junk")
    with monkeypatch.context() as patch:  # the final test alone (as a rank that does not write best.pt sees it)
        patch.setattr(Trainer, "_restore_best", lambda self, state, path: None)
        redone = train_in_process(out, ["trainer.epochs=4", "resume=reevaluate"])
    assert redone["status"] == "completed" and without_times(redone["metrics"]) == without_times(done["metrics"])
    assert "last.prev.pt holds the selected epoch 2: testing its weights" in caplog.text
    assert best.read_bytes() == b"junk"
    caplog.clear()
    redone = train_in_process(out, ["trainer.epochs=4", "resume=reevaluate"])  # and the resume writes best.pt again
    assert without_times(redone["metrics"]) == without_times(done["metrics"]) and load_checkpoint(best)["epoch"] == 2
    assert "last.prev.pt holds the selected epoch 2, so best.pt is written again from it" in caplog.text
    assert "no other file" not in caplog.text.lower()


def test_a_run_resumed_under_other_code_records_every_commit_that_trained_it(tmp_path, monkeypatch):
    import mmbalance.train

    out = tmp_path / "run"
    monkeypatch.setattr(mmbalance.train, "_git_sha", lambda: "aaa")
    interrupted_at_epoch_2_of_3(monkeypatch, out)
    monkeypatch.setattr(mmbalance.train, "_git_sha", lambda: "bbb-dirty")
    resumed = train_in_process(out, ["trainer.epochs=3"])
    assert resumed["git_sha"] == "bbb-dirty" and resumed["code_versions"] == ["aaa", "bbb-dirty"]
    assert "code_versions" not in train_in_process(tmp_path / "straight", ["trainer.epochs=1"])  # one commit


def test_cli_a_sweep_names_the_jobs_refused_before_they_recorded_a_run(tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, tmp_path).returncode == 0
    folders = {read_metrics(p)["seed"]: p for p in sweep.iterdir() if (p / "metrics.json").exists()}
    other = folders[1].name
    shutil.rmtree(folders[1])
    shutil.copytree(folders[0], folders[1])  # seed=1's folder holds seed 0's run
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1 and "belongs to another run" in proc.stderr
    assert (f"error: in the sweep in {sweep}, 1 job(s) were refused before they recorded a run: {other} (each one's "
            "message is above); the other runs' results are intact") in proc.stderr


def test_an_extension_of_a_run_without_checkpoints_is_named_an_extension_and_keeps_the_record(tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    train_in_process(out, ["trainer.epochs=1"])
    before = (out / "metrics.json").read_bytes()
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint to re-evaluate or to train further"):
        train_in_process(out, ["trainer.epochs=2", "resume=force"])
    assert "extension to 2 epochs failed" in caplog.text and "re-evaluation failed" not in caplog.text
    assert json.loads((out / "metrics.json").read_bytes())["metrics"] == json.loads(before)["metrics"]
