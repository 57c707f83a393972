"""`mmbalance prepare`: the command's own errors (each dataset's preparer is tested with its loader)."""

from conftest import run_cli


def test_prepare_errors_name_the_option_and_what_was_expected(tmp_path):
    wrong_root = run_cli(["prepare", "cremad", "--root", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert wrong_root.returncode == 2 and f"--root '{tmp_path / 'nowhere'}' is not a folder" in wrong_root.stderr
    (tmp_path / "mosei.pkl").write_bytes(b"")  # a preparer that reads one file says how to name it
    one_file = run_cli(["prepare", "cmu_mosei", "--root", str(tmp_path / "mosei.pkl")], cwd=tmp_path)
    assert one_file.returncode == 2 and "is not a folder; a single file is given as --root FOLDER --set file=NAME" \
        in one_file.stderr
    unknown = run_cli(["prepare", "cremad", "--root", str(tmp_path), "--set", "bogus=1"], cwd=tmp_path)
    assert unknown.returncode == 2 and "'bogus'" in unknown.stderr and "label_map" in unknown.stderr
    malformed = run_cli(["prepare", "cremad", "--root", str(tmp_path), "--set", "nokey"], cwd=tmp_path)
    assert malformed.returncode == 2 and "expected key=value" in malformed.stderr
    no_dataset = run_cli(["prepare", "imagenet", "--root", str(tmp_path)], cwd=tmp_path)
    assert no_dataset.returncode == 2 and "cremad" in no_dataset.stderr  # argparse lists the choices
    assert not (tmp_path / "mmbalance_prepared" / "prepare_summary.json").exists()  # nothing claims success


def test_preparers_are_found_by_their_dataset_config_and_imported_only_when_run():
    """One registry style: a key of PREPARERS is a dataset config whose `_target_` is mmbalance.data.<key>.build_<key>,
    and that module's `prepare` is the preparer; no other dataset module defines one. Listing them (the CLI's
    `prepare --help`) imports no dataset module."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from mmbalance.data import prepare

    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    data = Path(prepare.__file__).parent
    for name in prepare.PREPARERS:
        target = yaml.safe_load((conf / f"{name}.yaml").read_text())["_target_"]
        assert target.rsplit(".", 1)[0] == f"mmbalance.data.{name}", target
        assert callable(prepare.resolve(name))
        # prepare checks its --set options against this builder's hints (prepare.check_options)
        assert prepare.builder(name).__name__ == target.rsplit(".", 1)[1], target
    defines = {p.stem for p in data.glob("*.py") if any(
        isinstance(n, ast.FunctionDef) and n.name == "prepare" for n in ast.parse(p.read_text()).body)}
    assert defines == set(prepare.PREPARERS)
    probe = ("import sys, mmbalance.data.prepare; "
             "print(sorted(m for m in sys.modules if m.startswith('mmbalance.data.') or m == 'torch'))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['mmbalance.data.prepare']"


def test_prepared_folder_round_trip_and_errors_name_the_file(tmp_path):
    import numpy as np
    import pytest

    from mmbalance.data import finite
    from mmbalance.data.layout import option_path
    from mmbalance.data.prepare import PreparedFolder
    from mmbalance.errors import DataError

    folder = PreparedFolder(tmp_path / "prep", "cremad")
    with pytest.raises(DataError, match=r"dataset.prepared '.*prep' is not a folder; run `mmbalance prepare cremad"):
        folder.require()
    folder.write_classes(["a", "b"])
    folder.write_manifest([{"id": "x", "label": 1, "split": "test"}], ["id", "label", "split"])
    folder.write_array("test/y.npy", np.ones(3, np.float32), finite_checked=True)
    assert folder.require().classes() == ["a", "b"] and folder.rows()[0]["label"] == "1"
    assert finite.sidecar_path(folder.path / "test" / "y.npy").is_file()  # recorded, so runs do not scan it
    assert folder.array("test/y.npy").tolist() == [1, 1, 1] and folder.cache_meta(required=False) is None
    with pytest.raises(DataError, match=r"manifest.csv: columns \['emotion'\] are missing"):
        folder.rows(["id", "emotion"])
    with pytest.raises(DataError, match=r"cache.json is missing.*`mmbalance prepare cremad` again"):
        folder.cache_meta()
    assert option_path(tmp_path, None) is None and option_path(tmp_path, "a/b") == tmp_path / "a" / "b"
    with pytest.raises(DataError, match=r"dataset.train_split: split file '.*nope.csv' does not exist"):
        option_path(tmp_path, "nope.csv", "train_split", "split file")


def test_a_prepare_that_stops_with_an_error_still_writes_the_report_its_message_cites(tmp_path):
    """Every clip's video is junk: prepare stops ("no usable clip"), and the report it points to exists and lists
    each file with its reason, so the reasons are not lost with the run."""
    import re

    import pytest

    from mmbalance.data.prepare import run_prepare
    from mmbalance.errors import DataError

    names = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_ITS_SAD_LO"]
    for folder, suffix in (("AudioWAV", ".wav"), ("VideoFlash", ".flv")):
        (tmp_path / "raw" / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / "raw" / folder / f"{name}{suffix}").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"cremad: no usable clip .*\(3 clips listed, 3 missing or unreadable files "
                                        r"skipped\); the reasons are listed in ") as err:
        run_prepare("cremad", tmp_path / "raw", tmp_path / "out", progress=False)
    report = re.search(r"listed in (\S+)$", str(err.value)).group(1)
    lines = open(report).read().splitlines()
    assert [line.split("\t")[0] for line in lines[:-1]] == [str(tmp_path / "raw" / "VideoFlash" / f"{n}.flv")
                                                          for n in names]
    assert all("cannot decode video" in line for line in lines[:-1])
    assert lines[-1].startswith("# prepare cremad stopped with an error before finishing")
    assert not (tmp_path / "out" / "prepare_summary.json").exists()  # nothing claims success


SLOW_EXTRACTION = """
import sys, time
import mmbalance.data.layout as layout

def slow(task):  # module-level: pickled by reference to the (forked) workers
    time.sleep(0.4)
    return extract(task)

extract, layout._extract_one = layout._extract_one, slow
from mmbalance.data.prepare import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_prepare_is_one_line_exit_130_and_the_folder_says_interrupted(tmp_path):
    """Ctrl-C reaches the whole process group (the workers too): one line, no traceback of the main process or of a
    worker, exit status 130; the status and the report say `interrupted`, and the same command then completes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from fixtures_contract import vgg_raw_tree
    from mmbalance.data.prepare import run_prepare

    root, out = vgg_raw_tree(tmp_path / "raw"), tmp_path / "prep"
    args = ["vggsound", "--root", str(root), "--out", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACTION, *args], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    deadline = time.time() + 120
    while not (out / "audio").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first clip is extracted: the pool is busy
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: prepare vggsound stopped before finishing; run the same "
                                        "command to continue; what was finished is kept"], err
    assert json.loads((out / "prepare_status.json").read_text())["status"] == "interrupted"
    last = (out / "prepare_report.txt").read_text().splitlines()[-1]
    assert last.startswith("# prepare vggsound was interrupted (Ctrl-C) before finishing"), last
    done = run_prepare("vggsound", root, out, workers=1, progress=False)
    assert done["extract_skipped_existing"] >= 1 and done["extracted"] + done["extract_skipped_existing"] == 9
