"""Timing helpers the benchmarks share: interleaved rounds with alternating order, medians, the load average.

On a shared machine only ratios measured side by side in one process mean anything: every variant of a
comparison runs once per round, the order alternates between rounds (forward, then reversed) so drift in the
machine's load hits every variant alike, and each variant's median over the rounds is reported.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from overhead import sync, timed  # noqa: F401  (re-exported: one definition of a synchronised timer)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (rounds, steps, clips), refused in one line otherwise."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def device_or_exit(name: str, parser) -> torch.device:
    """The --device to time on (auto: cuda when available); one argparse error for a name torch does not know or
    a CUDA device this machine lacks, instead of a traceback from deep inside the first .to()."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    return device


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a" where the platform has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def interleaved(variants: dict[str, tuple[Callable[[], None], int]], rounds: int, device: torch.device,
                warmup: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """{name: median seconds per call} of `variants` ({name: (fn, calls per round)}), timed over `rounds`
    interleaved rounds, the order reversed every other round; one untimed call each first when `warmup`."""
    if warmup:
        for fn, _ in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(rounds):
        started = time.perf_counter()
        for name in order if r % 2 == 0 else order[::-1]:
            fn, calls = variants[name]
            times[name].append(timed(fn, device, calls))
        if progress is not None:
            progress(f"round {r + 1}/{rounds} ({time.perf_counter() - started:.1f} s): "
                     + ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in order))
    return {name: statistics.median(v) for name, v in times.items()}
