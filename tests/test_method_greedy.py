"""Greedy (ICML 2022): MMTM gating, learning-speed accumulators, the switch rule and the curation window."""

import math

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from mmbalance.errors import UserError
from mmbalance.methods.greedy import MMTM, Greedy, bdr_difference, learning_speed_ratio
from mmbalance.models.encoders import ResNet18Encoder, SmallCNN
from mmbalance.models.greedy import GreedyModel
from test_methods import make_run

S3 = 1 / (1 + math.exp(-3))  # sigmoid(3) = 0.9525741
S2 = 1 / (1 + math.exp(-2))  # sigmoid(2) = 0.8807971


def hand_block():
    """c_0 = c_1 = 1, ratio 4 -> hidden int(2*2/4) = 1; squeeze s -> s_0 + s_1, gate_0 = sig(e), gate_1 = sig(-e)."""
    block = MMTM((1, 1), ratio=4)
    with torch.no_grad():
        block.squeeze.weight.copy_(torch.tensor([[1.0, 1.0]]))
        block.squeeze.bias.zero_()
        block.excite[0].weight.fill_(1.0)
        block.excite[0].bias.zero_()
        block.excite[1].weight.fill_(-1.0)
        block.excite[1].bias.zero_()
    return block


def test_mmtm_squeeze_and_excite_by_hand():
    block = hand_block().eval()
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # channel mean 2.5
    x1 = torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2)  # channel mean 0.5
    # s = [2.5, 0.5] -> e = relu(3) = 3 -> gate_0 = sig(3), gate_1 = sig(-3) = 1 - sig(3)
    y0, y1 = block(x0, x1, batch_size=1)
    torch.testing.assert_close(y0, x0 * S3)
    torch.testing.assert_close(y1, x1 * (1 - S3))
    assert block.last_gates is None  # evaluation keeps no state


def test_mmtm_squeezes_frames_folded_into_the_batch_per_sample():
    block = hand_block().eval()
    x0 = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # one sample, two frames: mean over time 2
    x1 = torch.zeros(1, 1, 1, 1)
    # s = [2, 0] -> e = 2 -> gate_0 = sig(2) on both frames, gate_1 = sig(-2)
    y0, y1 = block(x0, x1, batch_size=1)
    torch.testing.assert_close(y0, x0 * S2)
    torch.testing.assert_close(y1, x1)


def test_running_gates_average_each_modality_over_training_forwards_and_freeze_on_demand():
    block = hand_block().train()
    xa = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    x0 = torch.cat([xa, torch.zeros_like(xa)])  # sample A gates (sig 3, 1 - sig 3); sample B (e = 0) gates (.5, .5)
    x1 = torch.cat([torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2), torch.zeros_like(xa)])
    block(x0, x1, batch_size=2)
    block.update_running()
    # batch means: gate_0 (0.9525741 + 0.5)/2 = 0.7262871, gate_1 (0.0474259 + 0.5)/2 = 0.2737129
    torch.testing.assert_close(block.running_gate_0, torch.tensor([(S3 + 0.5) / 2]))
    torch.testing.assert_close(block.running_gate_1, torch.tensor([(1 - S3 + 0.5) / 2]))  # its own gate (bug fixed)
    z = torch.zeros(1, 1, 2, 2)
    block(z, z, batch_size=1)  # gates (0.5, 0.5)
    block.update_running()
    # every forward weighs equally: (0.7262871 + 0.5)/2 = 0.6131436, (0.2737129 + 0.5)/2 = 0.3868564
    avg0, avg1 = (S3 + 0.5) / 4 + 0.25, (1 - S3 + 0.5) / 4 + 0.25
    torch.testing.assert_close(block.running_gate_0, torch.tensor([avg0]))
    torch.testing.assert_close(block.running_gate_1, torch.tensor([avg1]))
    assert int(block.updates) == 2
    # frozen=1: modality 1 gets its running average, modality 0 keeps its live gate sig(3)
    y0, y1 = block(xa, torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2), batch_size=1, frozen=1)
    torch.testing.assert_close(y0, xa * S3)
    torch.testing.assert_close(y1, torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2) * avg1)
    y0, _ = block(xa, z, batch_size=1, frozen=0)
    torch.testing.assert_close(y0, xa * avg0)


def test_learning_speed_ratio_is_summed_squared_grads_over_summed_squared_weights():
    p1 = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w||^2 = 25
    p1.grad = torch.tensor([1.0, 0.0])  # ||g||^2 = 1
    p2 = nn.Parameter(torch.tensor([[1.0]]))  # 1
    p2.grad = torch.tensor([[2.0]])  # 4
    assert float(learning_speed_ratio([p1, p2])) == pytest.approx(5 / 26)
    p3 = nn.Parameter(torch.tensor([1.0]))  # no gradient: weight counts, gradient 0 -> 5 / 27
    assert float(learning_speed_ratio([p1, p2, p3])) == pytest.approx(5 / 27)


def test_accumulators_are_cumulative_and_d_is_the_bdr_difference():
    m = Greedy()
    # A_byp = [0.2, 0.1], A_main = [0.02, 0.1]: BDR_0 = log10(10) = 1, BDR_1 = log10(1) = 0 -> d = 1
    assert m.accumulate([0.2, 0.1], [0.02, 0.1]) == pytest.approx(1.0)
    # A_byp = [0.2, 1.0], A_main = [0.1, 0.1]: BDR_0 = log10(2) = 0.30103, BDR_1 = log10(10) = 1 -> -0.69897
    assert m.accumulate([0.0, 0.9], [0.08, 0.0]) == pytest.approx(math.log10(2) - 1)
    assert m.acc["bypass"] == pytest.approx([0.2, 1.0]) and m.acc["main"] == pytest.approx([0.1, 0.1])
    assert bdr_difference({"bypass": [0.0, 1.0], "main": [1.0, 1.0]}) == 0.0  # nothing accumulated: no direction


def test_switch_rule_and_curation_window():
    m = Greedy(epsilon=0.5, window=2)

    def never():
        raise AssertionError("no accumulation while curating")

    m.advance(False, lambda: ([0.2, 0.1], [0.02, 0.1]))  # locked: accumulate (d = 1) but stay normal
    assert (m.curating, m.last_d) == (False, pytest.approx(1.0))
    m.advance(True, lambda: ([0.0, 0.0], [0.0, 0.0]))  # unlocked, d = 1 > 0.5 -> care for modality 0
    assert (m.curating, m.caring, m.curation_step) == (True, 0, 0)
    m.advance(True, never)  # curation step 1 of 2
    assert (m.curating, m.caring, m.curation_step) == (True, 0, 1)
    m.advance(True, never)  # window over
    assert (m.curating, m.caring) == (False, None)
    m.advance(True, lambda: ([0.0, 0.9], [0.08, 0.0]))  # d = -0.69897 -> care for modality 1
    assert (m.curating, m.caring) == (True, 1)
    m2 = Greedy(epsilon=2.0)
    m2.advance(True, lambda: ([0.2, 0.1], [0.02, 0.1]))  # |d| = 1 <= 2: stays normal
    assert not m2.curating


def greedy_run(*overrides):
    return make_run(compose_cfg(["method=greedy", *overrides]))


def test_after_backward_accumulates_bypass_and_main_sets_and_freezes_the_caring_gate():
    run = greedy_run()
    model = run.model
    assert isinstance(model, GreedyModel) and len(model.mmtm) == 2  # SmallCNN depth 3: after stages 1 and 2
    batch = next(iter(run.train_loader))
    method = run.method
    out = method.forward(run, batch)  # the training step, by hand, to look at the gradients before the hook
    method.backward(run, method.loss(run, batch, out))
    grads = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None}
    method.on_after_backward(run, batch, out)
    m0, m1 = model.modalities
    sums = {}
    for key, prefixes in {"byp0": ("mmtm.0.excite.0.", "mmtm.1.excite.0.", "mmtm.0.squeeze.", "mmtm.1.squeeze."),
                          "byp1": ("mmtm.0.excite.1.", "mmtm.1.excite.1.", "mmtm.0.squeeze.", "mmtm.1.squeeze."),
                          "main0": (f"encoders.{m0}.",), "main1": (f"encoders.{m1}.",)}.items():
        sel = [v for n, v in grads.items() if n.startswith(prefixes)]
        sums[key] = sum(float(g.pow(2).sum()) for _, g in sel) / sum(float(w.pow(2).sum()) for w, _ in sel)
    assert run.method.acc["bypass"] == pytest.approx([sums["byp0"], sums["byp1"]], rel=1e-4)
    assert run.method.acc["main"] == pytest.approx([sums["main0"], sums["main1"]], rel=1e-4)
    assert not run.method.curating  # epoch 0 is locked
    assert int(model.mmtm[0].updates) == 1
    # a curation step for modality 0: its gates are the running averages, so its excite layers get no gradient
    run.method.curating, run.method.caring = True, 0
    run.method.training_step(run, batch)
    assert all(b.excite[0].weight.grad is None and b.excite[1].weight.grad is not None for b in model.mmtm)
    assert run.method.curation_step == 1 and model.frozen == 0
    model.eval()
    model.encode(batch.inputs)  # evaluation: live gates, no state
    assert model.mmtm[0].last_gates is None


def test_wrapped_model_state_round_trips_and_adds_only_the_mmtm_blocks():
    run = greedy_run()
    run.method.training_step(run, next(iter(run.train_loader)))
    state = run.model.state_dict()
    assert {k.split(".")[0] for k in state} == {"encoders", "fusion", "mmtm"}
    fresh = greedy_run()
    fresh.model.load_state_dict(state)  # strict
    torch.testing.assert_close(fresh.model.mmtm[1].running_gate_1, run.model.mmtm[1].running_gate_1)
    assert any(p is fresh.model.mmtm[0].squeeze.weight for g in fresh.optimizer.param_groups for p in g["params"])


def test_encoders_without_stages_or_with_unequal_depths_are_refused():
    with pytest.raises(UserError, match="exposes no stages"):
        greedy_run("dataset.modalities.visual=vector")
    with pytest.raises(UserError, match="same depth"):
        greedy_run("backbone.encoders.image.depth=2")
    with pytest.raises(UserError, match="method.loss"):
        Greedy(loss="sum")


@pytest.mark.parametrize("shape, kw", [((1, 8, 8), {"pool": "grid"}), ((1, 20, 16), {"pool": "time_max"}),
                                       ((1, 12, 10), {"pool": "time"}), ((2, 1, 8, 8), {"width": 4})])
def test_small_cnn_stages_then_head_equal_its_forward(shape, kw):
    torch.manual_seed(0)
    enc = SmallCNN(shape, width=4, depth=3, out_dim=8, **{k: v for k, v in kw.items() if k != "width"}).eval()
    x = torch.randn(3, *shape)
    maps = enc.stage_input(x)
    for stage in enc.stages():
        maps = stage(maps)
    assert len(enc.stages()) == 3 and maps.shape[1] == enc.stage_channels()[-1]
    torch.testing.assert_close(enc.pool_head(maps, 3), enc(x))


@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 3, 16, 16)])
def test_resnet18_stages_then_head_equal_its_forward(shape):
    torch.manual_seed(0)
    enc = ResNet18Encoder(shape).eval()
    x = torch.randn(2, *shape)
    maps = enc.stage_input(x)
    for stage, c in zip(enc.stages(), enc.stage_channels()):
        maps = stage(maps)
        assert maps.shape[1] == c
    torch.testing.assert_close(enc.pool_head(maps, 2), enc(x))
