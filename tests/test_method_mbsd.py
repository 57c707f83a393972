"""MBSD (BB adaptation, defects fixed): per-sample weights, correct-by-either mask, a true KL from the stronger
to the weaker modality, on hand-checked numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from mmbalance.data.batch import Batch
from mmbalance.errors import UserError
from mmbalance.methods.mbsd import MBSD, pair_terms
from mmbalance.models.multimodal import Output
from mmbalance.train import build_run
from test_methods import make_run

L3, L15, L4 = math.log(3.0), math.log(1.5), math.log(4.0)
# sample 0 (y=0): p_j = [.75, .25] (correct), p_k = [.5, .5]   -> q .75 vs .5, w = .25, j strong
# sample 1 (y=0): p_j = [.25, .75], p_k = [.4, .6] (both wrong) -> w = 0 (masked), k strong (q .4 > .25)
# sample 2 (y=1): p_j = [.5, .5] (argmax 0: wrong), p_k = [.2, .8] (correct) -> w = .3, k strong
Z_J = torch.tensor([[L3, 0.0], [0.0, L3], [0.0, 0.0]])
Z_K = torch.tensor([[0.0, 0.0], [0.0, L15], [0.0, L4]])
Y = torch.tensor([0, 0, 1])
# KL(p_s || p_w): .75 ln(.75/.5) + .25 ln(.25/.5) = .304099 - .173287 = .130812
#                 .4 ln(.4/.25) + .6 ln(.6/.75)   = .188001 - .133886 = .054115
#                 .2 ln(.2/.5) + .8 ln(.8/.5)     = -.183258 + .376003 = .192745
KL = [0.130812, 0.054115, 0.192745]
# RS = mean_c (p_s - p_w)^2: (.0625 + .0625)/2 = .0625; (.0225 + .0225)/2 = .0225; (.09 + .09)/2 = .09
RS = [0.0625, 0.0225, 0.09]
W = [0.25, 0.0, 0.3]


def test_pair_terms_by_hand():
    t = pair_terms(Z_J, Z_K, Y)
    torch.testing.assert_close(t["weight"], torch.tensor(W))
    assert t["active"].tolist() == [True, False, True]
    torch.testing.assert_close(t["kl"], torch.tensor(KL), atol=1e-6, rtol=0)
    torch.testing.assert_close(t["rs"], torch.tensor(RS), atol=1e-6, rtol=0)
    # symmetric in the pair order: the stronger side is chosen per sample
    t2 = pair_terms(Z_K, Z_J, Y)
    torch.testing.assert_close(t2["kl"], t["kl"])
    # a true divergence: zero when both predict the same (the peer's kl_div(ps, pw) is pw*(log pw - ps) != 0)
    same = pair_terms(Z_J, Z_J.clone(), Y)
    assert torch.equal(same["weight"], torch.zeros(3)) and same["kl"].abs().max() < 1e-6


def test_only_the_weaker_side_gets_distillation_gradients_and_the_weights_are_detached():
    zj, zk = Z_J.clone().requires_grad_(), Z_K.clone().requires_grad_()
    t = pair_terms(zj, zk, Y)
    assert not t["weight"].requires_grad
    (t["weight"] * (t["kl"] + t["rs"])).sum().backward()
    assert torch.equal(zj.grad[0], torch.zeros(2)) and zj.grad[2].abs().sum() > 0  # j strong on 0, weak on 2
    assert torch.equal(zk.grad[2], torch.zeros(2)) and zk.grad[0].abs().sum() > 0
    assert torch.equal(zj.grad[1], torch.zeros(2)) and torch.equal(zk.grad[1], torch.zeros(2))  # masked sample


def test_loss_two_modalities_by_hand():
    out = Output(Z_J + Z_K, {}, unimodal={"a": Z_J, "b": Z_K})
    losses = MBSD().loss(None, Batch({}, Y, torch.arange(3)), out)
    kl = sum(w * k for w, k in zip(W, KL)) / 3   # (.25*.130812 + .3*.192745)/3 = .0301755
    rs = sum(w * r for w, r in zip(W, RS)) / 3   # (.25*.0625 + .3*.09)/3 = .0142083
    assert float(losses["kl"]) == pytest.approx(0.0301755, abs=1e-6) == pytest.approx(kl, abs=1e-6)
    assert float(losses["rs"]) == pytest.approx(0.0142083, abs=1e-6) == pytest.approx(rs, abs=1e-6)
    ce = F.cross_entropy(Z_J + Z_K, Y) + F.cross_entropy(Z_J, Y) + F.cross_entropy(Z_K, Y)
    assert float(losses["loss"]) == pytest.approx(float(ce) + kl + rs, abs=1e-6)
    assert float(losses["active_fraction"]) == pytest.approx(2 / 3)
    weighted = MBSD(kl_weight=2.0, rs_weight=0.0).loss(None, Batch({}, Y, torch.arange(3)), out)
    assert float(weighted["loss"]) == pytest.approx(float(ce) + 2 * kl, abs=1e-6)


def test_three_modalities_average_the_three_pairs():
    z_c = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 0.5]])
    uni = {"a": Z_J, "b": Z_K, "c": z_c}
    losses = MBSD().loss(None, Batch({}, Y, torch.arange(3)), Output(Z_J + Z_K + z_c, {}, unimodal=uni))
    pairs = [pair_terms(uni[j], uni[k], Y) for j, k in (("a", "b"), ("a", "c"), ("b", "c"))]
    expected = sum((t["weight"] * t["kl"]).mean() for t in pairs) / 3
    torch.testing.assert_close(losses["kl"], expected)
    assert {"ce/a", "ce/b", "ce/c"} <= set(losses)


def test_needs_two_modalities_and_per_modality_logits():
    with pytest.raises(UserError, match="^method mbsd balances modalities against each other, so it needs at least"):
        build_run(compose_cfg(["method=mbsd", "~dataset.modalities.visual"]), torch.device("cpu"))
    with pytest.raises(UserError, match="per-modality logits"):
        make_run(compose_cfg(["method=mbsd", "backbone.fusion=film"]))
