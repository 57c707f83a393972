"""Sweeps at scale: hardware=ddp (torchrun, 2 CPU processes with gloo), hardware=slurm and the Optuna sweep."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, REPO, read_metrics, run_cli
from mmbalance.cli import CONF_DIR
from mmbalance.config import validate
from mmbalance.engine.distributed import average_gradients
from mmbalance.engine.run import EpochShuffleSampler
from mmbalance.methods import METHODS

DDP_CPU = ["hardware=ddp", "hardware.device=cpu", "hardware.backend=gloo", "hardware.precision=fp32",
           "hardware.num_workers=0", "hardware.pin_memory=false"]


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# ---- the sharded sampler ----

@pytest.mark.parametrize("n", [10, 11, 1])
def test_rank_shards_are_disjoint_equal_length_and_cover_the_epoch(n):
    shards = [list(EpochShuffleSampler(n, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(EpochShuffleSampler(n, 3, 0, 2)) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])
    else:  # one index is repeated to pad the shards to equal length
        assert len(shards[0]) + len(shards[1]) == n + 1
    # the shards are a split of the single-process order of the same epoch
    whole = list(EpochShuffleSampler(n, seed=3))
    assert sorted(shards[0][: n // 2] + shards[1][: n // 2]) == sorted(whole[: 2 * (n // 2)])


def test_gradient_averaging_is_a_no_op_in_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    average_gradients([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))


# ---- replicas never drift, for every method ----

def _specs() -> list[str]:
    specs = []
    for name, cls in sorted(METHODS.items()):
        specs.append(name)
        if cls.max_modalities is None or cls.max_modalities >= 3:
            specs.append(f"{name}:3")
    return specs


def test_two_gloo_processes_keep_parameters_and_method_state_identical_for_every_method(tmp_path):
    out = tmp_path / "ddp.json"
    proc = torchrun([str(REPO / "tests" / "ddp_check.py"), str(out), *_specs()], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {s if ":" in s else f"{s}:2" for s in _specs()}
    bad = {k: v for k, v in results.items() if not v.get("ok")}
    assert not bad, bad
    assert all(v["steps"] == 2 and v["disjoint_shards"] for v in results.values())


def test_the_replica_check_fails_without_gradient_averaging(tmp_path):
    """The negative control: each rank on its own shard drifts apart when gradients are not averaged."""
    out = tmp_path / "ddp.json"
    proc = torchrun([str(REPO / "tests" / "ddp_check.py"), str(out), "--no-sync", "baseline"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["baseline:2"]
    assert not result["ok"] and result["max_param_diff"] > 0


# ---- every rank evaluates the same model: validation and test metrics agree ----

@pytest.fixture(scope="module")
def fit_check(tmp_path_factory):
    """PMR trained for two epochs by the real Trainer on 2 gloo ranks, with and without the buffer sync (one
    launch). PMR: its epoch-end prototypes come from an eval-mode pass, so they need the sync too."""
    folder = tmp_path_factory.mktemp("ddp_fit")
    proc = torchrun([str(REPO / "tests" / "ddp_check.py"), str(folder / "fit.json"), "--fit", "pmr"], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "fit.json").read_text())["pmr:2"]


def test_ranks_agree_on_every_validation_and_test_metric(fit_check):
    r = fit_check["synced"]
    assert r["epochs"] == 2
    assert r["val_diffs"] == {} and r["test_diffs"] == {}
    assert r["max_param_diff"] == r["max_buffer_diff"] == r["max_state_diff"] == 0.0


def test_the_metric_check_fails_without_the_buffer_sync(fit_check):
    """The negative control and the cause: with identical parameters, the ranks' own BatchNorm statistics make
    their validation metrics (and PMR's eval-mode prototypes) differ."""
    r = fit_check["unsynced"]
    assert r["max_param_diff"] == 0.0 and r["max_buffer_diff"] > 0
    assert r["val_diffs"] and r["max_state_diff"] > 0


def test_torchrun_cli_run_writes_once_from_rank_0_and_sums_flops_over_ranks(tmp_path):
    common = [*FAST, "trainer.epochs=1", "trainer.batch_size=8", "method=ogm_ge"]
    run_dir = tmp_path / "ddp_run"
    proc = torchrun(["-m", "mmbalance", *common, *DDP_CPU, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_metrics(run_dir)
    assert results["status"] == "completed" and results["world_size"] == 2
    # only rank 0 logs progress, to the console and to train.log
    assert "epoch 0  loss" in (run_dir / "train.log").read_text() and not list(run_dir.glob("train_rank*"))
    assert (run_dir / "train.log").read_text().count("epoch 0  loss") == 1
    assert (proc.stdout + proc.stderr).count("epoch 0  loss") == 1
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "history.csv").exists()
    # the FLOPs of the two shards add up to the single-process run's (up to the one padded sample)
    single = run_cli([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    one = read_metrics(tmp_path / "single")["metrics"]["flops/train_total"]
    both = results["metrics"]["flops/train_total"]
    n = read_metrics(tmp_path / "single")["split_sizes"]["train"]
    assert both == pytest.approx(one * (2 * -(-n // 2)) / n, rel=1e-6)
    # history.csv's running total is the ranks' sum too, not rank 0's share
    with open(run_dir / "history.csv") as f:
        [row] = list(csv.DictReader(f))
    assert float(row["flops/train_so_far"]) == pytest.approx(both, rel=1e-6)


def test_other_ranks_log_only_warnings_marked_with_their_rank(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from mmbalance.cli import quiet_other_ranks

    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    handler = logging.FileHandler(tmp_path / "train.log")
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    try:
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        for rank, distributed in (("0", True), ("1", False), ("1", True)):
            monkeypatch.setenv("RANK", rank)
            quiet_other_ranks(OmegaConf.create({"hardware": {"distributed": distributed}}))
            logging.getLogger("mmbalance").info("progress %s %s", rank, distributed)
            logging.getLogger("mmbalance").warning("odd %s %s", rank, distributed)
        warnings.warn("a library's warning")  # Python warnings of another rank are marked too
    finally:
        logging.captureWarnings(False)
        handler.close()
        root.handlers = saved[1]
        root.setLevel(saved[0])  # setLevel, not .level: it also clears the loggers' cached levels
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[:5] == [
        "[INFO] progress 0 True", "[WARNING] odd 0 True", "[INFO] progress 1 False", "[WARNING] odd 1 False",
        "[rank 1] [WARNING] odd 1 True"]
    assert lines[5].startswith("[rank 1] [WARNING] ") and "UserWarning: a library's warning" in lines[5]


def test_ddp_outside_torchrun_says_how_to_launch(tmp_path):
    proc = run_cli([*FAST, *DDP_CPU, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "torchrun" in proc.stderr and "hardware=ddp" in proc.stderr


# ---- launcher and sweeper configs compose ----

def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_hardware_composes_a_submitit_job_array_launcher():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(["hardware=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                               "hydra.launcher.timeout_min=60"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 2, 60)
    assert launcher.max_num_timeout > 0  # preempted jobs are requeued and resume from last.pt
    assert cfg.hardware.device == "cuda"
    cfg_no_hydra = {k: v for k, v in cfg.items() if k != "hydra"}
    from omegaconf import OmegaConf
    validate(OmegaConf.create(cfg_no_hydra))


def test_ddp_and_optuna_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose_with_hydra(["sweep=optuna_ogm_ge"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc"
    assert "method.alpha" in cfg.hydra.sweeper.params and cfg.method._target_.endswith("OGMGE")
    ddp = _compose_with_hydra(DDP_CPU)
    assert ddp.hardware.distributed is True and ddp.hardware.backend == "gloo"


def test_every_ddp_rank_agrees_on_the_run_and_the_sweep_folder(monkeypatch):
    """Each rank composes its own config: a folder named by the time would differ between ranks (a sweep's rank 1
    then found no best.pt of its own and failed); torchrun's rendezvous id is the same on every rank."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv42")
    ddp = _compose_with_hydra(DDP_CPU)
    assert ddp.hydra.run.dir == "outputs/ddp/rdzv42"
    assert ddp.hydra.sweep.dir == "multirun/ddp/rdzv42"


def test_optuna_sweep_tunes_on_the_validation_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    proc = run_cli(["sweep=optuna_ogm_ge", "hydra.sweeper.n_trials=2", *FAST, "trainer.epochs=1",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = [read_metrics(d) for d in sorted(sweep_dir.iterdir()) if (d / "metrics.json").exists()]
    assert len(trials) == 2
    assert best["best_value"] == pytest.approx(max(t["metrics"]["val/acc"] for t in trials))
    assert 0.05 <= best["best_params"]["method.alpha"] <= 2.0


def test_a_multirun_runs_as_submitit_jobs(tmp_path):
    """hardware=slurm's launcher family, run with submitit's local executor (no SLURM here): each job of the
    sweep is pickled, run in its own process and writes its run folder like a local multirun."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                    "hydra.launcher.gpus_per_node=0", *FAST, "trainer.epochs=1", "seed=0,1",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((read_metrics(p.parent) for p in sweep_dir.glob("*/metrics.json")), key=lambda r: r["seed"])
    assert [r["status"] for r in runs] == ["completed", "completed"] and [r["seed"] for r in runs] == [0, 1]
    assert [Path(r["run_dir"]).name.split(",")[:2] for r in runs] == [["dataset=synthetic", "seed=0"],
                                                                     ["dataset=synthetic", "seed=1"]]
    assert (sweep_dir / ".submitit").is_dir()


# ---- a failure on one rank is recorded as that rank's, and SIGTERM ends a run as interrupted ----

FAIL_AT_EPOCH_1 = """
import os, signal, sys
import mmbalance.engine.trainer as T
from mmbalance.engine import distributed
from mmbalance.errors import DataError
plain_epoch = T.Trainer.train_epoch
def train_epoch(self, epoch):
    if epoch == 1 and os.environ["FAIL_RANK"] in ("all", str(distributed.rank())):
        if os.environ["FAIL_HOW"] == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if os.environ["FAIL_HOW"] == "interrupt":  # a Ctrl-C reaches every rank
            raise KeyboardInterrupt
        raise DataError("a shard file is unreadable")
    return plain_epoch(self, epoch)
T.Trainer.train_epoch = train_epoch
sys.argv = ["mmbalance", *sys.argv[1:]]
from mmbalance.cli import console_main
console_main()
"""


def test_a_failure_on_another_rank_is_recorded_as_that_ranks_error(tmp_path):
    """Rank 0 only sees the symptom (its peer gone, or torchrun's SIGTERM): metrics.json must carry rank 1's error."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_AT_EPOCH_1)
    run_dir = tmp_path / "ddp_run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "FAIL_RANK": "1", "FAIL_HOW": "raise"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *FAST, "trainer.epochs=3", *DDP_CPU, f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    record = read_metrics(run_dir)
    assert record["status"] == "failed", record
    assert record["error"].startswith("rank 1: DataError: a shard file is unreadable (rank 0 then stopped: "), record
    assert "[rank 1] error: a shard file is unreadable" in proc.stderr
    assert "rank 1 failed" in (run_dir / "train.log").read_text()  # with its traceback


def test_a_ctrl_c_under_ddp_leaves_one_traceback_in_train_log(tmp_path):
    """Every rank gets the Ctrl-C: train.log keeps rank 0's ending, not one traceback per rank."""
    script = tmp_path / "interrupt.py"
    script.write_text(FAIL_AT_EPOCH_1)
    run_dir = tmp_path / "ddp_run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "FAIL_RANK": "all",
           "FAIL_HOW": "interrupt"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *FAST, "trainer.epochs=3", *DDP_CPU, f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert read_metrics(run_dir)["status"] == "interrupted"
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("Traceback") == 1 and "interrupted: the run stops here" in log_text, log_text[-3000:]


def test_sigterm_ends_a_run_as_interrupted_and_it_resumes(tmp_path):
    script = tmp_path / "term.py"
    script.write_text(FAIL_AT_EPOCH_1)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FAIL_RANK": "0", "FAIL_HOW": "sigterm"}
    args = [*FAST, "trainer.epochs=3", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 130, proc.stderr[-2000:]
    record = read_metrics(run_dir)
    assert (record["status"], record["error"]) == ("interrupted", "Terminated: terminated by SIGTERM")
    assert "re-run the same command to resume it from its last checkpoint" in proc.stderr
    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0 and read_metrics(run_dir)["resumed_from"]["epoch"] == 0
