"""AMSS / AMSS+: the kept fractions, keep probabilities, masks, the gradient hook, warm-up, FLOPs and resume, against
numbers worked out by hand (plain arithmetic in the comments; never by calling the code under test)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.errors import UserError
from mmbalance.methods.amss import (AMSS, amss_coefficients, keep_probabilities, kept_units, label_entropy,
                                    sample_mask, unit_importance)
from mmbalance.metrics.flops import count_flops
from mmbalance.models.multimodal import Output
from test_methods import make_run

LN2 = math.log(2)


# ---------------------------------------------------------------- kept fractions

def test_two_modality_fractions_are_the_official_av_formula():
    # info_v = -1.2 + ln2 + 0.5 = -1.2 + 0.693147 + 0.5 = -0.006853 <= 0 -> the official guard: 0.5 for both
    assert amss_coefficients({"a": -0.5, "v": -1.2}, {"a": 2.0, "v": 1.0}, LN2, 0.2) == {"a": 0.5, "v": 0.5}
    # with offset 0.6 both are positive: r_a = 0.793147 / 2 = 0.396574, r_v = 0.093147 / 1 = 0.093147;
    # t_a = 1.982868, t_v = 0.465736; c_a = e^{t_v} / (e^{t_a} + e^{t_v}) = 1 / (1 + e^{1.517132}) = 0.179884,
    # c_v = 1 - 0.179884 = 0.820116: the more significant modality (a) keeps less
    c = amss_coefficients({"a": -0.5, "v": -1.2}, {"a": 2.0, "v": 1.0}, LN2, 0.2, offset=0.6)
    assert c == pytest.approx({"a": 0.1798842281, "v": 0.8201157719})


def test_fractions_with_offset_half_temperature_point_two():
    # s = (-0.5, -0.9), H(Y) = ln2, H = (2, 1): r_a = 0.693147 / 2 = 0.346574, r_v = (-0.9 + 1.193147) / 1 = 0.293147
    # t_a = 1.732868, t_v = 1.465736; c_a = 1 / (1 + e^{0.267132}) = 0.433611, c_v = 0.566389
    c = amss_coefficients({"a": -0.5, "v": -0.9}, {"a": 2.0, "v": 1.0}, LN2, 0.2)
    assert c == pytest.approx({"a": 0.43361, "v": 0.56639}, abs=1e-5)


def test_three_modalities_one_minus_softmax_and_the_clamp():
    # H(Y) = 0, offset 0.5, s = (0.5, 1.5, 2.5), H = 1, T = 1 -> t = (1, 2, 3);
    # softmax = (e, e^2, e^3) / (e + e^2 + e^3) = (0.090031, 0.244728, 0.665241)
    # 1 - softmax = (0.909969 -> clamped 0.9, 0.755272, 0.334759)
    c = amss_coefficients({"a": 0.5, "b": 1.5, "c": 2.5}, {"a": 1.0, "b": 1.0, "c": 1.0}, 0.0, 1.0)
    assert c == pytest.approx({"a": 0.9, "b": 0.7552715289, "c": 0.3347590442})


def test_ties_split_evenly():
    same = {"a": -0.2, "b": -0.2}
    assert amss_coefficients(same, {"a": 1.0, "b": 1.0}, LN2, 0.2) == pytest.approx({"a": 0.5, "b": 0.5})
    three = {"a": -0.2, "b": -0.2, "c": -0.2}
    # 1 - 1/3 = 2/3 each
    assert amss_coefficients(three, dict.fromkeys(three, 1.0), LN2, 0.2) == pytest.approx(dict.fromkeys(three, 2 / 3))


def test_non_positive_information_falls_back_to_one_half_for_everyone():
    # info_a = -1.0 + 0.5 + 0.5 = 0 exactly: the official guard is "<= 0"
    c = amss_coefficients({"a": -1.0, "b": 0.0, "c": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, 0.5, 0.2)
    assert c == {"a": 0.5, "b": 0.5, "c": 0.5}
    c = amss_coefficients({"a": float("nan"), "b": 0.0}, {"a": 1.0, "b": 1.0}, 0.5, 0.2)
    assert c == {"a": 0.5, "b": 0.5}


def test_zero_feature_entropy_is_an_infinite_rate():
    # H_a = 0: r_a = inf takes the whole softmax mass: c_a = 1 - 1 -> 0.1 (clamp), c_b = 1 - 0 -> 0.9
    c = amss_coefficients({"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, LN2, 0.2)
    assert c == {"a": 0.1, "b": 0.9}


def test_bias_is_added_before_the_clamp():
    # the 0.433611 / 0.566389 case above + 0.2 -> 0.633611 / 0.766389
    c = amss_coefficients({"a": -0.5, "v": -0.9}, {"a": 2.0, "v": 1.0}, LN2, 0.2, bias=0.2)
    assert c == pytest.approx({"a": 0.63361, "v": 0.76639}, abs=1e-5)
    c = amss_coefficients({"a": 0.5, "b": 1.5, "c": 2.5}, {"a": 1.0, "b": 1.0, "c": 1.0}, 0.0, 1.0, bias=0.2)
    assert c == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.5347590442})


def test_label_entropy_true_and_official():
    # counts (3, 1): -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    assert label_entropy(torch.tensor([3, 1, 0, 0]), "entropy") == pytest.approx(0.5623351446)
    # official CE(pi, pi) over classes 0..1: lse(0.75, 0.25) = 1.224077; -(0.75 (0.75 - lse) + 0.25 (0.25 - lse))
    assert label_entropy(torch.tensor([3, 1, 0, 0]), "official") == pytest.approx(0.5990769842)
    # a class missing inside the range counts in the official softmax: pi = (0.5, 0, 0.5), lse = ln(2 e^0.5 + 1)
    assert label_entropy(torch.tensor([2, 0, 2]), "official") == pytest.approx(0.9580200879)
    assert label_entropy(torch.tensor([2, 0, 2]), "entropy") == pytest.approx(LN2)
    # a uniform batch gives ln C either way
    assert label_entropy(torch.tensor([5, 5, 5]), "official") == pytest.approx(math.log(3))


def test_fractions_from_the_steps_logits_and_features():
    # labels (0, 1); z_a = 0 -> CE = ln2, s_a = -ln2; z_v = (ln3, 0), (0, ln3) -> p_true = 3/4, s_v = -ln(4/3)
    # h_a = 0 in 4 dims -> H_a = ln4; h_v = 0 in 2 dims -> H_v = ln2; H(Y) = ln2; T = 1:
    # r_a = (-ln2 + ln2 + 0.5) / ln4 = 0.360674, r_v = (-0.287682 + 0.693147 + 0.5) / 0.693147 = 1.306310
    # c_a = 1 / (1 + e^{r_a - r_v}) = 0.720237, c_v = 0.279763
    l3 = math.log(3)
    label = torch.tensor([0, 1])
    out = Output(torch.zeros(2, 2), {"a": torch.zeros(2, 4), "v": torch.zeros(2, 2)},
                 unimodal={"a": torch.zeros(2, 2), "v": torch.tensor([[l3, 0.0], [0.0, l3]])})
    run = SimpleNamespace(reduce=lambda s: s, num_classes=2)
    c = AMSS(temperature=1.0).coefficients(run, out, label)
    assert c == pytest.approx({"a": 0.7202367487, "v": 0.2797632513})


# ---------------------------------------------------------------- keep probabilities and masks

def test_kept_units_is_the_official_ceiling_without_float_noise():
    assert kept_units(4, 0.5) == 2 and kept_units(4, 0.1) == 1 and kept_units(3, 0.9) == 3
    assert kept_units(10, 0.3) == 3  # 10 * 0.3 = 3.0000000000000004 would give 4


def test_keep_probabilities_water_filling_by_hand():
    # u = (4, 1, 0, 3), k = 2: lambda u = 2 * (4, 1, 0, 3) / 8 = (1, 0.25, 0, 0.75), none above 1: no cap
    torch.testing.assert_close(keep_probabilities(torch.tensor([4.0, 1.0, 0.0, 3.0]), 2),
                               torch.tensor([1.0, 0.25, 0.0, 0.75], dtype=torch.float64))
    # u = (100, 10, 1, 1, 1), k = 3: 100 and 10 are capped at 1 (3*100/113 > 1, then 2*10/13 > 1), the rest share
    # the remaining budget 1 over their sum 3: 1/3 each
    torch.testing.assert_close(keep_probabilities(torch.tensor([100.0, 10.0, 1.0, 1.0, 1.0]), 3),
                               torch.tensor([1.0, 1.0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    # ties: equal importance -> k/n each
    torch.testing.assert_close(keep_probabilities(torch.ones(4), 3), torch.full((4,), 0.75, dtype=torch.float64))
    # zero importance everywhere (no gradient): uniform k/n
    torch.testing.assert_close(keep_probabilities(torch.zeros(4), 2), torch.full((4,), 0.5, dtype=torch.float64))
    # fewer important units than k: they are all kept, the zero ones never (their gradient is zero anyway)
    torch.testing.assert_close(keep_probabilities(torch.tensor([5.0, 0.0, 0.0, 0.0]), 2),
                               torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_bernoulli_masks_replayed_from_the_generator():
    u = torch.tensor([4.0, 1.0, 0.0, 3.0])  # keep probabilities (1, 0.25, 0, 0.75) for fraction 0.5 (k = 2)
    draws = torch.rand(4, generator=torch.Generator().manual_seed(7))
    kept = (draws < torch.tensor([1.0, 0.25, 0.0, 0.75])).float()
    amss = sample_mask(u, 0.5, "amss", "bernoulli", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(amss, kept)
    plus = sample_mask(u, 0.5, "amss_plus", "bernoulli", "inverse_probability", torch.Generator().manual_seed(7))
    torch.testing.assert_close(plus, kept * torch.tensor([1.0, 4.0, 0.0, 4 / 3]))  # 1 / pi
    # official factor 1/(q + 1/n), q = u / 8 = (0.5, 0.125, 0, 0.375): (1/0.75, 1/0.375, 1/0.25, 1/0.625)
    off = sample_mask(u, 0.5, "amss_plus", "bernoulli", "official", torch.Generator().manual_seed(7))
    torch.testing.assert_close(off, kept * torch.tensor([4 / 3, 8 / 3, 4.0, 1.6]))


def test_amss_plus_is_unbiased_and_amss_keeps_k_in_expectation():
    u = torch.tensor([4.0, 1.0, 0.0, 3.0])
    g = torch.Generator().manual_seed(0)
    plus = torch.stack([sample_mask(u, 0.5, "amss_plus", generator=g) for _ in range(2000)])
    # E[mask] = 1 for every unit with importance (std of the mean <= sqrt(3 / 2000) = 0.039)
    assert plus.mean(0)[[0, 1, 3]].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.15)
    amss = torch.stack([sample_mask(u, 0.5, "amss", generator=g) for _ in range(2000)])
    assert float(amss.sum(1).mean()) == pytest.approx(2.0, abs=0.05)  # k = 2 units in expectation


def test_multinomial_keeps_exactly_k_units_as_torch_multinomial_draws_them():
    u = torch.tensor([4.0, 1.0, 0.0, 3.0])
    idx = torch.multinomial(u / 8, 2, replacement=False, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(4)
    expected[idx] = 1.0
    mask = sample_mask(u, 0.5, "amss", "multinomial", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mask, expected)
    assert float(mask.sum()) == 2 and mask[2] == 0  # the zero-importance unit is never drawn
    # fewer units with importance than k = ceil(4 * 0.9) = 4: only the one with importance is kept
    mask = sample_mask(torch.tensor([5.0, 0.0, 0.0, 0.0]), 0.9, "amss", "multinomial",
                       generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mask, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_unit_importance_per_filter_or_entry():
    g = torch.tensor([[1.0, 2.0], [0.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(unit_importance(g, "filter"), torch.tensor([5.0, 9.0, 0.0]))
    torch.testing.assert_close(unit_importance(g, "filter", "sqrt_gn"), torch.tensor([5 ** 0.5, 3.0, 0.0]))
    torch.testing.assert_close(unit_importance(g, "element"), torch.tensor([1.0, 4.0, 0.0, 9.0, 0.0, 0.0]))
    conv = torch.ones(2, 3, 2, 2)  # a conv kernel: 3 * 2 * 2 = 12 squared ones per output filter
    torch.testing.assert_close(unit_importance(conv, "filter"), torch.tensor([12.0, 12.0]))


# ---------------------------------------------------------------- the gradient hook

def _water_fill(u: list[float], k: int) -> list[float]:
    """An independent (iterative) implementation of pi = min(1, lambda u), sum pi = k, for the replay."""
    capped: set[int] = set()
    while True:
        free = [i for i, x in enumerate(u) if i not in capped and x > 0]
        budget, mass = k - len(capped), sum(u[i] for i in free)
        p = [1.0 if i in capped else (budget * x / mass if mass > 0 else 0.0) for i, x in enumerate(u)]
        new = [i for i in free if p[i] >= 1.0]
        if not new:
            return [min(1.0, x) for x in p]
        capped.update(new)


class _Ctx:
    def __init__(self, model, epoch=0, seed=11):
        self.model, self.epoch, self.num_classes = model, epoch, 3
        self._g = torch.Generator().manual_seed(seed)

    def reduce(self, stats):
        return stats

    def sync_gradients(self, params=None):
        pass

    def noise_generator(self, device):
        return self._g


def _hooked(mods=("a", "b"), epoch=0, **kwargs):
    model = tiny_model(mods, classes=3)
    x, y = inputs(mods, n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method = AMSS(**kwargs)
    method.params = {m: [p for p in ps if p.dim() > 1] for m, ps in model.modality_parameters().items()}
    out = model(x)
    ctx = _Ctx(model, epoch)
    losses = method.loss(ctx, Batch(x, y, torch.arange(8)), out)
    losses["loss"].backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.on_after_backward(ctx, Batch(x, y, torch.arange(8)), out)
    return model, raw, method


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["2mod", "3mod"])
@pytest.mark.parametrize("variant", ["amss", "amss_plus"])
def test_the_hook_masks_each_encoder_weight_by_output_unit_as_replayed(mods, variant):
    model, raw, method = _hooked(mods, variant=variant)
    g = torch.Generator().manual_seed(11)  # the same draws in the same order: modality by modality, weight by weight
    for m in mods:
        c = method.last_coefficients[m]
        for name, p in model.encoders[m].named_parameters():
            r = raw[f"encoders.{m}.{name}"]
            if p.dim() < 2:  # biases and BatchNorm are not in scope "weights"
                torch.testing.assert_close(p.grad, r)
                continue
            u = (r ** 2).sum(1).tolist()
            k = math.ceil(len(u) * c - 1e-9)
            pi = torch.tensor(_water_fill(u, k))
            kept = torch.rand(len(u), generator=g) < pi
            weight = torch.where(kept, 1.0 / pi if variant == "amss_plus" else torch.ones_like(pi), torch.zeros_like(pi))
            torch.testing.assert_close(p.grad, r * weight[:, None])
    for name, p in model.fusion.named_parameters():  # the head is never masked
        torch.testing.assert_close(p.grad, raw[f"fusion.{name}"])


def test_warm_up_epochs_are_plain_and_masking_starts_right_after():
    def changed(epoch):
        model, raw, _ = _hooked(epoch=epoch, warmup_epochs=2)
        return any(not torch.equal(p.grad, raw[n]) for n, p in model.named_parameters())

    assert not changed(0) and not changed(1)
    assert changed(2)


def test_the_loss_is_the_fused_ce_and_logs_the_fractions():
    model, _, method = _hooked()
    x, y = inputs(("a", "b"), n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = model(x)
    losses = method.loss(_Ctx(model), Batch(x, y, torch.arange(8)), out)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(out.logits, y))
    logged = {m: float(losses[f"amss_keep_{m}"]) for m in ("a", "b")}
    assert logged == pytest.approx(method.last_coefficients) and 0.1 <= min(logged.values())


def test_bad_choices_are_clear_errors():
    with pytest.raises(UserError, match=r"method.variant='amss\+'"):
        AMSS(variant="amss+")
    with pytest.raises(UserError, match="method.sampling='topk'"):
        AMSS(sampling="topk")
    with pytest.raises(UserError, match="per-modality logits"):
        make_run(compose_cfg(["method=amss", "backbone.fusion=gated"]))


def test_regression_is_refused_saying_what_needs_class_labels():
    with pytest.raises(UserError, match=r"^method amss does not support dataset.task=regression: its kept fractions "
                                        r"come from each modality's information estimate -CE\(z_m, y\) \+ H\(Y\)"):
        AMSS().set_task("regression")


def test_a_warm_up_covering_the_run_is_warned_about(caplog):
    def warnings(warmup):
        run = make_run(compose_cfg(["method=amss", f"method.warmup_epochs={warmup}"]))
        run.config = {"trainer": {"epochs": 2}}
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmbalance"):
            run.method.setup(run)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings(2) == ["amss: method.warmup_epochs=2 >= trainer.epochs=2, so no gradient is ever masked (this "
                           "run is the baseline)"]
    assert warnings(1) == []


# ---------------------------------------------------------------- FLOPs, reproducibility, resume

def test_a_step_costs_the_baseline_plus_the_per_modality_head_products():
    # no extra pass: importance and masks are elementwise (0 FLOPs); the coefficients read the per-modality
    # logits, one (16 x 128) @ (128 x 4) product per modality: 2 * 16 * 128 * 4 = 16384 FLOPs each
    base = make_run(compose_cfg(["method=baseline"]))
    amss = make_run(compose_cfg(["method=amss"]))
    amss.model.load_state_dict(base.model.state_dict())
    batch = next(iter(base.train_loader))
    _, f_base = count_flops(base.method.training_step, base, batch)
    _, f_amss = count_flops(amss.method.training_step, amss, batch)
    assert len(batch) == 16 and set(amss.model.fusion.dims.values()) == {128} and amss.num_classes == 4
    assert f_amss - f_base == 2 * 16384


def test_same_seed_same_masks_and_a_restored_generator_redraws_them():
    def step(run, batch):
        run.method.training_step(run, batch)
        return [p.detach().clone() for p in run.model.parameters()]

    cfg = compose_cfg(["method=amss", "method.variant=amss_plus"])
    one, two = make_run(cfg), make_run(cfg)
    batch = next(iter(one.train_loader))
    first = step(one, batch)
    assert all(torch.equal(a, b) for a, b in zip(first, step(two, batch)))
    # resume: the noise generator's state (saved by the trainer) brings back the same draws
    saved = one.noise_generator(torch.device("cpu")).get_state()
    params, opt = copy.deepcopy(one.model.state_dict()), copy.deepcopy(one.optimizer.state_dict())
    after = step(one, batch)
    three = make_run(cfg)
    three.model.load_state_dict(params)
    three.optimizer.load_state_dict(opt)
    three.noise_generator(torch.device("cpu")).set_state(saved)
    assert all(torch.equal(a, b) for a, b in zip(after, step(three, batch)))


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from conftest import straight_and_resumed

    args = ["method=amss", "method.variant=amss_plus", "trainer.epochs=2", "dataset.num_samples=64",
            "eval.shapley_every=0"]
    straight, resumed = straight_and_resumed(tmp_path, args, 1, monkeypatch)
    for key in ("test/acc", "val/acc", "flops/train_total"):
        assert resumed["metrics"][key] == straight["metrics"][key], key
