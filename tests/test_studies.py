"""The report's studies over hand-written run folders: benchmark table, balance curves, training dynamics;
and the sweep files that produce them."""

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from mmbalance.analysis.report import load_runs, summarize, write_report
from mmbalance.analysis.studies import (
    BalancePoints, balance_points, benchmark_table, find_balance_curves, method_families,
)
from mmbalance.config import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
PNG = b"\x89PNG\r\n\x1a\n"
FAMILY = {"baseline": "reference", "unimodal": "reference", "valuation": "data", "opm": "feed-forward",
          "mla": "feed-forward", "ogm_ge": "optimization", "pmr": "optimization"}


def make_run(root, name, *, method, seed, acc, f1=None, imb=0.2, flops=1e12, dataset="dsA", history=None,
             trainer=None, status="completed", epochs=None, mae=None, task=None, **method_params):
    """A run of `method`; with `mae` a regression run (dataset.task=regression: it records test/mae, and its φ
    and imbalance are MAE points); `task` sets dataset.task of a classification run."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    data = {
        "status": status,
        "choices": {"dataset": dataset, "method": method, "backbone": "small"},
        "config": {"seed": seed, "dataset": {"name": dataset}, "trainer": trainer or {},
                   "method": {"_target_": f"mmbalance.methods.{method}", **method_params}},
        "seed": seed,
        "method_family": FAMILY[method],
        "metrics": {"test/acc": acc, "test/macro_f1": acc if f1 is None else f1, "test/imbalance": imb,
                    "test/shapley/audio": 0.5, "test/shapley/image": 0.5 - (imb or 0), "flops/train_total": flops},
    }
    if epochs is not None:
        data["metrics"]["epochs"] = epochs
    if mae is not None:
        task = "regression"
        data["metrics"]["test/mae"] = mae
    if task is not None:
        data["config"]["dataset"]["task"] = data["task"] = task
    (run_dir / "metrics.json").write_text(json.dumps(data))
    if history is not None:
        (run_dir / "history.csv").write_text(history)
    return run_dir


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "runs"
    runs = [  # method, params, dataset, [(acc, f1)] per seed, imbalance, FLOPs
        ("baseline", {}, "dsA", [(0.80, 0.70), (0.82, 0.72)], 0.40, 1e12),
        ("valuation", {}, "dsA", [(0.85, 0.80), (0.87, 0.82)], 0.30, 3e12),
        ("opm", {}, "dsA", [(0.90, 0.85), (0.92, 0.87)], 0.20, 1e12),
        ("mla", {}, "dsA", [(0.84, 0.95), (0.86, 0.95)], 0.10, 2e12),
        ("ogm_ge", {"alpha": 0.3}, "dsA", [(0.88, 0.80), (0.90, 0.80)], 0.25, 1.1e12),
        ("ogm_ge", {"alpha": 0.8}, "dsA", [(0.86, 0.80), (0.86, 0.80)], 0.05, 1.1e12),
        ("unimodal", {"modality": "audio"}, "dsA", [(0.95, 0.95)], None, 0.5e12),
        ("baseline", {}, "dsB", [(0.60, 0.60), (0.62, 0.62)], 0.30, 2e12),
        ("opm", {}, "dsB", [(0.70, 0.70), (0.74, 0.74)], 0.10, 3e12),
    ]
    for i, (method, params, ds, seeds, imb, flops) in enumerate(runs):
        for seed, (acc, f1) in enumerate(seeds):
            make_run(root, f"{i}_{seed}", method=method, seed=seed, acc=acc, f1=f1, imb=imb, flops=flops,
                     dataset=ds, **params)
    return root


def _table(root):
    df = load_runs([root])
    return benchmark_table(summarize(df), method_families(df))


def test_families_come_from_metrics_json(bench):
    assert method_families(load_runs([bench])) == {k: v for k, v in FAMILY.items() if k != "pmr"}


def test_benchmark_rows_grouped_by_family_with_averages(bench):
    t = _table(bench)
    assert t.attrs["datasets"] == ["dsA", "dsB"]
    rows = list(zip(t["family"], t["method"], t["variant"]))
    assert rows == [
        ("baseline", "baseline", ""),
        ("data", "valuation", ""), ("data", "average", ""),
        ("feed-forward", "mla", ""), ("feed-forward", "opm", ""), ("feed-forward", "average", ""),
        ("optimization", "ogm_ge", "alpha=0.3"), ("optimization", "ogm_ge", "alpha=0.8"),
        ("optimization", "average", ""),
    ]  # unimodal is no row
    row = {(f, m, v): r for (f, m, v), (_, r) in zip(rows, t.iterrows())}
    ff = row["feed-forward", "average", ""]
    assert ff["kind"] == "average"
    assert ff["dsA/acc.mean"] == pytest.approx((0.85 + 0.91) / 2)        # mla 0.85, opm 0.91
    assert ff["dsA/macro_f1.mean"] == pytest.approx((0.95 + 0.86) / 2)
    assert ff["dsA/imbalance.mean"] == pytest.approx((0.10 + 0.20) / 2)
    assert ff["dsA/flops_rel"] == pytest.approx((2.0 + 1.0) / 2)
    assert math.isnan(ff["dsA/acc.std"])
    assert ff["dsB/acc.mean"] == pytest.approx(0.72)                      # only opm has dsB
    opt = row["optimization", "average", ""]
    assert opt["dsA/acc.mean"] == pytest.approx((0.89 + 0.86) / 2)
    assert math.isnan(opt["dsB/acc.mean"])
    opm = row["feed-forward", "opm", ""]
    assert opm["dsA/acc.std"] == pytest.approx(math.sqrt(0.0002)) and opm["dsA/n"] == 2
    assert opm["dsB/flops_rel"] == pytest.approx(1.5)
    assert row["optimization", "ogm_ge", "alpha=0.3"]["dsA/flops_rel"] == pytest.approx(1.1)
    assert row["baseline", "baseline", ""]["dsA/flops_rel"] == pytest.approx(1.0)


def test_benchmark_best_and_second_marks(bench):
    t = _table(bench).set_index(["method", "variant"])
    acc, f1 = t["dsA/acc.mark"], t["dsA/macro_f1.mark"]
    assert acc[("opm", "")] == "best" and acc[("ogm_ge", "alpha=0.3")] == "second"
    assert f1[("mla", "")] == "best" and f1[("opm", "")] == "second"
    assert (acc == "best").sum() == 1 and (acc == "second").sum() == 1
    assert acc[("average", "")].eq("").all()  # averages are never marked (0.88 would be second)
    assert t["dsB/acc.mark"][("opm", "")] == "best" and t["dsB/acc.mark"][("baseline", "")] == "second"


def test_benchmark_files_markdown_csv_latex(bench, tmp_path):
    out = tmp_path / "report"
    result = write_report([bench], out_dir=out)
    assert result["benchmark"] == {"md": out / "benchmark.md", "csv": out / "benchmark.csv",
                                   "tex": out / "benchmark.tex"}
    md = (out / "benchmark.md").read_text(encoding="utf-8")
    assert "| family | method | dsA acc | dsA macro-F1 | dsA imbalance | dsA train FLOPs | dsB acc |" in md
    assert "|  | opm | **91.0 ± 1.4** | _86.0 ± 1.4_ | 20.0 ± 0.0 | 1.00× | **72.0 ± 2.8** |" in md
    assert "|  | _feed-forward average_ | 88.0 | 90.5 | 15.0 | 1.50× | 72.0 |" in md
    assert "| optimization | ogm_ge (alpha=0.3) | _89.0 ± 1.4_ |" in md
    assert "| feed-forward | mla | 85.0 ± 1.4 | **95.0 ± 0.0** | 10.0 ± 0.0 | 2.00× | – |" in md
    assert md.index("| baseline |") < md.index("| data |") < md.index("| feed-forward |") < md.index("| optimization |")
    assert "unimodal" not in md

    tex = (out / "benchmark.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}{llrrrrrrrr}" in tex and r"\end{tabular}" in tex
    assert r"\multicolumn{4}{c}{dsA}" in tex
    assert r" & opm & \textbf{91.0$\pm$1.4} & \underline{86.0$\pm$1.4} & 20.0$\pm$0.0 & 1.00$\times$" in tex
    assert r"optimization & ogm\_ge (alpha=0.3) & \underline{89.0$\pm$1.4}" in tex
    assert r" & \textit{Average} & 88.0 & 90.5 & 15.0 & 1.50$\times$ & 72.0 " in tex
    assert tex.count(r"\midrule") == 4  # after the header and between the four groups

    import pandas as pd
    csv = pd.read_csv(out / "benchmark.csv", keep_default_na=False, na_values=[""])
    assert len(csv) == 9 and list(csv["kind"]).count("average") == 3
    assert csv.loc[csv["method"] == "opm", "dsA/acc.mean"].iloc[0] == pytest.approx(0.91)
    assert csv.loc[csv["method"] == "opm", "dsA/acc.mark"].iloc[0] == "best"
    assert "benchmark.md" in result["markdown"]


def test_no_benchmark_without_a_baseline_and_a_balancing_method(tmp_path):
    make_run(tmp_path, "0", method="baseline", seed=0, acc=0.8)
    make_run(tmp_path, "1", method="unimodal", seed=0, acc=0.7, modality="audio")
    result = write_report([tmp_path])
    assert result["benchmark"] is None and not (tmp_path / "benchmark.md").exists()
    make_run(tmp_path / "more", "2", method="opm", seed=0, acc=0.9)
    assert write_report([tmp_path / "more"])["benchmark"] is None  # no baseline


def test_methods_without_a_completed_run_are_left_out_and_named(tmp_path):
    make_run(tmp_path, "b", method="baseline", seed=0, acc=0.8)
    make_run(tmp_path, "o", method="ogm_ge", seed=0, acc=0.9, status="failed", alpha=0.3)
    result = write_report([tmp_path])
    assert result["benchmark"] is None and not (tmp_path / "benchmark.md").exists()
    assert "without a completed run: ogm_ge on dsA." in result["markdown"]

    make_run(tmp_path, "p", method="opm", seed=0, acc=0.85)
    make_run(tmp_path, "o2", method="ogm_ge", seed=0, acc=0.9, status="failed", alpha=0.8)
    result = write_report([tmp_path])
    assert "without a completed run: ogm_ge (alpha=0.3) on dsA; ogm_ge (alpha=0.8) on dsA." in result["markdown"]
    md = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert "| opm |" in md and "ogm_ge" not in md and "other" not in md


# ------------------------------------------------------------------------------------------ balance curves


def test_balance_points_relative_and_absolute_differ():
    # accuracy peaks at a middle setting; imbalance keeps falling with the strength of the knob
    points = balance_points([0.1, 0.5, 1.0, 2.0], acc=[0.80, 0.86, 0.84, 0.70], imbalance=[0.40, 0.20, 0.05, 0.08])
    assert points == BalancePoints(relative=0.5, absolute=1.0)


def test_balance_points_ties_and_missing_values():
    # equal accuracy: the lower imbalance wins; equal imbalance: the higher accuracy; NaN settings skipped
    assert balance_points(["a", "b", "c"], [0.9, 0.9, math.nan], [0.3, 0.2, 0.0]) == ("b", "c")
    assert balance_points(["a", "b"], [0.8, 0.9], [0.1, 0.1]) == ("b", "b")
    assert balance_points(["a"], [math.nan], [math.nan]) == (None, None)


@pytest.fixture
def curve(tmp_path):
    root = tmp_path / "curve"
    for seed, (a, b) in enumerate([(0.80, 0.84), (0.82, 0.86)]):
        make_run(root, f"b{seed}", method="baseline", seed=seed, acc=a, imb=0.40 + seed / 100)
        make_run(root, f"a{seed}", method="pmr", seed=seed, acc=b, imb=0.30, alpha=0.1)
        make_run(root, f"c{seed}", method="pmr", seed=seed, acc=0.90 - seed / 100, imb=0.20, alpha=1.0)
        make_run(root, f"d{seed}", method="pmr", seed=seed, acc=0.85, imb=0.02 + seed / 100, alpha=4.0)
        make_run(root, f"e{seed}", method="pmr", seed=seed, acc=0.87, imb=0.10, alpha=10.0)
    return root


def test_find_balance_curves_one_knob(curve):
    df = load_runs([curve])
    [c] = find_balance_curves(summarize(df), method_families(df))
    assert (c.dataset, c.method, c.knob) == ("dsA", "pmr", "alpha")
    assert list(c.points["setting"]) == ["0.1", "1", "4", "10"]  # knob order, not text order
    assert c.points["acc.mean"].tolist() == pytest.approx([0.85, 0.895, 0.85, 0.87])
    assert c.balance == ("1", "4")
    assert c.baseline["test/acc.mean"] == pytest.approx(0.81)


def test_balance_curve_png_and_summary(curve, tmp_path):
    result = write_report([curve], out_dir=tmp_path / "out")
    png = tmp_path / "out" / "balance_curve_pmr.png"
    assert result["balance_curves"] == {"pmr": png} and png.read_bytes()[:8] == PNG
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert md == result["markdown"]
    assert "### pmr on dsA, over alpha (`balance_curve_pmr.png`)" in md
    assert "| 1 | 2 | 89.5 ± 0.7 | 20.0 ± 0.0 |" in md
    assert "| baseline | 2 | 81.0 ± 1.4 | 40.5 ± 0.7 |" in md
    assert "- Relative balance point (best accuracy): **alpha=1**: accuracy 89.5 ± 0.7" in md
    assert "- Absolute balance point (lowest imbalance): **alpha=4**: accuracy 85.0 ± 0.0, imbalance 2.5 ± 0.7." in md


def test_no_curve_when_two_knobs_vary_or_one_setting(tmp_path):
    make_run(tmp_path, "0", method="pmr", seed=0, acc=0.8, alpha=0.1, momentum=0.2)
    make_run(tmp_path, "1", method="pmr", seed=0, acc=0.8, alpha=1.0, momentum=0.0)
    make_run(tmp_path, "2", method="opm", seed=0, acc=0.8, lam=0.5)
    make_run(tmp_path, "3", method="unimodal", seed=0, acc=0.8, imb=0.1, modality="audio")
    make_run(tmp_path, "4", method="unimodal", seed=0, acc=0.8, imb=0.1, modality="image")
    df = load_runs([tmp_path])
    assert find_balance_curves(summarize(df), method_families(df)) == []
    assert write_report([tmp_path])["balance_curves"] == {}


def test_a_grid_sweep_gives_a_curve_per_knob_at_each_setting_of_the_other(tmp_path):
    # PMR's alpha x epochs, with the baseline swept over the epochs too: no curve is dropped, and a curve at
    # epochs=5 is compared with the baseline at epochs=5
    for seed in (0, 1):
        for epochs in (5, 10):
            make_run(tmp_path, f"b{epochs}_{seed}", method="baseline", seed=seed, acc=0.70 + epochs / 100,
                     imb=0.40, trainer={"epochs": epochs})
            for alpha in (0.1, 1.0):
                make_run(tmp_path, f"p{alpha}_{epochs}_{seed}", method="pmr", seed=seed, acc=0.80 + alpha / 10,
                         imb=0.30 - alpha / 10 - epochs / 100, alpha=alpha, trainer={"epochs": epochs})
    df = load_runs([tmp_path])
    curves = find_balance_curves(summarize(df), method_families(df))
    assert sorted(c.title for c in curves) == [
        "pmr on dsA, over alpha at epochs=10", "pmr on dsA, over alpha at epochs=5",
        "pmr on dsA, over epochs at alpha=0.1", "pmr on dsA, over epochs at alpha=1"]
    at5 = next(c for c in curves if c.title.endswith("alpha at epochs=5"))
    assert at5.points["imbalance.mean"].tolist() == pytest.approx([0.24, 0.15])
    assert at5.baseline["test/acc.mean"] == pytest.approx(0.75)  # the baseline at epochs=5, not at 10
    over_epochs = next(c for c in curves if c.title.endswith("at alpha=1"))
    assert over_epochs.baseline is None  # two baselines (epochs 5 and 10) and neither is the curve's: no star
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    assert result["balance_curves"]["pmr"].read_bytes()[:8] == PNG
    assert "### pmr on dsA, over alpha at epochs=5 (`balance_curve_pmr.png`)" in result["markdown"]


def test_the_baseline_reference_is_only_one_trained_alike(tmp_path):
    # an ogm_ge sweep at trainer.epochs=2 beside a baseline at 3 epochs: no star, no FLOPs ratio (the tester's
    # 0.67x was 2 epochs over 3), and a note saying why
    for seed in (0, 1):
        make_run(tmp_path / "a", f"b3_{seed}", method="baseline", seed=seed, acc=0.80, imb=0.40, flops=3e12,
                 trainer={"epochs": 3})
        for alpha in (0.1, 1.0):
            make_run(tmp_path / "a", f"o{alpha}_{seed}", method="ogm_ge", seed=seed, acc=0.85 - alpha / 10,
                     imb=0.30 - alpha / 10, flops=2.2e12, alpha=alpha, trainer={"epochs": 2})
    result = write_report([tmp_path / "a"], out_dir=tmp_path / "out_a")
    df = load_runs([tmp_path / "a"])
    [c] = find_balance_curves(summarize(df), method_families(df))
    assert c.title == "ogm_ge on dsA, over alpha at epochs=2"
    assert c.baseline is None and "epochs=3" in c.baseline_note and "epochs=2" in c.baseline_note
    md = result["markdown"]
    assert "| baseline | 2 |" not in md and "Note: no baseline: none of the 1 baseline row(s) on dsA" in md
    t = _table(tmp_path / "a").set_index(["method", "variant"])
    assert math.isnan(t.at[("ogm_ge", "alpha=0.1, epochs=2"), "dsA/flops_rel"])
    assert t.at[("baseline", "epochs=3"), "dsA/flops_rel"] == pytest.approx(1.0)
    bench = (tmp_path / "out_a" / "benchmark.md").read_text(encoding="utf-8")
    assert "0.73×" not in bench and "| ogm_ge (alpha=0.1, epochs=2) | **84.0 ± 0.0** |" in bench
    assert "Note: ogm_ge (alpha=0.1, epochs=2) on dsA: no baseline has its settings (epochs=2)" in bench

    # a 2-epoch baseline beside the 3-epoch one: it is the star and the FLOPs reference, the 3-epoch one is not
    for seed in (0, 1):
        make_run(tmp_path / "a", f"b2_{seed}", method="baseline", seed=seed, acc=0.78, imb=0.45, flops=2e12,
                 trainer={"epochs": 2})
    df = load_runs([tmp_path / "a"])
    [c] = find_balance_curves(summarize(df), method_families(df))
    assert c.baseline["variant"] == "epochs=2" and c.baseline["test/acc.mean"] == pytest.approx(0.78)
    t = _table(tmp_path / "a").set_index(["method", "variant"])
    assert t.at[("ogm_ge", "alpha=0.1, epochs=2"), "dsA/flops_rel"] == pytest.approx(1.1)
    assert t.at[("baseline", "epochs=3"), "dsA/flops_rel"] == pytest.approx(1.0)
    md = write_report([tmp_path / "a"], out_dir=tmp_path / "out_b")["markdown"]
    assert "| baseline | 2 | 78.0 ± 0.0 | 45.0 ± 0.0 |" in md and "Note: no baseline" not in md
    assert "no baseline has its settings" not in (tmp_path / "out_b" / "benchmark.md").read_text(encoding="utf-8")


def test_acc_vs_imbalance_labels_move_to_a_legend_beyond_five_groups(tmp_path):
    from mmbalance.analysis.report import LABELLED_POINTS, acc_vs_imbalance_figure

    for n in (LABELLED_POINTS, LABELLED_POINTS + 2):
        root = tmp_path / str(n)
        for i in range(n):
            make_run(root, f"r{i}", method="pmr", seed=0, acc=0.8 + i / 100, imb=0.3, alpha=i)
        summary = summarize(load_runs([root]))
        ax = acc_vs_imbalance_figure(summary).axes[0]
        labels = [f"alpha={i}" for i in range(n)]
        if n <= LABELLED_POINTS:  # beside the points, no legend
            assert sorted(t.get_text() for t in ax.texts) == sorted(f"pmr {x}" for x in labels)
            assert ax.get_legend() is None
        else:  # one legend entry per group, nothing written over the points
            assert len(ax.texts) == 0
            assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(f"pmr {x}" for x in labels)


def _png_width(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[16:20], "big")


def test_a_unimodal_run_gets_no_empty_imbalance_panel(tmp_path):
    history = "epoch,val/acc,val/shapley/audio\n0,0.5,0.30\n1,0.6,0.40\n"
    make_run(tmp_path, "u", method="unimodal", seed=0, acc=0.8, imb=None, history=history, modality="audio")
    make_run(tmp_path, "o", method="ogm_ge", seed=0, acc=0.8, history=HISTORY[0], alpha=0.3)
    out = tmp_path / "out"
    files = {f.name: f for f in write_report([tmp_path], out_dir=out)["dynamics"]}
    assert set(files) == {"dynamics_dsA_unimodal.png", "dynamics_dsA_ogm_ge.png"}
    assert _png_width(files["dynamics_dsA_unimodal.png"]) * 2 == _png_width(files["dynamics_dsA_ogm_ge.png"])


# --------------------------------------------------------------------------------------- training dynamics

HISTORY = [
    "epoch,train/loss,val/acc,val/shapley/audio,val/shapley/image,val/imbalance\n"
    "0,1.0,0.5,0.30,0.10,0.20\n1,0.9,0.6,,,\n2,0.8,0.7,0.40,0.20,0.20\n",
    "epoch,train/loss,val/acc,val/shapley/audio,val/shapley/image,val/imbalance\n"
    "0,1.0,0.5,0.50,0.10,0.40\n1,0.9,0.6,,,\n2,0.8,0.7,0.40,0.30,0.10\n",
]


def test_dynamics_png_from_history(tmp_path):
    from mmbalance.analysis.studies import _history_means

    runs = [make_run(tmp_path, f"{i}", method="ogm_ge", seed=i, acc=0.8, history=h, alpha=0.3)
            for i, h in enumerate(HISTORY)]
    make_run(tmp_path, "9", method="ogm_ge", seed=0, acc=0.8, alpha=0.8)  # no history.csv: no plot
    make_run(tmp_path, "8", method="baseline", seed=0, acc=0.8,
             history="epoch,train/loss,val/acc\n0,1.0,0.5\n")                 # no Shapley columns
    stats = _history_means([str(r) for r in runs])
    assert stats["epoch"].tolist() == [0, 2]  # the epoch without Shapley is left out
    assert stats["val/shapley/audio.mean"].tolist() == pytest.approx([0.40, 0.40])
    assert stats["val/shapley/image.mean"].tolist() == pytest.approx([0.10, 0.25])
    assert stats["val/imbalance.mean"].tolist() == pytest.approx([0.30, 0.15])

    result = write_report([tmp_path], out_dir=tmp_path / "out")
    png = tmp_path / "out" / "dynamics_dsA_ogm_ge_alpha=0.3.png"
    assert result["dynamics"] == [png] and png.read_bytes()[:8] == PNG
    assert "`dynamics_dsA_ogm_ge_alpha=0.3.png`" in result["markdown"]


# ------------------------------------------------------------------------------------------------ sweeps


def _sweep_params(name):
    return OmegaConf.load(CONF / "sweep" / f"{name}.yaml").hydra.sweeper.params


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_file_composes(name):
    cfg = compose_cfg([f"sweep={name}"], fast=False)
    assert cfg is not None
    if name == "benchmark" or name.startswith("balance_curve_"):  # the header names the command
        lines = (CONF / "sweep" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_" and f"sweep={name}" in lines[1] + lines[2]


def test_benchmark_sweeps_every_registered_method_but_unimodal_and_every_stored_hybrid():
    from mmbalance.methods import METHODS

    params = _sweep_params("benchmark")
    hybrids = sorted(f.stem for f in (CONF / "method").glob("hybrid_*.yaml"))
    assert str(params.method).split(",") == [m for m in METHODS if m not in ("unimodal", "compose")] + hybrids
    assert str(params.seed) == "0,1,2"


CURVES = {"ogm_ge": "alpha", "agm": "alpha", "gblending": "super_epoch", "pmr": "alpha", "mmpareto": "gamma",
          "opm": "lam", "mlgm": "alpha", "inforeg": "beta", "amss": "temperature", "cggm": "rho", "olm": "weight_lr"}


@pytest.mark.parametrize("method", sorted(CURVES))
def test_balance_curve_sweep_sets_its_method_and_sweeps_its_knob(method):
    knob = CURVES[method]
    params = _sweep_params(f"balance_curve_{method}")
    values = str(params[f"method.{knob}"]).split(",")
    assert len(set(values)) >= 3 and str(params.seed) == "0,1,2"
    cfg = compose_cfg([f"sweep=balance_curve_{method}"], fast=False)
    assert cfg.method._target_.split(".")[-2] == method and knob in cfg.method
    for value in (values[0], values[-1]):  # the weakest and the strongest setting validate
        validate(compose_cfg([f"sweep=balance_curve_{method}", f"method.{knob}={value}"], fast=False))


def test_dynamics_leave_out_history_rows_beyond_the_completed_epochs(tmp_path):
    # metrics.json records 3 completed epochs (0, 1, 2 in history.csv); the row of epoch 3 is an unfinished
    # `resume=force` extension, and a copied run repeats seed 0: neither may enter the curve
    extended = HISTORY[0] + "3,0.7,0.8,0.90,0.00,0.90\n"
    run = make_run(tmp_path, "0", method="ogm_ge", seed=0, acc=0.8, history=extended, epochs=3, alpha=0.3)
    make_run(tmp_path, "1", method="ogm_ge", seed=1, acc=0.8, history=HISTORY[1], epochs=3, alpha=0.3)
    make_run(tmp_path, "2", method="ogm_ge", seed=0, acc=0.8, history=extended, epochs=3, alpha=0.3)  # a repeat
    from mmbalance.analysis.studies import _history_means

    stats = _history_means([str(run)], [3])
    assert stats["epoch"].tolist() == [0, 2] and stats.attrs["n_ignored"] == 1
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    assert result["dynamics"] == [tmp_path / "out" / "dynamics_dsA_ogm_ge.png"]
    assert ("Note: dsA ogm_ge: 1 history.csv row(s) beyond the completed epochs of metrics.json "
            "(an unfinished extension) left out.") in result["markdown"]


# ------------------------------------------------------------------------- regression runs: their own units


def test_regression_imbalance_is_in_mae_points_in_its_own_benchmark_columns(tmp_path):
    # cmu_mosei's classification and regression runs side by side: one percentage column must not hold both
    for seed in (0, 1):
        make_run(tmp_path, f"bc{seed}", method="baseline", seed=seed, acc=0.95, imb=0.183, dataset="mosei",
                 task="classification")
        make_run(tmp_path, f"oc{seed}", method="opm", seed=seed, acc=0.96, imb=0.15, dataset="mosei",
                 task="classification")
        make_run(tmp_path, f"br{seed}", method="baseline", seed=seed, acc=0.975, imb=0.444, mae=0.8, dataset="mosei")
        make_run(tmp_path, f"or{seed}", method="opm", seed=seed, acc=0.97, imb=0.3, mae=0.7, dataset="mosei")
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    md = result["benchmark"]["md"].read_text(encoding="utf-8")
    assert ("| mosei acc | mosei macro-F1 | mosei imbalance | mosei train FLOPs | mosei (regression) acc "
            "| mosei (regression) macro-F1 | mosei (regression) imbalance (MAE) |") in md
    assert "imbalance is in MAE points" in md
    row = next(line for line in md.splitlines() if "baseline (task=regression)" in line)
    assert "| 0.444 ± 0.000 |" in row and "44.4" not in row  # MAE points, not ×100
    row = next(line for line in md.splitlines() if "baseline (task=classification)" in line)
    assert "| 18.3 ± 0.0 |" in row
    average = next(line for line in md.splitlines() if "_feed-forward average_" in line)
    assert "| 0.300 |" in average and "| 15.0 |" in average
    tex = result["benchmark"]["tex"].read_text(encoding="utf-8")
    assert "Acc & F1 & Imb. & FLOPs & Acc & F1 & Imb. (MAE) & FLOPs" in tex and "0.444$\\pm$0.000" in tex


def test_regression_balance_curve_and_dynamics_in_mae_points(tmp_path, monkeypatch):
    from mmbalance.analysis import studies

    figures = []
    figure = studies._figure
    monkeypatch.setattr(studies, "_figure", lambda *a: figures.append(figure(*a)) or figures[-1])
    history = ("epoch,val/shapley/audio,val/shapley/text,val/imbalance\n"
               "0,0.30,0.10,0.20\n1,0.50,0.05,0.45\n")
    for seed in (0, 1):
        make_run(tmp_path, f"b{seed}", method="baseline", seed=seed, acc=0.8, imb=0.5, mae=0.9, history=history)
        make_run(tmp_path, f"c{seed}", method="baseline", seed=seed, acc=0.8, imb=0.1, dataset="dsB")
        for alpha, imb in [(0.1, 0.4), (1.0, 0.2)]:
            make_run(tmp_path, f"p{alpha}_{seed}", method="pmr", seed=seed, acc=0.85, imb=imb, mae=0.8, alpha=alpha)
        # a knob that switches the task would put % and MAE points on one axis: no curve over it
        for task_mae in (None, 0.8):
            make_run(tmp_path, f"m{task_mae}_{seed}", method="mla", seed=seed, acc=0.8, imb=0.3, mae=task_mae,
                     task="classification")
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    md = result["markdown"]
    assert "| alpha | n | test acc-2 ≥0 | imbalance (MAE) |" in md
    assert "| 0.1 | 2 | 85.0 ± 0.0 | 0.400 ± 0.000 |" in md
    assert "| baseline | 2 | 80.0 ± 0.0 | 0.500 ± 0.000 |" in md  # the regression baseline, not dsB's
    assert "imbalance 0.200 ± 0.000 MAE points." in md
    assert "over task" not in md and set(result["balance_curves"]) == {"pmr"}

    curve_ax = next(ax for f in figures for ax in f.axes if ax.get_xlabel().startswith("test imbalance"))
    assert curve_ax.get_xlabel() == "test imbalance (MAE points)"
    assert sorted(curve_ax.lines[0].get_xdata()) == pytest.approx([0.2, 0.4])
    [dyn] = [f for f in figures if f.axes[0].get_ylabel().startswith("validation")]  # the one history.csv group
    phi, imb = dyn.axes
    assert phi.get_ylabel() == "validation Shapley value φ (MAE points)"
    assert imb.get_ylabel() == "validation imbalance (MAE points)"
    assert list(imb.lines[0].get_ydata()) == pytest.approx([0.20, 0.45])  # not ×100


# --------------------------------------------------------------------- a damaged history.csv is never used in part

def _dynamics_figures(monkeypatch):
    from mmbalance.analysis import studies

    figures = []
    figure = studies._figure
    monkeypatch.setattr(studies, "_figure", lambda *a: figures.append(figure(*a)) or figures[-1])
    return figures


@pytest.mark.parametrize("damage, why", [
    (HISTORY[1][:-3], "its last row is cut short"),                 # cut inside its last number: "0.1" of "0.10"
    (HISTORY[1][:-12], "its last row is cut short"),                # cut inside the row: fewer fields
    (HISTORY[1].replace("0,1.0,0.5,0.50,0.10,0.40\n", "0,1.0,0.5,0.50\n"), "line 2 has 4 field(s), its header 6"),
    (HISTORY[1].replace("0.50", "0.5O"), "line 2: val/shapley/audio is '0.5O', not a number"),
    (HISTORY[1].rsplit("2,", 1)[0], "1 of the 3 epochs metrics.json records have no row (epoch 2)"),
    ("\x00\x13junk that is no csv at all\n", "no `epoch` column in its header"),
])
def test_a_damaged_history_is_named_and_left_out_of_the_dynamics_whole(tmp_path, monkeypatch, caplog, damage, why):
    figures = _dynamics_figures(monkeypatch)
    make_run(tmp_path, "0", method="ogm_ge", seed=0, acc=0.8, history=HISTORY[0], epochs=3, alpha=0.3)
    bad = make_run(tmp_path, "1", method="ogm_ge", seed=1, acc=0.8, history=damage, epochs=3, alpha=0.3)
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path], out_dir=tmp_path / "out")
    assert f"{bad / 'history.csv'}: {why}" in caplog.text
    assert f"Note: `{bad / 'history.csv'}`: {why}" in result["markdown"]
    [fig] = [f for f in figures if f.axes[0].get_ylabel().startswith("validation")]
    assert fig._suptitle.get_text() == "Training dynamics: dsA ogm_ge (mean ± std over 1 run(s))"
    phi, imb = fig.axes
    assert list(imb.lines[0].get_ydata()) == pytest.approx([20.0, 20.0])  # run 0's alone, no partial value


def test_a_completed_run_whose_only_history_is_junk_is_named_not_dropped_silently(tmp_path, caplog):
    bad = make_run(tmp_path, "0", method="ogm_ge", seed=0, acc=0.8, history="<html>not found</html>", epochs=3)
    with caplog.at_level("WARNING"):
        result = write_report([tmp_path], out_dir=tmp_path / "out")
    assert result["dynamics"] == [] and str(bad / "history.csv") in caplog.text
    assert "## Training dynamics" in result["markdown"] and str(bad / "history.csv") in result["markdown"]


def test_the_dynamics_title_counts_the_runs_each_epoch_is_over(tmp_path, monkeypatch):
    # run 1 computed Shapley values only at its last epoch (another eval.shapley_every, the same row): epoch 0
    # is over run 0 alone, and the title must not claim both runs
    figures = _dynamics_figures(monkeypatch)
    make_run(tmp_path, "0", method="ogm_ge", seed=0, acc=0.8, history=HISTORY[0], epochs=3)
    make_run(tmp_path, "1", method="ogm_ge", seed=1, acc=0.8, epochs=3, history=(
        "epoch,train/loss,val/acc,val/shapley/audio,val/shapley/image,val/imbalance\n"
        "0,1.0,0.5,,,\n1,0.9,0.6,,,\n2,0.8,0.7,0.40,0.30,0.10\n"))
    result = write_report([tmp_path], out_dir=tmp_path / "out")
    [fig] = [f for f in figures if f.axes[0].get_ylabel().startswith("validation")]
    assert fig._suptitle.get_text() == "Training dynamics: dsA ogm_ge (mean ± std over 1–2 run(s) per epoch)"
    assert "Note: dsA ogm_ge: epoch(s) 0 average over fewer runs than the others" in result["markdown"]


def test_a_curve_without_any_baseline_says_why_it_has_no_star(tmp_path):
    for alpha in (0.1, 1.0):
        make_run(tmp_path, f"a{alpha}", method="pmr", seed=0, acc=0.8 + alpha / 10, imb=0.3 - alpha / 10, alpha=alpha)
    md = write_report([tmp_path], out_dir=tmp_path / "out")["markdown"]
    assert ("Note: no baseline: the runs given hold no completed baseline run on dsA (report the curve's runs "
            "together with method=baseline runs trained with its settings); the plot shows no baseline ★.") in md


def test_a_curve_point_over_fewer_runs_than_its_n_says_so(curve, tmp_path):
    data = json.loads((curve / "c1" / "metrics.json").read_text())
    del data["metrics"]["test/imbalance"]  # one of alpha=1's two runs records no imbalance
    (curve / "c1" / "metrics.json").write_text(json.dumps(data))
    md = write_report([curve], out_dir=tmp_path / "out")["markdown"]
    assert "| 1 | 2 | 89.5 ± 0.7 | 20.0 ± – (n=1) |" in md


def test_a_family_average_is_not_given_over_part_of_its_rows(tmp_path):
    # two optimization methods, one without a FLOP count: no optimization average of FLOPs from the other alone
    for seed in (0, 1):
        make_run(tmp_path, f"b{seed}", method="baseline", seed=seed, acc=0.8, flops=1e12)
        make_run(tmp_path, f"o{seed}", method="ogm_ge", seed=seed, acc=0.85, flops=2e12)
        make_run(tmp_path, f"p{seed}", method="pmr", seed=seed, acc=0.83, flops=None)
    md = write_report([tmp_path], out_dir=tmp_path / "out")["benchmark"]["md"].read_text(encoding="utf-8")
    average = next(line for line in md.splitlines() if "_optimization average_" in line)
    assert average.endswith("| – |") and "| 84.0 |" in average  # accuracy averaged over both, FLOPs over neither
    assert "Note: the optimization average of dsA train FLOPs is not given: not every row has one (1 of 2)." in md


def test_rows_trained_otherwise_get_no_family_average_and_are_ranked_apart(tmp_path):
    """A 2-epoch agm-like row beside a 1-epoch ogm_ge row (one family): their mean would mix two trainings, and
    the longer-trained rows would take the best/second marks from the others."""
    root = tmp_path / "runs"
    for name, method, epochs, acc in (("b1", "baseline", 1, 0.60), ("o1", "ogm_ge", 1, 0.63),
                                      ("b2", "baseline", 2, 0.80), ("p2", "pmr", 2, 0.83)):
        make_run(root, name, method=method, seed=0, acc=acc, trainer={"epochs": epochs}, epochs=epochs)
    t = _table(root)
    opt = t[(t["family"] == "optimization") & (t["kind"] == "average")].iloc[0]
    assert math.isnan(opt["dsA/acc.mean"]) and math.isnan(opt["dsA/flops_rel"])
    assert any(n.startswith("no optimization average on dsA: its rows were trained with different settings")
               for n in t.attrs["notes"])
    marks = {(r["method"], r["variant"]): r["dsA/acc.mark"] for _, r in t[t["kind"] == "method"].iterrows()}
    best = sorted(k for k, v in marks.items() if v == "best")
    assert len(best) == 2, marks  # one best per training (0.63 at 1 epoch, 0.83 at 2), not the 2-epoch rows only
