"""Thread discipline: how many CPU threads a run uses, and how idle OpenMP threads wait.

torch sizes its intra-op pool to every core of the machine and its OpenMP threads spin while they wait. When
anything else runs beside a run (a second sweep job, a data-prep process, a shared node) the spinning threads
fight it for the cores and a `digits_av` epoch takes 5-20x longer. The policy here:

* **intra-op threads** (`hardware.threads`): an int is used as it is. `auto` honours `OMP_NUM_THREADS` when the
  environment sets it (torchrun sets 1, joblib's workers set cores // n_jobs); otherwise it takes the CPUs this
  process may use - the smallest of its CPU affinity (`os.sched_getaffinity`), the cgroup CPU quota (v2
  `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, rounded down) and `SLURM_CPUS_PER_TASK` - divided
  among the runs that share them: `MMBALANCE_PARALLEL_JOBS` when set, else the ranks of this node
  (`LOCAL_WORLD_SIZE`, torchrun), else the `n_jobs` of a joblib launcher. On a GPU the host side needs few
  threads: at most `HOST_THREADS_ON_GPU`.
* **inter-op threads**: 1 (eager training does not use that pool; autograd has its own threads).
* **wait policy** (`hardware.wait_policy`): `passive` makes idle OpenMP threads sleep instead of spinning,
  `active` lets them spin, `auto` keeps an `OMP_WAIT_POLICY` the environment sets and is `passive` otherwise.
  The OpenMP runtime reads `OMP_WAIT_POLICY` once, when torch loads it, so `prepare_process` sets it before
  the first `import torch` (the CLI calls it in `train_main`). When torch is already imported (a run started
  from Python, the tests) the variable is left alone and metrics.json says the policy is not in effect.

`apply` sets the thread counts once at the start of a run and returns what metrics.json records under
`threads`. The counting functions are pure (files and environment are arguments) so tests can fake them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.errors import UserError

ENV_PARALLEL_JOBS = "MMBALANCE_PARALLEL_JOBS"  # runs sharing this machine's CPUs (set it for hand-made parallelism)
HOST_THREADS_ON_GPU = 4
WAIT_POLICIES = ("passive", "active", "auto")

# what prepare_process did in this process, for apply to record
_prepared: dict[str, Any] = {"launcher_jobs": None, "wait_policy": None, "before_torch": False}


# ---- how many CPUs this process may use (pure functions) ----

def affinity_cpus() -> int | None:
    """CPUs in this process's affinity mask (None where the platform cannot say)."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


def parse_cpu_max(text: str) -> float | None:
    """CPUs granted by a cgroup v2 `cpu.max` line ("max 100000" or "<quota> <period>"); None if unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str | None) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 `cpu` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (proc_cgroup or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, cgroup_path: str | None) -> list[Path]:
    """The cgroup folder of the path and each of its parents up to root (the path may not exist in a namespace)."""
    parts = [p for p in (cgroup_path or "/").split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpus(root: Path | str = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup and its parents (the smallest), in CPUs; None when unlimited.

    Reads cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (under `cpu/` or `cpu,cpuacct/`).
    `proc_cgroup` is the text of /proc/self/cgroup (read when None).
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    v2_path, v1_path = _cgroup_paths(proc_cgroup)
    quotas: list[float] = []
    if (root / "cgroup.controllers").exists():  # the unified (v2) hierarchy is mounted at root
        for folder in _ancestors(root, v2_path):
            text = _read(folder / "cpu.max")
            if text is not None and (cpus := parse_cpu_max(text)) is not None:
                quotas.append(cpus)
    else:
        for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for folder in _ancestors(root / controller, v1_path):
                quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                try:
                    q, p = int(quota or "-1"), int(period or "0")
                except ValueError:
                    continue
                if q > 0 and p > 0:
                    quotas.append(q / p)
    return min(quotas) if quotas else None


def slurm_cpus(env: Mapping[str, str]) -> int | None:
    """SLURM_CPUS_PER_TASK, when SLURM set it."""
    try:
        value = int(env.get("SLURM_CPUS_PER_TASK", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def launcher_jobs(launcher: Mapping | None, cpus: int) -> int | None:
    """How many jobs a Hydra launcher runs at once on this machine: joblib's `n_jobs` (-1: one per CPU)."""
    if not launcher or "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    n = launcher.get("n_jobs")
    if not isinstance(n, int) or isinstance(n, bool) or n == 0:
        return None
    return n if n > 0 else max(1, cpus + 1 + n)  # joblib: -1 = all CPUs, -2 = all but one, ...


def parallel_jobs(env: Mapping[str, str], launcher_n: int | None = None) -> tuple[int, str]:
    """(runs sharing this machine's CPUs, where that number comes from). A value of MMBALANCE_PARALLEL_JOBS that is
    not a positive integer is refused (UserError naming it): ignored, the run would take every CPU beside the
    others it was set for."""
    text = str(env.get(ENV_PARALLEL_JOBS, "")).strip()
    if text:
        if not _positive_int(text):
            raise UserError(f"{ENV_PARALLEL_JOBS}={text!r}: expected a positive integer (the number of runs sharing "
                             "this machine's CPUs), or unset it")
        return int(text), ENV_PARALLEL_JOBS
    if _positive_int(env.get("LOCAL_WORLD_SIZE", "")):  # torchrun's ranks on this node
        return int(env["LOCAL_WORLD_SIZE"]), "LOCAL_WORLD_SIZE"
    if launcher_n:
        return launcher_n, "launcher"
    return 1, "single"


# ---- the policy ----

@dataclass
class ThreadPolicy:
    intra_op: int
    inter_op: int
    wait_policy: str            # passive | active (what the OpenMP runtime is asked for)
    source: str                 # config | env | affinity | cgroup | slurm | trained_with: what set intra_op
    cpus_available: int | None  # the smallest CPU limit found
    parallel_jobs: int
    parallel_jobs_source: str
    limits: dict[str, float | None] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def resolve_wait_policy(wait_policy: str, env: Mapping[str, str]) -> str:
    """passive | active: the configured one; for auto, OMP_WAIT_POLICY from the environment or passive."""
    if wait_policy not in WAIT_POLICIES:
        raise ValueError(f"hardware.wait_policy={wait_policy!r}: expected one of {list(WAIT_POLICIES)}")
    if wait_policy != "auto":
        return wait_policy
    in_env = str(env.get("OMP_WAIT_POLICY", "")).strip().lower()
    return in_env if in_env in ("passive", "active") else "passive"


def resolve(threads: int | str = "auto", wait_policy: str = "auto", device: str = "cpu", *,
            env: Mapping[str, str], affinity: int | None, cgroup: float | None,
            launcher_n: int | None = None) -> ThreadPolicy:
    """The thread policy from the config values and what the machine says (all passed in: pure)."""
    wait = resolve_wait_policy(wait_policy, env)
    limits: dict[str, float | None] = {"affinity": affinity, "cgroup": cgroup, "slurm": slurm_cpus(env)}
    known = {k: max(1, math.floor(v)) for k, v in limits.items() if v is not None}
    cpus = min(known.values()) if known else (os.cpu_count() or 1)
    # on a tie the more specific limit is named: slurm, then cgroup, then affinity
    source = next((k for k in ("slurm", "cgroup", "affinity") if known.get(k) == cpus), "affinity")
    jobs, jobs_source = parallel_jobs(env, launcher_n)
    if isinstance(threads, int) and not isinstance(threads, bool):
        if threads < 1:
            raise ValueError(f"hardware.threads={threads}: expected a positive integer or 'auto'")
        intra, source = threads, "config"
    elif threads != "auto":
        raise ValueError(f"hardware.threads={threads!r}: expected a positive integer or 'auto'")
    elif _positive_int(env.get("OMP_NUM_THREADS")):
        intra, source = int(env["OMP_NUM_THREADS"]), "env"
    else:
        intra = max(1, cpus // jobs)
        if str(device).startswith("cuda"):
            intra = min(intra, HOST_THREADS_ON_GPU)
    return ThreadPolicy(intra_op=intra, inter_op=1, wait_policy=wait, source=source, cpus_available=cpus,
                        parallel_jobs=jobs, parallel_jobs_source=jobs_source, limits=limits)


def _positive_int(value: Any) -> bool:
    try:
        return int(str(value)) > 0
    except ValueError:
        return False


def _settings(hardware: Mapping | None) -> tuple[Any, str, str]:
    hardware = hardware or {}
    return hardware.get("threads", "auto"), hardware.get("wait_policy", "auto"), str(hardware.get("device", "cpu"))


# ---- applying it ----

def prepare_process(hardware: Mapping | None, launcher: Mapping | None = None) -> None:
    """Before torch is imported: set OMP_WAIT_POLICY for the OpenMP runtime, remember the launcher's jobs.

    When torch is already imported the runtime has read its settings; nothing is changed then (apply records
    that the wait policy is not in effect).
    """
    _, wait_policy, _ = _settings(hardware)
    cpus = min((c for c in (affinity_cpus(), os.cpu_count()) if c), default=1)
    _prepared["launcher_jobs"] = launcher_jobs(launcher, cpus)
    if "torch" in sys.modules or wait_policy not in WAIT_POLICIES:  # a bad value: config validation reports it
        return
    wait = resolve_wait_policy(wait_policy, os.environ)
    os.environ["OMP_WAIT_POLICY"] = wait.upper()
    _prepared.update(wait_policy=wait, before_torch=True)


def keep_trained_count(policy: ThreadPolicy, threads: Any, trained_with: Any) -> ThreadPolicy:
    """With `threads=auto`, a run that continues (resume, re-evaluation) uses the intra-op count it was trained with
    (`trained_with`: the `threads` record of its metrics.json), at most the CPUs available here: the count orders
    float reductions, so the same count makes a resumed run equal the uninterrupted one bit for bit (a sweep job
    trained with 1 thread under joblib and resumed alone would otherwise take 2). An explicit count is kept."""
    previous = trained_with.get("intra_op") if isinstance(trained_with, Mapping) else None
    if threads != "auto" or not isinstance(previous, int) or isinstance(previous, bool) or previous < 1:
        return policy
    count = min(previous, policy.cpus_available or previous)
    if count != policy.intra_op:
        policy.intra_op, policy.source = count, "trained_with"
    return policy


def apply(hardware: Mapping | None, trained_with: Mapping | None = None) -> dict[str, Any]:
    """Resolve the policy for this run (`keep_trained_count` for a run that continues), set torch's thread counts,
    and return what metrics.json records."""
    import torch

    threads, wait_policy, device = _settings(hardware)
    policy = resolve(threads, wait_policy, device, env=os.environ, affinity=affinity_cpus(), cgroup=cgroup_cpus(),
                     launcher_n=_prepared["launcher_jobs"])
    policy = keep_trained_count(policy, threads, trained_with)
    if policy.source == "config" and policy.cpus_available and policy.intra_op > policy.cpus_available:
        # oversubscribed threads wait on each other: slower, never faster (the count is still the one asked for)
        logging.getLogger("mmbalance").warning(
            "hardware.threads=%d is more than the %d CPUs this process may use: its threads will contend for them; "
            "hardware.threads=auto takes what is available", policy.intra_op, policy.cpus_available)
    torch.set_num_threads(policy.intra_op)
    try:
        torch.set_num_interop_threads(policy.inter_op)
    except RuntimeError:  # settable once per process, before inter-op work: a second run in a process keeps it
        policy.inter_op = torch.get_num_interop_threads()
    record = policy.record()
    # in effect: set by prepare_process before torch loaded OpenMP, or already in the environment (then torch
    # read it when it loaded, unless someone set it after the import; we cannot tell)
    in_env = str(os.environ.get("OMP_WAIT_POLICY", "")).strip().lower()
    record["wait_policy_in_effect"] = (bool(_prepared["before_torch"]) and _prepared["wait_policy"] == policy.wait_policy
                                       ) or in_env == policy.wait_policy
    if not record["wait_policy_in_effect"]:
        record["wait_policy_note"] = ("torch was imported before the policy could set OMP_WAIT_POLICY; the OpenMP "
                                      f"runtime uses {in_env or 'its default'} wait policy. Set OMP_WAIT_POLICY="
                                      f"{policy.wait_policy.upper()} before starting Python, or use the CLI")
    return record
