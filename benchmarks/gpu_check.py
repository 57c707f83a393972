"""`make gpu-check`: every registered method trains a few steps as `hardware=gpu` runs them; exit 1 on any error.

Each method is built through the project's own config composition (`hardware=gpu method=<key>`, so a new
method is checked without edits) on synthetic CREMA-D-shaped data (audio 1x257x188, 2 frames of 224x224,
6 classes, ResNet-18 per modality, batch 16): bf16 autocast, pinned memory and persistent DataLoader workers
(`hardware.num_workers`, default 4), and channels_last for the encoders that convolve (ResNet-18, SmallCNN).
It runs the method's setup and epoch-start hooks, one untimed warm-up step, `--steps` timed steps fed by the
run's own loader (host-to-device copies included), the epoch-end hook and one validation pass with exact
Shapley values, then reports per method: the mean step time, samples/s, peak GPU memory (CUDA only), and
every failure with its error. The exit status is 1 when any method failed (all are listed), 2 when CUDA was
asked for and is not there.

On a machine without CUDA (`--device auto` falls back, or `--device cpu`) the same path runs with bf16 on the
CPU and the CUDA-only parts (pinned memory, peak memory) skipped, so the check itself is tested everywhere.

Usage:  python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--methods agm,mmpareto] [--steps 5]
                                       [--small] [--batch 16] [--workers 4] [--no-channels-last]
Expected duration on one GPU (not yet measured there): a few minutes for every method, most of it building
the synthetic data, UMT's teacher training and the first cuDNN calls. On 2 CPU cores `--small --device cpu`
for two methods takes about half a minute.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from mmbalance.engine import threads

threads.prepare_process({"device": "cuda", "threads": "auto", "wait_policy": "auto"})  # before torch, as the CLI

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from _timing import load_average, positive_int, sync  # noqa: E402
from bench import SIZES, av_overrides, compose, method_overrides, registered  # noqa: E402


@dataclass
class Result:
    method: str
    ok: bool
    step_ms: float | None = None
    samples_per_s: float | None = None
    peak_gib: float | None = None
    channels_last: str = "–"
    error: str = ""


def to_channels_last(model) -> list[str]:
    """Convolutional encoders to channels_last (their 4-d weights; activations follow); the names converted."""
    done = []
    for name, encoder in model.encoders.items():
        if any(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()):
            encoder.to(memory_format=torch.channels_last)
            done.append(name)
    return done


def check_method(key: str, args, device: torch.device, cache_dir: str) -> Result:
    from mmbalance.config import validate
    from mmbalance.engine.evaluation import evaluate
    from mmbalance.train import build_run

    shapes = SIZES[args.size]
    batch_size = args.batch or shapes["batch"]
    # enough training batches for the warm-up and the timed steps (train is ~0.6 of the samples)
    samples = max(48, math.ceil((args.steps + 2) * batch_size / 0.6))
    overrides = ["hardware=gpu", f"hardware.device={device}", f"hardware.num_workers={args.workers}",
                 f"hardware.precision={args.precision}",
                 *av_overrides({**shapes, "batch": batch_size}, samples, cache_dir), *method_overrides(key)]
    cfg = compose(overrides)
    validate(cfg)
    run = build_run(cfg, device)
    converted = to_channels_last(run.model) if args.channels_last else []
    cuda = device.type == "cuda"
    try:
        run.method.setup(run)
        run.epoch = 0
        run.method.on_epoch_start(run, 0)
        run.model.train()
        if cuda:
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        batches = iter(run.train_loader)
        steps, samples_done, started = 0, 0, None
        for i in range(args.steps + 1):
            batch = next(batches).to(run.device, non_blocking=True)
            stats = run.method.training_step(run, batch)
            loss = float(stats["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {i}")
            if i == 0:  # warm-up: first kernels, cuDNN algorithm search, workers starting
                sync(device)
                started = time.perf_counter()
                continue
            steps, samples_done = steps + 1, samples_done + len(batch)
        sync(device)
        elapsed = time.perf_counter() - started
        run.method.on_epoch_end(run, 0)
        evaluate(run, run.val_loader, "val", shapley=True)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        return Result(key, True, 1e3 * elapsed / steps, samples_done / elapsed, peak, ", ".join(converted) or "–")
    finally:
        del run
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cuda[:N] | cpu")
    parser.add_argument("--methods", default=None, help="comma list of registered methods (default: all)")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="timed training steps per method (after one warm-up)")
    parser.add_argument("--small", dest="size", action="store_const", const="small", default="paper",
                        help="audio 1x64x48, 2 frames of 64x64, batch 8")
    parser.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                        help="audio 1x32x24, 2 frames of 32x32, batch 4 (the tests' smoke run)")
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size (default 16, --small 8, --tiny 4)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (persistent when > 0)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                        help="autocast precision (hardware=gpu's bf16; fp32 only to make a CPU smoke run quick)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the encoders in the default memory format")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available here (torch {torch.__version__}); "
              "run with --device cpu to check everything but the CUDA-only parts", file=sys.stderr)
        return 2
    methods = registered(args.methods)

    threads.apply(compose(["hardware=gpu", f"hardware.device={device}"]).hardware)  # as a run sets them
    shapes = SIZES[args.size]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 "
                 f"{'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}")
    else:
        where = "CPU (no CUDA: pinned memory and peak GPU memory skipped)"
    print(f"gpu check: torch {torch.__version__}, device {device}: {where}; {torch.get_num_threads()} threads; "
          f"audio {shapes['audio']}, visual {shapes['visual']}, batch {args.batch or shapes['batch']}, "
          f"{args.precision}, {args.workers} persistent workers, "
          f"channels_last {'on' if args.channels_last else 'off'}, "
          f"{args.steps} timed steps; load average {load_average()}", flush=True)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmbalance_gpu_check_") as cache_dir:  # UMT's teacher cache
        for key in methods:
            t0 = time.perf_counter()
            try:
                result = check_method(key, args, device, cache_dir)
            except Exception as exc:  # every method is checked; each failure is listed at the end
                tb = traceback.extract_tb(exc.__traceback__)
                where_failed = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
                result = Result(key, False, error=f"{type(exc).__name__}: {exc}{where_failed}")
            results.append(result)
            print(f"  {key}: {'ok' if result.ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    print("\n| method | status | step (ms) | samples/s | peak GPU memory (GiB) | channels_last |")
    print("|---|---|---:|---:|---:|---|")
    for r in results:
        fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
        print(f"| {r.method} | {'ok' if r.ok else 'FAILED'} | {fmt(r.step_ms, ',.1f')} | "
              f"{fmt(r.samples_per_s, ',.1f')} | {fmt(r.peak_gib, '.2f')} | {r.channels_last} |")
    failures = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failures)}/{len(results)} methods ok in {time.perf_counter() - started:.0f} s; "
          f"load average {load_average()}")
    for r in failures:
        print(f"FAILED {r.method}: {r.error}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
