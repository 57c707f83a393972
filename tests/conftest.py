"""Shared test helpers: compose the real configs, run small trainings in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mmbalance.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

# Small and fast: tiny synthetic data, a narrow CNN, one or two epochs, no progress bar.
FAST = [
    "dataset=synthetic",
    "dataset.num_samples=96",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.progress_bar=false",
    "logger=csv",  # the default (auto) adds TensorBoard's import to every test run; tests/test_loggers.py covers it
    "backbone.encoders.image.width=8",
    "backbone.encoders.spectrogram.width=8",
    "backbone.encoders.frames.width=8",
]
THREE = ["+dataset.modalities.text=vector"]


def compose_cfg(overrides: list[str] = (), fast: bool = True):
    """The composed run config, exactly as the CLI would build it (without the `hydra` node)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=(FAST if fast else []) + list(overrides))


def train_in_process(tmp_path: Path, overrides: list[str] = (), fast: bool = True) -> dict:
    from mmbalance.train import train

    cfg = compose_cfg(overrides, fast)
    return train(cfg, tmp_path, {"method": "test"}, list(overrides))


def without_times(metrics: dict) -> dict:
    """A run's metrics without its wall-clock times: what two runs of the same work must share exactly."""
    return {k: v for k, v in metrics.items() if not k.startswith("time")}


def straight_and_resumed(tmp_path: Path, overrides: list[str], stop_epoch: int, monkeypatch) -> tuple[dict, dict]:
    """The results of `overrides` trained straight through (tmp_path/straight) and trained with a Ctrl-C at the
    start of epoch `stop_epoch`, then resumed (tmp_path/resumed): resume tests compare the two."""
    from mmbalance.engine.trainer import Trainer

    straight = train_in_process(tmp_path / "straight", overrides)
    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", train_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(tmp_path / "resumed", overrides)
    return straight, train_in_process(tmp_path / "resumed", overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mmbalance ...` in a subprocess, as a user runs it."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mmbalance", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture
def tiny_cfg():
    return compose_cfg


def pytest_configure(config):
    import torch

    threads = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    # runs started by the tests (in-process and subprocesses) resolve hardware.threads=auto to the same cap
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
