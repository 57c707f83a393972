"""The BalanceBenchmark studies over run folders: the benchmark table, relative-balance curves, training dynamics.

`write_studies` is called by `write_report` with the runs frame and its summary; every study writes its
files only when the runs contain what it needs (see each function). Families come from each run's
`metrics.json` (`method_family`), never from the method registry, so this module stays free of torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from mmbalance.analysis.runs import (
    DASH, MAE_POINTS, PERCENT, REGRESSION_SUFFIX, counted, format_pm, is_regression, natural_key, order_key,
    task_dataset, with_count,
)

__all__ = [
    "FAMILY_ORDER", "method_families", "benchmark_table", "write_benchmark", "BalancePoints",
    "balance_points", "BalanceCurve", "find_balance_curves", "plot_balance_curves", "reference_baseline",
    "studies_left_out", "write_dynamics", "write_studies",
]

log = logging.getLogger(__name__)

BASELINE = "baseline"
REFERENCE = "reference"
# The BalanceBenchmark taxonomy in the paper's order; families it does not know come after, alphabetically.
FAMILY_ORDER = ["data", "feed-forward", "objective", "optimization", "hybrid"]
BENCHMARK_METRICS = [("acc", "test/acc"), ("macro_f1", "test/macro_f1")]


def _figure(width: float, height: float):
    # No pyplot: it would set a global backend inside the user's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _safe_name(text: str, limit: int = 120) -> str:
    """A file-name part from a label: unsafe characters become '_', and a label longer than `limit` is cut and
    given a digest of the whole, so that long variants (a hybrid's part lists) stay distinct and fit a file name."""
    name = re.sub(r"[^\w.=+-]+", "_", text).strip("_")
    if len(name) <= limit:
        return name
    return f"{name[:limit - 11]}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def method_families(df: pd.DataFrame) -> dict[str, str]:
    """{method: family} from the runs' recorded `method_family`; runs written before it was recorded:
    "reference" for baseline and unimodal, "other" for the rest."""
    out: dict[str, str] = {}
    column = df["method_family"] if "method_family" in df else pd.Series([None] * len(df), index=df.index)
    for method, family in zip(df["method"], column):
        if not method:
            continue
        if isinstance(family, str) and family:
            # a hybrid records its parts ("hybrid: ogm_ge (optimization) + mbsd (objective)"): one hybrid group
            out[method] = "hybrid" if family.startswith("hybrid:") else family
        elif method not in out:
            out[method] = REFERENCE if method in (BASELINE, "unimodal") else "other"
    return out


# --------------------------------------------------------------------------------------- benchmark table


def _family_rank(family: str) -> tuple:
    if family == BASELINE:
        return (0, "")
    if family in FAMILY_ORDER:
        return (1 + FAMILY_ORDER.index(family), "")
    return (1 + len(FAMILY_ORDER), family)


def _marks(values: pd.Series) -> pd.Series:
    """'best' / 'second' / '' by the value as printed (0.1 %), so equal cells get equal marks."""
    shown = (100 * values).round(1)
    distinct = sorted(shown.dropna().unique(), reverse=True)
    marks = pd.Series("", index=values.index, dtype=object)
    if distinct:
        marks[shown == distinct[0]] = "best"
    if len(distinct) > 1:
        marks[shown == distinct[1]] = "second"
    return marks


def benchmark_table(summary: pd.DataFrame, families: dict[str, str]) -> pd.DataFrame | None:
    """The BalanceBenchmark Table 2 shape (with Table 3's complexity view), one row per (method, variant).

    A dataset's regression runs (dataset.task=regression) form their own column group `<ds> (regression)`, listed
    in `attrs["regression"]`: their imbalance is in MAE points, not in %.

    Rows: the baseline first, then the methods grouped by family (data, feed-forward, objective,
    optimization, then any other), each family closed by its average row (`kind == "average"`: the
    unweighted mean of its rows' means, per column; none on a dataset where its rows were trained with different
    settings, a note says so). Unimodal runs are not rows, nor groups without a completed
    run (`studies_left_out` names them). Columns per dataset
    `<ds>`: `<ds>/n` (seeds), `<ds>/{acc,macro_f1,imbalance}.{mean,std}`, `<ds>/flops_rel` (mean training
    FLOPs over the baseline's) and `<ds>/{acc,macro_f1}.mark` ("best", "second" or "" among the method
    rows trained alike, the baseline included). None unless there is a baseline and at least one non-reference method.
    """
    summary = summary[summary["n"] > 0]  # a group of failed runs has no number to show
    if summary.empty:
        return None
    regression = [is_regression(row) for _, row in summary.iterrows()]
    summary = summary.assign(dataset=[task_dataset(row) for _, row in summary.iterrows()])
    keyed = summary.assign(family=[BASELINE if m == BASELINE else families.get(m, "other") for m in summary["method"]])
    keyed = keyed[keyed["family"] != REFERENCE]
    if not (keyed["family"] == BASELINE).any() or not (keyed["family"] != BASELINE).any():
        return None
    # a dataset's regression columns right after its classification ones
    datasets = sorted(dict.fromkeys(keyed["dataset"]),
                      key=lambda ds: (ds.removesuffix(REGRESSION_SUFFIX), ds.endswith(REGRESSION_SUFFIX)))
    rows_keys = sorted(
        dict.fromkeys(zip(keyed["family"], keyed["method"], keyed["variant"])),
        key=lambda k: (_family_rank(k[0]), k[1], natural_key(k[2])),
    )

    def col(row: pd.Series | None, name: str) -> float:
        if row is None or name not in row:
            return math.nan
        return float(row[name])

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for family, method, variant in rows_keys:
        row: dict[str, Any] = {"kind": "method", "family": family, "method": method, "variant": variant}
        for ds in datasets:
            hit = keyed[(keyed["dataset"] == ds) & (keyed["method"] == method) & (keyed["variant"] == variant)]
            s = hit.iloc[0] if len(hit) else None
            row[f"{ds}/n"] = int(s["n"]) if s is not None else 0
            row[f"{ds}/context"] = _context(s) if s is not None else None  # how it was trained (not shown)
            for short, metric in BENCHMARK_METRICS + [("imbalance", "test/imbalance")]:
                row[f"{ds}/{short}.mean"] = col(s, f"{metric}.mean")
                row[f"{ds}/{short}.std"] = col(s, f"{metric}.std")
            # FLOPs relative to the row's reference baseline (`reference_baseline`: the one trained alike)
            flops = col(s, "flops/train_total.mean")
            base = reference_baseline(keyed, s) if s is not None else None
            base_flops = col(base, "flops/train_total.mean")
            row[f"{ds}/flops_rel"] = flops / base_flops if base_flops else math.nan
            if np.isfinite(flops) and base is None and len(_baselines(keyed, ds, is_regression(s))):
                what = f" ({_context(s)})" if _context(s) else ""
                notes.append(f"{_row_label(row)} on {ds}: no baseline has its settings{what}, so its training "
                             "FLOPs are not given relative to one")
        rows.append(row)
    table = pd.DataFrame(rows)

    out_rows = []
    for family, members in table.groupby("family", sort=False):
        out_rows += members.to_dict("records")
        if family == BASELINE:
            continue
        average: dict[str, Any] = {"kind": "average", "family": family, "method": "average", "variant": ""}
        alike = {}  # per dataset: rows trained otherwise (epochs, data, ...) are never averaged together
        for ds in datasets:
            contexts = sorted(set(members.loc[members[f"{ds}/n"] > 0, f"{ds}/context"]))
            alike[ds] = len(contexts) <= 1
            if not alike[ds]:
                notes.append(f"no {family} average on {ds}: its rows were trained with different settings ("
                             + "; ".join(c or "the defaults" for c in contexts) + ")")
        for c in table.columns:
            if c.endswith(".mean") or c.endswith("/flops_rel"):
                # over the rows that have the dataset; where some of them lack the value (FLOPs not measured, no
                # baseline trained alike), an average of the others would pass for the family's: none is given
                ds = c.rsplit("/", 1)[0]
                present = members[members[f"{ds}/n"] > 0][c]
                complete = present.notna().all()
                average[c] = present.mean() if complete and alike[ds] else math.nan
                if alike[ds] and not complete and present.notna().any():
                    notes.append(f"the {family} average of {ds} {_COLUMN_NAMES.get(c.rsplit('/', 1)[1], c)} is not "
                                 f"given: not every row has one ({int(present.notna().sum())} of {len(present)})")
            elif c.endswith(".std"):
                average[c] = math.nan
            elif c.endswith("/n"):
                average[c] = int((members[c] > 0).sum())  # how many rows the average is over
        out_rows.append(average)
    out = pd.DataFrame(out_rows, columns=list(table.columns))
    for ds in datasets:
        for short, _ in BENCHMARK_METRICS:
            marks = pd.Series("", index=out.index, dtype=object)
            is_method = out["kind"] == "method"
            # best and second among the rows trained alike: a longer-trained row does not outrank the others
            for _, alike in out[is_method].groupby(f"{ds}/context", dropna=False):
                marks[alike.index] = _marks(alike[f"{ds}/{short}.mean"])
            out[f"{ds}/{short}.mark"] = marks
    per_dataset = [f"{ds}/{c}" for ds in datasets for c in (
        "n", "acc.mean", "acc.std", "acc.mark", "macro_f1.mean", "macro_f1.std", "macro_f1.mark",
        "imbalance.mean", "imbalance.std", "flops_rel")]
    out = out[["kind", "family", "method", "variant", *per_dataset]]
    out.attrs["datasets"] = datasets
    out.attrs["regression"] = sorted({ds for ds, r in zip(summary["dataset"], regression) if r})
    out.attrs["notes"] = notes
    return out


# the benchmark table's per-dataset columns as its notes name them
_COLUMN_NAMES = {"acc.mean": "accuracy", "macro_f1.mean": "macro-F1", "imbalance.mean": "imbalance",
                 "flops_rel": "train FLOPs"}


def _baselines(summary: pd.DataFrame, dataset: str, regression: bool = False) -> pd.DataFrame:
    """The baseline rows with completed runs on `dataset` of one task (classification or regression: their
    imbalances are in different units)."""
    base = summary[(summary["dataset"] == dataset) & (summary["method"] == BASELINE) & (summary["n"] > 0)]
    return base[[is_regression(row) == regression for _, row in base.iterrows()]]


def reference_baseline(summary: pd.DataFrame, row: pd.Series | None = None, *, dataset: str | None = None,
                       context: str = "", regression: bool = False) -> pd.Series | None:
    """The baseline summary row that `row` (a summary row) is compared with, or None: the first baseline with
    completed runs on the row's dataset, of its task, trained alike, i.e. with the same settings outside the
    method's own (`context`: epochs, optimizer, backbone, data, ...). Never a baseline trained otherwise. Without a
    row: the reference of `dataset`, `context` and `regression`. The one rule for every reference: the benchmark's
    FLOPs ratios, the balance curves' baseline, benchmarks/readme_tables.py's cost ratios."""
    if row is not None:
        dataset, context, regression = row["dataset"], _context(row), is_regression(row)
    for _, base in _baselines(summary, dataset, regression).iterrows():
        if _context(base) == (context or ""):
            return base
    return None


def _context(row: pd.Series | None) -> str | None:
    """A summary row's settings outside its method's own (`context`, runs.load_runs); "" for a summary without them
    (read back from an older summary.csv: every row alike, as before), None for no row."""
    if row is None:
        return None
    value = row.get("context", "")
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _row_label(row) -> str:
    return f"{row['method']} ({row['variant']})" if row["variant"] else str(row["method"])


def _imbalance_scale(table: pd.DataFrame, ds: str) -> tuple[float, int]:
    """(factor, digits) of a column group's imbalance: MAE points for a regression group, else %."""
    return MAE_POINTS if ds in table.attrs.get("regression", ()) else PERCENT


def _cells(row, ds: str, pm: str, mark, imbalance_scale: tuple[float, int] = PERCENT) -> list[str]:
    """[acc, F1, imbalance, FLOPs ×] of one row for one dataset: percentages with one decimal, the imbalance in
    `imbalance_scale` (MAE points for a regression group)."""
    cells = []
    average = row["kind"] == "average"
    for short in ("acc", "macro_f1", "imbalance"):
        mean, std = row[f"{ds}/{short}.mean"], row[f"{ds}/{short}.std"]
        if not np.isfinite(mean):
            cells.append(DASH)
            continue
        factor, digits = imbalance_scale if short == "imbalance" else PERCENT
        text = f"{factor * mean:.{digits}f}" if average else format_pm(mean, std, factor, digits).replace(" ± ", pm)
        cells.append(mark(text, row.get(f"{ds}/{short}.mark", "")))
    rel = row[f"{ds}/flops_rel"]
    cells.append(f"{rel:.2f}×" if np.isfinite(rel) else DASH)
    return cells


def _benchmark_markdown(table: pd.DataFrame) -> str:
    datasets = table.attrs["datasets"]
    regression = table.attrs.get("regression", [])
    header = ["family", "method"]
    for ds in datasets:
        imbalance = f"{ds} imbalance (MAE)" if ds in regression else f"{ds} imbalance"
        header += [f"{ds} acc", f"{ds} macro-F1", imbalance, f"{ds} train FLOPs"]

    def mark(text, how):
        return f"**{text}**" if how == "best" else f"_{text}_" if how == "second" else text

    lines = [
        "# Benchmark", "",
        "BalanceBenchmark's Table 2 shape with Table 3's complexity view. Accuracy, macro-F1 and imbalance in %, "
        "mean ± sample std over seeds; per column the best accuracy / macro-F1 in **bold**, the second best in "
        "_italics_ (underlined in the LaTeX table). A family's average row is the unweighted mean of its rows' "
        "means. Train FLOPs are relative to the baseline's on the same dataset with the same settings outside the "
        "method's own (epochs, optimizer, backbone, data, ...; the variant names those that differ)."
        + (" Regression runs (dataset.task=regression) have their own columns, `<dataset> (regression)`: acc is "
           "acc-2 (non-negative vs negative) in %, and the imbalance is in MAE points (the Shapley value is "
           "v = −MAE), not in %." if regression else ""), "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    last_family = None
    for _, row in table.iterrows():
        family = row["family"] if row["family"] != last_family else ""
        last_family = row["family"]
        label = f"_{row['family']} average_" if row["kind"] == "average" else _row_label(row)
        cells = [family, label]
        for ds in datasets:
            cells += _cells(row, ds, " ± ", mark, _imbalance_scale(table, ds))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = table.attrs.get("notes") or []
    if notes:
        lines += [""] + [f"Note: {n}." for n in notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _benchmark_latex(table: pd.DataFrame) -> str:
    datasets = table.attrs["datasets"]
    regression = table.attrs.get("regression", [])

    def mark(text, how):
        return rf"\textbf{{{text}}}" if how == "best" else rf"\underline{{{text}}}" if how == "second" else text

    lines = [
        "% mmbalance benchmark table (BalanceBenchmark Table 2 shape); needs \\usepackage{booktabs}",
        "% acc, macro-F1, imbalance in %: mean $\\pm$ std over seeds; FLOPs relative to the baseline"
        + ("; a (regression) group's imbalance in MAE points (v = -MAE), not %" if regression else ""),
        r"\begin{tabular}{ll" + "rrrr" * len(datasets) + "}",
        r"\toprule",
        " & & " + " & ".join(rf"\multicolumn{{4}}{{c}}{{{_tex(ds)}}}" for ds in datasets) + r" \\",
        " ".join(rf"\cmidrule(lr){{{3 + 4 * i}-{6 + 4 * i}}}" for i in range(len(datasets))),
        "Family & Method & " + " & ".join("Acc & F1 & Imb. (MAE) & FLOPs" if ds in regression
                                          else "Acc & F1 & Imb. & FLOPs" for ds in datasets) + r" \\",
        r"\midrule",
    ]
    last_family = None
    for _, row in table.iterrows():
        if last_family is not None and row["family"] != last_family:
            lines.append(r"\midrule")
        family = _tex(row["family"]) if row["family"] != last_family else ""
        last_family = row["family"]
        label = r"\textit{Average}" if row["kind"] == "average" else _tex(_row_label(row))
        cells = [family, label]
        for ds in datasets:
            cells += [c.replace(DASH, "--").replace("×", r"$\times$")
                      for c in _cells(row, ds, r"$\pm$", mark, _imbalance_scale(table, ds))]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_benchmark(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """benchmark.md, benchmark.csv (the table's numbers, fractions) and benchmark.tex into `out`."""
    files = {"md": out / "benchmark.md", "csv": out / "benchmark.csv", "tex": out / "benchmark.tex"}
    files["md"].write_text(_benchmark_markdown(table), encoding="utf-8")
    table.to_csv(files["csv"], index=False)
    files["tex"].write_text(_benchmark_latex(table), encoding="utf-8")
    return files


# -------------------------------------------------------------------------------- relative-balance curves


class BalancePoints(NamedTuple):
    relative: Any  # the setting with the best mean accuracy
    absolute: Any  # the setting with the lowest mean imbalance


def balance_points(settings: Sequence[Any], acc: Sequence[float], imbalance: Sequence[float]) -> BalancePoints:
    """BalanceBenchmark's balance points of a knob sweep, from the per-setting means.

    The *relative balance point* is the setting with the best accuracy, the *absolute balance point* the
    setting with the lowest imbalance. Ties: the other metric decides (lower imbalance, higher accuracy),
    then the earlier setting. Settings whose metric is NaN are skipped; None when none is left.
    """
    items = [(s, float(a), float(i)) for s, a, i in zip(settings, acc, imbalance)]
    by_acc = [(-a, i if np.isfinite(i) else math.inf, k) for k, (_, a, i) in enumerate(items) if np.isfinite(a)]
    by_imb = [(i, -a if np.isfinite(a) else math.inf, k) for k, (_, a, i) in enumerate(items) if np.isfinite(i)]
    relative = items[min(by_acc)[2]][0] if by_acc else None
    absolute = items[min(by_imb)[2]][0] if by_imb else None
    return BalancePoints(relative, absolute)


@dataclass
class BalanceCurve:
    dataset: str
    method: str
    knob: str
    points: pd.DataFrame  # setting (str), value, n, acc.mean/std, imbalance.mean/std, in knob order
    baseline: pd.Series | None  # the baseline's summary row on the same dataset (and the same fixed knobs), if any
    balance: BalancePoints
    fixed: str = ""  # the other knobs, held at these values along the curve ("" when only one knob varies)
    regression: bool = False  # regression runs: the imbalance in MAE points (runs.value_scale), not in %
    baseline_note: str = ""  # why there is no baseline to compare with, when there is none

    @property
    def imbalance_scale(self) -> tuple[float, int]:
        return MAE_POINTS if self.regression else PERCENT

    @property
    def title(self) -> str:
        return f"{self.method} on {self.dataset}, over {self.knob}" + (f" at {self.fixed}" if self.fixed else "")


def _knobs(variant: str) -> dict[str, str] | None:
    """{knob: value} of a variant string ("alpha=0.5, epochs=10"); None when it is not knob=value pairs."""
    parts = variant.split(", ") if variant else []
    if not parts or any("=" not in p for p in parts):
        return None
    return dict(p.split("=", 1) for p in parts)


def _value(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _matching_baseline(summary: pd.DataFrame, dataset: str, fixed: dict[str, str], regression: bool = False,
                       contexts: Sequence[str] | None = None) -> tuple[pd.Series | None, str]:
    """(the baseline row to compare a curve with, or None and why): the baseline on the dataset of the curve's task
    (classification or regression: their imbalances are in different units) trained alike, i.e. with the same
    settings outside the method's own (`context`: epochs, optimizer, backbone, data, ...) as every point of the
    curve (`contexts`: those of its points). A summary without contexts (an older summary.csv): the only baseline, or
    the one whose own knobs equal the curve's fixed knobs."""
    base = _baselines(summary, dataset, regression)
    if base.empty:
        return None, (f"no baseline: the runs given hold no completed baseline run on {dataset}"
                      + (" (regression)" if regression else "") + " (report the curve's runs together with method=baseline "
                      "runs trained with its settings)")
    if contexts is not None:
        if len(contexts) > 1:
            return None, ("no baseline: the curve's points differ in settings outside the method's own ("
                          + " / ".join(c or "–" for c in contexts) + "), so no one baseline was trained like them")
        hit = reference_baseline(summary, dataset=dataset, context=contexts[0], regression=regression)
        if hit is not None:
            return hit, ""
        return None, (f"no baseline: none of the {len(base)} baseline row(s) on {dataset} ("
                      + ", ".join(row["variant"] or "–" for _, row in base.iterrows())
                      + ") has the curve's settings" + (f" ({contexts[0]})" if contexts[0] else ""))
    if len(base) == 1:
        return base.iloc[0], ""
    hits = [row for _, row in base.iterrows()
            if (k := _knobs(row["variant"])) is not None and all(fixed.get(name) == v for name, v in k.items())]
    if len(hits) == 1:
        return hits[0], ""
    return None, f"no baseline: {len(base)} baseline rows on {dataset} and none matches the curve"


def find_balance_curves(summary: pd.DataFrame, families: dict[str, str]) -> list[BalanceCurve]:
    """The relative-balance curves of every (dataset, method) but the references: for each knob that takes at
    least two settings, one curve per combination of the other knobs' values (a grid alpha x epochs gives a
    curve over alpha at each epochs and one over epochs at each alpha); a curve needs at least two settings
    with both a test accuracy and an imbalance, all of one task (a knob that switches dataset.task would put
    percentages and MAE points on one axis). Knobs that only ever change together give no curve."""
    curves = []
    for (dataset, method), group in summary.groupby(["dataset", "method"], sort=False):
        if families.get(method, "other") == REFERENCE:
            continue
        group = group[group["n"] > 0]
        knobs = [_knobs(v) for v in group["variant"]]
        if len(group) < 2 or any(k is None for k in knobs):
            continue
        names = list(dict.fromkeys(name for k in knobs for name in k))
        for knob in names:
            rest = [n for n in names if n != knob]
            by_rest: dict[tuple, list[int]] = {}
            for i, k in enumerate(knobs):
                if knob in k:
                    by_rest.setdefault(tuple(k.get(n) for n in rest), []).append(i)
            for rest_values, rows in by_rest.items():
                if len(rows) < 2:
                    continue
                sub = group.iloc[rows]
                points = pd.DataFrame({
                    "setting": [knobs[i][knob] for i in rows],
                    "value": [_value(knobs[i][knob]) for i in rows],
                    "regression": [is_regression(row) for _, row in sub.iterrows()],
                    "n": sub["n"].to_numpy(),
                    "context": [_context(row) for _, row in sub.iterrows()],
                    **{f"{short}.{s}": sub[f"{metric}.{s}"].to_numpy() if f"{metric}.{s}" in sub else math.nan
                       for short, metric in [("acc", "test/acc"), ("imbalance", "test/imbalance")]
                       for s in ("mean", "std", "n")},
                })
                points = points[points["acc.mean"].notna() & points["imbalance.mean"].notna()]
                if len(points) < 2 or points["regression"].nunique() > 1:
                    continue
                regression = bool(points["regression"].iloc[0])
                contexts = list(dict.fromkeys(points["context"])) if "context" in summary else None
                points = points.drop(columns=["regression", "context"])
                points = points.iloc[sorted(range(len(points)), key=lambda i: natural_key(points["setting"].iloc[i]))]
                points = points.reset_index(drop=True)
                fixed = {n: v for n, v in zip(rest, rest_values) if v is not None}
                balance = balance_points(points["setting"], points["acc.mean"], points["imbalance.mean"])
                baseline, note = _matching_baseline(summary, dataset, fixed, regression, contexts)
                curves.append(BalanceCurve(dataset, method, knob, points, baseline, balance,
                                           ", ".join(f"{n}={v}" for n, v in fixed.items()), regression, note))
    return curves


def plot_balance_curves(curves: Sequence[BalanceCurve], file: Path) -> Path:
    """Accuracy against imbalance (mean ± std per setting, labelled), one panel per curve."""
    cols = min(3, len(curves))  # a grid sweep gives several curves per method: rows of three panels
    rows = math.ceil(len(curves) / cols)
    fig = _figure(6.5 * cols, 5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    for ax, c in zip(axes, curves):
        p = c.points
        fx = c.imbalance_scale[0]  # % of accuracy, or MAE points for regression runs
        x, y = fx * p["imbalance.mean"], 100 * p["acc.mean"]
        ax.plot(x, y, "-", color="0.7", zorder=1)
        ax.errorbar(x, y, xerr=fx * p["imbalance.std"].fillna(0), yerr=100 * p["acc.std"].fillna(0),
                    fmt="o", capsize=3, color="C0", zorder=2, label=f"{c.method} ({c.knob})")
        for setting, xi, yi in zip(p["setting"], x, y):
            ax.annotate(f"{c.knob}={setting}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        for which, setting, style in [("relative", c.balance.relative, dict(marker="o", ms=14, mfc="none", mec="C3")),
                                      ("absolute", c.balance.absolute, dict(marker="s", ms=14, mfc="none", mec="C2"))]:
            hit = p[p["setting"] == setting]
            if len(hit):
                ax.plot(fx * hit["imbalance.mean"], 100 * hit["acc.mean"], ls="none", mew=1.5,
                        label=f"{which} balance point ({c.knob}={setting})", **style)
        b = c.baseline
        if b is not None and np.isfinite(b.get("test/imbalance.mean", math.nan)) \
                and np.isfinite(b.get("test/acc.mean", math.nan)):
            ax.errorbar(fx * b["test/imbalance.mean"], 100 * b["test/acc.mean"],
                        xerr=fx * np.nan_to_num(b["test/imbalance.std"]), yerr=100 * np.nan_to_num(b["test/acc.std"]),
                        fmt="*", ms=12, capsize=3, color="k", label="baseline")
        ax.set_xlabel("test imbalance (MAE points)" if c.regression else "test imbalance (%)")
        ax.set_ylabel("test acc-2 ≥0 (%)" if c.regression else "test accuracy (%)")
        # wrapped to the 6.5-inch panel: a long context (masking, epochs, data settings) was clipped at both edges
        ax.set_title(textwrap.fill(f"{c.title}: accuracy vs. imbalance", 70), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(file, dpi=150)
    return file


def _balance_markdown(curves: Sequence[BalanceCurve], files: dict[str, Path]) -> list[str]:
    lines = ["", "## Relative-balance curves", "",
             "The *relative balance point* is the setting with the best mean test accuracy, the *absolute balance "
             "point* the setting with the lowest mean imbalance (BalanceBenchmark)."]
    for c in curves:
        p = c.points
        imb = c.imbalance_scale
        # a regression curve: acc is acc-2 (non-negative) in %, the imbalance in MAE points
        header = "| test acc-2 ≥0 | imbalance (MAE) |" if c.regression else "| test acc | imbalance |"
        lines += ["", f"### {c.title} (`{files[c.method].name}`)", "",
                  f"| {c.knob} | n {header}", "|---:|---:|---:|---:|"]
        for _, r in p.iterrows():  # (n=k): a mean over fewer of the setting's runs than n, as in summary.md
            acc = with_count(format_pm(r["acc.mean"], r["acc.std"], 100.0), r["acc.n"], r["n"])
            imbalance = with_count(format_pm(r["imbalance.mean"], r["imbalance.std"], *imb), r["imbalance.n"], r["n"])
            lines.append(f"| {r['setting']} | {r['n']} | {acc} | {imbalance} |")
        if c.baseline is not None:
            b = c.baseline
            acc = format_pm(b.get('test/acc.mean'), b.get('test/acc.std'), 100.0)
            imbalance = format_pm(b.get('test/imbalance.mean'), b.get('test/imbalance.std'), *imb)
            lines.append(f"| baseline | {b['n']} | {with_count(acc, b.get('test/acc.n'), b['n'])} "
                         f"| {with_count(imbalance, b.get('test/imbalance.n'), b['n'])} |")
        lines.append("")
        if c.baseline is None and c.baseline_note:
            lines.append(f"Note: {c.baseline_note}; the plot shows no baseline ★.")
        for name, setting in [("Relative balance point (best accuracy)", c.balance.relative),
                              ("Absolute balance point (lowest imbalance)", c.balance.absolute)]:
            r = p[p["setting"] == setting].iloc[0]
            lines.append(f"- {name}: **{c.knob}={setting}**: accuracy {format_pm(r['acc.mean'], r['acc.std'], 100.0)}, "
                         f"imbalance {format_pm(r['imbalance.mean'], r['imbalance.std'], *imb)}"
                         + (" MAE points." if c.regression else "."))
    return lines


def studies_left_out(summary: pd.DataFrame, families: dict[str, str]) -> list[str]:
    """"method (variant) on dataset" of every group but the references that has no completed run: the studies
    skip them."""
    empty = summary[(summary["n"] == 0) & (summary["method"].map(lambda m: families.get(m) != REFERENCE))]
    return [f"{m} ({v}) on {d}" if v else f"{m} on {d}" for d, m, v in zip(empty["dataset"], empty["method"],
                                                                         empty["variant"])]


# ------------------------------------------------------------------------------------- training dynamics


def _read_history(file: Path, n_epochs: float = math.nan) -> tuple[pd.DataFrame | None, str]:
    """(`epoch`, `val/shapley/<m>` and `val/imbalance` of a run's history.csv as numbers, "") or (None, why it is
    not used); (None, "") for a history without per-epoch Shapley values (eval.shapley_every=0: nothing to plot).

    The file is used whole or not at all, never in part: it must end with a line end (a row cut short by a write
    that did not finish may hold a partial number), every row must have the header's number of fields, every value
    the dynamics read a number (empty: not computed that epoch), the epochs whole numbers, each once, and, when
    metrics.json records the run's `n_epochs`, every epoch 0 .. n_epochs-1 must have its row."""
    try:
        text = file.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return None, f"not readable ({type(e).__name__}: {e})"
    if not rows or not rows[0]:
        return None, "empty, or no header in its first line"
    if not text.endswith("\n"):
        return None, "its last row is cut short (no line end: a write that did not finish)"
    header, body = rows[0], rows[1:]
    if "epoch" not in header:
        return None, f"no `epoch` column in its header ({', '.join(header[:4])}{', ...' if len(header) > 4 else ''})"
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            return None, f"line {line} has {len(row)} field(s), its header {len(header)}"
    cols = [c for c in header if c.startswith("val/shapley/") and "/" not in c[len("val/shapley/"):]]
    if not cols:
        return None, ""
    cols += ["val/imbalance"] if "val/imbalance" in header else []
    where = {c: header.index(c) for c in ["epoch", *cols]}
    values: dict[str, list[float]] = {c: [] for c in where}
    for line, row in enumerate(body, start=2):
        for c, i in where.items():
            cell = row[i].strip()
            try:
                value = math.nan if cell == "" and c != "epoch" else float(cell)
            except ValueError:
                return None, f"line {line}: {c} is {cell!r}, not a number"
            if c == "epoch" and not (math.isfinite(value) and value >= 0 and value == int(value)):
                return None, f"line {line}: epoch {cell!r} is not an epoch number"
            values[c].append(value)
    epochs = [int(e) for e in values["epoch"]]
    twice = sorted({e for e in epochs if epochs.count(e) > 1})
    if twice:
        return None, f"epoch {twice[0]} has more than one row"
    if np.isfinite(n_epochs):
        missing = sorted(set(range(int(n_epochs))) - set(epochs))
        if missing:
            return None, (f"{len(missing)} of the {int(n_epochs)} epochs metrics.json records have no row (epoch "
                          f"{', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''})")
    return pd.DataFrame(values), ""


def _history_means(run_dirs: Sequence[str], epochs: Sequence[float] | None = None,
                   problems: list[str] | None = None) -> pd.DataFrame | None:
    """Per-epoch mean and std over runs of `val/shapley/<m>` and `val/imbalance` (epochs without them dropped),
    and `n`, the number of runs each epoch's values are over.

    `epochs`: each run's completed epoch count (metrics.json `epochs`); history.csv numbers epochs from 0, so a
    row with epoch >= that count belongs to a later, unfinished extension (resume=force) and is left out
    (counted in `attrs["n_ignored"]`). A damaged history.csv (`_read_history`) is left out whole, with a warning
    naming it; `problems` gets a line for each. `attrs["n_runs"]`: the runs used."""
    frames = []
    ignored = 0
    for run_dir, n_epochs in zip(run_dirs, epochs if epochs is not None else [math.nan] * len(run_dirs)):
        file = Path(run_dir) / "history.csv"
        if not file.exists():
            continue
        n_epochs = float(n_epochs) if n_epochs is not None and pd.notna(n_epochs) else math.nan
        h, problem = _read_history(file, n_epochs)
        if problem:
            log.warning("%s: %s; left out of the training dynamics", file, problem)
            if problems is not None:
                problems.append(f"`{file}`: {problem}; left out of the training dynamics")
            continue
        if h is None:
            continue
        cols = [c for c in h.columns if c != "epoch"]
        if np.isfinite(n_epochs):
            keep = h["epoch"] < n_epochs
            ignored += int((~keep).sum())
            h = h[keep]
        frames.append(h.dropna(subset=cols, how="all"))
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    rows = pd.concat(frames)
    stats = rows.groupby("epoch").agg(["mean", "std"])
    stats.columns = [f"{c}.{s}" for c, s in stats.columns]
    stats["n"] = rows.groupby("epoch").size()
    stats.attrs["n_runs"] = len(frames)
    stats.attrs["n_ignored"] = ignored
    return stats.reset_index()


def write_dynamics(df: pd.DataFrame, out: Path, notes: list[str] | None = None) -> list[Path]:
    """`dynamics_<dataset>_<method>[_<variant>].png` per group of completed runs whose history.csv has
    `val/shapley/<m>`: per-epoch φ per modality and the imbalance, mean (± std band) over the runs (each variant
    and seed once), up to each run's completed epochs; `notes` gets a line per group with rows left out."""
    written = []
    done = df[counted(df)]
    groups = sorted(done.groupby(["dataset", "method", "variant"], sort=False), key=lambda g: order_key(*g[0]))
    for (dataset, method, variant), group in groups:
        epochs = group["epochs"] if "epochs" in group else None
        problems: list[str] = []
        stats = _history_means(list(group["run_dir"]), None if epochs is None else list(epochs), problems)
        if notes is not None:
            notes += problems
        if stats is None:
            continue
        what = " ".join(p for p in (dataset, method, variant) if p)
        # the runs each epoch is averaged over: an epoch without Shapley values in some runs (another
        # eval.shapley_every) has fewer, and the title says so rather than claim every run
        lo, hi = int(stats["n"].min()), int(stats["n"].max())
        over = f"{hi} run(s)" if lo == hi else f"{lo}–{hi} run(s) per epoch"
        if lo != hi and notes is not None:
            fewer = [str(int(e)) for e, n in zip(stats["epoch"], stats["n"]) if n < hi]
            notes.append(f"{what}: epoch(s) {', '.join(fewer)} average over fewer runs than the others (not every "
                         "run recorded Shapley values there)")
        if stats.attrs["n_ignored"]:
            note = (f"{what}: {stats.attrs['n_ignored']} history.csv row(s) beyond the completed epochs of "
                    "metrics.json (an unfinished extension) left out")
            log.warning("training dynamics of %s", note)
            if notes is not None:
                notes.append(note)
        from matplotlib.ticker import MaxNLocator

        # a unimodal run has one φ and no imbalance: it gets the φ panel only, not an empty second one
        has_imbalance = "val/imbalance.mean" in stats and stats["val/imbalance.mean"].notna().any()
        # a regression run's φ and imbalance are MAE points (v = -MAE), not shares of accuracy
        regression = is_regression(group.iloc[0])
        factor, unit = (MAE_POINTS[0], "MAE points") if regression else (PERCENT[0], "%")
        fig = _figure(11 if has_imbalance else 5.5, 4.2)
        ax_phi, ax_imb = fig.subplots(1, 2) if has_imbalance else (fig.subplots(1, 1), None)
        epochs = stats["epoch"]  # as in history.csv (0-based)
        modalities = [c[len("val/shapley/"):-len(".mean")] for c in stats.columns
                      if c.startswith("val/shapley/") and c.endswith(".mean")]
        panels = [(ax_phi, [(f"val/shapley/{m}", f"φ {m}") for m in modalities])]
        panels += [(ax_imb, [("val/imbalance", "imbalance")])] if has_imbalance else []
        for ax, names in panels:
            for col, label in names:
                if f"{col}.mean" not in stats:
                    continue
                mean, std = factor * stats[f"{col}.mean"], factor * stats[f"{col}.std"].fillna(0)
                line, = ax.plot(epochs, mean, "o-", ms=3, label=label)
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if epochs.nunique() == 1:  # one epoch: the locator would tick a ±0.05 range around it
                ax.set_xticks([int(epochs.iloc[0])])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax_phi.set_ylabel(f"validation Shapley value φ ({unit})")
        if has_imbalance:
            ax_imb.set_ylabel(f"validation imbalance ({unit})")
        # wrapped to the figure: the one-panel figure of a unimodal run is half as wide
        fig.suptitle(textwrap.fill(f"Training dynamics: {what} (mean ± std over {over})", 110 if has_imbalance else 55))
        name = "_".join(_safe_name(p) for p in (dataset, method, variant) if p)
        file = out / f"dynamics_{name}.png"
        fig.savefig(file, dpi=120)
        written.append(file)
    return written


# ------------------------------------------------------------------------------------------------- all


def write_studies(df: pd.DataFrame, summary: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Every study the runs support: `benchmark` ({md, csv, tex} or None), `balance_curves` ({method: png}),
    `dynamics` ([png]) and `markdown`, the sections to append to summary.md."""
    families = method_families(df)
    lines: list[str] = []

    left_out = studies_left_out(summary, families)
    if left_out:
        log.info("left out of the studies, without a completed run: %s", "; ".join(left_out))
        lines += ["", "## Studies", "", "Left out of the benchmark, the balance curves and the training dynamics, "
                  "without a completed run: " + "; ".join(left_out) + "."]
    table = benchmark_table(summary, families)
    benchmark = write_benchmark(table, out) if table is not None else None
    if benchmark:
        lines += ["", "## Benchmark", "", f"The benchmark table (methods by family): `{benchmark['md'].name}`, "
                  f"`{benchmark['csv'].name}`, `{benchmark['tex'].name}`."]
        lines += [f"Note: {n}." for n in table.attrs.get("notes") or []]

    curves = find_balance_curves(summary, families)
    by_method: dict[str, list[BalanceCurve]] = {}
    for c in curves:
        by_method.setdefault(c.method, []).append(c)
    curve_files = {m: plot_balance_curves(cs, out / f"balance_curve_{_safe_name(m)}.png")
                   for m, cs in by_method.items()}
    if curves:
        lines += _balance_markdown(curves, curve_files)

    notes: list[str] = []
    dynamics = write_dynamics(df, out, notes)
    if dynamics or notes:  # a damaged history.csv is named even when no plot is left
        lines += ["", "## Training dynamics"]
        if dynamics:
            lines += ["", "Per-epoch validation φ per modality and imbalance (mean ± std over seeds):", ""]
            lines += [f"- `{f.name}`" for f in dynamics]
        lines += ["", *(f"Note: {n}." for n in notes)] if notes else []
    return {"benchmark": benchmark, "balance_curves": curve_files, "dynamics": dynamics,
            "markdown": "\n".join(lines) + "\n" if lines else ""}
