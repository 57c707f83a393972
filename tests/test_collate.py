"""collate_batch: the same batch in the main process and in a DataLoader worker, where it lands in shared memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mmbalance.data.batch import Batch, MultimodalDataset, collate_batch


def _dataset(n: int = 10) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    return MultimodalDataset(
        {
            "audio": rng.normal(size=(n, 1, 8, 6)).astype(np.float16),  # float16 storage, float32 samples
            "visual": rng.normal(size=(n, 2, 3, 4, 4)).astype(np.float32),
            "text": rng.integers(0, 50, size=(n, 7)),  # token ids -> int64
        },
        rng.integers(0, 3, size=n),
    )


class _WithAbsent(Dataset):
    """Samples that mark a modality absent on every other sample (the data-stage methods' format)."""

    def __init__(self, base: MultimodalDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = self.base[i]
        if i % 2:
            sample["absent"] = {"audio": True}
        return sample


class _Collated(Dataset):
    """One item = collate_batch of a fixed slice, run inside whatever process fetches it, plus whether that
    process was a worker and whether the stacked tensors were in shared memory right after collation."""

    def __init__(self, base, batch: int):
        self.base, self.batch = base, batch

    def __len__(self) -> int:
        return (len(self.base) + self.batch - 1) // self.batch

    def __getitem__(self, k: int):
        rows = range(k * self.batch, min(len(self.base), (k + 1) * self.batch))
        batch = collate_batch([self.base[i] for i in rows])
        in_worker = torch.utils.data.get_worker_info() is not None
        shared = {m: x.is_shared() for m, x in batch.inputs.items()}
        return batch, in_worker, shared


def _assert_same(a: Batch, b: Batch) -> None:
    assert a.inputs.keys() == b.inputs.keys()
    for m in a.inputs:
        assert a.inputs[m].dtype == b.inputs[m].dtype and a.inputs[m].shape == b.inputs[m].shape
        assert torch.equal(a.inputs[m], b.inputs[m]), m
    assert torch.equal(a.label, b.label) and torch.equal(a.index, b.index)
    assert (a.absent is None) == (b.absent is None)
    if a.absent is not None:
        assert a.absent.keys() == b.absent.keys()
        assert all(torch.equal(a.absent[m], b.absent[m]) for m in a.absent)


@pytest.mark.parametrize("absent", [False, True])
def test_worker_collate_equals_main_process_and_is_shared(absent):
    base = _dataset()
    data = _WithAbsent(base) if absent else base
    ds = _Collated(data, batch=4)
    main = [ds[k][0] for k in range(len(ds))]
    assert all(not x.is_shared() for b in main for x in b.inputs.values())  # main process: plain stack

    loader = DataLoader(ds, batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == len(main) == 3
    for (batch, in_worker, shared), expected in zip(got, main):
        assert in_worker
        assert all(shared.values()), shared  # stacked straight into shared memory inside the worker
        _assert_same(batch, expected)
        assert all(x.is_shared() for x in batch.inputs.values())  # and received without another copy


def test_dataloader_with_collate_batch_matches_across_worker_counts():
    ds = _dataset(13)
    batches = {w: list(DataLoader(ds, batch_size=5, num_workers=w, collate_fn=collate_batch)) for w in (0, 2)}
    assert [len(b) for b in batches[0]] == [5, 5, 3]
    for a, b in zip(batches[0], batches[2]):
        _assert_same(a, b)
    assert all(x.is_shared() for b in batches[2] for x in b.inputs.values())
    assert batches[0][0].inputs["text"].dtype == torch.long and batches[0][0].inputs["audio"].dtype == torch.float32


def test_collate_keeps_stack_errors_and_mixed_dtypes():
    ok = {"inputs": {"a": torch.zeros(3)}, "label": 0, "index": 0}
    with pytest.raises(RuntimeError):
        collate_batch([ok, {"inputs": {"a": torch.zeros(4)}, "label": 1, "index": 1}])
    mixed = collate_batch([ok, {"inputs": {"a": torch.ones(3, dtype=torch.float64)}, "label": 1, "index": 1}])
    assert mixed.inputs["a"].dtype == torch.float64  # torch.stack's type promotion, as before


def test_float_labels_stay_float_and_classes_stay_int64():
    sample = {"inputs": {"a": torch.zeros(2)}, "index": 0}
    scores = collate_batch([{**sample, "label": -1.6}, {**sample, "label": 2.4}]).label
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx([-1.6, 2.4])  # never truncated
    assert collate_batch([{**sample, "label": 3}]).label.dtype == torch.int64
