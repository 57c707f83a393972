"""MMPareto: the combined gradient on hand-made vectors, two backward passes whatever M, and equality with
the official one-probe-per-loss procedure on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.errors import UserError
from mmbalance.methods.mmpareto import MMPareto, min_norm_weight, pareto_combine

t = torch.tensor


def test_conflicting_gradients_get_min_norm_weights_restored_magnitude_and_gamma():
    # one encoder with two tensors: P = [1, 0] vs [-1, 1], Q = [2] vs [-1]
    g_mm, g_uni = [t([1.0, 0.0]), t([2.0])], [t([-1.0, 1.0]), t([-1.0])]
    # <mm,mm> = 1 + 4 = 5, <u,u> = 1 + 1 + 1 = 3, <mm,u> = -1 - 2 = -3; cos = -3 / sqrt(15) < 0: conflict
    # alpha_mm = (3 - (-3)) / (5 + 3 + 6) = 6/14 = 3/7, alpha_u = 4/7
    new, cos, alpha = pareto_combine(g_mm, g_uni, gamma=1.5)
    assert float(cos) == pytest.approx(-3 / math.sqrt(15))
    assert float(alpha) == pytest.approx(3 / 7)
    # P: g_new = 2 (3/7 [1,0] + 4/7 [-1,1]) = [-2/7, 8/7], |g_new| = sqrt(68)/7 = 1.178 > |[0,1]| = 1,
    #    so no restore: 1.5 g_new = [-3/7, 12/7]
    torch.testing.assert_close(new[0], t([-3 / 7, 12 / 7]))
    # Q: g_new = 2 (3/7 * 2 - 4/7) = 4/7 < |2 - 1| = 1: restored to norm 1 (x 7/4), then x 1.5 = 1.5
    torch.testing.assert_close(new[1], t([1.5]))


def test_min_norm_weight_is_the_minimiser_and_clips_like_the_official_solver():
    a, b = t([1.0, 0.0]), t([-1.0, 1.0])
    c = min_norm_weight(a @ a, a @ b, b @ b)  # (2 + 1) / (1 + 2 + 2) = 3/5
    assert float(c) == pytest.approx(0.6)
    combo = c * a + (1 - c) * b  # stationary: <combo, a - b> = 0
    assert float(combo @ (a - b)) == pytest.approx(0.0, abs=1e-6)
    # <a,b> >= <a,a>: a itself is the min-norm point
    assert float(min_norm_weight(t(1.0), t(2.0), t(9.0))) == pytest.approx(0.999)
    assert float(min_norm_weight(t(9.0), t(2.0), t(1.0))) == pytest.approx(0.001)  # <a,b> >= <b,b>: b


def test_agreeing_gradients_are_summed_and_boosted_by_gamma():
    # cos([1,0], [1,1]) > 0: alpha = 1/2, g_new = g_mm + g_u = [2, 1] = the sum (no restore); x 1.5
    new, cos, alpha = pareto_combine([t([1.0, 0.0])], [t([1.0, 1.0])], gamma=1.5)
    assert float(alpha) == 0.5 and float(cos) > 0
    torch.testing.assert_close(new[0], t([3.0, 1.5]))


def test_exactly_opposite_gradients_give_zero_not_nan():
    new, cos, alpha = pareto_combine([t([1.0, 2.0])], [t([-1.0, -2.0])], gamma=1.5)
    assert float(alpha) == pytest.approx(0.5)
    torch.testing.assert_close(new[0], t([0.0, 0.0]))


class _Ctx:
    """The run context MMPareto's setup/loss/backward read."""

    def __init__(self, model, classes=3):
        self.model, self.num_classes, self.device = model, classes, torch.device("cpu")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)


def _step(mods, unimodal_head, fusion="concat"):
    model = tiny_model(mods, fusion=fusion)
    ctx = _Ctx(model)
    method = MMPareto(gamma=1.5, unimodal_head=unimodal_head)
    method.setup(ctx)
    x, y = inputs(mods, n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batch = Batch(x, y, torch.arange(8))
    return model, ctx, method, batch


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_two_backward_passes_whatever_the_number_of_modalities(mods, monkeypatch):
    model, ctx, method, batch = _step(mods, "aux")
    calls = {"grad": 0, "backward": 0}
    real_grad, real_backward = torch.autograd.grad, torch.Tensor.backward

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    def counting_backward(self, *args, **kwargs):
        calls["backward"] += 1
        return real_backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    out = method.forward(ctx, batch)
    method.backward(ctx, method.loss(ctx, batch, out))
    assert calls == {"grad": 2, "backward": 0}
    assert all(p.grad is not None for p in model.parameters())


def _official_reference(model, method, batch, mods):
    """The official procedure: one probe backward per loss (zeroing between), then the summed loss."""
    params = dict(model.named_parameters())
    heads = method.heads

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        if heads is not None:
            heads.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}

    out = model(batch.inputs)
    uni = method.unimodal_logits(type("R", (), {"model": model})(), out)
    l_mm = F.cross_entropy(out.logits, batch.label)
    l_uni = {m: F.cross_entropy(uni[m], batch.label) for m in mods}
    g_mm = grads_of(l_mm)
    g_uni = {m: grads_of(l_uni[m]) for m in mods}
    model.zero_grad(set_to_none=True)
    if heads is not None:
        heads.zero_grad(set_to_none=True)
    (l_mm + sum(l_uni.values())).backward()
    expected = {}
    for m in mods:
        names = [n for n in params if n.startswith(f"encoders.{m}.")]
        a, b = [g_mm[n] for n in names], [g_uni[m][n] for n in names]
        flat_a, flat_b = torch.cat([v.flatten() for v in a]), torch.cat([v.flatten() for v in b])
        if F.cosine_similarity(flat_a, flat_b, dim=0) > 0:
            alpha = 0.5
        else:
            alpha = float(min_norm_weight(flat_a @ flat_a, flat_a @ flat_b, flat_b @ flat_b))
        for n, ga, gb in zip(names, a, b):
            summed = params[n].grad
            new = 2 * alpha * ga + 2 * (1 - alpha) * gb
            diff = summed.norm() / new.norm()
            expected[n] = diff * new * 1.5 if diff > 1 else new * 1.5
    for n, p in params.items():  # heads keep the summed gradient
        if not n.startswith("encoders."):
            expected[n] = p.grad.clone()
    aux = {n: p.grad.clone() for n, p in heads.named_parameters()} if heads is not None else {}
    return expected, aux


@pytest.mark.parametrize("unimodal_head", ["aux", "slice"])
@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_gradients_equal_the_official_one_probe_per_loss_procedure(mods, unimodal_head):
    model, ctx, method, batch = _step(mods, unimodal_head)
    # a sharper fused head; with the untrained auxiliary heads some encoders' two gradients conflict (asserted below)
    with torch.no_grad():
        model.fusion.fc.weight.mul_(3.0)
    expected, expected_aux = _official_reference(model, method, batch, mods)
    model.zero_grad(set_to_none=True)
    out = method.forward(ctx, batch)
    losses = method.loss(ctx, batch, out)
    method.backward(ctx, losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
    if method.heads is not None:
        for n, p in method.heads.named_parameters():
            torch.testing.assert_close(p.grad, expected_aux[n], msg=n)
    for m in mods:
        assert {f"pareto/cos/{m}", f"pareto/alpha_mm/{m}", f"pareto/conflict/{m}"} <= set(losses)
    if unimodal_head == "aux":  # both branches are exercised: a conflict here, agreement with slice heads
        assert any(float(losses[f"pareto/conflict/{m}"]) for m in mods)


def test_aux_heads_leave_the_fused_head_to_the_multimodal_loss():
    mods = ("a", "b")
    model, ctx, method, batch = _step(mods, "aux")
    out = method.forward(ctx, batch)
    losses = method.loss(ctx, batch, out)
    fused_only = torch.autograd.grad(losses["ce/fused"], model.fusion.fc.weight, retain_graph=True)[0]
    method.backward(ctx, losses)
    torch.testing.assert_close(model.fusion.fc.weight.grad, fused_only)
    assert len(ctx.optimizer.param_groups) == 2  # the auxiliary heads are optimised


def test_aux_heads_work_with_a_fusion_without_per_modality_logits():
    model, ctx, method, batch = _step(("a", "b"), "aux", fusion="gated")
    out = method.forward(ctx, batch)
    method.backward(ctx, method.loss(ctx, batch, out))
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(UserError, match="per-modality logits"):
        MMPareto(unimodal_head="slice").setup(_Ctx(tiny_model(("a", "b"), fusion="gated")))
    with pytest.raises(UserError, match="method.unimodal_head"):
        MMPareto(unimodal_head="shared")


def _after_three_steps(gamma, optimizer):
    torch.manual_seed(0)
    model = tiny_model(("a", "b"))
    ctx = _Ctx(model)
    ctx.optimizer = optimizer(model.parameters())
    method = MMPareto(gamma=gamma)
    method.setup(ctx)
    x, y = inputs(("a", "b"), n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        ctx.optimizer.zero_grad(set_to_none=True)
        method.backward(ctx, method.loss(ctx, Batch(x, y, torch.arange(8)), method.forward(ctx, Batch(x, y, None))))
        ctx.optimizer.step()
    # not the biases right before a BatchNorm: their gradient is zero up to float noise, where Adam's eps decides
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if not n.endswith("net.0.bias")])


def test_gamma_cancels_out_of_adam_updates_and_the_run_is_warned(caplog):
    # gamma is a constant factor on each encoder tensor's gradient: Adam normalises it away (up to its eps), SGD not
    adam = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
    sgd = lambda params: torch.optim.SGD(params, lr=1e-2)  # noqa: E731
    with caplog.at_level("WARNING", logger="mmbalance"):
        torch.testing.assert_close(_after_three_steps(1.0, adam), _after_three_steps(3.0, adam), atol=1e-5, rtol=0)
    assert "gamma has no effect here" in caplog.text and "Adam" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmbalance"):
        assert not torch.allclose(_after_three_steps(1.0, sgd), _after_three_steps(3.0, sgd), atol=1e-5)
    assert "gamma" not in caplog.text
