"""Speed targets, measured (not asserted in tests):

(a) mmbalance's baseline training step (Method.training_step through the Run context) against a
    hand-written PyTorch step on the same model and batch; target <= 1.05x.
(b) the evaluation pass with exact Shapley values (all 2^M coalitions) against one plain evaluation
    pass (forward + argmax), for 2 and 3 modalities; target <= 1.3x.

Usage:  python benchmarks/overhead.py [--repeats 7] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmbalance.data.synthetic import build_synthetic
from mmbalance.engine.evaluation import evaluate
from mmbalance.engine.run import LoaderSettings, Run
from mmbalance.methods.baseline import Baseline
from mmbalance.models.encoders import MLPEncoder, SmallCNN
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel

SHAPES = {"audio": ("spectrogram", (1, 40, 32)), "image": ("image", (1, 16, 16)), "text": ("vector", (32,))}


def make_run(n_mod: int, device: torch.device, batch_size: int, samples: int) -> Run:
    mods = dict(list(SHAPES.items())[:n_mod])
    data = build_synthetic({m: k for m, (k, _) in mods.items()}, num_classes=10, num_samples=samples,
                           shapes={m: list(s) for m, (_, s) in mods.items()}, test_fraction=0.5, seed=0)
    torch.manual_seed(0)
    encoders = {}
    for m, (kind, shape) in mods.items():
        if kind == "vector":
            encoders[m] = MLPEncoder(shape)
        else:
            encoders[m] = SmallCNN(shape, pool="time" if kind == "spectrogram" else "grid")
    fusion = build_fusion("concat", {m: e.out_dim for m, e in encoders.items()}, 10)
    model = MultimodalModel(encoders, fusion).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = Run(model=model, method=Baseline(), optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=device, num_classes=10, loader_settings=LoaderSettings(batch_size))
    run.train_loader = run.make_loader(data.train, train=True)
    run.test_loader = run.make_loader(data.test, train=False)
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, n: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench_step(device, repeats: int, steps: int) -> None:
    run = make_run(2, device, batch_size=64, samples=256)
    model, opt = run.model, run.optimizer
    batch = next(iter(run.train_loader)).to(device)
    mods = list(model.modalities)

    def hand_written():
        feats = [model.encoders[m](batch.inputs[m]) for m in mods]
        logits = model.fusion.fc(torch.cat(feats, dim=1))
        loss = F.cross_entropy(logits, batch.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ours():
        run.method.training_step(run, batch)

    model.train()
    for _ in range(3):  # warm up both paths
        hand_written()
        ours()
    hw, mm = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        hw.append(timed(hand_written, device, steps))
        mm.append(timed(ours, device, steps))
    a, b = statistics.median(hw), statistics.median(mm)
    print(f"(a) training step, 2 modalities, batch 64: hand-written {a * 1e3:.2f} ms, "
          f"mmbalance baseline {b * 1e3:.2f} ms -> {b / a:.3f}x (target <= 1.05x)")


def bench_shapley(device, repeats: int) -> None:
    for n_mod in (2, 3):
        run = make_run(n_mod, device, batch_size=128, samples=1024)
        model = run.model.eval()

        @torch.no_grad()
        def plain():
            for batch in run.test_loader:
                batch = batch.to(device)
                model(batch.inputs).logits.argmax(1).cpu()

        def shapley():
            evaluate(run, run.test_loader, "test", shapley=True)

        plain(), shapley()
        p, s = [], []
        for _ in range(repeats):
            p.append(timed(plain, device, 1))
            s.append(timed(shapley, device, 1))
        a, b = statistics.median(p), statistics.median(s)
        print(f"(b) evaluation of {len(run.test_loader.dataset)} samples, {n_mod} modalities: plain pass "
              f"{a * 1e3:.1f} ms, with exact Shapley ({2 ** n_mod} coalitions) {b * 1e3:.1f} ms -> {b / a:.3f}x "
              f"(target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    bench_step(device, args.repeats, args.steps)
    bench_shapley(device, args.repeats)


if __name__ == "__main__":
    main()
