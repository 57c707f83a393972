"""Run under torchrun (2 CPU processes, gloo) by tests/test_distributed.py: for every method given, build the
run each rank would train (hardware=ddp, its own data shard), take two training steps, then check that every
parameter and every tensor of the method's state is identical on all ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_check.py OUT.json [--no-sync] METHOD[:3]...

`--no-sync` turns the gradient averaging off: the negative control that shows the check can fail.

Rank 0 writes {method: {"ok": bool, "max_param_diff": float, "max_state_diff": float, "steps": int}} to OUT.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_check.py OUT.json --fit METHOD[:3]...

`--fit` trains each method for FIT_EPOCHS epochs with the real `Trainer` on every rank (checkpoints in the
working directory), twice: as hardware=ddp runs it ("synced") and with `distributed.sync_buffers` turned off
("unsynced", the negative control). Rank 0 writes {method: {"synced": r, "unsynced": r}} where r holds, over the
ranks, the differing validation metrics of every epoch ("val_diffs": {"<epoch>/<key>": max difference}), the
differing test metrics ("test_diffs"), and after every training epoch the largest parameter and buffer
difference ("max_param_diff", "max_buffer_diff") and the method state's ("max_state_diff").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import THREE, compose_cfg  # noqa: E402
from helpers import METHOD_EXTRA_ARGS  # noqa: E402

from mmbalance.config import validate  # noqa: E402
from mmbalance.engine import distributed  # noqa: E402
from mmbalance.engine.trainer import Trainer  # noqa: E402
from mmbalance.train import build_run  # noqa: E402

STEPS = 2
FIT_EPOCHS = 2
# enough validation and test samples that the ranks' BatchNorm statistics show in the metrics without the sync
FIT_ARGS = ["dataset.num_samples=400", "trainer.batch_size=16"]


def flat_tensors(obj) -> list[torch.Tensor]:
    """Every tensor (and number) in a nested state, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().float().reshape(-1).cpu()]
    if isinstance(obj, bool | int | float):
        return [torch.tensor([float(obj)])]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in flat_tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in flat_tensors(v)]
    return []


def max_diff_across_ranks(x: torch.Tensor) -> float:
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x)
    return max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0 for g in gathered)


def ddp_cfg(method: str, three: bool, extra: list[str] = ()):
    overrides = [f"method={method}", "hardware=ddp", "hardware.device=cpu", "hardware.backend=gloo",
                 "hardware.precision=fp32", "hardware.pin_memory=false", "hardware.num_workers=0",
                 "trainer.batch_size=8", *extra,
                 *METHOD_EXTRA_ARGS.get(method, []), *(THREE if three else [])]
    return compose_cfg(overrides)


def check(method: str, three: bool) -> dict:
    cfg = ddp_cfg(method, three)
    validate(cfg)
    run = build_run(cfg, torch.device("cpu"))
    run.method.setup(run)
    run.method.on_epoch_start(run, 0)
    run.train_loader.sampler.set_epoch(0)
    seen = []
    for step, batch in enumerate(run.train_loader):
        if step == STEPS:
            break
        seen.append(batch.index.tolist())
        run.method.training_step(run, batch)
        run.step += 1
    owned = [p for module in run.method.owned_modules().values() for p in module.parameters()]
    params = torch.cat([p.detach().reshape(-1) for p in [*run.model.parameters(), *owned]])
    state = flat_tensors(run.method.state_dict())
    state = torch.cat(state) if state else torch.zeros(0)
    # the ranks trained on different samples: the shards must be disjoint
    shard = torch.tensor(sorted(i for b in seen for i in b), dtype=torch.float32)
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, shard)
    disjoint = not (set(shards[0].tolist()) & set(shards[1].tolist()))
    return {"max_param_diff": max_diff_across_ranks(params), "max_state_diff": max_diff_across_ranks(state),
            "steps": len(seen), "disjoint_shards": disjoint}


def metric_diffs(mine: dict, prefix: str) -> dict[str, float]:
    """{key: largest difference over the ranks} of every `prefix` metric that is not the same on all ranks."""
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, {k: v for k, v in mine.items() if k.startswith(prefix)})
    diffs = {}
    for key in sorted(set().union(*gathered)):
        values = [g.get(key) for g in gathered]
        if any(v != values[0] and not (v != v and values[0] != values[0]) for v in values):  # NaN equals NaN
            numbers = [v for v in values if isinstance(v, int | float)]
            diffs[key] = max(numbers) - min(numbers) if len(numbers) == len(values) else float("inf")
    return diffs


class CheckedTrainer(Trainer):
    """The real Trainer, recording after every training epoch how far the replicas are apart."""

    def train_epoch(self, epoch):
        means = super().train_epoch(epoch)
        run = self.run
        owned = [m for m in run.method.owned_modules().values()]
        params = torch.cat([p.detach().reshape(-1) for m in [run.model, *owned] for p in m.parameters()])
        buffers = [b.detach().double().reshape(-1) for m in [run.model, *owned] for b in m.buffers()]
        state = flat_tensors(run.method.state_dict())
        self.drift.append({"param": max_diff_across_ranks(params),
                           "buffer": max_diff_across_ranks(torch.cat(buffers)) if buffers else 0.0,
                           "state": max_diff_across_ranks(torch.cat(state)) if state else 0.0})
        return means


def fit_check(method: str, three: bool, folder: Path) -> dict:
    cfg = ddp_cfg(method, three, FIT_ARGS)
    validate(cfg)
    run = build_run(cfg, torch.device("cpu"), folder)
    trainer = CheckedTrainer(run, epochs=FIT_EPOCHS, count_flops=False, progress_bar=False)
    trainer.drift = []
    test = trainer.fit()
    val_diffs = {}
    for row in trainer.history:
        val_diffs.update({f"{row['epoch']}/{k}": v for k, v in metric_diffs(row, "val/").items()})
    test_diffs = metric_diffs({**{k: v for k, v in test.items() if k.startswith("test/")},
                               "test/best_epoch": test["best_epoch"]}, "test/")
    return {"epochs": len(trainer.history), "val_diffs": val_diffs, "test_diffs": test_diffs,
            "max_param_diff": max(d["param"] for d in trainer.drift),
            "max_buffer_diff": max(d["buffer"] for d in trainer.drift),
            "max_state_diff": max(d["state"] for d in trainer.drift)}


def fit_checks(method: str, three: bool) -> dict:
    sync = distributed.sync_buffers
    results = {}
    for variant in ("synced", "unsynced"):
        if variant == "unsynced":
            distributed.sync_buffers = lambda modules: None
        try:
            results[variant] = fit_check(method, three, Path.cwd() / f"fit-{method}-{int(three) + 2}-{variant}")
        finally:
            distributed.sync_buffers = sync
    return results


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    if "--no-sync" in specs:
        specs.remove("--no-sync")
        distributed.average_gradients = lambda params: None
    fit = "--fit" in specs
    if fit:
        specs.remove("--fit")
    distributed.init_from_env("gloo", "cpu")
    torch.set_num_threads(1)
    results = {}
    for spec in specs:
        method, _, mods = spec.partition(":")
        key = f"{method}:{mods or 2}"
        if fit:  # an exception here is a failure of the check: let torchrun report it
            results[key] = fit_checks(method, mods == "3")
            continue
        try:
            r = check(method, mods == "3")
            r["ok"] = r["max_param_diff"] == 0.0 and r["max_state_diff"] == 0.0 and r["disjoint_shards"]
        except Exception as exc:  # report, keep checking the others
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results[key] = r
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    distributed.shutdown(finished=True)


if __name__ == "__main__":
    main()
