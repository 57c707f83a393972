"""The run context every method hook receives (`Run`), and how it builds its data loaders."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mmbalance.data.batch import collate_batch
from mmbalance.engine import distributed
from mmbalance.metrics.flops import FlopMeter


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch), so the order of every epoch is the same
    whether a run went straight through or resumed from a checkpoint.

    With `world_size` > 1 (hardware=ddp) every rank draws the same permutation, pads it by wrapping to a
    multiple of the world size and takes every world_size-th index from `rank`: disjoint shards of equal
    length, so all ranks take the same number of steps (their collective calls line up).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.world_size == 1:
            return iter(order)
        padded = order + order[: len(self) * self.world_size - self.n]
        return iter(padded[self.rank::self.world_size])

    def __len__(self) -> int:
        return -(-self.n // self.world_size)  # ceil: the padded shard length


class IndexSampler(Sampler[int]):
    """The given dataset indices, in the given order; a kept loader points it at another subset (`Run.loader`)."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class LoaderSettings:
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = False


@dataclass
class Run:
    """The context every hook receives. Methods read it; only the trainer advances epoch and step."""

    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    num_classes: int
    seed: int = 0
    loader_settings: LoaderSettings = field(default_factory=LoaderSettings)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    grad_clip: float | None = None
    output_dir: Path | None = None
    cache_dir: Path | None = None  # for work a method can reuse across runs (e.g. UMT's teachers)
    config: dict | None = None  # the resolved run config (read-only), e.g. to key such a cache
    # what determines the result (engine/identity.py): {"digest", "config", "data", "overrides", "run_dir"};
    # every checkpoint carries it and resume compares it
    identity: dict | None = None
    epoch: int = 0
    step: int = 0
    flops: FlopMeter = field(default_factory=FlopMeter)
    _noise: dict = field(default_factory=dict)
    _loaders: dict = field(default_factory=dict, repr=False)  # Run.loader: purpose -> (key, DataLoader)

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def world_size(self) -> int:
        """Processes training this run together (hardware=ddp); 1 otherwise."""
        return distributed.world_size()

    def sync_gradients(self, params=None) -> None:
        """Average gradients across processes (hardware=ddp; a no-op otherwise). Every optimizer step is
        preceded by it: after the method's backward and gradient edits, before clipping and the step."""
        if params is None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        distributed.average_gradients(params)

    def clip_gradients(self, params=None) -> None:
        """Clip the gradient norm of `params` (default: the model's) to trainer.grad_clip, when it is set."""
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters() if params is None else params, self.grad_clip)

    # ---- the update: every method's step goes through these two, also when it takes over training_step ----
    def zero_grad(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        (optimizer or self.optimizer).zero_grad(set_to_none=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None, params=None) -> None:
        """End one update: average the gradients across processes (hardware=ddp), clip, step.

        `optimizer` defaults to the run's; `params` (default: the optimizer's parameters for the average, the
        model's for the clip) narrows both to the parameters this update moves (MLA's shared head + encoder).
        """
        optimizer = optimizer or self.optimizer
        params = list(params) if params is not None else None
        self.sync_gradients(params if params is not None else
                            [p for group in optimizer.param_groups for p in group["params"]])
        self.clip_gradients(params)
        optimizer.step()

    def reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum batch statistics across processes so every replica derives the same coefficients."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            keys = list(stats)
            flat = torch.stack([stats[k].float() for k in keys])
            torch.distributed.all_reduce(flat)
            return dict(zip(keys, flat))
        return stats

    def noise_generator(self, device) -> torch.Generator:
        """A generator for methods' random draws (e.g. OGM-GE's noise), seeded from the run seed so that
        replicas draw identically; its state is saved with the checkpoint."""
        key = str(device)
        if key not in self._noise:
            self._noise[key] = torch.Generator(device=device).manual_seed(self.seed + 12345)
        return self._noise[key]

    def make_loader(self, dataset: Dataset, train: bool, shard: bool = True,
                    indices: Sequence[int] | None = None) -> DataLoader:
        """A loader like the run's own (methods that rebuild the training data use this).

        Training loaders shuffle per epoch and, under hardware=ddp, give each rank its shard; `shard=False`
        keeps the whole dataset on every rank (side trainings that must come out identical on every rank,
        e.g. UMT's teachers). Evaluation loaders always see the whole dataset, in order, or only `indices` of
        it, in that order (the same batches as a loader over `Subset(dataset, indices)`).
        """
        if indices is not None and train:
            raise ValueError("make_loader: indices select an evaluation pass; a training loader shuffles the dataset")
        s = self.loader_settings
        world = distributed.world_size() if shard else 1
        rank = distributed.rank() if shard else 0
        if train:
            sampler = EpochShuffleSampler(len(dataset), self.seed, rank, world)
        else:
            sampler = IndexSampler(indices) if indices is not None else None
        return DataLoader(
            dataset,
            batch_size=s.batch_size,
            sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=s.pin_memory,
            drop_last=s.drop_last if train else False,
            collate_fn=collate_batch,
            persistent_workers=s.num_workers > 0,
        )

    def loader(self, purpose: str, dataset: Dataset, train: bool, shard: bool = True,
               indices: Sequence[int] | None = None) -> DataLoader:
        """`make_loader`'s loader, kept on the run under `purpose` (e.g. "pmr/prototypes") and reused while the
        dataset object and the other arguments stay the same, so a pass that a method repeats every epoch
        starts its worker processes (hardware.num_workers > 0) once, not once per epoch. `indices` (evaluation
        only) re-points the kept loader at another subset of the same dataset. A new dataset object replaces the
        purpose's loader (and lets its workers go). The loader yields exactly what a new `make_loader` would:
        a training loader's order comes from its sampler's `set_epoch`, which the caller sets.
        """
        key = (train, shard, indices is not None)
        kept = self._loaders.get(purpose)
        if kept is not None and kept[0] == key and kept[1].dataset is dataset:
            loader = kept[1]
            if indices is not None:
                loader.sampler.indices = list(indices)
            return loader
        loader = self.make_loader(dataset, train, shard, indices)
        self._loaders[purpose] = (key, loader)
        return loader
