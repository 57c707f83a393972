"""Mixed precision (`hardware.precision=bf16`, the default on GPUs): every registered method trains under
autocast. CPU autocast supports bf16, so these run anywhere."""

import math

import pytest
import torch

from conftest import THREE, compose_cfg, train_in_process
from helpers import METHOD_EXTRA_ARGS, inputs, tiny_model
from mmbalance.config import build
from test_methods import CONF_METHODS, assert_one_step_trains, make_run

BF16 = ["hardware.precision=bf16"]

# Settings that make a method's mechanism act at once where its defaults wait (warm-ups, epoch cycles), so
# the bf16 runs go through the code that computes its coefficients, not only the plain baseline path.
ACTIVE_FIRST_STEP = {
    "opm": ["method.warmup_epochs=0", "method.p_exe=1.0"],
    "greedy": ["method.unlock_epoch=0"],
}
ACTIVE_IN_TWO_EPOCHS = {
    **ACTIVE_FIRST_STEP,
    "valuation": ["method.warmup=1"],
    "relearning": ["method.reinit_epoch=1"],
    "gblending": ["method.super_epoch=1"],
    "reconboost": ["method.boost_epochs=1", "method.correct_epochs=1"],  # a boosting, then a rectifying epoch
}


def method_overrides(name: str, three: bool, active: dict[str, list[str]]) -> list[str]:
    return [f"method={name}", *METHOD_EXTRA_ARGS.get(name, []), *active.get(name, []),
            *(THREE if three else []), *BF16]


def skip_if_two_modality_method(cfg, three: bool) -> None:
    limit = build(cfg.method).max_modalities
    if three and limit is not None and limit < 3:
        pytest.skip(f"supports at most {limit} modalities (its refusal is tested in test_methods)")


def test_unimodal_logits_are_float32_wherever_they_are_read():
    # the root of OGM-GE's bf16 crash: its hook reads the lazily computed logits after backward, outside
    # the autocast that made the bf16 features
    model = tiny_model(("a", "b"))
    x = inputs(("a", "b"), n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_outside, out_inside = model(x), model(x)
        assert out_outside.logits.dtype == torch.bfloat16  # autocast really is active on this CPU
        inside = out_inside.unimodal
    outside = out_outside.unimodal
    float_features = {m: f.float() for m, f in out_outside.features.items()}
    expected = model.fusion.unimodal_logits(float_features)
    for m in ("a", "b"):
        assert inside[m].dtype == outside[m].dtype == torch.float32
        torch.testing.assert_close(outside[m], expected[m])
        torch.testing.assert_close(inside[m], expected[m])


@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_METHODS.glob("*.yaml")))
def test_every_method_trains_a_step_under_bf16_autocast(name, three):
    cfg = compose_cfg(method_overrides(name, three, ACTIVE_FIRST_STEP))
    skip_if_two_modality_method(cfg, three)
    run = make_run(cfg)
    assert run.precision == "bf16"
    assert_one_step_trains(run, name)


def test_ogm_ge_under_bf16_completes_end_to_end(tmp_path):
    # `python -m mmbalance method=ogm_ge hardware.precision=bf16`, on tiny data
    results = train_in_process(tmp_path, ["method=ogm_ge", *BF16, "trainer.epochs=1", "dataset.num_samples=64"])
    assert results["status"] == "completed"
    assert math.isfinite(results["metrics"]["test/acc"])


@pytest.mark.slow
@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_METHODS.glob("*.yaml")))
def test_every_method_completes_a_run_under_bf16(name, three, tmp_path):
    # whole runs also cover the epoch hooks, validation and the Shapley metric under autocast
    overrides = method_overrides(name, three, ACTIVE_IN_TWO_EPOCHS) + ["trainer.epochs=2", "dataset.num_samples=64"]
    skip_if_two_modality_method(compose_cfg(overrides), three)
    results = train_in_process(tmp_path, overrides)
    assert results["status"] == "completed"
    assert math.isfinite(results["metrics"]["test/acc"])
