"""Entry points: `python -m mmbalance [overrides]` / `mmbalance [overrides]` train; `mmbalance report DIR...`;
`mmbalance gap DIR...` (the modality-gap analysis); `mmbalance prepare DATASET --root RAW` (datasets)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# conf/ sits at the repository root next to src/ (an editable install, as `make` does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

log = logging.getLogger("mmbalance")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from mmbalance.errors import UserError  # torch and friends load here, not at import time
    from mmbalance.train import train

    hc = HydraConfig.get()
    choices = OmegaConf.to_container(hc.runtime.choices)
    choices = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    try:
        results = train(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task))
    except UserError as exc:
        log.error("%s", exc)
        if hc.mode == RunMode.MULTIRUN:
            raise  # let Hydra record this job as failed and go on with the sweep's other jobs
        # one clear message instead of a traceback; metrics.json already says "failed"
        raise SystemExit(f"error: {exc}") from None
    m = results["metrics"]
    log.info("test acc %.4f  macro-F1 %.4f  imbalance %s  -> %s", m["test/acc"], m["test/macro_f1"],
             "n/a" if m.get("test/imbalance") is None else f"{m['test/imbalance']:.4f}", hc.runtime.output_dir)
    key = cfg.get("optimized_metric") or "val/acc"
    if key not in m:
        raise SystemExit(f"error: optimized_metric={key!r} is not among the run's metrics ({', '.join(sorted(m))})")
    return m[key]


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
    train_main()


if __name__ == "__main__":
    console_main()
