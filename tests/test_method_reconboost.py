"""ReconBoost: reconcilement weights and loss, the stage schedule, the ensemble prediction, phases and resume."""

import contextlib
import math

import pytest
import torch

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.errors import UserError
from mmbalance.methods.reconboost import (
    ReconBoost,
    lr_factor,
    phase_at,
    reconcilement_loss,
    reconcilement_weights,
)
from test_methods import assert_same_state

LN3 = math.log(3.0)


def test_reconcilement_weights_and_loss_by_hand():
    label = torch.tensor([0, 0])
    others = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    # beta = 1: q_y = softmax(0, 0)[0] = 1/2 and softmax(ln 3, 0)[0] = 3/4; C = 2, w1 = 5, w2 = 1
    # weights = (5 - 0.5) / 2 = 2.25 and (5 - 0.75) / 2 = 2.125
    w = reconcilement_weights(others, 1.0, label, 5.0, 1.0, 2)
    torch.testing.assert_close(w, torch.tensor([2.25, 2.125]))
    # beta = 2: softmax(2 ln 3, 0)[0] = 9 / 10 -> (5 - 0.9) / 2 = 2.05
    assert float(reconcilement_weights(others[1:], 2.0, label[1:], 5.0, 1.0, 2)) == pytest.approx(2.05)
    # no other learner: q_y = 1 (the official scalar ensemble) -> (5 - 1) / 2 = 2
    torch.testing.assert_close(reconcilement_weights(None, 1.0, label, 5.0, 1.0, 2), torch.tensor([2.0, 2.0]))
    # f_m = 0 -> -log p_y = ln 2 for both samples: loss = mean(2.25, 2.125) * ln 2 = 2.1875 ln 2
    loss = reconcilement_loss(torch.zeros(2, 2), w, label)
    assert float(loss) == pytest.approx(2.1875 * math.log(2.0))


def test_reconcilement_loss_equals_the_official_one_hot_form():
    g = torch.Generator().manual_seed(0)
    f_m, others = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y, beta = torch.tensor([0, 3, 1, 2, 3]), 0.7
    onehot = torch.nn.functional.one_hot(y, 4).float()
    log_p, q = f_m.log_softmax(1), (beta * others).softmax(1)
    official = (-5.0 * (onehot * log_p).mean(-1) + 1.0 * (onehot * q * log_p).mean(-1)).mean()
    w = reconcilement_weights(others, beta, y, 5.0, 1.0, 4)
    torch.testing.assert_close(reconcilement_loss(f_m, w, y), official)


def test_stage_schedule_over_epochs():
    two = [phase_at(e, ["a", "v"], 4, 4) for e in range(18)]
    # stage 0: epochs 0-3 boost a, 4-7 rectify; stage 1: 8-11 boost v, 12-15 rectify; stage 2: 16- boost a
    assert [(p.stage, p.kind, p.modality) for p in two[:1] + two[3:5] + two[7:9] + two[12:13] + two[16:17]] == [
        (0, "boost", "a"), (0, "boost", "a"), (0, "rectify", "a"), (0, "rectify", "a"), (1, "boost", "v"),
        (1, "rectify", "v"), (2, "boost", "a")]
    three = [(p.kind, p.modality) for p in (phase_at(e, ["a", "b", "c"], 1, 1) for e in range(7))]
    assert three == [("boost", "a"), ("rectify", "a"), ("boost", "b"), ("rectify", "b"), ("boost", "c"),
                     ("rectify", "c"), ("boost", "a")]
    assert [phase_at(e, ["a", "b"], 0, 2).kind for e in range(3)] == ["rectify"] * 3
    with pytest.raises(UserError, match="boost_epochs"):
        ReconBoost(boost_epochs=0, correct_epochs=0)


class _Ctx:
    """The run context a ReconBoost step reads."""

    def __init__(self, mods=("a", "b"), fusion="concat", lr=0.1):
        self.model = tiny_model(mods, fusion=fusion, classes=3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.device, self.num_classes, self.epoch = torch.device("cpu"), 3, 0
        self.batch = Batch(inputs(mods, n=6), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))

    def autocast(self):
        return contextlib.nullcontext()

    def sync_gradients(self, params=None):  # one process: nothing to average
        pass

    def clip_gradients(self, params=None):
        pass

    zero_grad = Run.zero_grad  # the run's own update helpers, as the method calls them
    optimizer_step = Run.optimizer_step


def _method(ctx, **kw):
    method = ReconBoost(boost_epochs=1, correct_epochs=1, **kw)
    method.setup(ctx)
    return method


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_ensemble_prediction_is_beta_times_the_sum_of_the_learners(fusion):
    ctx = _Ctx(("a", "b", "c"), fusion=fusion)
    method = _method(ctx)
    with torch.no_grad():
        method.beta.fill_(0.5)
    ctx.model.eval()
    z = ctx.model.encode(ctx.batch.inputs)
    logits, unimodal = method.eval_fuse(ctx, z)
    head = ctx.model.fusion
    if fusion == "concat":  # f_m = z_m W_m^T + b / 3
        expected = {m: z[m] @ head.weight_block(m).t() + head.fc.bias / 3 for m in z}
        torch.testing.assert_close(logits, 0.5 * ctx.model.fuse(z))
    else:
        expected = {m: head.heads[m](z[m]) for m in z}
    for m in z:
        torch.testing.assert_close(unimodal[m], expected[m])
    torch.testing.assert_close(logits, 0.5 * (expected["a"] + expected["b"] + expected["c"]))


def test_boost_phase_trains_only_that_learner_with_the_reconcilement_loss():
    ctx = _Ctx()
    method = _method(ctx, weight_decay=0.5)
    model = ctx.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    beta0 = float(method.beta.detach())
    # the loss the step minimises, recomputed from the same train-mode forward (BN batch statistics)
    with torch.no_grad():
        z = model.encode(ctx.batch.inputs)
        f = model.unimodal_logits(z)
        w = reconcilement_weights(f["b"], beta0, ctx.batch.label, 5.0, 1.0, 3)
        expected = reconcilement_loss(f["a"], w, ctx.batch.label)
    bn_b = model.encoders["b"].net[1].running_mean.clone()
    stats = method.training_step(ctx, ctx.batch)
    torch.testing.assert_close(stats["loss"], expected)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any(n.startswith("encoders.a.") for n in moved)
    assert not any(n.startswith("encoders.b.") for n in moved)
    lo, hi = model.fusion.slices["a"]
    w_now = model.fusion.fc.weight.detach()
    assert not torch.equal(w_now[:, lo:hi], before["fusion.fc.weight"][:, lo:hi])
    # b's slice is not b's learner: not even weight decay touches it
    assert torch.equal(w_now[:, hi:], before["fusion.fc.weight"][:, hi:])
    assert "fusion.fc.bias" in moved and float(method.beta.detach()) == beta0
    # the other learner forwards in train mode (no grad), so its BatchNorm statistics move, as officially
    assert not torch.equal(model.encoders["b"].net[1].running_mean, bn_b)


def test_rectify_phase_trains_every_learner_and_beta_with_a_fresh_optimizer():
    ctx = _Ctx(("a", "b", "c"))
    method = _method(ctx)
    method.training_step(ctx, ctx.batch)
    boost_opt = method._optimizer
    ctx.epoch = 1  # stage 0, rectify
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    beta0 = float(method.beta.detach())
    stats = method.training_step(ctx, ctx.batch)
    assert method._optimizer is not boost_opt and method._phase_key == (0, "rectify")
    assert all(not torch.equal(before[n], p.detach()) for n, p in ctx.model.named_parameters()
               if n.endswith("weight") and ".net.1." not in n)
    assert float(method.beta.detach()) != beta0 and "rectify_loss" in stats


def test_phase_learning_rate_follows_the_run_scheduler():
    ctx = _Ctx()
    method = _method(ctx, m_lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(ctx.optimizer, step_size=1, gamma=0.1)
    assert lr_factor(ctx.optimizer) == pytest.approx(1.0)
    ctx.optimizer.step()
    sched.step()
    method.training_step(ctx, ctx.batch)
    assert method._optimizer.param_groups[0]["lr"] == pytest.approx(0.002)  # 0.02 * 0.1


def test_resume_mid_phase_restores_momentum_beta_and_phase():
    straight = _Ctx()
    a = _method(straight)
    ctx = _Ctx()
    b = _method(ctx)
    ctx.epoch = straight.epoch = 1  # rectify (beta trains)
    for _ in range(2):
        a.training_step(straight, straight.batch)
    b.training_step(ctx, ctx.batch)
    state, model_state = b.state_dict(), {k: v.clone() for k, v in ctx.model.state_dict().items()}
    resumed = _Ctx()
    c = _method(resumed)
    c.load_state_dict(state)
    resumed.model.load_state_dict(model_state)
    assert_same_state(c.state_dict(), state)
    resumed.epoch = 1
    c.training_step(resumed, resumed.batch)
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    torch.testing.assert_close(a.beta, c.beta)
    # a state from another phase is not loaded into a new one: that phase starts fresh
    d_ctx = _Ctx()
    d = _method(d_ctx)
    d.load_state_dict(state)
    d_ctx.epoch = 2  # stage 1, boost b
    d.training_step(d_ctx, d_ctx.batch)
    assert d._phase_key == (1, "boost") and d._pending is None
    assert len(d._optimizer.param_groups[0]["params"]) < len(list(d_ctx.model.parameters()))


def test_refuses_a_fusion_without_per_modality_blocks_and_a_single_modality():
    with pytest.raises(UserError):
        _method(_Ctx(fusion="gated"))
    from conftest import compose_cfg  # one modality: the run refuses it before the model (and setup) exist
    from mmbalance.train import build_run

    with pytest.raises(UserError, match="^method reconboost balances modalities against each other, so it needs at"):
        build_run(compose_cfg(["method=reconboost", "~dataset.modalities.visual"]), torch.device("cpu"))


def test_a_run_optimizer_it_never_steps_is_named_in_a_warning(caplog):
    from conftest import compose_cfg
    from test_methods import make_run

    with caplog.at_level("WARNING", logger="mmbalance"):
        make_run(compose_cfg(["dataset=synthetic", "method=reconboost", "optimizer=adam"]))
    assert "reconboost trains with its own SGD per phase (method.m_lr=0.01, method.e_lr=0.01" in caplog.text
    assert "the optimizer group's Adam (lr 0.001) is not used" in caplog.text
