"""Data-parallel training across processes (`hardware=ddp`, launched with torchrun).

mmbalance does not wrap the model in DistributedDataParallel: methods take over backward in many ways
(several backward passes per step, gradients edited between backward and step, M optimizer steps per
batch in MLA, a different optimizer per phase in ReconBoost), which DDP's backward hooks cannot follow.
Instead every replica

* starts from the same parameters (the same seed builds the same model);
* trains on its own shard of every epoch (`EpochShuffleSampler` with rank and world size: one shared
  permutation, padded to equal lengths so every rank takes the same number of steps);
* reduces the batch statistics a method derives coefficients from (`Run.reduce`), so the coefficients are
  identical everywhere;
* averages the final gradients right before each optimizer step (`average_gradients`, called by
  `Run.sync_gradients` after the method's backward and gradient edits),

so the replicas apply identical updates and never drift. Evaluation runs the full validation and test data
on every rank (identical model selection without extra communication); only rank 0 writes outputs and logs
progress (the other ranks log warnings and errors only, marked with their rank: `cli.quiet_other_ranks`).

Buffers are what a step does not synchronise: a training forward updates BatchNorm's running mean and
variance from the rank's own shard, so the replicas hold the same parameters but different running statistics,
and every eval-mode pass (validation, test, a method's prototypes) would differ between ranks. `sync_buffers`
runs at the end of every training epoch, before the method's epoch-end hook: it *averages* the normalisation
layers' running statistics over the ranks (the statistics of every shard, as timm's `distribute_bn` "reduce";
DDP's `broadcast_buffers` would keep rank 0's only) and copies every other buffer from rank 0. Validation,
checkpoints and test then see one model on every rank. Inside an epoch each rank's statistics follow its shard;
the eval-mode passes there (a method's coefficient passes) are summed with `Run.reduce` anyway.

Not SyncBatchNorm: it makes every train-mode forward a collective (methods run several forwards per step), it
changes training itself (global-batch statistics), and PyTorch's SyncBatchNorm refuses CPU tensors, so
hardware=ddp on gloo could not use it. Not "evaluate on rank 0 and broadcast": the other ranks would idle through
every evaluation, and eval-mode epoch hooks would still see different statistics.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mmbalance.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str, device: str) -> torch.device:
    """Join the process group torchrun describes in the environment; return this rank's device.

    The environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set by torchrun;
    without them there is nothing to join and the message says how to launch.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(
            f"hardware=ddp needs the torchrun environment ({', '.join(missing)} not set); launch with "
            "`torchrun --standalone --nproc_per_node=<GPUs> -m mmbalance hardware=ddp ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("hardware=ddp with hardware.device=cuda but CUDA is not available here; "
                            "on CPUs use hardware.device=cpu hardware.backend=gloo")
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if not is_distributed():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return target


def shutdown(finished: bool = False) -> None:
    """Leave the process group. `finished`: every rank got here normally, so they first meet at a barrier: with
    gloo, a rank that tears its connections down while a peer still flushes the last collective's data can make
    that peer abort (SIGABRT, "Connection closed by peer") after a run that succeeded. After an error there is
    no barrier: a rank that failed never reaches it, and the others would wait for the timeout."""
    if is_distributed():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the ranks (one flat all-reduce).

    A parameter that has a gradient on some ranks only (a branch a method skipped on one shard) gets a zero
    gradient where it had none, so the all-reduce lines up; where no rank has one it stays None.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    active = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not active:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in active])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in active:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def _running_statistics(module: nn.Module) -> set[int]:
    """ids of the running mean and variance buffers of every normalisation layer in module (BatchNorm*,
    InstanceNorm* with track_running_stats, SyncBatchNorm)."""
    ids = set()
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            ids.update(id(b) for b in (sub.running_mean, sub.running_var) if b is not None)
    return ids


@torch.no_grad()
def sync_buffers(modules: Iterable[nn.Module]) -> None:
    """Make every buffer of `modules` identical on all ranks (a no-op in one process): the running statistics of
    normalisation layers become their mean over the ranks, every other buffer becomes rank 0's.

    Every rank must call it at the same point (it is a collective); two flat messages, not one per buffer.
    """
    if not is_distributed():
        return
    averaged: list[torch.Tensor] = []
    copied: dict[torch.dtype, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for module in modules:
        stats = _running_statistics(module)
        for buf in module.buffers():
            if id(buf) in seen:
                continue
            seen.add(id(buf))
            if id(buf) in stats and buf.is_floating_point():
                averaged.append(buf)
            else:
                copied.setdefault(buf.dtype, []).append(buf)
    if averaged:
        flat = torch.cat([b.reshape(-1).double() for b in averaged])  # double: the mean of w copies of x is x
        dist.all_reduce(flat)
        flat /= world_size()
        _unflatten(flat, averaged)
    for dtype, bufs in copied.items():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        if dtype == torch.bool:  # not every backend broadcasts bool
            flat = flat.to(torch.uint8)
        dist.broadcast(flat, src=0)
        _unflatten(flat, bufs)


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


# ---- a failure on another rank, told to rank 0 through the run folder ----
# When a rank other than 0 fails, torchrun stops the others (SIGTERM) or they fail in their next collective
# ("Connection closed by peer"): rank 0, which writes metrics.json, would record that symptom. The failing rank
# leaves its own error in the run folder first, and rank 0 records it.

FAILURE_NOTE = ".rank{rank}.failed"


def note_failure(folder: Path, error: str) -> None:
    """On a rank other than 0: leave `error` for rank 0 to record (best effort: the error itself is what matters)."""
    with contextlib.suppress(OSError):
        (Path(folder) / FAILURE_NOTE.format(rank=rank())).write_text(error)


def failures_of_other_ranks(folder: Path) -> list[str]:
    """The errors other ranks left in `folder`, as 'rank N: <error>', by rank."""
    notes = sorted(Path(folder).glob(FAILURE_NOTE.format(rank="*")), key=lambda p: p.name)
    out = []
    for note in notes:
        with contextlib.suppress(OSError):
            out.append(f"rank {note.name.split('.')[1].removeprefix('rank')}: {note.read_text().strip()}")
    return out


def clear_failure_notes(folder: Path) -> None:
    """Rank 0, at the start: notes of an earlier attempt are not this attempt's."""
    for note in Path(folder).glob(FAILURE_NOTE.format(rank="*")):
        with contextlib.suppress(OSError):
            note.unlink()
