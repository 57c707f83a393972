"""InfoReg (CVPR 2025): the window indicator and the regulation strengths against hand-computed numbers (ties,
zero scores, the threshold boundary, 3 modalities), the proximal gradient and the Fisher trace of one step, the
window sources, the epoch anchor, resume, FLOPs and the balance-curve sweep."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import THREE, compose_cfg
from helpers import inputs, tiny_model
from mmbalance.config import validate
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.errors import UserError
from mmbalance.methods.inforeg import InfoReg, regulation_strengths, window_indicator
from mmbalance.metrics.flops import count_flops

Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


# ---------------------------------------------------------------- the window indicator by hand

def test_window_indicator_official_moving_means_with_zero_padding():
    assert window_indicator([]) == 1.0  # epoch 0 (official k = 1)
    assert window_indicator([5.0]) == 1.0  # padded [0]*10 + [5]: (0.5 - 0) / 0.5
    # [2, 4], W = 10: last 10 mean 0.6, the 10 before 0.2 -> (0.6 - 0.2) / 0.6 = 2/3
    assert window_indicator([2.0, 4.0]) == pytest.approx(2 / 3, rel=1e-12)
    # 1..12: last 10 = 3..12 (sum 75), before = 2..11 (sum 65) -> (7.5 - 6.5) / 7.5
    assert window_indicator([float(t) for t in range(1, 13)]) == pytest.approx(1 / 7.5, rel=1e-12)
    # a shrinking trace, W = 2: padded [0, 0, 4, 2, 1]: last (2+1)/2 = 1.5, before (4+2)/2 = 3 -> (1.5 - 3)/1.5 = -1
    assert window_indicator([4.0, 2.0, 1.0], window_epochs=2) == pytest.approx(-1.0, rel=1e-12)
    assert window_indicator([0.0, 0.0]) == 0.0  # no gradient at all: closed, not 0/0


def test_threshold_boundary_is_strict():
    # W = 2, traces [1, 8.5, 1.5]: last (8.5+1.5)/2 = 5, before (1+8.5)/2 = 4.75 -> k = 0.25/5 = 0.05 exactly
    assert window_indicator([1.0, 8.5, 1.5], window_epochs=2) == 0.05
    run = _run(("a", "b"), threshold=0.05, window_epochs=2)
    run.method.traces = {"a": [1.0, 8.5, 1.5], "b": [1.0, 8.5, 1.6]}  # b: 0.3/5.05 = 0.0594 > 0.05
    run.method.begin_epoch(run, 3)
    assert run.method.open == {"a": False, "b": True}  # k == threshold is closed (official `k > 0.05`)
    assert set(run.method.anchor) == {"b"}  # only an open window keeps an anchor


def test_a_threshold_no_indicator_can_pass_is_refused():
    # k = 1 - (earlier mean / recent mean) of non-negative traces is at most 1 (exactly 1 at epoch 0), so with a
    # threshold >= 1 no window would ever open: silently plain multi-loss training
    assert window_indicator([]) == 1.0 and window_indicator([0.0, 5.0], window_epochs=2) == 1.0
    for bad in (1.0, 2.5, float("nan")):
        with pytest.raises(UserError, match=rf"method.threshold={bad}: expected < 1"):
            InfoReg(threshold=bad)
    with pytest.raises(UserError, match="method.threshold=1.0: expected < 1"):  # before anything is built
        validate(compose_cfg(["method=inforeg", "method.threshold=1.0"]))
    assert InfoReg(threshold=0.999).threshold == 0.999 and InfoReg(threshold=-0.5).threshold == -0.5


# ---------------------------------------------------------------- regulation strengths by hand

def test_two_modalities_the_official_rule():
    both = {"a": True, "v": True}
    # S_a = 5 > S_v = 3: beta_a = 0.95 exp(tanh(2)), beta_v = 0
    assert regulation_strengths({"a": 5.0, "v": 3.0}, both, {"a": 0.95, "v": 0.95}) == pytest.approx(
        {"a": 2.4911246761958425, "v": 0.0}, rel=1e-12)
    # the official asymmetric pair, visual ahead: beta_v = 0.1 exp(tanh(40.5 - 38)) = 0.1 exp(tanh(2.5))
    assert regulation_strengths({"a": 38.0, "v": 40.5}, both, {"a": 0.95, "v": 0.1}) == pytest.approx(
        {"a": 0.0, "v": 0.2682138162207557}, rel=1e-12)
    # a tie regulates nobody; a closed window regulates nobody
    assert regulation_strengths({"a": 4.0, "v": 4.0}, both, {"a": 0.95, "v": 0.95}) == {"a": 0.0, "v": 0.0}
    assert regulation_strengths({"a": 5.0, "v": 3.0}, {"a": False, "v": True}, {"a": 0.95, "v": 0.95}) == {
        "a": 0.0, "v": 0.0}


def test_three_modalities_every_one_ahead_of_the_weakest():
    c = {"a": 0.95, "b": 0.95, "c": 0.95}
    opened = {"a": True, "b": True, "c": True}
    # (5, 4, 3): a gets 0.95 exp(tanh(2)), b 0.95 exp(tanh(1)), c (the weakest) 0
    assert regulation_strengths({"a": 5.0, "b": 4.0, "c": 3.0}, opened, c) == pytest.approx(
        {"a": 2.4911246761958425, "b": 2.034603300511882, "c": 0.0}, rel=1e-12)
    # a tie at the bottom: both tied are unregulated
    assert regulation_strengths({"a": 5.0, "b": 3.0, "c": 3.0}, opened, c) == pytest.approx(
        {"a": 2.4911246761958425, "b": 0.0, "c": 0.0}, rel=1e-12)
    # b's window closed: only a
    assert regulation_strengths({"a": 5.0, "b": 4.0, "c": 3.0}, {"a": True, "b": False, "c": True}, c) == \
        pytest.approx({"a": 2.4911246761958425, "b": 0.0, "c": 0.0}, rel=1e-12)


def test_zero_scores():
    c = {"a": 0.95, "v": 0.95}
    both = {"a": True, "v": True}
    assert regulation_strengths({"a": 2.0, "v": 0.0}, both, c) == pytest.approx({"a": 2.4911246761958425, "v": 0.0})
    assert regulation_strengths({"a": 0.0, "v": 0.0}, both, c) == {"a": 0.0, "v": 0.0}


# ---------------------------------------------------------------- gradient stage by hand

def _hand_method(fisher_gradients):
    method = InfoReg(fisher_gradients=fisher_gradients)
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    p.grad = torch.tensor([[0.1, 0.1]])
    method.params = {"a": [p]}
    method.fisher_params = {"a": [p]}
    method.fisher = {"a": torch.zeros(())}
    method.anchor = {"a": [torch.tensor([[0.5, 2.5]])]}
    method.betas = {"a": 2.0}
    return method, p


def test_proximal_gradient_and_fisher_trace_by_hand():
    # grad += beta (theta - theta0) = [0.1, 0.1] + 2 * [0.5, -0.5] = [1.1, -0.9]
    method, p = _hand_method("loss")
    method.on_after_backward(None, None, None)
    torch.testing.assert_close(p.grad, torch.tensor([[1.1, -0.9]]))
    assert float(method.fisher["a"]) == pytest.approx(0.01)  # mean(0.1^2, 0.1^2): read before the proximal term
    method, p = _hand_method("final")
    method.on_after_backward(None, None, None)
    assert float(method.fisher["a"]) == pytest.approx((1.21 + 0.81) / 2)  # the official: after it


def test_fisher_trace_sums_the_per_weight_means_of_the_summed_squares():
    method = InfoReg()
    w1 = torch.nn.Parameter(torch.zeros(2, 2))
    w2 = torch.nn.Parameter(torch.zeros(1, 1))
    method.fisher_params = {"a": [w1, w2]}
    method.fisher = {"a": torch.zeros(())}
    w1.grad, w2.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0]])
    method.accumulate_fisher()  # (1 + 4 + 9 + 16)/4 + 4 = 11.5
    w1.grad, w2.grad = torch.ones(2, 2), torch.tensor([[0.0]])
    method.accumulate_fisher()  # + 1 + 0
    # mean over elements of the steps' summed squares: ((1+1) + (4+1) + (9+1) + (16+1))/4 + (4 + 0) = 12.5
    assert float(method.fisher["a"]) == pytest.approx(12.5)


# ---------------------------------------------------------------- one real step

def _run(mods, fusion="concat", **kwargs):
    model = tiny_model(mods, fusion=fusion, classes=3)
    method = InfoReg(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=3)
    method.setup(run)
    return run


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
def test_one_step_multi_loss_and_proximal_pull_towards_the_epoch_anchor(mods):
    run = _run(mods, beta=0.95)
    method, model = run.method, run.model
    method.begin_epoch(run, 0)  # epoch 0: every window open, anchors taken
    shifts = {"a": 0.1, "b": -0.2, "c": 0.05}
    with torch.no_grad():  # move the encoders away from their anchors by known amounts
        for m in mods:
            for p in model.encoders[m].parameters():
                p.add_(shifts[m])
    x = inputs(mods, n=8)
    batch = Batch(x, Y, torch.arange(8))
    out = model(x)
    losses = method.loss(run, batch, out)
    uni = model.fusion.unimodal_logits(out.features)
    expected = F.cross_entropy(out.logits, Y) + sum(F.cross_entropy(z, Y) for z in uni.values())
    torch.testing.assert_close(losses["loss"], expected)
    run.zero_grad()
    losses["loss"].backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.on_after_backward(run, batch, out)
    # S_m = batch sum of true-class probabilities; beta_m = 0.95 exp(tanh(S_m - min S)) when ahead of the weakest
    s = {m: float(torch.softmax(uni[m].detach(), 1)[torch.arange(8), Y].sum()) for m in mods}
    low = min(s.values())
    beta = {m: 0.95 * math.exp(math.tanh(v - low)) if v > low else 0.0 for m, v in s.items()}
    assert sum(b > 0 for b in beta.values()) == len(mods) - 1
    for m in mods:
        assert float(losses[f"inforeg/beta/{m}"]) == pytest.approx(beta[m], rel=1e-5)
        for name, p in model.encoders[m].named_parameters():
            torch.testing.assert_close(p.grad, raw[f"encoders.{m}.{name}"] + beta[m] * shifts[m], atol=1e-5, rtol=1e-5)
    for name, p in model.fusion.named_parameters():  # the head is never regulated
        torch.testing.assert_close(p.grad, raw[f"fusion.{name}"])
    # the Fisher trace of this step: per encoder, the weights' mean squared loss gradient, summed
    for m in mods:
        trace = sum(float(raw[f"encoders.{m}.{n}"].pow(2).mean()) for n, p in model.encoders[m].named_parameters()
                    if p.dim() > 1)
        assert float(method.fisher[m]) == pytest.approx(trace, rel=1e-5)


def test_no_window_open_means_plain_multi_loss_training():
    run = _run(("a", "b"), window_epochs=1)
    run.method.traces = {"a": [5.0, 5.0], "b": [5.0, 5.0]}  # flat traces, W = 1: (5 - 5)/5 = 0 -> closed
    run.method.begin_epoch(run, 2)
    assert run.method.open == {"a": False, "b": False} and run.method.anchor == {}
    x = inputs(("a", "b"), n=8)
    batch = Batch(x, Y, torch.arange(8))
    out = run.model(x)
    losses = run.method.loss(run, batch, out)
    losses["loss"].backward()
    raw = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.method.on_after_backward(run, batch, out)
    assert all(torch.equal(p.grad, raw[n]) for n, p in run.model.named_parameters())
    assert float(losses["inforeg/beta/a"]) == float(losses["inforeg/beta/b"]) == 0.0


def test_epoch_end_records_the_trace_and_the_next_window_reads_it():
    run = _run(("a", "b"), window_epochs=2)
    method = run.method
    method.begin_epoch(run, 0)
    method.fisher = {"a": torch.tensor(3.0), "b": torch.tensor(1.0)}
    method.on_epoch_end(run, 0)
    assert method.traces == {"a": [3.0], "b": [1.0]} and method.anchor == {}
    method.begin_epoch(run, 1)
    assert method.indicators == {"a": 1.0, "b": 1.0}
    method.fisher = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    method.on_epoch_end(run, 1)
    method.begin_epoch(run, 2)
    # W = 2: a [0, 0, 3, 1]: (2 - 1.5)/2 = 0.25; b [0, 0, 1, 3]: (2 - 0.5)/2 = 0.75
    assert method.indicators == pytest.approx({"a": 0.25, "b": 0.75})


def test_window_sources_own_sum_or_one_modality():
    traces = {"a": [1.0, 8.5, 1.5], "b": [4.0, 2.0, 1.0]}  # W = 2: k_a = 0.05, k_b = -1
    ks = {}
    for source in ("own", "sum", "a", "b"):
        run = _run(("a", "b"), window_epochs=2, window_source=source)
        run.method.traces = {m: list(v) for m, v in traces.items()}
        ks[source] = run.method.window_indicators()
    assert ks["own"] == pytest.approx({"a": 0.05, "b": -1.0})
    # sum [5, 10.5, 2.5]: last (10.5+2.5)/2 = 6.5, before (5+10.5)/2 = 7.75 -> (6.5 - 7.75)/6.5
    assert ks["sum"] == pytest.approx({"a": -1.25 / 6.5, "b": -1.25 / 6.5})
    assert ks["a"] == pytest.approx({"a": 0.05, "b": 0.05}) and ks["b"] == pytest.approx({"a": -1.0, "b": -1.0})


def test_constants_per_modality_and_refusals():
    run = _run(("a", "b"), beta=0.5, beta_per_modality={"a": 0.95})
    assert run.method.constants == {"a": 0.95, "b": 0.5}
    with pytest.raises(UserError, match="window_source='video'"):
        _run(("a", "b"), window_source="video")
    with pytest.raises(UserError, match="beta_per_modality names \\['video'\\]"):
        _run(("a", "b"), beta_per_modality={"video": 0.1})
    with pytest.raises(UserError, match="per-modality logits"):
        _run(("a", "b"), fusion="gated")


def test_mean_scores_divide_by_the_batch():
    run = _run(("a", "b"), score="mean")
    uni = {"a": torch.tensor([[0.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])}
    # a: (0.5 + 0.5)/2 = 0.5; b: (0.75 + 0.5)/2 = 0.625 (labels 0, 0)
    assert run.method.scores(run, uni, torch.tensor([0, 0])) == pytest.approx({"a": 0.5, "b": 0.625})
    run.method.score = "sum"
    assert run.method.scores(run, uni, torch.tensor([0, 0])) == pytest.approx({"a": 1.0, "b": 1.25})


# ---------------------------------------------------------------- run-level: FLOPs, resume, sweep

def test_train_step_flops_exceed_the_baselines():
    from test_methods import make_run

    flops = {}
    for name in ("baseline", "inforeg"):
        run = make_run(compose_cfg([f"method={name}"]))
        batch = next(iter(run.train_loader))
        _, flops[name] = count_flops(run.method.training_step, run, batch)
    assert flops["inforeg"] > flops["baseline"]  # the per-modality logits and their losses' backward


def test_state_is_the_trace_history_and_rebuilds_the_windows():
    run = _run(("a", "b"), window_epochs=2)
    run.method.traces = {"a": [1.0, 8.5, 1.5], "b": [1.0, 8.5, 1.6]}
    state = run.method.state_dict()
    fresh = _run(("a", "b"), window_epochs=2)
    fresh.method.load_state_dict(state)
    assert fresh.method.traces == run.method.traces
    fresh.method.begin_epoch(fresh, 3)
    assert fresh.method.open == {"a": False, "b": True}


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """W = 1 and a high threshold make the windows of epoch 2 depend on the traces of epochs 0 and 1."""
    from conftest import straight_and_resumed, without_times

    overrides = ["method=inforeg", *THREE, "trainer.epochs=3", "dataset.num_samples=64", "method.window_epochs=1",
                 "method.threshold=0.2", "eval.shapley_every=0"]
    straight, resumed = straight_and_resumed(tmp_path, overrides, 2, monkeypatch)
    assert resumed["processes"] == 2
    # epoch 2's windows came from the restored traces (an empty history would have opened them: k = 1)
    rows = (tmp_path / "resumed" / "history.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("train/inforeg/k/audio")]) != 1.0

    assert without_times(resumed["metrics"]) == without_times(straight["metrics"])


def test_the_official_asymmetric_settings_validate():
    # (the balance-curve sweep over beta is checked with the others in tests/test_studies.py)
    validate(compose_cfg(["method=inforeg", "method.beta_per_modality={audio: 0.95, visual: 0.1}",
                          "method.window_source=audio", "method.fisher_gradients=final"]))
