"""Random tensors of any modality kind with a controllable class signal per modality, for tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import numpy as np

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveInt, Range
from mmbalance.data.batch import DataSplits, ModalitySpec, MultimodalDataset, stratified_split
from mmbalance.data.finite import check_arrays
from mmbalance.errors import UserError

DEFAULT_SHAPES = {
    "image": (3, 16, 16),
    "spectrogram": (1, 16, 16),
    "frames": (2, 3, 16, 16),
    "vector": (16,),
    "sequence": (6, 8),
}


def build_synthetic(
    modalities: Mapping[str, str] | None = None,
    num_classes: Annotated[int, Range(ge=2)] = 4,
    num_samples: PositiveInt = 240,
    signal: Mapping[str, float] | None = None,
    shapes: Mapping[str, list[PositiveInt]] | None = None,
    test_fraction: Fraction = 0.25,
    val_fraction: Fraction = 0.1,
    seed: NonNegativeInt = 0,
) -> DataSplits:
    """x_m = signal_m * prototype_m[y] + N(0, 1), one fixed random prototype per class and modality.

    Args:
        modalities: {name: kind}, in fusion order; default {audio: spectrogram, visual: image}. Add a third
            with e.g. ``+dataset.modalities.text=vector``.
        signal: class-signal strength per modality; by default it falls with the order (1.0, 0.5, 0.25, ...)
            so the first modality dominates, as audio does in CREMA-D.
        shapes: per-sample shape per modality (default by kind: DEFAULT_SHAPES).
    """
    modalities = dict(modalities or {"audio": "spectrogram", "visual": "image"})
    if not modalities:
        raise UserError("dataset.modalities: give at least one {name: kind}")
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % num_classes
    rng.shuffle(labels)
    specs, arrays = {}, {}
    for i, (name, kind) in enumerate(modalities.items()):
        shape = tuple((shapes or {}).get(name, DEFAULT_SHAPES.get(kind, ())))
        try:
            specs[name] = ModalitySpec(kind, shape)
        except ValueError as exc:
            raise UserError(f"dataset.modalities.{name}: {exc}") from None
        strength = (signal or {}).get(name, 0.5**i)
        prototypes = rng.standard_normal((num_classes, *shape)).astype(np.float32)
        noise = rng.standard_normal((num_samples, *shape)).astype(np.float32)
        arrays[name] = strength * prototypes[labels] + noise
    train_val, test = stratified_split(labels, test_fraction, seed)
    train, val = stratified_split(labels[train_val], val_fraction, seed + 1)
    train, val = train_val[train], train_val[val]
    check_arrays("synthetic data", arrays, {"train": train, "val": val, "test": test},
                 "lower dataset.signal (float32 overflows past 3.4e38)")
    full = MultimodalDataset(arrays, labels)
    return DataSplits(full.subset(train), full.subset(val), full.subset(test), specs, num_classes,
                      [f"class{c}" for c in range(num_classes)])
