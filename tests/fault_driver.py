"""Run the mmbalance CLI in this process and kill it with SIGKILL at a chosen point (the fault-injection tests).

    python tests/fault_driver.py <point> <n> [mmbalance overrides...]

<point> is where the process dies, on the n-th time (1-based) it gets there:
  train_step          inside a training step (mid-epoch)
  checkpoint_write    while last.pt is being written (bytes on disk under a temporary name, not yet renamed)
  after_checkpoint    right after last.pt is saved, before history.csv is written
  test_eval           during the final evaluation on the test split
Nothing in the package knows about this file: the points are reached by wrapping its functions here.
"""

import os
import signal
import sys

POINT, N = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]
_hits = 0


def _maybe_die() -> None:
    global _hits
    _hits += 1
    if _hits == N:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    import mmbalance.engine.checkpoint as checkpoint
    import mmbalance.engine.trainer as trainer
    from mmbalance.methods.base import Method

    if POINT == "train_step":
        original_step = Method.training_step

        def training_step(self, run, batch):
            _maybe_die()
            return original_step(self, run, batch)

        Method.training_step = training_step
    elif POINT == "checkpoint_write":
        original_fsync = checkpoint.os.fsync

        def fsync(fd):
            original_fsync(fd)
            if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".last.pt."):
                _maybe_die()

        checkpoint.os.fsync = fsync
    elif POINT == "after_checkpoint":
        original_write = trainer.Trainer._write_history

        def write_history(self):
            if self.history and len(self.history) == self.epochs and self.resumed_from is None:
                _maybe_die()
            original_write(self)

        trainer.Trainer._write_history = write_history
    elif POINT == "test_eval":
        original_evaluate = trainer.evaluate

        def evaluate(run, loader, split, shapley=True):
            if split == "test":
                _maybe_die()
            return original_evaluate(run, loader, split, shapley)

        trainer.evaluate = evaluate
    else:
        raise SystemExit(f"unknown fault point {POINT!r}")


if __name__ == "__main__":
    _install()
    from mmbalance.cli import console_main

    console_main()
