"""OPM: drop probabilities, the shared 1/(1 - theta) rescale, the coin, the warm-up, nothing at evaluation."""

from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_model
from mmbalance.data.batch import Batch
from mmbalance.methods.base import Method
from mmbalance.methods.opm import OPM, drop_scale, opm_drop_probabilities


def test_drop_probabilities_by_hand():
    # s_a = 30, s_v = 10: rho_a = 3, r_a = tanh(2) = 0.964028, q_a = 0.5 * (1 + 0.5 * 0.964028) = 0.741007;
    # rho_v = 1/3 -> r_v = 0 -> q_v = 0
    q = opm_drop_probabilities({"a": 30.0, "v": 10.0}, q_base=0.5, lam=0.5)
    assert q["a"] == pytest.approx(0.741007, abs=1e-6) and q["v"] == 0.0
    # three: rho_a = 6 / mean(3, 1) = 3 -> 0.741007; rho_b = 3 / 3.5 < 1 and rho_c = 1 / 4.5 < 1 -> 0
    q = opm_drop_probabilities({"a": 6.0, "b": 3.0, "c": 1.0}, q_base=0.5, lam=0.5)
    assert q == pytest.approx({"a": 0.741007, "b": 0.0, "c": 0.0}, abs=1e-6)
    # clipped: 0.9 * (1 + 0.5 * 0.964028) = 1.3338 -> 1; a tie drops nothing
    assert opm_drop_probabilities({"a": 30.0, "v": 10.0}, q_base=0.9, lam=0.5)["a"] == 1.0
    assert opm_drop_probabilities({"a": 5.0, "v": 5.0}, q_base=0.5, lam=0.5) == {"a": 0.0, "v": 0.0}


def test_shared_rescale_by_hand():
    # theta = (2 * 0.6 + 2 * 0) / 4 = 0.3 -> 1 / 0.7; theta = (1 * 0.6 + 3 * 0) / 4 = 0.15 -> 1 / 0.85
    assert drop_scale({"a": 0.6, "v": 0.0}, {"a": 2, "v": 2}) == pytest.approx(1 / 0.7)
    assert drop_scale({"a": 0.6, "v": 0.0}, {"a": 1, "v": 3}) == pytest.approx(1 / 0.85)


def _setup(epoch=0, p_exe=1.0, warmup=0, n=16):
    """A concat head where modality a predicts the label confidently and b is uniform, so a dominates."""
    model = tiny_model(("a", "b"), classes=3)
    with torch.no_grad():
        model.fusion.fc.weight.zero_()
        model.fusion.fc.bias.zero_()
        lo = model.fusion.slices["a"][0]
        for c in range(3):
            model.fusion.fc.weight[c, lo + c] = 5.0
    y = torch.arange(n) % 3
    feats = {"a": torch.nn.functional.one_hot(y, 4).float(),
             "b": torch.rand(n, 5, generator=torch.Generator().manual_seed(3))}
    model.encode = lambda inputs, absent=(): dict(feats)  # fixed features: the test is about the forward stage
    gen = torch.Generator().manual_seed(7)
    run = SimpleNamespace(model=model, epoch=epoch, reduce=lambda s: s, noise_generator=lambda device: gen,
                          config=None)
    method = OPM(q_base=0.5, lam=0.5, p_exe=p_exe, warmup_epochs=warmup)
    return method, run, Batch({"a": None, "b": None}, y, torch.arange(n)), feats, gen


def test_heads_drops_the_dominant_modality_per_sample_and_rescales_every_modality():
    method, run, batch, feats, _ = _setup()
    out = method.forward(run, batch)
    # s_a = 16 * e^5 / (e^5 + 2), s_b = 16 / 3 -> q_a > 0.5, q_b = 0
    q = opm_drop_probabilities({"a": 16 * 148.413159 / 150.413159, "b": 16 / 3}, 0.5, 0.5)
    assert method.last_q == pytest.approx(q, abs=1e-5) and q["b"] == 0.0 and method.last_executed
    # replay the draws: one coin, then one uniform per sample for modality a (b is never drawn)
    g = torch.Generator().manual_seed(7)
    assert float(torch.rand((), generator=g)) < 1.0
    dropped = torch.rand((16,), generator=g) < q["a"]
    scale = 1 / (1 - (4 * q["a"]) / 9)  # theta = (4 q_a + 5 * 0) / 9
    torch.testing.assert_close(out.features["a"], feats["a"] * (~dropped)[:, None] * scale)
    torch.testing.assert_close(out.features["b"], feats["b"] * scale)
    assert 0 < int(dropped.sum()) < 16  # per sample, not all or nothing
    torch.testing.assert_close(out.logits, run.model.fuse(out.features))
    stats = method.loss(run, batch, out)
    assert float(stats["opm/executed"]) == 1.0 and float(stats["opm/q/b"]) == 0.0


def test_tails_of_the_coin_change_nothing():
    method, run, batch, feats, _ = _setup(p_exe=0.0)
    out = method.forward(run, batch)
    assert not method.last_executed and method.last_q["a"] > 0  # q computed, the coin said no
    for m in feats:
        torch.testing.assert_close(out.features[m], feats[m])


def test_nothing_is_dropped_during_warm_up_or_at_evaluation():
    method, run, batch, feats, gen = _setup(epoch=1, warmup=2)
    state = gen.get_state()
    out = method.forward(run, batch)
    assert not method.last_executed and torch.equal(gen.get_state(), state)  # not even the coin is drawn
    torch.testing.assert_close(out.logits, run.model.fuse(feats))
    run.epoch = 2  # after the warm-up it modulates
    method.forward(run, batch)
    assert method.last_executed
    method, run, batch, feats, _ = _setup()
    run.model.eval()
    out = method.forward(run, batch)
    assert not method.last_executed
    torch.testing.assert_close(out.logits, run.model.fuse(feats))
    assert OPM.eval_fuse is Method.eval_fuse  # predictions never drop or rescale
