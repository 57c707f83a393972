"""CGGM: the balancing terms B, the direction term L_gm, one full step with controlled auxiliary accuracies (2 and 3
modalities), B outside [0, 1] (logged, warned about), warm-up, clipping, regression refusal, FLOPs and resume, against
numbers worked out by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, train_in_process
from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.errors import UserError
from mmbalance.methods.cggm import CGGM, b_out_of_range, cggm_coefficients, direction_loss
from mmbalance.metrics.flops import count_flops
from test_methods import assert_one_step_trains, assert_same_state, make_run

Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


# ---------------------------------------------------------------- B and L_gm

def test_two_modalities_the_one_that_improved_less_gets_the_larger_factor():
    # Delta = (0.5 - 0.25, 0.3 - 0.25) = (0.25, 0.05), S = 0.3: B_a = 0.05 / 0.3 = 1/6, B_b = 0.25 / 0.3 = 5/6
    b = cggm_coefficients({"a": 0.5, "b": 0.3}, {"a": 0.25, "b": 0.25})
    assert b == pytest.approx({"a": 1 / 6, "b": 5 / 6}, rel=1e-6)


def test_three_modalities_sum_to_m_minus_one():
    # Delta = (0.4, 0.2, 0), S = 0.6: B = 1 - Delta / S = (1/3, 2/3, 1); sum = 2 = M - 1
    b = cggm_coefficients({"a": 0.6, "b": 0.4, "c": 0.2}, {"a": 0.2, "b": 0.2, "c": 0.2})
    assert b == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1.0}, rel=1e-6)


def test_ties_zero_changes_and_the_first_step():
    # equal changes: B = (M - 1) / M
    assert cggm_coefficients({"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.25}) == pytest.approx({"a": 0.5, "b": 0.5})
    three = cggm_coefficients({"a": 0.5, "b": 0.5, "c": 0.5}, {})
    assert three == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3})
    # no change at all: S = 1e-8, B = (1e-8 - 0) / 1e-8 = 1 for every modality
    assert cggm_coefficients({"a": 0.5, "b": 0.25}, {"a": 0.5, "b": 0.25}) == {"a": 1.0, "b": 1.0}
    # first step: the previous accuracies are 0, Delta = acc: (0.375, 0.125) -> S = 0.5, B = (0.25, 0.75)
    assert cggm_coefficients({"a": 0.375, "b": 0.125}, {}) == pytest.approx({"a": 0.25, "b": 0.75})


def test_opposite_changes_flip_or_explode_b_unless_clamped():
    # Delta = (0.25, -0.125), S = 0.125: B_a = (0.125 - 0.25) / 0.125 = -1 (reverses a's gradient), B_b = 2
    b = cggm_coefficients({"a": 0.75, "b": 0.375}, {"a": 0.5, "b": 0.5})
    assert b == pytest.approx({"a": -1.0, "b": 2.0}, rel=1e-6)
    assert cggm_coefficients({"a": 0.75, "b": 0.375}, {"a": 0.5, "b": 0.5}, clamp=True) == {"a": 0.0, "b": 1.0}
    # Delta = (0.25, -0.25): S = 1e-8, B_a = (1e-8 - 0.25) / 1e-8 = -24999999, B_b = 25000001
    b = cggm_coefficients({"a": 0.75, "b": 0.25}, {"a": 0.5, "b": 0.5})
    assert b == pytest.approx({"a": -24999999.0, "b": 25000001.0}, rel=1e-6)
    assert cggm_coefficients({"a": 0.75, "b": 0.25}, {"a": 0.5, "b": 0.5}, clamp=True) == {"a": 0.0, "b": 1.0}


def test_b_leaves_the_unit_range_exactly_when_the_changes_have_opposite_signs():
    # one sign: Delta = (0.25, 0.05) -> B = (1/6, 5/6); Delta = (-0.125, -0.25), S = -0.375 -> B = (2/3, 1/3)
    assert not b_out_of_range(cggm_coefficients({"a": 0.5, "b": 0.3}, {"a": 0.25, "b": 0.25}))
    assert not b_out_of_range(cggm_coefficients({"a": 0.375, "b": 0.25}, {"a": 0.5, "b": 0.5}))
    # opposite signs: B = (-1, 2); S = 1e-8: B = (-24999999, 25000001)
    assert b_out_of_range(cggm_coefficients({"a": 0.75, "b": 0.375}, {"a": 0.5, "b": 0.5}))
    assert b_out_of_range(cggm_coefficients({"a": 0.75, "b": 0.25}, {"a": 0.5, "b": 0.5}))
    # three modalities, Delta = (0.5, 0.5, -0.125), S = 0.875: B = 1 - Delta / S = (3/7, 3/7, 8/7), none negative
    b = cggm_coefficients({"a": 0.75, "b": 0.75, "c": 0.125}, {"a": 0.25, "b": 0.25, "c": 0.25})
    assert b == pytest.approx({"a": 3 / 7, "b": 3 / 7, "c": 8 / 7}, rel=1e-6) and b_out_of_range(b)
    # only the guard: Delta = (-0.25, 0), S = -0.25 + 1e-8: B_a = 1e-8 / (-0.25 + 1e-8) = -4e-8, B_b = 1: not counted
    b = cggm_coefficients({"a": 0.25, "b": 0.5}, {"a": 0.5, "b": 0.5})
    assert b["a"] == pytest.approx(-4e-8, rel=1e-6) and b["b"] == 1.0 and not b_out_of_range(b)


def test_direction_loss_by_hand():
    # (|0.25| + |0.75| - (0.25 * 0.5 + 0.75 * -1)) / 2 = (1 + 0.625) / 2 = 0.8125
    assert float(direction_loss({"a": 0.25, "b": 0.75}, {"a": torch.tensor(0.5), "b": torch.tensor(-1.0)})) == 0.8125
    # (1 + 2 - (-1 * 0.5 + 2 * 0.5)) / 2 = (3 - 0.5) / 2 = 1.25
    assert float(direction_loss({"a": -1.0, "b": 2.0}, {"a": torch.tensor(0.5), "b": torch.tensor(0.5)})) == 1.25
    # aligned with sign(B): 0
    assert float(direction_loss({"a": 0.5, "b": 0.5, "c": 1.0}, dict.fromkeys("abc", torch.tensor(1.0)))) == 0.0


# ---------------------------------------------------------------- one step on a tiny model

def _run(mods=("a", "b"), **kwargs):
    model = tiny_model(mods, classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = CGGM(**{"clip_norm": None, **kwargs})
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=3)
    method.setup(run)
    return run


def _constant_predictions(run, classes: dict[str, int]) -> None:
    """Every auxiliary classifier's weights zero and its out-layer bias one-hot: it always predicts that class."""
    with torch.no_grad():
        for m, c in classes.items():
            for p in run.method.classifiers[m].parameters():
                p.zero_()
            run.method.classifiers[m].out_layer.bias[c] = 1.0


def _step(run, epoch=0):
    """loss -> backward -> hook, as the training step does; returns (losses, the raw gradients, out)."""
    run.epoch = epoch
    x = inputs(tuple(run.model.modalities), n=8)
    batch = Batch(x, Y, torch.arange(8))
    out = run.method.forward(run, batch)
    losses = run.method.loss(run, batch, out)
    run.zero_grad()
    losses["loss"].backward()
    raw = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.method.on_after_backward(run, batch, out)
    return losses, raw, out


def _scales(run, raw) -> dict[str, float]:
    """grad / raw grad per parameter group: each encoder's single factor, and the head's."""
    found = {}
    for n, p in run.model.named_parameters():
        group = n.split(".")[1] if n.startswith("encoders.") else "head"
        r = raw[n]
        if r.abs().max() > 0:
            found.setdefault(group, set()).add(round(float((p.grad * r).sum() / (r * r).sum()), 6))
            torch.testing.assert_close(p.grad, r * float((p.grad * r).sum() / (r * r).sum()))
    return {g: s.pop() for g, s in found.items() if len(s) == 1}


def test_a_step_scales_each_encoder_by_rho_b_from_the_auxiliary_accuracies():
    run = _run(rho=1.3)
    # a always predicts class 0 -> acc 3/8 = 0.375; b always class 2 -> acc 2/8 = 0.25 (labels 0,1,2,0,1,2,0,1)
    _constant_predictions(run, {"a": 0, "b": 2})
    run.method.prev_acc = {"a": 0.125, "b": 0.125}
    before = {n: p.detach().clone() for n, p in run.method.classifiers.named_parameters()}
    _, raw, _ = _step(run)
    # Delta = (0.25, 0.125), S = 0.375: B_a = 0.125 / 0.375 = 1/3, B_b = 0.25 / 0.375 = 2/3
    assert run.method.last_acc == {"a": 0.375, "b": 0.25} and run.method.prev_acc == {"a": 0.375, "b": 0.25}
    assert run.method.B == pytest.approx({"a": 1 / 3, "b": 2 / 3}, rel=1e-6)
    # encoder a x 1.3/3 = 0.433333, encoder b x 2.6/3 = 0.866667, the head untouched
    assert _scales(run, raw) == pytest.approx({"a": 0.433333, "b": 0.866667, "head": 1.0}, abs=1e-6)
    # the auxiliary classifiers took their own step (their out-layer bias moved), the model's step is the trainer's
    moved = [n for n, p in run.method.classifiers.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("out_layer" in n for n in moved)


def test_three_modalities_first_step():
    run = _run(("a", "b", "c"), rho=1.0)
    _constant_predictions(run, {"a": 0, "b": 2, "c": 1})  # acc = (3/8, 2/8, 3/8)
    _, raw, _ = _step(run)
    # first step: Delta = acc, S = 1.0: B = 1 - Delta = (0.625, 0.75, 0.625)
    assert run.method.B == pytest.approx({"a": 0.625, "b": 0.75, "c": 0.625}, rel=1e-6)
    assert _scales(run, raw) == pytest.approx({"a": 0.625, "b": 0.75, "c": 0.625, "head": 1.0}, abs=1e-6)


def test_the_direction_term_uses_the_previous_b_and_the_current_weights():
    run = _run(lam=0.2)
    fusion, cls = run.model.fusion, run.method.classifiers
    with torch.no_grad():  # cos_a = 1 (block a = classifier a's out-layer), cos_b = -1 (block b = minus b's)
        lo, hi = fusion.slices["a"]
        fusion.fc.weight[:, lo:hi] = cls["a"].out_layer.weight
        lo, hi = fusion.slices["b"]
        fusion.fc.weight[:, lo:hi] = -cls["b"].out_layer.weight
    run.method.B = {"a": 0.25, "b": 0.75}
    batch = Batch(inputs(("a", "b"), n=8), Y, torch.arange(8))
    out = run.method.forward(run, batch)
    losses = run.method.loss(run, batch, out)
    # L_gm = (0.25 + 0.75 - (0.25 * 1 + 0.75 * -1)) / 2 = 1.5 / 2 = 0.75; loss = CE + 0.2 * 0.75
    assert float(losses["cggm_l_gm"]) == pytest.approx(0.75, abs=1e-6)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(out.logits, Y) + 0.15)
    # the B logged is this step's, the one that will scale its gradients (the previous one drove L_gm)
    assert float(losses["cggm_B_a"]) == pytest.approx(run.method.B["a"])
    assert run.method.B != {"a": 0.25, "b": 0.75}  # recomputed from this batch's auxiliary accuracies
    # the term reaches only the head: the classifiers' out-layers are detached in it
    losses["loss"].backward()
    assert all(p.grad is None for p in cls.parameters())


def test_no_direction_term_before_any_b_and_with_lam_zero():
    run = _run(lam=0.2)
    losses, _, out = _step(run)
    assert "cggm_l_gm" not in losses
    torch.testing.assert_close(losses["loss"], F.cross_entropy(out.logits, Y))
    run = _run(lam=0.0)
    run.method.B = {"a": 0.25, "b": 0.75}
    losses, _, out = _step(run)
    assert "cggm_l_gm" not in losses


def test_warm_up_trains_the_classifiers_but_modulates_only_after_it():
    run = _run(rho=1.3, lam=0.2, warmup_epochs=1)
    _constant_predictions(run, {"a": 0, "b": 2})
    run.method.B = {"a": 0.25, "b": 0.75}
    losses, raw, out = _step(run, epoch=0)  # the last warm-up epoch: plain CE, gradients untouched
    assert "cggm_l_gm" not in losses
    assert _scales(run, raw) == pytest.approx({"a": 1.0, "b": 1.0, "head": 1.0})
    assert run.method.prev_acc == {"a": 0.375, "b": 0.25}  # ... but the accuracies and B move on
    assert run.method.B == pytest.approx({"a": 0.25 / 0.625, "b": 0.375 / 0.625}, rel=1e-6)  # Delta = (.375, .25)
    _constant_predictions(run, {"a": 0, "b": 2})  # undo the classifiers' step: the same accuracies again
    losses, raw, _ = _step(run, epoch=1)  # the first modulated epoch
    assert "cggm_l_gm" in losses
    # Delta = (0, 0): S = 1e-8, B = 1 for both -> x 1.3
    assert _scales(run, raw) == pytest.approx({"a": 1.3, "b": 1.3, "head": 1.0}, abs=1e-6)


def test_b_outside_the_unit_range_is_logged_and_warned_about_once_per_epoch(caplog):
    run = _run(rho=1.0, lam=0.0)
    _constant_predictions(run, {"a": 0, "b": 2})  # acc = (3/8, 2/8) every step
    # Delta = (0.375 - 0.25, 0.25 - 0.375) = (0.125, -0.125), S = 1e-8: B_a = -12499999, B_b = 12500001
    run.method.prev_acc = {"a": 0.25, "b": 0.375}
    with caplog.at_level("WARNING", logger="mmbalance"):
        losses, raw, _ = _step(run)
        assert float(losses["cggm_B_out_of_range"]) == 1.0
        assert float(losses["cggm_B_a"]) == -12499999.0 and float(losses["cggm_B_b"]) == 12500001.0
        # the B logged is the B applied: encoder a's gradient reversed and x 1.25e7, b's x 1.25e7
        for n, p in run.model.named_parameters():
            factor = {"encoders.a.": -12499999.0, "encoders.b.": 12500001.0}.get(n[:11], 1.0)
            torch.testing.assert_close(p.grad, raw[n] * factor, rtol=1e-5, atol=0.0)
        _constant_predictions(run, {"a": 0, "b": 2})  # the same accuracies: Delta = 0, B = (1, 1)
        losses, _, _ = _step(run)
        assert float(losses["cggm_B_out_of_range"]) == 0.0 and run.method.B == {"a": 1.0, "b": 1.0}
        assert not caplog.records  # nothing before the epoch ends
        run.method.on_epoch_end(run, 0)
        run.method.on_epoch_end(run, 0)  # the count was reported: no second warning
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("cggm epoch 0: B left [0, 1] in 1 of 2 steps (largest |B| 1.25e+07)")
    assert "reverses that encoder's gradient" in warning and "method.clamp_B=true" in warning
    assert "method.clip_norm=null" in warning


@pytest.mark.parametrize("settings", [{"clamp_B": True}, {"warmup_epochs": 1}], ids=["clamped", "warm-up"])
def test_b_outside_the_unit_range_is_still_counted_but_not_warned_about_when_clamped_or_in_warm_up(caplog, settings):
    run = _run(lam=0.0, **settings)
    _constant_predictions(run, {"a": 0, "b": 2})
    run.method.prev_acc = {"a": 0.25, "b": 0.375}  # as above: the official B = (-12499999, 12500001)
    with caplog.at_level("WARNING", logger="mmbalance"):
        losses, _, _ = _step(run)
        run.method.on_epoch_end(run, 0)
    assert float(losses["cggm_B_out_of_range"]) == 1.0  # counted before the clamp
    if settings.get("clamp_B"):  # the logged (and applied) B is the clamped one
        assert float(losses["cggm_B_a"]) == 0.0 and float(losses["cggm_B_b"]) == 1.0
    assert not caplog.records


def test_warm_up_epochs_are_still_clipped_to_clip_norm():
    # the official loop clips every step, with or without modulation: warm-up = plain training with the clip
    run = _run(clip_norm=1e-3, warmup_epochs=1)
    _constant_predictions(run, {"a": 0, "b": 2})
    _, raw, _ = _step(run, epoch=0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)
    raw_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()])))
    factor = round(1e-3 / raw_norm, 6)  # one factor for every group: clipped, not modulated
    assert _scales(run, raw) == pytest.approx({"a": factor, "b": factor, "head": factor}, rel=1e-4)


def test_a_warm_up_covering_the_run_is_warned_about(caplog):
    def warnings(warmup):
        run = _run(warmup_epochs=warmup)
        run.config = {"trainer": {"epochs": 2}}
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmbalance"):
            run.method.setup(run)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings(2) == ["cggm: method.warmup_epochs=2 >= trainer.epochs=2, so no step is modulated (this run is "
                           "plain training with the gradient clip to method.clip_norm, plus the auxiliary "
                           "classifiers)"]
    assert warnings(1) == []


def test_regression_is_refused_saying_what_needs_class_labels():
    with pytest.raises(UserError, match=r"^method cggm does not support dataset.task=regression: its balancing "
                                        r"terms B come from the batch accuracy"):
        CGGM().set_task("regression")


def test_the_clip_bounds_the_model_gradient_after_the_scaling():
    run = _run(clip_norm=1e-3)
    _step(run)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)


def test_fusions_without_linear_blocks_need_lam_zero():
    with pytest.raises(UserError, match="method.lam=0"):
        make_run(compose_cfg(["method=cggm", "backbone.fusion=gated"]))
    run = make_run(compose_cfg(["method=cggm", "backbone.fusion=gated", "method.lam=0"]))
    assert_one_step_trains(run, "cggm")


# ---------------------------------------------------------------- FLOPs and resume

def test_a_step_costs_the_baseline_plus_the_auxiliary_classifiers():
    # per modality, n = 16, d = 128, C = 4, two hidden layers: forward 2n(2d^2 + dC); backward: the first layer's
    # weight gradient only (its input is detached) 2nd^2, the second layer's weight and input 4nd^2, the out-layer's
    # 4ndC. Total 10nd^2 + 6ndC = 2,621,440 + 49,152 = 2,670,592; two modalities: 5,341,184
    base = make_run(compose_cfg(["method=baseline"]))
    cggm = make_run(compose_cfg(["method=cggm"]))
    cggm.model.load_state_dict(base.model.state_dict())
    batch = next(iter(base.train_loader))
    _, f_base = count_flops(base.method.training_step, base, batch)
    _, f_cggm = count_flops(cggm.method.training_step, cggm, batch)
    assert len(batch) == 16 and set(cggm.model.fusion.dims.values()) == {128} and cggm.num_classes == 4
    assert f_cggm - f_base == 5_341_184


@pytest.mark.slow
def test_the_runs_training_flops_exceed_the_baselines(tmp_path):
    args = ["trainer.epochs=1", "dataset.num_samples=64", "eval.shapley_every=0"]
    base = train_in_process(tmp_path / "base", ["method=baseline", *args])["metrics"]
    cggm = train_in_process(tmp_path / "cggm", ["method=cggm", *args])["metrics"]
    assert cggm["flops/train_total"] > base["flops/train_total"]
    assert cggm["flops/forward_per_sample"] == base["flops/forward_per_sample"]  # discarded at inference


def test_resume_restores_the_classifiers_their_optimiser_and_the_accuracies():
    cfg = compose_cfg(["method=cggm"])
    run = make_run(cfg)
    batches = iter(run.train_loader)
    first, second = next(batches), next(batches)
    run.method.training_step(run, first)
    saved = copy.deepcopy({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                           "method": run.method.state_dict()})
    assert saved["method"]["cls_optimizer"]["state"]  # SGD momentum buffers of the classifiers
    assert saved["method"]["B"] is not None and set(saved["method"]["prev_acc"]) == {"audio", "visual"}
    run.method.training_step(run, second)
    fresh = make_run(cfg)
    fresh.model.load_state_dict(saved["model"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    fresh.method.load_state_dict(saved["method"])
    fresh.method.training_step(fresh, second)
    for a, b in zip(run.model.parameters(), fresh.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_state(fresh.method.state_dict(), run.method.state_dict())


def test_the_run_logs_the_share_of_steps_with_b_outside_the_unit_range(tmp_path):
    train_in_process(tmp_path, ["method=cggm", "trainer.epochs=1", "dataset.num_samples=64", "eval.shapley_every=0"])
    header, row = (tmp_path / "history.csv").read_text().splitlines()[:2]
    share = float(dict(zip(header.split(","), row.split(",")))["train/cggm_B_out_of_range"])
    assert 0.0 <= share <= 1.0
