"""`mmbalance prepare`: the command's own errors (each dataset's preparer is tested with its loader)."""

from conftest import run_cli


def test_prepare_errors_name_the_option_and_what_was_expected(tmp_path):
    wrong_root = run_cli(["prepare", "cremad", "--root", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert wrong_root.returncode == 2 and f"--root '{tmp_path / 'nowhere'}' is not a folder" in wrong_root.stderr
    unknown = run_cli(["prepare", "cremad", "--root", str(tmp_path), "--set", "bogus=1"], cwd=tmp_path)
    assert unknown.returncode == 2 and "'bogus'" in unknown.stderr and "label_map" in unknown.stderr
    malformed = run_cli(["prepare", "cremad", "--root", str(tmp_path), "--set", "nokey"], cwd=tmp_path)
    assert malformed.returncode == 2 and "expected key=value" in malformed.stderr
    no_dataset = run_cli(["prepare", "imagenet", "--root", str(tmp_path)], cwd=tmp_path)
    assert no_dataset.returncode == 2 and "cremad" in no_dataset.stderr  # argparse lists the choices
    assert not (tmp_path / "mmbalance_prepared" / "prepare_summary.json").exists()  # nothing claims success
