"""Hybrid strategies (method=compose and the conf/method/hybrid_* files): how parts combine, what is refused
before training, that baseline + X is X, the parts' settings on the command line and in the run identity, sweeps
over the parts, and the FLOPs of a hybrid."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import FAST, THREE, compose_cfg, read_metrics, run_cli, train_in_process, without_times
from mmbalance.config import build, validate
from mmbalance.engine.identity import run_identity
from mmbalance.errors import ConfigError, UserError
from mmbalance.methods.base import Method
from mmbalance.methods.compose import Compose, composition_problems, overrides
from mmbalance.metrics.flops import count_flops
from test_methods import CONF_METHODS, is_hybrid, make_run

HYBRIDS = sorted(p for p in CONF_METHODS.glob("*.yaml") if is_hybrid(p))


def hybrid(parts: str, *extra: str):
    return build(compose_cfg(["method=compose", f"method.parts=[{parts}]", *extra]).method)


# ---------------------------------------------------------------- the stored hybrids

def test_there_are_stored_hybrids_and_each_is_named_by_its_parts():
    assert len(HYBRIDS) >= 2
    for path in HYBRIDS:
        node = OmegaConf.load(path)
        assert path.stem == "hybrid_" + "_".join(node.parts), f"{path.name} holds parts {list(node.parts)}"
        method = build(compose_cfg([f"method={path.stem}"]).method)
        assert isinstance(method, Compose) and method.part_names == list(node.parts)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("parts, why", [
    ("agm,mmcosine", "agm and mmcosine clash at `forward`"),
    ("mla,reconboost", "mla and reconboost clash at `training_step`"),
    ("gblending,mmcosine", "gblending and mmcosine clash at `eval_fuse`"),
    ("mla,ogm_ge", "mla and ogm_ge clash: mla takes over the training step, so ogm_ge's `on_after_backward` would"),
    ("mmpareto,mbsd", "mmpareto and mbsd clash: mmpareto replaces the backward pass"),
])
def test_parts_that_cannot_work_together_are_refused_naming_both(parts, why):
    with pytest.raises(UserError, match="cannot combine") as err:
        hybrid(parts)
    assert why in str(err.value)


def test_every_clash_of_one_composition_is_in_the_one_error():
    with pytest.raises(UserError) as err:
        hybrid("agm,mmcosine,gblending")
    text = str(err.value)
    assert text.count("\n") == 0 and "clash at `forward`" in text
    assert "mmcosine and gblending clash at `eval_fuse`" in text


@pytest.mark.parametrize("parts, message", [
    ("ogm_ge,nosuch", "no registered method 'nosuch' \\(registered: .*ogm_ge"),
    ("ogm_ge,compose", "compose cannot be a part of itself"),
    ("ogm_ge,ogm_ge", "ogm_ge listed more than once"),
])
def test_unknown_nested_or_repeated_parts_are_refused(parts, message):
    with pytest.raises(UserError, match=message):
        hybrid(parts)


def test_an_empty_composition_and_settings_of_a_non_part_are_refused():
    with pytest.raises(UserError, match="method.parts is empty"):
        Compose(parts=[])
    with pytest.raises(UserError, match="method.agm: settings of a method that is not a part"):
        hybrid("ogm_ge,mbsd", "+method.agm.alpha=2")


def test_overrides_compare_the_class_hook_with_the_base():
    parts = hybrid("ogm_ge,mbsd").parts
    assert [overrides(p, "on_after_backward") for p in parts] == [True, False]
    assert [overrides(p, "loss") for p in parts] == [False, True]
    assert composition_problems(parts) == []


def test_two_parts_that_replace_the_model_are_refused_before_training():
    class Replaces(Method):
        def setup(self, run):
            run.model = torch.nn.Sequential(run.model)

    method = hybrid("baseline,ogm_ge")
    method.parts = [Replaces(), Replaces()]
    run = make_run(compose_cfg(["method=baseline"]))
    with pytest.raises(UserError, match="Replaces and Replaces clash at the model: each replaces run.model"):
        method.setup(run)


# ---------------------------------------------------------------- how the hooks combine

def test_strictest_part_wins_on_modalities_and_per_modality_logits():
    method = hybrid("greedy,baseline")
    assert method.max_modalities == 2 and method.needs_unimodal_logits
    with pytest.raises(UserError, match="method greedy supports at most 2 modalities"):
        method.check_modalities(["a", "b", "c"])
    assert not hybrid("baseline,mmcosine").needs_unimodal_logits
    picked = hybrid("unimodal,baseline", "+method.unimodal.modality=visual")
    assert picked.select_modalities(["audio", "visual"]) == ["visual"]


def test_the_hybrid_family_records_its_parts():
    assert hybrid("ogm_ge,mbsd").family == "hybrid: ogm_ge (optimization) + mbsd (objective)"
    assert Compose.family == "hybrid"  # the registry's family of hybrids; built hybrids report their parts


def test_losses_of_the_parts_add_up_under_their_names():
    cfg = compose_cfg(["method=compose", "method.parts=[mbsd,olm]"])
    run = make_run(cfg)
    batch = next(iter(run.train_loader))
    stats = run.method.training_step(run, batch)
    assert float(stats["loss"]) == pytest.approx(float(stats["mbsd/loss"] + stats["olm/loss"]))
    assert {"mbsd/kl", "mbsd/ce/audio", "olm/w/fused", "olm/norm_loss"} <= set(stats)


def test_a_part_that_predicts_internally_predicts_the_hybrids_way():
    # valuation's Shapley pass calls its own eval_fuse: in a hybrid that is the prediction part's (gblending's)
    cfg = compose_cfg(["method=compose", "method.parts=[valuation,gblending]"])
    run = make_run(cfg)
    valuation, gblending = run.method.parts
    assert run.method.owner["eval_fuse"] is gblending and valuation.eval_fuse == run.method.eval_fuse
    with torch.no_grad():
        features = run.model.encode(next(iter(run.train_loader)).inputs)
        fused, unimodal = valuation.eval_fuse(run, features)
        expected_fused, expected_unimodal = gblending.eval_fuse(run, features)
    torch.testing.assert_close(fused, expected_fused)
    for m in run.model.modalities:  # gblending's own heads, not the fusion head's slices
        torch.testing.assert_close(unimodal[m], expected_unimodal[m])
        torch.testing.assert_close(unimodal[m], gblending.heads[m](features[m]))


# ---------------------------------------------------------------- baseline + X is X

def _history(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path / "history.csv")))


@pytest.mark.parametrize("method, renamed", [("ogm_ge", {}), ("mbsd", {"kl": "mbsd/kl", "ce/audio": "mbsd/ce/audio"})])
def test_baseline_plus_a_method_reproduces_the_method_exactly(tmp_path, method, renamed):
    small = ["dataset.num_samples=64"]
    alone = train_in_process(tmp_path / "alone", [f"method={method}", *small])
    composed = train_in_process(tmp_path / "composed", ["method=compose", f"method.parts=[baseline,{method}]", *small])
    a, b = _history(tmp_path / "alone"), _history(tmp_path / "composed")
    assert len(a) == len(b) == 2
    for row_a, row_b in zip(a, b):
        same = [k for k in row_a if k != "time_s" and k in row_b]
        assert len(same) > 10 and {k: row_a[k] for k in same} == {k: row_b[k] for k in same}
        assert all(row_a[f"train/{k}"] == row_b[f"train/{v}"] for k, v in renamed.items())
    ma, mb = alone["metrics"], composed["metrics"]
    assert without_times(ma) == without_times(mb)


# ---------------------------------------------------------------- the parts' settings

def test_a_parts_setting_on_the_command_line_reaches_the_part():
    assert hybrid("ogm_ge,mbsd", "+method.ogm_ge.alpha=0.37").parts[0].alpha == 0.37
    cfg = compose_cfg(["method=hybrid_ogm_ge_mbsd", "method.ogm_ge.alpha=0.37", "method.mbsd.kl_weight=2"])
    stored = build(cfg.method)
    assert stored.parts[0].alpha == 0.37 and stored.parts[1].kl_weight == 2.0


def test_a_bad_part_setting_is_reported_under_the_parts_path():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["method=hybrid_ogm_ge_mbsd", "method.ogm_ge.alpha=abc", "+method.mbsd.kl_wieght=1"]))
    text = str(err.value)
    assert "method.ogm_ge.alpha='abc': expected a number" in text
    assert "method.mbsd.kl_wieght: mmbalance.methods.mbsd.MBSD has no argument 'kl_wieght'" in text


def test_a_parts_constructor_error_names_the_part_and_the_path_of_its_settings():
    # a check only the part's constructor makes (no single value is wrong): refused when the hybrid is built
    with pytest.raises(ConfigError) as err:
        hybrid("ogm_ge,mlgm", "+method.mlgm.modulation_starts=5", "+method.mlgm.modulation_ends=2")
    assert err.value.problems == [
        "method.parts[1] (mlgm): method.mlgm.modulation_starts=5 is after method.mlgm.modulation_ends=2: the "
        "modulation window (0-based epochs, both inclusive) would be empty; use modulation_starts <= "
        "modulation_ends, or modulation_ends=null for no end"]
    with pytest.raises(UserError, match=r"^method.parts\[1\] \(reconboost\): method.reconboost.boost_epochs=0, "
                                        r"method.reconboost.correct_epochs=0; expected"):
        hybrid("ogm_ge,reconboost", "+method.reconboost.boost_epochs=0", "+method.reconboost.correct_epochs=0")
    with pytest.raises(ConfigError) as err:  # built from Python, with a value the part's signature refuses
        Compose(["ogm_ge", "mbsd"], ogm_ge={"alpha": -1})
    assert err.value.problems == ["method.parts[0] (ogm_ge): method.ogm_ge.alpha=-1: expected >= 0"]


def test_the_resolved_config_holds_every_parts_full_settings_and_the_identity_covers_them():
    cfg = compose_cfg(["method=compose", "method.parts=[agm,mbsd]", "+method.agm.alpha=0.5"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    parts = resolved["method"]["resolved"]
    assert parts["mbsd"] == OmegaConf.to_container(OmegaConf.load(CONF_METHODS / "mbsd.yaml"))
    agm = OmegaConf.to_container(OmegaConf.load(CONF_METHODS / "agm.yaml"))
    assert parts["agm"] == {**agm, "alpha": 0.5}
    digest = run_identity(resolved, "0")["digest"]
    other = OmegaConf.to_container(compose_cfg(["method=compose", "method.parts=[agm,mbsd]",
                                                "+method.mbsd.rs_weight=2"]), resolve=True)
    assert run_identity(other, "0")["digest"] != digest
    assert run_identity(other, "0")["config"]["method.resolved.mbsd.rs_weight"] == 2


def test_a_run_records_the_hybrid_its_parts_and_their_named_losses(tmp_path):
    results = train_in_process(tmp_path, ["method=hybrid_ogm_ge_mbsd", "method.ogm_ge.alpha=0.5", *THREE,
                                          "trainer.epochs=1", "dataset.num_samples=64"])
    assert results["status"] == "completed"
    metrics = read_metrics(tmp_path)
    assert metrics["method_family"] == "hybrid: ogm_ge (optimization) + mbsd (objective)"
    assert metrics["config"]["method"]["resolved"]["ogm_ge"]["alpha"] == 0.5
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/mbsd/loss", "train/mbsd/kl", "train/mbsd/ce/text"} <= set(header)


# ---------------------------------------------------------------- sweeps over the parts

def test_a_sweep_over_parts_expands_to_one_composition_per_list():
    (override,) = OverridesParser.create().parse_overrides(["method.parts=[ogm_ge,mbsd],[baseline,mmcosine]"])
    jobs = list(override.sweep_string_iterator())
    assert jobs == ["[ogm_ge,mbsd]", "[baseline,mmcosine]"]
    built = [hybrid(job.strip("[]")) for job in jobs]
    assert [m.part_names for m in built] == [["ogm_ge", "mbsd"], ["baseline", "mmcosine"]]


@pytest.mark.slow
def test_cli_multirun_over_parts(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=compose", "method.parts=[ogm_ge,mbsd],[baseline,mmcosine]", *FAST,
                    "trainer.epochs=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    families = sorted(json.loads(p.read_text())["method_family"] for p in sweep.glob("*/metrics.json"))
    assert families == ["hybrid: baseline (reference) + mmcosine (objective)",
                        "hybrid: ogm_ge (optimization) + mbsd (objective)"]


# ---------------------------------------------------------------- FLOPs

def _step_flops(parts: str) -> int:
    cfg = compose_cfg(["method=compose", f"method.parts=[{parts}]", "+method.olm.holdout_fraction=0.5"]
                      if "olm" in parts else ["method=compose", f"method.parts=[{parts}]"])
    run = make_run(cfg)
    batch = next(iter(run.test_loader))  # one fixed batch for every composition
    _, flops = count_flops(run.method.training_step, run, batch)
    return flops


def test_the_extra_work_of_a_hybrid_is_the_sum_of_its_parts_extra_work():
    base = _step_flops("baseline")
    olm, gblending = _step_flops("olm") - base, _step_flops("gblending") - base
    assert olm > 0 and gblending > 0  # the held-out pass and aux heads; gblending's aux heads
    assert _step_flops("olm,gblending") - base == olm + gblending


def test_a_hybrid_trains_the_tasks_every_part_trains():
    method = hybrid("baseline,mmpareto")
    assert method.tasks == ("classification", "regression")
    method.set_task("regression")
    assert method.task == "regression" and all(p.task == "regression" for p in method.parts)
    refusing = hybrid("baseline,ogm_ge")
    assert refusing.tasks == ("classification",)
    with pytest.raises(UserError, match="^method ogm_ge does not support dataset.task=regression: its modulation"):
        refusing.set_task("regression")


# ---------------------------------------------------------------- held-out training data, in any order

@pytest.mark.parametrize("parts, extra", [
    ("valuation,olm", []), ("olm,valuation", []), ("valuation,gblending", []),
    ("valuation,lfm", ["+method.lfm.weighting=learnable"]),
])
def test_no_part_sees_another_parts_held_out_samples_whatever_the_order(parts, extra):
    # valuation keeps the training set at setup and re-samples it every epoch: listed before the part that holds
    # out data, it used to keep the whole set and so train on the held-out samples from its first re-sampling
    run = make_run(compose_cfg(["method=compose", f"method.parts=[{parts}]", *extra]))
    valuation = next(p for p in run.method.parts if p.name == "valuation")
    holder = next(p for p in run.method.parts if p.name != "valuation")
    kept = valuation.train_dataset
    assert kept is run.train_loader.dataset
    assert len(kept) == len(holder.train_indices) and not set(kept.indices) & set(holder.holdout_indices.tolist())


def test_every_parts_setup_sees_the_training_set_without_held_out_data():
    class Reads(Method):  # a part that reads the training set at setup (as UMT's teachers and PMR's prototypes)
        def setup(self, run):
            self.seen = len(run.train_loader.dataset)

    method = hybrid("baseline,olm")
    reader, olm = Reads(), method.parts[1]
    method.parts = [reader, olm]
    run = make_run(compose_cfg(["method=baseline"]))
    method.setup(run)
    assert reader.seen == len(olm.train_indices) == len(run.train_loader.dataset)
    assert len(olm.holdout_indices) > 0


def test_a_part_whose_setup_rebuilds_the_training_loader_is_refused_before_training():
    class Splits(Method):  # holds out data in setup rather than in hold_out: a part before it may have read the set
        def setup(self, run):
            run.train_loader = run.make_loader(run.train_loader.dataset, train=True)

    method = hybrid("baseline,ogm_ge")
    method.parts = [method.parts[1], Splits()]
    run = make_run(compose_cfg(["method=baseline"]))
    with pytest.raises(UserError, match="Splits rebuilds the training loader in its setup.*`hold_out`"):
        method.setup(run)


# ---------------------------------------------------------------- logged names

def test_a_key_that_already_carries_the_parts_name_keeps_it_and_the_others_get_it():
    run = make_run(compose_cfg(["method=compose", "method.parts=[mlgm,olm]"]))
    stats = run.method.training_step(run, next(iter(run.train_loader)))
    assert {"mlgm/k/audio", "mlgm/score/audio", "mlgm/ce/audio", "olm/w/fused", "olm/ce/audio"} <= set(stats)
    assert not [k for k in stats if k.startswith(("mlgm/mlgm/", "olm/olm/"))]


# ---------------------------------------------------------------- `resolved` is computed

def test_the_resolved_parts_can_be_resolved_in_place_as_the_cli_resolves_them():
    # `--cfg job --resolve` calls OmegaConf.resolve, which takes a resolver's config node but not a plain dict
    for chosen in (["method=hybrid_ogm_ge_mbsd"], ["method=compose", "method.parts=[valuation,olm]"]):
        cfg = compose_cfg(chosen)
        before = OmegaConf.to_container(cfg, resolve=True)
        OmegaConf.resolve(cfg)
        assert OmegaConf.to_container(cfg) == before


@pytest.mark.parametrize("chosen, instead", [
    (["method=hybrid_ogm_ge_mbsd"], "set method.ogm_ge.alpha=0.1 instead"),
    (["method=compose", "method.parts=[ogm_ge,mbsd]"], "set +method.ogm_ge.alpha=0.1 instead"),
])
def test_a_hand_set_resolved_is_refused_naming_the_setting_to_use(chosen, instead):
    # the parts are built from `resolved`, but the record shows method.<part>.*: alpha 0.1 trained, 0.8 recorded
    hand = ("method.resolved={ogm_ge:{_target_:mmbalance.methods.ogm_ge.OGMGE,alpha:0.1},"
            "mbsd:{_target_:mmbalance.methods.mbsd.MBSD}}")
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*chosen, hand]))
    assert "method.resolved is computed from method.parts and method.<part>.<key>, do not set it" in str(err.value)
    assert instead in str(err.value)
    validate(compose_cfg(["method=hybrid_ogm_ge_mbsd", "method.ogm_ge.alpha=0.1"]))  # the way to set it


def test_a_hybrid_needs_as_many_modalities_as_its_most_demanding_part():
    assert hybrid("baseline,ogm_ge").min_modalities == 2
    picked = hybrid("unimodal,baseline", "+method.unimodal.modality=visual")
    assert picked.min_modalities == 1
    picked.check_modalities(picked.select_modalities(["audio", "visual"]))
    with pytest.raises(UserError, match="method ogm_ge balances modalities against each other, so it needs at least"):
        hybrid("unimodal,ogm_ge", "+method.unimodal.modality=visual").check_modalities(["visual"])


def test_umts_cached_teacher_is_keyed_by_which_samples_the_training_part_holds():
    # before UMT's setup a part may hold out data: two held-out splits of the same size (here G-Blending's and
    # OLM's 20 %) leave different training parts, and a teacher cached for one has trained on the other's held out
    from mmbalance.methods.umt import UMT, subset_fingerprint

    runs = [make_run(compose_cfg([f"method={name}", "method.holdout_fraction=0.2"])) for name in ("gblending", "olm")]
    assert len(runs[0].train_loader.dataset) == len(runs[1].train_loader.dataset)
    keys = [UMT(teacher_epochs=1).teacher_key(run, "audio") for run in runs]
    assert keys[0]["train_size"] == keys[1]["train_size"] and keys[0] != keys[1]
    whole = make_run(compose_cfg(["method=baseline"]))
    assert "train_subset" not in UMT(teacher_epochs=1).teacher_key(whole, "audio")  # earlier cache entries still match
    nested = torch.utils.data.Subset(torch.utils.data.Subset(list(range(10)), [9, 7, 5, 3]), [3, 0])
    assert subset_fingerprint(nested) == subset_fingerprint(torch.utils.data.Subset(list(range(10)), [3, 9]))
