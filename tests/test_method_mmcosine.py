"""MMCosine: cosine logits per modality block (hand-checked), used in training and at evaluation alike."""

import math

import pytest
import torch

from conftest import compose_cfg
from helpers import inputs, tiny_model
from mmbalance.data.batch import Batch
from mmbalance.errors import UserError
from mmbalance.methods.mmcosine import MMCosine, cosine_logits
from test_methods import make_run


class _Ctx:
    def __init__(self, model):
        self.model = model


def test_cosine_logits_by_hand():
    # a: h = [3, 4] -> [0.6, 0.8]; W_a rows [1, 0], [0, 2] -> [1, 0], [0, 1]; z_a = 10 * [0.6, 0.8] = [6, 8]
    # b: h = [2, 2, 0] -> [1, 1, 0]/sqrt2; W_b rows [0, 0, 5] -> [0, 0, 1], [1, 1, 0] -> [1, 1, 0]/sqrt2
    #    z_b = 10 * [0, 1] = [0, 10]; fused = [6, 18]; no bias anywhere
    features = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[2.0, 2.0, 0.0]])}
    weights = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])}
    z = cosine_logits(features, weights, scaling=10.0)
    torch.testing.assert_close(z["a"], torch.tensor([[6.0, 8.0]]))
    torch.testing.assert_close(z["b"], torch.tensor([[0.0, 10.0]]))
    # an all-zero feature (feature masking) contributes nothing
    assert torch.equal(cosine_logits({"a": torch.zeros(1, 2)}, weights, 10.0)["a"], torch.zeros(1, 2))


def test_concat_head_rows_are_normalised_within_each_modality_block():
    model = tiny_model(("a", "b"), classes=2)  # dims a: 4, b: 5
    with torch.no_grad():
        model.fusion.fc.weight.zero_()
        model.fusion.fc.weight[0, 0] = 1.0    # class 0: a-block [1,0,0,0], b-block [0,0,0,0,100]
        model.fusion.fc.weight[0, 8] = 100.0
        model.fusion.fc.weight[1, 1] = 3.0    # class 1: a-block [0,3,0,0], b-block [4,0,0,0,0]
        model.fusion.fc.weight[1, 4] = 4.0
        model.fusion.fc.bias.fill_(7.0)       # ignored
    features = {"a": torch.tensor([[1.0, 1.0, 0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0]])}
    logits, uni = MMCosine(scaling=10.0).eval_fuse(_Ctx(model), features)
    # a: h/|h| = [1,1,0,0]/sqrt2: class 0 cos = 1/sqrt2, class 1 cos = 1/sqrt2 -> 10/sqrt2 each
    # b: h/|h| = e5: class 0 cos = 1, class 1 cos = 0 -> [10, 0]. (Normalising the whole concatenated row instead
    # would give class 0 a-cos 0.01/sqrt2: the large b weight must not shrink a's logit.)
    s = 10 / math.sqrt(2)
    torch.testing.assert_close(uni["a"], torch.tensor([[s, s]]))
    torch.testing.assert_close(uni["b"], torch.tensor([[10.0, 0.0]]))
    torch.testing.assert_close(logits, torch.tensor([[s + 10.0, s]]))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_training_forward_and_evaluation_use_the_same_cosine_logits_and_no_bias(fusion):
    model = tiny_model(("a", "b"), fusion=fusion, classes=3)
    method = MMCosine(scaling=10.0)
    x, y = inputs(("a", "b"), n=6), torch.tensor([0, 1, 2, 0, 1, 2])
    out = method.forward(_Ctx(model), Batch(x, y, torch.arange(6)))
    weights = ({m: model.fusion.weight_block(m) for m in ("a", "b")} if fusion == "concat"
               else {m: model.fusion.heads[m].weight for m in ("a", "b")})
    expected = cosine_logits(out.features, weights, 10.0)
    torch.testing.assert_close(out.unimodal["a"], expected["a"])
    torch.testing.assert_close(out.logits, expected["a"] + expected["b"])
    assert out.logits.abs().max() <= 20.0 + 1e-5  # bounded by s * M
    method.loss(_Ctx(model), Batch(x, y, torch.arange(6)), out)["loss"].backward()
    biases = [model.fusion.fc.bias] if fusion == "concat" else [h.bias for h in model.fusion.heads.values()]
    assert all(b.grad is None for b in biases)
    model.eval()
    with torch.no_grad():
        feats = model.encode(x)
        logits, uni = method.eval_fuse(_Ctx(model), feats)
        ref = cosine_logits(feats, weights, 10.0)
    torch.testing.assert_close(logits, ref["a"] + ref["b"])
    torch.testing.assert_close(uni["b"], ref["b"])


def test_refuses_fusions_without_a_linear_block_per_modality():
    with pytest.raises(UserError, match="mmcosine.*backbone.fusion=gated.*concat or sum"):
        make_run(compose_cfg(["method=mmcosine", "backbone.fusion=gated"]))
    with pytest.raises(UserError, match="scaling"):
        MMCosine(scaling=0)
