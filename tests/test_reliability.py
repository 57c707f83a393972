"""Runs that never lie: run identity, results that survive re-runs, corrupt checkpoints, kills and Ctrl-C.

In-process cases inject faults by wrapping functions; the subprocess cases kill a real CLI run with SIGKILL
(tests/fault_driver.py) or SIGINT, then re-run the same command and compare with an uninterrupted run.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, REPO, read_metrics, run_cli, train_in_process, without_times
from mmbalance.engine.identity import job_dir_name, run_identity
from mmbalance.engine.run_folder import RunFolder
from mmbalance.errors import CheckpointError, RunFolderError, TrainingDiverged, UserError

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


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


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
    train_in_process(out, ["trainer.epochs=1"])
    before = (out / "metrics.json").read_bytes()
    import mmbalance.engine.trainer as trainer

    def interrupted_test(run, loader, split, shapley=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", interrupted_test)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, ["trainer.epochs=1", "resume=reevaluate"])
    monkeypatch.undo()
    assert (out / "metrics.json").read_bytes() == before
    truncate(out / "checkpoints" / "best.pt")
    with pytest.raises(CheckpointError, match=r"best.pt(.|\n)*selected epoch 0(.|\n)*resume=never"):
        train_in_process(out, ["trainer.epochs=1", "resume=reevaluate"])
    assert (out / "metrics.json").read_bytes() == before


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
