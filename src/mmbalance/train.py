"""The training recipe, top to bottom: data -> model -> method -> optimizer -> Trainer.fit -> metrics.json."""

from __future__ import annotations

import contextlib
import logging
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import mmbalance
from mmbalance.config import build, validate
from mmbalance.data.batch import DataSplits
from mmbalance.engine import distributed, threads
from mmbalance.engine.checkpoint import WriteError, write_json, write_text
from mmbalance.engine.identity import data_identity, run_identity
from mmbalance.engine.loggers import build_loggers, supersede_logger_files
from mmbalance.engine.run import LoaderSettings, Run
from mmbalance.engine.run_folder import HYDRA_FILES, RunFolder
from mmbalance.engine.seeding import seed_everything
from mmbalance.engine.trainer import Trainer
from mmbalance.errors import CheckpointError, UserError, log_traceback_to_files
from mmbalance.metrics.flops import count_flops, write_fvcore_table
from mmbalance.metrics.regression import selection_metric
from mmbalance.models.build import build_model

log = logging.getLogger("mmbalance")


def resolve_device(hardware: DictConfig) -> torch.device:
    device = torch.device(hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"hardware.device={hardware.device!r} but CUDA is not available here; use hardware=cpu")
    return device


def _git_sha() -> str | None:
    """The commit of the mmbalance source tree this process runs, with `-dirty` when its tracked files (src/,
    conf/) differ from that commit: the record says which code made the results. None outside a source checkout
    (an installed package inside some other repository must not record that repository's commit)."""
    package = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not top or Path(top).resolve() / "src" / "mmbalance" != package:
            return None
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"],
                                 cwd=top, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if changed else "")) or None


def _write_hydra_files(cfg: DictConfig, output_dir: Path) -> None:
    """The run's .hydra/ (config.yaml, hydra.yaml, overrides.yaml: what Hydra writes with hydra.output_subdir),
    written when this run takes the folder. conf/hydra/default.yaml turns Hydra's own copy off because Hydra writes
    it before any check: a start refused in a folder (another run's, one in use) replaced that run's files with the
    refused config. Outside a Hydra job (train() from Python) there is nothing to write."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    folder = output_dir / HYDRA_FILES
    write_text(OmegaConf.to_yaml(cfg), folder / "config.yaml")
    write_text(OmegaConf.to_yaml(hydra_cfg), folder / "hydra.yaml")
    write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task), folder / "overrides.yaml")


def _config_dict(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an unresolvable interpolation must not hide the real error in metrics.json
        return OmegaConf.to_container(cfg, resolve=False)


def train(cfg: DictConfig, output_dir: Path, choices: dict | None = None, overrides: list | None = None) -> dict[str, Any]:
    """Run one training job into output_dir; return the results written to output_dir/metrics.json.

    The folder is a record (engine/run_folder.py): one process writes it at a time, a completed run of the
    same identity is left as it is, another run's record is never resumed or overwritten, a run is never
    shortened, and a completed metrics.json is replaced only by a complete one (while resume=force trains it for
    more epochs, it gains an `extension` field saying so). Otherwise metrics.json is written at start ("running"),
    and at the end "completed" or, before the exception is re-raised, "failed"/"interrupted" with the error:
    a results file never claims success for a failed run. Under hardware=ddp every rank runs this; only rank
    0 writes.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = None
    if cfg.get("hardware", {}).get("distributed", False):
        device = distributed.init_from_env(cfg.hardware.get("backend", "nccl"), str(cfg.hardware.device))
    finished = False
    try:
        folder = RunFolder(output_dir)
        with folder.locked() if distributed.is_main() else contextlib.nullcontext(), _sigterm_as_interrupt():
            results = _train(cfg, folder, choices, overrides, device)
        finished = True
        return results
    finally:
        distributed.shutdown(finished)


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stopping the other ranks after one failed, `kill`, a scheduler): the run ends as
    interrupted, its record saying so and its checkpoints intact, instead of dying with metrics.json 'running'."""


def _terminate(signum, frame):
    raise Terminated("terminated by SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    # only where nobody else handles SIGTERM (submitit's requeue on preemption installs its own handler)
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _hold_sigterm() -> None:
    """The run is recording how it ended: a SIGTERM now (torchrun stopping this rank after another failed) must not
    cut metrics.json short; the process ends right after anyway."""
    if signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _train(cfg: DictConfig, folder: RunFolder, choices, overrides, device) -> dict[str, Any]:
    output_dir = folder.path
    write = distributed.is_main()
    started = time.time()
    config = _config_dict(cfg)
    identity = run_identity(config, mmbalance.__version__)
    mode = str(cfg.get("resume", "auto"))
    plan = folder.plan(identity, mode, distributed.world_size())  # every rank reads it before rank 0 changes it
    # resume=never checks the config, data and loggers before the previous files move: an error leaves them as
    # they were (decided on every rank, so all build at the same point)
    check_first = mode == "never" and folder.holds_results()
    distributed.barrier()
    if plan.action == "skip":
        previous = plan.previous
        log.info("%s already holds this run, completed (test acc %s); nothing to do. resume=reevaluate re-tests its "
                 "best checkpoint, resume=never trains it again (its files move to superseded/)", output_dir,
                 previous.get("metrics", {}).get("test/acc"))
        return previous
    results: dict[str, Any] = {
        "status": "running",
        "error": None,
        "run_dir": str(output_dir.resolve()),
        "choices": dict(choices or {}),
        "overrides": list(overrides or []),
        "config": config,
        "identity": identity["digest"],
        "seed": cfg.get("seed"),
        "masking": cfg.get("masking"),
        "select_on": cfg.get("eval", {}).get("select_on"),
        "versions": {"mmbalance": mmbalance.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "git_sha": _git_sha(),
        "world_size": distributed.world_size(),
        "metrics": {},
    }
    if plan.forced_over:
        results["forced_resume"] = {"previous": (plan.previous or {}).get("overrides"), "differences": plan.forced_over}
    trainer = _make_trainer(cfg, output_dir, results, device, identity, overrides, mode) if check_first else None
    if write:
        if mode == "never":
            moved = folder.supersede()
            if moved is not None:
                log.info("resume=never: the previous files of %s moved to %s", output_dir, moved)
            supersede_logger_files(output_dir, moved, cfg)
        folder.clean_temporaries()
        distributed.clear_failure_notes(output_dir)
    distributed.barrier()
    # a completed record stays on disk until its replacement is complete (resume=reevaluate / force)
    keep_completed = plan.action == "reevaluate"
    # resume=force over another run's unfinished folder: its record stays until this run has loaded the checkpoint
    # and starts training (`on_start`); a refusal or error before that (a shorter trainer.epochs, a model the
    # checkpoint does not fit, a bad value) leaves the folder's record as it was, so its own command still resumes it
    deferred = bool(plan.forced_over) and plan.previous is not None and not keep_completed
    record = output_dir / "metrics.json"
    taken = False  # whether this run's .hydra/ is in the folder: written with its first record of this run

    def take_folder() -> None:
        nonlocal taken
        if write and not taken:
            taken = True
            _write_hydra_files(cfg, output_dir)

    if write and not keep_completed and not deferred:
        write_json(results, record)
        take_folder()
    # resume=force with more epochs trains a completed run further: until it completes, its record says so (the
    # checkpoints and history.csv then run ahead of the record's `epochs`)
    extension: dict[str, Any] = {}

    def start_extension(first_epoch: int) -> None:
        nonlocal deferred
        if deferred:
            deferred = False
            if write:
                write_json(results, record)
                take_folder()
        if keep_completed and first_epoch < trainer.epochs:
            extension.update(epochs=trainer.epochs, status="running", error=None)
            if write:
                write_json({**plan.previous, "extension": extension}, record)
                take_folder()

    try:
        if trainer is None:
            # a run that continues keeps the thread count it was trained with (threads.keep_trained_count)
            trained_with = (plan.previous or {}).get("threads") if plan.action in ("resume", "reevaluate") else None
            trainer = _make_trainer(cfg, output_dir, results, device, identity, overrides, mode, trained_with)
        trainer.started = started  # this process's wall time includes building the data and the model
        trainer.on_start = start_extension
        results["metrics"] = _fit(cfg, trainer, output_dir, require_checkpoint=keep_completed)
        results["status"] = "completed"
    except BaseException as exc:
        _hold_sigterm()
        results["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        results["error"] = f"{type(exc).__name__}: {exc}"
        if not write and results["status"] == "failed":  # rank 0 records it (engine/distributed.py)
            distributed.note_failure(output_dir, results["error"])
            log_traceback_to_files(f"rank {distributed.rank()} failed", exc)
        elif write and distributed.world_size() > 1:
            others = distributed.failures_of_other_ranks(output_dir)
            if others:  # what ended the run; rank 0's own error is the symptom (a closed peer, SIGTERM)
                results["status"] = "failed"
                results["error"] = f"{'; '.join(others)} (rank 0 then stopped: {results['error']})"
        raise
    finally:
        results["wall_time_s"] = trainer.wall_time_s if trainer is not None else time.time() - started
        if keep_completed:  # a re-evaluation adds to the completed total, which includes the work after last.pt
            results["wall_time_s"] = float(plan.previous.get("wall_time_s") or 0.0) + (time.time() - started)
        if trainer is not None:
            results["processes"] = trainer.processes
            if len(trainer.code_versions) > 1:  # git_sha is this process's; earlier processes ran other code
                results["code_versions"] = trainer.code_versions
            if trainer.resumed_from is not None:
                results["resumed_from"] = trainer.resumed_from
        recorded = False  # whether the record on disk is this `results`
        try:
            if write and deferred:  # stopped before it changed the folder: the previous record stands
                log.error("resume=force %s before it changed anything; %s still records the run it was started "
                          "over (%s)", results["status"], record, " ".join((plan.previous or {}).get("overrides") or [])
                          or "no overrides")
            elif write and (results["status"] == "completed" or not keep_completed):
                write_json(results, record)
                recorded = True
                take_folder()
            elif write:
                recorded_epochs = (plan.previous.get("metrics") or {}).get("epochs")
                longer = isinstance(recorded_epochs, int) and int(cfg.trainer.epochs) > recorded_epochs
                # an extension that stopped before it started training (no checkpoint to extend) is still one
                what = (f"extension to {extension.get('epochs', cfg.trainer.epochs)} epochs" if extension or longer
                        else "re-evaluation")
                if extension:
                    extension.update(status=results["status"], error=results["error"])
                    write_json({**plan.previous, "extension": extension}, record)
                log.error("%s %s; %s still holds the completed run's results (%s epochs)", what, results["status"],
                          record, (plan.previous.get("metrics") or {}).get("epochs"))
        except WriteError as exc:  # a full disk: the error that ended the run is the one to report
            if results["status"] == "completed":
                raise
            log.error("%s; %s does not record this ending", exc, record)
        if trainer is not None and trainer.loggers is not None:
            trainer.loggers.finish(results)  # after the record is on disk: a tracker never delays or breaks it
            if recorded:
                # the loggers' ending (done, or failed at the end: docs/loggers.md "Failures") belongs in the record
                # too; finish changed only results["loggers"], so this write can change nothing else, and a failed
                # write leaves the complete record just written
                try:
                    write_json(results, record)
                except OSError as exc:  # WriteError (a full disk) among them
                    log.warning("%s; %s does not record how the loggers ended", exc, record)
    return results


def _make_trainer(cfg: DictConfig, output_dir: Path, results: dict, device, identity: dict, overrides,
                  mode: str, trained_with: dict | None = None) -> Trainer:
    validate(cfg)
    # experiment loggers on rank 0: a missing package is refused here, before any work; they start in fit()
    loggers = build_loggers(cfg, output_dir, results) if distributed.is_main() else None
    results["threads"] = threads.apply(cfg.hardware, trained_with)  # thread counts and wait policy, once per run
    run = build_run(cfg, device or resolve_device(cfg.hardware), output_dir, results)
    run.identity = {**identity, "data": results["data_identity"], "overrides": list(overrides or []),
                    "run_dir": str(output_dir.resolve())}
    # regression selects on a regression metric (the default acc means the lowest val MAE); recorded
    results["select_metric"] = selection_metric(run.method.task, cfg.eval.select_metric)
    trainer = Trainer(run, epochs=cfg.trainer.epochs, select_on=cfg.eval.select_on,
                      select_metric=results["select_metric"], shapley_every=cfg.eval.shapley_every,
                      count_flops=cfg.eval.flops, progress_bar=cfg.trainer.get("progress_bar", "auto"),
                      force_resume=mode == "force", loggers=loggers)
    trainer.code_versions = [results["git_sha"]] if results.get("git_sha") else []
    return trainer


def _fit(cfg: DictConfig, trainer: Trainer, output_dir: Path, require_checkpoint: bool = False) -> dict[str, Any]:
    # a completed run is re-tested from its checkpoints (Trainer._load_best decides about best.pt): without one,
    # fit would train it from scratch under the completed record
    if require_checkpoint and not RunFolder(output_dir).has_checkpoint():
        raise CheckpointError(f"{output_dir}/checkpoints/last.pt is missing: there is no checkpoint to re-evaluate "
                              "or to train further; resume=never trains the run again (the folder's files move to "
                              "superseded/)")
    metrics = trainer.fit()
    if cfg.eval.flops and distributed.is_main():
        metrics.update(_forward_flops(trainer.run, output_dir))
    return metrics


def check_splits(splits, builder: str) -> None:
    """What a builder returned, checked before anything trains on it (a new dataset's builder meets this first):
    DataSplits, no empty split, as many class names as classes, and class labels within them where the splits
    expose their labels (a label past the classes was an IndexError in the first epoch)."""
    if not isinstance(splits, DataSplits):
        raise UserError(f"dataset: {builder} returned {type(splits).__name__}, expected DataSplits")
    if len(splits.class_names) != splits.num_classes:
        raise UserError(f"dataset: {builder} gives {len(splits.class_names)} class names for "
                        f"{splits.num_classes} classes")
    for split in ("train", "val", "test"):
        if len(getattr(splits, split)) == 0:
            raise UserError(f"dataset: the {split} split is empty; the dataset is too small for its split fractions")
        labels = getattr(getattr(splits, split), "labels", None)
        if splits.num_classes > 1 and isinstance(labels, torch.Tensor) and not labels.is_floating_point() \
                and not bool(((labels >= 0) & (labels < splits.num_classes)).all()):
            raise UserError(f"dataset: {builder}'s {split} split has labels from {int(labels.min())} to "
                            f"{int(labels.max())}, outside its {splits.num_classes} classes (0..{splits.num_classes - 1})")


def build_run(cfg: DictConfig, device: torch.device, output_dir: Path | None = None,
              results: dict | None = None) -> Run:
    """Data, method, model, optimizer and loaders of a (validated) run config, wired into a `Run`.

    `results` (metrics.json in the making) receives what the data and the method say about the run.
    """
    results = results if results is not None else {}
    seed_everything(cfg.seed)
    splits = build(cfg.dataset)
    check_splits(splits, cfg.dataset.get("_target_", "the dataset builder"))
    method = build(cfg.method)
    # dataset.task / dataset.loss (CMU-MOSEI): a method refuses a task it does not declare, before training
    method.set_task(cfg.dataset.get("task", "classification"), cfg.dataset.get("loss", "auto"))
    modalities = method.select_modalities(list(splits.modalities))
    method.check_modalities(modalities)
    results.update(task=method.task, loss=method.loss_name)
    results.update(modalities=modalities, method_family=method.family, val_source=splits.val_source,
                   class_names=list(splits.class_names),  # label i means class_names[i]
                   dataset_notes=splits.notes, data_identity=data_identity(splits),
                   split_sizes={"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)})
    log.info("data: %s; train %d, val %d (%s), test %d", ", ".join(f"{m} {splits.modalities[m].kind}"
             f"{list(splits.modalities[m].shape)}" for m in modalities), len(splits.train), len(splits.val),
             splits.val_source, len(splits.test))

    seed_everything(cfg.seed)  # the model's initialisation does not depend on how the data was built
    model = build_model({m: splits.modalities[m] for m in modalities}, cfg.backbone, splits.num_classes,
                        cfg.masking).to(device)
    optimizer = build(cfg.optimizer, params=model.parameters())
    scheduler = build(cfg.scheduler, optimizer=optimizer) if cfg.get("scheduler") is not None else None
    hw = cfg.hardware
    settings = LoaderSettings(cfg.trainer.batch_size, hw.num_workers, hw.pin_memory and device.type == "cuda",
                              cfg.trainer.get("drop_last", False))
    run = Run(model=model, method=method, optimizer=optimizer, scheduler=scheduler, train_loader=None,
              val_loader=None, test_loader=None, device=device, num_classes=splits.num_classes,
              seed=cfg.seed, loader_settings=settings, precision=hw.precision,
              grad_clip=cfg.trainer.grad_clip, output_dir=output_dir,
              cache_dir=Path(cfg.paths.cache_dir) if cfg.get("paths") else None,
              config=results.get("config") or _config_dict(cfg))
    run.train_loader = run.make_loader(splits.train, train=True)
    run.val_loader = run.make_loader(splits.val, train=False)
    run.test_loader = run.make_loader(splits.test, train=False)
    log.info("model: %d parameters; method %s; %d epochs on %s", sum(p.numel() for p in model.parameters()),
             method.name, cfg.trainer.epochs, device)
    return run


@torch.no_grad()
def _forward_flops(run: Run, output_dir: Path) -> dict[str, float | None]:
    """Inference FLOPs per sample of the method's prediction, and fvcore's per-module table beside it."""
    batch = next(iter(run.test_loader)).to(run.device)
    model = run.model.eval()

    def predict():
        return run.method.eval_fuse(run, model.encode(batch.inputs))

    _, flops = count_flops(predict)
    fvcore = write_fvcore_table(model, batch.inputs, output_dir / "flops_fvcore.txt", write=write_text)
    return {"flops/forward_per_sample": flops / len(batch), "flops/fvcore_forward_per_sample": fvcore}
