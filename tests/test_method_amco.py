"""AMCo's pieces on hand-checked numbers: the sine ramp over epochs and steps, the M-dependent dependence
threshold, the softmax shares, the per-sample feature mask, and that only the dependent modality is masked."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.methods.amco import (AMCo, dependence_threshold, dependent_modality, feature_mask, mask_ratio,
                                    softmax_shares)


def test_mask_ratio_is_a_sine_ramp_capped_at_max_ratio():
    # p = 0.5 * sin(pi/2 * min(l, 2) / 2)
    assert mask_ratio(-0.5, 2.0, 0.5) == 0.0  # before the window
    assert mask_ratio(0.0, 2.0, 0.5) == 0.0
    assert mask_ratio(1.0, 2.0, 0.5) == pytest.approx(0.5 * math.sqrt(0.5))  # sin(pi/4) = 0.70711 -> 0.35355
    assert mask_ratio(2.0, 2.0, 0.5) == pytest.approx(0.5)
    assert mask_ratio(7.0, 2.0, 0.5) == pytest.approx(0.5)
    assert mask_ratio(0.3, 0.0, 0.4) == 0.4  # no ramp


class _Loader:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_ramp_advances_per_step_within_an_epoch():
    method = AMCo(max_ratio=0.5, ramp_epochs=2.0, modulation_starts=1)
    run = Run(model=None, method=method, optimizer=None, scheduler=None, train_loader=_Loader(4), val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=3)
    run.epoch, run.step = 2, 10
    method.on_epoch_start(run, 2)
    run.step = 12  # 2 of 4 steps done: progress = (2 - 1) + 2/4 = 1.5
    assert method.progress(run) == pytest.approx(1.5)
    # p = 0.5 * sin(pi/2 * 0.75) = 0.5 * 0.9238795
    assert mask_ratio(method.progress(run), 2.0, 0.5) == pytest.approx(0.46193977)
    run.epoch = 0  # before the window: nothing masked
    assert mask_ratio(method.progress(run), 2.0, 0.5) == 0.0


def test_dependence_threshold_depends_on_the_number_of_modalities():
    assert dependence_threshold(2) == 0.5  # the third-party sigma
    assert dependence_threshold(3) == pytest.approx(1 / 3)
    assert dependence_threshold(3, margin=0.1) == pytest.approx(0.4333333)


def test_softmax_shares_over_the_concatenated_unimodal_logits():
    # one sample, C = 2: concat [ln 3, ln 3, 0, 0] -> exp [3, 3, 1, 1] / 8 -> shares a 6/8, v 2/8
    o = {"a": torch.tensor([[math.log(3), math.log(3)]]), "v": torch.zeros(1, 2)}
    torch.testing.assert_close(softmax_shares(o), torch.tensor([0.75, 0.25]))
    # two samples sum: the second has equal logits everywhere -> 0.5 each; sums 1.25, 0.75
    o2 = {m: torch.cat([x, torch.zeros(1, 2)]) for m, x in o.items()}
    torch.testing.assert_close(softmax_shares(o2), torch.tensor([1.25, 0.75]))


def test_dependent_modality_is_the_largest_share_above_the_threshold():
    assert dependent_modality({"a": 0.75, "v": 0.25}) == "a"
    assert dependent_modality({"a": 0.3, "v": 0.7}) == "v"
    assert dependent_modality({"a": 0.5, "v": 0.5}) is None  # a tie masks nobody
    assert dependent_modality({"a": 0.40, "b": 0.35, "c": 0.25}) == "a"  # 0.40 > 1/3; b too, but only one
    assert dependent_modality({"a": 0.40, "b": 0.35, "c": 0.25}, margin=0.1) is None  # 0.40 < 0.4333


def test_feature_mask_zeroes_exactly_floor_ratio_d_per_sample_and_rescales():
    g = torch.Generator().manual_seed(0)
    mask = feature_mask(6, 10, 0.35, g)  # k = floor(3.5) = 3 zeros per row; kept entries 10 / 7
    assert ((mask == 0).sum(1) == 3).all()
    torch.testing.assert_close(mask[mask != 0], torch.full(((10 - 3) * 6,), 10 / 7))
    assert len({tuple(r.tolist()) for r in (mask == 0)}) > 1  # each sample its own positions
    plain = feature_mask(2, 4, 0.5, g, rescale=False)
    assert sorted(plain[0].tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert (feature_mask(3, 4, 0.0, g) == 1).all()
    assert ((feature_mask(1, 4, 0.99, g) == 0).sum() == 3)  # never the whole representation


def make_run(mods=("a", "b"), **kw):
    model = tiny_model(mods)
    method = AMCo(**kw)
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=torch.device("cpu"), num_classes=3)
    method.setup(run)
    return run


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_only_the_dependent_modality_is_masked_and_the_loss_co_optimises(mods):
    run = make_run(mods, max_ratio=0.5, ramp_epochs=2.0)
    model = run.model
    with torch.no_grad():  # make "a" dominate the softmax mass: its weight block x 50
        lo, hi = model.fusion.slices["a"]
        model.fusion.fc.weight[:, lo:hi] *= 50
    x = inputs(mods, n=8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batch = Batch(x, y, torch.arange(8))
    run.epoch = 5  # past the ramp: ratio 0.5 -> k = floor(0.5 * 4) = 2 of a's 4 features, kept x 2
    z = model.encode(x)
    out = run.method.forward(run, batch)
    assert run.method.last["dependent"] == "a"
    expected = feature_mask(8, 4, 0.5, torch.Generator().manual_seed(run.seed + 12345))  # the run's noise draw
    torch.testing.assert_close(out.features["a"], z["a"] * expected)
    for m in mods[1:]:
        torch.testing.assert_close(out.features[m], z[m])
    torch.testing.assert_close(out.logits, model.fuse(out.features))
    losses = run.method.loss(run, batch, out)
    uni = model.unimodal_logits(out.features)  # the shared head's blocks on the masked features
    want = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(uni[m], y) for m in mods)
    torch.testing.assert_close(losses["loss"], want)
    assert float(losses["dependent/a"]) == 1.0 and float(losses["mask_ratio"]) == pytest.approx(0.5)


def test_outside_the_window_it_is_the_fused_ce_without_masking():
    run = make_run(modulation_starts=3)
    x = inputs(n=8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z = run.model.encode(x)
    out = run.method.forward(run, Batch(x, y, torch.arange(8)))
    torch.testing.assert_close(out.features["a"], z["a"])
    losses = run.method.loss(run, Batch(x, y, torch.arange(8)), out)
    assert set(losses) == {"loss"}
    torch.testing.assert_close(losses["loss"], F.cross_entropy(out.logits, y))



def test_a_one_epoch_window_is_fine():  # an empty one is refused: test_methods.py, for every windowed method
    assert AMCo(modulation_starts=2, modulation_ends=2).in_window(2)
