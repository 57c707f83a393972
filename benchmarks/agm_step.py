"""AGM's training step against the baseline's, at the paper's CREMA-D shapes (issue 14).

Two ResNet-18 encoders (audio: a 1x257x188 spectrogram; visual: 2 RGB frames of 224x224), concat fusion,
6 classes, batch 16, SGD. Each variant is a full `Method.training_step` (forward, loss, backward, the
method's after-backward hook, optimizer step) on its own model built from the same seed:

- baseline: the plain step;
- agm: AGM with its defaults (inside the modulation window: the official eval-mode coalition pass, with
  gradients);
- agm_train_features: AGM with `coalition_features="train"` (the fast variant: the coalition values reuse
  the training pass's features).

Variants are interleaved within each round, the order alternates between rounds (forward, then reversed),
and the medians over rounds are compared (also the median of the per-round ratios); only ratios measured
in one process mean anything on a shared machine, and the load average is printed before and after.

Usage:  python benchmarks/agm_step.py [--rounds 5] [--steps 2] [--small] [--device cpu] [--threads N]
        [--variants agm,agm_train_features]
        (--small: 1x64x48 spectrograms, 2 frames of 64x64, batch 8 — a quick check, not the target)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mmbalance.data.batch import Batch
from mmbalance.engine.run import Run
from mmbalance.methods.agm import AGM
from mmbalance.methods.baseline import Baseline
from mmbalance.models.encoders import ResNet18Encoder
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel

CLASSES = 6  # CREMA-D emotions
PAPER = {"audio": (1, 257, 188), "visual": (2, 3, 224, 224), "batch": 16}
SMALL = {"audio": (1, 64, 48), "visual": (2, 3, 64, 64), "batch": 8}


def make_run(method, shapes: dict, device: torch.device) -> Run:
    torch.manual_seed(0)
    encoders = {m: ResNet18Encoder(shapes[m]) for m in ("audio", "visual")}
    fusion = build_fusion("concat", {m: e.out_dim for m, e in encoders.items()}, CLASSES)
    model = MultimodalModel(encoders, fusion).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=device, num_classes=CLASSES)
    method.setup(run)
    return run


def make_batch(shapes: dict, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(1)
    n = shapes["batch"]
    inputs = {m: torch.randn(n, *shapes[m], generator=g) for m in ("audio", "visual")}
    label = torch.randint(0, CLASSES, (n,), generator=g)
    return Batch(inputs, label, torch.arange(n)).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant per round")
    parser.add_argument("--small", action="store_true", help="small shapes, for a quick check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--variants", default="agm,agm_train_features",
                        help="comma-separated AGM variants timed against the baseline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SMALL if args.small else PAPER
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{'small' if args.small else 'paper'} shapes: audio {shapes['audio']}, visual {shapes['visual']}, "
          f"batch {shapes['batch']}")
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f" % os.getloadavg())
    batch = make_batch(shapes, device)
    variants = {"agm": dict, "agm_train_features": lambda: {"coalition_features": "train"}}
    runs = {"baseline": make_run(Baseline(), shapes, device)}
    for name in args.variants.split(","):
        runs[name] = make_run(AGM(**variants[name]()), shapes, device)

    def step(name: str) -> float:
        run = runs[name]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            run.method.training_step(run, batch)
        sync(device)
        return (time.perf_counter() - t0) / args.steps

    for name in runs:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(step(name))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in order), flush=True)
    base = statistics.median(times["baseline"])
    for name in order:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["baseline"]))
        fastest = min(times[name]) / min(times["baseline"])
        print(f"{name:>20}: median {med * 1e3:8.1f} ms/step  -> {med / base:.2f}x baseline "
              f"(median of per-round ratios {paired:.2f}x; fastest rounds {fastest:.2f}x)")
    print("load average (1, 5, 15 min) after:  %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
