"""PMR's exact formulas: the prototype loss, the step rule, class means, the momentum update with the
missing-class rule, the prototype cadence, and which encoder the prototype loss reaches."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.methods.pmr import (PMR, class_means, prototype_logits, prototype_loss, update_prototypes,
                                   weaker_modalities)


def test_prototype_loss_is_ce_of_negative_euclidean_distance_not_squared():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    protos = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # distances: sample 0 -> (0, 3), sample 1 -> (5, 4); sim = -distance
    torch.testing.assert_close(prototype_logits(z, protos), torch.tensor([[0.0, -3.0], [-5.0, -4.0]]))
    # CE_0 = log(1 + e^-3) = 0.0485874, CE_1 (label 1) = log(1 + e^-1) = 0.3132617; mean 0.1809245
    loss = prototype_loss(z, protos, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx((math.log(1 + math.exp(-3)) + math.log(1 + math.exp(-1))) / 2)
    assert float(loss) == pytest.approx(0.1809245, abs=1e-6)  # squared: log(1 + e^-9) = 0.000123


def test_step_rule_the_weaker_modality_gets_the_prototype_loss():
    # rho = s_a / s_v = 3 > 1 -> visual; rho < 1 -> audio; rho = 1 -> neither
    assert weaker_modalities({"audio": 3.0, "visual": 1.0}) == ["visual"]
    assert weaker_modalities({"audio": 1.0, "visual": 3.0}) == ["audio"]
    assert weaker_modalities({"audio": 2.0, "visual": 2.0}) == []
    # three modalities: every one below the strongest
    assert weaker_modalities({"a": 3.0, "b": 1.0, "c": 2.0}) == ["b", "c"]


def test_class_means_and_counts():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    means, counts = class_means(z, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]))
    assert counts.tolist() == [2, 0, 1]


def test_momentum_update_and_missing_class_rule():
    old = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    means = torch.tensor([[3.0, 3.0], [0.0, 0.0]])
    counts = torch.tensor([2, 0])
    # class 0: (1 - 0.2) * 3 + 0.2 * 1 = 2.6; class 1 had no sample: keeps (2, 2)
    new, missing = update_prototypes(old, means, counts, momentum=0.2, use_momentum=True)
    torch.testing.assert_close(new, torch.tensor([[2.6, 2.6], [2.0, 2.0]]))
    assert missing == 1
    new, _ = update_prototypes(old, means, counts, momentum=0.2, use_momentum=False)  # replace
    torch.testing.assert_close(new, torch.tensor([[3.0, 3.0], [2.0, 2.0]]))
    # no previous prototypes: a missing class starts at the mean of the present classes' prototypes, not NaN
    means3 = torch.tensor([[3.0, 1.0], [0.0, 0.0], [1.0, 5.0]])
    new, missing = update_prototypes(None, means3, torch.tensor([1, 0, 2]), 0.2, False)
    torch.testing.assert_close(new, torch.tensor([[3.0, 1.0], [2.0, 3.0], [1.0, 5.0]]))
    assert missing == 1 and torch.isfinite(new).all()


class _Data(torch.utils.data.Dataset):
    def __init__(self, mods, n=40):
        g = torch.Generator().manual_seed(2)
        self.x = {m: torch.randn(n, 5, generator=g) for m in mods}
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": {m: x[i] for m, x in self.x.items()}, "label": int(self.y[i]), "index": i}


def make_run(mods=("a", "b"), epochs=None, **kw):
    model = tiny_model(mods)
    method = PMR(**kw)
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=torch.device("cpu"), num_classes=3,
              config={"trainer": {"epochs": epochs}} if epochs else None)
    run.train_loader = run.make_loader(_Data(mods), train=True)
    method.setup(run)
    return run


def test_prototypes_before_training_then_replaced_then_mixed_with_momentum(monkeypatch):
    run = make_run(momentum=0.25, prototype_fraction=0.5)
    pmr = run.method
    # setup: eval-mode class means of a 50 % subset (20 of 40 samples), from the initial model
    assert set(pmr.prototypes) == {"a", "b"} and pmr.prototypes["a"].shape == (3, 4)
    assert pmr.updates == 0 and run.model.training
    means = iter([{"a": torch.ones(3, 4), "b": torch.ones(3, 5)}, {"a": torch.full((3, 4), 5.0), "b": torch.zeros(3, 5)}])
    monkeypatch.setattr(pmr, "compute_means", lambda run, draw: (next(means), torch.tensor([4, 4, 4])))
    pmr.on_epoch_end(run, 0)  # the first post-epoch prototypes replace the initial model's (no momentum)
    torch.testing.assert_close(pmr.prototypes["a"], torch.ones(3, 4))
    pmr.on_epoch_end(run, 1)  # then 0.75 * new + 0.25 * old = 0.75 * 5 + 0.25 * 1 = 4
    torch.testing.assert_close(pmr.prototypes["a"], torch.full((3, 4), 4.0))
    torch.testing.assert_close(pmr.prototypes["b"], torch.full((3, 5), 0.25))


def test_prototype_subset_is_eval_mode_class_means_of_a_seeded_random_subset():
    run = make_run(prototype_fraction=0.5)
    means, counts = run.method.compute_means(run, draw=0)
    assert int(counts.sum()) == 20
    again, _ = run.method.compute_means(run, draw=0)
    other, _ = run.method.compute_means(run, draw=1)
    torch.testing.assert_close(means["a"], again["a"])
    assert not torch.allclose(means["a"], other["a"])  # another draw, another subset


def test_no_prototype_pass_when_its_prototypes_could_never_be_used(monkeypatch):
    run = make_run(epochs=3, modulation_ends=5)
    calls = []
    monkeypatch.setattr(run.method, "compute_means", lambda run, draw: calls.append(draw))
    run.method.on_epoch_end(run, 2)  # the last epoch
    run2 = make_run(epochs=10, modulation_ends=1)
    monkeypatch.setattr(run2.method, "compute_means", lambda run, draw: calls.append(draw))
    run2.method.on_epoch_end(run2, 1)  # epoch 2 is past the window
    assert calls == []


def test_loss_adds_alpha_pce_for_the_weaker_modality_and_it_reaches_only_that_encoder():
    run = make_run(alpha=2.0)
    pmr, model = run.method, run.model
    x = inputs(("a", "b"))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    b = Batch(x, y, torch.arange(6))
    out = model(x)
    sims = {m: prototype_logits(out.features[m].detach(), pmr.prototypes[m]) for m in ("a", "b")}
    scores = {m: float(torch.softmax(s, 1).gather(1, y[:, None]).sum()) for m, s in sims.items()}
    (weak,) = weaker_modalities(scores)
    strong = "a" if weak == "b" else "b"
    losses = pmr.loss(run, b, out)
    ce = F.cross_entropy(out.logits, y)
    expected = ce + 2.0 * prototype_loss(out.features[weak], pmr.prototypes[weak], y)
    torch.testing.assert_close(losses["loss"], expected)
    assert float(losses[f"pmr_on_{weak}"]) == 1.0 and float(losses[f"pmr_on_{strong}"]) == 0.0
    # gradients: the stronger encoder and the head get exactly the fused CE's; the weaker one gets more
    model.zero_grad()
    losses["loss"].backward(retain_graph=True)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ce.backward()
    for n, p in model.named_parameters():
        if n.startswith(f"encoders.{weak}.") and p.dim() > 1:
            assert not torch.allclose(got[n], p.grad), n
        elif not n.startswith(f"encoders.{weak}."):
            torch.testing.assert_close(got[n], p.grad, msg=n)
    run.epoch = 101  # outside the default window 0..100: the fused CE only
    assert set(pmr.loss(run, b, out)) == {"loss"}


def test_three_modalities_every_modality_below_the_strongest_gets_it():
    run = make_run(("a", "b", "c"), alpha=1.0)
    pmr, model = run.method, run.model
    x = inputs(("a", "b", "c"))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    losses = pmr.loss(run, Batch(x, y, torch.arange(6)), out)
    on = {m for m in "abc" if float(losses[f"pmr_on_{m}"]) == 1.0}
    assert len(on) == 2
    expected = F.cross_entropy(out.logits, y) + sum(prototype_loss(out.features[m], pmr.prototypes[m], y) for m in on)
    torch.testing.assert_close(losses["loss"], expected)


def test_state_round_trip_keeps_the_prototypes():
    run = make_run()
    other = make_run(prototype_fraction=0.2)
    other.method.load_state_dict(run.method.state_dict())
    for m in ("a", "b"):
        torch.testing.assert_close(other.method.prototypes[m], run.method.prototypes[m])
    assert other.method.updates == run.method.updates


def _loaders_made(run, monkeypatch) -> list:
    made, original = [], run.make_loader

    def counting(dataset, train, shard=True, indices=None):
        made.append(train)
        return original(dataset, train, shard, indices)

    monkeypatch.setattr(run, "make_loader", counting)
    return made


def test_run_loader_is_kept_per_purpose_and_yields_what_a_subset_loader_does():
    run = make_run()
    run.loader_settings.batch_size = 16
    data = run.train_loader.dataset
    first = run.loader("x", data, train=False, indices=[5, 1, 7, 30, 2])
    assert [b.index.tolist() for b in first] == [[5, 1, 7, 30, 2]]
    again = run.loader("x", data, train=False, indices=list(range(20)))
    subset = run.make_loader(torch.utils.data.Subset(data, list(range(20))), train=False)
    assert again is first and len(again) == len(subset) == 2  # batches of 16: 16 + a last one of 4
    for ours, theirs in zip(again, subset):
        assert torch.equal(ours.index, theirs.index) and torch.equal(ours.inputs["a"], theirs.inputs["a"])
    assert run.loader("x", _Data(("a", "b")), train=False) is not first  # another dataset object: a new loader
    assert run.loader("y", data, train=False) is not first  # another purpose: its own loader


def test_prototype_passes_reuse_one_loader_across_epochs(monkeypatch):
    run = make_run(prototype_fraction=0.5)  # setup built the prototype loader
    made = _loaders_made(run, monkeypatch)
    for epoch in range(3):
        run.method.on_epoch_end(run, epoch)
    assert made == [] and run.method.updates == 3
    # the kept loader, pointed at each draw's subset, gives the class means of that subset
    means, counts = run.method.compute_means(run, draw=4)
    g = torch.Generator().manual_seed(run.seed * 1_000_003 + 7_919 + 4)
    idx = torch.randperm(40, generator=g)[:20].tolist()
    x, y = _Data(("a", "b")), (torch.arange(40) % 3)[idx]
    run.model.eval()
    with torch.no_grad():
        z = run.model.encode({m: x.x[m][idx] for m in ("a", "b")})
    run.model.train()
    expected, expected_counts = class_means(z["a"], y, 3)
    torch.testing.assert_close(means["a"], expected)
    assert torch.equal(counts, expected_counts)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from conftest import straight_and_resumed, without_times

    overrides = ["method=pmr", "trainer.epochs=3", "method.prototype_fraction=0.5"]
    straight, resumed = straight_and_resumed(tmp_path, overrides, 2, monkeypatch)
    assert resumed["processes"] == 2

    assert without_times(resumed["metrics"]) == without_times(straight["metrics"])
    assert resumed["metrics"]["flops/train/method_epoch_hooks"] > 0
