"""`mmbalance report` over hand-written run folders: grouping, statistics, failures, files."""

import hashlib
import json
import os
import math
import subprocess
import sys

import pandas as pd
import pytest

from mmbalance.analysis.report import format_runs_table, load_runs, main, summarize, write_report
from mmbalance.errors import UserError


def _config(method: str, seed: int, run_dir, **method_params) -> dict:
    return {
        "seed": seed,
        "dataset": {"name": "digits_av", "image_noise": 0.0, "split_seed": seed},
        "method": {"_target_": f"mmbalance.methods.{method}", **method_params},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "trainer": {"epochs": 3, "device": "cpu"},
        "paths": {"output_dir": str(run_dir), "data_dir": "/data"},
    }


def make_run(root, name, *, method="baseline", seed=0, metrics=None, status="completed",
             error=None, dataset="digits_av", config=None, **method_params):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    data = {
        "status": status,
        "error": error,
        "run_dir": str(run_dir),
        "choices": {"dataset": dataset, "method": method, "backbone": "small", "optimizer": "sgd",
                    "hardware": "cpu", "experiment": None, "sweep": "demo", "hydra/launcher": "basic"},
        "overrides": [f"method={method}", f"seed={seed}"],
        "config": config if config is not None else _config(method, seed, run_dir, **method_params),
        "seed": seed,
        "modalities": ["audio", "image"],
        "versions": {"mmbalance": "0.1.0"},
        "wall_time_s": 1.0,
    }
    if metrics is not None:
        data["metrics"] = metrics
    (run_dir / "metrics.json").write_text(json.dumps(data))
    return run_dir


def m(acc, audio=0.5, image=0.5, phi_a=0.3, phi_i=0.3, imb=0.1, flops=1.2e12, f1=None):
    return {"test/acc": acc, "test/macro_f1": acc if f1 is None else f1,
            "test/acc/audio": audio, "test/acc/image": image,
            "test/shapley/audio": phi_a, "test/shapley/image": phi_i, "test/imbalance": imb,
            "val/acc": acc, "best_epoch": 2, "flops/train_total": flops, "flops/forward_per_sample": 3.4e6}


@pytest.fixture
def sweep(tmp_path):
    """A multirun-shaped tree: baseline over 3 seeds (+1 failed), unimodal per modality, an alpha sweep."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    make_run(root, "0", seed=0, metrics=m(0.90, audio=0.80, image=0.40, imb=0.30))
    make_run(root, "1", seed=1, metrics=m(0.92, audio=0.82, image=0.42, imb=0.20))
    make_run(root, "2", seed=2, metrics=m(0.97, audio=0.84, image=0.44, imb=0.40))
    make_run(root, "3", seed=3, status="failed", error="ValueError: boom")
    make_run(root, "4", seed=0, modality="audio", metrics={**m(0.80, imb=None), "test/acc/image": None}, method="unimodal")
    make_run(root, "5", seed=1, modality="audio", metrics={**m(0.84, imb=None), "test/acc/image": None}, method="unimodal")
    make_run(root, "6", seed=0, modality="image", metrics={**m(0.40, imb=None), "test/acc/audio": None}, method="unimodal")
    make_run(root, "7", method="ogm_ge", seed=0, alpha=0.3, metrics=m(0.93, imb=0.10))
    make_run(root, "8", method="ogm_ge", seed=1, alpha=0.3, metrics=m(0.95, imb=0.12))
    make_run(root, "9", method="ogm_ge", seed=0, alpha=10.0, metrics=m(0.91, imb=0.02))
    make_run(root, "10", method="ogm_ge", seed=0, alpha=0.8, metrics=m(0.94, imb=0.05))
    return tmp_path / "multirun"


def test_load_runs_one_row_per_run_with_choices_and_metrics(sweep):
    df = load_runs([sweep])
    assert len(df) == 11
    assert {"run_dir", "status", "error", "dataset", "method", "backbone", "seed", "variant",
            "test/acc", "test/acc/audio", "flops/train_total", "best_epoch"} <= set(df.columns)
    assert "hydra/launcher" not in df.columns
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].iloc[0] == "ValueError: boom"
    assert math.isnan(failed["test/acc"].iloc[0])


def test_variants_from_differing_config_only(sweep):
    df = load_runs([sweep])
    variants = df.groupby("method")["variant"].apply(lambda s: sorted(set(s))).to_dict()
    # seed, dataset.split_seed and paths.output_dir differ per run but are not variants
    assert variants["baseline"] == [""]
    assert variants["unimodal"] == ["modality=audio", "modality=image"]
    assert variants["ogm_ge"] == ["alpha=0.3", "alpha=0.8", "alpha=10"]


def test_ambiguous_short_name_uses_dotted_name(tmp_path):
    for i, lr in enumerate([0.1, 0.01]):
        cfg = {"seed": 0, "method": {"lr": 1.0}, "optimizer": {"lr": lr}}
        make_run(tmp_path, str(i), config=cfg, metrics=m(0.9))
    assert sorted(load_runs([tmp_path])["variant"]) == ["optimizer.lr=0.01", "optimizer.lr=0.1"]


def test_summary_groups_means_and_sample_std(sweep):
    s = summarize(load_runs([sweep]))
    keys = list(zip(s["method"], s["variant"]))
    assert keys == [("baseline", ""), ("unimodal", "modality=audio"), ("unimodal", "modality=image"),
                    ("ogm_ge", "alpha=0.3"), ("ogm_ge", "alpha=0.8"), ("ogm_ge", "alpha=10")]
    base = s.iloc[0]
    assert base["n"] == 3 and base["n_failed"] == 1 and base["seeds"] == "0 1 2"
    assert base["test/acc.mean"] == pytest.approx(0.93)
    # deviations -0.03, -0.01, 0.04 -> sum of squares 0.0026 / (3 - 1)
    assert base["test/acc.std"] == pytest.approx(math.sqrt(0.0013))
    assert base["test/imbalance.mean"] == pytest.approx(0.30)
    assert base["test/imbalance.std"] == pytest.approx(0.10)
    audio = s.iloc[1]
    assert audio["n"] == 2 and audio["n_failed"] == 0
    assert audio["test/acc.mean"] == pytest.approx(0.82)
    assert audio["test/acc.std"] == pytest.approx(math.sqrt(0.0008))
    assert math.isnan(audio["test/imbalance.mean"]) and audio["test/imbalance.n"] == 0
    image = s.iloc[2]
    assert image["n"] == 1 and math.isnan(image["test/acc.std"])


def test_group_with_only_failed_runs_still_listed(tmp_path):
    make_run(tmp_path, "0", method="ogm_ge", alpha=0.3, metrics=m(0.9))
    make_run(tmp_path, "1", method="ogm_ge", alpha=0.9, status="failed", error="RuntimeError: nan loss")
    s = summarize(load_runs([tmp_path]))
    row = s[s["variant"] == "alpha=0.9"].iloc[0]
    assert row["n"] == 0 and row["n_failed"] == 1 and math.isnan(row["test/acc.mean"])


def test_unreadable_metrics_json_becomes_a_row(sweep, caplog):
    bad = sweep / "2026-01-01" / "12-00-00" / "11"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        df = load_runs([sweep])
    assert "1 of 12" in caplog.text
    row = df[df["status"] == "unreadable"].iloc[0]
    assert row["run_dir"] == str(bad) and "JSONDecodeError" in row["error"]
    assert df.attrs["n_unreadable"] == 1
    s = summarize(df)
    assert s["n"].sum() == 10 and s["n_failed"].sum() == 1  # unreadable belongs to no group
    md = write_report([sweep])["markdown"]
    assert "1 unreadable" in md and str(bad) in md


def test_empty_or_missing_directory_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="nope"):
        load_runs([tmp_path / "nope"])


def test_same_run_given_twice_counts_once(sweep):
    run = sweep / "2026-01-01" / "12-00-00" / "0"
    assert len(load_runs([sweep, run])) == 11


def test_write_report_files_and_markdown_cells(sweep, tmp_path):
    out = tmp_path / "report"
    result = write_report([sweep], out_dir=out)
    for key, name in [("runs_csv", "runs.csv"), ("summary_csv", "summary.csv"),
                      ("summary_md", "summary.md"), ("plot", "acc_vs_imbalance.png")]:
        assert result[key] == out / name and result[key].stat().st_size > 0
    assert (out / "acc_vs_imbalance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert md == result["markdown"]
    assert "## digits_av" in md
    assert "| method | variant | n | test acc | macro-F1 | acc audio | acc image | φ audio | φ image " \
           "| imbalance | train FLOPs (TFLOP) |" in md
    # baseline: acc 93.0 ± 3.6, acc audio 82.0 ± 2.0, imbalance 30.0 ± 10.0, FLOPs 1.20 ± 0.00 TFLOP
    assert "| baseline | – | 3 (+1 failed) | 93.0 ± 3.6 | 93.0 ± 3.6 | 82.0 ± 2.0 | 42.0 ± 2.0 " \
           "| 30.0 ± 0.0 | 30.0 ± 0.0 | 30.0 ± 10.0 | 1.20 ± 0.00 |" in md
    assert "| unimodal | modality=image | 1 | 40.0 ± – |" in md
    assert "ValueError: boom" in md
    assert md.index("| baseline") < md.index("| unimodal") < md.index("| ogm_ge | alpha=0.3") \
        < md.index("| ogm_ge | alpha=0.8") < md.index("| ogm_ge | alpha=10")
    runs_csv = (out / "runs.csv").read_text()
    assert runs_csv.count("\n") == 12  # header + 11 runs


def test_write_report_defaults_to_first_dir(sweep):
    result = write_report([sweep])
    assert result["summary_md"] == sweep / "summary.md" and (sweep / "runs.csv").exists()


def test_no_plot_without_imbalance(tmp_path):
    make_run(tmp_path, "0", method="unimodal", modality="audio", metrics=m(0.8, imb=None))
    result = write_report([tmp_path])
    assert result["plot"] is None and not (tmp_path / "acc_vs_imbalance.png").exists()


def test_format_runs_table(sweep):
    text = format_runs_table(load_runs([sweep]))
    lines = text.splitlines()
    assert lines[0].split() == ["method", "variant", "seed", "acc%", "acc/audio%", "acc/image%",
                                "φ/audio%", "φ/image%", "imb%", "train", "TFLOP"]
    assert lines[2].split()[:4] == ["baseline", "–", "0", "90.0"]
    assert sum(1 for line in lines if line.startswith("unimodal")) == 3
    assert "1 run(s) not completed (1 failed):" in text and "ValueError: boom" in text


def test_main_prints_summary_and_returns_codes(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "o"), "--runs"]) == 0
    out = capsys.readouterr().out
    assert "## digits_av" in out and "acc/audio%" in out
    assert (tmp_path / "o" / "summary.csv").exists()
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_report_module_does_not_import_torch():
    code = "import sys, mmbalance.analysis.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture
def mixed_statuses(tmp_path):
    """One group holding a run of every status train.py writes, and one unreadable metrics.json."""
    make_run(tmp_path, "0", seed=0, metrics=m(0.90))
    make_run(tmp_path, "1", seed=1, metrics=m(0.92))
    make_run(tmp_path, "2", seed=2, status="failed", error="RuntimeError: nan loss")
    make_run(tmp_path, "3", seed=3, status="interrupted", error="KeyboardInterrupt: ")
    make_run(tmp_path, "4", seed=4, status="running")
    make_run(tmp_path, "5", seed=5, status="running")
    (tmp_path / "6").mkdir()
    (tmp_path / "6" / "metrics.json").write_text("{not json")
    return tmp_path


def test_summary_counts_each_status_apart(mixed_statuses):
    s = summarize(load_runs([mixed_statuses]))
    assert len(s) == 1
    row = s.iloc[0]
    assert (row["n"], row["n_failed"], row["n_interrupted"], row["n_running"]) == (2, 1, 1, 2)
    assert list(s.columns[:7]) == ["dataset", "method", "variant", "n", "n_failed", "n_interrupted", "n_running"]
    assert row["seeds"] == "0 1" and row["test/acc.mean"] == pytest.approx(0.91)


def test_markdown_and_csv_show_each_status_apart(mixed_statuses, tmp_path):
    out = tmp_path / "report"
    md = write_report([mixed_statuses], out_dir=out)["markdown"]
    assert "7 run(s): 2 completed, 1 failed, 1 interrupted, 2 running, 1 unreadable." in md
    assert "| baseline | – | 2 (+1 failed, +1 interrupted, +2 running) |" in md
    assert "no end recorded and no process on this machine holds the folder" in md and "KeyboardInterrupt" in md
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[3:7] == ["n", "n_failed", "n_interrupted", "n_running"]


def test_a_running_record_says_whether_a_process_holds_its_folder(tmp_path):
    from mmbalance.engine.run_folder import RunFolder

    live, dead = (make_run(tmp_path / "runs", name, status="running") for name in ("live", "dead"))
    with RunFolder(live).locked():  # as train.py holds it while it runs
        md = write_report([tmp_path / "runs"], out_dir=tmp_path / "report")["markdown"]
    assert f"`{live}` (baseline seed=0): still running (pid {os.getpid()} on " in md
    assert f"`{dead}` (baseline seed=0): no end recorded and no process on this machine holds the folder" in md


def test_markdown_header_omits_statuses_no_run_has(tmp_path):
    make_run(tmp_path, "0", metrics=m(0.9))
    make_run(tmp_path, "1", seed=1, status="interrupted", error="KeyboardInterrupt: ")
    md = write_report([tmp_path])["markdown"]
    assert "2 run(s): 1 completed, 1 interrupted." in md
    assert "| baseline | – | 1 (+1 interrupted) |" in md


def test_runs_listing_groups_the_not_completed_runs_by_status(mixed_statuses):
    text = format_runs_table(load_runs([mixed_statuses]))
    assert "5 run(s) not completed (1 failed, 1 interrupted, 2 running, 1 unreadable):" in text
    listed = [line.split(":")[0].strip() for line in text.split("not completed")[1].splitlines()[1:]]
    assert listed == ["failed", "interrupted", "running", "running", "unreadable"]


# ------------------------------------------------------------------------------ what separates and counts runs


def _features_config(run_dir, path, seed=0, **dataset):
    return {"seed": seed, "dataset": {"_target_": "mmbalance.data.features.build_features", "path": path,
                                      "split_seed": 0, **dataset},
            "method": {"_target_": "mmbalance.methods.baseline"}, "paths": {"output_dir": str(run_dir)}}


def test_runs_on_different_data_files_are_different_variants(tmp_path):
    for name, acc in [("good", 0.9), ("const", 0.3), ("singleton", 0.57)]:
        make_run(tmp_path, name, dataset="features", metrics=m(acc),
                 config=_features_config(tmp_path / name, f"/tmp/x/{name}.npz"))
    s = summarize(load_runs([tmp_path]))
    assert list(s["variant"]) == ["path=/tmp/x/const.npz", "path=/tmp/x/good.npz", "path=/tmp/x/singleton.npz"]
    assert list(s["n"]) == [1, 1, 1]
    # where a run writes (its folder, a cache) is bookkeeping: the same data elsewhere is the same experiment
    for seed in (0, 1):
        run = tmp_path / "same" / str(seed)
        make_run(tmp_path / "same", str(seed), seed=seed, dataset="features", metrics=m(0.9),
                 config=_features_config(run, "/data/f.npz", seed, cache_dir=f"/cache/{seed}"))
    s = summarize(load_runs([tmp_path / "same"]))
    assert list(zip(s["variant"], s["n"])) == [("", 2)]


def test_nearby_hyper_parameter_values_stay_apart(tmp_path):
    for i, alpha in enumerate([0.1000001, 0.1000002, 0.5, 0.3]):
        make_run(tmp_path, str(i), method="ogm_ge", alpha=alpha, metrics=m(0.9))
    s = summarize(load_runs([tmp_path]))
    assert list(zip(s["variant"], s["n"])) == [("alpha=0.1000001", 1), ("alpha=0.1000002", 1), ("alpha=0.3", 1),
                                               ("alpha=0.5", 1)]


def test_repeated_runs_count_once_and_are_listed(tmp_path, caplog):
    import shutil

    first = make_run(tmp_path / "a", "ref6", metrics=m(0.944))
    shutil.copytree(first, tmp_path / "a" / "k6")
    shutil.copytree(first, tmp_path / "a" / "c1")
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path / "a"], out_dir=tmp_path / "out")
    assert "2 completed run(s) repeat" in caplog.text
    row = result["summary"].iloc[0]
    assert (row["n"], row["n_repeated"], row["seeds"]) == (1, 2, "0")
    assert math.isnan(row["test/acc.std"])  # one sample: no spread of 0.0 from copies
    runs = result["runs"].set_index("run_dir")
    c1 = str(tmp_path / "a" / "c1")  # the first by path counts
    assert runs["repeat_of"].isna().sum() == 1 and pd.isna(runs.at[c1, "repeat_of"])
    assert runs.at[str(first), "repeat_of"] == c1
    md = result["markdown"]
    assert "3 run(s): 3 completed (2 of them repeats, not counted)." in md and "**Warning:**" in md
    assert "| baseline | – | 1 (+2 repeated) | 94.4 ± – |" in md
    assert f"## Repeated runs (not counted)\n\n- `{tmp_path / 'a' / 'k6'}` (baseline seed=0): repeats `{c1}`" in md
    text = format_runs_table(result["runs"])
    assert sum(line.startswith("baseline") for line in text.splitlines()) == 1 and "repeats " + c1 in text

    # the same 2-seed sweep run twice counts 2 seeds; another split seed is a sample of its own
    for sweep in ("sw1", "sw2"):
        for seed in (0, 1):
            make_run(tmp_path / "b" / sweep, str(seed), seed=seed, metrics=m(0.9 + seed / 100))
    cfg = _config("baseline", 0, tmp_path / "b" / "split")
    cfg["dataset"]["split_seed"] = 7
    make_run(tmp_path / "b", "split", config=cfg, metrics=m(0.95))
    row = summarize(load_runs([tmp_path / "b" / "sw1", tmp_path / "b" / "sw2", tmp_path / "b" / "split"])).iloc[0]
    assert (row["n"], row["n_repeated"], row["seeds"]) == (3, 2, "0 1")


def test_unknown_statuses_and_completed_runs_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.json").write_text("{}")
    make_run(tmp_path, "no_metrics", seed=1)  # "completed" without a metrics field
    run = make_run(tmp_path, "null_metrics", seed=2)
    data = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**data, "metrics": None}))
    make_run(tmp_path, "ok", metrics=m(0.9))
    df = load_runs([tmp_path])
    assert sorted(df["status"]) == ["completed", "unknown", "unknown", "unknown"]
    s = summarize(df)
    assert len(s) == 1 and (s["n"].iloc[0], s["n_unknown"].iloc[0], s["n_failed"].iloc[0]) == (1, 2, 0)
    md = write_report([tmp_path])["markdown"]
    assert "4 run(s): 1 completed, 3 unknown." in md and "+1 failed" not in md
    assert "| baseline | – | 1 (+2 unknown) |" in md and "## ?" not in md  # `{}` names no group
    assert f"- unknown: `{run}` (baseline seed=2): recorded as completed, but without metrics" in md
    assert f"- unknown: `{tmp_path / 'empty'}` (?): no status recorded" in md


def test_out_naming_an_existing_file_is_one_clear_error(sweep, tmp_path, capsys):
    file = tmp_path / "report.txt"
    file.write_text("keep me")
    assert main([str(sweep), "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(file) in err and "not a folder" in err and "Traceback" not in err
    assert file.read_text() == "keep me"


def test_flops_not_measured_show_a_dash_and_are_left_out_of_means(tmp_path):
    make_run(tmp_path, "b0", metrics=m(0.9, flops=None))
    make_run(tmp_path, "b1", seed=1, metrics=m(0.9, flops=None))
    for seed, flops in enumerate([2e12, None, 0.0]):  # seed 2: eval.flops=false, recorded as 0.0 by today's trainer
        cfg = _config("ogm_ge", seed, tmp_path / f"o{seed}")
        cfg["eval"] = {"flops": seed != 2}
        make_run(tmp_path, f"o{seed}", method="ogm_ge", seed=seed, config=cfg, metrics=m(0.9, flops=flops))
    result = write_report([tmp_path])
    s = result["summary"].set_index("method")
    assert math.isnan(s.at["baseline", "flops/train_total.mean"])
    assert list(s["variant"]) == ["", ""]  # measuring FLOPs or not is no variant
    assert (s.at["ogm_ge", "n"], s.at["ogm_ge", "flops/train_total.n"]) == (3, 1)
    assert s.at["ogm_ge", "flops/train_total.mean"] == 2e12  # not (2e12 + 0) / 2

    def flops_cell(md, start):
        return md.split(start)[1].split("\n")[0].rsplit("|", 2)[1].strip()

    md = result["markdown"]
    assert flops_cell(md, "| baseline | – | 2 |") == "–"
    assert flops_cell(md, "| ogm_ge | – | 3 |") == "2.00 ± – (n=1)"
    lines = format_runs_table(result["runs"]).splitlines()
    flops_column = [line.split()[-1] for line in lines if line.startswith(("baseline", "ogm_ge"))]
    assert flops_column == ["–", "–", "2.00", "–", "–"]
    bench = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "0.00×" not in bench and flops_cell(bench, "| baseline | baseline |") == "–"


# -------------------------------------------------------------- what is a variant: the run identity, nothing else


def _hardware_run(root, name, *, seed=0, hardware="cpu", world_size=None, acc=0.9, logger="csv", **settings):
    """A run whose record carries the hardware and logger groups as train.py writes them (`settings`: dotted
    config keys to set, e.g. hardware__precision="bf16")."""
    cfg = _config("baseline", seed, root / name)
    cfg["hardware"] = {"device": "cpu", "precision": "fp32", "num_workers": 0, "pin_memory": False,
                       "threads": "auto", "wait_policy": "auto"}
    if hardware == "ddp":
        cfg["hardware"].update(pin_memory=True, distributed=True, backend="gloo")
    cfg["logger"] = {"tensorboard": {"dir": "tensorboard"}} if logger != "csv" else {}
    for key, value in settings.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    run = make_run(root, name, seed=seed, config=cfg, metrics=m(acc))
    data = json.loads((run / "metrics.json").read_text())
    data["choices"].update(hardware=hardware, logger=logger)
    if world_size is not None:
        data["world_size"] = world_size
    (run / "metrics.json").write_text(json.dumps(data))
    return run


def test_runs_that_compute_differently_are_variants_never_repeats(tmp_path, caplog):
    # the probe's case: the same config and seed on one CPU process and under DDP on 2 ranks (another global
    # batch, another sampler): two results, not one run and its repeat
    _hardware_run(tmp_path / "a", "cpu", acc=0.8496)
    _hardware_run(tmp_path / "a", "ddp", hardware="ddp", world_size=2, acc=0.7326)
    with caplog.at_level("WARNING"):
        s = summarize(load_runs([tmp_path / "a"]))
    assert "repeat" not in caplog.text
    assert list(zip(s["variant"], s["n"], s["n_repeated"])) == [
        ("hardware=cpu, world_size=1", 1, 0), ("hardware=ddp, world_size=2", 1, 0)]
    assert list(s["test/acc.mean"]) == [pytest.approx(0.8496), pytest.approx(0.7326)]

    # within one hardware choice: the precision, the device, the world size each name the variant
    _hardware_run(tmp_path / "b", "fp32")
    _hardware_run(tmp_path / "b", "bf16", hardware__precision="bf16")
    _hardware_run(tmp_path / "b", "cuda", hardware__device="cuda")
    s = summarize(load_runs([tmp_path / "b"]))
    assert sorted(s["variant"]) == ["hardware.device=cpu, precision=bf16", "hardware.device=cpu, precision=fp32",
                                    "hardware.device=cuda, precision=fp32"]  # _config has a trainer.device too
    for world in (2, 4):
        _hardware_run(tmp_path / "c", f"w{world}", hardware="ddp", world_size=world)
    s = summarize(load_runs([tmp_path / "c"]))
    assert list(zip(s["variant"], s["n"])) == [("world_size=2", 1), ("world_size=4", 1)]


def test_settings_that_change_no_result_are_no_variants(tmp_path, caplog):
    # what the run identity leaves out (loggers, workers, pinned memory, thread counts, progress bar, resume
    # policy, a hardware choice overridden to the same computation) neither splits runs nor hides a repeat
    _hardware_run(tmp_path, "csv", seed=0, logger="csv")
    _hardware_run(tmp_path, "tb", seed=1, logger="tensorboard", hardware__num_workers=4, hardware__pin_memory=True)
    _hardware_run(tmp_path, "auto", seed=2, logger="auto", hardware__threads=2, hardware__wait_policy="active",
                  trainer__progress_bar=False, resume="never")
    run = _hardware_run(tmp_path, "list", seed=3, hardware="gpu")  # hardware=gpu hardware.device=cpu ... precision=fp32
    data = json.loads((run / "metrics.json").read_text())
    data["choices"]["logger"] = ["tensorboard", "mlflow"]  # logger=[tensorboard,mlflow]
    (run / "metrics.json").write_text(json.dumps(data))
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    s = result["summary"]
    assert list(zip(s["variant"], s["n"], s["seeds"])) == [("", 4, "0 1 2 3")]
    assert "logger" not in result["markdown"] and result["balance_curves"] == {}

    _hardware_run(tmp_path / "again", "x", seed=0, logger="tensorboard", hardware__num_workers=8)
    with caplog.at_level("WARNING"):
        s = summarize(load_runs([tmp_path, tmp_path / "again"]))
    assert list(zip(s["n"], s["n_repeated"])) == [(4, 1)] and "1 completed run(s) repeat" in caplog.text


def test_a_setting_that_differs_under_one_choice_still_names_the_variant(tmp_path):
    # backbone=resnet18 twice with different widths beside backbone=small: three variants, not two
    for name, choice, width in [("s", "small", 8), ("r1", "resnet18", 64), ("r2", "resnet18", 32)]:
        cfg = _config("baseline", 0, tmp_path / name)
        cfg["backbone"] = {"name": choice, "width": width}
        run = make_run(tmp_path, name, config=cfg, metrics=m(0.9))
        data = json.loads((run / "metrics.json").read_text())
        data["choices"]["backbone"] = choice
        (run / "metrics.json").write_text(json.dumps(data))
    s = summarize(load_runs([tmp_path]))
    assert sorted(s["variant"]) == ["backbone=resnet18, width=32", "backbone=resnet18, width=64",
                                    "backbone=small, width=8"]
    assert list(s["n"]) == [1, 1, 1]


def test_hybrids_composed_on_the_command_line_are_methods_named_by_their_parts(tmp_path):
    """Two hybrids are two methods (rows of their own, never a 'parts' knob of one balance curve); the runs of one
    hybrid still vary by their parts' settings."""
    for seed in (0, 1):
        make_run(tmp_path, f"a{seed}", method="compose", seed=seed, metrics=m(0.8 + seed / 100), parts=["ogm_ge", "mbsd"])
        make_run(tmp_path, f"b{seed}", method="compose", seed=seed, metrics=m(0.7 + seed / 100), parts=["mlgm"])
    make_run(tmp_path, "c0", method="compose", metrics=m(0.6), parts=["ogm_ge", "mbsd"], ogm_ge={"alpha": 0.3})
    df = load_runs([tmp_path]).sort_values("run_dir")
    assert list(df["method"]) == ["compose[ogm_ge+mbsd]"] * 2 + ["compose[mlgm]"] * 2 + ["compose[ogm_ge+mbsd]"]
    assert list(df["variant"]) == ["alpha=unset", "alpha=unset", "", "", "alpha=0.3"]


# ------------------------------------------------- settings outside the method, record-only settings, other data


def _epochs_run(root, name, *, method="baseline", seed=0, epochs=3, acc=0.9, flops=1.2e12, **method_params):
    cfg = _config(method, seed, root / name, **method_params)
    cfg["trainer"]["epochs"] = epochs
    return make_run(root, name, method=method, seed=seed, config=cfg, metrics=m(acc, flops=flops))


def test_settings_outside_the_method_label_every_method_and_are_warned_about(tmp_path, caplog):
    # an ogm_ge sweep with trainer.epochs=2 beside a baseline sweep with trainer.epochs=3: the baseline is no
    # unlabelled reference for the ogm_ge rows
    for seed in (0, 1):
        _epochs_run(tmp_path, f"b{seed}", seed=seed, epochs=3)
        for alpha in (0.1, 0.5):
            _epochs_run(tmp_path, f"o{alpha}_{seed}", method="ogm_ge", seed=seed, epochs=2, alpha=alpha)
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path], out_dir=tmp_path / "out")
    s = result["summary"]
    assert list(zip(s["method"], s["variant"], s["context"])) == [
        ("baseline", "epochs=3", "epochs=3"), ("ogm_ge", "alpha=0.1, epochs=2", "epochs=2"),
        ("ogm_ge", "alpha=0.5, epochs=2", "epochs=2")]
    assert "runs on digits_av differ in trainer.epochs" in caplog.text
    assert "**Warning:** the runs on digits_av differ in trainer.epochs" in result["markdown"]
    # one method alone varying a setting outside its own is a study, not a mismatch: labelled, not warned about
    caplog.clear()
    for epochs in (2, 3):
        _epochs_run(tmp_path / "one", f"o{epochs}", method="ogm_ge", epochs=epochs)
    with caplog.at_level("WARNING"):
        df = load_runs([tmp_path / "one"])
    assert sorted(df["variant"]) == ["epochs=2", "epochs=3"] and "differ in" not in caplog.text
    assert df.attrs["setting_differences"] == {}


def test_settings_that_only_change_what_is_recorded_split_no_rows(tmp_path):
    # eval.shapley_every (how often history.csv gets validation Shapley values) and eval.flops change no result
    for seed, (every, flops) in enumerate([(1, True), (0, True), (5, False)]):
        cfg = _config("ogm_ge", seed, tmp_path / str(seed), alpha=0.8)
        cfg["eval"] = {"shapley_every": every, "flops": flops, "select_on": "val"}
        make_run(tmp_path, str(seed), method="ogm_ge", seed=seed, config=cfg, metrics=m(0.9 + seed / 100))
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    s = result["summary"]
    assert list(zip(s["variant"], s["n"], s["seeds"])) == [("", 3, "0 1 2")]
    assert result["balance_curves"] == {} and "shapley_every" not in result["markdown"]
    # a setting of the evaluation that changes the result still separates runs
    cfg = _config("ogm_ge", 0, tmp_path / "t", alpha=0.8)
    cfg["eval"] = {"shapley_every": 1, "flops": True, "select_on": "test"}
    make_run(tmp_path, "t", method="ogm_ge", config=cfg, metrics=m(0.95))
    assert sorted(load_runs([tmp_path])["variant"]) == ["select_on=test"] + ["select_on=val"] * 3


def _data_run(root, name, *, seed=0, labels="aaaa", split_seed=0, acc=0.9, method="baseline", content=None):
    cfg = _features_config(root / name, "/data/f.npz", seed)
    cfg["dataset"]["split_seed"] = split_seed
    cfg["method"]["_target_"] = f"mmbalance.methods.{method}"
    run = make_run(root, name, seed=seed, method=method, dataset="features", config=cfg, metrics=m(acc))
    data = json.loads((run / "metrics.json").read_text())
    data["data_identity"] = {"num_classes": 10, "modalities": {"a": ["vector", [8]], "b": ["vector", [8]]},
                             "train.size": 100, "train.labels": labels, "val.size": 10, "test.size": 20,
                             "test.labels": "tttt", **({"content": content} if content else {})}
    (run / "metrics.json").write_text(json.dumps(data))
    return run


def test_features_of_the_same_labels_but_other_values_are_other_data(tmp_path):
    """A features file overwritten with other features and the same labels: the content digest tells them apart;
    a record from before the digest existed is compared on the rest (it is not other data for lacking it)."""
    _data_run(tmp_path / "a", "s0", seed=0, content="c0")
    _data_run(tmp_path / "a", "s1", seed=1, content="c1")
    assert sorted(load_runs([tmp_path / "a"])["variant"]) == ["data=A", "data=B"]
    _data_run(tmp_path / "b", "s0", seed=0)  # recorded before the content digest
    _data_run(tmp_path / "b", "s1", seed=1, content="c1")
    assert list(zip(*summarize(load_runs([tmp_path / "b"]))[["variant", "n"]].T.values)) == [("", 2)]
    # beside such a record, two that hold the digest and differ are still other data (never merged through it)
    _data_run(tmp_path / "c", "s0", seed=0)
    _data_run(tmp_path / "c", "s1", seed=1, content="c1")
    _data_run(tmp_path / "c", "s2", seed=2, content="c2")
    assert len(set(load_runs([tmp_path / "c"])["variant"])) == 3


def test_runs_on_different_data_are_never_averaged_together(tmp_path, caplog):
    # the features file overwritten at the same path between seed 0 and seed 1: the same settings, other data
    s0 = _data_run(tmp_path / "a", "s0", seed=0, labels="aaaa", acc=0.9)
    s1 = _data_run(tmp_path / "a", "s1", seed=1, labels="bbbb", acc=0.3)
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path / "a"], out_dir=tmp_path / "out")
    s = result["summary"]
    assert list(zip(s["variant"], s["n"])) == [("data=A", 1), ("data=B", 1)]
    assert "different data" in caplog.text and str(s0) in caplog.text and str(s1) in caplog.text
    assert "train.labels" in caplog.text
    md = result["markdown"]
    assert "**Warning:** runs on features with the same dataset settings were trained on different data" in md
    assert str(s0) in md and str(s1) in md

    # the same data (or data that differ because the dataset settings do: another split seed) average as before
    _data_run(tmp_path / "b", "s0", seed=0)
    _data_run(tmp_path / "b", "s1", seed=1)
    _data_run(tmp_path / "b", "split", seed=2, split_seed=7, labels="cccc")
    with caplog.at_level("WARNING"):
        caplog.clear()
        df = load_runs([tmp_path / "b"])
    assert list(zip(*summarize(df)[["variant", "n"]].T.values)) == [("", 3)] and "different data" not in caplog.text

    # a copy of a run on other data is no repeat of it
    _data_run(tmp_path / "c", "x", labels="aaaa")
    _data_run(tmp_path / "c", "y", labels="bbbb")
    df = load_runs([tmp_path / "c"])
    assert df["repeat_of"].isna().all() and sorted(df["variant"]) == ["data=A", "data=B"]


# ------------------------------------------------------------------------------ resume=force over another run

FORCED_OVER = ["method._target_: 'mmbalance.methods.baseline' -> 'mmbalance.methods.ogm_ge'",
               "method.alpha: '<absent>' -> 0.3"]


def _forced(run, differences, previous=("method=baseline", "seed=0")):
    data = json.loads((run / "metrics.json").read_text())
    data["forced_resume"] = {"previous": list(previous), "differences": differences}
    (run / "metrics.json").write_text(json.dumps(data))
    return run


def test_a_run_forced_over_another_run_is_never_counted_nor_preferred_over_the_genuine_one(tmp_path, caplog):
    # a baseline's checkpoint re-tested under method=ogm_ge (resume=force): ogm_ge's identity, the baseline's
    # accuracy; first by path, it must not make the genuine ogm_ge run of that seed its "repeat"
    make_run(tmp_path, "base", seed=0, metrics=m(0.70))
    forced = _forced(make_run(tmp_path, "a_forced", method="ogm_ge", seed=0, alpha=0.3, metrics=m(0.70)), FORCED_OVER)
    genuine = make_run(tmp_path, "b_genuine", method="ogm_ge", seed=0, alpha=0.3, metrics=m(0.93))
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path], out_dir=tmp_path / "out")
    df = result["runs"].set_index("run_dir")
    reason = "resume=force over another run: " + "; ".join(FORCED_OVER)
    assert df.loc[str(forced), "status"] == "forced" and df.loc[str(forced), "error"] == reason
    assert df.loc[str(genuine), "status"] == "completed" and pd.isna(df.loc[str(genuine), "repeat_of"])
    row = result["summary"].set_index("method").loc["ogm_ge"]
    assert (row["n"], row["n_forced"], row["n_repeated"]) == (1, 1, 0)
    assert row["test/acc.mean"] == pytest.approx(0.93)
    md = result["markdown"]
    assert "3 run(s): 2 completed, 1 forced." in md and "| ogm_ge | – | 1 (+1 forced) |" in md
    assert f"- forced: `{forced}` (ogm_ge seed=0): {reason}" in md
    assert "made by resume=force" in caplog.text and str(forced) in caplog.text
    text = format_runs_table(result["runs"])
    assert f"forced: {forced} (ogm_ge seed=0): {reason}" in text and "repeat" not in text
    bench = result["benchmark"]["csv"].read_text()
    assert "93.0" in result["benchmark"]["md"].read_text() and bench.count("ogm_ge") == 1


def test_a_forced_resume_that_only_trains_the_run_on_counts_as_that_run(tmp_path):
    # docs/reliability.md: resume=force with more epochs extends a finished run to the uninterrupted result, and
    # the code's version is no setting; fewer epochs or any other difference is another run's continuation
    _forced(make_run(tmp_path, "0", method="ogm_ge", seed=0, alpha=0.3, metrics=m(0.90)),
            ["mmbalance.version: '0.0.9' -> '0.1.0'", "trainer.epochs: 1 -> 3"])
    _forced(make_run(tmp_path, "1", method="ogm_ge", seed=1, alpha=0.3, metrics=m(0.92)), ["trainer.epochs: 5 -> 3"])
    _forced(make_run(tmp_path, "2", method="ogm_ge", seed=2, alpha=0.3, metrics=m(0.94)), [])
    df = load_runs([tmp_path])
    assert list(df.sort_values("run_dir")["status"]) == ["completed", "forced", "forced"]
    errors = list(df.sort_values("run_dir")["error"])
    assert errors[2] == "resume=force over another run: its differences are not recorded"


# ------------------------------------------------------------------------- reports written into one folder

HISTORY = ("epoch,val/shapley/audio,val/shapley/image,val/imbalance\n"
           "0,0.30,0.10,0.20\n1,0.40,0.20,0.20\n2,0.40,0.30,0.10\n")


def _study(root):
    """Runs that give a benchmark table and a dynamics plot; returns the folder."""
    for seed in (0, 1):
        make_run(root, f"b{seed}", seed=seed, metrics=m(0.90))
        run = make_run(root, f"o{seed}", method="ogm_ge", seed=seed, alpha=0.3, metrics=m(0.93))
        (run / "history.csv").write_text(HISTORY)
    return root


def test_a_report_removes_the_files_of_the_previous_report_it_does_not_write_again(tmp_path, caplog):
    out = tmp_path / "out"
    first = write_report([_study(tmp_path / "a")], out_dir=out)
    assert first["benchmark"] and first["dynamics"] and first["manifest"] == out / "report_manifest.json"
    (out / "notes.txt").write_text("mine")  # not a report's file: never touched
    (out / "benchmark.tex").write_text("edited by hand")  # no longer the file that report wrote: left
    outside = tmp_path / "outside.txt"  # a manifest never reaches outside its folder
    outside.write_text("x")
    manifest = json.loads((out / "report_manifest.json").read_text())
    manifest["files"]["../outside.txt"] = hashlib.sha256(b"x").hexdigest()
    (out / "report_manifest.json").write_text(json.dumps(manifest))
    make_run(tmp_path / "b", "0", metrics=m(0.9))
    with caplog.at_level("WARNING"):
        second = write_report([tmp_path / "b"], out_dir=out)
    assert not second["benchmark"] and not second["dynamics"]
    gone = [f.name for f in second["removed"]]
    assert sorted(gone) == ["benchmark.csv", "benchmark.md", "dynamics_digits_av_ogm_ge.png"]
    assert sorted(f.name for f in out.iterdir()) == [
        "acc_vs_imbalance.png", "benchmark.tex", "notes.txt", "report_manifest.json", "runs.csv", "summary.csv",
        "summary.md"]
    assert outside.read_text() == "x"
    assert "benchmark.tex: written by an earlier report, not by this one, and changed since" in caplog.text
    assert "## Files of an earlier report" in second["markdown"]
    assert sorted(json.loads((out / "report_manifest.json").read_text())["files"]) == [
        "acc_vs_imbalance.png", "runs.csv", "summary.csv", "summary.md"]


def test_without_a_manifest_files_named_like_a_report_are_left_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    write_report([_study(tmp_path / "a")], out_dir=out)
    (out / "report_manifest.json").unlink()  # as a report before manifests left its folder
    make_run(tmp_path / "b", "0", metrics=m(0.9))
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path / "b"], out_dir=out)
    assert result["removed"] == [] and (out / "benchmark.md").exists()
    assert (out / "dynamics_digits_av_ogm_ge.png").exists()
    assert "4 file(s) of an earlier report" in caplog.text and "dynamics_digits_av_ogm_ge.png" in caplog.text
    assert ("- `benchmark.md`: from an earlier report (not written by this one; no report_manifest.json records "
            "it, so it is left as it is)") in result["markdown"]
    assert (out / "report_manifest.json").exists()


def test_a_failed_run_with_another_setting_labels_no_completed_row(tmp_path):
    """optimizer.lr=-1 failed before training: the completed runs are still the ones compared, unlabelled."""
    for seed, method in ((0, "baseline"), (0, "ogm_ge")):
        make_run(tmp_path, f"{method}{seed}", method=method, seed=seed, metrics=m(0.9))
    bad = make_run(tmp_path, "bad", method="baseline", seed=1, status="failed", error="ConfigError: optimizer.lr")
    record = json.loads((bad / "metrics.json").read_text())
    record["config"]["optimizer"]["lr"] = -1
    (bad / "metrics.json").write_text(json.dumps(record))
    s = summarize(load_runs([tmp_path]))
    assert set(s["variant"]) == {"–"} or set(s["variant"]) == {""}
    assert s.set_index("method").loc["baseline", "n_failed"] == 1


def test_a_whole_number_with_or_without_a_point_is_one_setting_counted_once(tmp_path):
    # method.alpha=1 and method.alpha=1.0 of the same seed: one run repeated, not two samples
    make_run(tmp_path, "i", method="ogm_ge", alpha=1, metrics=m(0.9))
    make_run(tmp_path, "f", method="ogm_ge", alpha=1.0, metrics=m(0.9))
    make_run(tmp_path, "s1", method="ogm_ge", seed=1, alpha=1.0, metrics=m(0.8))
    row = summarize(load_runs([tmp_path])).iloc[0]
    assert (row["variant"], row["n"], row["n_repeated"], row["seeds"]) == ("", 2, 1, "0 1")


def test_a_metrics_json_given_alone_reports_into_its_run_folder_not_the_current_one(sweep, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.md").write_text("my notes")
    monkeypatch.chdir(elsewhere)
    run = sweep / "2026-01-01" / "12-00-00" / "0"
    result = write_report([run / "metrics.json"])
    assert result["summary_md"] == run / "summary.md"
    assert (elsewhere / "summary.md").read_text() == "my notes" and not (elsewhere / "runs.csv").exists()


def test_classification_and_regression_runs_of_one_dataset_get_a_table_each(tmp_path):
    # φ and imbalance are % for one and MAE points for the other: never one column
    make_run(tmp_path, "c", metrics=m(0.9, imb=0.25))
    cfg = _config("baseline", 0, tmp_path / "r")
    cfg["dataset"]["task"] = "regression"
    make_run(tmp_path, "r", config=cfg, metrics={**m(0.7, imb=0.4), "test/mae": 0.6})
    md = write_report([tmp_path], out_dir=tmp_path / "out")["markdown"]
    assert "## digits_av\n" in md and "## digits_av (regression)\n" in md
    classification = md.split("## digits_av\n")[1].split("##")[0]
    regression = md.split("## digits_av (regression)\n")[1].split("##")[0]
    assert "25.0 ± –" in classification and "0.4" not in classification.split("| imbalance |")[1]
    assert "0.400 ± –" in regression and "MAE" in regression


def test_a_report_of_one_summary_row_heads_its_table_with_the_dataset_name(tmp_path):
    """One run, one row: the heading was `## ('digits_av',)` (a one-element key read as a tuple)."""
    make_run(tmp_path / "runs", "0", metrics=m(0.9))
    out = tmp_path / "report"
    write_report([tmp_path / "runs"], out)
    headings = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("## ")]
    assert headings == ["## digits_av"]
