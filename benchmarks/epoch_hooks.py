"""PMR's epoch hook (a prototype pass over the training set) under the trainer's FLOP measurement, three ways:

  old          the whole pass under FlopCounterMode (exact count) and a new DataLoader every epoch
  exact_kept   exact count, one loader kept across epochs (`Run.loader`)
  new          first batch counted and scaled by the samples (`FlopMeter.sampled_pass`), kept loader

Modes are interleaved (each repeat runs every mode once, in rotating order) and medians reported, with the
load average before and after, since the machine may be shared. The FLOPs each mode counted are printed too:
they should agree (exact when every sample costs the same).

Usage:  python benchmarks/epoch_hooks.py [--repeats 9] [--samples 2048] [--fraction 0.5] [--batch-size 64]
                                         [--workers 0] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from mmbalance.data.synthetic import build_synthetic
from mmbalance.engine.run import LoaderSettings, Run
from mmbalance.methods.pmr import PMR
from mmbalance.metrics.flops import FlopMeter, SampledPass
from mmbalance.models.encoders import SmallCNN
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel

SHAPES = {"audio": ("spectrogram", (1, 64, 48)), "visual": ("image", (3, 32, 32))}
MODES = ("old", "exact_kept", "new")


def make_run(args, device: torch.device) -> Run:
    data = build_synthetic({m: k for m, (k, _) in SHAPES.items()}, num_classes=10, num_samples=args.samples,
                           shapes={m: list(s) for m, (_, s) in SHAPES.items()}, test_fraction=0.1, seed=0)
    torch.manual_seed(0)
    encoders = {m: SmallCNN(shape, pool="time" if kind == "spectrogram" else "grid")
                for m, (kind, shape) in SHAPES.items()}
    fusion = build_fusion("concat", {m: e.out_dim for m, e in encoders.items()}, 10)
    model = MultimodalModel(encoders, fusion).to(device)
    method = PMR(prototype_fraction=args.fraction)
    run = Run(model=model, method=method, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), scheduler=None,
              train_loader=None, val_loader=None, test_loader=None, device=device, num_classes=10,
              loader_settings=LoaderSettings(args.batch_size, num_workers=args.workers))
    run.train_loader = run.make_loader(data.train, train=True)
    method.setup(run)
    return run


@contextlib.contextmanager
def exact_passes():
    """Count every pass in full under the hook's counter, as before passes could be sampled."""
    original = FlopMeter.sampled_pass

    @contextlib.contextmanager
    def exact(self):
        yield SampledPass(measured=False)

    FlopMeter.sampled_pass = exact
    try:
        yield
    finally:
        FlopMeter.sampled_pass = original


def hook_once(run: Run, mode: str, epoch: int) -> tuple[float, float]:
    """(seconds, FLOPs) of one on_epoch_end under the trainer's measurement."""
    if mode == "old":  # a new loader (and new workers) for this epoch's pass, as before loaders were kept
        run.loader = lambda purpose, dataset, train, shard=True, indices=None: run.make_loader(
            dataset, train, shard, indices)
    else:
        vars(run).pop("loader", None)  # back to Run.loader
    before = run.flops.total
    counting = exact_passes() if mode in ("old", "exact_kept") else contextlib.nullcontext()
    with counting:
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with run.flops.measure("method_epoch_hooks"):
            run.method.on_epoch_end(run, epoch)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, run.flops.total - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--fraction", type=float, default=0.5, help="PMR's prototype_fraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = make_run(args, device)
    n_pass = max(1, int(round(args.fraction * len(run.train_loader.dataset))))
    load_before = os.getloadavg()
    print(f"PMR on_epoch_end: prototype pass over {n_pass} samples, batch {args.batch_size}, "
          f"workers {args.workers}, device {device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for mode in MODES:  # warm-up: first loaders, allocator, kernels
        hook_once(run, mode, 0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    flops: dict[str, float] = {}
    for r in range(args.repeats):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            seconds, counted = hook_once(run, mode, r + 1)
            times[mode].append(seconds)
            flops[mode] = counted
    load_after = os.getloadavg()
    base = statistics.median(times["old"])
    print(f"{'mode':<12} {'median s':>9} {'min s':>8} {'max s':>8} {'vs old':>7} {'FLOPs counted':>15}")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"{mode:<12} {med:9.4f} {min(times[mode]):8.4f} {max(times[mode]):8.4f} {med / base:6.2f}x "
              f"{flops[mode]:15.6g}")
    print("load average before: %.2f %.2f %.2f  after: %.2f %.2f %.2f" % (*load_before, *load_after))


if __name__ == "__main__":
    main()
