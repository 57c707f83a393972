"""OLM (Online Logit Modulation): its per-step formulas against hand-computed numbers, the reference-loss warm-up,
the held-out stream, the weights' own optimiser, resume and FLOPs."""

import csv
import io
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import THREE, compose_cfg, read_metrics, train_in_process
from mmbalance.config import build
from mmbalance.errors import UserError
from mmbalance.methods.olm import (FUSED, OLM, OLMWeights, heldout_ratios, norm_loss, norm_targets,
                                   scratch_buffers, train_ratios)
from mmbalance.metrics.flops import count_flops
from mmbalance.models.multimodal import Output
from mmbalance.train import build_run
from test_methods import assert_same_state, make_run

T = torch.tensor


# ---------------------------------------------------------------- the formulas, by hand

def test_heldout_ratios_by_hand():
    # G = He0 - He = [1.5-1.1, 1.4-1.3, 1.0-0.9] = [0.4, 0.1, 0.1]
    # Cv = L0 - L - G = [2.0-1.0-0.4, 1.5-1.2-0.1, 1.0-0.8-0.1] = [0.6, 0.2, 0.1]
    # G/Cv = [0.666667, 0.5, 1.0]; exp = [1.947734, 1.648721, 2.718282], sum 6.314737
    r = heldout_ratios(T([1.0, 1.2, 0.8]), T([1.1, 1.3, 0.9]), T([2.0, 1.5, 1.0]), T([1.5, 1.4, 1.0]))
    assert r.tolist() == pytest.approx([0.308443, 0.261091, 0.430466], abs=1e-6)


def test_heldout_ratios_at_the_reference_step_are_uniform():
    # the step that records the references: G = 0 and Cv = 0, both clamped to 1e-6, so every ratio is 1
    losses, held = T([0.9, 1.3, 0.7]), T([1.0, 1.1, 0.8])
    assert heldout_ratios(losses, held, losses.clone(), held.clone()).tolist() == pytest.approx([1 / 3] * 3)


def test_heldout_ratios_clamp_a_falling_generalisation_and_a_negative_convergence():
    # G = [0.5, -0.2, 0.1]: the second branch's held-out loss rose -> 1e-6 / Cv, ~0
    # Cv = [1.0-0.9-0.5, 1.0-0.7+0.2, 1.0-0.8-0.1] = [-0.4 -> 1e-6, 0.5, 0.1]: the first is 0.5 / 1e-6 = 5e5
    r = heldout_ratios(T([0.9, 0.7, 0.8]), T([0.5, 1.2, 0.9]), T([1.0, 1.0, 1.0]), T([1.0, 1.0, 1.0]))
    assert r.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)


def test_heldout_ratios_for_three_modalities_and_the_fused_branch():
    # K = 4: G = [0.3, 0.1, 0.1, 0.0 -> 1e-6], Cv = [0.1, 0.2, 0.2, 0.1] -> G/Cv = [3, 0.5, 0.5, 1e-5]
    # exp = [20.085537, 1.648721, 1.648721, 1.000010], sum 24.382990
    train, ref = T([1.0, 1.0, 1.0, 1.0]), T([1.4, 1.3, 1.3, 1.1])
    held, held_ref = T([0.7, 0.9, 0.9, 1.0]), T([1.0, 1.0, 1.0, 1.0])
    r = heldout_ratios(train, held, ref, held_ref)
    assert r.tolist() == pytest.approx([0.823752, 0.067618, 0.067618, 0.041013], abs=1e-6)
    assert r[1] == r[2]  # a tie stays a tie


def test_train_ratios_by_hand():
    # rho = [0.6/1.0, 0.5/2.0] = [0.6, 0.25] -> [0.6/0.85, 0.25/0.85]
    assert train_ratios(T([0.6, 0.5]), T([1.0, 2.0])).tolist() == pytest.approx([0.705882, 0.294118], abs=1e-6)
    # equal progress everywhere: a tie, uniform
    assert train_ratios(T([0.5, 1.0, 0.3]), T([1.0, 2.0, 0.6])).tolist() == pytest.approx([1 / 3] * 3)


def test_norm_targets_and_loss_by_hand():
    # w = [1, 2, 0.5], ||z|| = [[3, 1, 4], [2, 2, 2]] -> n = [[3, 2, 2], [2, 4, 1]], per-sample total 7 and 7
    w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    logit_norms = T([[3.0, 1.0, 4.0], [2.0, 2.0, 2.0]])
    r = T([0.5, 0.25, 0.25])
    n = w.detach()[None, :] * logit_norms
    # total: targets 7 * r = [3.5, 1.75, 1.75] for both samples
    assert norm_targets(n, r, "total").tolist() == [[3.5, 1.75, 1.75], [3.5, 1.75, 1.75]]
    # |n - t| = [[0.5, 0.25, 0.25], [1.5, 2.25, 0.75]] -> 1.0 + 4.5 = 5.5
    loss = norm_loss(w, logit_norms, r, "total")
    assert float(loss.detach()) == pytest.approx(5.5)
    # d/dw_k = sum_i sign(n_ik - t_ik) ||z_ik||: [-3 - 2, 1 + 2, 4 - 2] = [-5, 3, 2]
    loss.backward()
    assert w.grad.tolist() == [-5.0, 3.0, 2.0]
    # mean (the com engine's literal): targets 7/3 * r = [7/6, 7/12, 7/12]
    # |n - t| = [[11/6, 17/12, 17/12], [5/6, 41/12, 5/12]] -> 14/3 + 14/3 = 28/3
    assert float(norm_loss(w, logit_norms, r, "mean").detach()) == pytest.approx(28 / 3)


def test_norm_loss_of_zero_logits_is_zero_with_zero_gradient():
    w = torch.ones(3, requires_grad=True)
    loss = norm_loss(w, torch.zeros(4, 3), T([0.2, 0.3, 0.5]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and w.grad.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- one step of the method, by hand

def _bare_olm(reference_epochs=1, target="total"):
    """OLM on two modalities a, b with slice logits (no model needed) and a stubbed held-out pass."""
    method = OLM(unimodal_heads="slice", reference_epochs=reference_epochs, target=target)
    method.branches = ["a", "b", FUSED]
    method.weights = OLMWeights(3)
    method.weight_optimizer = torch.optim.Adam(method.weights.parameters(), lr=1e-3)
    return method


def _run(epoch):
    return SimpleNamespace(epoch=epoch, world_size=1, reduce=lambda s: s, sync_gradients=lambda params=None: None)


def _step(method, epoch, logits, heldout):
    """One step: loss, its backward, on_after_backward (w's Adam); label 0, one sample, two classes."""
    method.heldout_losses = lambda run: T(heldout)
    z = {k: T([v]) for k, v in logits.items()}
    out = Output(z[FUSED], {"a": torch.zeros(1, 1), "b": torch.zeros(1, 1)}, unimodal={"a": z["a"], "b": z["b"]})
    batch = SimpleNamespace(label=torch.tensor([0]))
    run = _run(epoch)
    losses = method.loss(run, batch, out)
    losses["loss"].backward()
    method.on_after_backward(run, batch, out)
    return {k: v.detach() for k, v in losses.items()}


LN2, LN3, LN7 = math.log(2), math.log(3), math.log(7)
ZERO = {"a": [0.0, 0.0], "b": [0.0, 0.0], FUSED: [0.0, 0.0]}
SECOND = {"a": [LN3, 0.0], "b": [0.0, 0.0], FUSED: [LN7, 0.0]}  # p[y] = 3/4, 1/2, 7/8


def test_a_step_in_the_first_epoch_records_the_references_and_moves_nothing():
    method = _bare_olm()
    losses = _step(method, 0, ZERO, [0.7, 0.8, 0.9])
    # zero logits: CE = ln 2 for every branch whatever w; references = this step's losses; r uniform
    assert float(losses["loss"]) == pytest.approx(3 * LN2)
    assert method.train_reference.tolist() == pytest.approx([LN2] * 3)
    assert method.heldout_reference.tolist() == pytest.approx([0.7, 0.8, 0.9])
    assert [float(losses[f"r/{k}"]) for k in ("a", "b", FUSED)] == pytest.approx([1 / 3] * 3)
    # no gradient reaches w (zero logits, zero norms): Adam's first step leaves it at 1
    assert float(losses["norm_loss"]) == 0.0 and method.weights.w.tolist() == [1.0, 1.0, 1.0]


def test_a_step_after_the_first_epoch_uses_the_recorded_references():
    method = _bare_olm()
    _step(method, 0, ZERO, [0.7, 0.8, 0.9])
    losses = _step(method, 1, SECOND, [0.6, 0.85, 0.5])
    # L = [-ln 0.75, ln 2, ln 8/7] = [0.287682, 0.693147, 0.133531], sum 1.114361
    assert [float(losses[f"ce/{k}"]) for k in ("a", "b", FUSED)] == pytest.approx([0.287682, 0.693147, 0.133531],
                                                                                   abs=1e-6)
    assert float(losses["loss"]) == pytest.approx(1.114361, abs=1e-6)
    # G = [0.1, -0.05 -> 1e-6, 0.4]; Cv = L0 - L - G = [0.305465, 0.05, 0.159616]
    # G/Cv = [0.327370, 2e-5, 2.506018] -> softmax [0.094740, 0.068292, 0.836968]
    r = [float(losses[f"r/{k}"]) for k in ("a", "b", FUSED)]
    assert r == pytest.approx([0.094740, 0.068292, 0.836968], abs=1e-6)
    # n = [ln 3, 0, ln 7] = [1.098612, 0, 1.945910], total 3.044522 -> targets [0.288439, 0.207916, 2.548168]
    # L_norm = 0.810173 + 0.207916 + 0.602258 = 1.620347
    assert float(losses["norm_loss"]) == pytest.approx(1.620347, abs=1e-6)
    assert method.train_reference.tolist() == pytest.approx([LN2] * 3)  # kept after the first epoch
    # w's gradient: CE (p[y] - 1) * ||z|| + sign(n - t) * ||z||:
    #   a: -0.25 * 1.098612 + 1.098612 = +0.823959;  b: 0;  fused: -0.125 * 1.945910 - 1.945910 = -2.189149
    # Adam's second step (the first had a zero gradient): m_hat / sqrt(v_hat) = (0.1 / 0.19) / sqrt(0.001 / 0.001999)
    #   = 0.744137 * sign(g), times lr 1e-3
    assert method.weights.w.tolist() == pytest.approx([1 - 0.000744137, 1.0, 1 + 0.000744137], abs=1e-7)


def test_the_mean_target_gives_the_com_engine_norm_loss():
    method = _bare_olm(target="mean")
    _step(method, 0, ZERO, [0.7, 0.8, 0.9])
    losses = _step(method, 1, SECOND, [0.6, 0.85, 0.5])
    # targets 3.044522 / 3 * r = [0.096146, 0.069305, 0.849389]: |n - t| = 1.002466 + 0.069305 + 1.096521
    assert float(losses["norm_loss"]) == pytest.approx(2.168292, abs=1e-6)


def test_reference_epochs_sets_where_the_references_stop_moving():
    # reference_epochs=2: epoch 1 still records, so its ratios are uniform again
    method = _bare_olm(reference_epochs=2)
    _step(method, 0, ZERO, [0.7, 0.8, 0.9])
    losses = _step(method, 1, SECOND, [0.6, 0.85, 0.5])
    assert [float(losses[f"r/{k}"]) for k in ("a", "b", FUSED)] == pytest.approx([1 / 3] * 3)
    assert method.heldout_reference.tolist() == pytest.approx([0.6, 0.85, 0.5])
    # reference_epochs=0: the first step's losses, never overwritten afterwards, even within epoch 0
    method = _bare_olm(reference_epochs=0)
    _step(method, 0, ZERO, [0.7, 0.8, 0.9])
    losses = _step(method, 0, SECOND, [0.6, 0.85, 0.5])
    assert method.heldout_reference.tolist() == pytest.approx([0.7, 0.8, 0.9])
    assert float(losses["r/fused"]) == pytest.approx(0.836968, abs=1e-6)


# ---------------------------------------------------------------- in a run

@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
def test_held_out_part_is_never_trained_on_and_the_branches_follow_the_modalities(three):
    run = make_run(compose_cfg(["method=olm", "method.holdout_fraction=0.25", *(THREE if three else [])]))
    method = run.method
    n = len(run.train_loader.dataset.dataset)
    train_idx = torch.cat([b.index for b in run.train_loader]).tolist()
    held_idx = method.holdout_indices.tolist()
    assert not set(train_idx) & set(held_idx) and sorted(train_idx + held_idx) == list(range(n))
    assert method.branches == [*run.model.modalities, FUSED]
    assert method.weights.w.shape == (len(run.model.modalities) + 1,)
    stats = run.method.training_step(run, next(iter(run.train_loader)))
    logged = {f"{what}/{k}" for what in ("w", "r", "ce", "heldout_ce") for k in method.branches}
    assert logged <= set(stats)


def _stream(run, epoch, steps):
    run.epoch = epoch
    run.method.on_epoch_start(run, epoch)
    return [run.method.next_heldout(run).index.tolist() for _ in range(steps)]


def test_the_held_out_stream_is_reproducible_under_the_seed_and_restarts_each_epoch():
    cfg = compose_cfg(["method=olm", "method.holdout_fraction=0.5"])
    a, b = make_run(cfg), make_run(cfg)
    first = _stream(a, 0, 5)
    assert first == _stream(b, 0, 5)  # a second run of the same seed draws the same batches
    assert _stream(a, 1, 3) == _stream(b, 1, 3) != first[:3]  # another epoch, another order
    assert _stream(a, 0, 5) == first  # an epoch restarts its stream (what a resumed run does)
    held = set(a.method.holdout_indices.tolist())
    assert all(set(batch) <= held for batch in first)
    # the stream cycles: more batches than one pass holds, and every pass covers the held-out part
    per_pass = math.ceil(len(held) / 16)
    assert set(sum(first[:per_pass], [])) == held
    seeded = {}
    for seed in (0, 1):  # through the trainer's builder, which gives the run its seed
        run = build_run(compose_cfg(["method=olm", "method.holdout_fraction=0.5", f"seed={seed}"]), torch.device("cpu"))
        run.method.setup(run)
        seeded[seed] = _stream(run, 0, 3)
    assert seeded[0] != seeded[1]


def test_the_held_out_pass_leaves_the_batchnorm_statistics_alone():
    run = make_run(compose_cfg(["method=olm"]))
    before = {k: b.clone() for k, b in run.model.named_buffers()}
    with torch.no_grad():
        run.method.heldout_losses(run)
    assert all(torch.equal(before[k], b) for k, b in run.model.named_buffers())
    model = torch.nn.BatchNorm1d(2)
    with scratch_buffers(model):
        model(torch.randn(4, 2))
    assert model.running_mean.tolist() == [0.0, 0.0] and int(model.num_batches_tracked) == 0


def test_weights_have_their_own_optimizer_saved_and_restored():
    cfg = compose_cfg(["method=olm"])
    run = make_run(cfg)
    w = run.method.weights.w
    assert all(all(p is not w for p in g["params"]) for g in run.optimizer.param_groups)  # not the run's
    batches = iter(run.train_loader)
    for _ in range(2):
        run.method.training_step(run, next(batches))
    assert not torch.equal(w.detach(), torch.ones_like(w))  # w moved
    assert w.grad is None  # and its gradient does not linger into the next step
    state = run.method.state_dict()
    assert state["weight_optimizer"]["state"][0]["step"] == 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = make_run(cfg)
    fresh.method.load_state_dict(torch.load(buffer, weights_only=False))
    assert_same_state(fresh.method.state_dict(), state)
    assert torch.equal(fresh.method.weights.w, w)


def test_the_held_out_forward_is_counted_in_the_step_flops():
    def step_flops(variant):
        fraction = ["method.holdout_fraction=0.5"] if variant == "heldout" else []  # variant=train holds none out
        run = make_run(compose_cfg(["method=olm", f"method.variant={variant}", *fraction]))
        batch = next(iter(run.train_loader))
        _, flops = count_flops(run.method.training_step, run, batch)
        return run, flops

    run, with_heldout = step_flops("heldout")
    _, without = step_flops("train")
    held = run.method.next_heldout(run)  # the same size as the step's (the first batch of a pass)

    def forward():  # the run's prediction (fused and the fusion's per-modality logits) and the aux heads
        with torch.no_grad():
            features = run.model.encode(held.inputs)
            run.model.fuse(features)
            run.model.unimodal_logits(features)
            for m in run.model.modalities:
                run.method.heads[m](features[m])

    _, expected = count_flops(forward)
    assert expected > 0 and with_heldout - without == expected


def test_olm_completes_a_run_on_three_modalities(tmp_path):
    results = train_in_process(tmp_path, ["method=olm", *THREE, "trainer.epochs=2", "dataset.num_samples=64"])
    assert results["status"] == "completed" and results["method_family"] == "objective"
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert {"train/w/text", "train/r/fused", "train/heldout_ce/visual", "train/norm_loss"} <= set(header)
    assert read_metrics(tmp_path)["config"]["method"]["weight_lr"] == 1e-3


def test_a_resumed_run_gives_the_uninterrupted_result(tmp_path):
    # w, its Adam state, the reference losses and the held-out stream all come back from the checkpoint
    small = ["method=olm", "dataset.num_samples=64"]
    straight = train_in_process(tmp_path / "straight", [*small, "trainer.epochs=2"])
    train_in_process(tmp_path / "resumed", [*small, "trainer.epochs=1"])
    resumed = train_in_process(tmp_path / "resumed", [*small, "trainer.epochs=2", "resume=force"])
    assert resumed["resumed_from"]["epoch"] == 0

    def rows(path):
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(open(path / "history.csv"))]

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    assert resumed["metrics"]["test/acc"] == straight["metrics"]["test/acc"]


def test_a_holdout_fraction_is_refused_where_nothing_is_held_out():
    # variant=train holds out no data: a non-default fraction used to be ignored without a word
    with pytest.raises(UserError, match="method.holdout_fraction=0.5 is used only by method.variant=heldout"):
        OLM(variant="train", holdout_fraction=0.5)
    OLM(variant="heldout", holdout_fraction=0.5)
    cfg = compose_cfg(["method=olm", "method.variant=train"])  # the config's (default) fraction is fine
    run = make_run(cfg)
    assert run.method.holdout_loader is None and len(run.train_loader.dataset) == len(build(cfg.dataset).train)
