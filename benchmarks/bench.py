"""`make bench`: the speed targets in one table, measured side by side in one process.

Rows (each comparison's variants interleaved, the order alternating between rounds, medians over rounds):

* overhead: mmbalance's baseline step (`Method.training_step` through the `Run`) against a hand-written
  PyTorch step (encoders -> concat head -> cross-entropy -> zero_grad -> backward -> step) on the same model
  and batch; a small model (SmallCNN x2, batch 64) and the paper's shapes (ResNet-18 x2, audio 1x257x188,
  2 frames of 224x224, batch 16, 6 classes). Target <= 1.05x.
* Shapley: an evaluation pass with exact Shapley values (all 2^M coalitions, `engine.evaluation.evaluate`)
  against a plain pass (forward + argmax), 2, 3 and 4 modalities, small encoders. Target <= 1.3x.
* method steps: every registered method's `training_step` against the baseline's, at the paper's shapes,
  each on its own model from the same seed, built through the project's config composition
  (`method=<key>`), so a new method appears here without edits. Targets: AGM <= 1.5x, MMPareto <= 1.7x.
* loader: the real CREMA-D builder reading `mmbalance prepare`'s cache of a synthetic raw tree (the
  functions of benchmarks/loader_throughput.py), one thread pinned to one core. Target >= 500 samples/s
  per core.

`--small` shrinks every size (audio 1x64x48, 2 frames of 64x64, batch 8, fewer samples and clips) for CI and
quick checks; its ratios are not the targets' conditions (`--tiny` is the tests' smoke size).

Duration on 2 CPU cores (measured beside other work): `--small`, 3 rounds: about 2 minutes. The full run
(paper shapes, 3 rounds, one step per method per round): about 12-15 minutes, most of it the method steps
(a ResNet-18 x2 step at these shapes takes about 5-6 s on 2 cores; one warm-up and 3 timed rounds of ~20
variants) and building every method's run (UMT trains its two teachers for one epoch); each extra round adds
about 2 minutes, so `--rounds` bounds it. It holds every method's run at once: about 7-8 GB of memory. On a
GPU the whole run takes a few minutes.

Usage:  python benchmarks/bench.py [--small] [--rounds 3] [--methods agm,mmpareto] [--device auto|cpu|cuda]
                                   [--sections overhead,shapley,methods,loader]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mmbalance.engine import threads

# the thread policy a CLI run applies (engine/threads.py), set before torch loads: idle OpenMP threads sleep
# instead of spinning, which on a shared machine otherwise slows small steps by an order of magnitude
threads.prepare_process({"device": "cpu", "threads": "auto", "wait_policy": "auto"})

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from _timing import device_or_exit, interleaved, load_average, positive_int  # noqa: E402

SECTIONS = ("overhead", "shapley", "methods", "loader")
CLASSES = 6  # CREMA-D emotions
# the paper's CREMA-D setting (BalanceBenchmark): ResNet-18 per modality, batch 16
PAPER = {"audio": (1, 257, 188), "visual": (2, 3, 224, 224), "batch": 16}
SMALL = {"audio": (1, 64, 48), "visual": (2, 3, 64, 64), "batch": 8}
TINY = {"audio": (1, 32, 24), "visual": (2, 3, 32, 32), "batch": 4}  # the tests' smoke runs
SIZES = {"paper": PAPER, "small": SMALL, "tiny": TINY}
TARGETS = {"overhead": 1.05, "shapley": 1.3, "agm": 1.5, "mmpareto": 1.7, "loader": 500.0}
# methods that need an argument to run at all (as for benchmarks/method_table.py)
REQUIRED = {"unimodal": ["method.modality=audio"]}
# settings under which a method's mechanism acts from the first step, where its defaults wait (warm-ups,
# unlock epochs), so the step timed is the method's own and not the baseline path it starts with
ACTIVE = {"opm": ["method.warmup_epochs=0", "method.p_exe=1.0"], "greedy": ["method.unlock_epoch=0"]}
# documented fast variants, timed beside their method (row name: (method, extra overrides)); the AGM target
# holds for either AGM row
VARIANTS = {"agm coalition_features=train": ("agm", ["method.coalition_features=train"])}
TARGETS["agm coalition_features=train"] = TARGETS["agm"]


def compose(overrides: list[str]):
    """The run config as the CLI composes it (conf/train.yaml + overrides), without the `hydra` node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mmbalance.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def registered(selected: str | None) -> list[str]:
    """Registry keys in registry order (family, then name), narrowed to the comma list `selected`."""
    from mmbalance.methods import registered_methods

    keys = list(registered_methods())
    if not selected:
        return keys
    wanted = [k.strip() for k in selected.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; registered: {', '.join(keys)}")
    return [k for k in keys if k in wanted]


def method_overrides(key: str) -> list[str]:
    return [f"method={key}", *REQUIRED.get(key, []), *ACTIVE.get(key, [])]


def av_overrides(shapes: dict, samples: int, cache_dir: str) -> list[str]:
    """Synthetic audio (spectrogram) + visual (frames) data at `shapes` with the ResNet-18 backbone."""
    a, v = (",".join(map(str, shapes[m])) for m in ("audio", "visual"))
    return ["dataset=synthetic", f"dataset.num_classes={CLASSES}", f"dataset.num_samples={samples}",
            "dataset.modalities.visual=frames", f"dataset.shapes={{audio:[{a}],visual:[{v}]}}",
            "backbone=resnet18", f"trainer.batch_size={shapes['batch']}", "trainer.epochs=1",
            "trainer.progress_bar=false", "eval.flops=false", f"paths.cache_dir={cache_dir}"]


@dataclass
class Prepared:
    run: object
    batch: object


def prepare(cfg, device: torch.device) -> Prepared:
    """A run as `train.build_run` wires it, set up for epoch 0, and one training batch on the device."""
    from mmbalance.config import validate
    from mmbalance.train import build_run

    validate(cfg)
    run = build_run(cfg, device)
    run.method.setup(run)
    run.epoch = 0
    run.method.on_epoch_start(run, 0)
    run.model.train()
    batch = next(iter(run.train_loader)).to(device)
    return Prepared(run, batch)


def hand_written_step(run, batch):
    """The same update written directly in PyTorch on the run's model and optimizer (concat head)."""
    model, opt = run.model, run.optimizer
    mods = list(model.modalities)

    def step():
        feats = [model.encoders[m](batch.inputs[m]) for m in mods]
        loss = F.cross_entropy(model.fusion.fc(torch.cat(feats, dim=1)), batch.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def method_step(p: Prepared):
    def step():
        p.run.method.training_step(p.run, p.batch)

    return step


# ------------------------------------------------------------------------------------------------ rows

@dataclass
class Row:
    section: str
    case: str
    reference: str
    measured: str
    ratio: float | None = None
    target: str = "–"
    ok: bool | None = None


def ratio_row(section: str, case: str, ref_name: str, ref: float, name: str, value: float,
              limit: float | None) -> Row:
    ratio = value / ref
    return Row(section, case, f"{ref_name} {ref * 1e3:,.1f} ms", f"{name} {value * 1e3:,.1f} ms", ratio,
               f"≤ {limit:g}×" if limit else "–", (ratio <= limit) if limit else None)


def say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def bench_overhead_small(args, device) -> list[Row]:
    cfg = compose(["dataset=synthetic", "dataset.num_samples=256", "backbone=small", "trainer.batch_size=64",
                   "trainer.progress_bar=false", "eval.flops=false", "method=baseline",
                   f"hardware.device={device.type}"])
    p = prepare(cfg, device)
    say("overhead, small model")
    med = interleaved({"hand-written": (hand_written_step(p.run, p.batch), args.small_steps),
                       "mmbalance": (method_step(p), args.small_steps)}, args.rounds, device, progress=say)
    return [ratio_row("overhead", f"small model: SmallCNN ×2, batch {len(p.batch)}", "hand-written",
                      med["hand-written"], "mmbalance", med["mmbalance"], TARGETS["overhead"])]


def bench_shapley(args, device) -> list[Row]:
    from mmbalance.engine.evaluation import evaluate

    extra = {2: [], 3: ["+dataset.modalities.text=vector"],
             4: ["+dataset.modalities.text=vector", "+dataset.modalities.depth=image"]}
    rows = []
    for n_mod in (2, 3, 4):
        cfg = compose(["dataset=synthetic", f"dataset.num_samples={1024 if args.size == 'paper' else 256}",
                       "dataset.test_fraction=0.5", "backbone=small", "trainer.batch_size=128",
                       "trainer.progress_bar=false", "eval.flops=false", f"hardware.device={device.type}",
                       *extra[n_mod]])
        p = prepare(cfg, device)
        run, model = p.run, p.run.model

        @torch.no_grad()
        def plain(run=run, model=model):
            model.eval()
            for batch in run.test_loader:
                model(batch.to(device).inputs).logits.argmax(1).cpu()

        def shapley(run=run):
            evaluate(run, run.test_loader, "test", shapley=True)

        say(f"Shapley, {n_mod} modalities")
        med = interleaved({"plain": (plain, 1), "shapley": (shapley, 1)}, args.rounds, device, progress=say)
        rows.append(ratio_row("Shapley", f"{n_mod} modalities ({2 ** n_mod} coalitions), "
                              f"{len(run.test_loader.dataset)} samples", "plain eval", med["plain"],
                              "with Shapley", med["shapley"], TARGETS["shapley"]))
    return rows


def bench_methods(args, device, methods: list[str], cache_dir: str, sections: list[str]) -> list[Row]:
    """The paper-shape overhead row and every method's step against the baseline, one interleaved group."""
    shapes = SIZES[args.size]
    base_overrides = av_overrides(shapes, 48, cache_dir) + [f"hardware.device={device.type}"]
    prepared, failed = {}, []
    builds = {key: method_overrides(key) for key in ["baseline", *[m for m in methods if m != "baseline"]]}
    builds.update({name: method_overrides(key) + extra for name, (key, extra) in VARIANTS.items() if key in methods})
    for key, overrides in builds.items():
        say(f"building {key}")
        try:
            prepared[key] = prepare(compose(base_overrides + overrides), device)
        except Exception as exc:  # one broken method must not hide the others' numbers
            failed.append(Row("method step", key, "–", f"FAILED: {type(exc).__name__}: {exc}"[:120]))
            if key == "baseline":
                return failed
    base = prepared["baseline"]
    variants = {}
    if "overhead" in sections:
        variants["hand-written"] = (hand_written_step(base.run, base.batch), args.steps)
    variants.update({key: (method_step(p), args.steps) for key, p in prepared.items()})
    say(f"method steps ({len(prepared)} methods)")
    med = interleaved(variants, args.rounds, device, progress=say)
    shape_text = (f"ResNet-18 ×2, audio {'×'.join(map(str, shapes['audio']))}, "
                  f"{shapes['visual'][0]} frames {shapes['visual'][-1]}², batch {shapes['batch']}")
    rows = []
    if "overhead" in sections:
        rows.append(ratio_row("overhead", f"{args.size} shapes: {shape_text}",
                              "hand-written", med["hand-written"], "mmbalance", med["baseline"],
                              TARGETS["overhead"]))
    if "methods" in sections:
        for key in prepared:
            if key != "baseline":
                rows.append(ratio_row("method step", key, "baseline", med["baseline"], key, med[key],
                                      TARGETS.get(key)))
        rows.extend(failed)
    return rows


def bench_loader(args) -> list[Row]:
    """Prepared-cache samples/s per core (train and eval mode), medians over interleaved rounds.

    Runs first: synthesis and `prepare` fork worker pools, which must happen before this process has run
    torch's intra-op thread pool (a forked child can inherit its locks held and hang)."""
    import statistics

    from loader_throughput import synthesise, throughput
    from mmbalance.data.cremad import build_cremad
    from mmbalance.data.prepare import run_prepare

    clips = 48 if args.size == "paper" else 12
    seconds = 1.5 if args.size == "paper" else 0.5
    with tempfile.TemporaryDirectory(prefix="mmbalance_bench_loader_") as tmp:
        work = Path(args.loader_dir) if args.loader_dir else Path(tmp)
        raw, prep = work / "raw", work / "prepared"
        say(f"loader: synthesising {clips} CREMA-D clips and preparing the cache in {work}")
        synthesise(raw, clips, os.cpu_count() or 1)  # keeps the clips already there
        run_prepare("cremad", raw, prep, workers=os.cpu_count() or 1, progress=False, image_size=224)
        splits = build_cremad(str(raw), prepared=str(prep), image_size=224, frames=2, split="stratified",
                              test_fraction=0.5, val_fraction=0.1)
        threads = torch.get_num_threads()
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        rates = {"train": [], "eval": []}
        try:
            torch.set_num_threads(1)
            if cores:
                os.sched_setaffinity(0, {cores[0]})
            order = [("train", splits.train, True), ("eval", splits.test, False)]
            for r in range(args.rounds):
                for mode, ds, train in order if r % 2 == 0 else order[::-1]:
                    rates[mode].append(throughput(ds, seconds, train, windows=1)[0])
                say(f"loader round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{m} {v[-1]:,.0f}/s" for m, v in rates.items()))
        finally:
            torch.set_num_threads(threads)
            if cores:
                os.sched_setaffinity(0, set(cores))
    rows = []
    for mode, values in rates.items():
        rate = statistics.median(values)
        rows.append(Row("loader", f"CREMA-D prepared cache, {mode} (2 frames 224², audio 1×257×188)", "–",
                        f"{rate:,.0f} samples/s per core", None, f"≥ {TARGETS['loader']:g}/s",
                        rate >= TARGETS["loader"]))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| section | case | reference | measured | ratio | target | met |", "|---|---|---|---|---:|---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "–"
        ok = "–" if r.ok is None else ("yes" if r.ok else "**no**")
        lines.append(f"| {r.section} | {r.case} | {r.reference} | {r.measured} | {ratio} | {r.target} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--small", dest="size", action="store_const", const="small", default="paper",
                        help="reduced sizes, for CI and quick checks")
    parser.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                        help="the smallest sizes (audio 1x32x24, 2 frames of 32x32, batch 4): the tests' smoke run")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="timed rounds per comparison (medians over them)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="method steps per variant per round (default 1, --small 3)")
    parser.add_argument("--small-steps", type=positive_int, default=None,
                        help="small-model overhead steps per variant per round (default 20, --small 10)")
    parser.add_argument("--methods", default=None, help="comma list of registered methods (default: all)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    parser.add_argument("--loader-dir", default=None,
                        help="keep the loader's synthetic CREMA-D tree and cache here between runs "
                             "(default: a temp dir)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: hardware.threads=auto, as a run resolves it)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.size == "paper" else 3)
    args.small_steps = args.small_steps or (20 if args.size == "paper" else 10)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        parser.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}" if bad else
                     f"--sections is empty; choose from {', '.join(SECTIONS)}")
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: expected 0 (auto) or a positive count")
    device = device_or_exit(args.device, parser)
    policy = threads.apply({"device": device.type, "threads": args.threads or "auto", "wait_policy": "auto"})
    methods = registered(args.methods)
    started = time.perf_counter()
    shapes = SIZES[args.size]
    wait = policy["wait_policy"] if policy["wait_policy_in_effect"] else "default"
    header = (f"mmbalance bench ({args.size} sizes): torch {torch.__version__}, device {device}, "
              f"{torch.get_num_threads()} threads (OpenMP wait policy {wait}), {os.cpu_count()} CPUs, "
              f"{args.rounds} rounds (medians, variants interleaved, order alternating); audio {shapes['audio']}, "
              f"visual {shapes['visual']}, batch {shapes['batch']}")
    print(header, flush=True)
    print(f"load average (1, 5, 15 min) before: {load_average()}", flush=True)
    rows: list[Row] = []
    if "loader" in sections:
        rows += bench_loader(args)
    with tempfile.TemporaryDirectory(prefix="mmbalance_bench_cache_") as cache_dir:  # UMT's teacher cache
        if "overhead" in sections:
            rows += bench_overhead_small(args, device)
        if "overhead" in sections or "methods" in sections:  # the overhead row needs the baseline only
            rows += bench_methods(args, device, methods if "methods" in sections else ["baseline"], cache_dir,
                                  sections)
        if "shapley" in sections:
            rows += bench_shapley(args, device)
    order = {"overhead": 0, "Shapley": 1, "method step": 2, "loader": 3}
    rows.sort(key=lambda r: order[r.section])  # stable: each section keeps its own order
    print()
    print(table(rows))
    print(f"\nload average (1, 5, 15 min) after: {load_average()}; {time.perf_counter() - started:.0f} s in all. "
          "Only ratios measured in one process mean anything on a shared machine.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
