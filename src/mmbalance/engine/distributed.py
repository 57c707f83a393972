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
on every rank (identical model selection without extra communication); only rank 0 writes outputs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

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


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


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
