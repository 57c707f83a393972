"""`mmbalance report DIR...`: collect run folders into runs.csv, summary.csv, summary.md and a plot.

Reads only each run's `metrics.json` (see DESIGN.md, "Results contract"), so partial sweeps, re-runs
and single runs merge freely. Runs group by (dataset, method, variant) (`analysis/runs.py` reads them and
names the variants). Kept free of torch so the command starts fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmbalance.analysis.runs import (
    DASH, FORCED, GROUP_KEYS, STATUSES, counted, format_pm, is_regression, load_runs, order_key, output_folder,
    task_dataset, value_scale, with_count,
)
from mmbalance.analysis.studies import write_studies
from mmbalance.engine.run_folder import RunFolder
from mmbalance.errors import UserError

__all__ = ["load_runs", "summarize", "write_report", "format_runs_table", "main"]

log = logging.getLogger(__name__)

# train.py writes "running" at start, then "completed", "failed" or "interrupted" (Ctrl-C); a run left "running"
# is in progress or was killed without a trace (out of memory, a lost node). Each is counted on its own because
# a crash, a deliberate stop and a run still going call for different reactions. "unknown" is any other status (or
# none, or "completed" without metrics: load_runs reads them so), "forced" a completed run that resume=force made of
# another run's folder (its record names settings its results were not trained with), "unreadable" a metrics.json
# the report cannot read.
NOT_COMPLETED_STATUSES = ("failed", "interrupted", "running", "unknown", FORCED, "unreadable")
NOT_COMPLETED_IN_GROUPS = ("failed", "interrupted", "running", "unknown", FORCED)  # an unreadable run has no group


def _status_class(status: str) -> str:
    return status if status in STATUSES or status in NOT_COMPLETED_STATUSES else "unknown"


def _status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """{completed, failed, interrupted, running, unreadable: count}."""
    counts = dict.fromkeys(("completed", *NOT_COMPLETED_STATUSES), 0)
    for s in statuses:
        counts[_status_class(str(s))] += 1
    return counts


def _not_completed_phrase(counts: dict[str, int]) -> str:
    """"1 failed, 2 running": the non-zero counts of every status but completed."""
    return ", ".join(f"{counts[s]} {s}" for s in NOT_COMPLETED_STATUSES if counts.get(s))


# regression runs (dataset.task=regression; metrics/regression.py): their extra columns, and the scale of those
# that are not percentages (factor, digits)
REGRESSION_COLUMNS = [("MAE", "test/mae"), ("corr", "test/corr"), ("acc-2 ≥0", "test/acc2_nonneg"),
                      ("F1 ≥0", "test/f1_nonneg"), ("acc-2 ≠0", "test/acc2_nonzero"),
                      ("F1 ≠0", "test/f1_nonzero"), ("acc-7", "test/acc7")]
REGRESSION_SCALE = {"test/mae": (1.0, 3), "test/corr": (1.0, 3)}
REGRESSION_NOTE = ("Regression runs (dataset.task=regression): MAE and corr (Pearson r) as numbers; acc-2 ≥0 "
                   "(non-negative vs negative, every sample; also their test acc and macro-F1), acc-2 ≠0 (zero "
                   "scores left out, positive vs negative), weighted F1 and acc-7 in %; their φ and imbalance are "
                   "in MAE points (the Shapley value is v = −MAE), not in %.")


# ------------------------------------------------------------------------------------------ summarizing


def _metric_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.attrs.get("metrics", []) if c in df.columns]
    if cols:
        return cols
    # A frame without attrs (read back from runs.csv): every numeric column but seed and wall time.
    return [c for c in df.columns if c not in ("seed", "wall_time_s") and pd.api.types.is_numeric_dtype(df[c])]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, variant): n completed, n_failed, n_interrupted, n_running, n_unknown, n_forced,
    n_repeated,
    seeds, context (the variant's settings outside the method's own) and `<metric>.mean/.std/.n`.

    Statistics use completed runs only, each (variant, seed) once: `n_repeated` counts the completed runs left
    out as repeats; std is the sample std (ddof=1), NaN when n < 2. Runs without a method (unreadable ones, a
    metrics.json without choices) belong to no group.
    """
    metrics = _metric_columns(df)
    runs = df[df["method"].notna() & (df["method"] != "")]
    completed = runs[counted(runs)]
    rows = []
    for (dataset, method, variant), group in runs.groupby(GROUP_KEYS, sort=False, dropna=False):
        done = completed.loc[completed.index.intersection(group.index)]
        seeds = sorted({int(s) for s in done["seed"].dropna()}) if "seed" in done else []
        counts = _status_counts(group["status"])
        row: dict[str, Any] = {
            "dataset": dataset, "method": method, "variant": variant, "n": len(done),
            **{f"n_{s}": counts[s] for s in NOT_COMPLETED_IN_GROUPS},
            "n_repeated": counts["completed"] - len(done),
            "seeds": " ".join(map(str, seeds)),
            # the row's settings outside its method's own that differ between rows: a reference must share them
            "context": str(group["context"].iloc[0]) if "context" in group and pd.notna(group["context"].iloc[0])
            else "",
        }
        for m in metrics:
            values = done[m].dropna()
            row[f"{m}.mean"] = values.mean() if len(values) else math.nan
            row[f"{m}.std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{m}.n"] = len(values)
        rows.append(row)
    base = ["dataset", "method", "variant", "n", *(f"n_{s}" for s in NOT_COMPLETED_IN_GROUPS), "n_repeated", "seeds",
            "context"]
    cols = base + [f"{m}.{s}" for m in metrics for s in ("mean", "std", "n")]
    out = pd.DataFrame(rows, columns=cols)
    if len(out):
        order = sorted(range(len(out)), key=lambda i: order_key(*out.loc[i, ["dataset", "method", "variant"]]))
        out = out.iloc[order].reset_index(drop=True)
    out.attrs["metrics"] = metrics
    return out


# ---------------------------------------------------------------------------------------------- output

FLOP_UNITS = [(1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP")]


def _flop_unit(values: Iterable[float]) -> tuple[float, str]:
    finite = [abs(v) for v in values if v is not None and np.isfinite(v)]
    top = max(finite, default=0.0)
    for scale, name in FLOP_UNITS:
        if top >= scale:
            return scale, name
    return 1.0, "FLOP"


def _modalities(columns: Iterable[str], prefix: str) -> list[str]:
    return sorted({c[len(prefix):] for c in columns if c.startswith(prefix) and "/" not in c[len(prefix):]})


def _summary_markdown(summary: pd.DataFrame, df: pd.DataFrame) -> str:
    lines = ["# mmbalance report", ""]
    counts = _status_counts(df["status"])
    others = _not_completed_phrase(counts)
    repeats = _repeats(df)
    repeated = f" ({len(repeats)} of them repeats, not counted)" if len(repeats) else ""
    lines.append(f"{len(df)} run(s): {counts['completed']} completed{repeated}" + (f", {others}" if others else "")
                 + ".")
    if len(repeats):
        lines += ["", f"**Warning:** {len(repeats)} completed run(s) repeat the variant and seed of another run (a "
                  "copied folder, the same config run twice): they are not independent samples, so each variant "
                  "and seed counts once, the first by path; see \"Repeated runs\" below."]
    if counts[FORCED]:
        lines += ["", f"**Warning:** {counts[FORCED]} run(s) were made by `resume=force` from another run's folder: "
                  "their metrics.json records settings their results were not trained with (another run's "
                  "checkpoint), so they are not counted; see \"Runs not completed\" below."]
    for dataset, names in (df.attrs.get("setting_differences") or {}).items():
        lines += ["", f"**Warning:** the runs on {dataset} differ in {', '.join(names)}, outside their methods' own "
                  "settings: the methods were not trained alike. Every row names these settings in its variant, "
                  "and a row is compared only with a baseline of the same settings (none where no baseline has "
                  "them)."]
    for line in df.attrs.get("data_conflicts") or []:
        lines += ["", f"**Warning:** {line}. They are not averaged together: each data is a variant of its own "
                  "(`data=A`, `data=B`, ...)."]
    lines.append("")
    lines.append("Values are mean ± sample std (ddof=1) over completed runs, each seed once; n counts them "
                 "(failed, interrupted, running, unknown, forced and repeated runs in brackets). Accuracy, macro-F1, "
                 f"φ (Shapley share) and imbalance in %; {DASH} = not available (not measured; std needs n ≥ 2); "
                 "(n=k) after a value: only k of the n runs recorded it.")
    if "test/mae.mean" in summary and summary["test/mae.mean"].notna().any():
        lines.append("")
        lines.append(REGRESSION_NOTE)
    # a dataset's regression runs get a table of their own: their φ and imbalance are MAE points, not % (value_scale)
    # a Series, not a list: a one-row summary's one-element list would be read as a list of keys (a tuple key)
    tables = pd.Series([task_dataset(row) for _, row in summary.iterrows()], index=summary.index)
    for dataset, table in summary.groupby(tables, sort=False):
        metric_cols = [c[: -len(".mean")] for c in table.columns if c.endswith(".mean")
                       and table[c].notna().any()]
        acc_mods = _modalities(metric_cols, "test/acc/")
        phi_mods = _modalities(metric_cols, "test/shapley/")
        mae_mods = _modalities(metric_cols, "test/mae/")  # regression runs
        regression = [(name, metric) for name, metric in REGRESSION_COLUMNS if metric in metric_cols]
        has_flops = "flops/train_total" in metric_cols
        scale, unit = _flop_unit(table["flops/train_total.mean"]) if has_flops else (1.0, "")

        header = ["method", "variant", "n", "test acc", "macro-F1"] + [name for name, _ in regression]
        header += [f"acc {m}" for m in acc_mods] + [f"MAE {m}" for m in mae_mods]
        header += [f"φ {m}" for m in phi_mods] + ["imbalance"]
        if has_flops:
            header.append(f"train FLOPs ({unit})")
        lines += ["", f"## {dataset}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]

        def cell(row, metric, factor=100.0, digits=1):
            if f"{metric}.mean" not in row:
                return DASH
            text = format_pm(row[f"{metric}.mean"], row[f"{metric}.std"], factor, digits)
            return with_count(text, row[f"{metric}.n"], row["n"])  # fewer runs than n (a FLOP count not measured)

        for _, row in table.iterrows():
            others = ", ".join(f"+{row[f'n_{s}']} {s}" for s in (*NOT_COMPLETED_IN_GROUPS, "repeated")
                               if row[f"n_{s}"])
            n = str(row["n"]) + (f" ({others})" if others else "")
            cells = [str(row["method"]), str(row["variant"]) or DASH, n,
                     cell(row, "test/acc"), cell(row, "test/macro_f1")]
            cells += [cell(row, metric, *REGRESSION_SCALE.get(metric, (100.0, 1))) for _, metric in regression]
            cells += [cell(row, f"test/acc/{m}") for m in acc_mods]
            cells += [cell(row, f"test/mae/{m}", 1.0, 3) for m in mae_mods]
            phi_scale = value_scale(row)  # a regression run's φ and imbalance are MAE points (v = -MAE), not %
            cells += [cell(row, f"test/shapley/{m}", *phi_scale) for m in phi_mods]
            cells.append(cell(row, "test/imbalance", *phi_scale))
            if has_flops:
                cells.append(cell(row, "flops/train_total", 1.0 / scale, 2))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    problems = _not_completed(df)
    if len(problems):
        lines += ["", "## Runs not completed", ""]
        for _, r in problems.iterrows():
            what = f"{r['method']} {r['variant']}".strip() or "?"
            seed = "" if pd.isna(r["seed"]) else f" seed={r['seed']}"
            lines.append(f"- {r['status']}: `{r['run_dir']}` ({what}{seed}): {_problem_reason(r)}")
    if len(repeats):
        lines += ["", "## Repeated runs (not counted)", ""]
        for _, r in repeats.iterrows():
            what = f"{r['method']} {r['variant']}".strip()
            lines.append(f"- `{r['run_dir']}` ({what} seed={r['seed']}): repeats `{r['repeat_of']}`")
    return "\n".join(lines) + "\n"


def _repeats(df: pd.DataFrame) -> pd.DataFrame:
    """The completed runs left out of the statistics as repeats of another run's variant and seed."""
    return df[(df["status"] == "completed") & ~counted(df)]


def _not_completed(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that did not complete, grouped by status (failed, interrupted, running, unknown, forced,
    unreadable)."""
    problems = df[df["status"] != "completed"]
    order = {s: i for i, s in enumerate(NOT_COMPLETED_STATUSES)}
    rank = problems["status"].map(lambda s: order[_status_class(str(s))])
    return problems.loc[rank.sort_values(kind="stable").index]


def _problem_reason(row: pd.Series) -> str:
    if isinstance(row["error"], str) and row["error"]:  # a missing error may read back as None or NaN
        return row["error"]
    if row["status"] == "running":  # train.py records every exit it sees, so the process vanished or lives on
        holder = RunFolder(Path(row["run_dir"])).holder()
        if holder is not None:
            return f"still running ({holder} holds the folder)"
        return ("no end recorded and no process on this machine holds the folder: killed without a trace (kill -9, "
                "out of memory, a lost node), or running on another machine; re-running its command resumes it")
    return "no error recorded"


LABELLED_POINTS = 5  # acc_vs_imbalance.png labels points beside them up to this many groups, then in a legend


def _plot(summary: pd.DataFrame, file: Path) -> Path | None:
    if "test/imbalance.mean" not in summary or "test/acc.mean" not in summary:
        return None
    points = summary[summary["test/imbalance.mean"].notna() & summary["test/acc.mean"].notna()]
    # a regression run's imbalance is in MAE points: not on the accuracy-share axis
    points = points[[not is_regression(row) for _, row in points.iterrows()]]
    if points.empty:
        return None
    acc_vs_imbalance_figure(points).savefig(file, dpi=150)
    return file


def _crowded(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two points are so close that labels beside them would overlap: within a fifth of the x range and a
    twelfth of the y range of each other (a label is wide and one line high)."""
    span_x, span_y = max(np.ptp(x), 1e-9), max(np.ptp(y), 1e-9)
    return any(abs(x[i] - x[j]) < span_x / 5 and abs(y[i] - y[j]) < span_y / 12
               for i in range(len(x)) for j in range(i + 1, len(x)))


def acc_vs_imbalance_figure(points: pd.DataFrame):
    """Test accuracy against imbalance, one point (mean ± std over seeds) per summary row."""
    # No pyplot: it would set a global backend inside the user's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Up to LABELLED_POINTS groups are labelled beside their point; more labels, or points close enough for their
    # labels to overlap, put each group's label into a legend beside the axes (its own colour and marker).
    in_legend = len(points) > LABELLED_POINTS or _crowded(100 * points["test/imbalance.mean"].to_numpy(),
                                                          100 * points["test/acc.mean"].to_numpy())
    fig = Figure(figsize=(11 if in_legend else 7, max(5, 0.22 * len(points)) if in_legend else 5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    several = points["dataset"].nunique() > 1
    markers = "osD^vP*Xh<>p"
    for k, (_, row) in enumerate(points.iterrows()):
        x, y = 100 * row["test/imbalance.mean"], 100 * row["test/acc.mean"]
        xerr = 100 * np.nan_to_num(row["test/imbalance.std"])
        yerr = 100 * np.nan_to_num(row["test/acc.std"])
        label = " ".join(str(p) for p in ([row["dataset"]] if several else []) + [row["method"], row["variant"]] if p)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=markers[k // 10 % len(markers)] if in_legend else "o",
                    color=f"C{k % 10}", capsize=3, label=label)
        if not in_legend:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if in_legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncols=1 + len(points) // 40)
    ax.set_xlabel("test imbalance (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs. modality imbalance (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    return fig


def write_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write runs.csv, summary.csv, summary.md, acc_vs_imbalance.png and the studies into `out_dir`.

    The studies (`mmbalance.analysis.studies`) are written when the runs support them: the benchmark
    table (benchmark.md/.csv/.tex), a relative-balance curve per method swept over one knob
    (balance_curve_<method>.png, balance points in summary.md) and the training dynamics per group
    (dynamics_<dataset>_<method>[_<variant>].png).

    `out_dir` defaults to the first path when it is a folder, else the folder it is in (`runs.output_folder`). The
    files written are recorded in `out_dir`/report_manifest.json; the files an earlier report recorded there that
    this one does not write again are removed (only while unchanged since; without a manifest, files named like a
    report's are left, with a warning and a section in summary.md). Returns the
    written paths (`runs_csv`, `summary_csv`, `summary_md`, `plot`: None when no group has an
    imbalance; `benchmark`: {md, csv, tex} or None; `balance_curves`: {method: png}; `dynamics`: [png];
    `manifest`), the removed files (`removed`), the markdown text (`markdown`), the runs frame (`runs`) and the
    summary (`summary`).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no run folders given")
    df = load_runs(paths)
    summary = summarize(df)
    out = output_folder(paths, out_dir)

    files = {"runs_csv": out / "runs.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md"}
    df.to_csv(files["runs_csv"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    studies = write_studies(df, summary, out)
    plot = _plot(summary, out / "acc_vs_imbalance.png")
    if plot is None:
        log.info("no group has test/imbalance: acc_vs_imbalance.png not written")
    written = [*files.values(), *([plot] if plot is not None else []), *(studies["benchmark"] or {}).values(),
               *studies["balance_curves"].values(), *studies["dynamics"]]
    removed, left = _tidy_earlier_report(out, written)
    markdown = _summary_markdown(summary, df) + studies.pop("markdown")
    if left:
        markdown += ("\n## Files of an earlier report\n\n" + "\n".join(f"- {line}" for line in left) + "\n")
    files["summary_md"].write_text(markdown, encoding="utf-8")
    manifest = _write_manifest(out, written)
    return {**files, "plot": plot, **studies, "manifest": manifest, "removed": removed, "markdown": markdown,
            "runs": df, "summary": summary}


# What a report writes into its folder, recorded there (MANIFEST: {name: sha256}) so that the next report into the
# same folder removes what this one wrote and it does not write again (a dynamics plot of a group no longer given,
# a benchmark table no longer supported), and never anything else: a file is removed only while it is the one the
# report wrote (same content). A folder without a manifest (reports before it existed) keeps every file; those
# named like a report's (REPORT_NAMES) that this report did not write are warned about as an earlier report's.
MANIFEST = "report_manifest.json"
REPORT_NAMES = re.compile(r"runs\.csv|summary\.(csv|md)|acc_vs_imbalance\.png|benchmark\.(md|csv|tex)"
                          r"|balance_curve_.+\.png|dynamics_.+\.png")


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _read_manifest(out: Path) -> dict[str, str] | None:
    """{file name: sha256} of the report last written into `out`; None without a (readable) manifest."""
    file = out / MANIFEST
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        listed = data["files"]
        if not isinstance(listed, dict):
            raise ValueError("'files' is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: not read (%s); no file of an earlier report is removed", file, e)
        return None
    # only plain names of files in `out` itself: a manifest never reaches outside its folder
    return {str(name): str(digest) for name, digest in listed.items()
            if isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..", MANIFEST)}


def _tidy_earlier_report(out: Path, written: list[Path]) -> tuple[list[Path], list[str]]:
    """Remove the files the previous report into `out` wrote (its manifest) that this one did not write again and
    that are still as it wrote them; returns (the removed files, one line per file left that looks like an earlier
    report's: changed since it was written, or named like a report's file in a folder without a manifest)."""
    names = {f.name for f in written} | {MANIFEST}
    earlier = _read_manifest(out)
    removed: list[Path] = []
    left: list[str] = []
    if earlier is not None:
        for name, digest in sorted(earlier.items()):
            file = out / name
            if name in names or file.is_symlink() or not file.is_file():
                continue
            try:
                if _digest(file) != digest:  # not the file that report wrote any more
                    left.append(f"`{name}`: written by an earlier report, not by this one, and changed since: left "
                                "as it is")
                    continue
                file.unlink()
            except OSError as e:
                left.append(f"`{name}`: written by an earlier report, not by this one, and could not be removed "
                            f"({e.strerror or e})")
                continue
            removed.append(file)
        if removed:
            log.info("removed %d file(s) of the earlier report in %s that this report does not write: %s",
                     len(removed), out, ", ".join(f.name for f in removed))
    else:
        stale = sorted(f.name for f in out.iterdir()
                       if f.name not in names and REPORT_NAMES.fullmatch(f.name) and f.is_file())
        left += [f"`{name}`: from an earlier report (not written by this one; no {MANIFEST} records it, so it is "
                 "left as it is)" for name in stale]
    if left:
        log.warning("%s holds %d file(s) of an earlier report that this report did not write; they are not part of "
                    "it: %s", out, len(left), "; ".join(line.replace("`", "") for line in left))
    return removed, left


def _write_manifest(out: Path, written: list[Path]) -> Path:
    """Record the files this report wrote into `out` (MANIFEST), replaced whole (a temporary file, then renamed)."""
    file = out / MANIFEST
    data = {"written_by": "mmbalance report", "files": {f.name: _digest(f) for f in written}}
    tmp = file.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, file)
    return file


def _text_table(header: list[str], rows: list[list[str]], n_left: int) -> str:
    """Columns before `n_left` are text (left-aligned), the rest numbers (right-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n_left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def format_runs_table(df: pd.DataFrame) -> str:
    """Plain-text table of the counted completed runs (one line each), then the others by status: failed,
    interrupted, running, unknown, forced, unreadable; then the repeats the statistics leave out."""
    done = df[counted(df)].copy()
    if len(done):
        order = sorted(done.index, key=lambda i: (
            *order_key(done.at[i, "dataset"], done.at[i, "method"], done.at[i, "variant"]),
            -1 if pd.isna(done.at[i, "seed"]) else int(done.at[i, "seed"])))
        done = done.loc[order]
    cols = [c for c in done.columns if done[c].notna().any()] if len(done) else []
    acc_mods = _modalities(cols, "test/acc/")
    phi_mods = _modalities(cols, "test/shapley/")
    scale, unit = _flop_unit(done["flops/train_total"]) if "flops/train_total" in cols else (1.0, "")
    several = done["dataset"].nunique() > 1

    def pct(row, c):
        return f"{100 * row[c]:.1f}" if c in row and pd.notna(row[c]) else DASH

    regression = "test/mae" in cols  # regression runs: MAE and corr; their φ and imbalance in MAE points

    def phi(row, c):
        factor, digits = value_scale(row)
        return f"{factor * row[c]:.{digits}f}" if c in row and pd.notna(row[c]) else DASH

    def num(row, c):
        return f"{row[c]:.3f}" if c in row and pd.notna(row[c]) else DASH

    header = (["dataset"] if several else []) + ["method", "variant", "seed", "acc%"]
    header += ["mae", "corr"] if regression else []
    header += [f"acc/{m}%" for m in acc_mods] + [f"φ/{m}%" for m in phi_mods] + ["imb%"]
    if unit:
        header.append(f"train {unit}")
    rows = []
    for _, r in done.iterrows():
        cells = ([str(r["dataset"])] if several else []) + [
            str(r["method"]), str(r["variant"]) or DASH, DASH if pd.isna(r["seed"]) else str(r["seed"]),
            pct(r, "test/acc")]
        cells += [num(r, "test/mae"), num(r, "test/corr")] if regression else []
        cells += [pct(r, f"test/acc/{m}") for m in acc_mods] + [phi(r, f"test/shapley/{m}") for m in phi_mods]
        cells.append(phi(r, "test/imbalance"))
        if unit:
            v = r["flops/train_total"]
            cells.append(f"{v / scale:.2f}" if pd.notna(v) else DASH)
        rows.append(cells)
    text = _text_table(header, rows, n_left=header.index("seed")) if rows else "(no completed runs)"
    if regression and rows:
        text += "\n(regression runs: acc = acc-2 non-negative; φ and imbalance in MAE points, not %)"

    problems = _not_completed(df)
    if len(problems):
        text += f"\n\n{len(problems)} run(s) not completed ({_not_completed_phrase(_status_counts(problems['status']))}):"
        for _, r in problems.iterrows():
            what = " ".join(str(x) for x in (r["method"], r["variant"]) if x) or "?"
            seed = "" if pd.isna(r["seed"]) else f" seed={r['seed']}"
            text += f"\n  {r['status']}: {r['run_dir']} ({what}{seed}): {_problem_reason(r)}"
    repeats = _repeats(df)
    if len(repeats):
        text += f"\n\n{len(repeats)} completed run(s) repeat the variant and seed of a run above (not counted):"
        for _, r in repeats.iterrows():
            what = " ".join(str(x) for x in (r["method"], r["variant"]) if x)
            text += f"\n  {r['run_dir']} ({what} seed={r['seed']}): repeats {r['repeat_of']}"
    return text


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`mmbalance report DIR [DIR ...] [--out OUT] [--runs]`."""
    parser = argparse.ArgumentParser(
        prog="mmbalance report",
        description="Summarise run folders (single runs, sweeps, several sweeps) into runs.csv, "
                    "summary.csv, summary.md and acc_vs_imbalance.png, plus the studies the runs support: "
                    "benchmark.md/.csv/.tex, balance_curve_<method>.png, dynamics_<dataset>_<method>[_<variant>].png.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or folders holding runs")
    parser.add_argument("--out", metavar="OUT",
                        help="where to write the report (default: the first DIR; a metrics.json: its run folder)")
    parser.add_argument("--runs", action="store_true", help="also print one line per run")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.dirs, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    if args.runs:
        print(format_runs_table(result["runs"]))
        print()
    written = [result[k] for k in ("runs_csv", "summary_csv", "summary_md", "plot") if result[k] is not None]
    written += list((result["benchmark"] or {}).values()) + list(result["balance_curves"].values())
    written += result["dynamics"]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if result["removed"]:
        print("removed the earlier report's " + ", ".join(str(p) for p in result["removed"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
