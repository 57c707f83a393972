"""The batch format every dataset produces and every method consumes, plus the shared dataset containers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

# What a modality's tensor looks like, per sample; `backbone=...` maps each kind to an encoder family.
MODALITY_KINDS = {
    "image": "(C, H, W) float image",
    "spectrogram": "(1, F, T) float time-frequency map",
    "frames": "(T, C, H, W) video frames (optical flow: C = 2)",
    "vector": "(D,) float feature vector",
    "sequence": "(T, D) float feature sequence",
    "tokens": "(L,) int64 token ids of a tokenised text, 0 = padding",
}


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality is: its kind (a key of MODALITY_KINDS) and its per-sample tensor shape."""

    kind: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in MODALITY_KINDS:
            raise ValueError(f"unknown modality kind {self.kind!r}; expected one of {sorted(MODALITY_KINDS)}")


@dataclass
class Batch:
    """inputs: {modality: (B, ...) tensor}; label: (B,) int64; index: (B,) int64 position in the split.

    absent: optional {modality: (B,) bool} marking modalities a data-stage method removed from some samples
    (e.g. sample-level valuation's re-weighted copies); None for ordinary data.
    """

    inputs: dict[str, Tensor]
    label: Tensor
    index: Tensor
    absent: dict[str, Tensor] | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(
            {m: x.to(device, non_blocking=non_blocking) for m, x in self.inputs.items()},
            self.label.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            None if self.absent is None
            else {m: a.to(device, non_blocking=non_blocking) for m, a in self.absent.items()},
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])


def _stack(tensors: list[Tensor]) -> Tensor:
    """torch.stack; inside a DataLoader worker straight into shared memory, as torch's `default_collate` does: the
    worker hands its batch over through shared memory, so stacking into ordinary memory would copy it twice."""
    first = tensors[0]
    if get_worker_info() is None or first.device.type != "cpu" or any(t.dtype != first.dtype for t in tensors):
        return torch.stack(tensors)
    shape = (len(tensors), *first.shape)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * first.element_size())
    out = torch.empty(0, dtype=first.dtype).set_(storage, 0, shape)
    return torch.stack(tensors, out=out)


def collate_batch(samples: list[dict]) -> Batch:
    """Stack `{"inputs": {m: tensor}, "label": int, "index": int[, "absent": {m: bool}]}` samples into a Batch.

    Integer labels (classes) become int64; float labels (regression scores, CMU-MOSEI's dataset.task=regression)
    float32, never truncated."""
    modalities = samples[0]["inputs"].keys()
    inputs = {m: _stack([s["inputs"][m] for s in samples]) for m in modalities}
    labels = [s["label"] for s in samples]
    label = torch.as_tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    index = torch.as_tensor([s["index"] for s in samples], dtype=torch.long)
    absent = None
    if any("absent" in s for s in samples):
        absent = {m: torch.as_tensor([bool(s.get("absent", {}).get(m, False)) for s in samples]) for m in modalities}
    return Batch(inputs, label, index, absent)


class MultimodalDataset(Dataset):
    """In-memory dataset: {modality: array (N, ...)} plus labels. Samples are dicts for `collate_batch`.

    Arrays may be float16 to halve memory; floating samples are returned as float32, integer ones (token
    ids) as int64. `ids`: per-sample provenance arrays (N,), kept as attributes and sliced with the samples
    (digits_av's image_ids and clip_ids).
    """

    def __init__(self, inputs: dict[str, np.ndarray | Tensor], labels: np.ndarray | Tensor, **ids: np.ndarray):
        self.inputs = {m: torch.as_tensor(np.asarray(x)) for m, x in inputs.items()}
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.ids = {k: np.asarray(v, dtype=np.int64) for k, v in ids.items()}
        self.__dict__.update(self.ids)
        n = len(self.labels)
        for m, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"modality {m!r} has {x.shape[0]} samples but there are {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        inputs = {m: x[i].float() if x.is_floating_point() else x[i].long() for m, x in self.inputs.items()}
        return {"inputs": inputs, "label": int(self.labels[i]), "index": i}

    def subset(self, indices: np.ndarray) -> "MultimodalDataset":
        idx = np.asarray(indices, dtype=np.int64)
        t = torch.as_tensor(idx)
        return MultimodalDataset({m: x[t] for m, x in self.inputs.items()}, self.labels[t],
                                 **{k: v[idx] for k, v in self.ids.items()})


class ArrayDataset(Dataset):
    """Samples `rows` of per-modality arrays (N, ...): in memory, or .npy files memory-mapped read-only on first
    use, so that DataLoader workers each map the file instead of receiving a pickled copy. Samples are float32,
    or int64 for integer arrays (token ids). Labels are int64 classes, or with `regression` float32 scores (a
    sample's label is then a Python float, which `collate_batch` keeps float)."""

    def __init__(self, sources: dict[str, np.ndarray | Path], rows: np.ndarray, labels: np.ndarray,
                 ids: list[str], regression: bool = False):
        self.sources = dict(sources)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32 if regression else torch.long)
        self.ids = list(ids)
        if not (len(self.rows) == len(self.labels) == len(self.ids)):
            raise ValueError("rows, labels and ids must have the same length")
        self._open: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._open is None:
            self._open = {m: np.load(s, mmap_mode="r") if isinstance(s, Path) else s for m, s in self.sources.items()}
        return self._open

    def __getstate__(self):
        return {**self.__dict__, "_open": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row, inputs = int(self.rows[i]), {}
        for m, a in self.arrays().items():
            # np.array copies: a writable tensor, never a view into the read-only memmap
            inputs[m] = torch.from_numpy(np.array(a[row], dtype=np.int64 if a.dtype.kind in "iu" else np.float32))
        return {"inputs": inputs, "label": self.labels[i].item(), "index": i}


@dataclass
class DataSplits:
    """What a dataset builder returns: three splits plus what the model needs to know about the data."""

    train: Dataset
    val: Dataset
    test: Dataset
    modalities: dict[str, ModalitySpec]  # ordered: this order is the concat order of the fusion head
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    # how the validation split was obtained, recorded in metrics.json (`carved_val_source` when carved from train)
    val_source: str = "carved from train (stratified)"
    notes: dict = field(default_factory=dict)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out) with `fraction` of every class held out (at least one per class
    when the class has two or more samples). Deterministic for a given seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if k == 0 and len(idx) >= 2 and fraction > 0:
            k = 1
        held.append(idx[:k])
    held_out = np.sort(np.concatenate(held)) if held else np.array([], dtype=int)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def _percent(share: float) -> str:
    return f"{100 * share:.3g} %"


def carved_val_source(labels: np.ndarray, held: np.ndarray, fraction: float, seed: int) -> str:
    """How a validation split `stratified_split(labels, fraction, seed)` carved was obtained, with the share it
    actually holds: per-class rounding and the one-per-class minimum can make it far from `fraction` on a small
    split ("carved from train (stratified, 3 of 12 = 25 % (asked 10 %, at least one per class), seed 0)")."""
    labels = np.asarray(labels)
    n, k = len(labels), len(held)
    share = k / n if n else 0.0
    text = f"{k} of {n} = {_percent(share)}"
    if _percent(share) != _percent(fraction):
        counts = np.unique(labels, return_counts=True)[1]
        raised = fraction > 0 and any(int(round(fraction * c)) == 0 and c >= 2 for c in counts)
        text += f" (asked {_percent(fraction)}, {'at least one per class' if raised else 'rounded per class'})"
    return f"carved from train (stratified, {text}, seed {seed})"
