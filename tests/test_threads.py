"""The thread policy (engine/threads.py): CPU counts from affinity, cgroups and SLURM, the config keys, and the
record a run writes to metrics.json."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST, compose_cfg, read_metrics, run_cli, train_in_process

from mmbalance.config import validate
from mmbalance.engine import threads
from mmbalance.errors import ConfigError


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def policy(threads_value="auto", wait="auto", device="cpu", env=None, affinity=8, cgroup=None, launcher_n=None):
    return threads.resolve(threads_value, wait, device, env=env or {}, affinity=affinity, cgroup=cgroup,
                           launcher_n=launcher_n)


# ---- cgroup files ----

def test_cpu_max_lines():
    assert threads.parse_cpu_max("max 100000\n") is None
    assert threads.parse_cpu_max("150000 100000\n") == 1.5
    assert threads.parse_cpu_max("200000") == 2.0
    assert threads.parse_cpu_max("") is None


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "step").mkdir(parents=True)
    (tmp_path / "job" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "job" / "step" / "cpu.max").write_text("250000 100000\n")
    assert threads.cgroup_cpus(tmp_path, "0::/job/step\n") == 2.5
    assert threads.cgroup_cpus(tmp_path, "0::/job\n") == 3.0
    assert threads.cgroup_cpus(tmp_path, "0::/\n") is None  # unlimited


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    folder = tmp_path / "cpu,cpuacct" / "slurm" / "job"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("400000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    text = "5:memory:/slurm/job\n3:cpu,cpuacct:/slurm/job\n"
    assert threads.cgroup_cpus(tmp_path, text) == 4.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpus(tmp_path, text) is None
    assert threads.cgroup_cpus(tmp_path / "absent", "") is None


def test_slurm_cpus_per_task():
    assert threads.slurm_cpus({"SLURM_CPUS_PER_TASK": "6"}) == 6
    assert threads.slurm_cpus({"SLURM_CPUS_PER_TASK": "x"}) is None
    assert threads.slurm_cpus({}) is None


# ---- the count ----

def test_the_smallest_limit_sets_the_count_and_is_named():
    p = policy(affinity=8)
    assert (p.intra_op, p.source, p.inter_op) == (8, "affinity", 1)
    p = policy(affinity=8, cgroup=2.5)
    assert (p.intra_op, p.source) == (2, "cgroup")
    p = policy(affinity=16, env={"SLURM_CPUS_PER_TASK": "4"})
    assert (p.intra_op, p.source) == (4, "slurm")
    p = policy(affinity=4, env={"SLURM_CPUS_PER_TASK": "4"})  # a tie names the more specific limit
    assert (p.intra_op, p.source) == (4, "slurm")
    assert policy(affinity=8, cgroup=0.5).intra_op == 1  # a fraction of a CPU still runs one thread
    assert p.limits == {"affinity": 4, "cgroup": None, "slurm": 4}


def test_parallel_jobs_divide_the_cpus():
    p = policy(affinity=8, env={"MMBALANCE_PARALLEL_JOBS": "4"})
    assert (p.intra_op, p.parallel_jobs, p.parallel_jobs_source) == (2, 4, "MMBALANCE_PARALLEL_JOBS")
    assert policy(affinity=8, env={"LOCAL_WORLD_SIZE": "2"}).intra_op == 4  # torchrun ranks on this node
    assert policy(affinity=8, launcher_n=3).intra_op == 2
    assert policy(affinity=2, env={"MMBALANCE_PARALLEL_JOBS": "8"}).intra_op == 1  # never below one


def test_joblib_launcher_jobs():
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}
    assert threads.launcher_jobs(joblib, 8) == 8
    assert threads.launcher_jobs({**joblib, "n_jobs": -2}, 8) == 7
    assert threads.launcher_jobs({**joblib, "n_jobs": 3}, 8) == 3
    assert threads.launcher_jobs({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8) is None
    assert threads.launcher_jobs(None, 8) is None


def test_config_and_environment_take_precedence_and_gpus_get_a_few_host_threads():
    assert (policy(3, affinity=8).intra_op, policy(3).source) == (3, "config")
    p = policy(affinity=8, env={"OMP_NUM_THREADS": "1"})
    assert (p.intra_op, p.source) == (1, "env")
    assert policy(device="cuda", affinity=32).intra_op == threads.HOST_THREADS_ON_GPU
    assert policy(device="cuda:1", affinity=2).intra_op == 2
    with pytest.raises(ValueError):
        policy(0)
    with pytest.raises(ValueError):
        policy("many")


def test_wait_policy():
    assert policy().wait_policy == "passive"
    assert policy(wait="active").wait_policy == "active"
    assert policy(env={"OMP_WAIT_POLICY": "ACTIVE"}).wait_policy == "active"  # auto keeps the environment's
    assert policy(wait="passive", env={"OMP_WAIT_POLICY": "ACTIVE"}).wait_policy == "passive"
    with pytest.raises(ValueError):
        policy(wait="spin")


def test_the_wait_policy_is_set_before_torch_loads_and_left_alone_after():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys{torch}; from mmbalance.engine import threads; "
            "threads.prepare_process({{'wait_policy': 'auto'}}); print(os.environ.get('OMP_WAIT_POLICY'))")
    fresh = subprocess.run([sys.executable, "-c", code.format(torch="")], env=env, capture_output=True, text=True)
    late = subprocess.run([sys.executable, "-c", code.format(torch=", torch")], env=env, capture_output=True, text=True)
    assert fresh.stdout.strip() == "PASSIVE", fresh.stderr
    assert late.stdout.strip() == "None", late.stderr


# ---- config keys and the run's record ----

@pytest.mark.parametrize("override", ["hardware.threads=auto", "hardware.threads=3", "hardware.wait_policy=passive",
                                      "hardware.wait_policy=active", "hardware=gpu", "hardware=ddp"])
def test_thread_keys_validate(override):
    validate(compose_cfg([override]))


@pytest.mark.parametrize("override", ["hardware.threads=0", "hardware.threads=many", "hardware.wait_policy=spin"])
def test_bad_thread_keys_are_reported(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(compose_cfg([override]))


def test_a_run_records_its_thread_policy(tmp_path):
    train_in_process(tmp_path, ["trainer.epochs=1", "eval.flops=false", "hardware.threads=1"])
    record = read_metrics(tmp_path)["threads"]
    assert (record["intra_op"], record["source"], record["wait_policy"]) == (1, "config", "passive")
    assert torch.get_num_threads() == 1
    # torch was imported before the run started (by pytest): the record says the wait policy is not in effect,
    # unless the environment already asked for it
    assert record["wait_policy_in_effect"] == (os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive")


def test_the_cli_sets_the_wait_policy_before_torch(tmp_path):
    out = run_cli([*FAST, "trainer.epochs=1", "eval.flops=false", "hardware.wait_policy=passive",
                   f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = read_metrics(tmp_path)["threads"]
    assert record["wait_policy"] == "passive" and record["wait_policy_in_effect"] is True
    assert record["intra_op"] >= 1 and record["source"] in ("affinity", "cgroup", "slurm", "env")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5"])
def test_a_parallel_jobs_value_that_is_no_positive_integer_is_refused_naming_it(value):
    from mmbalance.errors import UserError

    with pytest.raises(UserError, match=f"MMBALANCE_PARALLEL_JOBS='{value}': expected a positive integer"):
        policy(env={"MMBALANCE_PARALLEL_JOBS": value})


def test_a_continued_run_keeps_the_thread_count_it_was_trained_with():
    # the count orders float reductions: a sweep job trained with 1 thread (joblib, 2 jobs) and resumed alone
    # would otherwise take every CPU and its remaining epochs would compute differently
    auto = policy(affinity=8)
    kept = threads.keep_trained_count(auto, "auto", {"intra_op": 1})
    assert (kept.intra_op, kept.source) == (1, "trained_with")
    assert threads.keep_trained_count(policy(affinity=2), "auto", {"intra_op": 6}).intra_op == 2  # at most the CPUs
    assert threads.keep_trained_count(policy(3), 3, {"intra_op": 1}).intra_op == 3  # an explicit count is kept
    assert threads.keep_trained_count(policy(affinity=8), "auto", None).intra_op == 8  # nothing recorded


def test_a_reevaluated_run_uses_its_recorded_thread_count(tmp_path):
    train_in_process(tmp_path, ["trainer.epochs=1", "eval.flops=false", "hardware.threads=1"])
    train_in_process(tmp_path, ["trainer.epochs=1", "eval.flops=false", "resume=reevaluate"])
    record = read_metrics(tmp_path)["threads"]
    assert record["intra_op"] == 1 and torch.get_num_threads() == 1
    if (threads.affinity_cpus() or 1) > 1:
        assert record["source"] == "trained_with"


def test_more_threads_than_cpus_are_warned_about(monkeypatch, caplog):
    """An explicit count above the CPUs the process may use is kept (asked for) but named: its threads contend."""
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="mmbalance"):
            record = threads.apply({"device": "cpu", "threads": 64, "wait_policy": "auto"})
        assert record["intra_op"] == 64
        assert "hardware.threads=64 is more than the 2 CPUs this process may use" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmbalance"):
            threads.apply({"device": "cpu", "threads": 2, "wait_policy": "auto"})
        assert not caplog.records
    finally:
        torch.set_num_threads(before)
