"""Exact Shapley values and the imbalance score, against hand-computed numbers and a naive 2^M computation."""

import itertools

import pytest
import torch

from mmbalance.engine.evaluation import evaluate
from mmbalance.metrics.shapley import coalitions, imbalance_score, shapley_values

from helpers import inputs, tiny_model


def v(d):
    return {frozenset(k): val for k, val in d.items()}


def test_two_player_shapley_by_hand():
    # v(0)=0.1, v(a)=0.7, v(b)=0.3, v(ab)=0.9
    # phi_a = 1/2 (0.7-0.1) + 1/2 (0.9-0.3) = 0.6 ; phi_b = 1/2 (0.3-0.1) + 1/2 (0.9-0.7) = 0.2
    phi = shapley_values(v({(): 0.1, ("a",): 0.7, ("b",): 0.3, ("a", "b"): 0.9}), ["a", "b"])
    assert phi == pytest.approx({"a": 0.6, "b": 0.2})
    assert imbalance_score(phi) == pytest.approx(0.4)


def test_three_player_shapley_by_hand():
    values = v({(): 0.0, ("a",): 0.6, ("b",): 0.3, ("c",): 0.0, ("a", "b"): 0.9, ("a", "c"): 0.6,
                ("b", "c"): 0.3, ("a", "b", "c"): 0.9})
    # c is a null player; a and b are additive: phi_a = 0.6, phi_b = 0.3, phi_c = 0
    phi = shapley_values(values, ["a", "b", "c"])
    assert phi == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.0})
    # (|0.6-0.3| + |0.6-0| + |0.3-0|) / 3 = 0.4
    assert imbalance_score(phi) == pytest.approx(0.4)


def test_three_player_with_interaction_by_hand():
    values = v({(): 0.0, ("a",): 0.0, ("b",): 0.0, ("c",): 0.0, ("a", "b"): 0.6, ("a", "c"): 0.0,
                ("b", "c"): 0.0, ("a", "b", "c"): 0.6})
    # a and b only work together: weights for |S|=1 are 1/6 each, |S|=2 are 1/3
    # phi_a = 1/6*(v(ab)-v(b)) + 1/3*(v(abc)-v(bc)) = 0.1 + 0.2 = 0.3
    assert shapley_values(values, ["a", "b", "c"]) == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.0})


def test_imbalance_is_undefined_for_one_modality_and_pairwise_mean_for_four():
    assert imbalance_score({"a": 0.5}) is None
    assert imbalance_score({"a": 0.4, "b": 0.2, "c": 0.1, "d": 0.1}) == pytest.approx((0.2 + 0.3 + 0.3 + 0.1 + 0.1 + 0) / 6)


def test_coalitions_are_all_subsets():
    subsets = coalitions(["a", "b", "c"])
    assert len(subsets) == 8 and subsets[0] == frozenset() and subsets[-1] == frozenset("abc")


class _Run:
    """The part of the run context that evaluate() reads."""

    def __init__(self, model, loader):
        from mmbalance.methods.baseline import Baseline

        self.model, self.method, self.device, self.num_classes = model, Baseline(), torch.device("cpu"), 3
        self.test_loader = loader

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _loader(mods, n=40, batch=16):
    from mmbalance.data.batch import Batch

    x = inputs(mods, n)
    y = torch.arange(n) % 3
    return [Batch({m: t[i:i + batch] for m, t in x.items()}, y[i:i + batch], torch.arange(i, min(i + batch, n)))
            for i in range(0, n, batch)]


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("masking", ["input", "feature"])
def test_evaluate_equals_a_naive_pass_per_coalition(mods, masking):
    model = tiny_model(mods, masking=masking, classes=3).eval()
    loader = _loader(mods)
    out = evaluate(_Run(model, loader), loader, "test", shapley=True)
    naive = {}
    with torch.no_grad():
        for s in coalitions(mods):
            absent = [m for m in mods if m not in s]
            correct = sum(int((model(b.inputs, absent=absent).logits.argmax(1) == b.label).sum()) for b in loader)
            naive[s] = correct / 40
    phi = shapley_values(naive, mods)
    for m in mods:
        assert out[f"test/shapley/{m}"] == pytest.approx(phi[m], abs=1e-12)
    # efficiency: the contributions add up to v(all) - v(empty)
    assert sum(out[f"test/shapley/{m}"] for m in mods) == pytest.approx(out["test/acc"] - out["test/value/empty"])
    assert out["test/acc"] == pytest.approx(naive[frozenset(mods)])
    pairs = list(itertools.combinations([phi[m] for m in mods], 2))
    assert out["test/imbalance"] == pytest.approx(sum(abs(a - b) for a, b in pairs) / len(pairs))
