"""`mmbalance gap DIR...`: the modality-gap analysis (the BalanceBenchmark paper's Figure 2).

For every modality: how good is its encoder *inside* a jointly trained model, against the same encoder
trained *alone* (the `unimodal` run of that modality, same dataset and seed; a pair whose training recipes differ
in optimizer, schedule, epochs, batch size, backbone or masking is warned about and named in the output)? Both
are measured the same way: a linear probe (a fresh `nn.Linear` on the frozen, standardised pooled features,
fitted with full-batch L-BFGS and a small L2 penalty on the training split, seeded) evaluated on the test split.
The unimodal run's own test accuracy (its trained head) is reported beside it.

Regression runs (CMU-MOSEI's `dataset.task=regression`) get a linear *regression* probe: least squares with the same
L2 penalty and optimiser, scored by the test MAE, the value the run itself is selected on and the one its Shapley
values use (v = -MAE, metrics/shapley.py). Their numbers are MAE in score points (lower is better) and their gap is
joint - alone, so a positive gap means the encoder does worse inside the joint model, as with accuracy. A joint run
pairs only with unimodal runs of the same dataset config, so the two tasks never meet in one pair.

The runs come from metrics.json (config, seed, status) and checkpoints/best.pt (last.pt when there is no
best.pt); each model is rebuilt from its resolved config exactly as `mmbalance.train` builds it, and so is its data,
which must be the data the run was trained on (its recorded `data_identity`), else the command refuses before
probing. A run that repeats another's settings and seed (a copied folder) counts once, as in `mmbalance report`.
Methods that replace the model in `setup` (Greedy's MMTM blocks: intermediate fusion, so one modality's
features depend on the other's input) are refused with a clear error; `--methods` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmbalance.analysis.runs import (
    DASH, FORCED, METHOD_ORDER, counted, flatten_config, load_runs, natural_key, output_folder,
)
from mmbalance.engine.identity import canonical
from mmbalance.errors import UserError

__all__ = ["ProbeSettings", "ProbeResult", "linear_probe", "linear_regression_probe", "pair_runs", "probe_run",
           "write_gap_report", "main"]

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


# What a probe's score is, per task (the run's `task` in metrics.json); regression's MAE: lower is better.
PROBE_METRICS = {"classification": "acc", "regression": "mae"}


@dataclass(frozen=True)
class ProbeResult:
    train: float  # the probe's score on the training split
    test: float  # ... and on the test split
    metric: str = "acc"  # "acc" (accuracy) or "mae" (a regression run's mean absolute error, lower is better)


def _fit_linear(train_x, test_x, out_dim: int, loss_fn, settings: ProbeSettings):
    """A fresh linear map fitted on frozen features by full-batch L-BFGS (loss_fn(outputs) + L2 on the weights),
    seeded; returns its outputs on the training and the test features.

    Features are standardised with the training split's mean and std (a linear probe stays linear; it only
    makes the optimisation independent of each encoder's feature scale). A feature constant on the training split
    (a dead unit) tells the probe nothing and gets no gradient, so it is left out: standardised by a near-zero std
    it would carry its random initial weight into the test outputs, scaled up to a million times.
    """
    import torch

    device = torch.device(settings.device)
    tx = torch.as_tensor(train_x, dtype=torch.float32, device=device).flatten(1)
    vx = torch.as_tensor(test_x, dtype=torch.float32, device=device).flatten(1)
    if len(tx) == 0 or len(vx) == 0:
        raise UserError("linear probe: the training or test split is empty")
    mean, std = tx.mean(0, keepdim=True), tx.std(0, keepdim=True, unbiased=False)
    live = (std > 1e-6).squeeze(0)
    tx, vx = ((tx - mean) / std.clamp_min(1e-6))[:, live], ((vx - mean) / std.clamp_min(1e-6))[:, live]
    if tx.shape[1] == 0:
        raise UserError("linear probe: every feature is constant on the training split (a dead encoder)")

    g = torch.Generator().manual_seed(settings.seed)
    bound = 1.0 / math.sqrt(tx.shape[1])
    weight = ((torch.rand(out_dim, tx.shape[1], generator=g) * 2 - 1) * bound).to(device).requires_grad_()
    bias = torch.zeros(out_dim, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=settings.steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = loss_fn(tx @ weight.T + bias) + settings.weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return tx @ weight.T + bias, vx @ weight.T + bias


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int,
                 settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    """Fit a fresh linear classifier on frozen features (cross-entropy, full-batch L-BFGS) and test its accuracy."""
    import torch
    import torch.nn.functional as F

    ty = torch.as_tensor(train_y, dtype=torch.long, device=settings.device)
    vy = torch.as_tensor(test_y, dtype=torch.long, device=settings.device)
    train_out, test_out = _fit_linear(train_x, test_x, num_classes, lambda out: F.cross_entropy(out, ty), settings)
    return ProbeResult(train_out.argmax(1).eq(ty).float().mean().item(),
                       test_out.argmax(1).eq(vy).float().mean().item(), "acc")


def linear_regression_probe(train_x, train_y, test_x, test_y,
                            settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    """Fit a fresh linear regression on frozen features to float scores and test its MAE (lower is better).

    Least squares (with the classifier probe's L2 penalty and optimiser): smooth and convex, so L-BFGS finds its
    one minimum; scored by the MAE, the regression run's own selection value and Shapley value (v = -MAE).
    """
    import torch

    ty = torch.as_tensor(train_y, dtype=torch.float32, device=settings.device).reshape(-1)
    vy = torch.as_tensor(test_y, dtype=torch.float32, device=settings.device).reshape(-1)
    train_out, test_out = _fit_linear(train_x, test_x, 1, lambda out: (out[:, 0] - ty).pow(2).mean(), settings)
    return ProbeResult((train_out[:, 0] - ty).abs().mean().item(), (test_out[:, 0] - vy).abs().mean().item(), "mae")


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
    task: str = "classification"  # or "regression" (dataset.task): which probe, scored how (PROBE_METRICS)
    overrides: list[str] = field(default_factory=list)  # its command line, for the command that trains a partner
    data_identity: dict | None = None  # the data it was trained on (metrics.json; None: not recorded)

    @property
    def unimodal_modality(self) -> str | None:
        if self.method != UNIMODAL:
            return None
        return (self.config.get("method") or {}).get("modality") or (self.modalities or [None])[0]

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method


def _load(paths: Sequence[Path]) -> tuple[list[RunInfo], list[str]]:
    """Completed runs, each once, and one line per run left out (not completed, unreadable, made by resume=force
    from another run's folder, a repeat).

    A run that repeats the settings and seed of another (a copied folder, the same sweep given twice) is left out
    as `mmbalance report` leaves it out of its statistics (`runs.counted`): each distinct run counts once."""
    df = load_runs(paths)  # UserError for a folder without any metrics.json
    runs, skipped = [], []
    once = counted(df)
    for i, row in df.iterrows():
        run_dir = Path(row["run_dir"])
        if row["status"] != "completed":  # a forced run (resume=force over another run) says how it was made
            why = f": {row['error']}" if row["status"] == FORCED else ""
            skipped.append(f"{row['status']}: {run_dir} ({row['method'] or '?'}){why}")
            continue
        if not once[i]:
            skipped.append(f"repeat: {run_dir} repeats {row['repeat_of']} (the same settings and seed: counted once)")
            continue
        data = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("dataset"), dict):
            skipped.append(f"no resolved config: {run_dir}")
            continue
        seed = None if pd.isna(row["seed"]) else int(row["seed"])
        # the task train.py recorded (a record without one: the dataset config's, else classification)
        task = data.get("task") or config["dataset"].get("task") or "classification"
        if task not in PROBE_METRICS:
            skipped.append(f"task {task!r} (no probe for it; expected one of {sorted(PROBE_METRICS)}): {run_dir}")
            continue
        runs.append(RunInfo(
            run_dir=run_dir, dataset=str(row["dataset"]), dataset_key=canonical(config["dataset"]),
            method=str(row["method"]), variant=str(row["variant"] or ""), seed=seed, config=config,
            metrics=data.get("metrics") or {}, modalities=list(data.get("modalities") or []),
            backbone_key=canonical([config.get("backbone"), config.get("masking")]),
            task=task, overrides=[str(o) for o in data.get("overrides") or []],
            data_identity=data.get("data_identity") if isinstance(data.get("data_identity"), dict) else None,
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
    return [k for k in keys if canonical(flat[0].get(k, "<absent>")) != canonical(flat[1].get(k, "<absent>"))]


# Overrides of a joint run that the command training its unimodal partner leaves out: the method and the seed (it
# sets its own), the sweep (a multirun of other jobs) and what only says where or how visibly a run runs.
_NOT_CARRIED = ("method", "seed", "sweep", "resume", "logger", "hydra")


def _partner_command(joint: RunInfo, modality: str) -> str:
    """The command that trains the unimodal run of `modality` a joint run pairs with: the joint run's own overrides
    (its dataset location, task, recipe: everything the pairing compares), with the unimodal method and its seed."""
    import shlex

    carried = [o for o in joint.overrides
               if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in _NOT_CARRIED]
    if not any(o.lstrip("+").startswith("dataset=") for o in carried):
        carried.insert(0, f"dataset={joint.dataset}")  # the default dataset, or one an experiment chose: named anyway
    args = [*carried, "method=unimodal", f"method.modality={modality}", f"seed={joint.seed}"]
    return "python -m mmbalance " + " ".join(shlex.quote(a) for a in args)


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
        found = sorted({r.method for r in runs if r.method != UNIMODAL})
        what = f" of method(s) {sorted(wanted)}" if wanted else ""
        raise UserError(f"no completed jointly trained run{what} found (joint methods found: {found or 'none'}); the "
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
                    f"{j.dataset}: {', '.join(have) or 'none'}); train one with `{_partner_command(j, m)}`")
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

    def data_differences(self, run: RunInfo) -> list[str]:
        """How the data rebuilt from a run's config differ from the data it was trained on (its recorded
        `data_identity`, computed the way training computes it: `engine.identity.data_identity`); [] when they are
        the same or nothing was recorded."""
        from omegaconf import OmegaConf

        from mmbalance.engine.identity import comparable_data, data_identity, differences

        if run.data_identity is None:
            return []
        cfg = OmegaConf.create(run.config)
        try:
            splits = self.splits(cfg, (run.dataset_key, cfg.get("seed")))
        except UserError as e:
            raise UserError(f"{run.run_dir}: cannot rebuild its data from its config: {e}") from None
        return differences(*comparable_data(run.data_identity, data_identity(splits)))

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
    """Linear-probe score of each modality's encoder of one trained run: {modality: ProbeResult} (accuracy, or the
    MAE of a regression probe for a regression run)."""
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
    if run.task == "regression":
        return {m: linear_regression_probe(train_f[m], train_y, test_f[m], test_y, settings) for m in modalities}
    return {m: linear_probe(train_f[m], train_y, test_f[m], test_y, splits.num_classes, settings)
            for m in modalities}


# --------------------------------------------------------------------------------------------- output


def _rows(pairs: list[Pair], probing: _Probing) -> pd.DataFrame:
    """One row per pair. `metric` says what the numbers are: accuracy, or MAE for regression runs; `gap` is how much
    worse the encoder does inside the joint model (alone - joint accuracy, joint - alone MAE)."""
    from mmbalance.metrics.regression import LOWER_IS_BETTER

    rows = []
    for p in pairs:
        j, a = p.joint, p.alone
        pj, pa = probing.probe(j)[p.modality], probing.probe(a)[p.modality]
        metric = pj.metric
        rows.append({
            "dataset": j.dataset, "method": j.method, "variant": j.variant, "seed": j.seed, "modality": p.modality,
            "metric": metric,
            "probe_joint": pj.test, "probe_alone": pa.test,
            "gap": pj.test - pa.test if metric in LOWER_IS_BETTER else pa.test - pj.test,
            # the runs' own heads, in the same metric (a regression run records test/mae and test/mae/<m>)
            "alone_test": _num(a.metrics.get(f"test/{metric}")),
            "branch_joint_test": _num(j.metrics.get(f"test/{metric}/{p.modality}")),
            "joint_test": _num(j.metrics.get(f"test/{metric}")),
            "probe_joint_train": pj.train, "probe_alone_train": pa.train,
            "joint_run": str(j.run_dir), "alone_run": str(a.run_dir),
            "recipe_differences": " ".join(p.recipe_differences),
        })
    return pd.DataFrame(rows)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


STAT_COLS = ["probe_joint", "probe_alone", "gap", "alone_test", "branch_joint_test"]
# How each metric is shown, as (factor, digits): accuracy in %, a regression run's MAE in score points.
METRIC_FORMAT = {"acc": (100.0, 1), "mae": (1.0, 3)}


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, metric, method, variant, modality): n, seeds, mean and sample std of each number."""
    out = []
    for (dataset, metric, method, variant, modality), g in df.groupby(
            ["dataset", "metric", "method", "variant", "modality"], sort=False):
        row = {"dataset": dataset, "metric": metric, "method": method, "variant": variant, "modality": modality,
               "n": len(g), "seeds": " ".join(str(s) for s in sorted(g["seed"].dropna().astype(int)))}
        for c in STAT_COLS:
            v = g[c].dropna()
            row[f"{c}.mean"] = v.mean() if len(v) else math.nan
            row[f"{c}.std"] = v.std(ddof=1) if len(v) > 1 else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, std: float, metric: str = "acc") -> str:
    factor, digits = METRIC_FORMAT[metric]
    if not np.isfinite(mean):
        return DASH
    return f"{factor * mean:.{digits}f} ± " + (f"{factor * std:.{digits}f}" if np.isfinite(std) else DASH)


def _markdown(summary: pd.DataFrame, settings: ProbeSettings, skipped: list[str], rows: pd.DataFrame) -> str:
    lines = ["# Modality gap", "",
             "Each modality's encoder inside the jointly trained model against the same encoder trained alone "
             "(the `unimodal` run, same dataset and seed), both measured by a linear probe on the frozen pooled "
             f"features (fitted on the training split: full-batch L-BFGS, {settings.steps} steps, L2 "
             f"{settings.weight_decay:g}, seed {settings.seed}; accuracy on the test split). Gap = alone − joint, "
             "per seed. *alone, own head* is the unimodal run's test accuracy; *branch in joint* is the joint "
             "model's own per-modality logits (`test/acc/<m>`). Accuracies in %, mean ± sample std over seeds.",
             ""]
    if (summary["metric"] == "mae").any():
        lines += ["Regression runs (dataset.task=regression, the sections marked so): the probe is a linear "
                  "regression (least squares, the same L2 and L-BFGS) scored by its test MAE, the value the runs are "
                  "selected on and their Shapley values use (v = −MAE); *alone, own head* and *branch in joint* are "
                  "`test/mae` and `test/mae/<m>`. MAE in score points, lower is better; gap = joint − alone, so a "
                  "positive gap is an encoder that does worse inside the joint model, as for accuracy.", ""]
    for (dataset, metric), table in summary.groupby(["dataset", "metric"], sort=False):
        title = f"{dataset} (regression: MAE, lower is better)" if metric == "mae" else dataset
        lines += [f"## {title}", "",
                  "| method | variant | modality | n | probe in joint | probe alone | gap | alone, own head "
                  "| branch in joint |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for _, r in table.iterrows():
            cells = [r["method"], r["variant"] or DASH, r["modality"], str(r["n"])]
            cells += [_pm(r[f"{c}.mean"], r[f"{c}.std"], metric) for c in STAT_COLS]
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

    panels = list(dict.fromkeys(zip(summary["dataset"], summary["metric"])))  # a panel per dataset and unit
    fig = Figure(figsize=(max(7.0, 2.6 * summary["modality"].nunique() + 4), 4.2 * len(panels)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (dataset, metric) in zip(axes, panels):
        factor = METRIC_FORMAT[metric][0]
        table = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric)]
        modalities = list(dict.fromkeys(table["modality"]))
        groups = list(dict.fromkeys(zip(table["method"], table["variant"])))
        width = 0.8 / (len(groups) + 1)
        x = np.arange(len(modalities))
        # alone: one bar per modality over every unimodal run any joint group was paired with (each once)
        mine = rows[(rows["dataset"] == dataset) & (rows["metric"] == metric)]
        unique = mine.drop_duplicates("alone_run").groupby("modality")
        alone = unique[["probe_alone", "alone_test"]].agg(["mean", "std"]).reindex(modalities)
        ax.bar(x, factor * alone[("probe_alone", "mean")], width,
               yerr=factor * np.nan_to_num(alone[("probe_alone", "std")]), capsize=3, color="0.6",
               label="alone (probe)")
        ax.plot(x, factor * alone[("alone_test", "mean")], "k_", markersize=14, mew=2, label="alone (own head)")
        for i, (method, variant) in enumerate(groups, start=1):
            g = table[(table["method"] == method) & (table["variant"] == variant)].set_index("modality")
            g = g.reindex(modalities)
            label = f"in {method}" + (f" ({variant})" if variant else "") + " (probe)"
            ax.bar(x + i * width, factor * g["probe_joint.mean"], width,
                   yerr=factor * np.nan_to_num(g["probe_joint.std"]), capsize=3, label=label)
        ax.set_xticks(x + width * len(groups) / 2, modalities)
        if metric == "mae":  # a regression run's probe: its test MAE in score points, lower is better
            ax.set_ylabel("test MAE of a linear regression probe (lower is better)")
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylabel("test accuracy of a linear probe (%)")
            ax.set_ylim(0, 105)
        task = " (regression)" if metric == "mae" else ""
        ax.set_title(f"Modality gap on {dataset}{task}: each encoder alone vs inside the joint model")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(file, dpi=150)
    return file


def _data_source(config: dict) -> str:
    """Where a run's data come from, for a message: its dataset's file or folder, else its dataset config."""
    dataset = config.get("dataset") or {}
    for key in ("path", "root"):
        if isinstance(dataset.get(key), str):
            return f"dataset.{key}={dataset[key]}"
    return f"dataset {canonical({k: v for k, v in dataset.items() if k != 'cache_dir'})}"


def _check_data(involved: Sequence[Path], runs: list[RunInfo], probing: _Probing) -> None:
    """Refuse, before any probing, runs whose data rebuilt from their config are not the data they were trained on
    (a features file overwritten since): a probe on other data measures nothing about the run. One error naming
    every such run, its data source and what differs."""
    by_dir = {r.run_dir: r for r in runs}
    problems = []
    for run_dir in involved:
        run = by_dir[run_dir]
        differ = probing.data_differences(run)
        if differ:
            problems.append(f"{run_dir} ({run.label}, {_data_source(run.config)}): recorded -> rebuilt: "
                            + "; ".join(differ))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"the data rebuilt for {len(problems)} run(s) are not the data they were trained on (their "
                        f"metrics.json data_identity); the probe would measure other data. Restore the data the runs "
                        f"were trained on, or train them again on these:\n{lines}")


def write_gap_report(paths: Iterable[str | Path], out_dir: str | Path | None = None,
                     settings: ProbeSettings = ProbeSettings(), methods: Iterable[str] | None = None
                     ) -> dict[str, Any]:
    """Pair, probe and write modality_gap.csv (one row per joint run and modality), modality_gap.md and
    modality_gap.png into `out_dir` (default: the first path when it is a folder, else the folder it is in).

    Returns the written paths (`csv`, `md`, `png`), the per-run rows (`rows`), the summary and the markdown.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no run folders given")
    runs, skipped = _load(paths)
    if skipped:
        log.warning("%d run(s) left out (not completed, without a config, or repeats of another run)", len(skipped))
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
    _check_data(involved, runs, probing)
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
                    "runs against the unimodal runs of the same dataset and seed (regression runs: a linear "
                    "regression probe's test MAE). Writes modality_gap.csv, modality_gap.md and modality_gap.png.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep folder or run folders (joint + unimodal)")
    parser.add_argument("--out", metavar="OUT",
                        help="where to write the results (default: the first DIR; a metrics.json: its run folder)")
    parser.add_argument("--methods", metavar="M,...", help="only these joint methods (default: every one found)")
    # the probe's settings are part of its result (the markdown names them): --help shows what a plain run uses
    parser.add_argument("--probe-steps", type=int, default=defaults.steps,
                        help="L-BFGS iterations of the probe (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="L2 penalty on the probe's weights (default: %(default)g)")
    parser.add_argument("--probe-seed", type=int, default=defaults.seed,
                        help="the probe's initialisation seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="feature-extraction batch (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.probe_steps < 1:
        parser.error("--probe-steps must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a finite number >= 0 (got {args.weight_decay:g})")
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:<index>")
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
