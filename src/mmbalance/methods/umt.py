"""UMT: Uni-Modal Teacher (Du et al., ICML 2023): feature distillation from frozen unimodal teachers."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from mmbalance.constraints import NonNegativeFloat, PositiveFloat, PositiveInt
from mmbalance.engine.checkpoint import load_checkpoint, save_checkpoint
from mmbalance.errors import UserError
from mmbalance.methods.base import Method

log = logging.getLogger("mmbalance")

CACHE_FORMAT = 1
_SIMPLE = (bool, int, float, str, tuple, type(None))


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of what determines an encoder: its class, its printed structure, the plain attributes of every
    submodule (pooling mode, input shape, ...) and every parameter and buffer value (its initialisation)."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for name, sub in module.named_modules():
        attrs = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"
                 and isinstance(v, _SIMPLE)}
        h.update(f"{name}:{json.dumps(attrs, sort_keys=True, default=repr)}\n".encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def subset_fingerprint(dataset) -> str | None:
    """sha256 of which samples of the underlying dataset a (nested) `Subset` holds, e.g. the training part left by
    a method that holds out data (G-Blending, OLM in a hybrid); None for a whole dataset. The size alone does not
    identify such a part: two held-out splits of one size (another method, another seed offset) would share a
    cached teacher trained on samples that one of them holds out."""
    if not isinstance(dataset, Subset):
        return None
    chain = []
    while isinstance(dataset, Subset):
        chain.append(np.asarray(dataset.indices, dtype=np.int64))
        dataset = dataset.dataset
    positions = chain.pop()  # the innermost indices point into the underlying dataset; each outer level into it
    for indices in reversed(chain):
        positions = positions[indices]
    return hashlib.sha256(positions.tobytes()).hexdigest()


def _cuda_devices(run) -> list:
    return [run.device] if run.device.type == "cuda" else []


def distillation_losses(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> dict[str, Tensor]:
    """MSE(h_m, t_m) per modality: the mean over the batch and the feature dimensions."""
    return {m: F.mse_loss(student[m].float(), teacher[m].float()) for m in student}


class UMT(Method):
    """UMT, Uni-Modal Teacher (Du, Teng, Wang, Yuan, Zhao, Wang, Zhang, Zhao: "On Uni-Modal Feature Learning in
    Supervised Multi-Modal Learning", ICML 2023). No official code was found; this follows the paper's
    structure and the peer's (BalanceMM `UMT_trainer.py`) loss, with its defects fixed.

    Before joint training (`setup`), one unimodal model per modality is trained on the training split:
    teacher_m = a deep copy of the student's freshly initialised encoder of modality m plus a linear head,
    trained with cross-entropy. The teachers are then frozen (no grad) and kept in eval mode. Each step:
        loss = CE(z, y) + scaling * sum_m MSE(h_m, sg(t_m)),
    where h_m is the student's pooled feature of modality m and t_m the teacher encoder's on the same input
    (the same feature location, so the dimensions match by construction); MSE is the mean over batch and
    dimensions. The students start from their own initialisation (not from the teachers).

    Teacher recipe (defaults = the run's own recipe, which is how the peer's teachers are made: its
    `unimodalTrainer` runs use the global config): `teacher_epochs` (None = trainer.epochs),
    `teacher_optimizer` ("same" = the run optimizer's class and settings; "sgd" = SGD momentum 0.9, weight decay
    1e-4; "adam" = Adam, no weight decay; "adamw" = AdamW, weight decay 1e-2), `teacher_lr` (None = the run
    optimizer's lr), `teacher_weight_decay` (None = as above); the run's LR scheduler config, batch size,
    drop_last, gradient clipping and precision also apply. For quick studies lower `teacher_epochs`.

    Teacher cache: each teacher is stored as `<cache_dir>/umt_teachers/<modality>-<sha256>.pt` (written
    atomically) keyed by everything that determines it: the dataset config and training-split size (and which
    samples, when a hybrid's part holds some out: `subset_fingerprint`), the modality, the run seed, the number
    of classes, the encoder's fingerprint (class, structure, attributes and initial weights, which stand for its
    backbone config node and capture the seed's effect on the initialisation), and every teacher-training setting
    above. A sweep trains each teacher once. The cache is
    off (teachers trained in memory) when `cache=false` or the run has no `cache_dir` or config. Teacher
    training runs in a forked RNG seeded from the key, so a run's student training is identical whether the
    teachers came from the cache or were trained.

    FLOPs: UMT counts its own setup (`counts_own_setup_flops`), because measuring every teacher step under
    FlopCounterMode slowed teacher training 2-3x on a CPU. A teacher's count (its first step of every epoch
    measured exactly and scaled by the epoch's samples, as the trainer counts its steps) goes to
    `flops/train/umt_teachers` when trained in this run; it is stored in the cache file and, on a hit, where
    that training is not spent in this run, added under `flops/train/umt_teachers_cached` (and logged), so
    `flops/train_total` is the method's cost, the same on a hit and a miss, and that part shows what was
    reused. The teachers' forward passes in each step are inside the measured step.

    Args:
        scaling: lambda, the weight of the distillation term (the peer's default 10; the paper's per-dataset
            values were not verified).
        teacher_epochs, teacher_optimizer, teacher_lr, teacher_weight_decay: the teacher recipe (above).
        cache: whether to read and write the teacher cache.

    Hooks used: `setup` (teachers), `loss` (teacher forwards under no_grad, the distillation term).
    Fixed versus the peer: the teachers are put in eval mode (the peer never calls `.eval()`, so BatchNorm used
    batch statistics and updated its running stats under no_grad, and dropout stayed on); teachers come from this
    run's training split and recipe instead of the newest `unimodalTrainer_<m>` checkpoint found by path
    string replacement; no hard-coded two-GPU wrapper; any number of modalities.
    """

    family = "objective"
    regression_refusal = ("its unimodal teachers are trained with cross-entropy in their own loop; the feature "
                          "distillation itself would work for regression, but teachers trained on the "
                          "regression loss are not implemented")
    counts_own_setup_flops = True

    def __init__(
        self,
        scaling: NonNegativeFloat = 10.0,
        teacher_epochs: PositiveInt | None = None,
        teacher_optimizer: Literal["same", "sgd", "adam", "adamw"] = "same",
        teacher_lr: PositiveFloat | None = None,
        teacher_weight_decay: NonNegativeFloat | None = None,
        cache: bool = True,
    ):
        self.scaling = float(scaling)
        self.teacher_epochs = teacher_epochs
        self.teacher_optimizer = teacher_optimizer
        self.teacher_lr = teacher_lr
        self.teacher_weight_decay = teacher_weight_decay
        self.cache = cache
        self.teachers: dict[str, nn.Module] = {}
        self.teacher_keys: dict[str, str] = {}
        self.teacher_info: dict[str, dict] = {}
        self.trained_teachers = 0  # how many teachers the last setup trained (0 when all came from the cache)

    # ---- the teacher recipe ----
    def _epochs(self, run) -> int:
        if self.teacher_epochs is not None:
            return int(self.teacher_epochs)
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is None:
            raise UserError("method umt: method.teacher_epochs=null means trainer.epochs, but this run has no "
                            "trainer config; set method.teacher_epochs")
        return int(epochs)

    def _optimizer_spec(self, run) -> tuple[type, dict]:
        base_lr = run.optimizer.defaults["lr"]
        lr = float(self.teacher_lr if self.teacher_lr is not None else base_lr)
        if self.teacher_optimizer == "same":
            cls = type(run.optimizer)
            accepted = inspect.signature(cls).parameters  # AdamW's defaults hold a key its constructor refuses
            settings = {k: v for k, v in run.optimizer.defaults.items() if k in accepted}
            settings["lr"] = lr
            if self.teacher_weight_decay is not None:
                settings["weight_decay"] = float(self.teacher_weight_decay)
            return cls, settings
        cls, settings = {
            "sgd": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-4}),
            "adam": (torch.optim.Adam, {"weight_decay": 0.0}),
            "adamw": (torch.optim.AdamW, {"weight_decay": 1e-2}),
        }[self.teacher_optimizer]
        settings = {**settings, "lr": lr}
        if self.teacher_weight_decay is not None:
            settings["weight_decay"] = float(self.teacher_weight_decay)
        return cls, settings

    def _scheduler_config(self, run) -> dict | None:
        return (run.config or {}).get("scheduler")

    def teacher_key(self, run, modality: str) -> dict:
        """Everything that determines modality m's teacher (hashed into its cache file name)."""
        cls, settings = self._optimizer_spec(run)
        s = run.loader_settings
        # which samples, when the training set is part of the split (no entry otherwise: earlier keys still match)
        subset = subset_fingerprint(run.train_loader.dataset)
        return {
            "format": CACHE_FORMAT,
            "modality": modality,
            "seed": run.seed,
            "num_classes": run.num_classes,
            "dataset": (run.config or {}).get("dataset"),
            "train_size": len(run.train_loader.dataset),
            **({"train_subset": subset} if subset is not None else {}),
            "encoder": module_fingerprint(run.model.encoders[modality]),
            "teacher": {
                "epochs": self._epochs(run),
                "optimizer": f"{cls.__module__}.{cls.__qualname__}",
                "optimizer_settings": settings,
                "scheduler": self._scheduler_config(run),
                "batch_size": s.batch_size,
                "drop_last": s.drop_last,
                "grad_clip": run.grad_clip,
                "precision": run.precision,
            },
        }

    # ---- setup: train or load the teachers ----
    def setup(self, run):
        super().setup(run)
        cache_dir = None
        if self.cache and run.cache_dir is not None and run.config is not None:
            cache_dir = Path(run.cache_dir) / "umt_teachers"
        elif self.cache:
            log.info("umt: teacher cache off (the run has no cache_dir or config); teachers are trained in memory")
        self.teachers, self.teacher_keys, self.teacher_info = {}, {}, {}
        self.trained_teachers = 0
        for m in run.model.modalities:
            key = self.teacher_key(run, m)
            key_json = json.dumps(key, sort_keys=True, default=repr)
            digest = hashlib.sha256(key_json.encode()).hexdigest()
            path = cache_dir / f"{m}-{digest[:24]}.pt" if cache_dir is not None else None
            seed = int(digest[:8], 16)
            encoder = copy.deepcopy(run.model.encoders[m])
            with torch.random.fork_rng(devices=_cuda_devices(run)):  # the run's own RNG stream stays intact
                torch.manual_seed(seed)
                head = nn.Linear(run.model.fusion.dims[m], run.num_classes)
            entry = self._load(path, key_json)
            if entry is not None:
                encoder.load_state_dict(entry["encoder"])
                head.load_state_dict(entry["head"])
                info = dict(entry["info"])
                flops = info.get("train_flops")
                if flops is not None:
                    run.flops.add("umt_teachers_cached", float(flops))
                log.info("umt: teacher %s loaded from %s (trained earlier: %s FLOPs, not spent in this run; added "
                         "to flops/train/umt_teachers_cached)", m, path, f"{flops:.4g}" if flops else "unknown")
            else:
                info = self._train(run, m, encoder, head, seed=seed)
                self.trained_teachers += 1
                run.flops.add("umt_teachers", float(info["train_flops"]))
                if path is not None:
                    save_checkpoint({"key": key_json, "encoder": encoder.state_dict(), "head": head.state_dict(),
                                     "info": info}, path)
                    log.info("umt: teacher %s saved to %s", m, path)
            encoder.requires_grad_(False)
            encoder.zero_grad(set_to_none=True)  # no gradients left over from its training
            encoder.eval()
            self.teachers[m] = encoder.to(run.device)
            self.teacher_keys[m] = digest
            self.teacher_info[m] = info

    @staticmethod
    def _load(path: Path | None, key_json: str) -> dict | None:
        if path is None or not path.exists():
            return None
        try:
            entry = load_checkpoint(path)
        except Exception as exc:  # a damaged file is retrained and overwritten, not fatal
            log.warning("umt: cannot read teacher cache %s (%s); training the teacher again", path, exc)
            return None
        if entry.get("key") != key_json:
            log.warning("umt: teacher cache %s belongs to another configuration; training the teacher again", path)
            return None
        return entry

    def _train(self, run, modality: str, encoder: nn.Module, head: nn.Linear, seed: int) -> dict:
        """Train encoder + head on the training split with CE, through the trainer's own epoch loop (the same
        step, clipping, precision, FLOP counting and divergence checks as the run); a forked RNG keeps the
        run's own stream intact."""
        from omegaconf import OmegaConf

        from mmbalance.config import build  # the scheduler node is built like the run's own
        from mmbalance.engine.trainer import Trainer
        from mmbalance.metrics.flops import FlopMeter
        from mmbalance.models.fusion import build_fusion
        from mmbalance.models.multimodal import MultimodalModel

        epochs = self._epochs(run)
        cls, settings = self._optimizer_spec(run)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=_cuda_devices(run)):
            torch.manual_seed(seed)  # dropout and data-independent draws: the same teacher whatever ran before
            # encoder + head as a one-modality model: a concat head over one modality is exactly `head`
            fusion = build_fusion("concat", {modality: head.in_features}, head.out_features)
            fusion.load_shared_head(head.weight.detach(), head.bias.detach(), {modality: 1.0})
            model = MultimodalModel({modality: encoder}, fusion).to(run.device)
            optimizer = cls(model.parameters(), **settings)
            sched_cfg = self._scheduler_config(run)
            scheduler = build(OmegaConf.create(sched_cfg), optimizer=optimizer) if sched_cfg is not None else None
            # the whole training split on every rank (hardware=ddp): each rank trains the same teachers
            loader = run.make_loader(run.train_loader.dataset, train=True, shard=False)
            teacher_run = dataclasses.replace(
                run, model=model, method=TeacherTraining(), optimizer=optimizer, scheduler=scheduler,
                train_loader=loader, val_loader=None, test_loader=None, output_dir=None, identity=None,
                epoch=0, step=0, flops=FlopMeter(), _noise={})
            trainer = Trainer(teacher_run, epochs=epochs, count_flops=True, progress_bar=False)
            for epoch in range(epochs):
                teacher_run.epoch = epoch
                last = trainer.train_epoch(epoch)
                if scheduler is not None:
                    scheduler.step()
        with torch.no_grad():
            head.weight.copy_(fusion.weight_block(modality))
            head.bias.copy_(fusion.bias_share(modality))
        info = {"epochs": epochs, "train_flops": teacher_run.flops.total,
                "final_epoch_train_acc": last["train/acc"], "final_epoch_train_loss": last["train/loss"],
                "seconds": time.perf_counter() - t0}
        log.info("umt: trained teacher %s for %d epochs (last-epoch train acc %.3f, %.1fs, %.4g FLOPs)", modality,
                 epochs, info["final_epoch_train_acc"], info["seconds"], info["train_flops"])
        return info

    # ---- the step ----
    def loss(self, run, batch, out):
        with torch.no_grad():
            teacher = {m: self.teachers[m](batch.inputs[m]) for m in self.teachers}
        ce = F.cross_entropy(out.logits, batch.label)
        distill = distillation_losses(out.features, teacher)
        total_distill = sum(distill.values())
        losses = {"loss": ce + self.scaling * total_distill, "ce": ce, "distill": total_distill}
        losses.update({f"distill/{m}": v for m, v in distill.items()})
        return losses

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state["teacher_keys"] = dict(self.teacher_keys)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        saved = state.get("teacher_keys", {})
        if saved and self.teacher_keys and saved != self.teacher_keys:
            log.warning("umt: the checkpoint was trained with other teachers (%s) than this run built (%s)",
                        saved, self.teacher_keys)


class TeacherTraining(Method):
    """A UMT teacher's step: the base step (fused CE on a one-modality model) that also logs the batch accuracy."""

    def loss(self, run, batch, out):
        return {"loss": F.cross_entropy(out.logits, batch.label),
                "acc": (out.logits.detach().argmax(1) == batch.label).float().mean()}
