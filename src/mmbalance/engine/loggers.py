"""Experiment loggers (`logger=tensorboard|mlflow|wandb|csv|auto`, several as `logger=[tensorboard,mlflow]`).

A run folder's own files (history.csv, metrics.json, train.log) are the run's record and are written whatever
is chosen; a logger mirrors them into a tracker for browsing (docs/loggers.md). So:

* a chosen logger whose package is missing is refused before training, naming the extra to install;
* a logger that fails (at start, mid-run or at the end) is switched off with a warning, noted in metrics.json
  "loggers", and never fails the run or touches its record;
* per-epoch values are logged with step = epoch. A resumed run continues the same tracker run (the MLflow run
  id and W&B id are kept in <run folder>/loggers.json) and logs each epoch once: epochs the checkpoint holds
  but the tracker missed (a kill between the two) are filled in, and TensorBoard's event files are rebuilt
  from the checkpoint's history, like history.csv;
* under hardware=ddp only rank 0 logs (train.py builds the loggers there only).

Every tracker package is imported inside the functions that need it: they are optional extras.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmbalance.engine.checkpoint import write_json
from mmbalance.engine.identity import flatten
from mmbalance.errors import ConfigError, UserError, log_traceback_to_files

log = logging.getLogger("mmbalance")

INSTALL = "pip install 'mmbalance[loggers]'"
STATE_FILE = "loggers.json"  # in a run folder: its tracker runs; in a sweep folder: the sweep's tracker name
TB_OWNER = ".mmbalance_run.json"  # in a run's own sub-folder of a shared TensorBoard folder: the run that owns it
OPTIONS = ("auto", "csv", "tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # logger -> module it needs
WANDB_MODES = ("offline", "online", "disabled")
# every option conf/logger/<name>.yaml has, with its type: a key no code reads (`+logger.mlflow.trackin_uri=...`,
# which Hydra lets through) or a value of another type is refused before training, as in the other config groups
_NAME = str | None
OPTION_SCHEMAS: dict[str, dict[str, Any]] = {
    "csv": {},
    "tensorboard": {"dir": str, "hparams": bool, "if_installed": bool},
    "mlflow": {"tracking_uri": _NAME, "experiment": _NAME, "run_name": _NAME, "artifacts": bool},
    "wandb": {"mode": Literal[WANDB_MODES] | None, "project": _NAME, "entity": _NAME, "group": _NAME,
              "name": _NAME},
}
# the MLflow tracking URI schemes the client opens (a database scheme may name its driver: postgresql+psycopg2);
# no scheme is a local folder
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql",
                  "mssql")
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
RECORD_ARTIFACT = "mmbalance_metrics.json"  # metrics.json in MLflow's artifacts
FINAL = "final/"  # prefix of the run's final metrics (metrics.json "metrics") in every tracker
# MLflow's HTTP defaults (7 retries with a doubling backoff, 120 s per request) hold a run for about 4 minutes
# when the tracking server is down; a mirror fails fast instead. Set around the MLflow logger's calls only, and
# only where the environment does not set them (docs/loggers.md).
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
REACH_TIMEOUT_S = 3.0  # an http(s) tracking server must accept a connection this fast at start


@dataclass
class RunInfo:
    """What a logger needs to know about the run it mirrors."""

    run_dir: Path
    sweep_dir: Path | None = None  # the sweep folder when the run is a sweep job (groups its runs)
    config: dict = field(default_factory=dict)  # the resolved config (plain containers)
    choices: dict = field(default_factory=dict)  # hydra.runtime.choices: dataset, method, ...
    tags: list = field(default_factory=list)
    identity: str | None = None
    sweep_label: str | None = None  # the sweep's recorded name (Loggers.start reads or records it: _sweep_name)

    @property
    def name(self) -> str:
        """The job folder's name: a sweep job's folder is named by its overrides (method=ogm_ge,seed=1)."""
        return self.run_dir.name

    @property
    def sweep_name(self) -> str | None:
        """The MLflow experiment and W&B group of a sweep's jobs."""
        if self.sweep_dir is None:
            return None
        return self.sweep_label or _shown(self.sweep_dir)


# ---------------------------------------------------------------------------------------------- building


def build_loggers(cfg, run_dir: Path, results: dict | None = None, sweep_dir: Path | None = None) -> Loggers:
    """The loggers the config chooses (`cfg.logger`), checked but not started: nothing is opened or written.

    Raises UserError when a chosen logger's package is missing (all of them named at once) or an option is
    invalid. `results` (metrics.json in the making) gives the resolved config and choices and receives
    "loggers": what each logger did. `sweep_dir` defaults to Hydra's sweep folder when this is a sweep job.
    """
    from omegaconf import DictConfig, OmegaConf

    results = results if results is not None else {}
    node = cfg.get("logger") if cfg is not None else None
    chosen: dict[str, dict] = {}
    if node is not None:
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        chosen = {str(k): dict(v or {}) for k, v in plain.items()}
    unknown = [k for k in chosen if k not in OPTIONS]
    if unknown:
        raise UserError(f"logger: unknown logger(s) {unknown}; expected any of {list(OPTIONS)} "
                        "(several as logger=[tensorboard,mlflow])")
    problems = [p for name, options in chosen.items() for p in option_problems(name, options)]
    if problems:
        raise ConfigError(problems)
    if sweep_dir is None:
        sweep_dir = hydra_sweep_dir()
    config = results.get("config")
    if config is None and cfg is not None:
        config = OmegaConf.to_container(cfg, resolve=True)
    info = RunInfo(run_dir=Path(run_dir), sweep_dir=Path(sweep_dir) if sweep_dir is not None else None,
                   config=config or {}, choices=dict(results.get("choices") or {}),
                   tags=[str(t) for t in (config or {}).get("tags") or []], identity=results.get("identity"))
    status: dict[str, dict] = {"csv": {"status": "on", "where": str(info.run_dir)}}
    loggers: list[Logger] = []
    missing: list[str] = []
    for name in ("tensorboard", "mlflow", "wandb"):
        if name not in chosen:
            continue
        options = chosen[name]
        if not _importable(PACKAGES[name]):
            if options.get("if_installed", False):
                note = f"the `{PACKAGES[name]}` package is not installed ({INSTALL} turns it on)"
                status[name] = {"status": "skipped", "note": note}
                log.info("logger=auto: %s; this run logs to its folder's files only", note)
                continue
            missing.append(name)
            continue
        loggers.append(LOGGERS[name](options))
    if missing:
        names = ", ".join(f"logger={m} needs the `{PACKAGES[m]}` package" for m in missing)
        raise UserError(f"{names}, not installed here; install the loggers extra: {INSTALL} "
                        "(or choose logger=csv: the run folder's files only)")
    for lg in loggers:
        lg.check()
        status[lg.name] = {"status": "chosen", "where": lg.where(info)}
    results["loggers"] = status
    return Loggers(loggers, info, status)


def _uri_scheme(uri: str) -> str:
    """A tracking URI's scheme without its driver (`postgresql+psycopg2://` -> postgresql); "" for a local path
    (a Windows drive letter, `C:\\mlruns`, is one)."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    return "" if len(scheme) <= 1 else scheme.split("+")[0]


def option_problems(name: str, options: dict) -> list[str]:
    """What is wrong with logger `name`'s options (OPTION_SCHEMAS): keys no code reads, with the closest known
    one, values of another type, an MLflow tracking URI of a scheme MLflow cannot open."""
    import difflib

    from mmbalance.constraints import value_problems

    schema = OPTION_SCHEMAS.get(name, {})
    problems = []
    for key, value in options.items():
        where = f"logger.{name}.{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=2)
            problems.append(f"{where}: unknown option, no code reads it; " + (
                f"did you mean {' or '.join(f'logger.{name}.{c}' for c in close)}?" if close else
                f"logger {name} has the options {', '.join(schema) or 'none'}"))
        else:
            problems.extend(value_problems(where, value, schema[key]))
    uri = options.get("tracking_uri") if name == "mlflow" else None
    if isinstance(uri, str) and uri:
        scheme = _uri_scheme(uri)
        if scheme and scheme not in MLFLOW_SCHEMES:
            problems.append(f"logger.mlflow.tracking_uri={uri!r}: MLflow cannot open a {scheme!r} URI; expected a "
                            f"folder or a URI of {', '.join(MLFLOW_SCHEMES)} (e.g. http://host:5000, "
                            "sqlite:///path/mlflow.db)")
    return problems


def hydra_sweep_dir() -> Path | None:
    """The sweep folder when this process runs a Hydra sweep job (`-m`, sweep=...), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a core dependency
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _superseded_mlflow_run(run_dir: Path) -> str | None:
    """The MLflow run id of the record resume=never last moved to `<run>/superseded/<time>/` (its loggers.json),
    or None: a new MLflow run in a folder that held another run is tagged as superseding it, and it as superseded."""
    from mmbalance.engine.identity import SUPERSEDED

    for state in sorted((Path(run_dir) / SUPERSEDED).glob(f"*/{STATE_FILE}"), reverse=True):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            run_id = json.loads(state.read_text()).get("mlflow", {}).get("run_id")
            if run_id:
                return str(run_id)
    return None


def supersede_logger_files(run_dir: Path, target: Path | None, cfg=None) -> None:
    """resume=never moved the previous run's files to `target`: the loggers' own files of that run go with them
    (loggers.json, so the new run starts new tracker runs; the TensorBoard folder, so nothing is deleted; the W&B
    offline runs, so `wandb sync <run>/wandb/offline-run-*` uploads the new run only). An MLflow store stays where
    it is (a sweep's is shared, and MLflow keeps an opened file store for the process): the new MLflow run is tagged
    `mmbalance.supersedes` with the old one's id."""
    if target is None:
        return
    run_dir = Path(run_dir)
    moves = [(run_dir / STATE_FILE, Path(target) / STATE_FILE), (run_dir / "wandb", Path(target) / "wandb")]
    node = cfg.get("logger") if cfg is not None else None
    tb_dir = (node.get("tensorboard") or {}).get("dir", "tensorboard") if node is not None else "tensorboard"
    # only a folder inside the run folder is the run's: `dir=../tb` names a folder other runs share
    if tb_dir and not Path(str(tb_dir)).is_absolute() and _inside(run_dir / str(tb_dir), run_dir):
        moves.append((run_dir / str(tb_dir), Path(target) / str(tb_dir)))
    # the run's own sub-folder of a shared TensorBoard folder (recorded in its loggers.json) goes with it
    with contextlib.suppress(OSError, ValueError, AttributeError):
        own = json.loads((run_dir / STATE_FILE).read_text()).get("tensorboard", {}).get("dir")
        if own and not _inside(Path(own), run_dir):
            dest = Path(target) / "tensorboard"
            if dest.exists() or any(d == dest and p.exists() for p, d in moves):
                dest = Path(target) / "tensorboard-shared"
            moves.append((Path(own), dest))
    for path, dest in moves:
        if path.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))


# ---------------------------------------------------------------------------------------------- running


class Loggers:
    """The chosen loggers as one: start, log_epoch, finish. None of its methods raises for a logger's failure."""

    def __init__(self, loggers: list[Logger], info: RunInfo, status: dict[str, dict]):
        self.loggers = list(loggers)
        self.info = info
        self.status = status
        self.state_path = info.run_dir / STATE_FILE
        self.state: dict[str, dict] = {}
        self.last_epoch = -1  # the last epoch of the record (the checkpoint's history and the epochs logged since)
        # per logger, the last epoch its calls returned for; a Ctrl-C inside a call leaves it below last_epoch,
        # so that epoch is logged at the resume rather than recorded as held (loggers.json "logged_through")
        self.sent: dict[str, int] = {}
        self.started = False

    def start(self, history: list[dict], first_epoch: int) -> None:
        """Open every logger, continuing the tracker runs this folder's loggers.json names, and log the epochs of
        `history` (the checkpoint's) that a tracker does not hold yet. `first_epoch` is the epoch training
        starts at (0 fresh, > 0 resumed)."""
        self.started = True
        previous = self._read_state()
        self.last_epoch = max((int(r["epoch"]) for r in history), default=-1)
        if self.info.sweep_dir is not None and self.loggers:  # before the destinations, which name the sweep
            self.info.sweep_label = _sweep_name(self.info.sweep_dir)
        for lg in list(self.loggers):
            before = previous.get(lg.name)
            destination = lg.destination(self.info)
            logged_through = -1
            if before is not None and before.get("destination") != destination:
                before = None  # another tracker, store or project: a new run there, with the whole history
            if before is not None and first_epoch == 0 and int(before.get("logged_through", -1)) >= 0:
                before = None  # the record starts over (resume=never, an unreadable folder): so does the tracker run
            if before is not None:
                logged_through = int(before.get("logged_through", -1))
            try:
                ids = lg.start(self.info, before, history, logged_through)
            except Exception as exc:  # noqa: BLE001 - a tracker must never fail the run
                self._fail(lg, "start", exc)
                continue
            resumed = bool(ids.pop("resumed", before is not None))
            self.sent[lg.name] = max(logged_through, self.last_epoch)  # start logged the history it lacked
            held = self.sent[lg.name] if lg.durable else logged_through
            self.state[lg.name] = {"destination": destination, **ids, "logged_through": held}
            self.status[lg.name] = {"status": "on", "where": lg.where(self.info),
                                    **({"resumed": True} if resumed else {}), **lg.describe()}
            log.info("logger %s: %s%s%s", lg.name, lg.where(self.info), " (resumed)" if resumed else "", lg.hint())
        self._write_state()

    def log_epoch(self, row: dict) -> None:
        """One epoch's history row, step = row["epoch"]; call it after the checkpoint of that epoch is written."""
        epoch = int(row["epoch"])
        self.last_epoch = max(self.last_epoch, epoch)
        for lg in list(self.loggers):
            try:
                lg.log_rows([row])
            except Exception as exc:  # noqa: BLE001
                self._fail(lg, f"epoch {epoch}", exc)
                continue
            self.sent[lg.name] = max(self.sent[lg.name], epoch)
            if lg.durable:
                self.state[lg.name]["logged_through"] = self.sent[lg.name]
        self._write_state()

    def finish(self, results: dict) -> None:
        """The final metrics (results["metrics"]) and the run's status, then close. Safe to call once started or
        not (a run that failed before training has nothing to close)."""
        if not self.started:
            return
        for lg in list(self.loggers):
            if lg.name not in self.state:
                # the run ended (Ctrl-C) inside the loggers' start, before this one's start returned: nothing of
                # it is recorded, so it is only closed; the resume starts it again with the whole history
                with contextlib.suppress(Exception):
                    lg.abort()
                continue
            try:
                lg.finish(results, max(self.last_epoch, 0))
            except Exception as exc:  # noqa: BLE001
                self._fail(lg, "the end", exc)
                continue
            self.state[lg.name]["finished"] = results.get("status")
            # what this logger's own calls returned for, now on disk (finish flushed it): not the record's last
            # epoch, which a Ctrl-C inside its call for that epoch kept from it
            self.state[lg.name]["logged_through"] = self.sent[lg.name]
            self.status[lg.name]["status"] = "done"
        self.loggers = []
        self._write_state()

    # ---- bookkeeping ----
    def _fail(self, lg: Logger, stage: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".strip()
        if len(message) > 500:
            message = message[:500] + "..."
        log.warning("logger %s failed at %s (%s); it is off for the rest of this run. The run goes on: "
                    "history.csv and metrics.json are its record", lg.name, stage, message.splitlines()[0])
        log_traceback_to_files(f"logger {lg.name} failed at {stage}", exc, logging.WARNING)
        with contextlib.suppress(Exception):
            lg.abort()
        self.loggers.remove(lg)
        self.status[lg.name] = {"status": "failed", "where": lg.where(self.info), "error": f"at {stage}: {message}"}
        self.state.pop(lg.name, None)

    def _read_state(self) -> dict[str, dict]:
        try:
            state = json.loads(self.state_path.read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        if not self.state:
            return
        try:
            merged = {**self._read_state(), **self.state}
            write_json(merged, self.state_path)
        except OSError as exc:
            log.warning("could not write %s (%s); a resumed run will start new tracker runs", self.state_path, exc)


class Logger:
    """One tracker. `start` returns what a resumed run needs to continue its tracker run (stored in loggers.json)."""

    name = ""
    # True: a step is on disk (or on the server) once log_rows returns; False: only once finish returns, so
    # the epochs since the last finish are logged again after a kill (their values are the same)
    durable = True

    def __init__(self, options: dict):
        self.options = options

    def check(self) -> None:
        """Refuse invalid options before training (UserError)."""

    def where(self, info: RunInfo) -> str:
        raise NotImplementedError

    def destination(self, info: RunInfo) -> dict:
        """Where the tracker run lives; a resumed run whose destination changed starts a new tracker run."""
        return {"where": self.where(info)}

    def describe(self) -> dict:
        return {}

    def hint(self) -> str:
        """Said after where it logs, once started."""
        return ""

    def start(self, info: RunInfo, previous: dict | None, history: list[dict], logged_through: int) -> dict:
        raise NotImplementedError

    def log_rows(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def finish(self, results: dict, step: int) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Release what start opened after a failure (best effort)."""


class TensorBoardLogger(Logger):
    """Scalars per epoch (step = epoch), the Shapley / imbalance / per-modality accuracy curves on one chart each
    (CUSTOM SCALARS), the config as text, and the config as hparams beside the final metrics (HPARAMS).

    Its folder mirrors the checkpoint's history: every start rewrites it from that history (as history.csv is),
    so a resumed run shows one curve with each epoch once. That folder is the run's own: `dir` inside the run
    folder (the default), or, when `dir` is outside it and so shared with other runs, a sub-folder of it for
    this run alone (_own_folder): a run never deletes another run's event files.
    """

    name = "tensorboard"

    def where(self, info: RunInfo) -> str:
        log_dir = getattr(self, "log_dir", None)  # once started: the folder it writes (a shared dir's sub-folder)
        return str(log_dir if log_dir is not None else self._dir(info))

    def destination(self, info):
        return {"where": str(self._dir(info))}  # the configured folder: a resume finds its sub-folder in `dir`

    def _dir(self, info: RunInfo) -> Path:
        path = Path(str(self.options.get("dir") or "tensorboard"))
        return path if path.is_absolute() else info.run_dir / path

    def _own_folder(self, info: RunInfo, previous: dict | None) -> Path:
        """This run's sub-folder of a shared folder: `<dir>/<run folder's parent>/<run folder>` (a sweep job's
        `<sweep>/<job>`, a single run's `<date>/<time>`), which TensorBoard lists as a run of its own. The
        sub-folder's TB_OWNER file names the run folder it belongs to: one that another run owns (or that holds
        event files of unknown origin) is never taken, and the name gains a digest of this run folder's path
        instead. A resumed run continues the sub-folder its loggers.json records."""
        root = self._dir(info)
        me = str(info.run_dir.resolve())
        run = Path(me)
        label = Path(run.parent.name, run.name)
        digest = hashlib.sha256(me.encode()).hexdigest()[:8]
        candidates = [root / label, root / label.parent / f"{label.name}-{digest}"]
        if (previous or {}).get("dir"):
            candidates.insert(0, Path(previous["dir"]))

        def owner(folder: Path) -> str | None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return json.loads((folder / TB_OWNER).read_text()).get("run_dir")
            return None

        with _folder_lock(root):  # jobs of a sweep may start together
            for folder in candidates:
                held = owner(folder)
                if held == me or held is None and not any(folder.glob("events.out.tfevents.*")):
                    folder.mkdir(parents=True, exist_ok=True)
                    write_json({"run_dir": me}, folder / TB_OWNER)
                    return folder.resolve()
        raise RuntimeError(f"{candidates[-1]} belongs to another run ({owner(candidates[-1])})")

    def start(self, info, previous, history, logged_through):
        from torch.utils.tensorboard import SummaryWriter

        self.info = info
        shared = not _inside(self._dir(info), info.run_dir)
        log_dir = self.log_dir = self._own_folder(info, previous) if shared else self._dir(info)
        # the folder is this run's alone (above): every event file in it is an earlier start's of this run
        old = sorted(log_dir.glob("events.out.tfevents.*")) if log_dir.is_dir() else []
        for path in old:
            path.unlink()
        # purge_step=0: a TensorBoard already showing this folder drops what it read from the files just removed
        self.writer = SummaryWriter(str(log_dir), purge_step=0 if old else None, flush_secs=30)
        self.writer.add_custom_scalars({"balance": {
            "Shapley contribution (val)": ["Multiline", [r"val/shapley/.*"]],
            "imbalance (val)": ["Multiline", [r"val/imbalance"]],
            "accuracy per modality (val)": ["Multiline", [r"val/acc/.*"]],
        }})
        self.writer.add_text("config", "```\n" + json.dumps(info.config, indent=2, default=str) + "\n```", 0)
        self.log_rows(history)
        return {"dir": str(log_dir)} if shared else {}

    def log_rows(self, rows):
        for row in rows:
            step = int(row["epoch"])
            for key, value in _numbers(row).items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, results, step):
        from torch.utils.tensorboard.summary import hparams

        final = {FINAL + k: v for k, v in _numbers(results.get("metrics") or {}).items()}
        for key, value in final.items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_text("status", str(results.get("status")), step)
        if self.options.get("hparams", True) and results.get("status") == "completed":
            # into this run's own writer: SummaryWriter.add_hparams would make a new sub-run (pytorch #32651)
            exp, ssi, sei = hparams(_hparams(self.info), final)
            file_writer = self.writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
        self.writer.flush()
        self.writer.close()

    def abort(self):
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()


@contextlib.contextmanager
def _mlflow_http():
    """MLFLOW_HTTP in the environment during one call (MLflow reads it per request; a decorator of the MLflow
    logger's methods), and urllib3's warning per retry kept off the console: Loggers._fail reports the failure."""
    added = {k: v for k, v in MLFLOW_HTTP.items() if k not in os.environ}
    os.environ.update(added)
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    pool.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool.setLevel(level)
        for key in added:
            os.environ.pop(key, None)


def _reachable(uri: str) -> None:
    """Raise ConnectionError when an http(s) tracking server accepts no connection within REACH_TIMEOUT_S (one
    clear error in seconds, also for a host that drops packets); other URIs and proxied hosts pass."""
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    url = urlparse(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return
    if url.scheme in getproxies() and not proxy_bypass(url.hostname):
        return  # reached through a proxy: the bounded retries decide
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the MLflow tracking server {url.hostname}:{port}: {exc}") from None


class MLflowLogger(Logger):
    """An MLflow run: the config as params, choices and tags as tags, per-epoch metrics (step = epoch), the final
    metrics as final/<name> (names as history.csv's, later `/` as `.`: val/acc.audio), metrics.json (as
    mmbalance_metrics.json) and history.csv as artifacts, and the run's status.

    The default store is a local file store (<run folder>/mlruns, or one <sweep dir>/mlruns shared by a sweep's
    jobs, one experiment per sweep): a folder per run, safe for concurrent jobs, no server. MLflow 3 keeps
    that backend in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true; this process sets that
    for a file store it was given (the viewer needs it too: docs/loggers.md).

    A server is checked at start (REACH_TIMEOUT_S) and every call runs with bounded retries (MLFLOW_HTTP): an
    unreachable tracker costs a run seconds, not minutes.
    """

    name = "mlflow"

    def where(self, info: RunInfo) -> str:
        return self._uri(info)

    def destination(self, info):
        return {"tracking_uri": self._uri(info), "experiment": self._experiment_name(info)}

    def describe(self):
        out = {"run_id": getattr(self, "run_id", None), "experiment": getattr(self, "experiment", None)}
        if getattr(self, "continues", None):
            out["continues"] = self.continues
        return out

    def _uri(self, info: RunInfo) -> str:
        uri = self.options.get("tracking_uri")
        if uri:
            return str(uri)
        return ((info.sweep_dir or info.run_dir) / "mlruns").resolve().as_uri()

    def _experiment_name(self, info: RunInfo) -> str:
        return str(self.options.get("experiment") or info.sweep_name or "mmbalance")

    @_mlflow_http()
    def start(self, info, previous, history, logged_through):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.info = info
        uri = self._uri(info)
        _reachable(uri)
        if _local_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = self._experiment_name(info)
        resumed = False
        self.continues = None
        if previous is not None and previous.get("run_id"):
            try:
                held = self.client.get_run(previous["run_id"]).data.tags.get("mmbalance.identity")
                resumed = True
            except MlflowException:
                log.warning("logger mlflow: run %s recorded in %s is not in %s any more; starting a new run",
                            previous["run_id"], STATE_FILE, uri)
            if resumed and held is not None and held != str(info.identity):
                # resume=force went on with another config (more epochs, another run's folder): MLflow's params
                # cannot change, and params of the old config would misdescribe the result. So the current
                # config gets a new MLflow run with the whole history, linked both ways to the old one, which
                # stays as it was: the record of the shorter run (or of the run forced over)
                resumed, self.continues = False, previous["run_id"]
                log.info("logger mlflow: the config differs from the one of MLflow run %s (params cannot change); "
                         "a new run with the whole history continues it (tag mmbalance.continues)", self.continues)
        if resumed:
            self.run_id = previous["run_id"]
            self.experiment_id = previous.get("experiment_id")
            self.client.update_run(self.run_id, status="RUNNING")
            rows = [r for r in history if int(r["epoch"]) > logged_through]
        else:
            self.experiment_id = self._experiment_id(uri, info)
            tags = {"mmbalance.run_dir": str(info.run_dir.resolve()), "mmbalance.identity": str(info.identity)}
            tags.update({f"mmbalance.choice.{k}": str(v) for k, v in info.choices.items()})
            tags.update({f"mmbalance.tag.{t}": "true" for t in info.tags})
            if info.sweep_name:
                tags["mmbalance.sweep"] = info.sweep_name
            if self.continues:
                tags["mmbalance.continues"] = self.continues
            supersedes = _superseded_mlflow_run(info.run_dir)
            if supersedes:
                tags["mmbalance.supersedes"] = supersedes
            name = str(self.options.get("run_name") or info.name)
            self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            params = [Param(_key(k), _param_value(v)) for k, v in _flat_config(info).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            if self.continues:
                self.client.set_tag(self.continues, "mmbalance.continued_by", self.run_id)
            if supersedes:
                with contextlib.suppress(MlflowException):  # the old run's store may be another one now
                    self.client.set_tag(supersedes, "mmbalance.superseded_by", self.run_id)
            rows = list(history)
        self.log_rows(rows)
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "resumed": resumed,
                **({"continues": self.continues} if self.continues else {})}

    def _experiment_id(self, uri: str, info: RunInfo) -> str:
        from mlflow.exceptions import MlflowException

        # a database store keeps no files: MLflow's default artifact root is then ./mlruns of whatever folder the
        # command was typed in (the repository, a home folder); the run's (or sweep's) folder holds them instead
        database = _uri_scheme(uri) in MLFLOW_DATABASES
        artifacts = ((info.sweep_dir or info.run_dir) / "mlartifacts").resolve().as_uri() if database else None
        # a sweep's jobs may start together: one lock per local store makes "get or create" one step
        with _store_lock(uri):
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(self.experiment, artifact_location=artifacts)
            except MlflowException:  # another process created it in between (a remote store)
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                return found.experiment_id

    @_mlflow_http()
    def log_rows(self, rows):
        from mlflow.entities import Metric

        metrics = []
        for row in rows:
            now = int(time.time() * 1000)
            metrics += [Metric(_key(k), v, now, int(row["epoch"])) for k, v in _numbers(row).items() if k != "epoch"]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    @_mlflow_http()
    def finish(self, results, step):
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        final = [Metric(_key(FINAL + k), v, now, step) for k, v in _numbers(results.get("metrics") or {}).items()]
        self.client.log_batch(self.run_id, metrics=final,
                              tags=[RunTag("mmbalance.status", str(results.get("status")))])
        if self.options.get("artifacts", True):
            # not named metrics.json: `mmbalance report` would count a copy inside the run folder as another run
            record = self.info.run_dir / "metrics.json"
            if record.exists():
                self.client.log_text(self.run_id, record.read_text(), RECORD_ARTIFACT)
            if (self.info.run_dir / "history.csv").exists():
                self.client.log_artifact(self.run_id, str(self.info.run_dir / "history.csv"))
        state = {"completed": "FINISHED", "interrupted": "KILLED"}.get(str(results.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, state)

    @_mlflow_http()
    def abort(self):
        if getattr(self, "run_id", None):
            self.client.set_terminated(self.run_id, "FAILED")


class WandbLogger(Logger):
    """A W&B run, offline by default (files in <run folder>/wandb/offline-run-*; `wandb sync` uploads them):
    the config, per-epoch values against `epoch`, the final metrics as final/<name> in the summary. A sweep's
    jobs share one group named after the sweep folder. A resumed run keeps its id (`wandb sync` joins the
    offline folders of one id in order)."""

    name = "wandb"
    durable = False  # the W&B service holds a process's records until the run finishes: a SIGKILL loses them

    def check(self):
        mode = str(self.options.get("mode") or "offline")
        if mode not in WANDB_MODES:
            raise UserError(f"logger.wandb.mode={mode!r}: expected one of {list(WANDB_MODES)}")

    def where(self, info):
        mode = str(self.options.get("mode") or "offline")
        if mode != "offline":
            return f"W&B project {self.options.get('project')} ({mode})"
        run = getattr(self, "run", None)  # once started: its own offline folder, what `wandb sync` takes
        return str(Path(run.dir).parent) if run is not None else str(info.run_dir / "wandb")

    def destination(self, info):
        return {"mode": str(self.options.get("mode") or "offline"), "project": self.options.get("project"),
                "entity": self.options.get("entity")}

    def describe(self):
        run = getattr(self, "run", None)
        return {"id": run.id} if run is not None else {}

    def hint(self):
        if str(self.options.get("mode") or "offline") != "offline":
            return ""
        return f"; upload it later with `wandb sync {self.where(self.info)}`"

    def start(self, info, previous, history, logged_through):
        import wandb

        self.info = info
        run_id = (previous or {}).get("id") or _wandb_id()
        info.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.options.get("project") or "mmbalance", entity=self.options.get("entity"),
            group=self.options.get("group") or info.sweep_name, name=str(self.options.get("name") or info.name),
            # dir absolute: W&B's service process writes the files and need not share this process's working folder
            id=run_id, resume="allow", dir=str(info.run_dir.resolve()), mode=str(self.options.get("mode") or "offline"),
            config={**info.config, "choices": info.choices}, tags=info.tags or None, job_type="train",
            reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.log_rows([r for r in history if int(r["epoch"]) > logged_through])
        return {"id": run_id}

    def log_rows(self, rows):
        for row in rows:
            self.run.log(_numbers(row))

    def finish(self, results, step):
        self.run.summary.update({FINAL + k: v for k, v in _numbers(results.get("metrics") or {}).items()})
        self.run.summary["status"] = str(results.get("status"))
        self.run.finish(exit_code=0 if results.get("status") == "completed" else 1)

    def abort(self):
        run = getattr(self, "run", None)
        if run is not None:
            run.finish(exit_code=1)


LOGGERS: dict[str, type[Logger]] = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}


# ---------------------------------------------------------------------------------------------- helpers


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _numbers(row: dict) -> dict[str, float]:
    """The numeric entries of a history row or metrics dict (NaN kept: a tracker shows what the record holds)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[str(key)] = float(value)
        elif hasattr(value, "item"):  # numpy / torch scalars
            with contextlib.suppress(Exception):
                out[str(key)] = float(value.item())
    return out


def _flat_config(info: RunInfo) -> dict[str, Any]:
    """The resolved config, flat ("optimizer.lr"), without the loggers' own options, plus the group choices."""
    flat = {k: v for k, v in flatten(info.config).items() if not k.startswith("logger.") and k != "logger"}
    flat.update({f"choice/{k}": v for k, v in info.choices.items()})
    return flat


def _hparams(info: RunInfo) -> dict[str, Any]:
    """TensorBoard hparams: numbers, strings and booleans as they are, lists as text, null left out."""
    out = {}
    for key, value in _flat_config(info).items():
        if value is None:
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a param's value


_KEY_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /:")


def _key(key: str) -> str:
    """An MLflow metric/param name: the first `/` kept, later ones become `.` (val/acc.audio), anything but
    letters, digits and `_-. :` becomes `_`. MLflow's file store keeps a metric in a file of that name, so
    val/acc and val/acc/audio could not both exist; the first `/` keeps the UI's sections (train, val, final)."""
    head, sep, rest = str(key).partition("/")
    name = head + sep + rest.replace("/", ".")
    return "".join(c if c in _KEY_OK else "_" for c in name)[:250]


def _wandb_id() -> str:
    return secrets.token_hex(4)  # 8 characters from [0-9a-f], as W&B's own ids


def _shown(path: Path) -> str:
    """A folder as the user knows it: relative to the working folder when inside it (multirun/2026-01-01/...)."""
    path = Path(path)
    with contextlib.suppress(ValueError, OSError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or below it (both resolved: `dir=../tb` is outside the run folder)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _sweep_name(sweep_dir: Path) -> str:
    """The sweep's name in the trackers (MLflow experiment, W&B group, the `mmbalance.sweep` tag): the sweep
    folder as shown (_shown) when the first of its jobs started loggers, kept in `<sweep dir>/loggers.json`. Shown
    relative to the working folder, it would change with the folder a re-run is typed in (`sweeps/study` there,
    `home/sweeps/study` from its parent) and split the sweep into two experiments and groups."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / STATE_FILE
    try:
        with _folder_lock(sweep_dir):  # the sweep's jobs may start together: the first one names it
            with contextlib.suppress(OSError, ValueError):
                recorded = json.loads(path.read_text()).get("sweep", {}).get("name")
                if isinstance(recorded, str) and recorded:
                    return recorded
            name = _shown(sweep_dir)
            write_json({"sweep": {"name": name}}, path)
            return name
    except OSError as exc:  # the trackers still log, under the name as seen from here
        log.warning("could not record the sweep's tracker name in %s (%s)", path, exc)
        return _shown(sweep_dir)


def _local_store(uri: str) -> bool:
    """A file store: a file: URI or a plain path (not "databricks", which names a workspace)."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme == "file" or (scheme == "" or len(scheme) == 1) and not uri.startswith("databricks")


@contextlib.contextmanager
def _store_lock(uri: str):
    if not _local_store(uri):
        yield
        return
    from urllib.parse import unquote, urlparse

    with _folder_lock(Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)):
        yield


@contextlib.contextmanager
def _folder_lock(root: Path):
    """An exclusive lock on `<root>/.mmbalance.lock` (created with its folder): one process at a time between
    processes that share the folder (a sweep's jobs)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mmbalance.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

