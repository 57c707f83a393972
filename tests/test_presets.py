"""The `paper_<dataset>` presets compose, validate and carry the BalanceBenchmark paper's settings (docs/architecture.md, "Settled choices")."""

import pytest

from conftest import compose_cfg
from mmbalance.config import validate

# docs/architecture.md "Settled choices": optimizer, lr, weight decay, StepLR step, batch, epochs
PAPER = {
    "cremad": ("SGD", 1e-3, 1e-4, 30, 64, 70),
    "kinetics_sounds": ("SGD", 1e-3, 1e-4, 30, 64, 70),
    "balanced_av": ("SGD", 5e-3, 1e-4, 30, 64, 70),
    "vggsound": ("AdamW", 1e-3, 1e-3, 10, 32, 30),
    "ucf101": ("SGD", 1e-2, 1e-4, 30, 64, 70),
    "food101": ("SGD", 1e-3, 1e-4, 30, 64, 70),
    "cmu_mosei": ("SGD", 1e-2, 1e-4, 30, 64, 70),
}
# the encoder each preset gives each modality kind it uses
BACKBONE = {
    "cremad": {"spectrogram": "ResNet18Encoder", "frames": "ResNet18Encoder"},
    "kinetics_sounds": {"spectrogram": "ResNet18Encoder", "frames": "ResNet18Encoder"},
    "balanced_av": {"spectrogram": "ResNet18Encoder", "frames": "ResNet18Encoder"},
    "vggsound": {"spectrogram": "ResNet18Encoder", "frames": "ResNet18Encoder"},
    "ucf101": {"frames": "ResNet18Encoder"},
    "food101": {"image": "ResNet18Encoder", "tokens": "TextTransformerEncoder"},
    "cmu_mosei": {"sequence": "TransformerEncoder"},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_composes_validates_and_follows_the_paper(name):
    cfg = compose_cfg([f"experiment=paper_{name}", "paths.data_dir=/data"], fast=False)
    validate(cfg)
    optimizer, lr, weight_decay, step, batch, epochs = PAPER[name]
    assert cfg.optimizer._target_ == f"torch.optim.{optimizer}"
    assert cfg.optimizer.lr == pytest.approx(lr) and cfg.optimizer.weight_decay == pytest.approx(weight_decay)
    if optimizer == "SGD":
        assert cfg.optimizer.momentum == pytest.approx(0.9)
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (step, pytest.approx(0.1))
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (batch, epochs)
    for kind, encoder in BACKBONE[name].items():
        assert cfg.backbone.encoders[kind]._target_.endswith(f".{encoder}"), kind
    assert cfg.dataset.root == f"/data/{name}" and cfg.dataset.prepared == "auto"
    assert cfg.eval.select_on == "val"  # model selection never on test


def test_every_benchmark_dataset_has_a_preset_and_a_preparer():
    from mmbalance.cli import CONF_DIR
    from mmbalance.data.prepare import PREPARERS

    presets = {p.stem.removeprefix("paper_") for p in (CONF_DIR / "experiment").glob("paper_*.yaml")}
    assert presets == set(PAPER) == set(PREPARERS)
    assert all((CONF_DIR / "dataset" / f"{n}.yaml").is_file() for n in PAPER)
