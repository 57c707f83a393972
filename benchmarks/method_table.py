"""Methods side by side on the demo data: accuracy, per-modality accuracy, imbalance, and cost relative to
baseline (training FLOPs and wall time per epoch), over seeds, without touching the README.

Usage:
    python benchmarks/method_table.py --methods baseline,ogm_ge,agm --seeds 0,1,2 [--out DIR] [-- extra overrides]
    python benchmarks/method_table.py --from DIR [DIR ...] # re-read finished sweeps together, no training

It runs one Hydra sweep (`python -m mmbalance -m method=... seed=...`) into DIR (default multirun/method_table/<time>)
and prints the README's method table for those runs (the table and the sweep are `readme_tables.py`'s). Wall time
per epoch is `time/epoch_mean_s` (training, the method's epoch hooks and validation), so compare it only between runs
made on the same machine in the same sweep.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from readme_tables import methods_table, sweep

from mmbalance.errors import UserError

# methods that need an argument to run at all
REQUIRED = {"unimodal": "method.modality=audio"}


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
        methods = args.methods.split(",")
        for m in methods:
            if m in REQUIRED:
                parser.error(f"{m} needs {REQUIRED[m]}; run it separately (it has no place in a one-knob sweep)")
        if "baseline" not in methods:
            methods.insert(0, "baseline")
        out = args.out or Path("multirun/method_table") / time.strftime("%Y-%m-%d_%H-%M-%S")
        sweep(out.resolve(), [f"method={','.join(methods)}", f"seed={args.seeds}", *args.extra])
        dirs = [out]
    try:
        print(methods_table(dirs))
    except UserError as exc:  # a --from folder that is not a sweep: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
