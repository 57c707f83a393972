"""`mmbalance gap DIR...`: the modality-gap analysis (the BalanceBenchmark paper's Figure 2).

For every modality: how good is its encoder *inside* a jointly trained model, against the same encoder
trained *alone* (the `unimodal` run of that modality, same dataset and seed; a pair whose training recipes differ
in optimizer, schedule, epochs, batch size, backbone or masking is warned about and named in the output)? Both
are measured the same way: a linear probe (a fresh `nn.Linear` on the frozen, standardised pooled features,
fitted with full-batch L-BFGS and a small L2 penalty on the training split, seeded) evaluated on the test split.
The unimodal run's own test accuracy (its trained head) is reported beside it.

The runs come from metrics.json (config, seed, status) and checkpoints/best.pt (last.pt when there is no
best.pt); each model is rebuilt from its resolved config exactly as `mmbalance.train` builds it.
Methods that replace the model in `setup` (Greedy's MMTM blocks: intermediate fusion, so one modality's
features depend on the other's input) are refused with a clear error; `--methods` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmbalance.analysis.runs import DASH, METHOD_ORDER, flatten_config, load_runs, natural_key, output_folder
from mmbalance.errors import UserError

__all__ = ["ProbeSettings", "ProbeResult", "linear_probe", "pair_runs", "probe_run", "write_gap_report", "main"]

log = logging.getLogger(__name__)

UNIMODAL = "unimodal"
CHECKPOINTS = ("best.pt", "last.pt")
# The training recipe: pairing does not require it to match (the documented rule is dataset config and seed), but
# a gap between encoders trained differently (2 epochs of SGD against 1 of Adam) is not the modality's alone.
RECIPE_KEYS = ("optimizer", "scheduler", "trainer.epochs", "trainer.batch_size", "backbone", "masking")


# ----------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeSettings:
    """How the linear probe is fitted; the same for every run, so probes compare like for like."""

    steps: int = 100  # L-BFGS iterations (full batch)
    weight_decay: float = 1e-4  # L2 penalty on the probe's weights (keeps separable data well-posed)
    seed: int = 0  # the probe's initialisation
    batch_size: int = 256  # feature extraction only
    device: str = "cpu"


@dataclass(frozen=True)
class ProbeResult:
    train_acc: float
    test_acc: float


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int,
                 settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    """Fit a fresh linear classifier on frozen features (cross-entropy, full-batch L-BFGS) and test it.

    Features are standardised with the training split's mean and std (a linear probe stays linear; it only
    makes the optimisation independent of each encoder's feature scale).
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(settings.device)
    tx = torch.as_tensor(train_x, dtype=torch.float32, device=device).flatten(1)
    vx = torch.as_tensor(test_x, dtype=torch.float32, device=device).flatten(1)
    ty = torch.as_tensor(train_y, dtype=torch.long, device=device)
    vy = torch.as_tensor(test_y, dtype=torch.long, device=device)
    if len(tx) == 0 or len(vx) == 0:
        raise UserError("linear probe: the training or test split is empty")
    mean, std = tx.mean(0, keepdim=True), tx.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    tx, vx = (tx - mean) / std, (vx - mean) / std

    g = torch.Generator().manual_seed(settings.seed)
    bound = 1.0 / math.sqrt(tx.shape[1])
    weight = ((torch.rand(num_classes, tx.shape[1], generator=g) * 2 - 1) * bound).to(device).requires_grad_()
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=settings.steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(tx @ weight.T + bias, ty) + settings.weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = (tx @ weight.T + bias).argmax(1).eq(ty).float().mean().item()
        test_acc = (vx @ weight.T + bias).argmax(1).eq(vy).float().mean().item()
    return ProbeResult(train_acc, test_acc)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    run_dir: Path
    dataset: str  # the dataset choice (e.g. digits_av)
    dataset_key: str  # the resolved dataset config, canonical: runs pair only on identical data
    method: str
    variant: str
    seed: int | None
    config: dict
    metrics: dict
    modalities: list[str]
    backbone_key: str

    @property
    def unimodal_modality(self) -> str | None:
        if self.method != UNIMODAL:
            return None
        return (self.config.get("method") or {}).get("modality") or (self.modalities or [None])[0]

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _load(paths: Sequence[Path]) -> tuple[list[RunInfo], list[str]]:
    """Completed runs, and one line per run left out (not completed, unreadable)."""
    df = load_runs(paths)  # UserError for a folder without any metrics.json
    runs, skipped = [], []
    for _, row in df.iterrows():
        run_dir = Path(row["run_dir"])
        if row["status"] != "completed":
            skipped.append(f"{row['status']}: {run_dir} ({row['method'] or '?'})")
            continue
        data = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("dataset"), dict):
            skipped.append(f"no resolved config: {run_dir}")
            continue
        seed = None if pd.isna(row["seed"]) else int(row["seed"])
        runs.append(RunInfo(
            run_dir=run_dir, dataset=str(row["dataset"]), dataset_key=_canonical(config["dataset"]),
            method=str(row["method"]), variant=str(row["variant"] or ""), seed=seed, config=config,
            metrics=data.get("metrics") or {}, modalities=list(data.get("modalities") or []),
            backbone_key=_canonical([config.get("backbone"), config.get("masking")]),
        ))
    return runs, skipped


@dataclass
class Pair:
    joint: RunInfo
    modality: str
    alone: RunInfo
    recipe_differences: list[str] = field(default_factory=list)  # the keys under RECIPE_KEYS whose values differ


def _recipe_differences(joint: dict, alone: dict) -> list[str]:
    flat = [{k: v for k, v in flatten_config(c).items() if any(k == r or k.startswith(r + ".") for r in RECIPE_KEYS)}
            for c in (joint, alone)]
    keys = dict.fromkeys([*flat[0], *flat[1]])
    return [k for k in keys if _canonical(flat[0].get(k, "<absent>")) != _canonical(flat[1].get(k, "<absent>"))]


def pair_runs(runs: list[RunInfo], methods: Iterable[str] | None = None) -> list[Pair]:
    """Pair every joint run's modalities with the unimodal run of that modality, same dataset and seed.

    Among several matching unimodal runs, the one with the joint run's backbone and masking wins; a
    remaining tie is an error (the pairing would be a guess). Every problem is reported together. A pair
    whose training recipes differ (RECIPE_KEYS) is kept, warned about and names the keys (`recipe_differences`).
    """
    wanted = set(methods) if methods else None
    joint = [r for r in runs if r.method != UNIMODAL and (wanted is None or r.method in wanted)]
    alone = [r for r in runs if r.method == UNIMODAL]
    if not joint:
        found = sorted({r.method for r in runs})
        what = f" of method(s) {sorted(wanted)}" if wanted else ""
        raise UserError(f"no completed jointly trained run{what} found (methods found: {found or 'none'}); the "
                        "modality-gap analysis needs a joint run (any method) and a unimodal run per modality")
    pairs, problems = [], []
    for j in sorted(joint, key=lambda r: (r.dataset, METHOD_ORDER.get(r.method, 9), r.method,
                                          natural_key(r.variant), -1 if r.seed is None else r.seed)):
        mods = j.modalities or list((j.config.get("dataset") or {}).get("modalities") or [])
        for m in mods:
            cands = [a for a in alone if a.unimodal_modality == m and a.dataset == j.dataset
                     and a.dataset_key == j.dataset_key and a.seed == j.seed]
            if not cands:
                have = sorted({f"{a.unimodal_modality} seed {a.seed}" for a in alone if a.dataset == j.dataset})
                problems.append(
                    f"{j.run_dir} ({j.label}, dataset {j.dataset}, seed {j.seed}): no completed unimodal run of "
                    f"modality {m!r} with the same dataset config and seed {j.seed} (unimodal runs found for "
                    f"{j.dataset}: {', '.join(have) or 'none'}); train one with "
                    f"`python -m mmbalance dataset={j.dataset} method=unimodal method.modality={m} seed={j.seed}`")
                continue
            cands = [a for a in cands if a.backbone_key == j.backbone_key] or cands
            if len(cands) > 1:
                problems.append(f"{j.run_dir} ({j.label}, seed {j.seed}): {len(cands)} unimodal runs of modality "
                                f"{m!r} match ({', '.join(str(a.run_dir) for a in cands)}); give DIRs that hold one "
                                f"per modality and seed")
                continue
            differ = _recipe_differences(j.config, cands[0].config)
            if differ:
                log.warning("%s (%s) and its unimodal run of %r, %s, differ in %s: the gap compares different "
                            "training recipes", j.run_dir, j.label, m, cands[0].run_dir, ", ".join(differ))
            pairs.append(Pair(j, m, cands[0], differ))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"cannot pair the joint runs with unimodal runs ({len(problems)} problem(s)):\n{lines}")
    return pairs


# ------------------------------------------------------------------------------------- probing a run


def _checkpoint(run_dir: Path) -> Path:
    for name in CHECKPOINTS:
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise UserError(f"{run_dir}: no checkpoint (expected checkpoints/best.pt or checkpoints/last.pt); the probe "
                    "needs the trained encoders")


class _Probing:
    """Rebuilds runs' models, extracts their features once per run and probes them; caches the data splits."""

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self._splits: dict[tuple, Any] = {}
        self._results: dict[Path, dict[str, ProbeResult]] = {}

    def splits(self, cfg, key):
        from mmbalance.config import build
        from mmbalance.engine.seeding import seed_everything

        if key not in self._splits:
            seed_everything(cfg.seed)  # as training does before building the data
            self._splits[key] = build(cfg.dataset)
        return self._splits[key]

    def probe(self, run: RunInfo) -> dict[str, ProbeResult]:
        if run.run_dir not in self._results:
            self._results[run.run_dir] = probe_run(run, self.settings, self)
        return self._results[run.run_dir]


def _features(model, dataset, batch_size: int, device):
    import torch
    from torch.utils.data import DataLoader

    from mmbalance.data.batch import collate_batch

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    feats: dict[str, list] = {}
    labels = []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            for m, f in model.encode(batch.inputs).items():
                feats.setdefault(m, []).append(f.float().flatten(1).cpu())
            labels.append(batch.label.cpu())
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)


def probe_run(run: RunInfo, settings: ProbeSettings = ProbeSettings(), probing: _Probing | None = None
              ) -> dict[str, ProbeResult]:
    """Linear-probe accuracy of each modality's encoder of one trained run: {modality: ProbeResult}."""
    import torch
    from omegaconf import OmegaConf

    from mmbalance.config import build
    from mmbalance.engine.checkpoint import load_checkpoint
    from mmbalance.models.build import build_model

    probing = probing or _Probing(settings)
    ckpt = _checkpoint(run.run_dir)
    cfg = OmegaConf.create(run.config)
    try:
        splits = probing.splits(cfg, (run.dataset_key, cfg.get("seed")))
        method = build(cfg.method)
        modalities = method.select_modalities(list(splits.modalities))
        model = build_model({m: splits.modalities[m] for m in modalities}, cfg.backbone, splits.num_classes,
                            cfg.masking)
    except UserError as e:
        raise UserError(f"{run.run_dir}: cannot rebuild the model from its config: {e}") from None
    checkpoint = load_checkpoint(ckpt)
    recorded = run.metrics.get("best_epoch")
    if isinstance(recorded, int) and recorded >= 0 and checkpoint.get("epoch") != recorded:
        # e.g. an unfinished resume=force extension wrote it: its weights are not the ones the record tested
        raise UserError(f"{ckpt} holds the weights of epoch {checkpoint.get('epoch')}, but "
                        f"{run.run_dir / 'metrics.json'} records the results of epoch {recorded}; finish the run "
                        "(re-run its command) or leave it out of the folders given to gap")
    state = checkpoint["model"]
    expected = set(model.state_dict())
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        if extra and not missing:
            raise UserError(
                f"{run.run_dir}: method {run.method!r} replaces the model in its setup (its checkpoint has "
                f"{len(extra)} parameters more than the late-fusion model, e.g. {extra[0]!r}): intermediate fusion "
                f"(model.late_fusion=False), so one modality's features depend on the other's input and its encoder "
                f"cannot be probed alone. The modality-gap analysis supports late-fusion methods; leave this run out "
                f"(--methods) or put it in another folder")
        raise UserError(f"{run.run_dir}: {ckpt.name} does not match the model rebuilt from its config "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state)
    device = torch.device(settings.device)
    model.to(device).eval()
    train_f, train_y = _features(model, splits.train, settings.batch_size, device)
    test_f, test_y = _features(model, splits.test, settings.batch_size, device)
    return {m: linear_probe(train_f[m], train_y, test_f[m], test_y, splits.num_classes, settings)
            for m in modalities}


# --------------------------------------------------------------------------------------------- output


def _rows(pairs: list[Pair], probing: _Probing) -> pd.DataFrame:
    rows = []
    for p in pairs:
        j, a = p.joint, p.alone
        pj, pa = probing.probe(j)[p.modality], probing.probe(a)[p.modality]
        rows.append({
            "dataset": j.dataset, "method": j.method, "variant": j.variant, "seed": j.seed, "modality": p.modality,
            "probe_joint": pj.test_acc, "probe_alone": pa.test_acc, "gap": pa.test_acc - pj.test_acc,
            "alone_test_acc": _num(a.metrics.get("test/acc")),
            "branch_joint_test_acc": _num(j.metrics.get(f"test/acc/{p.modality}")),
            "joint_test_acc": _num(j.metrics.get("test/acc")),
            "probe_joint_train": pj.train_acc, "probe_alone_train": pa.train_acc,
            "joint_run": str(j.run_dir), "alone_run": str(a.run_dir),
            "recipe_differences": " ".join(p.recipe_differences),
        })
    return pd.DataFrame(rows)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


STAT_COLS = ["probe_joint", "probe_alone", "gap", "alone_test_acc", "branch_joint_test_acc"]


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, variant, modality): n, seeds, mean and sample std of each number."""
    out = []
    for (dataset, method, variant, modality), g in df.groupby(["dataset", "method", "variant", "modality"],
                                                               sort=False):
        row = {"dataset": dataset, "method": method, "variant": variant, "modality": modality, "n": len(g),
               "seeds": " ".join(str(s) for s in sorted(g["seed"].dropna().astype(int)))}
        for c in STAT_COLS:
            v = g[c].dropna()
            row[f"{c}.mean"] = v.mean() if len(v) else math.nan
            row[f"{c}.std"] = v.std(ddof=1) if len(v) > 1 else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return DASH
    return f"{100 * mean:.1f} ± " + (f"{100 * std:.1f}" if np.isfinite(std) else DASH)


def _markdown(summary: pd.DataFrame, settings: ProbeSettings, skipped: list[str], rows: pd.DataFrame) -> str:
    lines = ["# Modality gap", "",
             "Each modality's encoder inside the jointly trained model against the same encoder trained alone "
             "(the `unimodal` run, same dataset and seed), both measured by a linear probe on the frozen pooled "
             f"features (fitted on the training split: full-batch L-BFGS, {settings.steps} steps, L2 "
             f"{settings.weight_decay:g}, seed {settings.seed}; accuracy on the test split). Gap = alone − joint, "
             "per seed. *alone, own head* is the unimodal run's test accuracy; *branch in joint* is the joint "
             "model's own per-modality logits (`test/acc/<m>`). Accuracies in %, mean ± sample std over seeds.",
             ""]
    for dataset, table in summary.groupby("dataset", sort=False):
        lines += [f"## {dataset}", "",
                  "| method | variant | modality | n | probe in joint | probe alone | gap | alone, own head "
                  "| branch in joint |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for _, r in table.iterrows():
            cells = [r["method"], r["variant"] or DASH, r["modality"], str(r["n"])]
            cells += [_pm(r[f"{c}.mean"], r[f"{c}.std"]) for c in STAT_COLS]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    differ = rows[rows["recipe_differences"] != ""].drop_duplicates(["joint_run", "alone_run"])
    if len(differ):
        lines += [f"**Warning:** {len(differ)} pair(s) of a joint and a unimodal run were trained with different "
                  "recipes, so their gap is not the modality's alone:", ""]
        lines += [f"- `{r['joint_run']}` and `{r['alone_run']}` ({r['modality']}): "
                  + ", ".join(r["recipe_differences"].split()) for _, r in differ.iterrows()] + [""]
    if skipped:
        lines += [f"{len(skipped)} run(s) left out:", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(lines)


def _plot(summary: pd.DataFrame, rows: pd.DataFrame, file: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(summary["dataset"]))
    fig = Figure(figsize=(max(7.0, 2.6 * summary["modality"].nunique() + 4), 4.2 * len(datasets)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets):
        table = summary[summary["dataset"] == dataset]
        modalities = list(dict.fromkeys(table["modality"]))
        groups = list(dict.fromkeys(zip(table["method"], table["variant"])))
        width = 0.8 / (len(groups) + 1)
        x = np.arange(len(modalities))
        # alone: one bar per modality over every unimodal run any joint group was paired with (each once)
        unique = rows[rows["dataset"] == dataset].drop_duplicates("alone_run").groupby("modality")
        alone = unique[["probe_alone", "alone_test_acc"]].agg(["mean", "std"]).reindex(modalities)
        ax.bar(x, 100 * alone[("probe_alone", "mean")], width,
               yerr=100 * np.nan_to_num(alone[("probe_alone", "std")]), capsize=3, color="0.6", label="alone (probe)")
        ax.plot(x, 100 * alone[("alone_test_acc", "mean")], "k_", markersize=14, mew=2, label="alone (own head)")
        for i, (method, variant) in enumerate(groups, start=1):
            g = table[(table["method"] == method) & (table["variant"] == variant)].set_index("modality")
            g = g.reindex(modalities)
            label = f"in {method}" + (f" ({variant})" if variant else "") + " (probe)"
            ax.bar(x + i * width, 100 * g["probe_joint.mean"], width,
                   yerr=100 * np.nan_to_num(g["probe_joint.std"]), capsize=3, label=label)
        ax.set_xticks(x + width * len(groups) / 2, modalities)
        ax.set_ylabel("test accuracy of a linear probe (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"Modality gap on {dataset}: each encoder alone vs inside the joint model")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(file, dpi=150)
    return file


def write_gap_report(paths: Iterable[str | Path], out_dir: str | Path | None = None,
                     settings: ProbeSettings = ProbeSettings(), methods: Iterable[str] | None = None
                     ) -> dict[str, Any]:
    """Pair, probe and write modality_gap.csv (one row per joint run and modality), modality_gap.md and
    modality_gap.png into `out_dir` (default: the first path when it is a folder, else the current folder).

    Returns the written paths (`csv`, `md`, `png`), the per-run rows (`rows`), the summary and the markdown.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no run folders given")
    runs, skipped = _load(paths)
    if skipped:
        log.warning("%d run(s) left out (not completed or without a config)", len(skipped))
    if not runs:
        raise UserError(f"{', '.join(map(str, paths))}: no completed runs ({len(skipped)} left out: "
                        + "; ".join(skipped[:5]) + ")")
    pairs = pair_runs(runs, methods)
    involved = list(dict.fromkeys(r.run_dir for p in pairs for r in (p.joint, p.alone)))
    missing = [str(d) for d in involved if not any((d / "checkpoints" / n).is_file() for n in CHECKPOINTS)]
    if missing:  # before any probing: say every missing checkpoint at once
        raise UserError(f"{len(missing)} run(s) have no checkpoint (expected checkpoints/best.pt or last.pt); "
                        f"the probe needs the trained encoders: {', '.join(missing)}")
    out = output_folder(paths, out_dir)  # before the probing: a bad --out fails at once
    probing = _Probing(settings)
    rows = _rows(pairs, probing)
    summary = _summary(rows)
    files = {"csv": out / "modality_gap.csv", "md": out / "modality_gap.md", "png": out / "modality_gap.png"}
    rows.to_csv(files["csv"], index=False)
    markdown = _markdown(summary, settings, skipped, rows)
    files["md"].write_text(markdown, encoding="utf-8")
    _plot(summary, rows, files["png"])
    return {**files, "rows": rows, "summary": summary, "markdown": markdown}


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`mmbalance gap DIR [DIR ...] [--out OUT] [--methods M,...] [--probe-steps N] [--device cpu]`."""
    defaults = ProbeSettings()
    parser = argparse.ArgumentParser(
        prog="mmbalance gap",
        description="Modality-gap analysis: linear-probe accuracy of each modality's encoder inside the joint "
                    "runs against the unimodal runs of the same dataset and seed. Writes modality_gap.csv, "
                    "modality_gap.md and modality_gap.png.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep folder or run folders (joint + unimodal)")
    parser.add_argument("--out", metavar="OUT", help="where to write the results (default: the first DIR)")
    parser.add_argument("--methods", metavar="M,...", help="only these joint methods (default: every one found)")
    parser.add_argument("--probe-steps", type=int, default=defaults.steps, help="L-BFGS iterations of the probe")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="L2 on the probe")
    parser.add_argument("--probe-seed", type=int, default=defaults.seed, help="the probe's initialisation seed")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="feature-extraction batch")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.probe_steps < 1:
        parser.error("--probe-steps must be at least 1")
    settings = ProbeSettings(args.probe_steps, args.weight_decay, args.probe_seed, args.batch_size, args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        result = write_gap_report(args.dirs, args.out, settings, methods)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(str(result[k]) for k in ("csv", "md", "png")), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
