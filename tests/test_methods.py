"""The method registry contract (every method on 2 and 3 modalities) and OGM-GE's exact formulas."""

import io
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import THREE, compose_cfg, train_in_process
from helpers import inputs, tiny_model
from mmbalance.config import build
from mmbalance.data.batch import Batch
from mmbalance.engine.run import LoaderSettings, Run
from mmbalance.errors import UserError
from helpers import METHOD_EXTRA_ARGS

from mmbalance.methods import METHODS
from mmbalance.methods.base import Method
from mmbalance.methods.ogm_ge import OGMGE, ogm_coefficients
from mmbalance.models.build import build_model

CONF_METHODS = Path(__file__).resolve().parents[1] / "conf" / "method"

EXTRA = METHOD_EXTRA_ARGS


def is_hybrid(path: Path) -> bool:
    """conf/method/hybrid_<parts>.yaml: a stored composition of registered methods, built by method compose."""
    return path.stem.startswith("hybrid_")


def test_registry_keys_equal_the_method_config_files():
    assert set(METHODS) == {p.stem for p in CONF_METHODS.glob("*.yaml") if not is_hybrid(p)}


def test_every_method_config_builds_the_class_registered_under_its_name():
    """conf/method/<key>.yaml's `_target_` is the class of methods/<key>.py that declares its family."""
    for path in sorted(CONF_METHODS.glob("*.yaml")):
        target = get_object(OmegaConf.load(path)["_target_"])
        if is_hybrid(path):  # a hybrid is method compose with stored parts (tests/test_method_compose.py)
            assert target is METHODS["compose"], f"{path.name}: a hybrid_* config builds method compose"
            continue
        assert target is METHODS[path.stem], f"{path.name}: _target_ is {target}, not METHODS[{path.stem!r}]"
        assert target.__module__ == f"mmbalance.methods.{path.stem}"


def test_every_method_has_a_family_of_the_taxonomy():
    from mmbalance.methods import FAMILIES

    assert all(cls.family in FAMILIES for cls in METHODS.values())
    assert {cls.family for cls in METHODS.values()} == {"reference", "data", "feed-forward", "objective", "optimization",
                                                      "hybrid"}
    assert METHODS["ogm_ge"].family == "optimization" and METHODS["mla"].family == "feed-forward"
    # the registry's order: by family as the taxonomy lists them, then by name
    assert list(METHODS) == sorted(METHODS, key=lambda k: (FAMILIES.index(METHODS[k].family), k))


def test_a_method_is_named_by_its_registry_key():
    from mmbalance.methods import registry_key

    assert all(registry_key(cls) == key for key, cls in METHODS.items())

    class Tweaked(METHODS["ogm_ge"]):  # a subclass made elsewhere is still that method
        pass

    class Unregistered(Method):  # declares no family: not in the registry, named by its class
        pass

    assert registry_key(Tweaked) == "ogm_ge" and registry_key(Unregistered) is None
    assert Unregistered().name == "Unregistered" and Unregistered.family == "unregistered"


def make_run(cfg, seed=0):
    torch.manual_seed(seed)
    splits = build(cfg.dataset)
    method = build(cfg.method)
    mods = method.select_modalities(list(splits.modalities))
    method.check_modalities(mods)
    model = build_model({m: splits.modalities[m] for m in mods}, cfg.backbone, splits.num_classes, cfg.masking)
    opt = build(cfg.optimizer, params=model.parameters())
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=splits.num_classes,
              loader_settings=LoaderSettings(batch_size=16), precision=cfg.hardware.precision)
    run.train_loader = run.make_loader(splits.train, train=True)
    run.val_loader = run.make_loader(splits.val, train=False)
    run.test_loader = run.make_loader(splits.test, train=False)
    method.setup(run)
    return run


@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_METHODS.glob("*.yaml")))
def test_every_method_trains_moves_parameters_and_round_trips_its_state(name, three):
    cfg = compose_cfg([f"method={name}", *EXTRA.get(name, []), *(THREE if three else [])])
    limit = build(cfg.method).max_modalities
    if three and limit is not None and limit < 3:  # a declared two-modality method refuses clearly
        with pytest.raises(UserError, match=f"at most {limit} modalities"):
            make_run(cfg)
        return
    run = make_run(cfg)
    batch = assert_one_step_trains(run, name)
    # state survives a checkpoint: a fresh run's method loading it holds the same state and trains on
    buffer = io.BytesIO()
    torch.save(run.method.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_run(cfg)
    fresh.method.load_state_dict(torch.load(buffer, weights_only=False))
    assert_same_state(fresh.method.state_dict(), run.method.state_dict())
    fresh.model.load_state_dict(run.model.state_dict())
    assert torch.isfinite(fresh.method.training_step(fresh, batch)["loss"])


def assert_one_step_trains(run, name):
    """One training step gives a finite loss and moves every encoder and the head; returns its batch."""
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    batch = next(iter(run.train_loader))
    stats = run.method.training_step(run, batch)
    assert torch.isfinite(stats["loss"]), f"{name}: loss {stats['loss']}"
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(before[n], p.detach())}
    for m in run.model.modalities:  # every encoder it trains and the head move
        assert any(n.startswith(f"encoders.{m}.") for n in moved), f"{name}: encoder {m} did not move"
    assert any(n.startswith("fusion.") for n in moved), f"{name}: the head did not move"
    return batch


def assert_same_state(a, b, path="state"):
    """Nested dicts/lists of tensors and plain values are equal."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_METHODS.glob("*.yaml")))
def test_every_balancing_method_refuses_a_single_modality_and_the_references_train_on_one(name):
    """One rule over every method: on one modality there is nothing to balance, so a method of a balancing
    family refuses it before training (it used to train silently: OLM held out 20 %, OGM-GE added its noise)."""
    method = build(compose_cfg([f"method={name}", *EXTRA.get(name, [])]).method)
    if method.family in ("reference",):
        assert method.min_modalities == 1
        method.check_modalities(method.select_modalities(["visual"]))
        return
    assert method.min_modalities == 2
    refuses = getattr(method, "part_names", [name])[0]  # a hybrid: its first part, by its own name
    with pytest.raises(UserError, match=f"^method {refuses} balances modalities against each other, so it needs at "
                                        "least two, but the run has 1 \\(visual\\); with one modality there is "
                                        "nothing to balance: train it with method=baseline"):
        method.check_modalities(["visual"])
    method.check_modalities(["audio", "visual"])


def test_a_single_modality_dataset_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match="method olm balances modalities against each other, so it needs at least two"):
        train_in_process(tmp_path, ["method=olm", "~dataset.modalities.visual"])
    assert not (tmp_path / "checkpoints").exists()
    train_in_process(tmp_path / "baseline", ["method=baseline", "~dataset.modalities.visual", "trainer.epochs=1"])


@pytest.mark.parametrize("name", ["agm", "amco", "amss", "cggm", "cml", "inforeg", "mbsd", "mlgm", "pmr",
                                  "reconboost"])
def test_methods_that_compare_modalities_are_refused_one_by_the_run_before_their_setup(name):
    """These methods used to check for two modalities themselves (in `setup` or `check_modalities`); the run's
    `check_modalities` refuses one before the model exists, so it is base's one message that a user sees."""
    from mmbalance.train import build_run

    with pytest.raises(UserError, match=f"^method {name} balances modalities against each other, so it needs at "
                                        "least two, but the run has 1 \\(audio\\)"):
        build_run(compose_cfg([f"method={name}", "~dataset.modalities.visual"]), torch.device("cpu"))


def test_the_default_regression_refusal_says_why_and_names_the_methods_that_train_regression():
    class ClassificationOnly(Method):
        tasks = ("classification",)

    with pytest.raises(UserError) as err:
        ClassificationOnly().set_task("regression")
    trains = [k for k, c in METHODS.items() if "regression" in c.tasks]
    assert {"baseline", "mmpareto"} <= set(trains) and "ogm_ge" not in trains
    assert str(err.value) == (
        "method ClassificationOnly does not support dataset.task=regression: it is declared for classification only "
        "(a balancing rule may read class probabilities or labels, which a regression score lacks). Use a method "
        "that trains it: " + ", ".join(f"{k} (when every part does)" if k == "compose" else k for k in trains))


def test_method_owned_modules_join_the_optimizer_and_the_state():
    cfg = compose_cfg([])
    run = make_run(cfg)
    groups = len(run.optimizer.param_groups)
    head = run.method.register_module(run, "extra", torch.nn.Linear(3, 2))
    assert len(run.optimizer.param_groups) == groups + 1
    state = run.method.state_dict()
    other = make_run(cfg)
    other_head = other.method.register_module(other, "extra", torch.nn.Linear(3, 2))
    other.method.load_state_dict(state)
    assert torch.equal(other_head.weight, head.weight)


def test_more_modalities_than_a_method_supports_is_one_clear_error():
    class TwoOnly(Method):
        max_modalities = 2

    with pytest.raises(UserError, match="at most 2 modalities.*3 \\(a, b, c\\)"):
        TwoOnly().check_modalities(["a", "b", "c"])


def test_unimodal_builds_a_one_modality_model_and_rejects_unknown_modalities():
    cfg = compose_cfg(["method=unimodal", "method.modality=visual"])
    run = make_run(cfg)
    assert run.model.modalities == ["visual"]
    with pytest.raises(UserError, match="method.modality='video'.*audio"):
        build(compose_cfg(["method=unimodal", "method.modality=video"]).method).select_modalities(["audio", "visual"])


# ---------------------------------------------------------------- OGM-GE

def test_ogm_coefficients_two_modalities_by_hand():
    # s_a = 30, s_v = 10: rho_a = 3 > 1 -> k_a = 1 - tanh(0.8 * 3) = 1 - 0.98367...; k_v = 1
    k = ogm_coefficients({"audio": 30.0, "visual": 10.0}, alpha=0.8)
    assert k["audio"] == pytest.approx(1 - 0.9836748576936802) and k["visual"] == 1.0
    k = ogm_coefficients({"audio": 10.0, "visual": 12.0}, alpha=0.1)
    assert k["audio"] == 1.0 and k["visual"] == pytest.approx(1 - 0.11942729853438588)  # tanh(0.12)


def test_ogm_coefficients_three_modalities_against_the_mean_of_the_others():
    # rho_a = 6 / mean(3, 1) = 3 -> damped; rho_b = 3 / mean(6, 1) = 6/7 < 1; rho_c = 1 / 4.5 < 1
    k = ogm_coefficients({"a": 6.0, "b": 3.0, "c": 1.0}, alpha=0.5)
    assert k == pytest.approx({"a": 1 - 0.9051482536448664, "b": 1.0, "c": 1.0})  # tanh(1.5)


class _Ctx:
    """The run context an OGM-GE step reads."""

    def __init__(self, model, epoch=0):
        self.model, self.epoch = model, epoch
        self._g = torch.Generator().manual_seed(0)

    def reduce(self, stats):
        return stats

    def noise_generator(self, device):
        return self._g


def _grads_after_hook(variant, epoch=0, scope="all"):
    model = tiny_model(("a", "b"), classes=3)
    x = inputs(("a", "b"), n=8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = OGMGE(alpha=0.8, variant=variant, modulation_starts=0, modulation_ends=3, scope=scope)
    ctx = _Ctx(model, epoch)
    method.params = {m: list(ps) if scope == "all" else [p for p in ps if p.dim() > 1]
                     for m, ps in model.modality_parameters().items()}
    method.on_after_backward(ctx, Batch(x, y, torch.arange(8)), out)
    scores = {m: float(torch.softmax(out.unimodal[m].detach(), 1).gather(1, y[:, None]).sum()) for m in ("a", "b")}
    return model, raw, method, scores


def test_ogm_scales_exactly_the_selected_encoder_gradients_by_k():
    model, raw, method, scores = _grads_after_hook("ogm", scope="weights")
    k = ogm_coefficients(scores, 0.8)
    assert method.last_coefficients == pytest.approx(k)
    assert min(k.values()) < 1.0  # one modality is damped
    for n, p in model.named_parameters():
        m = n.split(".")[1] if n.startswith("encoders.") else None
        expected = raw[n] * k[m] if (m and p.dim() > 1) else raw[n]
        torch.testing.assert_close(p.grad, expected)


def test_ogm_ge_adds_noise_with_the_unscaled_gradient_std_to_every_modality():
    model, raw, method, scores = _grads_after_hook("ogm_ge", scope="weights")
    k = ogm_coefficients(scores, 0.8)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # replay the noise draws in the same order
        if not n.startswith("encoders.") or p.dim() < 2:
            torch.testing.assert_close(p.grad, raw[n])
    for m in ("a", "b"):
        for p_name, p in model.encoders[m].named_parameters():
            if p.dim() < 2:
                continue
            r = raw[f"encoders.{m}.{p_name}"]
            noise = torch.randn(r.shape, generator=g) * (r.std().item() + 1e-8)
            torch.testing.assert_close(p.grad, r * k[m] + noise)


def test_ogm_ge_does_nothing_outside_its_window():
    model, raw, _, _ = _grads_after_hook("ogm_ge", epoch=4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, raw[n])


def test_ogm_ge_refuses_a_fusion_without_per_modality_logits():
    cfg = compose_cfg(["method=ogm_ge", "backbone.fusion=gated"])
    with pytest.raises(UserError, match="per-modality logits"):
        make_run(cfg)


def test_ogm_scopes_select_weights_conv_kernels_or_everything():
    from mmbalance.methods.ogm_ge import select_parameters

    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    assert [p.dim() for p in select_parameters(conv.parameters(), "weights")] == [4, 2]
    assert [p.dim() for p in select_parameters(conv.parameters(), "conv_kernels")] == [4]
    assert len(select_parameters(conv.parameters(), "all")) == 6


def _refused_values(hint):
    """Values a parameter hinted `hint` must refuse: one beyond each bound of its Ranges, a string outside its
    Literal choices (None when the hint declares neither)."""
    import typing

    from mmbalance.constraints import Range

    bad = []
    for member in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType)
                   else (hint,)):
        if typing.get_origin(member) is typing.Annotated:
            for r in member.__metadata__:
                if isinstance(r, Range):
                    bad += [v for v in (None if r.ge is None else r.ge - 1, r.gt, None if r.le is None else r.le + 1,
                                        r.lt) if v is not None]
        elif typing.get_origin(member) is typing.Literal:
            bad.append("not-a-choice")
    return bad


def test_every_method_constructor_refuses_what_its_signature_refuses():
    """The constructor checks its arguments against its hints (Method.__init_subclass__), as config validation
    does: out of range or outside the choices, it raises the same 'method.<option>=<value>: expected ...'."""
    import typing

    from mmbalance.errors import ConfigError

    required = {"unimodal": {"modality": "visual"}}  # the constructor arguments without a default
    checked = 0
    for key, cls in METHODS.items():
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        for name, hint in hints.items():
            for value in _refused_values(hint):
                with pytest.raises(ConfigError, match=re.escape(f"method.{name}={value!r}: expected")):
                    cls(**{**required.get(key, {}), name: value})
                checked += 1
    assert checked > 100, checked  # 133 today: every method declares its ranges and choices


WINDOWED = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml")
                  if {"modulation_starts", "modulation_ends"} <= set(OmegaConf.load(p)))


@pytest.mark.parametrize("name", WINDOWED)
def test_every_method_with_a_modulation_window_refuses_an_empty_one(name):
    """modulation_starts > modulation_ends would train the baseline under the method's name."""
    with pytest.raises(UserError, match=r"method.modulation_starts=5 is after method.modulation_ends=2"):
        build(compose_cfg([f"method={name}", "method.modulation_starts=5", "method.modulation_ends=2"]).method)


def test_the_windowed_methods_are_found():
    assert {"agm", "amco", "mlgm", "ogm_ge", "pmr"} <= set(WINDOWED)


@pytest.mark.parametrize("overrides, message", [
    (["method=lfm", "method.alpha_lr=0.001"],
     r"method.alpha_lr=0.001: only used with method.weighting=learnable, and this run has method.weighting=scheduled"),
    (["method=lfm", "method.weighting=learnable", "method.schedule_epochs=50"],
     r"method.schedule_epochs=50: only used with method.weighting=scheduled"),
    (["method=amss", "method.plus_scale=official"],
     r"method.plus_scale=official: only used with method.variant=amss_plus, and this run has method.variant=amss"),
    (["method=valuation", "method.alpha=2.0", "method.part_ratio=0.5"],
     r"method.alpha=2.0, method.part_ratio=0.5: only used with method.variant=modality, .* ignore them"),
    (["method=valuation", "method.variant=modality", "method.thresholds=[1.0,0.5,0.0]"],
     r"method.thresholds=\[1.0, 0.5, 0.0\]: only used with method.variant=sample"),
    (["method=mla", "method.projection=off", "method.projection_alpha=0.5"],
     r"method.projection_alpha=0.5: only used with method.projection=paper"),
])
def test_an_option_the_chosen_variant_ignores_is_refused(overrides, message):
    """A sweep over an option the run ignores would record one result under several settings."""
    with pytest.raises(UserError, match=message):
        build(compose_cfg(overrides).method)
    # with the variant that uses it, it is a setting like any other
    enabling = {"method.alpha_lr=0.001": "method.weighting=learnable", "method.plus_scale=official":
                "method.variant=amss_plus", "method.part_ratio=0.5": "method.variant=modality",
                "method.projection_alpha=0.5": "method.projection=paper"}.get(overrides[-1])
    if enabling:
        build(compose_cfg([*overrides, enabling]).method)


def test_a_family_that_is_not_one_of_the_families_is_refused_when_the_class_is_defined():
    """A typo in a new method's family: refused at import, so its own run sees it (it used to train under the typo
    and break only the runs that listed every method, such as compose)."""
    from mmbalance.methods.base import FAMILIES, Method

    with pytest.raises(TypeError, match=r"Typo.family = 'objectve'; expected one of"):
        type("Typo", (Method,), {"family": "objectve"})
    assert type("Fine", (Method,), {"family": FAMILIES[3]}).family == "objective"
