"""MLGM (BMVC 2024, code "MLB"): the coefficients against hand-computed numbers (2 and 3 modalities, ties, zero
scores, the boost ceiling), the per-step loss and gradient scaling, the modulation window, the head variants,
FLOPs, resume and the balance-curve sweep."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import THREE, compose_cfg
from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.errors import UserError
from mmbalance.methods.mlgm import MLGM, mlgm_coefficients, mlgm_ratios
from mmbalance.metrics.flops import count_flops

Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


# ---------------------------------------------------------------- coefficients by hand

def test_two_modalities_one_slowed_one_boosted():
    # s_a = 0.6, s_v = 0.3: r_a = 0.3/0.6 = 0.5, r_v = 0.6/0.3 = 2 (other / own)
    assert mlgm_ratios({"a": 0.6, "v": 0.3}) == pytest.approx({"a": 0.5, "v": 2.0})
    # k_a = 1 + tanh(0.8 * (0.5 - 1)) = 1 + tanh(-0.4); k_v = 1 + tanh(0.8 * (2 - 1)) = 1 + tanh(0.8)
    k = mlgm_coefficients({"a": 0.6, "v": 0.3}, alpha=0.8)
    assert k == pytest.approx({"a": 0.6200510377447751, "v": 1.6640367702678491}, rel=1e-12)


def test_three_modalities_compare_against_the_mean_of_the_others():
    # s = (0.8, 0.4, 0.2): r_a = 0.3/0.8 = 0.375, r_b = 0.5/0.4 = 1.25, r_c = 0.6/0.2 = 3
    assert mlgm_ratios({"a": 0.8, "b": 0.4, "c": 0.2}) == pytest.approx({"a": 0.375, "b": 1.25, "c": 3.0})
    # k = 1 + tanh(0.8 (r - 1)): tanh(-0.5), tanh(0.2), tanh(1.6)
    k = mlgm_coefficients({"a": 0.8, "b": 0.4, "c": 0.2}, alpha=0.8)
    assert k == pytest.approx({"a": 0.5378828427399902, "b": 1.197375320224904, "c": 1.9216685544064713}, rel=1e-12)
    # two tied behind one: r_a = 0.3/0.6 = 0.5, r_b = r_c = 0.45/0.3 = 1.5 -> 1 + tanh(-0.4), 1 + tanh(0.4) twice
    k = mlgm_coefficients({"a": 0.6, "b": 0.3, "c": 0.3}, alpha=0.8)
    assert k == pytest.approx({"a": 0.6200510377447751, "b": 1.379948962255225, "c": 1.379948962255225}, rel=1e-12)


@pytest.mark.parametrize("scores", [{"a": 0.4, "v": 0.4}, {"a": 0.7, "b": 0.7, "c": 0.7}])
def test_a_tie_changes_nothing(scores):
    assert mlgm_coefficients(scores, alpha=0.8) == {m: 1.0 for m in scores}


def test_zero_scores_give_the_ceiling_or_nothing_never_nan():
    # s_a = 0 while s_v > 0: r_a = inf -> tanh = 1 -> k_a = 2; r_v = 0/0.5 = 0 -> 1 + tanh(-0.8)
    k = mlgm_coefficients({"a": 0.0, "v": 0.5}, alpha=0.8)
    assert k == pytest.approx({"a": 2.0, "v": 0.33596322973215087}, rel=1e-12)
    assert mlgm_coefficients({"a": 0.0, "v": 0.5}, alpha=0.8, max_boost=1.5)["a"] == 1.5
    assert mlgm_coefficients({"a": 0.0, "v": 0.0}, alpha=0.8) == {"a": 1.0, "v": 1.0}  # 0/0: no change
    assert mlgm_coefficients({"a": 0.0, "b": 0.0, "c": 0.0}, alpha=0.8) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_max_boost_caps_only_the_speed_up_side():
    # official tanh_mode 2 with beta 1.5: k_v = 1 + 0.5 tanh(0.8); the slowed side keeps 1 + tanh(-0.4)
    k = mlgm_coefficients({"a": 0.6, "v": 0.3}, alpha=0.8, max_boost=1.5)
    assert k == pytest.approx({"a": 0.6200510377447751, "v": 1.3320183851339245}, rel=1e-12)
    assert mlgm_coefficients({"a": 0.6, "v": 0.3}, alpha=0.0) == {"a": 1.0, "v": 1.0}  # alpha 0: off
    with pytest.raises(UserError, match="max_boost"):
        MLGM(max_boost=0.5)


# ---------------------------------------------------------------- one step

def _run(mods, fusion="concat", **kwargs):
    model = tiny_model(mods, fusion=fusion, classes=3)
    method = MLGM(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=3)
    torch.manual_seed(1)
    method.setup(run)
    return run


def _hand_coefficients(scores, alpha=0.8):
    out = {}
    for m, s in scores.items():
        others = [v for j, v in scores.items() if j != m]
        r = sum(others) / len(others) / s
        out[m] = 1 + math.tanh(alpha * (r - 1))
    return out


def _step(run, epoch=0):
    """Forward, the method's loss, backward; returns (out, losses, raw grads by parameter id)."""
    run.epoch = epoch
    x = inputs(tuple(run.model.modalities), n=8)
    batch = Batch(x, Y, torch.arange(8))
    out = run.model(x)
    losses = run.method.loss(run, batch, out)
    run.zero_grad()
    losses["loss"].backward()
    raw = {id(p): p.grad.clone() for p in _all_params(run) if p.grad is not None}
    run.method.on_after_backward(run, batch, out)
    return out, losses, raw


def _all_params(run):
    heads = run.method.heads
    return list(run.model.parameters()) + (list(heads.parameters()) if heads is not None else [])


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_step_sums_the_losses_and_scales_each_branch_by_its_coefficient(mods):
    run = _run(mods)
    out, losses, raw = _step(run)
    heads, model = run.method.heads, run.model
    # the loss: CE(fused) + sum_m CE(aux head m), each recomputed here
    aux = {m: heads[m](out.features[m]) for m in mods}
    expected_loss = F.cross_entropy(out.logits, Y) + sum(F.cross_entropy(z, Y) for z in aux.values())
    torch.testing.assert_close(losses["loss"], expected_loss)
    # s_m = mean true-class probability of the aux head; k from the official formula (written out here)
    scores = {m: float(torch.softmax(aux[m].detach(), 1)[torch.arange(8), Y].mean()) for m in mods}
    k = _hand_coefficients(scores)
    assert run.method.last_coefficients == pytest.approx(k, rel=1e-6)
    assert any(abs(v - 1) > 1e-3 for v in k.values())
    for m in mods:
        assert float(losses[f"mlgm/k/{m}"]) == pytest.approx(k[m], rel=1e-6)
        for p in list(model.encoders[m].parameters()) + list(heads[m].parameters()):
            torch.testing.assert_close(p.grad, raw[id(p)] * k[m])
    # the fused head: each modality's column block times its k, the bias untouched
    weight, bias = model.fusion.fc.weight, model.fusion.fc.bias
    for m in mods:
        lo, hi = model.fusion.slices[m]
        torch.testing.assert_close(weight.grad[:, lo:hi], raw[id(weight)][:, lo:hi] * k[m])
    torch.testing.assert_close(bias.grad, raw[id(bias)])


def test_window_boundaries():
    for epoch, modulated in [(1, False), (2, True), (3, True), (4, False)]:
        run = _run(("a", "b"), modulation_starts=2, modulation_ends=3)
        _, losses, raw = _step(run, epoch)
        changed = any(not torch.equal(p.grad, raw[id(p)]) for p in _all_params(run) if p.grad is not None)
        assert changed is modulated, epoch
        if not modulated:
            assert float(losses["mlgm/k/a"]) == float(losses["mlgm/k/b"]) == 1.0
    assert MLGM().in_window(10_000)  # no end by default (official: always)


def test_an_empty_window_is_refused_before_training_naming_both_keys():
    message = (r"method.modulation_starts=5 is after method.modulation_ends=2: the modulation window \(0-based "
               r"epochs, both inclusive\) would be empty")
    with pytest.raises(UserError, match=message):
        MLGM(modulation_starts=5, modulation_ends=2)
    from mmbalance.config import build  # the command line's path: refused when the method is built
    with pytest.raises(UserError, match=message):
        build(compose_cfg(["method=mlgm", "method.modulation_starts=5", "method.modulation_ends=2"]).method)
    # a one-epoch window and an open end are fine
    assert MLGM(modulation_starts=2, modulation_ends=2).in_window(2)
    assert MLGM(modulation_starts=5, modulation_ends=None).in_window(5)


def test_a_window_that_opens_after_the_last_epoch_is_warned_about(caplog):
    def warnings(starts):
        caplog.clear()
        run = _run(("a", "b"), modulation_starts=starts)
        run.config = {"trainer": {"epochs": 3}}
        with caplog.at_level("WARNING", logger="mmbalance"):
            run.method.setup(run)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings(3) == ["mlgm: method.modulation_starts=3 >= trainer.epochs=3, so no step is modulated (this run "
                           "is unmodulated multi-loss training)"]
    assert warnings(2) == []


def test_sum_fusion_scales_each_head_weight_not_its_bias():
    run = _run(("a", "b"), fusion="sum")
    _, _, raw = _step(run)
    k = run.method.last_coefficients
    for m in ("a", "b"):
        head = run.model.fusion.heads[m]
        torch.testing.assert_close(head.weight.grad, raw[id(head.weight)] * k[m])
        torch.testing.assert_close(head.bias.grad, raw[id(head.bias)])


def test_slice_heads_use_the_fusion_blocks_and_add_no_head():
    run = _run(("a", "b"), unimodal_heads="slice")
    assert run.method.heads is None and len(run.optimizer.param_groups) == 1
    out, losses, raw = _step(run)
    uni = run.model.fusion.unimodal_logits(out.features)
    expected = F.cross_entropy(out.logits, Y) + sum(F.cross_entropy(z, Y) for z in uni.values())
    torch.testing.assert_close(losses["loss"], expected)
    scores = {m: float(torch.softmax(uni[m].detach(), 1)[torch.arange(8), Y].mean()) for m in ("a", "b")}
    assert run.method.last_coefficients == pytest.approx(_hand_coefficients(scores), rel=1e-6)


def test_aux_heads_work_with_a_fusion_without_blocks_and_slices_refuse_it():
    run = _run(("a", "b"), fusion="gated")
    _, _, raw = _step(run)
    k = run.method.last_coefficients
    for p in run.model.fusion.parameters():  # no block to scale: the fused head keeps its gradient
        torch.testing.assert_close(p.grad, raw[id(p)])
    for p in run.model.encoders["a"].parameters():
        torch.testing.assert_close(p.grad, raw[id(p)] * k["a"])
    with pytest.raises(UserError, match="per-modality logits"):
        _run(("a", "b"), fusion="gated", unimodal_heads="slice")


def test_aux_logits_are_float32_under_bf16_autocast():
    run = _run(("a", "b"))
    x = inputs(("a", "b"), n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run.model(x)
        uni = run.method.unimodal_logits(run, out.features, out)
        losses = run.method.loss(run, Batch(x, Y, torch.arange(8)), out)
    assert out.features["a"].dtype == torch.bfloat16
    assert all(z.dtype == torch.float32 for z in uni.values()) and torch.isfinite(losses["loss"])


# ---------------------------------------------------------------- run-level: FLOPs, resume, sweep

def test_train_step_flops_exceed_the_baselines():
    from test_methods import make_run

    flops = {}
    for name in ("baseline", "mlgm"):
        run = make_run(compose_cfg([f"method={name}"]))
        batch = next(iter(run.train_loader))
        _, flops[name] = count_flops(run.method.training_step, run, batch)
    assert flops["mlgm"] > flops["baseline"]  # the aux heads' forward and backward are counted


def test_three_modality_run_trains_and_logs_every_coefficient(tmp_path):
    from conftest import train_in_process

    results = train_in_process(tmp_path, ["method=mlgm", *THREE, "trainer.epochs=1", "dataset.num_samples=64"])
    assert results["status"] == "completed"
    history = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert all(f"train/mlgm/k/{m}" in history for m in ("audio", "visual", "text"))


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from conftest import straight_and_resumed, without_times

    overrides = ["method=mlgm", "trainer.epochs=2", "dataset.num_samples=64"]
    straight, resumed = straight_and_resumed(tmp_path, overrides, 1, monkeypatch)  # the aux heads and their optimizer state return
    assert resumed["processes"] == 2

    assert without_times(resumed["metrics"]) == without_times(straight["metrics"])
