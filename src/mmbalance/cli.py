"""Entry points: `python -m mmbalance [overrides]` / `mmbalance [overrides]` train; `mmbalance report DIR...`;
`mmbalance gap DIR...` (the modality-gap analysis); `mmbalance prepare DATASET --root RAW` (datasets)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import mmbalance.config  # noqa: F401  (registers ${mmbalance_compose_parts:}, which hybrid method configs resolve)
from mmbalance.engine import threads
from mmbalance.engine.identity import job_dir_name
from mmbalance.errors import SweepJobFailed

# conf/ sits at the repository root next to src/ (an editable install, as `make` does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

log = logging.getLogger("mmbalance")

# hydra.sweep.subdir names a job's folder by its sorted overrides (conf/hydra/default.yaml); registered at
# import, so a job pickled to another process (submitit) resolves it too
OmegaConf.register_new_resolver("mmbalance_job_dir", lambda overrides: job_dir_name(list(overrides)), replace=True)

# the sweep's folder, set in the sweep's main process when Hydra starts it (OutputFolders), for the Ctrl-C advice
_sweep_dir: Path | None = None
_sweep_dir_given = False
# an Optuna sweep's study ("optuna", its storage or None), whose re-run adds trials instead of resuming jobs
_study: tuple[str, str | None] | None = None
# sweep jobs of this process refused before they recorded a run (a folder in use or holding another run): their
# folders' metrics.json are another run's or none, so only this list counts them (jobs of launchers that run them
# in other processes, such as joblib, are not seen here)
_refused_jobs: list[str] = []


class OutputFolders(Callback):
    """Registered in conf/hydra/default.yaml (hydra.callbacks). Checks the run or sweep folder before Hydra
    creates it, where a failure would be Hydra's traceback, and keeps the sweep's folder, which only the sweep's
    jobs know otherwise (the default one is named by the time it starts)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_output_folder("hydra.run.dir", config.hydra.run.dir, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _sweep_dir, _sweep_dir_given, _study
        _sweep_dir = Path(config.hydra.sweep.dir).absolute()
        _sweep_dir_given = _given("hydra.sweep.dir", config.hydra.overrides.hydra)
        sweeper = config.hydra.get("sweeper") or {}
        if "optuna" in str(sweeper.get("_target_", "")).lower():
            _study = ("optuna", sweeper.get("storage"))
            _check_optuna_storage(sweeper)
        _check_output_folder("hydra.sweep.dir", _sweep_dir, "sweep")
        # Hydra raises a failed job's error again once the sweep's jobs have ended: passed on to console_main,
        # which sums the sweep up, instead of printed with a traceback
        os.environ["HYDRA_FULL_ERROR"] = "1"


def _check_output_folder(key: str, folder, what: str) -> None:
    """Create `folder` and write a file in it, or exit with one message naming `key`, the folder and why not."""
    folder = Path(folder).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # False, not an error, if unreadable
        reason = f"{existing} is a file, not a folder" if not os.path.isdir(existing) else exc.strerror or str(exc)
        # SystemExit: Hydra turns a callback's exception into a warning
        raise SystemExit(f"error: {key}={folder}: cannot create or write the {what} folder ({reason}); "
                         f"choose another with {key}=<folder>") from None


def _check_optuna_storage(sweeper) -> None:
    """An Optuna storage that cannot be opened, or that holds the study with another direction, is one message
    naming the option (SystemExit, as `_check_output_folder`), before the sweeper's traceback would say it."""
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage:
        return
    import optuna

    try:
        summaries = optuna.study.get_all_study_summaries(optuna.storages.get_storage(str(storage)))
    except Exception as exc:  # SQLAlchemy's OperationalError (no such folder, not a database), an unknown dialect
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise SystemExit(f"error: hydra.sweeper.storage={storage}: cannot open the Optuna study database ({detail}); "
                         "give a database URL whose folder exists, e.g. sqlite:///$PWD/optuna.db") from None
    direction = sweeper.get("direction")  # one, or a list for a multi-objective study
    wanted = [str(d).lower() for d in (direction if OmegaConf.is_list(direction) else [direction])]
    for summary in summaries:
        stored = [d.name.lower() for d in getattr(summary, "directions", None) or [summary.direction]]
        if summary.study_name == name and stored != wanted:
            raise SystemExit(f"error: hydra.sweeper.direction={','.join(wanted)}: the study {name!r} in {storage} "
                             f"was created to {','.join(stored)}; continue it with that direction, or start another "
                             "study with hydra.sweeper.study_name=<name>")


def _given(key: str, overrides) -> bool:
    return any(str(o).lstrip("+").partition("=")[0] == key for o in overrides)


def _rerun_with(key: str, folder: Path, given: bool) -> str:
    """How to re-run into `folder`: the same command, naming the folder unless the command already does (a default
    folder is a new one each time). A path Hydra would split (commas, spaces) is quoted for Hydra and the shell."""
    if given:
        return "re-run the same command"
    value = str(folder) if re.fullmatch(r"[\w./-]+", str(folder)) else f'"{folder}"'
    return f"re-run the same command with {shlex.quote(f'{key}={value}')}"


def _group_options(group: str) -> list[str]:
    """The options of config group `group` (conf/<group>/**.yaml, nested ones as `sub/name`)."""
    return sorted(p.relative_to(CONF_DIR / group).with_suffix("").as_posix() for p in (CONF_DIR / group).rglob("*.yaml"))


def _variant_of(group: str, name: str) -> str | None:
    """`group=option group.variant=name` when `name` is a variant an option of the group declares on its `variant:`
    line (method=amss_plus is method=amss method.variant=amss_plus), else None."""
    for option in _group_options(group):
        for line in (CONF_DIR / group / f"{option}.yaml").read_text().splitlines():
            if line.startswith("variant:") and re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", line):
                return f"{group}={option} {group}.variant={name}"
    return None


def _refuse_bad_group_choices(args: list[str]) -> None:
    """A config-group choice that is not one of the group's options, checked before Hydra starts: `<group>=null`
    (logger=null, method=null) is Hydra's ValueError with a traceback; an unknown name (method=amss_plus,
    method=ogm_gee) is Hydra's "Could not find" followed by its config search path. One message instead, with the
    group's options, the closest names and, for a method variant, the option that has it. Sweep lists
    (`a,b`, `[a,b]`) are checked item by item; Hydra's sweep functions (choice(...), glob(...)) are left to Hydra."""
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key == "hydra" or "/" in key or not (CONF_DIR / key).is_dir():
            continue
        options = _group_options(key)
        if value.strip().lower() in ("null", "none", "~"):
            sys.exit(f"error: {arg}: a config group takes one of its options ({', '.join(options)})"
                     + (" or a list of them ([] for none)" if key == "logger" else "")
                     + f"; `~{key}` drops the group")
        if "(" in value or "$" in value:  # choice(...), glob(...), range(...), an interpolation: Hydra's to read
            continue
        for name in (v.strip() for v in value.strip().strip("[]").split(",")):
            if not name or name in options:
                continue
            variant = _variant_of(key, name)
            close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
            hint = (f" (did you mean `{variant}`?)" if variant else
                    f" (did you mean {' or '.join(close)}?)" if close else "")
            sys.exit(f"error: {arg}: {key} has no option {name!r}{hint}; its options are: {', '.join(options)}")


def _sweep_interrupted() -> str:
    """What a re-run of the interrupted sweep does. A grid sweep's jobs are fixed: the re-run skips the finished
    ones and resumes the others. An Optuna study's trials are drawn as it goes: its storage keeps the finished
    trials, the interrupted one stays RUNNING there (Optuna never resumes a trial), and a re-run asks for
    hydra.sweeper.n_trials new ones; without a storage a re-run is a new study."""
    rerun = _rerun_with("hydra.sweep.dir", _sweep_dir, _sweep_dir_given)
    if _study is None:
        return f"interrupted: the sweep stops here; {rerun} to skip its finished jobs and resume the others"
    storage = _study[1]
    if not storage:
        return ("interrupted: the study stops here; it has no storage (hydra.sweeper.storage), so a re-run starts a "
                "new study; the finished trials' runs stay in their folders")
    return (f"interrupted: the study stops here; {rerun} to continue it from its storage {storage}: the finished "
            "trials count, the interrupted one stays RUNNING there, and the re-run runs hydra.sweeper.n_trials more "
            "trials (lower it to the number left)")


def _sweep_summary(sweep: Path) -> str:
    statuses = {path.parent.name: _status(path) for path in sorted(sweep.glob("*/metrics.json"))}
    failed = [name for name, status in statuses.items() if status == "failed" and name not in _refused_jobs]
    refused = (f"{len(_refused_jobs)} job(s) were refused before they recorded a run: {'; '.join(_refused_jobs)} "
               "(each one's message is above)") if _refused_jobs else ""
    if not failed:  # only jobs refused before they wrote anything (a folder in use or holding another run)
        return (f"error: in the sweep in {sweep}, " + (refused or "a job ended with an error before it recorded a run "
                "(its message is above)") + "; the other runs' results are intact")
    return (f"error: {len(failed)} of the {len(statuses)} runs in the sweep folder {sweep} failed: {'; '.join(failed)} "
            "(each one's message is above, its traceback in its train.log)" + (f"; {refused}" if refused else "")
            + "; the other runs' results are intact")


def _status(metrics_json: Path) -> str | None:
    try:
        return json.loads(metrics_json.read_text()).get("status")
    except (OSError, ValueError):
        return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    quiet_other_ranks(cfg)
    # OMP_WAIT_POLICY counts only if set before torch loads its OpenMP runtime: here, before the imports below
    threads.prepare_process(cfg.get("hardware"), hc.launcher if hc.mode == RunMode.MULTIRUN else None)
    # torch and friends load here, not at import time
    from mmbalance.errors import RunFolderError, UserError, log_traceback_to_files
    from mmbalance.train import train

    choices = OmegaConf.to_container(hc.runtime.choices)
    choices = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = train(cfg, run_dir, choices, list(hc.overrides.task))
    except (UserError, KeyboardInterrupt) as exc:
        # an expected ending (bad input, divergence, Ctrl-C): the traceback goes to train.log only
        interrupted = isinstance(exc, KeyboardInterrupt)
        if not interrupted:
            message = f"error: {exc}"
        elif multirun:  # console_main says how to resume the sweep
            message = "interrupted: this sweep job stops here"
        else:
            rerun = _rerun_with("hydra.run.dir", run_dir, _given("hydra.run.dir", hc.overrides.hydra))
            message = f"interrupted: the run stops here; {rerun} to resume it from its last checkpoint"
        rank = _other_rank(cfg)
        if isinstance(exc, RunFolderError):
            # a refused start: the folder may hold another run, whose train.log gets one line saying so, not this
            # process's traceback
            log_traceback_to_files(f"a start was refused here: {exc}", None)
        elif not (interrupted and rank is not None):  # a Ctrl-C reaches every rank: train.log gets rank 0's
            log_traceback_to_files(message, exc)
        if rank is None:
            print(f"{message}\n(log: {run_dir / 'train.log'})", file=sys.stderr)
        elif not interrupted:  # rank 0 gives the Ctrl-C advice once; an error is this rank's own, marked as such
            print(f"[rank {rank}] {message}", file=sys.stderr)
        if multirun and interrupted:
            raise  # stops the sweep: console_main names its folder
        if multirun and isinstance(exc, RunFolderError):
            _refused_jobs.append(run_dir.name)
        if multirun:
            # Hydra records this job as failed and goes on with the sweep's other jobs; console_main sums up
            raise SweepJobFailed(f"{run_dir}: {exc}") from None
        raise SystemExit(130 if interrupted else 1) from None
    except Exception as exc:  # a bug, or a peer process lost under DDP: Hydra prints it; train.log keeps it too
        if _other_rank(cfg) is None:  # another rank's failure is in train.log already (train.py)
            log_traceback_to_files(f"error: {type(exc).__name__}: {exc}", exc)
        raise
    m = results["metrics"]
    log.info("%s  -> %s", final_summary(results), hc.runtime.output_dir)
    key = cfg.get("optimized_metric") or "val/acc"
    if key not in m:
        raise SystemExit(f"error: optimized_metric={key!r} is not among the run's metrics ({', '.join(sorted(m))})")
    return m[key]


# a regression run's final line: its metrics in this order (metrics.json's names), then the selection metric when
# it is another one (acc-7, F1)
REGRESSION_SUMMARY = {"mae": "MAE", "corr": "corr", "acc2_nonneg": "acc-2"}


def final_summary(results: dict) -> str:
    """The test metrics of the run's last console line. Classification: "test acc 0.9333  macro-F1 0.9320
    imbalance 0.2350" (imbalance in accuracy points, as acc). Regression: the metrics runs are selected on,
    "test MAE 0.5698  corr 0.4100  acc-2 0.7500  imbalance 0.2350 MAE points" (its Shapley value is -MAE)."""
    m = results["metrics"]

    def num(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.4f}"

    if results.get("task") != "regression":
        return f"test acc {num('test/acc')}  macro-F1 {num('test/macro_f1')}  imbalance {num('test/imbalance')}"
    shown = dict(REGRESSION_SUMMARY)
    selected = results.get("select_metric")
    if selected and selected not in shown:
        shown[selected] = selected
    parts = [f"{label} {num(f'test/{key}')}" for key, label in shown.items()]
    imbalance = num("test/imbalance")
    return "test " + "  ".join(parts) + f"  imbalance {imbalance}" + ("" if imbalance == "n/a" else " MAE points")


class _RankFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None, rank: int):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


def _other_rank(cfg: DictConfig) -> int | None:
    """This process's rank under hardware=ddp when it is not rank 0; None otherwise."""
    rank = int(os.environ.get("RANK") or 0)
    return rank if rank and (cfg.get("hardware") or {}).get("distributed", False) else None


def quiet_other_ranks(cfg: DictConfig) -> None:
    """Under hardware=ddp only rank 0 logs progress: the other ranks log warnings and errors only, marked with
    their rank, to the console and to the run's train.log (which rank 0 writes)."""
    rank = _other_rank(cfg)
    if rank is None:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python warnings too go through the handlers below, marked with the rank
    for handler in root.handlers:
        if not isinstance(handler.formatter, _RankFormatter):
            handler.setFormatter(_RankFormatter(handler.formatter, rank))



def console_main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from mmbalance.analysis.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        from mmbalance.data.prepare import main as prepare_main

        sys.exit(prepare_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "gap":
        from mmbalance.analysis.modality_gap import main as gap_main

        sys.exit(gap_main(sys.argv[2:]))
    if not CONF_DIR.is_dir():
        sys.exit(f"error: the config folder {CONF_DIR} is missing; install mmbalance from its repository "
                 "with `pip install -e .`")
    _refuse_bad_group_choices(sys.argv[1:])
    try:
        train_main()
    except KeyboardInterrupt:  # in a sweep, or before a run started training (then it ends in train_main)
        if int(os.environ.get("RANK") or 0):  # a torchrun rank other than 0: rank 0 gives the advice once
            raise SystemExit(130) from None
        if _sweep_dir is None:
            print("interrupted", file=sys.stderr)
        else:  # its jobs' records already say "interrupted"
            print(_sweep_interrupted(), file=sys.stderr)
        raise SystemExit(130) from None
    except SweepJobFailed:  # the jobs' messages are printed; a bug's exception goes on to its traceback
        print(_sweep_summary(_sweep_dir), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    console_main()
