"""OGM-GE's journal (TPAMI) warm-up: no modulation in the first `warmup_epochs` epochs; 0 keeps CVPR."""

import torch

from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.methods.ogm_ge import OGMGE


class _Ctx:
    def __init__(self, epoch):
        self.epoch = epoch
        self._g = torch.Generator().manual_seed(0)

    def reduce(self, stats):
        return stats

    def noise_generator(self, device):
        return self._g


def _changed_after_hook(warmup_epochs, epoch):
    model = tiny_model(("a", "b"), classes=3)
    x, y = inputs(("a", "b"), n=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = OGMGE(alpha=0.8, variant="ogm_ge", modulation_starts=0, modulation_ends=50, warmup_epochs=warmup_epochs)
    method.params = {m: [p for p in ps if p.dim() > 1] for m, ps in model.modality_parameters().items()}
    method.on_after_backward(_Ctx(epoch), Batch(x, y, torch.arange(8)), out)
    return any(not torch.equal(p.grad, raw[n]) for n, p in model.named_parameters())


def test_warm_up_epochs_are_not_modulated_and_modulation_starts_after_them():
    assert not _changed_after_hook(warmup_epochs=6, epoch=0)
    assert not _changed_after_hook(warmup_epochs=6, epoch=5)  # the journal's `epoch <= 5`
    assert _changed_after_hook(warmup_epochs=6, epoch=6)


def test_default_is_the_cvpr_behaviour():
    assert OGMGE().warmup_epochs == 0
    assert _changed_after_hook(warmup_epochs=0, epoch=0)
