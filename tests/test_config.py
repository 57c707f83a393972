"""Every config composes and validates; bad configs fail with every problem listed at once."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_cfg
from mmbalance.config import validate
from mmbalance.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["dataset", "backbone", "method", "optimizer", "hardware"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


NEEDS = {"method=unimodal": ["method.modality=audio"], "dataset=features": ["dataset.path=x.npz"]}


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(override):
    cfg = compose_cfg([override, *NEEDS.get(override, [])], fast=False)
    validate(cfg)


@pytest.mark.parametrize("experiment", [str(p.relative_to(CONF / "experiment").with_suffix(""))
                                        for p in sorted((CONF / "experiment").rglob("*.yaml"))])
def test_every_experiment_composes_and_validates(experiment):
    validate(compose_cfg([f"experiment={experiment}"], fast=False))


def test_every_sweep_composes():
    for sweep in options("sweep"):
        cfg = compose_cfg([f"sweep={sweep}"], fast=False)
        assert cfg is not None


def test_every_config_file_opens_with_a_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must open with a one-line comment"


def test_all_wrong_keys_and_arguments_are_reported_together():
    cfg = compose_cfg(["method=ogm_ge", "+method.alpah=0.3", "+optimizer.moment=0.9",
                       "trainer.epochs=0", "eval.select_on=train", "+backbone.encoders.image.widht=4"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 5, text
    assert "method.alpah" in text and "accepted: alpha" in text
    assert "optimizer.moment" in text
    assert "trainer.epochs=0" in text
    assert "eval.select_on='train'" in text and "'val', 'test'" in text
    assert "backbone.encoders.image.widht" in text


@pytest.mark.parametrize("override, problem", [
    ("+trainer.epocs=3", "trainer.epocs: unknown key, no code reads it; did you mean trainer.epochs?"),
    ("+eval.select_metrc=macro_f1",
     "eval.select_metrc: unknown key, no code reads it; did you mean eval.select_metric or eval.select_on?"),
    ("+trainer.select_metric=acc",
     "trainer.select_metric: unknown key, no code reads it; did you mean eval.select_metric or eval.select_on?"),
    ("+hardware.thread=2", "hardware.thread: unknown key, no code reads it; did you mean hardware.threads?"),
    ("+sed=1", "sed: unknown key, no code reads it; did you mean seed?"),
    ("+trainer.zzz=1", "trainer.zzz: unknown key, no code reads it; the known keys here: trainer.batch_size, "
                       "trainer.drop_last, trainer.epochs, trainer.grad_clip, trainer.progress_bar"),
])
def test_a_key_no_code_reads_is_refused_naming_the_closest_known_keys(override, problem):
    # `+key=value` is the form Hydra's own error suggests for a key the config lacks: it adds any key
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([override]))
    assert err.value.problems == [problem]


def test_a_required_method_argument_is_named():
    cfg = compose_cfg(["method=unimodal"])
    with pytest.raises(ConfigError, match=r"method.modality is required"):
        validate(cfg)


def test_a_typo_in_an_existing_group_is_caught_by_hydra_struct_mode():
    with pytest.raises(ConfigCompositionException, match="method.alpah"):
        compose_cfg(["method=ogm_ge", "method.alpah=0.3"])


def test_default_config_is_the_demo_on_cpu():
    cfg = compose_cfg([], fast=False)
    assert cfg.dataset._target_.endswith("build_digits_av")
    assert cfg.hardware.device == "cpu" and cfg.masking == "input" and cfg.eval.select_on == "val"
    assert OmegaConf.select(cfg, "method._target_").endswith("Baseline")


def test_gpu_hardware_uses_cuda_bf16_pinned_memory_and_workers():
    cfg = compose_cfg(["hardware=gpu"], fast=False)
    assert (cfg.hardware.device, cfg.hardware.precision, cfg.hardware.pin_memory) == ("cuda", "bf16", True)
    assert cfg.hardware.num_workers > 0


def test_backbone_fusion_choices_are_the_fusion_registry():
    from mmbalance.models.fusion import FUSIONS

    for name in FUSIONS:
        validate(compose_cfg([f"backbone.fusion={name}"]))
    with pytest.raises(ConfigError, match="backbone.fusion='late'") as info:
        validate(compose_cfg(["backbone.fusion=late"]))
    assert all(repr(name) in str(info.value) for name in FUSIONS)
