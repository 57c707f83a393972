"""Atomic writes: a crash mid-write never leaves a truncated checkpoint or results file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    # weights_only=False: checkpoints hold RNG states and method state written by this package
    return torch.load(path, map_location=map_location, weights_only=False)


def write_json(obj: dict, path: Path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=_jsonable).encode()))


def _jsonable(x):
    if isinstance(x, (Path,)):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return repr(x)
