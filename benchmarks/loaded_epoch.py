"""A digits_av training epoch on an idle machine and beside CPU-bound work, with and without the thread policy.

Two worker processes hold the same digits_av run (default config, hardware=cpu): one started as the CLI starts
a run (engine/threads.py: OMP_WAIT_POLICY set before torch loads, intra-op threads from the CPUs this process
may use), one with torch's defaults (every core, spinning OpenMP threads; OMP_* variables removed). Each round
times one epoch of each worker idle and with a busy-loop process per CPU running beside it, interleaved, so
drift in the machine's load hits every condition alike. Prints medians over rounds, the load average, and
the ratio loaded / idle (goal with the policy: <= 1.5x).

Usage:  python benchmarks/loaded_epoch.py [--rounds 5] [--competitors N (default: one per CPU)]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(with_policy: bool) -> None:
    """Build the run once, then time one training epoch per line read from stdin; print seconds per epoch."""
    from mmbalance.engine import threads

    hardware = {"device": "cpu", "threads": "auto", "wait_policy": "auto"}
    if with_policy:
        threads.prepare_process(hardware)  # before torch loads, as cli.train_main does
    import torch
    from hydra import compose, initialize_config_dir

    from mmbalance.cli import CONF_DIR
    from mmbalance.engine.trainer import Trainer
    from mmbalance.train import build_run

    record = threads.apply(hardware) if with_policy else {"intra_op": torch.get_num_threads(), "wait_policy": "default"}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.progress_bar=false", "eval.flops=false"])
    run = build_run(cfg, torch.device("cpu"))
    trainer = Trainer(run, epochs=1, select_on="val", select_metric="acc", shapley_every=0, count_flops=False,
                      progress_bar=False)
    trainer.train_epoch(0)  # warm-up
    print(json.dumps({"ready": True, "threads": record}), flush=True)
    epoch = 1
    for _ in sys.stdin:
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        epoch += 1


class Worker:
    def __init__(self, with_policy: bool):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
        env.pop("MMBALANCE_PARALLEL_JOBS", None)
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "policy" if with_policy else "default"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the worker ended early")
            if line.startswith("{"):
                return json.loads(line)

    def epoch(self) -> float:
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Load:
    """A busy-loop process per CPU (or n), running while inside the `with`."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(1.0)  # let them reach full speed
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--competitors", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--worker", choices=["policy", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker == "policy")
        return
    if args.rounds < 1 or args.competitors < 0:  # checked here: _timing's helpers would load torch in this process
        parser.error("--rounds must be >= 1 and --competitors >= 0")
    print(f"CPUs usable: {len(os.sched_getaffinity(0))}; competitors when loaded: {args.competitors} busy loops; "
          f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    workers = {"policy": Worker(True), "default": Worker(False)}
    for name, w in workers.items():
        print(f"  {name}: threads {json.dumps(w.info['threads'])}")
    times = {(name, load): [] for name in workers for load in ("idle", "loaded")}
    loads = []
    try:
        for r in range(args.rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(workers))
            for name in order:
                times[(name, "idle")].append(workers[name].epoch())
            with Load(args.competitors):
                for name in order:
                    times[(name, "loaded")].append(workers[name].epoch())
                loads.append(os.getloadavg()[0])
            print(f"  round {r + 1}: " + ", ".join(f"{n}/{l} {v[-1]:.2f}s" for (n, l), v in times.items())
                  + f"; 1-min load {loads[-1]:.2f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    print(f"medians over {args.rounds} rounds (seconds per digits_av epoch):")
    for name in workers:
        idle, loaded = statistics.median(times[(name, "idle")]), statistics.median(times[(name, "loaded")])
        print(f"  {name:8s} idle {idle:6.2f}  loaded {loaded:6.2f}  loaded/idle {loaded / idle:5.2f}x")
    policy_idle = statistics.median(times[("policy", "idle")])
    ratio = statistics.median(times[("policy", "loaded")]) / policy_idle
    default_idle = statistics.median(times[("default", "idle")])
    print(f"with the policy: loaded/idle {ratio:.2f}x (goal <= 1.5x); idle cost of the policy "
          f"{policy_idle / default_idle:.2f}x; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
