"""Loader throughput, per CPU core: CREMA-D samples from raw files versus the prepared cache.

Target (issue 6): the prepared cache feeds >= 500 samples/s per core at the paper's resolution (2 frames of
224², one (1, 257, 188) spectrogram), so a handful of DataLoader workers keep a GPU busy.

The script synthesises its own CREMA-D tree in the raw release layout (AudioWAV/*.wav at 16 kHz, 2.5 s;
VideoFlash/*.flv, FLV1 480x360 at 30 fps with audio, like the real files), runs the real
`mmbalance prepare cremad` on it (frames extracted at 1 fps to jpg, then the memory-mapped cache), and times
`Dataset.__getitem__` of the real CREMA-D builder for three sources:

* raw flv + wav:   frames decoded from the flv with PyAV on every access, audio resampled + STFT;
* raw jpg + wav:   the OGM-GE / BalanceBenchmark situation: 1-fps jpg folders + wav;
* prepared cache:  uint8 frames + float16 spectrograms from memory-mapped arrays;

each in training mode (random segment frame, RandomResizedCrop + flip) and evaluation mode (centre frame,
Resize). One process, `torch.set_num_threads(1)` and (Linux) pinned to one core, so the numbers are per core;
with W DataLoader workers expect roughly W times as much.

Then, on the prepared cache in training mode (issue 14), batches of `--batch`:

* collation: `collate_batch` of ready samples, in the main process (a plain stack) and handed over from one
  DataLoader worker, where it stacks into shared memory, against a plain stack in the worker (the collation
  before issue 14, whose batch is copied once more into shared memory when the worker sends it);
* the DataLoader end to end (sampler -> __getitem__ -> collate -> main process) with 0 and 2 workers, with
  `collate_batch` and with the plain stack. Per core = samples/s over the cores that load: 1 for 0 workers,
  W for W workers (each pinned to its own core where the machine has them; the main process only receives).

Usage:  python benchmarks/loader_throughput.py [--clips 300] [--seconds 4] [--size 224] [--workdir DIR]
                                               [--only flv,jpg,cache,collate,loader] [--batch 64] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared media fixture writers

from _timing import load_average, positive_int  # noqa: E402

CASES = ("flv", "jpg", "cache", "collate", "loader")

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def _write_clip(task: tuple) -> None:
    from fixtures_av import write_video, write_wav

    root, i = task
    cid = clip_id(i)
    hz = 200.0 + 150.0 * (i % 6)
    if not (root / "AudioWAV" / f"{cid}.wav").exists():
        write_wav(root / "AudioWAV" / f"{cid}.wav", 2.5, 16000, hz=hz, seed=i)
    if not (root / "VideoFlash" / f"{cid}.flv").exists():
        write_video(root / "VideoFlash" / f"{cid}.flv", seconds=2.5, fps=30, size=(480, 360), hz=hz, seed=i, sr=22050)


def clip_id(i: int) -> str:
    """CREMA-D style names: 24 clips per actor (4 sentences x 6 emotions)."""
    return f"{1001 + i // 24}_{'ABCDEFGHIJKL'[i // 6 % 12]}AB_{EMOTIONS[i % 6]}_XX"


def synthesise(root: Path, clips: int, workers: int) -> float:
    """A raw-release CREMA-D tree of `clips` clips (existing files are kept); returns the seconds it took."""
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_clip, [(root, i) for i in range(clips)], chunksize=8))
    return time.perf_counter() - started


def throughput(ds, seconds: float, train: bool, windows: int = 5) -> tuple[float, float, int]:
    """(best, median) samples/s of ds[i] over `windows` windows of seconds / windows each, random order in
    training and sequential at eval. The best window estimates the uncontended per-core speed on a shared
    machine (as `timeit` takes the minimum); the median shows the spread."""
    n = len(ds)
    order = np.random.default_rng(0).permutation(n) if train else np.arange(n)
    for i in order[:3]:  # warm-up: imports, memmap opening, first decode
        ds[int(i)]
    rates, count = [], 0
    for _ in range(windows):
        done, started = 0, time.perf_counter()
        while True:
            ds[int(order[count % n])]
            count, done = count + 1, done + 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / windows and done >= 3:
                rates.append(done / elapsed)
                break
    return max(rates), float(np.median(rates)), count


def plain_collate(samples: list[dict]):
    """The collation before issue 14: `torch.stack` into ordinary memory in every process (reference only)."""
    from mmbalance.data.batch import Batch

    inputs = {m: torch.stack([s["inputs"][m] for s in samples]) for m in samples[0]["inputs"]}
    return Batch(inputs, torch.as_tensor([s["label"] for s in samples], dtype=torch.long),
                 torch.as_tensor([s["index"] for s in samples], dtype=torch.long))


class _ReadyBatches(torch.utils.data.Dataset):
    """Item k = a list of already loaded samples (batch k mod len), so a worker only collates and sends."""

    def __init__(self, batches: list[list[dict]]):
        self.batches = batches

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, k: int) -> list[dict]:
        return self.batches[k % len(self.batches)]


def _pin_worker(worker_id: int) -> None:
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[worker_id % len(cores)]})


def loader_rate(loader, seconds: float, windows: int = 5) -> tuple[float, float]:
    """(best, median) samples/s of iterating `loader` over `windows` windows of seconds / windows each, after
    one warm-up batch (worker start-up). As for `throughput`, the best window estimates the uncontended speed
    on a shared machine and the median shows the spread."""
    it = iter(loader)
    next(it)
    rates = []
    for _ in range(windows):
        done, started = 0, time.perf_counter()
        while True:
            done += len(next(it))
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / windows and done >= 2 * (loader.batch_size or 1):
                rates.append(done / elapsed)
                break
    return max(rates), float(np.median(rates))


def collation_rows(ds, batch: int, seconds: float) -> list[tuple[str, float, float]]:
    """(case, ms per batch, samples/s) of collating `batch` ready samples: main process, and one worker (best
    window of the hand-over, see `loader_rate`)."""
    from torch.utils.data import DataLoader

    from mmbalance.data.batch import collate_batch

    order = np.random.default_rng(1).permutation(len(ds))
    ready = [[ds[int(order[(b * batch + i) % len(ds)])] for i in range(batch)] for b in range(3)]
    rows = []
    for b in ready[:1]:
        collate_batch(b)
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        collate_batch(ready[count % len(ready)])
        count += 1
    per = (time.perf_counter() - started) / count
    rows.append(("collate_batch, main process (plain stack)", 1000 * per, batch / per))
    for name, fn in (("collate_batch in 1 worker (shared memory) + hand-over", collate_batch),
                     ("plain stack in 1 worker + hand-over (before)", plain_collate)):
        loader = DataLoader(_ReadyBatches(ready), batch_size=None, num_workers=1, collate_fn=fn,
                            worker_init_fn=_pin_worker)
        rate, _ = loader_rate(loader, seconds)
        rows.append((name, 1000 * batch / rate, rate))
        del loader
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=positive_int, default=300, help="clips in the synthetic tree")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per case")
    parser.add_argument("--size", type=positive_int, default=224, help="frame size (the paper: 224)")
    parser.add_argument("--frames", type=positive_int, default=2, help="frames per clip (BalanceBenchmark CREMA-D: 2)")
    parser.add_argument("--workdir", default=None, help="keep the synthetic tree here (default: a temp dir)")
    parser.add_argument("--only", default=None, help="comma list of cases: flv,jpg,cache,collate,loader")
    parser.add_argument("--batch", type=positive_int, default=64, help="batch size for collation and the DataLoader")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to time end to end")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU core")
    args = parser.parse_args(argv)
    unknown = [c for c in (args.only or "").split(",") if c and c not in CASES]
    if unknown or args.seconds <= 0:
        parser.error(f"--only: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}" if unknown else
                     f"--seconds {args.seconds}: expected > 0")
    print(f"load average (1, 5, 15 min) before: {load_average()}", file=sys.stderr)

    from mmbalance.data.cremad import build_cremad
    from mmbalance.data.prepare import run_prepare

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mmbalance_loader_bench_")
        work = Path(tmp.name)
    raw, prep = work / "raw", work / f"prepared_{args.size}"
    workers = os.cpu_count() or 1
    synth_s = synthesise(raw, args.clips, workers)  # the set-up may use every core; the timing does not
    t0 = time.perf_counter()
    summary = run_prepare("cremad", raw, prep, workers=workers, progress=False, image_size=args.size)
    prep_s = time.perf_counter() - t0
    clips = sum(summary["manifest_clips"].values())  # a --workdir may hold more clips from an earlier run
    torch.set_num_threads(1)
    all_cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not args.no_pin and all_cores:
        os.sched_setaffinity(0, {all_cores[0]})
    common = dict(image_size=args.size, frames=args.frames, split="stratified", test_fraction=0.5, val_fraction=0.1)
    cases = {
        "flv": ("raw flv + wav (PyAV decode)", lambda: build_cremad(str(raw), **common)),
        "jpg": ("raw jpg folders + wav", lambda: build_cremad(str(raw), visual_dir=str(prep / "frames"), **common)),
        "cache": ("prepared cache (memmap)", lambda: build_cremad(str(raw), prepared=str(prep), **common)),
    }
    wanted = [c for c in args.only.split(",") if c] if args.only else list(CASES)
    rows = []
    for key in [k for k in wanted if k in cases]:
        name, make = cases[key]
        splits = make()
        for mode, ds, train in (("train", splits.train, True), ("eval", splits.test, False)):
            best, median, count = throughput(ds, args.seconds, train)
            rows.append((name, mode, best, median, count))
            print(f"  {name:30s} {mode:5s} best {best:8.1f} median {median:8.1f} samples/s ({count} samples)",
                  file=sys.stderr)
    print(f"\nCREMA-D loader throughput, one process, 1 thread, pinned to one core: {clips} synthetic clips "
          f"(2.5 s, 480x360 FLV1 at 30 fps, 16 kHz wav), {args.frames} frames of {args.size}², audio "
          f"(1, 257, 188); torch {torch.__version__}\n")
    print("| source | mode | samples/s per core (best window) | median window | ms/sample (best) |")
    print("|---|---|---:|---:|---:|")
    for name, mode, best, median, _ in rows:
        print(f"| {name} | {mode} | {best:,.0f} | {median:,.0f} | {1000 / best:.2f} |")
    cache_rates = [r for n, _, r, _, _ in rows if n.startswith("prepared")]
    print(f"\nsynthesis {synth_s:.1f} s; `mmbalance prepare cremad` ({workers} workers) {prep_s:.1f} s for "
          f"{clips} clips ({summary.get('cached')} cached); target: prepared cache >= 500 samples/s per core -> "
          + ("met" if cache_rates and min(cache_rates) >= 500 else "NOT met" if cache_rates else "not measured"))
    if "collate" in wanted or "loader" in wanted:
        loader_section(args, build_cremad(str(raw), prepared=str(prep), **common).train, all_cores, wanted)
    if tmp is not None:
        tmp.cleanup()
    print(f"\nload average (1, 5, 15 min) after: {load_average()}")
    return 0


def loader_section(args, ds, all_cores: list[int], wanted: list[str]) -> None:
    """Collation and the DataLoader end to end on the prepared cache, training mode."""
    from torch.utils.data import DataLoader

    from mmbalance.data.batch import collate_batch

    print(f"\nPrepared cache, training mode, batches of {args.batch} ({len(ds)} training clips); torch "
          f"{torch.__version__}, {len(all_cores) or '?'} cores visible\n")
    if "collate" in wanted:
        print("| collation | ms/batch | samples/s |")
        print("|---|---:|---:|")
        for name, ms, rate in collation_rows(ds, args.batch, args.seconds):
            print(f"| {name} | {ms:.1f} | {rate:,.0f} |", flush=True)
    if "loader" not in wanted:
        return
    if all_cores:  # the workers get their own cores; the main process may use any
        os.sched_setaffinity(0, set(all_cores))
    print("\n| DataLoader end to end | workers | samples/s (best window) | median window | per loading core (best) |")
    print("|---|---:|---:|---:|---:|")
    for workers in [int(w) for w in args.workers.split(",")]:
        for name, fn in (("collate_batch (shared memory in workers)", collate_batch),
                         ("plain stack (before)", plain_collate)):
            if workers == 0 and fn is plain_collate:
                continue  # identical to collate_batch in the main process
            sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**7,
                                                     generator=torch.Generator().manual_seed(0))  # no epoch ends
            loader = DataLoader(ds, batch_size=args.batch, sampler=sampler,
                                num_workers=workers, collate_fn=fn, drop_last=True, persistent_workers=workers > 0,
                                worker_init_fn=_pin_worker if workers else None)
            best, median = loader_rate(loader, args.seconds)
            print(f"| {name} | {workers} | {best:,.0f} | {median:,.0f} | {best / max(1, workers):,.0f} |", flush=True)
            del loader


if __name__ == "__main__":
    raise SystemExit(main())
