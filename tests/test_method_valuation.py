"""Sample-level valuation on hand-checked numbers: per-sample Shapley from coalition correctness (2 and 3
modalities, v(full) = M), the copy table, the modality-level counts, the rebuilt training set (size, absent
marks, only training data, warm-up), and the feature-level masking of the copies."""

import pytest
import torch

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.methods.valuation import (Valuation, ValuationDataset, coalition_values, copy_counts,
                                         modality_level_copies, sample_shapley)
from mmbalance.metrics.shapley import coalitions, shapley_values


def test_two_modality_sample_shapley_with_v_full_2():
    # coalitions [{}, {a}, {v}, {a, v}]; phi_a = (v_a + v_all - v_v) / 2 with v_all = 2 * correct
    correct = torch.tensor([
        [0, 1, 1, 1],  # all right: phi = (1 + 2 - 1)/2 = 1 each
        [0, 0, 0, 1],  # only the pair right: (0 + 2 - 0)/2 = 1 each
        [0, 1, 0, 1],  # a alone and the pair: phi_a = (1 + 2)/2 = 1.5, phi_v = (0 + 2 - 1)/2 = 0.5
        [0, 0, 1, 0],  # v alone only: phi_a = (0 + 0 - 1)/2 = -0.5, phi_v = 0.5
        [1, 0, 0, 0],  # v(empty) is 0 whatever the zeroed prediction says
    ], dtype=torch.bool)
    phi = sample_shapley(coalition_values(correct, 2.0), ["a", "v"])
    torch.testing.assert_close(phi, torch.tensor(
        [[1.0, 1.0], [1.0, 1.0], [1.5, 0.5], [-0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))
    # the peer's v(full) = 1: an all-right sample gets 0.5 each (then one copy per modality)
    torch.testing.assert_close(sample_shapley(coalition_values(correct[:1], 1.0), ["a", "v"]),
                               torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_three_modality_sample_shapley_matches_the_metric_and_hand_values():
    mods = ["a", "b", "c"]
    subs = coalitions(mods)  # {}, a, b, c, ab, ac, bc, abc
    # right exactly when a is present: v(a)=v(ab)=v(ac)=1, v(abc)=3 (= M), others 0.
    # phi_a = 1/3*1 + 1/6*1 + 1/6*1 + 1/3*(3 - 0) = 5/3; phi_b = 1/3*(3 - v(ac)) = 2/3 = phi_c (sum 3)
    a_only = torch.tensor([[("a" in s) for s in subs]])
    all_right = torch.tensor([[len(s) > 0 for s in subs]])  # phi = 1/3 + 1/3*(3 - 1) = 1 each
    phi = sample_shapley(coalition_values(torch.cat([a_only, all_right]), 3.0), mods)
    torch.testing.assert_close(phi, torch.tensor([[5 / 3, 2 / 3, 2 / 3], [1.0, 1.0, 1.0]], dtype=torch.float64))
    v = coalition_values(a_only, 3.0)[0]
    ref = shapley_values({s: float(v[i]) for i, s in enumerate(subs)}, mods)
    assert [ref[m] for m in mods] == pytest.approx(phi[0].tolist())
    # a literal v(full) = 2 with M = 3: an all-right sample gets 1/3 + 1/3*(2 - 1) = 2/3 -> one copy each
    lit = sample_shapley(coalition_values(all_right, 2.0), mods)
    torch.testing.assert_close(lit, torch.full((1, 3), 2 / 3, dtype=torch.float64))
    assert copy_counts(lit).tolist() == [[1, 1, 1]]


def test_copy_table():
    phi = torch.tensor([1.5, 1.0, 0.5, 0.4, 0.0, -0.1, -0.5])
    # >= 1: 0; (0.4, 1): 1; (-0.1, 0.4]: 2; <= -0.1: 3
    assert copy_counts(phi).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_modality_level_counts():
    # means a 1.25, v 0.5 -> gaps -0.25, 0.5 -> (0.5 + 0.25) * 2/3 = 0.5 of N for v, none for a
    frac = modality_level_copies(torch.tensor([[1.0, 0.5], [1.5, 0.5]]), alpha=1.0)
    torch.testing.assert_close(frac, torch.tensor([0.0, 0.5], dtype=torch.float64))
    # three: means 1, 0.7, 0.4 -> gaps 0, 0.3, 0.6 -> 0, 0.2, 0.4 (x alpha 0.5 -> 0, 0.1, 0.2)
    frac = modality_level_copies(torch.tensor([[1.0, 0.7, 0.4]]), alpha=0.5)
    torch.testing.assert_close(frac, torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64))


class _Data(torch.utils.data.Dataset):
    def __init__(self, mods, n, offset=0.0):
        g = torch.Generator().manual_seed(2)
        self.x = {m: torch.randn(n, 5, generator=g) + offset for m in mods}
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": {m: x[i] for m, x in self.x.items()}, "label": int(self.y[i]), "index": i}


def make_run(mods=("a", "b"), n=12, **kw):
    model = tiny_model(mods)
    method = Valuation(**kw)
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=torch.device("cpu"), num_classes=3)
    run.train_loader = run.make_loader(_Data(mods, n), train=True)
    run.val_loader = run.make_loader(_Data(mods, 5, offset=100.0), train=False)  # marked: inputs near 100
    run.test_loader = run.make_loader(_Data(mods, 5, offset=-100.0), train=False)
    method.setup(run)
    return run


def test_contributions_are_feature_level_coalitions_of_the_eval_model():
    run = make_run(("a", "b", "c"), n=9)
    phi = run.method.contributions(run, run.method.train_dataset)
    assert run.model.training  # the pass runs in eval mode and restores train mode
    model, data = run.model, run.method.train_dataset
    model.eval()
    with torch.no_grad():
        z = model.encode(data.x)
        subs = coalitions(model.modalities)
        for i in range(9):  # the slow reference: one Shapley per sample over feature-zeroed coalitions
            v = {}
            for s in subs:
                if not s:
                    v[s] = 0.0
                    continue
                feats = {m: (z[m][i:i + 1] if m in s else torch.zeros_like(z[m][i:i + 1])) for m in z}
                right = float(model.fuse(feats).argmax(1).item() == data.y[i])
                v[s] = right * (3.0 if len(s) == 3 else 1.0)
            ref = shapley_values(v, model.modalities)
            assert phi[i].tolist() == pytest.approx([ref[m] for m in model.modalities])


def test_warmup_keeps_the_original_loader():
    run = make_run(warmup=2)
    original = run.train_loader
    run.method.on_epoch_start(run, 0)
    run.method.on_epoch_start(run, 1)
    assert run.train_loader is original and run.method.history == []


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_sample_level_rebuild_size_marks_and_only_training_data(mods, monkeypatch):
    run = make_run(mods, n=4, warmup=1)
    original = run.method.train_dataset
    phi = torch.tensor([[1.5, 0.5, 0.0], [0.5, -0.5, 1.0], [1.0, 1.0, 1.0], [0.2, 0.2, -0.2]])[:, :len(mods)]
    monkeypatch.setattr(run.method, "contributions", lambda run, dataset: phi)
    counts = copy_counts(phi)  # 2 mods: [[0,1],[1,3],[0,0],[2,2]] -> 9 copies; 3 mods adds [2,0,0,3] -> 14
    for epoch in (1, 2):  # every epoch wraps the ORIGINAL set, so the size does not compound
        run.method.on_epoch_start(run, epoch)
        data = run.train_loader.dataset
        assert isinstance(data, ValuationDataset) and data.base is original
        assert len(data) == 4 + int(counts.sum()) == (4 + 9 if len(mods) == 2 else 4 + 14)
    items = [data[i] for i in range(len(data))]
    assert all(not any(it["absent"].values()) for it in items[:4])
    per_pair = {}
    for it in items[4:]:
        kept = [m for m in mods if not it["absent"][m]]
        assert len(kept) == 1  # the other modalities are marked absent
        key = (it["index"], mods.index(kept[0]))
        per_pair[key] = per_pair.get(key, 0) + 1
        for m in mods:  # a copy is exactly its training sample (never validation or test data)
            torch.testing.assert_close(it["inputs"][m], original.x[m][it["index"]])
    assert per_pair == {(i, j): int(counts[i, j]) for i in range(4) for j in range(len(mods)) if counts[i, j]}
    # the loader shuffles with the run's settings and yields Batch.absent
    batch = next(iter(run.train_loader))
    assert batch.absent is not None and set(batch.absent) == set(mods)
    assert all(float(x.abs().max()) < 50 for b in run.train_loader for x in b.inputs.values())


def test_modality_level_adds_copies_of_the_weaker_modality_only(monkeypatch):
    run = make_run(n=30, warmup=0, variant="modality", part_ratio=0.2)
    seen = {}

    def fake(run, dataset, indices=None):
        seen["n"] = len(dataset) if indices is None else len(indices)
        return torch.tensor([[1.25, 0.5]]).expand(seen["n"], 2)

    monkeypatch.setattr(run.method, "contributions", fake)
    run.method.on_epoch_start(run, 0)
    data = run.train_loader.dataset
    assert seen["n"] == 6  # 20 % of 30 valued
    assert len(data) == 30 + 15  # int(0.5 * 30) copies keeping b (the weaker), none keeping a
    assert all(data[i]["absent"] == {"a": True, "b": False} for i in range(30, 45))
    assert run.method.history[-1]["copies"] == [0, 15]


def test_forward_zeroes_the_absent_features_per_sample():
    run = make_run()
    x = inputs(n=4)
    absent = {"a": torch.tensor([False, True, False, False]), "b": torch.tensor([False, False, True, False])}
    z = run.model.encode(x)
    out = run.method.forward(run, Batch(x, torch.tensor([0, 1, 2, 0]), torch.arange(4), absent))
    torch.testing.assert_close(out.features["a"][[0, 2, 3]], z["a"][[0, 2, 3]])
    assert (out.features["a"][1] == 0).all() and (out.features["b"][2] == 0).all()
    torch.testing.assert_close(out.features["b"][[0, 1, 3]], z["b"][[0, 1, 3]])
    torch.testing.assert_close(out.logits, run.model.fuse(out.features))
    plain = run.method.forward(run, Batch(x, torch.tensor([0, 1, 2, 0]), torch.arange(4)))
    torch.testing.assert_close(plain.features["a"], z["a"])


def test_the_valuation_pass_keeps_its_loader_and_only_the_resampled_training_set_gets_a_new_one(monkeypatch):
    run = make_run(warmup=0)
    made, original = [], run.make_loader

    def counting(dataset, train, shard=True, indices=None):
        made.append(train)
        return original(dataset, train, shard, indices)

    monkeypatch.setattr(run, "make_loader", counting)
    for epoch in range(3):
        run.method.on_epoch_start(run, epoch)
    # one evaluation loader over the original set for every epoch's valuation; one training loader per new set
    assert made == [False, True, True, True]
    assert run.train_loader.dataset.base is run.method.train_dataset
