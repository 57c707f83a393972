"""`mmbalance gap`: the linear probe, the pairing of joint and unimodal runs, and the command end to end."""

import json
import math

import pandas as pd
import pytest
import torch

from mmbalance.analysis.modality_gap import (
    ProbeSettings, _load, linear_probe, linear_regression_probe, main, pair_runs, write_gap_report,
)
from mmbalance.errors import UserError

from conftest import compose_cfg
from fixtures_cmu_mosei import write_mult


# ------------------------------------------------------------------------------------------------ probe


def _blobs(n, d, classes, seed, separable=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g)
    if separable:  # class c lives around 8·e_c: linearly separable with a wide margin
        x[torch.arange(n), y] += 8.0
    return x, y


def test_probe_separates_linearly_separable_features():
    tx, ty = _blobs(200, 6, 4, seed=0)
    vx, vy = _blobs(100, 6, 4, seed=1)
    result = linear_probe(tx, ty, vx, vy, 4, ProbeSettings(steps=50))
    assert result.train == 1.0 and result.metric == "acc"
    assert result.test == 1.0


def test_probe_is_near_chance_on_label_independent_features():
    tx, ty = _blobs(400, 8, 4, seed=0, separable=False)
    vx, vy = _blobs(2000, 8, 4, seed=1, separable=False)
    result = linear_probe(tx, ty, vx, vy, 4)
    assert abs(result.test - 0.25) < 0.05


def test_probe_is_seeded_and_scale_free():
    tx, ty = _blobs(120, 5, 3, seed=2, separable=False)
    vx, vy = _blobs(60, 5, 3, seed=3, separable=False)
    a = linear_probe(tx, ty, vx, vy, 3, ProbeSettings(steps=30, seed=7))
    b = linear_probe(tx, ty, vx, vy, 3, ProbeSettings(steps=30, seed=7))
    assert a == b
    c = linear_probe(tx * 1000 - 3, ty, vx * 1000 - 3, vy, 3, ProbeSettings(steps=30, seed=7))
    assert abs(c.test - a.test) <= 1 / 60 + 1e-9  # standardised: the feature scale does not matter


def test_regression_probe_fits_a_linear_score_and_reports_its_mae():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.5, -2.0, 0.5, 0.0])
    tx, vx = torch.randn(300, 4, generator=g), torch.randn(100, 4, generator=g)
    ty, vy = tx @ w + 0.3, vx @ w + 0.3  # float scores, as a regression run's labels
    result = linear_regression_probe(tx, ty, vx, vy, ProbeSettings(steps=50))
    assert result.metric == "mae" and result.test < 0.01 and result.train < 0.01
    # label-independent features: no better than predicting the training mean
    noise = linear_regression_probe(tx, torch.randn(300, generator=g), vx, vy, ProbeSettings(steps=50))
    assert noise.test > 0.8 * (vy - vy.mean()).abs().mean().item()
    assert linear_regression_probe(tx, ty, vx, vy, ProbeSettings(steps=20, seed=3)) == \
        linear_regression_probe(tx, ty, vx, vy, ProbeSettings(steps=20, seed=3))


def test_help_shows_the_probe_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "L-BFGS iterations of the probe (default: 100)" in text
    assert "(default: 0.0001)" in text and "seed (default: 0)" in text and "cpu or cuda (default: cpu)" in text


# ---------------------------------------------------------------------------------------------- pairing


def make_run(root, name, method, seed, modality=None, dataset="synthetic", num_samples=96, status="completed",
             modalities=("audio", "visual"), overrides=(), **recipe):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    method_cfg = {"_target_": f"mmbalance.methods.{method}.X"}
    if modality:
        method_cfg["modality"] = modality
    data = {
        "status": status,
        "choices": {"dataset": dataset, "method": method, "backbone": "small"},
        "config": {"seed": seed, "dataset": {"num_samples": num_samples, "seed": 0}, "method": method_cfg,
                   "backbone": {"fusion": "concat"}, "masking": "input", **recipe},
        "seed": seed,
        "modalities": [modality] if modality else list(modalities),
        "metrics": {"test/acc": 0.5},
        "overrides": list(overrides),
    }
    (run_dir / "metrics.json").write_text(json.dumps(data))
    return run_dir


def _pairs(root, **kw):
    runs, skipped = _load([root])
    return pair_runs(runs, **kw), skipped


def test_pairs_by_dataset_and_seed(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"b{seed}", "baseline", seed)
        make_run(tmp_path, f"o{seed}", "ogm_ge", seed)
        make_run(tmp_path, f"a{seed}", "unimodal", seed, "audio")
        make_run(tmp_path, f"v{seed}", "unimodal", seed, "visual")
    make_run(tmp_path, "other_data", "unimodal", 0, "audio", num_samples=500)  # another dataset config: ignored
    make_run(tmp_path, "failed", "baseline", 2, status="failed")  # left out, and said so
    pairs, skipped = _pairs(tmp_path)
    assert len(pairs) == 2 * 2 * 2  # 2 methods x 2 seeds x 2 modalities
    for p in pairs:
        assert p.alone.seed == p.joint.seed
        assert p.alone.unimodal_modality == p.modality
        assert p.alone.dataset_key == p.joint.dataset_key
        assert p.alone.run_dir.name == f"{p.modality[0]}{p.joint.seed}"
    assert [p.joint.method for p in pairs[:4]] == ["baseline"] * 4  # the reference first
    assert len(skipped) == 1 and "failed" in skipped[0]
    only, _ = _pairs(tmp_path, methods=["ogm_ge"])
    assert {p.joint.method for p in only} == {"ogm_ge"}


def test_missing_unimodal_run_is_a_clear_error(tmp_path):
    make_run(tmp_path, "b0", "baseline", 0)
    make_run(tmp_path, "b1", "baseline", 1)
    make_run(tmp_path, "a0", "unimodal", 0, "audio")
    make_run(tmp_path, "v0", "unimodal", 0, "visual")
    make_run(tmp_path, "a1", "unimodal", 1, "audio")
    with pytest.raises(UserError, match=r"(?s)1 problem.*modality 'visual'.*seed 1.*method.modality=visual seed=1"):
        _pairs(tmp_path)


def test_the_command_for_a_missing_unimodal_run_carries_the_joint_runs_overrides(tmp_path):
    # a CMU-MOSEI regression run on data outside paths.data_dir: the unimodal run that pairs with it needs the same
    # dataset.root, dataset.prepared and dataset.task (and recipe); its own method and seed, no logger, no sweep
    joint = ["dataset=cmu_mosei", "dataset.root=/data/my mosei", "dataset.prepared=null", "dataset.task=regression",
             "trainer.epochs=1", "logger=[tensorboard,mlflow]", "seed=1", "resume=never", "sweep=modality_gap"]
    make_run(tmp_path, "b1", "baseline", 1, dataset="cmu_mosei", overrides=joint)
    make_run(tmp_path, "v1", "unimodal", 1, "visual", dataset="cmu_mosei")
    with pytest.raises(UserError) as e:
        _pairs(tmp_path)
    assert ("train one with `python -m mmbalance dataset=cmu_mosei 'dataset.root=/data/my mosei' "
            "dataset.prepared=null dataset.task=regression trainer.epochs=1 method=unimodal method.modality=audio "
            "seed=1`") in str(e.value)
    # a run chosen by an experiment keeps it, and names its dataset
    make_run(tmp_path / "x", "b0", "baseline", 0, overrides=["experiment=demo/baseline", "seed=0"])
    with pytest.raises(UserError, match=r"`python -m mmbalance dataset=synthetic experiment=demo/baseline "
                                        r"method=unimodal method.modality=audio seed=0`"):
        _pairs(tmp_path / "x")


def test_no_joint_run_and_no_runs_are_clear_errors(tmp_path):
    make_run(tmp_path / "u", "a0", "unimodal", 0, "audio")
    with pytest.raises(UserError, match="no completed jointly trained run"):
        _pairs(tmp_path / "u")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs found"):
        write_gap_report([tmp_path / "empty"])


def test_ambiguous_unimodal_runs_are_refused(tmp_path):
    make_run(tmp_path, "b0", "baseline", 0)
    make_run(tmp_path, "a0", "unimodal", 0, "audio")
    # another run of the same modality and seed (another learning rate; an exact copy would be a repeat, counted once)
    make_run(tmp_path, "a0_again", "unimodal", 0, "audio", optimizer={"lr": 0.5})
    make_run(tmp_path, "v0", "unimodal", 0, "visual")
    with pytest.raises(UserError, match="2 unimodal runs of modality 'audio' match"):
        _pairs(tmp_path)


def test_pairs_trained_with_different_recipes_are_kept_and_named(tmp_path, caplog):
    sgd = {"optimizer": {"name": "sgd", "lr": 0.01}, "trainer": {"epochs": 2, "batch_size": 64}}
    adam = {"optimizer": {"name": "adam", "lr": 0.01}, "trainer": {"epochs": 1, "batch_size": 64}}
    make_run(tmp_path, "b0", "baseline", 0, **sgd)
    make_run(tmp_path, "a0", "unimodal", 0, "audio", **adam)
    make_run(tmp_path, "v0", "unimodal", 0, "visual", **sgd)
    with caplog.at_level("WARNING"):
        pairs, _ = _pairs(tmp_path)
    differ = {p.modality: p.recipe_differences for p in pairs}
    # still paired (the rule is the dataset config and the seed), but the differing keys are named
    assert differ == {"audio": ["optimizer.name", "trainer.epochs"], "visual": []}
    assert "differ in optimizer.name, trainer.epochs" in caplog.text and "a0" in caplog.text


def test_out_naming_an_existing_file_is_a_clear_error_before_probing(tmp_path, capsys):
    for name, method, modality in [("b0", "baseline", None), ("a0", "unimodal", "audio"), ("v0", "unimodal", "visual")]:
        run = make_run(tmp_path / "runs", name, method, 0, modality)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "best.pt").write_bytes(b"")  # never read: the output folder is checked first
    (tmp_path / "out.txt").write_text("")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "out.txt") in err and "not a folder" in err


def test_run_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    make_run(tmp_path, "b0", "baseline", 0)
    make_run(tmp_path, "a0", "unimodal", 0, "audio")
    make_run(tmp_path, "v0", "unimodal", 0, "visual")
    assert main([str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end

FAST_SMALL = ["dataset.num_samples=120", "backbone.encoders.image.width=4", "backbone.encoders.spectrogram.width=4",
              "eval.flops=false", "eval.shapley_every=0"]


def _train(root, name, overrides, choices):
    from mmbalance.train import train

    cfg = compose_cfg(FAST_SMALL + overrides)
    return train(cfg, root / name, {"dataset": "synthetic", **choices}, overrides)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """baseline + unimodal audio + unimodal visual on synthetic data, seed 0, 2 epochs."""
    root = tmp_path_factory.mktemp("gap_sweep")
    _train(root, "0", ["method=baseline"], {"method": "baseline"})
    _train(root, "1", ["method=unimodal", "method.modality=audio"], {"method": "unimodal"})
    _train(root, "2", ["method=unimodal", "method.modality=visual"], {"method": "unimodal"})
    return root


def test_gap_command_end_to_end(tiny_sweep, tmp_path, capsys):
    out = tmp_path / "gap"
    assert main([str(tiny_sweep), "--out", str(out), "--probe-steps", "30"]) == 0
    for name in ("modality_gap.csv", "modality_gap.md", "modality_gap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rows = pd.read_csv(out / "modality_gap.csv")
    assert sorted(rows["modality"]) == ["audio", "visual"]
    assert set(rows["method"]) == {"baseline"}
    assert set(rows["metric"]) == {"acc"}
    for c in ("probe_joint", "probe_alone", "alone_test", "branch_joint_test", "probe_joint_train"):
        assert rows[c].between(0, 1).all(), c
    assert ((rows["gap"] - (rows["probe_alone"] - rows["probe_joint"])).abs() < 1e-12).all()
    md = (out / "modality_gap.md").read_text()
    assert "| baseline | – | audio | 1 |" in md
    assert "probe in joint" in capsys.readouterr().out
    assert not math.isnan(rows["probe_alone"].iloc[0])


def test_intermediate_fusion_method_is_refused(tiny_sweep, tmp_path):
    """A checkpoint with parameters the late-fusion model lacks (Greedy's MMTM blocks) is refused clearly."""
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, root)
    ckpt = root / "0" / "checkpoints" / "best.pt"
    state = torch.load(ckpt, weights_only=False)
    state["model"]["mmtm.0.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(UserError, match="replaces the model in its setup.*late_fusion=False"):
        write_gap_report([root], tmp_path / "out")


def test_a_checkpoint_of_another_epoch_than_the_record_is_refused(tiny_sweep, tmp_path):
    """The probe uses the weights the record tested: a best.pt of another epoch (an unfinished resume=force
    extension rewrites it) is refused, naming both files."""
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, root)
    ckpt = root / "0" / "checkpoints" / "best.pt"
    state = torch.load(ckpt, weights_only=False)
    state["epoch"] += 1
    torch.save(state, ckpt)
    with pytest.raises(UserError, match=f"best.pt holds the weights of epoch {state['epoch']}, but .*metrics.json "
                                        f"records the results of epoch {state['epoch'] - 1}"):
        write_gap_report([root], tmp_path / "out", ProbeSettings(steps=5))


def test_gap_output_names_pairs_with_different_recipes(tiny_sweep, tmp_path):
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, root)
    record = root / "1" / "metrics.json"  # the audio-alone run, as if trained for another number of epochs
    data = json.loads(record.read_text())
    data["config"]["trainer"]["epochs"] += 1
    record.write_text(json.dumps(data))
    result = write_gap_report([root], tmp_path / "out", ProbeSettings(steps=5))
    rows = result["rows"].set_index("modality")
    assert rows.at["audio", "recipe_differences"] == "trainer.epochs" and rows.at["visual", "recipe_differences"] == ""
    assert "**Warning:** 1 pair(s)" in result["markdown"]
    assert f"- `{root / '0'}` and `{root / '1'}` (audio): trainer.epochs" in result["markdown"]


# a tiny regression run on the CMU-MOSEI fixture (20 samples), two modalities, one small transformer layer each
REGRESSION = ["dataset=cmu_mosei", "dataset.prepared=null", "dataset.task=regression", "dataset.modalities=[audio,text]",
              "trainer.epochs=1", "trainer.batch_size=4", "trainer.progress_bar=false", "hardware=cpu",
              "eval.flops=false", "logger=csv", "backbone.encoders.sequence.d_model=8",
              "backbone.encoders.sequence.layers=1"]


def test_gap_of_regression_runs_probes_by_mae(tmp_path):
    """dataset.task=regression: a linear regression probe scored by the MAE (the run's own value), never a
    classifier on float scores; numbers in MAE points, in their own section."""
    from mmbalance.train import train

    write_mult(tmp_path / "data" / "cmu_mosei", aligned=False)
    for name, extra in [("joint", ["method=baseline"]),
                        ("audio", ["method=unimodal", "method.modality=audio"]),
                        ("text", ["method=unimodal", "method.modality=text"])]:
        args = [f"paths.data_dir={tmp_path / 'data'}", *REGRESSION, *extra]
        train(compose_cfg(args, fast=False), tmp_path / "runs" / name,
              {"dataset": "cmu_mosei", "method": extra[0].split("=")[1]}, args)
    result = write_gap_report([tmp_path / "runs"], tmp_path / "out", ProbeSettings(steps=10))
    rows = result["rows"].set_index("modality")
    assert sorted(rows.index) == ["audio", "text"] and set(rows["metric"]) == {"mae"}
    records = {n: json.loads((tmp_path / "runs" / n / "metrics.json").read_text())["metrics"]
               for n in ("joint", "audio")}
    assert rows.at["audio", "alone_test"] == pytest.approx(records["audio"]["test/mae"])
    assert rows.at["audio", "branch_joint_test"] == pytest.approx(records["joint"]["test/mae/audio"])
    assert (rows["probe_joint"] >= 0).all() and (rows["probe_alone"] >= 0).all()
    assert ((rows["gap"] - (rows["probe_joint"] - rows["probe_alone"])).abs() < 1e-12).all()  # lower is better
    md = result["markdown"]
    assert "## cmu_mosei (regression: MAE, lower is better)" in md
    line = next(x for x in md.splitlines() if x.startswith("| baseline | – | audio |"))
    assert f"| {rows.at['audio', 'probe_joint']:.3f} ± – |" in line  # MAE points, not ×100


def test_a_repeated_run_counts_once(tmp_path):
    """A copied run folder (or the same sweep given twice) is one run, as `mmbalance report` counts it: the
    pairs, the rows and the n are those of the distinct runs."""
    import shutil

    for seed in (0, 1):
        make_run(tmp_path, f"b{seed}", "baseline", seed)
        make_run(tmp_path, f"a{seed}", "unimodal", seed, "audio")
        make_run(tmp_path, f"v{seed}", "unimodal", seed, "visual")
    shutil.copytree(tmp_path / "b0", tmp_path / "b0_copy")
    shutil.copytree(tmp_path / "a1", tmp_path / "a1_copy")  # a copied partner is no second candidate either
    pairs, skipped = _pairs(tmp_path)
    assert len(pairs) == 2 * 2 and sorted((p.joint.seed, p.modality) for p in pairs) == [
        (0, "audio"), (0, "visual"), (1, "audio"), (1, "visual")]
    assert len(skipped) == 2 and all(s.startswith("repeat: ") for s in skipped)
    assert f"repeat: {tmp_path / 'b0_copy'} repeats {tmp_path / 'b0'}" in skipped[1]  # the first by path counts



def test_a_run_forced_over_another_run_is_never_taken_for_the_run_it_records(tmp_path):
    """resume=force re-tested a unimodal-audio checkpoint under method=baseline: it records the baseline's settings
    and the audio model's numbers. As in `mmbalance report`, it is left out (with the reason), and the genuine
    baseline of that seed, later by path, is no "repeat" of it."""
    forced = make_run(tmp_path, "a_forced", "baseline", 0)
    data = json.loads((forced / "metrics.json").read_text())
    data["forced_resume"] = {"previous": ["method=unimodal"],
                             "differences": ["method.modality: 'audio' -> '<absent>'"]}
    (forced / "metrics.json").write_text(json.dumps(data))
    make_run(tmp_path, "b0", "baseline", 0)
    make_run(tmp_path, "a0", "unimodal", 0, "audio")
    make_run(tmp_path, "v0", "unimodal", 0, "visual")
    pairs, skipped = _pairs(tmp_path)
    assert sorted((p.joint.run_dir, p.modality) for p in pairs) == [(tmp_path / "b0", "audio"),
                                                                    (tmp_path / "b0", "visual")]
    assert skipped == [f"forced: {forced} (baseline): resume=force over another run: "
                       "method.modality: 'audio' -> '<absent>'"]

def test_a_copied_run_is_probed_once_end_to_end(tiny_sweep, tmp_path):
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, root)
    shutil.copytree(root / "0", root / "0_copy")
    result = write_gap_report([root], tmp_path / "out", ProbeSettings(steps=5))
    assert sorted(zip(result["rows"]["seed"], result["rows"]["modality"])) == [(0, "audio"), (0, "visual")]
    assert list(result["summary"]["n"]) == [1, 1]
    assert "repeat: " in result["markdown"]


def test_data_that_changed_since_training_are_refused(tiny_sweep, tmp_path):
    """The probe rebuilds the data from each run's config; data other than those the run was trained on (a
    features file whose labels were overwritten since) would give meaningless probes: one error, naming the run,
    where its data come from and what differs, before any probing."""
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, root)
    record = root / "0" / "metrics.json"
    data = json.loads(record.read_text())
    recorded = data["data_identity"]
    assert "train.labels" in recorded  # what training recorded (engine/identity.data_identity)
    data["data_identity"] = {**recorded, "train.labels": "0" * 16}  # as if the labels changed after training
    record.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        write_gap_report([root], tmp_path / "out", ProbeSettings(steps=5))
    message = str(e.value)
    assert "1 run(s) are not the data they were trained on" in message
    assert str(root / "0") in message and f"train.labels: '{'0' * 16}' -> '{recorded['train.labels']}'" in message
    assert str(root / "1") not in message and not (tmp_path / "out" / "modality_gap.csv").exists()


def test_a_feature_constant_on_the_training_split_does_not_blow_up_the_probe():
    # a dead unit (0 on every training sample) that fires on test: standardised by a near-zero std it carried its
    # random initial weight into the test outputs a million-fold (test MAE 0.96 instead of ~0)
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.5, -2.0, 0.5])
    tx, vx = torch.randn(300, 3, generator=g), torch.randn(100, 3, generator=g)
    ty, vy = tx @ w, vx @ w
    dead_train, dead_test = torch.zeros(300, 1), torch.full((100, 1), 0.05)
    clean = linear_regression_probe(tx, ty, vx, vy, ProbeSettings(steps=50))
    dead = linear_regression_probe(torch.cat([tx, dead_train], 1), ty, torch.cat([vx, dead_test], 1), vy,
                                   ProbeSettings(steps=50))
    assert dead.test < 0.01 and dead.test == pytest.approx(clean.test, abs=1e-4)
    labels = (tx[:, 0] > 0).long()
    acc = linear_probe(torch.cat([tx, dead_train], 1), labels, torch.cat([vx, dead_test * 1e3], 1),
                       (vx[:, 0] > 0).long(), 2, ProbeSettings(steps=50))
    assert acc.test > 0.95
    with pytest.raises(UserError, match="every feature is constant on the training split"):
        linear_probe(dead_train, labels, dead_test, (vx[:, 0] > 0).long(), 2)


@pytest.mark.parametrize("option, message", [
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:<index>"),
])
def test_bad_probe_options_are_one_clear_error_before_anything_is_read(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nothing"), *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
