"""Experiment loggers (logger=..., docs/loggers.md): what each tracker wrote, read back with its own reader
(TensorBoard's EventAccumulator, the MLflow client on its file store, W&B's offline .wandb records); the run
folder's record (history.csv, metrics.json) is written whatever is chosen and survives a tracker's failure."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import FAST, compose_cfg, read_metrics, run_cli, train_in_process
from mmbalance.errors import UserError

ALL = "logger=[tensorboard,mlflow,wandb]"


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    # the MLflow client here reads the file stores the runs wrote (the viewer needs the same: docs/loggers.md)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # an in-process W&B run exports its service's address; a command this test starts must start its own
    # service, as a user's command does (a killed command must not leave its run open in this process's service)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


# ---------------------------------------------------------------- readers


def history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_hparams(log_dir: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = HParamsPluginData.FromString(content)
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    return client, client.search_runs([found.experiment_id])


def wandb_files(run_dir: Path) -> list[Path]:
    """The offline runs' transaction logs, oldest first (a resumed run adds one folder with the same id)."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's framing of protobuf `Record`s (a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if not data:  # created, never written (a process killed at once)
        return []
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(Record.FromString(pending))
            pending = b""
    return out


def wandb_items(items) -> dict[str, float | str]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def wandb_run(path: Path) -> dict:
    """What a .wandb file holds: its run record, history rows, merged summary and exit code."""
    records = wandb_records(path)
    run = next((r.run for r in records if r.WhichOneof("record_type") == "run"), None)
    rows = [wandb_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(wandb_items(r.summary.update))
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return {"run": run, "history": rows, "summary": summary, "exit": exits[-1] if exits else None}


def assert_mirrors(scalars: dict, rows: list[dict], skip=("epoch",)) -> None:
    """Every numeric value of history.csv, at step = epoch, once."""
    for key in {k for r in rows for k in r} - set(skip):
        expected = [(int(r["epoch"]), r[key]) for r in rows if key in r]
        got = scalars[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5), key


# ---------------------------------------------------------------- tests


def test_the_logger_group_composes_one_or_several_options():
    default = compose_cfg([], fast=False).logger  # (the tests' FAST overrides choose logger=csv)
    assert set(default) == {"tensorboard"} and default.tensorboard.if_installed
    assert set(compose_cfg(["logger=csv"]).logger) == {"csv"}
    both = compose_cfg(["logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=sqlite:///x.db"]).logger
    assert set(both) == {"tensorboard", "mlflow"} and not both.tensorboard.if_installed
    assert both.mlflow.tracking_uri == "sqlite:///x.db"


def test_several_loggers_at_once_mirror_the_history_and_the_final_metrics(tmp_path):
    out = tmp_path / "run"
    results = train_in_process(out, [ALL])
    rows = history(out)
    assert results["status"] == "completed" and len(rows) == 2
    status = read_metrics(out)["loggers"]
    # each tracker closed its run: metrics.json records how every logger ended
    assert {k: v["status"] for k, v in status.items()} == {"csv": "on", "tensorboard": "done", "mlflow": "done",
                                                           "wandb": "done"}
    final = results["metrics"]

    # TensorBoard: every history column per epoch (the Shapley and imbalance curves among them), the final
    # metrics, and the config as hparams
    scalars = tb_scalars(out / "tensorboard")
    assert {"val/shapley/audio", "val/shapley/visual", "val/imbalance"} <= set(scalars)
    assert_mirrors(scalars, rows)
    assert scalars["final/test/acc"] == [(1, pytest.approx(final["test/acc"]))]
    assert scalars["final/test/imbalance"][0][1] == pytest.approx(final["test/imbalance"])
    hp = tb_hparams(out / "tensorboard")
    assert hp["optimizer.lr"] == pytest.approx(0.01) and hp["choice/method"] == "test" and hp["seed"] == 0

    # MLflow: a file store in the run folder, one run named after it, params, metrics per epoch, final, artifacts
    client, runs = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    (run,) = runs
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.tags["mmbalance.choice.method"] == "test"
    acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert [(m.step, m.value) for m in acc] == [(int(r["epoch"]), pytest.approx(r["val/acc"])) for r in rows]
    shapley = client.get_metric_history(run.info.run_id, "val/shapley.audio")
    assert [m.value for m in shapley] == pytest.approx([r["val/shapley/audio"] for r in rows])
    assert run.data.metrics["final/test.acc"] == pytest.approx(final["test/acc"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"mmbalance_metrics.json", "history.csv"}
    # `mmbalance report` finds runs by their metrics.json: no copy of it anywhere below the run folder
    assert list(out.rglob("metrics.json")) == [out / "metrics.json"]

    # W&B: one offline run in the run folder with its .wandb file: config, per-epoch values, summary, exit code
    (path,) = wandb_files(out)
    wb = wandb_run(path)
    assert wb["run"].run_id == read_metrics(out)["loggers"]["wandb"]["id"] and wb["run"].project == "mmbalance"
    assert wb["run"].display_name == "run" and wb["run"].run_group == ""
    assert [h["epoch"] for h in wb["history"]] == [0, 1]
    assert [h["val/acc"] for h in wb["history"]] == pytest.approx([r["val/acc"] for r in rows])
    assert wb["summary"]["final/test/acc"] == pytest.approx(final["test/acc"]) and wb["exit"] == 0


def test_a_resumed_run_continues_the_same_tracker_runs_and_logs_each_epoch_once(tmp_path, monkeypatch):
    from mmbalance.engine.trainer import Trainer

    out = tmp_path / "run"
    args = [ALL, "trainer.epochs=3"]
    original = Trainer.train_epoch

    def ctrl_c_at_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, args)
    monkeypatch.undo()
    ids = json.loads((out / "loggers.json").read_text())
    client, (stopped,) = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    assert stopped.info.status == "KILLED"

    resumed = train_in_process(out, args)
    assert resumed["status"] == "completed" and resumed["resumed_from"]["epoch"] == 1
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    again = json.loads((out / "loggers.json").read_text())
    assert again["mlflow"]["run_id"] == ids["mlflow"]["run_id"] and again["wandb"]["id"] == ids["wandb"]["id"]

    # TensorBoard: one event file, rebuilt from the checkpoint's history: each epoch once, on one curve
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_mirrors(tb_scalars(out / "tensorboard"), rows)
    # MLflow: the same run, finished, each step once
    _, (run,) = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for key in ("val/acc", "train/loss"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [0, 1, 2]
        assert [m.value for m in logged] == pytest.approx([r[key] for r in rows])
    # W&B: a second offline folder with the same id (`wandb sync` joins them in order), epochs 0-1 then 2
    first, second = wandb_files(out)
    assert first.name == second.name == f"run-{ids['wandb']['id']}.wandb"
    assert [h["epoch"] for h in wandb_run(first)["history"]] == [0, 1] and wandb_run(first)["exit"] == 1
    assert [h["epoch"] for h in wandb_run(second)["history"]] == [2] and wandb_run(second)["exit"] == 0


def test_loggers_chosen_at_resume_get_the_whole_history(tmp_path, monkeypatch):
    """`logger` is not part of a run's identity: a run started with logger=csv may resume with trackers."""
    from mmbalance.engine.trainer import Trainer

    out = tmp_path / "run"
    original = Trainer.train_epoch

    def ctrl_c_at_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, ["logger=csv"])
    monkeypatch.undo()
    assert not (out / "loggers.json").exists() and not (out / "tensorboard").exists()
    train_in_process(out, ["logger=[tensorboard,mlflow]"])
    rows = history(out)
    assert_mirrors(tb_scalars(out / "tensorboard"), rows)
    client, (run,) = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]


def test_resume_never_starts_new_tracker_runs_and_moves_the_old_event_files_aside(tmp_path):
    out = tmp_path / "run"
    args = ["logger=[tensorboard,mlflow,wandb]", "trainer.epochs=1"]
    train_in_process(out, args)
    first = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
    train_in_process(out, [*args, "resume=never"])
    (moved,) = (out / "superseded").iterdir()
    assert (moved / "loggers.json").exists() and list((moved / "tensorboard").glob("events.out.tfevents.*"))
    assert tb_scalars(out / "tensorboard")["val/acc"] == [(0, pytest.approx(history(out)[0]["val/acc"]))]
    _, runs = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    second = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
    assert len(runs) == 2 and second != first
    tags = {r.info.run_id: r.data.tags for r in runs}  # the two runs say which replaced which
    assert tags[second]["mmbalance.supersedes"] == first and tags[first]["mmbalance.superseded_by"] == second
    # the W&B offline runs go with the old record: `wandb sync <run>/wandb/offline-run-*` uploads the new run only
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert len(list((moved / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_a_sweep_groups_its_runs_one_mlflow_experiment_and_one_wandb_group(tmp_path):
    """The command line as a user types it: a list of loggers in a multirun of two jobs."""
    proc = run_cli(["-m", *FAST, "trainer.epochs=1", ALL, "seed=0,1", "hydra.sweep.dir=sweeps/study"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "study"
    jobs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").exists())
    assert len(jobs) == 2 and all(read_metrics(j)["status"] == "completed" for j in jobs)
    # MLflow: one store and one experiment for the sweep, named after its folder; one run per job, named after it
    assert not any((j / "mlruns").exists() for j in jobs)
    _, runs = mlflow_runs((sweep / "mlruns").resolve().as_uri(), "sweeps/study")
    assert sorted(r.info.run_name for r in runs) == [j.name for j in jobs]
    assert {r.data.tags["mmbalance.sweep"] for r in runs} == {"sweeps/study"}
    # W&B: one group for the sweep; TensorBoard: each job's own folder, so --logdir <sweep> shows every job
    for job in jobs:
        (path,) = wandb_files(job)
        wb = wandb_run(path)
        assert wb["run"].run_group == "sweeps/study" and wb["run"].display_name == job.name
        assert_mirrors(tb_scalars(job / "tensorboard"), history(job))


def test_a_missing_package_is_one_clear_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` does where it is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train_in_process(out, [ALL])
    message = str(err.value)
    assert "logger=mlflow needs the `mlflow` package" in message and "logger=wandb needs the `wandb`" in message
    assert "pip install 'mmbalance[loggers]'" in message
    recorded = read_metrics(out)
    assert recorded["status"] == "failed" and "mmbalance[loggers]" in recorded["error"]
    assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()  # refused before any work


def test_auto_is_tensorboard_when_installed_and_says_so_when_it_is_not(tmp_path, monkeypatch):
    on = train_in_process(tmp_path / "on", ["logger=auto"])  # the default (the tests' FAST overrides choose csv)
    assert read_metrics(tmp_path / "on")["loggers"]["tensorboard"]["status"] == "done"
    assert_mirrors(tb_scalars(tmp_path / "on" / "tensorboard"), history(tmp_path / "on"))
    assert on["status"] == "completed"

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    off = tmp_path / "off"
    train_in_process(off, ["logger=auto"])
    skipped = read_metrics(off)["loggers"]
    assert skipped["csv"]["status"] == "on" and skipped["tensorboard"]["status"] == "skipped"
    assert "mmbalance[loggers]" in skipped["tensorboard"]["note"]
    assert not (off / "tensorboard").exists() and len(history(off)) == 2
    with pytest.raises(UserError, match=r"logger=tensorboard needs the `tensorboard` package"):
        train_in_process(tmp_path / "required", ["logger=tensorboard"])


def test_csv_only_writes_the_run_folder_files_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    train_in_process(out, ["logger=csv"])
    assert (out / "history.csv").exists() and read_metrics(out)["status"] == "completed"
    assert read_metrics(out)["loggers"] == {"csv": {"status": "on", "where": str(out)}}
    assert not any((out / name).exists() for name in ("tensorboard", "mlruns", "wandb", "loggers.json"))


def test_a_logger_failing_mid_run_is_switched_off_and_the_record_is_intact(tmp_path, monkeypatch, caplog):
    from mmbalance.engine.trainer import Trainer

    out = tmp_path / "run"
    original = Trainer.train_epoch

    def store_lost_at_epoch_1(self, epoch):
        if epoch == 1:
            shutil.rmtree(out / "mlruns")  # the MLflow store disappears under the running run
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", store_lost_at_epoch_1)
    results = train_in_process(out, ["logger=[tensorboard,mlflow]"])
    assert results["status"] == "completed" and len(history(out)) == 2
    recorded = read_metrics(out)
    assert recorded["status"] == "completed" and recorded["metrics"]["test/acc"] == results["metrics"]["test/acc"]
    assert recorded["loggers"]["mlflow"]["status"] == "failed"
    error = recorded["loggers"]["mlflow"]["error"]
    assert error.startswith("at epoch 1: ") and "mlruns" in error
    assert "logger mlflow failed at epoch 1" in caplog.text
    assert_mirrors(tb_scalars(out / "tensorboard"), history(out))  # the other logger went on


MLFLOW_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _mlflow_defaults(monkeypatch):
    """MLflow's own HTTP settings, as a user's environment has them (7 retries, 120 s per request)."""
    for key in MLFLOW_HTTP_ENV:
        monkeypatch.delenv(key, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_an_unreachable_tracker_at_start_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    _mlflow_defaults(monkeypatch)
    out, uri = tmp_path / "run", f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    results = train_in_process(out, ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "trainer.epochs=1"])
    assert time.monotonic() - started < 30  # MLflow's own retries alone took 4 minutes
    assert results["status"] == "completed" and len(history(out)) == 1
    mlflow = read_metrics(out)["loggers"]["mlflow"]
    assert mlflow["status"] == "failed" and mlflow["error"].startswith("at start:")
    assert "cannot reach the MLflow tracking server" in mlflow["error"] and mlflow["where"] == uri
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "logger mlflow failed at start" in warnings[0].getMessage(), warnings


def test_a_tracking_server_that_fails_every_request_costs_seconds_not_minutes(tmp_path, monkeypatch, caplog):
    """Reachable but failing (503, as a server restarting): MLflow's retries, bounded for the logger's calls."""
    from mmbalance.engine.loggers import Loggers, MLflowLogger, RunInfo

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    _mlflow_defaults(monkeypatch)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status: dict = {}
        loggers = Loggers([MLflowLogger({"tracking_uri": f"http://127.0.0.1:{server.server_port}"})],
                          RunInfo(run_dir=tmp_path), status)
        import mlflow.tracking  # noqa: F401 - imported before the clock starts

        started = time.monotonic()
        loggers.start([], 0)
        assert time.monotonic() - started < 20
    finally:
        server.shutdown()
    assert status["mlflow"]["status"] == "failed" and "503" in status["mlflow"]["error"]
    assert not any(k in os.environ for k in MLFLOW_HTTP_ENV)  # set for the logger's calls only
    assert [r.name for r in caplog.records if r.levelname == "WARNING"] == ["mmbalance"]


def test_a_users_own_mlflow_http_settings_win(monkeypatch):
    from mmbalance.engine.loggers import _mlflow_http

    _mlflow_defaults(monkeypatch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    with _mlflow_http():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


@pytest.mark.slow
def test_a_kill_between_checkpoint_and_logging_is_filled_in_at_the_rerun(tmp_path):
    """SIGKILL right after the last epoch's checkpoint, before its history row and its trackers' step: the re-run
    resumes after that epoch and gives the trackers the epoch they missed, once."""
    from test_reliability import run_driver

    out = tmp_path / "run"
    args = [*FAST, ALL, f"hydra.run.dir={out}"]
    killed = run_driver("after_checkpoint", 1, args, tmp_path)
    assert killed.returncode < 0, killed.stderr[-2000:]
    assert json.loads((out / "loggers.json").read_text())["mlflow"]["logged_through"] == 0
    rerun = run_cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert_mirrors(tb_scalars(out / "tensorboard"), rows)
    client, (run,) = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]
    # W&B's service keeps a process's records until its run finishes, so a SIGKILL loses them (the killed
    # process's offline folder may hold a bare header or not exist): the re-run logs every epoch since the last
    # finish again, under the same id
    files = wandb_files(out)
    run_id = json.loads((out / "loggers.json").read_text())["wandb"]["id"]
    assert {f.name for f in files} == {f"run-{run_id}.wandb"}
    assert all(wandb_run(f)["exit"] is None for f in files[:-1])
    assert [h["epoch"] for h in wandb_run(files[-1])["history"]] == [0, 1] and wandb_run(files[-1])["exit"] == 0


@pytest.mark.slow
def test_under_ddp_only_rank_0_logs(tmp_path):
    from test_distributed import DDP_CPU, torchrun

    run_dir = tmp_path / "ddp_run"
    args = ["-m", "mmbalance", *FAST, "trainer.epochs=1", "trainer.batch_size=8", "logger=[tensorboard,mlflow]",
            *DDP_CPU, f"hydra.run.dir={run_dir}"]
    proc = torchrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(run_dir)["loggers"]["mlflow"]["status"] == "done"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_mirrors(tb_scalars(run_dir / "tensorboard"), history(run_dir))
    client, (run,) = mlflow_runs((run_dir / "mlruns").resolve().as_uri(), "mmbalance")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0]


# ---------------------------------------------------------------- a run never loses another's or its own tracker data


def test_runs_sharing_a_tensorboard_folder_each_keep_their_own_sub_folder(tmp_path):
    """A folder outside the run folder is shared (a sweep's jobs, separate runs): each run writes into its own
    sub-folder, named after its run folder, so no run deletes another's event files and TensorBoard lists them
    as separate runs. A name another run holds gains a digest; resume=never moves the run's sub-folder aside."""
    shared = tmp_path / "tb"
    runs = {seed: tmp_path / "study" / f"seed={seed}" for seed in (0, 1)}
    for seed, out in runs.items():
        train_in_process(out, ["logger=tensorboard", f"logger.tensorboard.dir={shared}", "trainer.epochs=1",
                               f"seed={seed}"])
    for out in runs.values():
        own = shared / "study" / out.name
        assert read_metrics(out)["loggers"]["tensorboard"]["where"] == str(own.resolve())
        assert len(list(own.glob("events.out.tfevents.*"))) == 1
        assert_mirrors(tb_scalars(own), history(out))
    assert history(runs[0]) != history(runs[1])  # two different runs, each on its own curves

    # another run whose folder ends the same way (another sweep's study/seed=0) never takes that sub-folder
    other = tmp_path / "elsewhere" / "study" / "seed=0"
    train_in_process(other, ["logger=tensorboard", f"logger.tensorboard.dir={shared}", "trainer.epochs=1"])
    where = Path(read_metrics(other)["loggers"]["tensorboard"]["where"])
    assert where.parent == (shared / "study").resolve() and where.name.startswith("seed=0-")
    assert_mirrors(tb_scalars(where), history(other))
    assert_mirrors(tb_scalars(shared / "study" / "seed=0"), history(runs[0]))

    # resume=never: the run's own sub-folder moves into its superseded/ with its other files, nothing else does
    train_in_process(runs[1], ["logger=tensorboard", f"logger.tensorboard.dir={shared}", "trainer.epochs=1",
                               "seed=1", "resume=never"])
    (moved,) = (runs[1] / "superseded").iterdir()
    assert len(list((moved / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_mirrors(tb_scalars(shared / "study" / "seed=1"), history(runs[1]))
    assert_mirrors(tb_scalars(shared / "study" / "seed=0"), history(runs[0]))


def test_a_sweep_resumed_from_another_working_folder_keeps_its_experiment_and_group(tmp_path, monkeypatch):
    """The sweep's tracker name is the one chosen when its first job started (kept in <sweep dir>/loggers.json),
    not the sweep folder as seen from wherever the re-run is typed."""
    from mmbalance.engine.loggers import Loggers, MLflowLogger, RunInfo, WandbLogger

    (tmp_path / "home" / "sweeps" / "study").mkdir(parents=True)
    rows = [{"epoch": 0, "val/acc": 0.5}, {"epoch": 1, "val/acc": 0.75}]

    def job(sweep: Path, done: list[dict], status: str) -> Loggers:
        info = RunInfo(run_dir=sweep / "seed=0", sweep_dir=sweep)
        loggers = Loggers([MLflowLogger({}), WandbLogger({"mode": "offline", "project": "mmbalance"})], info, {})
        loggers.start(done, len(done))
        loggers.finish({"status": status, "metrics": {}})
        return loggers

    monkeypatch.chdir(tmp_path / "home")
    job(Path("sweeps/study"), rows[:1], "interrupted")  # as typed there: hydra.sweep.dir=sweeps/study
    monkeypatch.chdir(tmp_path)
    time.sleep(1.05 - time.time() % 1)  # W&B names an offline folder by the second: one folder per start
    job(Path("home/sweeps/study"), rows, "completed")  # the same folder, typed from its parent
    sweep = tmp_path / "home" / "sweeps" / "study"
    client, (run,) = mlflow_runs((sweep / "mlruns").resolve().as_uri(), "sweeps/study")
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"sweeps/study"}  # (MLflow's own)
    assert run.info.status == "FINISHED" and run.data.tags["mmbalance.sweep"] == "sweeps/study"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]
    assert [wandb_run(f)["run"].run_group for f in wandb_files(sweep / "seed=0")] == ["sweeps/study"] * 2


def test_ctrl_c_inside_a_trackers_call_loses_no_epoch_in_that_tracker(tmp_path, monkeypatch):
    """Each tracker's mark in loggers.json moves only once its own call returned: an epoch a Ctrl-C kept from W&B
    is logged at the resume, and the trackers that had it are not given it twice."""
    from mmbalance.engine.loggers import WandbLogger

    out = tmp_path / "run"
    args = ["logger=[mlflow,wandb]"]
    original = WandbLogger.log_rows

    def ctrl_c_at_epoch_1(self, rows):
        if any(int(r["epoch"]) == 1 for r in rows):
            raise KeyboardInterrupt  # inside W&B's call, before it took the row
        return original(self, rows)

    monkeypatch.setattr(WandbLogger, "log_rows", ctrl_c_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, args)
    monkeypatch.undo()
    marks = json.loads((out / "loggers.json").read_text())
    assert marks["wandb"]["logged_through"] == 0 and marks["mlflow"]["logged_through"] == 1
    assert train_in_process(out, args)["status"] == "completed"
    first, second = wandb_files(out)
    assert [h["epoch"] for h in wandb_run(first)["history"]] == [0]
    assert [h["epoch"] for h in wandb_run(second)["history"]] == [1] and wandb_run(second)["exit"] == 0
    client, (run,) = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]


def test_ctrl_c_inside_a_trackers_start_ends_the_run_as_interrupted(tmp_path, monkeypatch):
    from mmbalance.engine.loggers import TensorBoardLogger

    out = tmp_path / "run"
    original = TensorBoardLogger.start

    def ctrl_c_once_open(self, *args):
        original(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(TensorBoardLogger, "start", ctrl_c_once_open)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(out, ["logger=tensorboard"])
    monkeypatch.undo()
    assert read_metrics(out)["status"] == "interrupted"
    assert train_in_process(out, ["logger=tensorboard"])["status"] == "completed"
    assert_mirrors(tb_scalars(out / "tensorboard"), history(out))


def test_a_logger_failing_at_the_end_is_recorded_and_the_run_stays_completed(tmp_path, monkeypatch):
    from mmbalance.engine.trainer import Trainer

    out = tmp_path / "run"
    original = Trainer.test_best

    def store_lost_before_the_end(self):
        shutil.rmtree(out / "mlruns")  # after the last epoch was logged: MLflow fails at its final calls
        return original(self)

    monkeypatch.setattr(Trainer, "test_best", store_lost_before_the_end)
    results = train_in_process(out, ["logger=[tensorboard,mlflow]", "trainer.epochs=1"])
    recorded = read_metrics(out)
    assert recorded["status"] == "completed" and recorded["metrics"] == pytest.approx(results["metrics"])
    assert recorded["loggers"]["mlflow"]["status"] == "failed"
    assert recorded["loggers"]["mlflow"]["error"].startswith("at the end: ")
    assert recorded["loggers"]["tensorboard"]["status"] == "done"
    assert tb_scalars(out / "tensorboard")["final/test/acc"] == [(0, pytest.approx(results["metrics"]["test/acc"]))]


def test_a_run_trained_further_gets_a_new_mlflow_run_with_its_own_params(tmp_path):
    """MLflow params are immutable: a run extended with resume=force (another identity: more epochs) is logged
    into a new MLflow run with the whole history and the current params, linked both ways to the old one."""
    out = tmp_path / "run"
    train_in_process(out, ["logger=mlflow", "trainer.epochs=1"])
    old_id = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
    train_in_process(out, ["logger=mlflow", "trainer.epochs=2", "resume=force"])
    new_id = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
    client, runs = mlflow_runs((out / "mlruns").resolve().as_uri(), "mmbalance")
    by_id = {r.info.run_id: r for r in runs}
    assert set(by_id) == {old_id, new_id} and old_id != new_id
    old, new = by_id[old_id], by_id[new_id]
    assert old.data.params["trainer.epochs"] == "1" and new.data.params["trainer.epochs"] == "2"
    assert new.data.tags["mmbalance.continues"] == old_id and old.data.tags["mmbalance.continued_by"] == new_id
    assert old.info.status == new.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(old_id, "val/acc")] == [0]
    rows = history(out)
    assert [(m.step, m.value) for m in client.get_metric_history(new_id, "val/acc")] == [
        (int(r["epoch"]), pytest.approx(r["val/acc"])) for r in rows]
    assert new.data.metrics["final/test.acc"] == pytest.approx(read_metrics(out)["metrics"]["test/acc"])


def test_every_option_of_the_logger_configs_is_in_the_schema_and_nothing_else():
    import yaml

    from mmbalance.engine.loggers import OPTION_SCHEMAS

    conf = Path(__file__).resolve().parents[1] / "conf" / "logger"
    for name in ("csv", "tensorboard", "mlflow", "wandb"):
        options = yaml.safe_load((conf / f"{name}.yaml").read_text())[name] or {}
        assert set(options) == set(OPTION_SCHEMAS[name]), name


@pytest.mark.parametrize("override, message", [
    ("+logger.mlflow.trackin_uri=x", "logger.mlflow.trackin_uri: unknown option, no code reads it; did you mean "
                                     "logger.mlflow.tracking_uri?"),
    ("logger.mlflow.artifacts=maybe", "logger.mlflow.artifacts"),
    ("logger.mlflow.tracking_uri=bogus://x", "logger.mlflow.tracking_uri='bogus://x': MLflow cannot open a 'bogus' "
                                             "URI"),
])
def test_a_logger_option_no_code_reads_or_of_another_type_is_refused_before_training(tmp_path, override, message):
    from mmbalance.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        train_in_process(tmp_path / "run", ["logger=mlflow", override])
    assert message in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "mlruns").exists()


def test_mlflow_on_a_database_keeps_its_artifacts_in_the_run_folder_not_the_current_one(tmp_path, monkeypatch):
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_in_process(tmp_path / "run", ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"])
    [experiment] = [e for e in MlflowClient(uri).search_experiments() if e.name != "Default"]
    assert experiment.artifact_location == (tmp_path / "run" / "mlartifacts").resolve().as_uri()
    assert not (tmp_path / "mlruns").exists() and any((tmp_path / "run" / "mlartifacts").rglob("history.csv"))
