"""Run identity (engine/identity.py): where data and caches live is not identity, what was read there is; and a
sweep job's folder name is its own (docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, compose_cfg, read_metrics, run_cli, train_in_process
from mmbalance.engine.identity import job_dir_name, run_identity
from mmbalance.errors import RunFolderError

# ---------------------------------------------------------------- paths.* and cache folders


def _config(data: str, cache: str, root: str, **dataset) -> dict:
    return {"seed": 0, "paths": {"data_dir": data, "cache_dir": cache},
            "dataset": {"root": root, "cache_dir": cache, "split_seed": 0, **dataset}}


def test_a_location_counts_below_its_paths_folder_and_cache_folders_never():
    base = run_identity(_config("/a", "/home/u/.cache/m", "/a/cremad"), "1")
    assert base["config"]["dataset.root"] == "${paths.data_dir}/cremad"
    assert not any(k.endswith("cache_dir") for k in base["config"])
    moved = run_identity(_config("/mnt/data", "/tmp/link", "/mnt/data/cremad"), "1")
    assert moved == base  # another data folder, another cache: the same run
    literal_cache = _config("/a", "/home/u/.cache/m", "/a/cremad")
    literal_cache["dataset"]["cache_dir"] = "/elsewhere"  # a cache folder is bookkeeping wherever it is
    assert run_identity(literal_cache, "1")["digest"] == base["digest"]
    # what lies below the folder, and a location given outside every paths.* folder, still count
    for other in (_config("/a", "/home/u/.cache/m", "/a/cremad_small"),
                  _config("/a", "/home/u/.cache/m", "/mnt/cremad"),
                  _config("/a", "/home/u/.cache/m", "/a/cremad", split_seed=1)):
        assert run_identity(other, "1")["digest"] != base["digest"]
    # a plain relative data_dir ("data") names only what lies under it, not every string starting with it
    rel = run_identity(_config("data", "c", "data/cremad", layout="database"), "1")["config"]
    assert rel["dataset.root"] == "${paths.data_dir}/cremad" and rel["dataset.layout"] == "database"


def test_a_completed_run_is_recognised_with_its_cache_behind_a_symlink(tmp_path):
    """The default dataset's cache (dataset.cache_dir: ${paths.cache_dir}) seen through another path."""
    args = [*(a for a in FAST if not a.startswith("dataset")), "trainer.epochs=1", "trainer.batch_size=512",
            "eval.flops=false", "eval.shapley_every=0"]
    cache = Path(compose_cfg(args, fast=False).paths.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    link = tmp_path / "cachelink"
    link.symlink_to(cache, target_is_directory=True)
    out = tmp_path / "run"
    done = train_in_process(out, args, fast=False)
    before = (out / "metrics.json").read_bytes()
    again = train_in_process(out, [*args, f"paths.cache_dir={link}", f"paths.data_dir={tmp_path / 'data'}"],
                             fast=False)
    assert (out / "metrics.json").read_bytes() == before and again["metrics"] == done["metrics"]


def _features(path: Path, shift: int = 0) -> None:
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, a=x, b=x[:, ::-1].copy(), label=(labels + shift) % 3)


def _interrupted(tmp_path: Path, monkeypatch, args: list[str]) -> None:
    from mmbalance.engine.trainer import Trainer

    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", train_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_in_process(tmp_path / "run", args, fast=False)


def test_a_moved_data_folder_resumes_but_other_data_there_is_refused(tmp_path, monkeypatch):
    def args(data_dir: Path) -> list[str]:
        return ["dataset=features", "dataset.path=${paths.data_dir}/f.npz", f"paths.data_dir={data_dir}",
                "trainer.epochs=2", "trainer.progress_bar=false", "logger=csv"]

    _features(tmp_path / "a" / "f.npz")
    _interrupted(tmp_path, monkeypatch, args(tmp_path / "a"))
    _features(tmp_path / "b" / "f.npz", shift=1)  # same shapes and sizes, other labels
    with pytest.raises(RunFolderError, match=r"dataset train.labels"):
        train_in_process(tmp_path / "run", args(tmp_path / "b"), fast=False)
    _features(tmp_path / "c" / "f.npz")  # the same data, moved
    resumed = train_in_process(tmp_path / "run", args(tmp_path / "c"), fast=False)
    assert resumed["status"] == "completed" and resumed["processes"] == 2


# ---------------------------------------------------------------- sweep job folders


def test_job_folder_names_are_unique_and_unchanged_where_nothing_needed_making_safe():
    slash, underscore = job_dir_name(["dataset.path=/d/x/y.npz"]), job_dir_name(["dataset.path=/d/x_y.npz"])
    assert slash != underscore and "/" not in slash
    assert slash.startswith("dataset.path=_d_x_y.npz-") and underscore.startswith("dataset.path=_d_x_y.npz-")
    assert job_dir_name(["dataset.path=/d/x/y.npz"]) == slash  # stable
    assert job_dir_name(["a.b=x y"]) != job_dir_name(["a.b=x_y"]) == "a.b=x_y"
    # names that needed nothing keep the name they always had, and so do config-group choices
    assert job_dir_name(["seed=1", "method=ogm_ge", "method.alpha=0.5"]) == "method=ogm_ge,seed=1,method.alpha=0.5"
    assert job_dir_name(["experiment=demo/ogm_ge", "seed=2"]) == "experiment=demo_ogm_ge,seed=2"
    assert len(job_dir_name([f"dataset.path=/data/{'x' * 120}.npz"])) <= 96


def test_a_sweep_named_before_names_were_unique_finds_its_jobs_and_parts_the_two_that_met(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    class Sweep:
        sweep = type("S", (), {"dir": str(tmp_path)})

    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: Sweep))
    assert job_dir_name(["dataset.path=x_y.npz"]) == "dataset.path=x_y.npz"  # nothing there yet
    old = tmp_path / "dataset.path=x_y.npz"  # the folder both jobs were given: the first one's run is in it
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"overrides": ["dataset.path=x/y.npz", "logger=csv"]}))
    assert job_dir_name(["logger=tensorboard", "dataset.path=x/y.npz"]) == old.name  # its own run: found again
    other = job_dir_name(["dataset.path=x_y.npz"])
    assert other.startswith("dataset.path=x_y.npz-")  # the job that was refused there gets a folder of its own
    (tmp_path / other).mkdir()
    (tmp_path / other / "metrics.json").write_text(json.dumps({"overrides": ["dataset.path=x_y.npz"]}))
    assert job_dir_name(["dataset.path=x_y.npz"]) == other and job_dir_name(["dataset.path=x/y.npz"]) == old.name


def test_a_sweep_over_paths_that_read_alike_runs_every_job(tmp_path):
    _features(tmp_path / "x" / "y.npz")
    _features(tmp_path / "x_y.npz", shift=1)
    sweep = tmp_path / "sweep"
    # relative to the command's folder: short names, which got no digest before
    proc = run_cli(["-m", "dataset=features", "dataset.path=x/y.npz,x_y.npz",
                    "trainer.epochs=1", "logger=csv", "eval.flops=false",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_metrics(p.parent) for p in sweep.glob("*/metrics.json")]
    paths = sorted(o for r in runs for o in r["overrides"] if o.startswith("dataset.path="))
    assert paths == ["dataset.path=x/y.npz", "dataset.path=x_y.npz"]
    assert all(r["status"] == "completed" for r in runs)


def test_a_record_written_before_locations_counted_below_their_paths_folder_still_matches():
    """Records of earlier versions hold cache folders and absolute data locations: neither refuses the run."""
    from mmbalance.engine.identity import differences

    current = {"dataset.root": "${paths.data_dir}/cremad", "method.alpha": 0.1}
    old = {"dataset.root": "/old/place/cremad", "dataset.cache_dir": "/root/.cache/mmbalance", "method.alpha": 0.1}
    assert differences(old, current) == []
    assert differences({**old, "dataset.root": "/old/place/cremad_small"}, current) == [
        "dataset.root: '/old/place/cremad_small' -> '${paths.data_dir}/cremad'"]
    assert differences({**old, "method.alpha": 0.2}, current) == ["method.alpha: 0.2 -> 0.1"]


def test_a_whole_number_typed_with_or_without_a_point_is_one_setting():
    """`method.alpha=1` and `method.alpha=1.0` train the same run: one identity, no difference to refuse."""
    from mmbalance.engine.identity import differences

    as_int = run_identity({"method": {"alpha": 1, "betas": [0, 0.5]}, "seed": 0}, "1")
    as_float = run_identity({"method": {"alpha": 1.0, "betas": [0.0, 0.5]}, "seed": 0}, "1")
    assert as_int["digest"] == as_float["digest"]
    assert differences(as_int["config"], as_float["config"]) == []
    other = run_identity({"method": {"alpha": 1.5, "betas": [0, 0.5]}, "seed": 0}, "1")
    assert differences(as_int["config"], other["config"]) == ["method.alpha: 1 -> 1.5"]
    # a bool is no number here: true and 1 stay apart
    assert run_identity({"x": True}, "1")["digest"] != run_identity({"x": 1}, "1")["digest"]
