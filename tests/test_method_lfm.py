"""LFM: the fitted schedule, the JS modality-gap term, the loss, and the learnable variant's hyper-step."""

import math

import pytest
import torch

from conftest import THREE, compose_cfg
from mmbalance.data.batch import Batch
from mmbalance.methods.lfm import LFM, js_divergence, modality_gap, scheduled_ce_weight
from mmbalance.models.fusion import ConcatFusion
from test_methods import make_run

LN3 = math.log(3.0)
# p = [.75, .25] vs q = [.25, .75]: m = [.5, .5]; KL(p||m) = .75 ln 1.5 + .25 ln .5 = 0.304099 - 0.173287 = 0.130812
JS_PQ = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_scheduled_weights_at_given_epochs():
    assert scheduled_ce_weight(0) == pytest.approx(0.204623704)
    # e=20: 0.204623704 + 0.0670945454 + 0.0491958228 - 0.0234357933 + 0.0035813678 - 0.0001727096 = 0.3008869371
    assert scheduled_ce_weight(20) == pytest.approx(0.3008869371)
    assert scheduled_ce_weight(183) == 1.0  # raw 1.0105: clamped, so the gap weight never goes negative
    assert scheduled_ce_weight(250) == 0.0  # raw -2.31 beyond the fitted range
    assert scheduled_ce_weight(7, schedule_epochs=70) == pytest.approx(scheduled_ce_weight(20))
    method = LFM()
    ce, gap = method.weights(20)
    assert ce + gap == pytest.approx(1.0) and gap == pytest.approx(1 - 0.3008869371)


def _fusion(mods):
    """Concat head over 1-d features whose slices give a: [ln3, 0], v: [0, ln3] (c like a) at feature 1."""
    fusion = ConcatFusion({m: 1 for m in mods}, 2)
    rows = {"a": [LN3, 0.0], "v": [0.0, LN3], "c": [LN3, 0.0]}
    with torch.no_grad():
        fusion.fc.weight.copy_(torch.tensor([rows[m] for m in mods]).t())
        fusion.fc.bias.zero_()
    return fusion


@torch.no_grad()
def test_modality_gap_on_given_features():
    fusion = _fusion(["a", "v"])
    feats = {"a": torch.ones(2, 1), "v": torch.ones(2, 1)}
    uni = fusion.unimodal_logits(feats)  # softmax: a -> [.75, .25], v -> [.25, .75]
    assert float(modality_gap(uni)) == pytest.approx(JS_PQ, abs=1e-6)  # 0.130812
    assert float(js_divergence(uni["a"], uni["a"])) == pytest.approx(0.0, abs=1e-7)
    # three modalities: mean over pairs (a,v)=0.130812, (a,c)=0, (v,c)=0.130812 -> 0.087208
    fusion3 = _fusion(["a", "v", "c"])
    uni3 = fusion3.unimodal_logits({m: torch.ones(1, 1) for m in ("a", "v", "c")})
    assert float(modality_gap(uni3)) == pytest.approx(2 * JS_PQ / 3, abs=1e-6)


def test_loss_is_scaled_weighted_ce_of_averaged_logits_plus_gap():
    fusion = _fusion(["a", "v"])
    feats = {"a": torch.ones(1, 1), "v": torch.ones(1, 1)}
    with torch.no_grad():
        logits, uni = fusion(feats), fusion.unimodal_logits(feats)  # fused [ln3, ln3]; mean [ln3/2, ln3/2]
    ce, gap = LFM().terms(logits, uni, torch.tensor([0]))
    assert float(ce) == pytest.approx(math.log(2.0), abs=1e-6) and float(gap) == pytest.approx(JS_PQ, abs=1e-6)
    # epoch 0: 2 * (0.204623704 * 0.693147 + 0.795376296 * 0.130812) = 2 * (0.141834 + 0.104045) = 0.491758
    method = LFM()
    run = type("R", (), {"epoch": 0})()
    out = type("O", (), {"logits": logits, "unimodal": uni})()
    loss = method.loss(run, Batch(feats, torch.tensor([0]), torch.tensor([0])), out)["loss"]
    assert float(loss.detach()) == pytest.approx(0.491758, abs=1e-5)
    # "head" keeps the fusion output: CE([ln3, ln3]) is still ln 2 here, but the logits are not halved
    ce_head, _ = LFM(fused_logits="head").terms(torch.tensor([[2.0, 0.0]]), uni, torch.tensor([0]))
    assert float(ce_head) == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)


@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
def test_learnable_weights_are_parameters_that_move_and_clip(three):
    cfg = compose_cfg(["method=lfm", "method.weighting=learnable", "method.alpha_lr=10.0",
                       *(THREE if three else [])])
    run = make_run(cfg)
    method = run.method
    align = method.alpha.align
    assert isinstance(align, torch.nn.Parameter) and float(align) == pytest.approx(0.95)
    assert method.weights(0) == pytest.approx((0.05, 0.95))
    before = {n: t.detach().clone() for n, t in run.model.state_dict().items()}
    a = method.hyper_step(run, 0)
    assert a != 0.0
    expected = min(max(0.95 - 10.0 * a, 0.05), 0.95)
    assert float(align) == pytest.approx(expected, abs=1e-6) and float(align) != pytest.approx(0.95)
    # the hyper-step moves only alpha: no weight and no BatchNorm statistic of the model changes
    assert all(torch.equal(before[n], t) for n, t in run.model.state_dict().items())
    assert method.state_dict()["modules"]["alpha"]["align"] == align.detach()
    # and a training step still trains with the new weights
    assert torch.isfinite(method.training_step(run, next(iter(run.train_loader)))["loss"])


def test_learnable_holds_out_training_samples_and_halves_its_rate():
    run = make_run(compose_cfg(["method=lfm", "method.weighting=learnable"]))
    method = run.method
    n = len(run.train_loader.dataset.dataset)
    train_idx = set(torch.cat([b.index for b in run.train_loader]).tolist())
    held = set(method.holdout_indices.tolist())
    assert len(held) == 16 and not train_idx & held and len(train_idx) == n - 16
    assert set(method.hyper_batch.index.tolist()) <= held and len(method.hyper_batch.label) == 8
    assert [method.alpha_lr_at(e) for e in (0, 19, 20, 40, 60)] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5])


def test_scheduled_lfm_keeps_the_whole_training_split():
    run = make_run(compose_cfg(["method=lfm"]))
    assert run.method.alpha is None and not hasattr(run.method, "hyper_batch")
    assert type(run.train_loader.dataset).__name__ != "Subset"
