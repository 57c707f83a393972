"""AGM's exact formulas: Shapley outputs, ratios and coefficients (clamp, window, stale scales), running
scores, the shared-work coalition passes against the official full masked passes, and the clip rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.methods.agm import AGM, agm_coefficients, agm_ratios, coalition_logits
from mmbalance.metrics.shapley import coalitions, shapley_values

Y = torch.tensor([0, 1, 2, 0, 1, 2])


def fs(*m):
    return frozenset(m)


# ---------------------------------------------------------------- Shapley outputs

def test_two_modality_shapley_outputs_are_the_official_halves_and_sum_to_t():
    # v(empty) = 0, v(a) = 2, v(v) = 1, v(av) = T = 6:
    # phi_a = 1/2 (v(a) - 0) + 1/2 (T - v(v)) = 1/2 * 2 + 1/2 * 5 = 3.5 = 1/2 (T - PA + PV) with PA = v(v), PV = v(a)
    # phi_v = 1/2 * 1 + 1/2 * (6 - 2) = 2.5;  3.5 + 2.5 = 6 = T (efficiency: sum = v(all) - v(empty) = T)
    phi = shapley_values({fs(): 0.0, fs("a"): 2.0, fs("v"): 1.0, fs("a", "v"): 6.0}, ["a", "v"])
    assert phi == pytest.approx({"a": 3.5, "v": 2.5})
    # were the empty coalition worth Z = v(all-zero inputs) = 0.5, they would sum to T - Z = 5.5, not T
    phi_z = shapley_values({fs(): 0.5, fs("a"): 2.0, fs("v"): 1.0, fs("a", "v"): 6.0}, ["a", "v"])
    assert sum(phi_z.values()) == pytest.approx(5.5)


def test_three_modality_shapley_outputs_match_the_official_ur_funny_formula():
    # the official m_a = (T - PA + PVT)/3 + (PV - PAT + PT - PVA)/6, P<X> = output with X's inputs zeroed:
    # T = v(avt) = 12, PA = v(vt) = 5, PVT = v(a) = 3, PV = v(at) = 7, PAT = v(v) = 2, PT = v(av) = 8,
    # PVA = v(t) = 1 -> m_a = (12 - 5 + 3)/3 + (7 - 2 + 8 - 1)/6 = 10/3 + 2 = 5.3333...
    v = {fs(): 0.0, fs("a"): 3.0, fs("v"): 2.0, fs("t"): 1.0, fs("a", "v"): 8.0, fs("a", "t"): 7.0,
         fs("v", "t"): 5.0, fs("a", "v", "t"): 12.0}
    phi = shapley_values(v, ["a", "v", "t"])
    assert phi["a"] == pytest.approx(10 / 3 + 2)
    assert sum(phi.values()) == pytest.approx(12.0)


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("masking", ["input", "feature"])
def test_shared_work_coalitions_equal_the_official_masked_eval_passes_in_value_and_gradient(mods, masking):
    model = tiny_model(mods, masking=masking)
    x = inputs(mods)
    full = model(x).logits  # training mode, as the official T
    ours = coalition_logits(model, x, full)
    assert model.training  # the mode is restored
    model.eval()  # the official code: one full masked forward per coalition, eval mode, gradients kept
    official = {s: model(x, absent=[m for m in mods if m not in s]).logits for s in ours if s and len(s) < len(mods)}
    model.train()
    for s, v in official.items():
        torch.testing.assert_close(ours[s], v)
    assert torch.equal(ours[fs()], torch.zeros_like(full)) and ours[fs(*mods)] is full
    # the same gradients reach every parameter through the reused rows as through the full passes
    weights = torch.randn(len(official), *full.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for values in (ours, official):
        model.zero_grad()
        sum((w * values[s]).sum() for w, s in zip(weights, official)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    phi = shapley_values(ours, mods)
    torch.testing.assert_close(sum(phi.values()), full)  # the Shapley outputs sum to the fused logits


# ---------------------------------------------------------------- ratios and coefficients

def test_ratios_two_and_three_modalities_by_hand():
    # M = 2: r_a = exp(s_v - s_a) = exp(1.5 - 0.5) = e, r_v = exp(-1)
    assert agm_ratios({"a": 0.5, "v": 1.5}) == pytest.approx({"a": math.e, "v": math.exp(-1)})
    # M = 3: mean 2, factor 3/2: r = exp(1.5 * (2 - s)) = exp(1.5), 1, exp(-1.5)
    assert agm_ratios({"a": 1.0, "b": 2.0, "c": 3.0}) == pytest.approx(
        {"a": 4.4816890703380645, "b": 1.0, "c": 0.22313016014842982})


def test_coefficients_by_hand_and_the_clamp():
    # running scores equal -> rbar = 1; r = (e, 1/e): c_a = exp(1 - e) = 0.179374, c_v = exp(0.632121) = 1.881596
    c = agm_coefficients({"a": 0.5, "v": 1.5}, {"a": 1.0, "v": 1.0}, alpha=1.0, clamp=10.0)
    assert c == pytest.approx({"a": 0.17937407, "v": 1.88159639})
    # running (0, 3): rbar_a = e^3 = 20.0855, rbar_v = e^-3 = 0.049787; current equal -> r = 1
    # gap_a = 19.0855 -> clamped to 10: c_a = exp(0.1 * 10) = e; gap_v = -0.950213: c_v = exp(-0.0950213)
    c = agm_coefficients({"a": 1.0, "v": 1.0}, {"a": 0.0, "v": 3.0}, alpha=0.1, clamp=10.0)
    assert c == pytest.approx({"a": math.e, "v": 0.90935}, rel=1e-5)
    c = agm_coefficients({"a": 1.0, "v": 1.0}, {"a": 0.0, "v": 3.0}, alpha=0.1, clamp=None)
    assert c["a"] == pytest.approx(math.exp(0.1 * (math.exp(3) - 1)))  # unclamped: 6.7431
    # a damped modality is never clamped from below (the official min(., clamp) bounds only the boost)
    c = agm_coefficients({"a": 0.0, "v": 30.0}, {"a": 0.0, "v": 0.0}, alpha=1.0, clamp=10.0)
    assert c["a"] == pytest.approx(math.exp(1 - math.exp(30)))  # = 0.0


# ---------------------------------------------------------------- the training step

def make_run(mods=("a", "b"), **kw):
    model = tiny_model(mods)
    method = AGM(**kw)
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=torch.device("cpu"), num_classes=3)
    method.setup(run)
    return run


def batch(mods=("a", "b")):
    return Batch(inputs(mods), Y, torch.arange(6))


def official_scores(model, b, mods):
    """The official per-step scores, from the 2^M full passes (eval mode for the masked ones)."""
    full = model(b.inputs).logits
    model.eval()
    values = {fs(): torch.zeros_like(full), fs(*mods): full}
    for s in coalitions(mods)[1:-1]:
        values[s] = model(b.inputs, absent=[m for m in mods if m not in s]).logits
    model.train()
    phi = shapley_values(values, mods)
    scores = {m: float((-F.log_softmax(p.detach(), 1).gather(1, Y[:, None])).clamp(max=-math.log(1e-8)).mean())
              for m, p in phi.items()}
    return values, phi, scores


def step_then_rewind(run, b):
    """One AGM step; returns its coefficients and gradients, with the model's weights put back and grads zeroed
    so a hand-written reference can start from the same point."""
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.method.training_step(run, b)
    coeffs = run.method.last_coefficients
    got = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.model.load_state_dict(state)
    run.model.zero_grad()
    return coeffs, got


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_in_the_window_gradients_through_each_shapley_output_are_scaled_by_its_coefficient(mods):
    run = make_run(mods, alpha=1.0, clip_threshold=None)
    b = batch(mods)
    coeffs, got = step_then_rewind(run, b)
    # reference: the official 2^M passes and L = CE(sum_m phi_m) with dL/dphi_m scaled by c_m, written as
    # the surrogate sum_m (c_m phi_m + (1 - c_m) phi_m.detach()) whose gradient is exactly that
    _, phi, scores = official_scores(run.model, b, mods)
    expected_c = agm_coefficients(scores, {m: 0.0 for m in mods}, 1.0, 10.0)  # first step: running scores 0
    assert coeffs == pytest.approx(expected_c, rel=1e-5)
    assert max(coeffs.values()) > 1.0 > min(coeffs.values())
    surrogate = sum(coeffs[m] * phi[m] + (1 - coeffs[m]) * phi[m].detach() for m in mods)
    F.cross_entropy(surrogate, Y).backward()
    for n, p in run.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    # running scores after step 1 are the step's scores (cumulative mean with t = 1)
    assert run.method.running_scores == pytest.approx(scores, rel=1e-5)
    assert run.method.iteration == 1


def test_running_scores_are_the_cumulative_mean_and_the_first_step_uses_rbar_1():
    run = make_run(alpha=0.5)
    b = batch()
    seen = []
    for _ in range(3):
        running = dict(run.method.running_scores)
        run.method.training_step(run, b)  # lr 0: the model does not change, but BN running stats do
        seen.append(run.method.last_scores)
        assert run.method.last_coefficients == pytest.approx(
            agm_coefficients(seen[-1], running, 0.5, 10.0))
    for m in ("a", "b"):
        assert run.method.running_scores[m] == pytest.approx(sum(s[m] for s in seen) / 3)


def grads_of_plain_ce(run, b):
    run.model.zero_grad()
    F.cross_entropy(run.model(b.inputs).logits, Y).backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters()}


def test_after_the_window_the_step_is_plain_unless_the_official_stale_scale_is_asked_for():
    b = batch()
    for stale in (False, True):
        run = make_run(alpha=1.0, modulation_starts=0, modulation_ends=1, stale_scale_after_window=stale,
                       clip_threshold=None)
        state = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.epoch = 1
        run.method.training_step(run, b)
        last = dict(run.method.scales)
        assert last != {"a": 1.0, "b": 1.0}
        run.epoch = 2  # the window has closed
        run.model.load_state_dict(state)
        run.method.training_step(run, b)
        got = {n: p.grad.clone() for n, p in run.model.named_parameters()}
        run.model.load_state_dict(state)
        plain = grads_of_plain_ce(run, b)
        if not stale:
            assert run.method.last_coefficients == {}
            for n in got:
                torch.testing.assert_close(got[n], plain[n])
        else:  # the last in-window coefficients keep applying
            assert run.method.scales == last and run.method.last_coefficients == last
            assert any(not torch.allclose(got[n], plain[n]) for n in got)


def test_before_the_window_scales_are_1_but_the_running_scores_are_kept():
    run = make_run(alpha=1.0, modulation_starts=2, modulation_ends=5, clip_threshold=None)
    b = batch()
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.epoch = 0
    run.method.training_step(run, b)
    assert run.method.last_coefficients == {"a": 1.0, "b": 1.0} and run.method.iteration == 1
    got = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.model.load_state_dict(state)
    plain = grads_of_plain_ce(run, b)
    for n in got:
        torch.testing.assert_close(got[n], plain[n])


def test_conditional_clip_only_when_a_head_weight_gradient_exceeds_the_threshold():
    run = make_run(clip_threshold=1.0, clip_norm=0.5)
    for p in run.model.parameters():
        p.grad = torch.full_like(p, 0.9)
    run.method.on_after_backward(run, None, None)  # |0.9| <= 1: untouched
    assert all(torch.all(p.grad == 0.9) for p in run.model.parameters())
    run.model.fusion.fc.weight.grad[0, 0] = -1.5
    run.method.on_after_backward(run, None, None)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in run.model.parameters()))
    assert float(total) == pytest.approx(0.5, rel=1e-4)


def test_state_round_trip_keeps_running_scores_iteration_and_scales():
    run = make_run()
    run.method.training_step(run, batch())
    other = make_run()
    other.method.load_state_dict(run.method.state_dict())
    assert other.method.running_scores == run.method.running_scores
    assert other.method.iteration == 1 and other.method.scales == run.method.scales


# ---------------------------------------------------------------- the fast variant (issue 14)

def test_zero_row_is_appended_to_the_eval_encoding_not_encoded_apart():
    # the official values from one eval-mode encoder call per modality (batch + one all-zero sample)
    model = tiny_model()
    x = inputs()
    calls = []
    for m, enc in model.encoders.items():
        enc.register_forward_hook(lambda mod, args, out, m=m: calls.append((m, args[0].shape[0])))
    full = model(x).logits
    calls.clear()
    coalition_logits(model, x, full)
    assert sorted(calls) == [("a", 7), ("b", 7)]


def fast_reference(model, x, mods):
    """v(S) of coalition_features="train" by hand: present = the training pass's features, absent = the
    eval-mode encoder output on one all-zero sample, v(empty) = 0, v(all) = T."""
    out = model(x)
    model.eval()
    zero = {m: model.encoders[m](torch.zeros_like(x[m][:1])) for m in mods}
    model.train()
    values = {fs(): torch.zeros_like(out.logits), fs(*mods): out.logits}
    for s in coalitions(mods)[1:-1]:
        values[s] = model.fusion({m: out.features[m] if m in s else zero[m].expand(6, -1) for m in mods})
    return out, values


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_train_features_coalitions_reuse_the_training_pass_and_keep_efficiency(mods):
    model = tiny_model(mods)
    x = inputs(mods)
    out = model(x)
    calls = []
    for m, enc in model.encoders.items():
        enc.register_forward_hook(lambda mod, args, o, m=m: calls.append((m, args[0].shape[0])))
    ours = coalition_logits(model, x, out.logits, features=out.features)
    assert model.training and sorted(calls) == [(m, 1) for m in mods]  # only the zero rows are encoded
    for enc in model.encoders.values():
        enc._forward_hooks.clear()
    _, ref = fast_reference(tiny_model(mods), x, mods)
    for s in ref:
        torch.testing.assert_close(ours[s], ref[s])
    torch.testing.assert_close(sum(shapley_values(ours, mods).values()), out.logits)
    # with BatchNorm the eval-mode (official) values differ: the variant is not the official method
    official = coalition_logits(model, x, out.logits)
    assert not torch.allclose(official[fs("a")], ours[fs("a")])


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_train_features_step_scales_each_shapley_output_by_its_coefficient(mods):
    run = make_run(mods, alpha=1.0, clip_threshold=None, coalition_features="train")
    b = batch(mods)
    coeffs, got = step_then_rewind(run, b)
    _, values = fast_reference(run.model, b.inputs, mods)
    phi = shapley_values(values, mods)
    scores = {m: float((-F.log_softmax(p.detach(), 1).gather(1, Y[:, None])).clamp(max=-math.log(1e-8)).mean())
              for m, p in phi.items()}
    assert run.method.last_scores == pytest.approx(scores, rel=1e-5)
    assert coeffs == pytest.approx(agm_coefficients(scores, {m: 0.0 for m in mods}, 1.0, 10.0), rel=1e-5)
    surrogate = sum(coeffs[m] * phi[m] + (1 - coeffs[m]) * phi[m].detach() for m in mods)
    F.cross_entropy(surrogate, Y).backward()
    for n, p in run.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)


def test_train_features_variant_needs_late_fusion():
    from mmbalance.errors import UserError

    model = tiny_model()
    model.late_fusion = False  # as an intermediate-fusion model declares
    method = AGM(coalition_features="train")
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=torch.device("cpu"), num_classes=3)
    with pytest.raises(UserError, match="late-fusion"):
        method.setup(run)


def test_an_empty_window_is_refused_before_training_naming_both_keys():
    from conftest import compose_cfg
    from mmbalance.config import build
    from mmbalance.errors import UserError

    message = (r"method.modulation_starts=5 is after method.modulation_ends=2: the modulation window \(0-based "
               r"epochs, both inclusive\) would be empty; use modulation_starts <= modulation_ends$")
    with pytest.raises(UserError, match=message):
        AGM(modulation_starts=5, modulation_ends=2)
    with pytest.raises(UserError, match=message):  # the command line's path: refused when the method is built
        build(compose_cfg(["method=agm", "method.modulation_starts=5", "method.modulation_ends=2"]).method)
    assert AGM(modulation_starts=2, modulation_ends=2).in_window(2)  # a one-epoch window is fine
