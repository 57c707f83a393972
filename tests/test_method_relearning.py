"""Diagnosing & Re-learning: purity, the soft re-initialisation blend, the schedule, and one re-learning event."""

import math

import pytest
import torch

from conftest import compose_cfg
from mmbalance.methods.relearning import (
    Relearning,
    cluster_purity,
    kmeans_purity,
    min_max_scale,
    reinit_strength,
    relearn_due,
    soft_reinit_,
)
from test_methods import assert_same_state, make_run


def test_cluster_purity_by_hand():
    # cluster 0 holds labels {0, 0, 1} -> majority 2; cluster 1 {1, 1} -> 2; cluster 2 {2} -> 1; (2+2+1)/6
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert cluster_purity(clusters, labels, 3, 3) == pytest.approx(5 / 6)
    # cluster ids are arbitrary: a permuted clustering has the same purity; a perfect one has purity 1
    assert cluster_purity(torch.tensor([2, 2, 2, 0, 0, 1]), labels, 3, 3) == pytest.approx(5 / 6)
    assert cluster_purity(labels, labels, 3, 3) == 1.0


def test_min_max_scale_to_minus_one_one_per_column_like_sklearn():
    x = torch.tensor([[0.0, 3.0], [2.0, 3.0], [4.0, 3.0]])
    # column 0: (x - 0) * 2 / 4 - 1 = -1, 0, 1; column 1 is constant: sklearn takes its range as 1 -> -1
    assert torch.equal(min_max_scale(x), torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]))


def test_kmeans_purity_on_two_obvious_clusters():
    # two far-apart pairs -> clusters {0, 1} and {2, 3}; labels (0, 1 | 0, 0) -> majorities 1 + 2 of 4
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    assert kmeans_purity(x, torch.tensor([0, 1, 0, 0]), 2, n_init=10, seed=0) == pytest.approx(0.75)
    assert kmeans_purity(x, torch.tensor([1, 1, 0, 0]), 2, n_init=10, seed=0) == 1.0


def test_strength_and_blend_by_hand():
    assert reinit_strength(0.1, 3.0) == pytest.approx(math.tanh(0.3))  # 0.2913126...
    assert reinit_strength(0.0, 3.0) == 0.0
    p = torch.tensor([1.0, 2.0])
    soft_reinit_([p], [torch.tensor([0.0, 4.0])], 0.25)
    # 0.75 * 1 + 0.25 * 0 = 0.75;  0.75 * 2 + 0.25 * 4 = 2.5
    assert torch.equal(p, torch.tensor([0.75, 2.5]))


def _schedule(epochs, every, times):
    done, fired = 0, []
    for e in range(epochs):
        if relearn_due(e, every, done, times):
            fired.append(e)
            done += 1
    return fired


def test_schedule_every_r_epochs_at_most_n_times():
    # official: after 0-based epochs 20, 40, 60 (never after epoch 0) -> at the start of epochs 21, 41, 61
    assert _schedule(100, 20, 3) == [21, 41, 61]
    assert _schedule(50, 20, 3) == [21, 41]
    assert _schedule(10, 1, 2) == [2, 3]
    assert _schedule(100, 20, 0) == []


class _NoTest:
    def __iter__(self):
        raise AssertionError("re-learning must never read the test split")


def _run(**kw):
    args = [f"method.{k}={v}" for k, v in kw.items()]
    run = make_run(compose_cfg(["method=relearning", "method.reinit_epoch=1", "method.reinit_num=1",
                                     "method.kmeans_n_init=1", *args]))
    run.test_loader = _NoTest()
    return run


def test_one_event_blends_every_encoder_toward_its_snapshot_and_leaves_head_and_buffers():
    run = _run()
    method = run.method
    theta0 = {m: [p.clone() for p in ps] for m, ps in run.model.modality_parameters().items()}
    batch = next(iter(run.train_loader))
    for _ in range(2):
        method.training_step(run, batch)
    before = {n: t.clone() for n, t in run.model.state_dict().items()}
    trained = {m: [p.detach().clone() for p in ps] for m, ps in run.model.modality_parameters().items()}
    method.on_epoch_start(run, 1)  # not due (after epoch 0 never)
    assert method.done == 0
    method.on_epoch_start(run, 2)  # due: after epoch 1
    assert method.done == 1 and method.events[0]["epoch"] == 2
    for m, ps in run.model.modality_parameters().items():
        ev = method.events[0][m]
        assert ev["gap"] == pytest.approx(abs(ev["purity_train"] - ev["purity_val"]))
        s = ev["strength"]
        assert s == pytest.approx(math.tanh(3.0 * ev["gap"]))
        for p, p_now, p0 in zip(ps, trained[m], theta0[m]):
            torch.testing.assert_close(p.detach(), s * p0 + (1 - s) * p_now)
    after = run.model.state_dict()
    for n in before:  # the head and every buffer (BatchNorm statistics) are untouched
        if n.startswith("fusion.") or not any(n == f"encoders.{m}.{k}" for m in run.model.modalities
                                               for k, _ in run.model.encoders[m].named_parameters()):
            assert torch.equal(before[n], after[n]), n
    assert run.model.training
    method.on_epoch_start(run, 3)  # at most reinit_num = 1 times
    assert method.done == 1


def test_reset_momentum_drops_the_optimizer_state_of_reinitialised_parameters_only_when_asked():
    for reset in (False, True):
        run = _run(reset_momentum=str(reset).lower())
        run.method.training_step(run, next(iter(run.train_loader)))
        run.method.on_epoch_start(run, 2)
        enc = [p for ps in run.model.modality_parameters().values() for p in ps]
        assert all((p in run.optimizer.state) != reset for p in enc)
        assert all(p in run.optimizer.state for p in run.model.head_parameters())


def test_state_round_trips_snapshot_and_counter():
    run = _run()
    run.method.done = 1
    state = run.method.state_dict()
    fresh = Relearning()
    fresh.load_state_dict(state)
    assert_same_state(fresh.state_dict(), state)
    assert fresh.done == 1 and not relearn_due(2, 1, fresh.done, 1)


def test_every_event_reuses_one_training_feature_loader(monkeypatch):
    run = make_run(compose_cfg(["method=relearning", "method.reinit_epoch=1", "method.reinit_num=2",
                                "method.kmeans_n_init=1"]))
    made, original = [], run.make_loader

    def counting(dataset, train, shard=True, indices=None):
        made.append(train)
        return original(dataset, train, shard, indices)

    monkeypatch.setattr(run, "make_loader", counting)
    for epoch in (2, 3):
        run.method.on_epoch_start(run, epoch)
    assert run.method.done == 2 and made == [False]  # an unshuffled loader over the training set, built once
