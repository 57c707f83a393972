"""Tiny hand-made models and inputs shared by the tests."""

import torch
from torch import nn

from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel


class Linear1d(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())
        self.out_dim = d_out

    def forward(self, x):
        return self.net(x)


def tiny_model(mods=("a", "b"), fusion="concat", masking="input", classes=3):
    torch.manual_seed(0)
    dims = {m: 4 + i for i, m in enumerate(mods)}
    encoders = {m: Linear1d(5, d) for m, d in dims.items()}
    return MultimodalModel(encoders, build_fusion(fusion, dims, classes), masking=masking)


def inputs(mods=("a", "b"), n=6):
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(n, 5, generator=g) for m in mods}


from mmbalance.methods.base import Method  # noqa: E402


class TwoModalityMethod(Method):
    """A method that declares support for two modalities only (like Greedy), for the refusal test."""

    max_modalities = 2


# what each method needs on the command line besides its defaults, in the tests' small runs
METHOD_EXTRA_ARGS = {
    "unimodal": ["method.modality=visual"],
    "umt": ["method.teacher_epochs=1"],  # the test's run has no trainer config to take the teacher's epochs from
    # ReconBoost's boosting steps move one learner by design (tested in its own file); start with rectification
    "reconboost": ["method.boost_epochs=0"],
}
