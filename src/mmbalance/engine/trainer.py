"""The plain-PyTorch loop. It never knows which method it runs: the method's hooks do the rest."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmbalance.engine import distributed
from mmbalance.engine.checkpoint import load_checkpoint, previous_path, save_checkpoint, write_text
from mmbalance.engine.evaluation import evaluate, task_of
from mmbalance.engine.identity import comparable_data, describe, differences, refusal
from mmbalance.engine.run import Run
from mmbalance.engine.run_folder import shortening_refused, world_size_change
from mmbalance.errors import CheckpointError, RunFolderError, TrainingDiverged, UserError
from mmbalance.metrics.flops import count_flops
from mmbalance.metrics.regression import LOWER_IS_BETTER

log = logging.getLogger("mmbalance")


# regression: the per-modality metric of an epoch line, by the selection metric (the headline one); a selection
# metric without a per-modality value (acc-7, F1, acc-2 without zeros) shows the MAE per modality
MODALITY_METRIC = {"mae": "mae", "corr": "corr", "acc2_nonneg": "acc"}


def modality_scores(row: dict, modalities, task: str, select_metric: str) -> str:
    """The per-modality part of an epoch line. Classification: each modality's validation accuracy ("audio 0.900
    vision 0.750"). Regression: the headline metric per modality when it has one, else the MAE, named ("mae audio
    0.405  vision 0.380"), never the acc-2 under an MAE headline."""
    if task != "regression":
        return "  ".join(f"{m} {_score(row[f'val/acc/{m}'])}" for m in modalities if f"val/acc/{m}" in row)
    key = MODALITY_METRIC.get(select_metric, "mae")
    shown = [f"{m} {_score(row[f'val/{key}/{m}'])}" for m in modalities if f"val/{key}/{m}" in row]
    label = "acc-2" if key == "acc" else key
    return f"{label} " + "  ".join(shown) if shown else ""


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class Trainer:
    """fit(): per epoch train, validate, keep the best checkpoint; then test the best model.

    Resumes from `<output_dir>/checkpoints/last.pt` when the folder has one (or from `last.prev.pt`, the
    checkpoint before it, when last.pt is unreadable), after checking that it belongs to this run's identity
    (`force_resume` skips that check). The checkpoint is the record of the training so far: on resume,
    history.csv is rewritten from it, so the two can never disagree after a kill.
    """

    def __init__(
        self,
        run: Run,
        epochs: int,
        select_on: str = "val",
        select_metric: str = "acc",
        shapley_every: int = 1,
        count_flops: bool = True,
        progress_bar: str | bool = "auto",
        force_resume: bool = False,
        loggers=None,
    ):
        self.run = run
        self.force_resume = force_resume
        self.loggers = loggers  # experiment loggers (engine/loggers.py) on rank 0; None: the run folder only
        self.epochs = epochs
        self.select_on = select_on
        self.select_key = f"{select_on}/{select_metric}"
        self.lower_is_better = select_metric in LOWER_IS_BETTER  # regression's MAE
        self.shapley_every = shapley_every  # validation Shapley every N epochs (and the last); 0 = never
        self.run.flops.enabled = count_flops
        self.progress_bar = (sys.stderr.isatty() if progress_bar == "auto" else bool(progress_bar)) and distributed.is_main()
        out = run.output_dir or Path(".")
        self.ckpt_dir = out / "checkpoints"
        self.history_path = out / "history.csv"
        self.history: list[dict] = []
        self.best_score = math.inf if self.lower_is_better else -math.inf
        self.best_epoch = -1
        # wall time adds up across the processes that worked on this run (the ones before the checkpoint)
        self.started = time.time()
        self.wall_time_before = 0.0
        self.processes = 1
        # the code (metrics.json's git_sha) of every process that trained this run, in order, without repeats: set
        # by the caller to this process's, extended by a resume with the checkpoint's
        self.code_versions: list[str] = []
        self.resumed_from: dict | None = None
        self.first_epoch_here = 0
        self.on_start = None  # called with the first epoch to train, once the checkpoint (if any) is loaded

    @property
    def wall_time_s(self) -> float:
        return self.wall_time_before + (time.time() - self.started)

    # ---- checkpoints ----
    def _state(self, epoch: int) -> dict:
        run = self.run
        return {
            "epoch": epoch,
            "step": run.step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "method": run.method.state_dict(),
            "flops": run.flops.state_dict(),
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "identity": run.identity,
            # how many processes trained it (hardware=ddp): each step's batch is world_size x trainer.batch_size
            "world_size": run.world_size,
            "wall_time_s": self.wall_time_s,
            "processes": self.processes,
            "code_versions": self.code_versions,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "noise": {k: g.get_state() for k, g in run._noise.items()},
            },
        }

    def _load_last(self) -> tuple[dict, Path] | None:
        """The newest readable of last.pt and last.prev.pt; None when the run has none; CheckpointError when
        checkpoints exist but none can be read."""
        last = self.ckpt_dir / "last.pt"
        problems = []
        for path in (last, previous_path(last)):
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            if problems:
                log.warning("%s; resuming from %s (epoch %d) instead: that epoch is trained again",
                            problems[0], path.name, state.get("epoch", -1))
            return state, path
        if problems:
            raise CheckpointError(
                "no readable checkpoint to resume from:\n" + "\n".join(f"  - {p}" for p in problems)
                + "\n  Restore the file from a backup, or re-run with resume=never to train this run again from "
                "the start (the folder's files move to superseded/)")
        return None

    def _check_identity(self, state: dict, path: Path) -> None:
        """Refuse a checkpoint written by another run (another config, dataset or version)."""
        mine, theirs = self.run.identity, state.get("identity")
        if mine is None:
            return  # a Trainer built by hand (tests, notebooks) without an identity compares nothing
        if theirs is None:
            diff = ["<the checkpoint records no run identity>"]
        else:
            diff = differences(theirs.get("config", {}), mine["config"])
            diff += [f"dataset {d}" for d in differences(*comparable_data(theirs.get("data"), mine.get("data")))]
        other_size = world_size_change(state.get("world_size"), self.run.world_size)
        if other_size:
            diff.append(other_size)
        if not diff:
            return
        if self.force_resume:
            log.warning("resume=force: resuming %s although it was written by %s; differing: %s", path,
                        describe(theirs), "; ".join(diff))
            return
        raise RunFolderError(refusal(path, f"it was written by {describe(theirs)}", diff))

    def _read_selected(self, path: Path) -> tuple[dict | None, str | None]:
        """(the checkpoint's state, None) when `path` holds the selected epoch, else (None, what is wrong with it)."""
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            return None, str(exc)
        if state.get("epoch") != self.best_epoch:  # e.g. written by an epoch the resumed checkpoint does not hold
            return None, (f"checkpoint {str(path)!r} holds epoch {state.get('epoch')}, not the selected epoch "
                          f"{self.best_epoch}")
        return state, None

    def _other_selected(self, skip: Path | None = None) -> tuple[dict, Path] | None:
        """The first of last.pt and last.prev.pt (but `skip`, already known) that holds the selected epoch: a run's
        last two epochs are kept there, so when the selected one is among them its weights survive a lost best.pt."""
        last = self.ckpt_dir / "last.pt"
        for path in (last, previous_path(last)):
            if path == skip or not path.exists():
                continue
            state, _ = self._read_selected(path)
            if state is not None:
                return state, path
        return None

    def _restore_best(self, state: dict, path: Path) -> None:
        """When best.pt does not hold the selected epoch (missing, unreadable, another epoch) but the checkpoint
        resumed from (`state`, read from `path`) or the other of last.pt and last.prev.pt does, write best.pt again
        from it, before later epochs replace that checkpoint."""
        _, problem = self._read_selected(self.ckpt_dir / "best.pt")
        if problem is None:
            return
        if state.get("epoch") == self.best_epoch:
            found = state, path
        else:
            found = self._other_selected(skip=path)
            if found is None:
                return  # the final test says so, unless a later epoch is selected first
            self._check_identity(*found)  # the file resumed from was checked; this one not yet
        state, path = found
        log.warning("%s; %s holds the selected epoch %d, so best.pt is written again from it", problem, path,
                    self.best_epoch)
        save_checkpoint({"epoch": state["epoch"], "model": state["model"], "method": state["method"],
                         "identity": state.get("identity")}, self.ckpt_dir / "best.pt")

    def _resume(self) -> int:
        found = self._load_last()
        if found is None:
            return 0
        state, path = found
        self._check_identity(state, path)
        if state["epoch"] + 1 > self.epochs:  # before anything is rewritten: its results are those of more epochs
            raise shortening_refused(path, state["epoch"] + 1, self.epochs)
        run = self.run
        try:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
            if run.scheduler is not None and state["scheduler"] is not None:
                run.scheduler.load_state_dict(state["scheduler"])
            run.method.load_state_dict(state["method"])
        except (RuntimeError, ValueError, KeyError) as exc:  # resume=force over a run whose model differs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunFolderError(f"{path} cannot be loaded into this run's model, optimizer or method ({first}): it "
                                 f"was written by {describe(state.get('identity'))}. Nothing was changed. Re-run with "
                                 "resume=never to train this run here (the files move to superseded/), or choose "
                                 "another folder") from None
        run.flops.load_state_dict(state["flops"])
        run.step = state["step"]
        self.history = state["history"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        if self.best_epoch >= 0 and distributed.is_main():
            self._restore_best(state, path)
        self.wall_time_before = float(state.get("wall_time_s", 0.0))
        self.processes = int(state.get("processes", 1)) + 1
        earlier = list(state.get("code_versions") or [])
        self.code_versions = earlier + [v for v in self.code_versions if not earlier or v != earlier[-1]]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        for key, g_state in rng["noise"].items():
            run.noise_generator(key).set_state(g_state)
        if distributed.is_main():  # a row written after the checkpoint goes, one written before it returns
            self._write_history()
        self.resumed_from = {"checkpoint": str(path), "epoch": state["epoch"]}
        log.info("resumed from %s after epoch %d", path, state["epoch"])
        return state["epoch"] + 1

    # ---- the loop ----
    def train_epoch(self, epoch: int) -> dict[str, float]:
        run = self.run
        run.model.train()
        sampler = getattr(run.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # per key: a stat a method logs on some steps only (CGGM's coefficients need a previous step) is the mean
        # over the samples of the steps that logged it, not diluted by the others
        sums: dict[str, torch.Tensor] = {}
        counted: dict[str, int] = {}
        samples = 0
        step_flops_per_sample = 0.0
        bar = tqdm(run.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self.progress_bar)
        for i, batch in enumerate(bar):
            batch = batch.to(run.device, non_blocking=True)
            if i == 0 and run.flops.enabled:
                # the first step of each epoch is counted exactly, then scaled by the epoch's samples
                stats, flops = count_flops(run.method.training_step, run, batch)
                step_flops_per_sample = flops / len(batch)
            else:
                stats = run.method.training_step(run, batch)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.float() * len(batch)
                counted[k] = counted.get(k, 0) + len(batch)
            samples += len(batch)
            run.step += 1
        run.flops.add("train_steps", step_flops_per_sample * samples)
        if run.world_size > 1:  # the epoch means over every rank's shard
            # BatchNorm statistics followed each rank's shard: one model again before the epoch-end hook, validation
            # and the checkpoint (engine/distributed.py)
            distributed.sync_buffers([run.model, *run.method.owned_modules().values()])
            as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32, device=run.device)  # noqa: E731
            totals = run.reduce({**{k: as_tensor(v) for k, v in sums.items()},
                                 **{f"_n/{k}": as_tensor(float(n)) for k, n in counted.items()},
                                 "_samples": as_tensor(float(samples))})
            samples = int(totals.pop("_samples"))
            counted = {k: int(totals.pop(f"_n/{k}")) for k in counted}
            sums = totals
        if samples == 0:  # every rank drew no batch (their shards are of equal size)
            raise UserError(self._no_batch(epoch))
        means = {f"train/{k}": float(v) / max(counted[k], 1) for k, v in sums.items()}
        if not math.isfinite(means.get("train/loss", 0.0)):
            raise self._diverged(f"the epoch-mean loss is {means['train/loss']} at epoch {epoch}", epoch)
        params = [p for p in run.model.parameters()]
        if params and not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            # a last step can blow the weights up after a finite loss: say so here, not as NaN predictions later
            raise self._diverged(f"the model's parameters hold NaN/Inf after epoch {epoch}", epoch)
        means["train/samples"] = samples
        return means

    def _no_batch(self, epoch: int) -> str:
        """Why an epoch trained on nothing: drop_last with a batch larger than the (per-process) training set, or an
        empty training loader. Without this the run would complete with its untrained model's results."""
        loader = self.run.train_loader
        size = len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
        per = f" per process ({self.run.world_size} processes)" if self.run.world_size > 1 else ""
        if getattr(loader, "drop_last", False) and size:
            return (f"epoch {epoch} trained on no sample: trainer.drop_last=true drops the one, incomplete batch of "
                    f"the {size} training samples{per}, as trainer.batch_size={loader.batch_size} is larger; lower "
                    "trainer.batch_size or set trainer.drop_last=false")
        return f"epoch {epoch} trained on no sample: the training loader holds {size} samples{per}"

    def _diverged(self, what: str, epoch: int) -> TrainingDiverged:
        """The divergence message, naming the checkpoint that holds the epoch before, or saying there is none."""
        if epoch > self.first_epoch_here:  # this process wrote last.pt after the previous epoch
            held = f"checkpoints/last.pt holds epoch {epoch - 1}"
        elif self.resumed_from is not None:  # last.pt, or last.prev.pt when last.pt was unreadable
            held = f"checkpoints/{Path(self.resumed_from['checkpoint']).name} holds epoch {epoch - 1}"
        else:
            held = "no checkpoint was written: it diverged in its first epoch"
        return TrainingDiverged(f"training diverged: {what}; lower optimizer.lr or set trainer.grad_clip ({held})")

    def fit(self) -> dict[str, Any]:
        run = self.run
        if run.method.counts_own_setup_flops:
            run.method.setup(run)
        else:
            with run.flops.measure("method_setup"):
                run.method.setup(run)
        start = self.first_epoch_here = self._resume()
        if self.on_start is not None:
            self.on_start(start)
        if self.loggers is not None:  # continues the tracker runs of a resumed run, with the checkpoint's history
            self.loggers.start(self.history, start)
        for epoch in range(start, self.epochs):
            run.epoch = epoch
            t0 = time.perf_counter()
            with run.flops.measure("method_epoch_hooks"):
                run.method.on_epoch_start(run, epoch)
            row: dict[str, Any] = {"epoch": epoch}
            row.update(self.train_epoch(epoch))
            with run.flops.measure("method_epoch_hooks"):
                run.method.on_epoch_end(run, epoch)
            if run.scheduler is not None:
                run.scheduler.step()
            row["lr"] = run.optimizer.param_groups[0]["lr"]
            due = self.shapley_every > 0 and ((epoch + 1) % self.shapley_every == 0 or epoch + 1 == self.epochs)
            row.update(evaluate(run, run.val_loader, "val", shapley=due))
            if self.select_on == "test":  # the peer's protocol, only when asked for (recorded in metrics.json)
                row.update(evaluate(run, run.test_loader, "test", shapley=False))
            row["flops/train_so_far"] = self._flops_so_far()
            row["time_s"] = time.perf_counter() - t0
            self.history.append(row)
            score = row[self.select_key]
            if self._improves(score):
                self.best_score, self.best_epoch = score, epoch
                if distributed.is_main():
                    save_checkpoint({"epoch": epoch, "model": run.model.state_dict(),
                                     "method": run.method.state_dict(), "identity": run.identity},
                                    self.ckpt_dir / "best.pt")
            if distributed.is_main():  # replicas are identical: rank 0 writes for all
                # the checkpoint first: it is the record; history.csv is rewritten from it on resume
                save_checkpoint(self._state(epoch), self.ckpt_dir / "last.pt", keep_previous=True)
                self._write_history()
                if self.loggers is not None:  # after the checkpoint, so a logged epoch is one the record holds
                    self.loggers.log_epoch(row)
            distributed.barrier()  # the others read best.pt / last.pt only after rank 0 wrote them
            log.info(
                "epoch %d  loss %.4f  %s %.4f  %s  (%.1fs)", epoch, row.get("train/loss", float("nan")),
                self.select_key, math.nan if score is None else score,
                modality_scores(row, run.modalities, task_of(run), self.select_key.split("/", 1)[1]),
                row["time_s"],
            )
        return self.test_best()

    def _flops_so_far(self) -> float | None:
        """The training FLOPs counted so far, summed over ranks (each counts its own shard's work), as `test_best`
        sums the run's total; None when counting is off."""
        run = self.run
        total = run.flops.measured_total
        if total is None or run.world_size == 1:
            return total
        return float(run.reduce({"flops": torch.tensor(float(total), device=run.device)})["flops"])

    def _improves(self, score: float | None) -> bool:
        """Whether a validation score beats the best so far (lower for MAE, higher otherwise); an undefined one
        (None or NaN, e.g. the correlation of constant predictions) never does."""
        if score is None or math.isnan(score):
            return False
        return score < self.best_score if self.lower_is_better else score > self.best_score

    def test_best(self) -> dict[str, Any]:
        run = self.run
        self._load_best()
        metrics: dict[str, Any] = evaluate(run, run.test_loader, "test", shapley=True)
        best_row = next((r for r in self.history if r["epoch"] == self.best_epoch), {})
        metrics.update({k: v for k, v in best_row.items() if k.startswith("val/")})
        metrics["best_epoch"] = self.best_epoch
        metrics["epochs"] = len(self.history)
        if self.history:  # wall time per epoch: training, the method's epoch hooks and validation
            metrics["time/epoch_mean_s"] = sum(r["time_s"] for r in self.history) / len(self.history)
        parts = dict(run.flops.by_part)
        if run.world_size > 1:  # every rank counted its own work: the run's cost is the sum
            summed = run.reduce({k: torch.tensor(float(v), device=run.device) for k, v in parts.items()}) if parts else {}
            parts = {k: float(v) for k, v in summed.items()}
        metrics["flops/train_total"] = (sum(parts.values()) if run.world_size > 1 and run.flops.enabled
                                        else run.flops.measured_total)
        for part, value in parts.items():
            metrics[f"flops/train/{part}"] = value
        return metrics

    def _load_best(self) -> None:
        """Load the selected epoch's weights from best.pt. When best.pt does not hold the selected epoch (missing,
        unreadable, another epoch): if that epoch is the last one, the model in memory holds its weights (trained
        here, or loaded from the checkpoint resumed from); otherwise the first of last.pt and last.prev.pt that
        holds it is loaded (one warning naming the file). When none does, the weights are lost and this is an
        error: testing other weights would report another epoch's results under the selected one."""
        run = self.run
        if self.best_epoch < 0:
            return  # no epoch had a defined validation score: none was selected and best.pt was never written
        path = self.ckpt_dir / "best.pt"
        state, problem = self._read_selected(path)
        if problem is not None:
            last_epoch = self.history[-1]["epoch"] if self.history else None
            if last_epoch == self.best_epoch:
                log.warning("%s; the selected epoch %d is the last one, so %s holds its weights too: testing those",
                            problem, self.best_epoch, self.ckpt_dir / "last.pt")
                return
            found = self._other_selected()
            if found is None:
                kept = [p.name for p in (self.ckpt_dir / "last.pt", previous_path(self.ckpt_dir / "last.pt"))
                        if p.exists()]
                raise CheckpointError(
                    f"{problem}\n  No other file holds the weights of the selected epoch {self.best_epoch} (the last "
                    f"checkpoint holds epoch {last_epoch}; checked: {', '.join(kept) or 'no last.pt'}), so this run "
                    "cannot be tested. Restore best.pt from a backup, or re-run with resume=never to train this run "
                    "again (the folder's files move to superseded/)")
            state, path = found
            log.warning("%s; %s holds the selected epoch %d: testing its weights", problem, path, self.best_epoch)
        mine, theirs = run.identity, state.get("identity")
        # compared key by key, as a resume compares last.pt: a record of an earlier version matches where it should
        if mine is not None and not self.force_resume and (theirs is None or differences(theirs.get("config", {}),
                                                                                          mine["config"])):
            raise RunFolderError(f"{path} was written by another run ({describe(theirs)}); "
                                 "re-run with resume=never to train this run again here, or choose another folder")
        run.model.load_state_dict(state["model"])
        run.method.load_state_dict(state["method"])

    def _write_history(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        write_text(text.getvalue(), self.history_path)
