"""Gradient-Blending: the OGR weights, the blended loss, the held-out part, the estimators' wiring."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import THREE, compose_cfg
from mmbalance.methods.gblending import FUSED, GBlending, blend_weights, blended_loss
from mmbalance.models.multimodal import Output
from test_methods import make_run


def test_blend_weights_from_two_checkpoints_by_hand():
    before = {"fused": (1.0, 1.2), "a": (1.0, 1.1), "v": (1.5, 1.6)}
    after = {"fused": (0.5, 0.9), "a": (0.6, 1.0), "v": (1.2, 1.7)}
    # fused: dG = 1.2-0.9 = 0.3; O 0.2 -> 0.4, dO = 0.2; raw = 0.3/0.04 = 7.5
    # a:     dG = 1.1-1.0 = 0.1; O 0.1 -> 0.4, dO = 0.3; raw = 0.1/0.09 = 1.1111
    # v:     dG = -0.1 -> floor 1e-4; O 0.1 -> 0.5, dO = 0.4; raw = 1e-4/0.16 = 6.25e-4
    raw = {"fused": 7.5, "a": 0.1 / 0.09, "v": 6.25e-4}
    total = sum(raw.values())  # 8.6117361; fused 7.5 / 8.6117361 = 0.8709045
    w = blend_weights(before, after, gain_floor=1e-4, overfit_floor=1e-3)
    assert w == pytest.approx({k: v / total for k, v in raw.items()})
    assert w["fused"] == pytest.approx(0.8709045, abs=1e-6) and sum(w.values()) == pytest.approx(1.0)


def test_blend_weights_floor_a_flat_overfitting_change_and_use_its_square():
    # a: dO = 0 -> floored at 1e-3: raw = 0.01 / 1e-6 = 1e4; b: dO = -0.1 (less overfitting): raw = 0.01/0.01 = 1
    w = blend_weights({"a": (1.0, 1.0), "b": (1.0, 1.0)}, {"a": (0.99, 0.99), "b": (0.89, 0.99)})
    assert w == pytest.approx({"a": 1e4 / (1e4 + 1), "b": 1 / (1e4 + 1)})


def test_blended_loss_value_by_hand():
    # CE: fused [0, 0] -> ln 2 = 0.693147; a [ln3, 0] (p=.75) -> 0.287682; v [0, ln3] (p=.25) -> ln 4 = 1.386294
    # 0.5*0.693147 + 0.3*0.287682 + 0.2*1.386294 = 0.346574 + 0.086305 + 0.277259 = 0.710137
    method = GBlending()
    method.weights = {FUSED: 0.5, "a": 0.3, "v": 0.2}
    ln3 = math.log(3.0)
    method.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(1, 2), "v": torch.nn.Linear(1, 2)})
    with torch.no_grad():
        for m, w in (("a", [[ln3], [0.0]]), ("v", [[0.0], [ln3]])):
            method.heads[m].weight.copy_(torch.tensor(w))
            method.heads[m].bias.zero_()
    run = SimpleNamespace(model=SimpleNamespace(modalities=["a", "v"]))
    out = Output(torch.zeros(1, 2), {"a": torch.ones(1, 1), "v": torch.ones(1, 1)})
    losses = method.loss(run, SimpleNamespace(label=torch.tensor([0])), out)
    assert float(losses["loss"].detach()) == pytest.approx(0.710137, abs=1e-6)
    assert float(losses["ce/a"]) == pytest.approx(-math.log(0.75), abs=1e-6)
    assert float(blended_loss({"x": torch.tensor(2.0)}, {"x": 0.25})) == 0.5


@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
def test_held_out_part_never_overlaps_the_training_loader(three):
    cfg = compose_cfg(["method=gblending", "method.holdout_fraction=0.25", *(THREE if three else [])])
    run = make_run(cfg)
    method = run.method
    n = len(run.train_loader.dataset.dataset)  # the Subset's parent: the original training split
    train_idx = torch.cat([b.index for b in run.train_loader]).tolist()
    held_idx = torch.cat([b.index for b in method.holdout_loader]).tolist()
    assert len(train_idx) == len(set(train_idx)) and not set(train_idx) & set(held_idx)
    assert sorted(train_idx + held_idx) == list(range(n))
    assert len(held_idx) == pytest.approx(0.25 * n, abs=len(set(run.train_loader.dataset.dataset.labels.tolist())))
    assert set(method.weights) == {FUSED, *run.model.modalities}


def test_aux_heads_are_owned_and_unimodal_losses_leave_the_fusion_head_alone():
    run = make_run(compose_cfg(["method=gblending"]))
    method = run.method
    head_params = {id(p) for p in method.heads.parameters()}
    assert any(head_params <= {id(p) for p in g["params"]} for g in run.optimizer.param_groups)
    method.weights = {FUSED: 0.0, **{m: 0.5 for m in run.model.modalities}}
    batch = next(iter(run.train_loader))
    out = method.forward(run, batch)
    method.loss(run, batch, out)["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in run.model.fusion.parameters())
    assert all(p.grad is not None and p.grad.any() for p in method.heads.parameters())


def test_measure_is_the_per_sample_mean_ce_in_eval_mode():
    run = make_run(compose_cfg(["method=gblending", "method.holdout_fraction=0.3"]))
    method = run.method
    got = method.measure(run, run.model, method.heads, list(method.weights))
    run.model.eval()
    with torch.no_grad():
        batches = list(method.holdout_loader)
        y = torch.cat([b.label for b in batches])
        feats = [run.model.encode(b.inputs) for b in batches]
        fused = torch.cat([run.model.fuse(f) for f in feats])
        first = run.model.modalities[0]
        uni = torch.cat([method.heads[first](f[first]) for f in feats])
    assert got[FUSED][1] == pytest.approx(float(F.cross_entropy(fused, y)), rel=1e-5)
    assert got[first][1] == pytest.approx(float(F.cross_entropy(uni, y)), rel=1e-5)


def test_trajectory_sets_weights_at_super_epoch_boundaries_from_the_last_two_measures():
    method = GBlending(super_epoch=2)
    method.weights = {FUSED: 1 / 3, "a": 1 / 3, "v": 1 / 3}
    measures = iter([
        {FUSED: (1.0, 1.2), "a": (1.0, 1.1), "v": (1.5, 1.6)},
        {FUSED: (0.5, 0.9), "a": (0.6, 1.0), "v": (1.2, 1.7)},
    ])
    method.measure = lambda *args: next(measures)
    run = SimpleNamespace(model=None)
    method.on_epoch_start(run, 0)  # first boundary: measure only, weights stay uniform
    assert method.weights == {FUSED: 1 / 3, "a": 1 / 3, "v": 1 / 3}
    method.on_epoch_start(run, 1)  # inside a super-epoch: nothing
    method.on_epoch_start(run, 2)
    assert method.weights == pytest.approx(blend_weights(
        {FUSED: (1.0, 1.2), "a": (1.0, 1.1), "v": (1.5, 1.6)}, {FUSED: (0.5, 0.9), "a": (0.6, 1.0), "v": (1.2, 1.7)}))


def test_trial_estimator_trains_copies_and_leaves_the_run_model_untouched():
    run = make_run(compose_cfg(["method=gblending", "method.estimator=trial", "method.super_epoch=1",
                                 "dataset.num_samples=40"]))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.method.on_epoch_start(run, 0)
    w = run.method.weights
    assert set(w) == {FUSED, *run.model.modalities} and sum(w.values()) == pytest.approx(1.0)
    assert all(torch.equal(before[n], p) for n, p in run.model.named_parameters())
    assert all(g["params"][0].grad is None for g in run.optimizer.param_groups)


def test_slice_heads_use_the_fusion_blocks_and_train():
    run = make_run(compose_cfg(["method=gblending", "method.unimodal_heads=slice"]))
    method = run.method
    assert method.heads is None and method.needs_unimodal_logits
    batch = next(iter(run.train_loader))
    assert torch.isfinite(method.training_step(run, batch)["loss"])
    with torch.no_grad():
        feats = run.model.encode(batch.inputs)
        fused, uni = method.eval_fuse(run, feats)
    torch.testing.assert_close(sum(uni.values()), fused)  # concat slices sum to the fused logits


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_trial_optimizer_is_fresh_with_the_runs_settings_at_the_current_lr(cls):
    from mmbalance.methods.gblending import fresh_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = fresh_optimizer(cls(p, lr=1e-3, weight_decay=0.01), p, lr=0.5)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01
    assert not opt.state


def test_trial_estimates_reuse_one_trial_loader(monkeypatch):
    run = make_run(compose_cfg(["method=gblending", "method.estimator=trial", "method.super_epoch=1",
                                 "dataset.num_samples=40"]))
    made, original = [], run.make_loader

    def counting(dataset, train, shard=True, indices=None):
        made.append(original(dataset, train, shard, indices))
        return made[-1]

    monkeypatch.setattr(run, "make_loader", counting)
    for epoch in (0, 1):
        run.epoch = epoch
        run.method.on_epoch_start(run, epoch)
    assert len(made) == 1  # built once
    trial = made[0]
    assert trial.batch_sampler.sampler.world_size == 1  # the whole training split on every rank
    assert trial.dataset is run.train_loader.dataset and trial.sampler.epoch == 10_001  # its own order per boundary
