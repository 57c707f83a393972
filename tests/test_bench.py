"""benchmarks/bench.py (`make bench`) and benchmarks/gpu_check.py (`make gpu-check`) run end to end on the CPU:
the table prints with every section, `--methods` narrows the methods, and the GPU check lists every failure
and exits non-zero. The fast variants use the tiny sizes; the slow ones the `--small` sizes and bf16."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of every markdown table row, header and separator lines left out."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:] if rows else rows


def assert_bench_table(proc: subprocess.CompletedProcess, methods: set[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| section | case | reference | measured | ratio | target | met |" in out
    assert out.count("load average") == 2  # before and after
    rows = table_rows(out)
    sections = [r[0] for r in rows]
    assert sections.count("overhead") == 2  # the small model and the ResNet-18 shapes
    assert sections.count("Shapley") == 3  # 2, 3 and 4 modalities
    assert sections.count("loader") == 2  # training and evaluation mode
    assert {r[1] for r in rows if r[0] == "method step"} == methods - {"baseline"}
    for r in rows:
        assert r[5] != "–" or r[0] == "method step", r  # every overhead, Shapley and loader row shows its target
        assert "FAILED" not in r[3], r


def test_bench_tiny_prints_one_table_for_the_selected_methods():
    proc = run_script("bench.py", "--tiny", "--rounds", "1", "--methods", "baseline,ogm_ge")
    assert_bench_table(proc, {"baseline", "ogm_ge"})


def test_gpu_check_runs_on_the_cpu_for_two_methods():
    proc = run_script("gpu_check.py", "--tiny", "--device", "cpu", "--methods", "baseline,ogm_ge", "--steps", "1",
                      "--workers", "1", "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r[0]: r for r in table_rows(proc.stdout)}
    assert set(rows) == {"baseline", "ogm_ge"}
    for r in rows.values():
        assert r[1] == "ok" and float(r[2].replace(",", "")) > 0 and float(r[3].replace(",", "")) > 0
        assert r[4] == "–"  # no GPU memory on the CPU
        assert r[5] == "audio, visual"  # both ResNet-18 encoders went channels_last
    assert "2/2 methods ok" in proc.stdout


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_lists_every_registered_method_and_refuses_unknown_ones(benchmarks_on_path):
    import bench
    from mmbalance.methods import registered_methods

    assert bench.registered(None) == list(registered_methods())  # a new method is benchmarked without edits
    assert bench.registered("ogm_ge,baseline") == ["baseline", "ogm_ge"]  # registry order
    with pytest.raises(SystemExit, match="unknown method.*nosuch"):
        bench.registered("baseline,nosuch")


def test_gpu_check_lists_every_failure_and_exits_non_zero(benchmarks_on_path, monkeypatch, capsys):
    import gpu_check

    def fake(key, args, device, cache_dir):
        if key == "baseline":
            return gpu_check.Result(key, True, 12.0, 1000.0, None, "audio, visual")
        raise RuntimeError(f"{key} broke")

    monkeypatch.setattr(gpu_check, "check_method", fake)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--methods", "baseline,ogm_ge,agm"])
    out = capsys.readouterr().out
    assert code == 1
    assert "1/3 methods ok" in out
    assert "FAILED ogm_ge: RuntimeError: ogm_ge broke" in out and "FAILED agm: RuntimeError: agm broke" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_gpu_check_asked_for_cuda_without_it_exits_2(benchmarks_on_path, capsys):
    import gpu_check

    assert gpu_check.main(["--device", "cuda", "--methods", "baseline"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_small_two_methods():
    proc = run_script("bench.py", "--small", "--rounds", "1", "--methods", "baseline,mmpareto", timeout=900)
    assert_bench_table(proc, {"baseline", "mmpareto"})


@pytest.mark.slow
def test_gpu_check_small_bf16_on_the_cpu():
    proc = run_script("gpu_check.py", "--small", "--device", "cpu", "--methods", "baseline,agm", "--steps", "2",
                      "--workers", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2/2 methods ok" in proc.stdout and "bf16" in proc.stdout


@pytest.mark.parametrize("script, args", [
    ("bench", ["--rounds", "0"]), ("bench", ["--steps", "-1"]), ("bench", ["--small-steps", "0"]),
    ("bench", ["--sections="]), ("bench", ["--threads", "-2"]), ("bench", ["--device", "foo"]),
    ("gpu_check", ["--steps", "0"]), ("gpu_check", ["--device", "foo"]),
    ("loader_throughput", ["--only", "cach"]), ("loader_throughput", ["--clips", "0"]),
])
def test_a_bad_benchmark_flag_is_one_argparse_error_before_any_work(benchmarks_on_path, capsys, script, args):
    """Tracebacks, empty medians or negative times were what such flags gave."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_bench_asked_for_cuda_without_it_is_one_error(benchmarks_on_path, capsys):
    import bench

    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--tiny", "--sections", "overhead"])
    assert "this machine has no CUDA device" in capsys.readouterr().err
