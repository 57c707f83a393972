"""CML: nested per-sample removal levels, the calibration hinge by hand, and the loss on a tiny model."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.errors import UserError
from mmbalance.methods.cml import CML, calibration_penalty, removal_levels
from mmbalance.models.multimodal import mask_modalities


class _Ctx:
    """The run context CML's loss reads."""

    def __init__(self, model):
        self.model = model
        self._g = torch.Generator().manual_seed(0)

    def noise_generator(self, device):
        return self._g


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_removal_levels_are_nested_per_sample_orders_down_to_one_modality(mods):
    n = 600
    levels = removal_levels(n, list(mods), torch.Generator().manual_seed(3))
    assert len(levels) == len(mods)  # levels 0..M-1
    absent = torch.stack([torch.stack([lv[m] for m in mods], 1) for lv in levels])  # (L, B, M)
    for k in range(len(mods)):
        assert torch.equal(absent[k].sum(1), torch.full((n,), k))  # exactly k removed, so level M-1 keeps one
    assert not absent[0].any()
    assert (absent[1:] >= absent[:-1]).all()  # nested: whatever level k removes, level k+1 removes too
    # the order is per sample: every one of the M! orders occurs (first removed, second removed, ...)
    order = torch.stack([(absent[k + 1] & ~absent[k]).float().argmax(1) for k in range(len(mods) - 1)], 1)
    seen = {tuple(r) for r in order.tolist()}
    assert seen == {p[:-1] for p in itertools.permutations(range(len(mods)))}
    again = removal_levels(n, list(mods), torch.Generator().manual_seed(3))
    assert all(torch.equal(again[k][m], levels[k][m]) for k in range(len(mods)) for m in mods)


def test_calibration_penalty_by_hand():
    # levels 0 (all modalities) and 1 (one removed), three samples
    conf = torch.tensor([[0.6, 0.5, 0.7],
                         [0.8, 0.4, 0.9]])
    correct = torch.tensor([[True, True, False],
                            [True, False, False]])
    # trick 1 (level 0 right): s0 relu(0.8 - 0.6) = 0.2, s1 relu(0.4 - 0.5) = 0; s2 is wrong at level 0 -> 0
    # trick 2 (both wrong): only s2, relu(0.9 - 0.7) = 0.2            -> R = 0.4
    assert float(calibration_penalty(conf, correct)) == pytest.approx(0.4)
    # with eps = 0.05 each active hinge loses 0.05, masked ones stay relu(-0.05) = 0   -> R = 0.3
    assert float(calibration_penalty(conf, correct, epsilon=0.05)) == pytest.approx(0.3)
    # the peer's batch hinge: relu(0.2 - 0.1 + 0.2) = 0.3, no masks
    assert float(calibration_penalty(conf, correct, hinge="batch")) == pytest.approx(0.3)
    # a rise cancelled by a fall: per sample it is penalised (0.3), at batch level relu(0.3 - 0.3) = 0
    conf = torch.tensor([[0.5, 0.9], [0.8, 0.6]])
    correct = torch.ones(2, 2, dtype=torch.bool)
    assert float(calibration_penalty(conf, correct)) == pytest.approx(0.3)
    assert float(calibration_penalty(conf, correct, hinge="batch")) == pytest.approx(0.0, abs=1e-6)


def test_calibration_penalty_three_levels_sums_both_pairs():
    # levels 0, 1, 2 of one sample, all right: relu(0.7 - 0.6) + relu(0.9 - 0.7) = 0.1 + 0.2
    conf = torch.tensor([[0.6], [0.7], [0.9]])
    assert float(calibration_penalty(conf, torch.ones(3, 1, dtype=torch.bool))) == pytest.approx(0.3)


def test_trick_one_pushes_both_levels_trick_two_only_the_reduced_one():
    conf = torch.tensor([[0.6, 0.7], [0.8, 0.9]], requires_grad=True)
    correct = torch.tensor([[True, False], [True, False]])  # sample 0: trick 1; sample 1: trick 2
    calibration_penalty(conf, correct).backward()
    # d/dconf of (c1 - c0) for sample 0 = (-1, +1); trick 2 detaches the fuller level: (0, +1)
    torch.testing.assert_close(conf.grad, torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_cml_loss_is_mean_level_ce_plus_lambda_times_the_hinge(mods):
    model = tiny_model(mods)
    x, y = inputs(mods, n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method = CML(lam=0.3)
    out = model(x)
    losses = method.loss(_Ctx(model), Batch(x, y, torch.arange(8)), out)
    # replay the same draws: level k zeroes the features of each sample's first k modalities
    levels = removal_levels(8, list(mods), torch.Generator().manual_seed(0))
    logits = [model.fuse(mask_modalities(out.features, lv)) for lv in levels]
    torch.testing.assert_close(logits[0], out.logits)
    # on the concat head, removing r is the peer's logit subtraction z - W_r h_r
    r = mods[0]
    only_r = {m: levels[1][m] & (m == r) for m in mods}
    w_r = model.fusion.weight_block(r)
    expected = out.logits - (out.features[r] @ w_r.t()) * only_r[r][:, None]
    torch.testing.assert_close(model.fuse(mask_modalities(out.features, only_r)), expected)
    ce = sum(F.cross_entropy(z, y) for z in logits) / len(mods)
    conf, pred = torch.softmax(torch.stack(logits), -1).max(-1)
    penalty = calibration_penalty(conf, pred == y)
    torch.testing.assert_close(losses["ce"], ce)
    torch.testing.assert_close(losses["penalty"], penalty)
    torch.testing.assert_close(losses["loss"], ce + 0.3 * penalty)


def test_model_removal_goes_through_the_models_own_masking():
    mods = ("a", "b")
    model = tiny_model(mods)
    x, y = inputs(mods, n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method = CML(removal="model")
    out = model(x)
    got = method.level_logits(_Ctx(model), Batch(x, y, torch.arange(8)), out)
    levels = removal_levels(8, list(mods), torch.Generator().manual_seed(0))
    torch.testing.assert_close(got[1], model(x, absent=levels[1]).logits)


def test_cml_refuses_one_modality_and_unknown_options():
    from conftest import compose_cfg
    from mmbalance.train import build_run

    with pytest.raises(UserError, match="^method cml balances modalities against each other, so it needs at least two"):
        build_run(compose_cfg(["method=cml", "~dataset.modalities.visual"]), torch.device("cpu"))
    with pytest.raises(UserError, match="method.hinge"):
        CML(hinge="mean")
    with pytest.raises(UserError, match="method.removal"):
        CML(removal="input")
