"""Entry points: `python -m mmbalance [overrides]` / `mmbalance [overrides]` train; `mmbalance report DIR...`;
`mmbalance gap DIR...` (the modality-gap analysis); `mmbalance prepare DATASET --root RAW` (datasets)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import mmbalance.config  # noqa: F401  (registers ${mmbalance_compose_parts:}, which hybrid method configs resolve)
from mmbalance.engine import threads
from mmbalance.engine.identity import job_dir_name

# conf/ sits at the repository root next to src/ (an editable install, as `make` does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

log = logging.getLogger("mmbalance")

# hydra.sweep.subdir names a job's folder by its sorted overrides (conf/hydra/default.yaml); registered at
# import, so a job pickled to another process (submitit) resolves it too
OmegaConf.register_new_resolver("mmbalance_job_dir", lambda overrides: job_dir_name(list(overrides)), replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    quiet_other_ranks(cfg)
    # OMP_WAIT_POLICY counts only if set before torch loads its OpenMP runtime: here, before the imports below
    threads.prepare_process(cfg.get("hardware"), hc.launcher if hc.mode == RunMode.MULTIRUN else None)
    # torch and friends load here, not at import time
    from mmbalance.errors import SweepJobFailed, UserError, log_traceback_to_files
    from mmbalance.train import train

    choices = OmegaConf.to_container(hc.runtime.choices)
    choices = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = train(cfg, run_dir, choices, list(hc.overrides.task))
    except (UserError, KeyboardInterrupt) as exc:
        # an expected ending (bad input, divergence, Ctrl-C): the traceback goes to train.log only
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = ("interrupted: the run stops here; re-run the same command to resume from its last checkpoint"
                   if interrupted else f"error: {exc}")
        log_traceback_to_files(message, exc)
        print(f"{message}\n(log: {run_dir / 'train.log'})", file=sys.stderr)
        if multirun and not interrupted:
            # Hydra records this job as failed and goes on with the sweep's other jobs; a fresh exception
            # keeps the traceback it prints at the end of the sweep to this one frame
            raise SweepJobFailed(f"{run_dir}: {exc}") from None
        raise SystemExit(130 if interrupted else 1) from None
    m = results["metrics"]
    log.info("test acc %.4f  macro-F1 %.4f  imbalance %s  -> %s", m["test/acc"], m["test/macro_f1"],
             "n/a" if m.get("test/imbalance") is None else f"{m['test/imbalance']:.4f}", hc.runtime.output_dir)
    key = cfg.get("optimized_metric") or "val/acc"
    if key not in m:
        raise SystemExit(f"error: optimized_metric={key!r} is not among the run's metrics ({', '.join(sorted(m))})")
    return m[key]


class _RankFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None, rank: int):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


def quiet_other_ranks(cfg: DictConfig) -> None:
    """Under hardware=ddp only rank 0 logs progress: the other ranks log warnings and errors only, marked with
    their rank, to the console and to the run's train.log (which rank 0 writes)."""
    rank = int(os.environ.get("RANK") or 0)
    if rank == 0 or not (cfg.get("hardware") or {}).get("distributed", False):
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        if not isinstance(handler.formatter, _RankFormatter):
            handler.setFormatter(_RankFormatter(handler.formatter, rank))



def console_main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from mmbalance.analysis.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        from mmbalance.data.prepare import main as prepare_main

        sys.exit(prepare_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "gap":
        from mmbalance.analysis.modality_gap import main as gap_main

        sys.exit(gap_main(sys.argv[2:]))
    if not CONF_DIR.is_dir():
        sys.exit(f"error: the config folder {CONF_DIR} is missing; install mmbalance from its repository "
                 "with `pip install -e .`")
    try:
        train_main()
    except KeyboardInterrupt:  # Ctrl-C in a sweep: each job's metrics.json already says "interrupted"
        print("interrupted: re-run the same command with hydra.sweep.dir=<its folder> to skip the finished jobs "
              "and resume the others", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    console_main()
