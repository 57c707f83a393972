"""A run folder is a record: one run's identity owns it, one process writes it, and a re-run never destroys it.

`RunFolder.plan(identity, mode)` reads what the folder already holds (its metrics.json) and decides what a
new start may do there, following `resume`:

* ``auto`` (default): an empty folder starts fresh; an unfinished run of the same identity resumes from its
  last checkpoint; a completed run of the same identity is left as it is (nothing to do); a record of
  another run is refused, naming both runs and the keys that differ.
* ``reevaluate``: like auto, but a completed run re-tests its best checkpoint; its metrics.json is replaced
  only once the new one is complete.
* ``never``: whatever the folder holds moves to `superseded/<time>/` and the run starts fresh.
* ``force``: resume whatever the folder holds, even another identity's checkpoint (recorded in metrics.json).

No mode shortens a run: a folder trained for more epochs than `trainer.epochs` is refused (its results are those
of the longer run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmbalance.engine.checkpoint import remove_stale_temporaries
from mmbalance.engine.identity import RESUME_MODES, SUPERSEDED, describe, differences, refusal, run_identity
from mmbalance.errors import RunFolderError, UserError

try:  # POSIX advisory locks; elsewhere the folder simply is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("mmbalance")

# What a run writes into its folder; `resume=never` moves these aside, with the run's .hydra/ (HYDRA_FILES), which
# the run writes when it takes the folder (train.py), not Hydra before any check; train.log stays (it is appended to)
RESULT_FILES = ("metrics.json", "history.csv", "checkpoints", "flops_fvcore.txt")
HYDRA_FILES = ".hydra"
LOCK = ".lock"


@dataclass
class Plan:
    """What this start does in the folder: "fresh", "resume", "skip" or "reevaluate"."""

    action: str
    previous: dict | None = None
    forced_over: list[str] = field(default_factory=list)  # keys that differ, when resume=force overrode them


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_file = None

    # ---- one writer at a time ----
    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the folder for the block. The kernel releases it when the process ends,
        however it ends (kill -9 included), so a stale lock never blocks a re-run."""
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield self
            return
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderError(
                f"{self.path} is in use by {holder}: two processes must not write one run folder; wait for it "
                "to finish or choose another folder (hydra.run.dir=... / hydra.sweep.dir=...)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else '?'}\n")
        f.flush()
        self._lock_file = f
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
            self._lock_file = None

    def holder(self) -> str | None:
        """Who holds the folder's lock on this machine ("pid N on host"), or None when no process here does (the
        kernel drops a lock with its process, kill -9 included). A lock held on another machine of a shared file
        system may not be seen. Reads only: the lock file is opened for reading and never created."""
        if fcntl is None:
            return None
        try:
            f = open(self.path / LOCK)
        except OSError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            except OSError:
                return None
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    # ---- what the folder holds ----
    def previous_record(self) -> dict | None:
        """The folder's metrics.json, None when there is none, {"status": "unreadable", ...} when it is damaged."""
        path = self.path / "metrics.json"
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except (OSError, ValueError) as exc:
            return {"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}

    def has_checkpoint(self) -> bool:
        ckpt = self.path / "checkpoints"
        return (ckpt / "last.pt").exists() or (ckpt / "last.prev.pt").exists()

    def plan(self, identity: dict, mode: str, world_size: int = 1) -> Plan:
        if mode not in RESUME_MODES:
            raise UserError(f"resume={mode!r}: expected one of {list(RESUME_MODES)}")
        previous = self.previous_record()
        if mode == "never":
            return Plan("fresh", previous)
        if previous is None or previous.get("status") == "unreadable":
            if previous is not None:
                log.warning("%s/metrics.json is unreadable (%s); the checkpoint decides what resumes",
                            self.path, previous["error"])
            return Plan("resume" if self.has_checkpoint() else "fresh", previous)
        recorded = recorded_identity(previous)
        diff = differences(recorded["config"], identity["config"]) if recorded else ["<no identity recorded>"]
        owner = f"it records {describe(previous)}, status {previous.get('status')!r}"  # whose record a refusal names
        if diff and mode != "force":
            extension = previous.get("extension") or {}
            if extension.get("status") != "completed" and extension.get("epochs") == \
                    identity["config"].get("trainer.epochs"):  # the folder's own unfinished extension: say how
                owner += (f", and an extension of it to {extension['epochs']} epochs that ended "
                          f"{extension.get('status')!r}; resume=force finishes that extension")
            raise RunFolderError(refusal(self.path / "metrics.json", owner, diff))
        completed = previous.get("status") == "completed"
        trained = (previous.get("metrics") or {}).get("epochs")
        requested = identity["config"].get("trainer.epochs")
        if completed and isinstance(trained, int) and isinstance(requested, int) and trained > requested:
            raise shortening_refused(self.path / "metrics.json", trained, requested)
        if completed and mode == "auto" and not diff:
            return Plan("skip", previous)
        if completed:  # reevaluate, or force
            return Plan("reevaluate", previous, forced_over=diff)
        other_size = world_size_change(previous.get("world_size"), world_size)
        if other_size and mode != "force" and self.has_checkpoint():  # refused before anything is written
            raise RunFolderError(refusal(self.path / "metrics.json", owner, [other_size]))
        return Plan("resume" if self.has_checkpoint() else "fresh", previous, forced_over=diff)

    # ---- acting on the plan (rank 0 only) ----
    def holds_results(self) -> bool:
        """Whether the folder holds files a resume=never start moves aside."""
        return any((self.path / name).exists() for name in RESULT_FILES)

    def supersede(self) -> Path | None:
        """Move the previous run's files into superseded/<time>/ (resume=never); None when there were none."""
        present = [self.path / name for name in RESULT_FILES if (self.path / name).exists()]
        if not present:
            return None
        if (self.path / HYDRA_FILES).exists():  # the config the superseded results were made with
            present.append(self.path / HYDRA_FILES)
        target = self.path / SUPERSEDED / time.strftime("%Y-%m-%d_%H-%M-%S")
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{target.name.split('+')[0]}+{n}")
        target.mkdir(parents=True)
        for item in present:
            shutil.move(str(item), str(target / item.name))
        return target

    def clean_temporaries(self) -> None:
        removed = remove_stale_temporaries(self.path)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                     ", ".join(p.name for p in removed))


def world_size_change(trained_on, now: int) -> str | None:
    """The difference that refuses continuing an unfinished run on another number of processes, or None. The
    world size is not part of the identity (a completed run is the same run whatever trained it), but epochs on
    another number of processes would mix two effective batch sizes and data shardings in one run."""
    if trained_on is None or int(trained_on) == int(now):  # None: recorded before runs recorded it
        return None
    return (f"processes (world size): {trained_on} -> {now} (each step's batch is world size x trainer.batch_size; "
            "continue it with as many processes as trained it)")


def shortening_refused(where, trained: int, requested: int) -> RunFolderError:
    """The refusal of a start that would shorten a run: training never goes back, so a run of `trained` epochs
    re-tested or recorded as one of `requested` epochs would claim results it does not have."""
    return RunFolderError(
        f"{where} holds a run trained for {trained} epochs; trainer.epochs={requested} cannot shorten it (a run "
        "only continues). Its checkpoints and results are left as they are. Re-run with resume=never to train "
        f"{requested} epochs from the start here (the existing files move to {SUPERSEDED}/), or choose another "
        "folder (hydra.run.dir=... / hydra.sweep.dir=...)")


def recorded_identity(record: dict) -> dict | None:
    """The identity of a run from its metrics.json (recomputed from the resolved config it recorded, so
    records written before identities existed compare too); None when it recorded no config."""
    config = record.get("config")
    if not isinstance(config, dict):
        return None
    version = (record.get("versions") or {}).get("mmbalance", "?")
    return run_identity(config, version)
