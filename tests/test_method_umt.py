"""UMT: the loss on given features (hand-checked), teachers cached on disk and frozen."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import THREE, compose_cfg
from mmbalance.config import build
from mmbalance.data.batch import Batch
from mmbalance.engine.run import LoaderSettings, Run
from mmbalance.errors import UserError
from mmbalance.methods.umt import UMT, distillation_losses, module_fingerprint
from mmbalance.models.multimodal import Output
from mmbalance.models.build import build_model

UMT_ARGS = ["method=umt", "method.teacher_epochs=1", "dataset.num_samples=48"]


def make_run(cfg, cache_dir=None, setup=True):
    """Like the contract test's run, plus the run seed, the cache folder and the resolved config a CLI run has."""
    torch.manual_seed(cfg.seed)
    splits = build(cfg.dataset)
    method = build(cfg.method)
    model = build_model(dict(splits.modalities), cfg.backbone, splits.num_classes, cfg.masking)
    opt = build(cfg.optimizer, params=model.parameters())
    run = Run(model=model, method=method, optimizer=opt, scheduler=None, train_loader=None, val_loader=None,
              test_loader=None, device=torch.device("cpu"), num_classes=splits.num_classes,
              seed=cfg.seed, loader_settings=LoaderSettings(batch_size=16), cache_dir=cache_dir,
              config=OmegaConf.to_container(cfg, resolve=True))
    run.train_loader = run.make_loader(splits.train, train=True)
    if setup:
        with run.flops.measure("method_setup"):
            method.setup(run)
    return run


def test_distillation_and_loss_by_hand():
    # h_a - t_a = [[0, 2], [0, 2]] -> squares 0, 4, 0, 4 -> MSE 2;  h_b - t_b = [[1], [-1]] -> MSE 1
    h = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[1.0], [0.0]])}
    t = {"a": torch.tensor([[1.0, 0.0], [3.0, 2.0]]), "b": torch.tensor([[0.0], [1.0]])}
    d = distillation_losses(h, t)
    assert float(d["a"]) == 2.0 and float(d["b"]) == 1.0
    method = UMT(scaling=10.0)
    method.teachers = {m: (lambda x, m=m: t[m]) for m in t}  # teacher outputs fixed to t
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    losses = method.loss(None, Batch({"a": None, "b": None}, y, torch.arange(2)), Output(logits, h))
    ce = F.cross_entropy(logits, y)  # (ln(1 + e^-2) + ln 2) / 2
    assert float(ce) == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    assert float(losses["loss"]) == pytest.approx(float(ce) + 10.0 * (2.0 + 1.0), abs=1e-6)
    assert float(losses["distill/a"]) == 2.0 and float(losses["distill"]) == 3.0


def test_teachers_are_cached_and_the_second_setup_trains_nothing(tmp_path, monkeypatch):
    cfg = compose_cfg(UMT_ARGS)
    first = make_run(cfg, cache_dir=tmp_path, setup=False)
    rng = torch.random.get_rng_state()
    assert UMT.counts_own_setup_flops  # the trainer does not measure UMT's setup: UMT adds its own count
    first.method.setup(first)
    assert first.method.trained_teachers == 2
    # teacher training draws from a forked RNG: the run's own stream is untouched (same student, hit or miss)
    assert torch.equal(torch.random.get_rng_state(), rng)
    files = sorted(p.name for p in (tmp_path / "umt_teachers").glob("*.pt"))
    assert len(files) == 2 and files[0].startswith("audio-") and files[1].startswith("visual-")
    assert first.flops.by_part["umt_teachers"] > 0 and "method_setup" not in first.flops.by_part
    # a teacher starts as a copy of the student's fresh encoder and is trained from there
    student = first.model.encoders["audio"]
    assert first.method.teacher_keys["audio"] and not torch.equal(
        next(first.method.teachers["audio"].parameters()), next(student.parameters()))

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(UMT, "_train", no_training)
    second = make_run(cfg, cache_dir=tmp_path)
    assert second.method.trained_teachers == 0
    for m in ("audio", "visual"):
        loaded = second.method.teachers[m].state_dict()
        for k, v in first.method.teachers[m].state_dict().items():
            assert torch.equal(v, loaded[k])
    # the cached teachers' training FLOPs are reported (not spent here): the totals match the first run's
    cached = second.flops.by_part["umt_teachers_cached"]
    assert cached == pytest.approx(sum(i["train_flops"] for i in first.method.teacher_info.values()))
    assert second.flops.total == pytest.approx(first.flops.total)


def test_the_cache_key_changes_with_what_determines_the_teacher(tmp_path):
    base = make_run(compose_cfg(UMT_ARGS), cache_dir=tmp_path, setup=False).method
    run = make_run(compose_cfg(UMT_ARGS), cache_dir=tmp_path, setup=False)
    key = run.method.teacher_key(run, "audio")
    assert key == base.teacher_key(run, "audio")
    for extra in (["method.teacher_lr=0.5"], ["seed=1"], ["dataset.seed=3"], ["backbone.encoders.spectrogram.width=4"]):
        other = make_run(compose_cfg(UMT_ARGS + extra), cache_dir=tmp_path, setup=False)
        assert other.method.teacher_key(other, "audio") != key, extra
    # the encoder fingerprint sees the initial weights, not only the architecture
    enc = run.model.encoders["audio"]
    before = module_fingerprint(enc)
    with torch.no_grad():
        next(enc.parameters()).add_(1.0)
    assert module_fingerprint(enc) != before


def test_teachers_are_frozen_in_eval_mode_and_unchanged_by_a_step(tmp_path):
    cfg = compose_cfg(UMT_ARGS + THREE)  # three teachers (the contract test runs 2 and 3 modalities too)
    run = make_run(cfg, cache_dir=tmp_path)
    teachers = run.method.teachers
    assert set(teachers) == set(run.model.modalities)
    before = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    for t in teachers.values():
        assert not t.training and all(not p.requires_grad and id(p) not in optimized for p in t.parameters())
    run.model.train()
    stats = run.method.training_step(run, next(iter(run.train_loader)))
    assert torch.isfinite(stats["loss"]) and stats["distill"] > 0
    for m, t in teachers.items():
        assert not t.training and all(p.grad is None for p in t.parameters())
        for k, v in t.state_dict().items():  # BatchNorm running stats included
            assert torch.equal(v, before[m][k]), (m, k)


def test_teacher_epochs_default_needs_the_run_config():
    run = make_run(compose_cfg(["method=umt", "dataset.num_samples=48"]), setup=False)
    assert run.method._epochs(run) == 2  # trainer.epochs of the FAST test config
    run.config = None
    with pytest.raises(UserError, match="teacher_epochs"):
        run.method.setup(run)
    with pytest.raises(UserError, match="teacher_optimizer"):
        UMT(teacher_optimizer="lbfgs")
