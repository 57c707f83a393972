"""Methods side by side on the demo data: accuracy, per-modality accuracy, imbalance, and cost relative to
baseline (training FLOPs and wall time per epoch), over seeds. This is the table the method issues quote.

Usage:
    python benchmarks/method_table.py --methods baseline,ogm_ge,agm --seeds 0,1,2 [--out DIR] [-- extra overrides]
    python benchmarks/method_table.py --from DIR [DIR ...] # re-read finished sweeps together, no training

It runs one Hydra sweep (`python -m mmbalance -m method=... seed=...`) into DIR (default multirun/method_table/<time>)
and prints a markdown table. Wall time per epoch is `time/epoch_mean_s` (training, the method's epoch hooks and
validation), so compare it only between runs made on the same machine in the same sweep.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from mmbalance.analysis.report import load_runs, summarize

# methods that need an argument to run at all
REQUIRED = {"unimodal": "method.modality=audio"}


def run_sweep(methods: list[str], seeds: str, out: Path, extra: list[str]) -> None:
    for m in methods:
        if m in REQUIRED:
            raise SystemExit(f"error: {m} needs {REQUIRED[m]}; run it separately (it has no place in a one-knob sweep)")
    cmd = [sys.executable, "-m", "mmbalance", "-m", f"method={','.join(methods)}", f"seed={seeds}",
           f"hydra.sweep.dir={out}", *extra]
    print("running:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"warning: the sweep exited with {proc.returncode}; failed runs are listed below", file=sys.stderr)


def table(dirs: list[Path]) -> str:
    df = load_runs(dirs)
    summary = summarize(df)
    mods = sorted({c.split("/")[2] for c in df.columns if c.startswith("test/acc/")})
    base = summary[summary["method"] == "baseline"]
    if base.empty:
        raise SystemExit("error: the runs hold no baseline to compare costs with")
    base_flops = float(base["flops/train_total.mean"].iloc[0])
    base_time = float(base["time/epoch_mean_s.mean"].iloc[0])

    def pm(row, key, scale=100.0):
        mean, std = row.get(f"{key}.mean"), row.get(f"{key}.std")
        if mean is None or mean != mean:
            return "–"
        return f"{mean * scale:.1f} ± {std * scale:.1f}" if std == std else f"{mean * scale:.1f}"

    head = ["method", "variant", "n", "test acc", *[f"acc {m}" for m in mods], "imbalance",
            "train FLOPs ×baseline", "time/epoch ×baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [row["method"], row["variant"] or "–", str(int(row["n"])), pm(row, "test/acc"),
                 *[pm(row, f"test/acc/{m}") for m in mods], pm(row, "test/imbalance"),
                 f"{row['flops/train_total.mean'] / base_flops:.2f}", f"{row['time/epoch_mean_s.mean'] / base_time:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = df[df["status"] != "completed"]
    for _, row in failed.iterrows():
        lines.append(f"\nFAILED {row['method']} seed {row['seed']}: {row['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="baseline,ogm_ge")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--from", dest="source", type=Path, nargs="+", help="only re-read these finished sweeps")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    if args.source:
        dirs = args.source
    else:
        out = args.out or Path("multirun/method_table") / time.strftime("%Y-%m-%d_%H-%M-%S")
        methods = args.methods.split(",")
        if "baseline" not in methods:
            methods.insert(0, "baseline")
        run_sweep(methods, args.seeds, out, args.extra)
        dirs = [out]
    print(table(dirs))


if __name__ == "__main__":
    main()
