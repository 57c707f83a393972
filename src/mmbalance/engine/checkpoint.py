"""Atomic writes: a crash mid-write never leaves a truncated checkpoint or results file.

Every file is written to a hidden temporary beside it (`.<name>.<random>.tmp`), fsynced and renamed over
the target. A process killed mid-write leaves only such a temporary; `remove_stale_temporaries` cleans
them at the next start. `last.pt` keeps its predecessor as `last.prev.pt`, so one unreadable checkpoint
(a bad disk block, a copy cut short) costs one epoch instead of the run. A write that fails (a full disk) is
one `WriteError` naming the file; the file it would have replaced is unchanged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

from mmbalance.errors import CheckpointError, UserError

log = logging.getLogger("mmbalance")

TMP_SUFFIX = ".tmp"
LOW_SPACE = 64 * 2**20  # bytes: less left when a write fails means the write filled the disk


class WriteError(UserError, OSError):
    """A run file could not be written (a full disk, an I/O error): one message naming it. Still an OSError, so
    callers that tolerate a failed write (engine/loggers.py) keep doing so."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException as exc:
        # measured before the partial temporary goes: it holds the space the write took
        failed = _write_failure(path, exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if failed is not None:
            raise failed from exc
        raise


def _write_failure(path: Path, exc: BaseException) -> WriteError | None:
    """The message for a write that failed: torch reports a full disk as a bare RuntimeError (`unexpected pos`),
    so the free space decides. None for a RuntimeError with space left: that is a bug and keeps its traceback."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < LOW_SPACE)
    if not full and not isinstance(exc, OSError):
        return None
    space = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    return WriteError(
        f"could not write {path}: {'the disk is full' if full else 'the write failed'} (free space on its "
        f"filesystem: {space}; {type(exc).__name__}: {detail}); {kept}. Free some space and re-run the same "
        "command (a run resumes from its last complete checkpoint)")


def previous_path(path: Path) -> Path:
    """checkpoints/last.pt -> checkpoints/last.prev.pt"""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` atomically; with `keep_previous`, the file it replaces becomes `<stem>.prev<suffix>`.

    The predecessor is hard-linked under a temporary name and renamed into place before the new file
    replaces the old name, so at every instant at least one complete checkpoint exists under a known name.
    """
    path = Path(path)
    if keep_previous and path.exists():
        prev = previous_path(path)
        link = prev.with_name(f".{prev.name}.link{TMP_SUFFIX}")
        try:
            if link.exists():
                link.unlink()
            os.link(path, link)
            os.replace(link, prev)
        except OSError:  # a filesystem without hard links: copy the bytes instead
            _atomic(prev, lambda f: f.write(path.read_bytes()))
    import torch  # here, not at import: the run-folder bookkeeping (and `mmbalance report`) stays free of torch

    _atomic(path, lambda f: torch.save(state, f))


# What torch.load raises on a truncated, corrupt or foreign file, across torch versions.
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
               AttributeError, ImportError, IndexError, TypeError, OSError)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The checkpoint at `path`; a file that cannot be read is one CheckpointError naming it."""
    import torch

    path = Path(path)
    try:
        # weights_only=False: checkpoints hold RNG states and method state written by this package
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except _UNREADABLE as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"checkpoint {str(path)!r} ({size} bytes) is unreadable: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not an mmbalance checkpoint")
    return state


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of writes that a killed process left in `folder` and `folder/checkpoints`.
    Only call this while holding the folder's run lock (no live writer can own them)."""
    removed = []
    for where in (Path(folder), Path(folder) / "checkpoints"):
        if not where.is_dir():
            continue
        for tmp in where.glob(f".*{TMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed


def write_json(obj: dict, path: Path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=_jsonable).encode()))


def write_text(text: str, path: Path) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def _jsonable(x):
    if isinstance(x, (Path,)):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return repr(x)
