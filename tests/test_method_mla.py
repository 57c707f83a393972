"""MLA: the head-gradient projection, the entropy and fixed fusions, M optimizer steps per batch."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import THREE, compose_cfg
from mmbalance.errors import UserError
from mmbalance.methods.mla import MLA, entropy_weights, fixed_weights, owm_update, project_gradient
from test_methods import make_run


def test_projector_update_and_projection_by_hand():
    # P = I, r = (1, 0), alpha = 1: k = P r = (1, 0), r.k = 1 -> P = I - [[1,0],[0,0]] / (1 + 1) = diag(0.5, 1)
    P = owm_update(torch.eye(2), torch.tensor([1.0, 0.0]), alpha=1.0)
    torch.testing.assert_close(P, torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    # alpha = 0: P = diag(0, 1), the orthogonal complement of r; grad [[3,4],[1,2]] P^T = [[0,4],[0,2]]
    P = owm_update(torch.eye(2), torch.tensor([1.0, 0.0]), alpha=0.0)
    g = project_gradient(torch.tensor([[3.0, 4.0], [1.0, 2.0]]), P)
    torch.testing.assert_close(g, torch.tensor([[0.0, 4.0], [0.0, 2.0]]))
    # r = (1, 1), alpha = 0: k = (1, 1), r.k = 2 -> P = I - [[1,1],[1,1]]/2 = [[.5,-.5],[-.5,.5]]
    # grad [[3, 1]] -> [[1.5 - 0.5, -1.5 + 0.5]] = [[1, -1]], orthogonal to r
    P = owm_update(torch.eye(2), torch.tensor([1.0, 1.0]), alpha=0.0)
    torch.testing.assert_close(P, torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    g = project_gradient(torch.tensor([[3.0, 1.0]]), P)
    torch.testing.assert_close(g, torch.tensor([[1.0, -1.0]]))
    assert float(g @ torch.tensor([1.0, 1.0])) == 0.0


def test_entropy_weights_are_per_sample_softmax_over_classes():
    ln3 = math.log(3.0)
    # sample 0: o_a = [0, 0] -> H_a = ln 2 = 0.693147; o_v = [ln3, 0] -> p = (.75, .25),
    #   H_v = -(.75 ln .75 + .25 ln .25) = 0.562335; w_a = 1 / (1 + e^(0.693147 - 0.562335)) = 0.467344
    # sample 1: the modalities swapped -> the weights swap (one weight per sample, not per batch)
    logits = {"a": torch.tensor([[0.0, 0.0], [ln3, 0.0]]), "v": torch.tensor([[ln3, 0.0], [0.0, 0.0]])}
    w = entropy_weights(logits)
    torch.testing.assert_close(w["a"], torch.tensor([0.467344, 0.532656]), atol=1e-6, rtol=0)
    torch.testing.assert_close(w["v"], torch.tensor([0.532656, 0.467344]), atol=1e-6, rtol=0)
    # a sample's weight does not depend on the rest of the batch
    alone = entropy_weights({m: o[:1] for m, o in logits.items()})
    torch.testing.assert_close(alone["a"], w["a"][:1])
    # fused sample 0 = 0.467344 * [0, 0] + 0.532656 * [ln3, 0] = [0.585183, 0]
    method = MLA(fusion="entropy")
    fused = method.fuse_logits(logits)
    torch.testing.assert_close(fused[0], torch.tensor([0.585183, 0.0]), atol=1e-6, rtol=0)


def test_fixed_fusion_through_the_shared_head_by_hand():
    method = MLA(fusion="fixed", weights={"a": 0.25, "v": 0.75})
    method.weights = fixed_weights(["a", "v"], method.weights_arg)
    method.head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        method.head.weight.copy_(torch.eye(2))
        method.head.bias.copy_(torch.tensor([1.0, 0.0]))
    run = SimpleNamespace(model=SimpleNamespace(modalities=["a", "v"]))
    # o_a = [2,0] + [1,0] = [3, 0]; o_v = [0,4] + [1,0] = [1, 4]; 0.25*[3,0] + 0.75*[1,4] = [1.5, 3]
    fused, uni = method.eval_fuse(run, {"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 4.0]])})
    torch.testing.assert_close(fused, torch.tensor([[1.5, 3.0]]))
    torch.testing.assert_close(uni["v"], torch.tensor([[1.0, 4.0]]))
    assert fixed_weights(["a", "v"], None) == {"a": 0.5, "v": 0.5}  # official 0.5 / 0.5
    with pytest.raises(UserError, match="method.weights"):
        fixed_weights(["a", "v"], {"a": 1.0})


@pytest.mark.parametrize("three", [False, True], ids=["2mod", "3mod"])
def test_one_batch_makes_one_optimizer_step_per_modality(three):
    run = make_run(compose_cfg(["method=mla", "method.fusion=fixed", *(THREE if three else [])]))
    steps = []
    original = run.optimizer.step
    run.optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    batch = next(iter(run.train_loader))
    stats = run.method.training_step(run, batch)
    M = len(run.model.modalities)
    assert len(steps) == M and run.method.updates == M
    assert set(stats) == {"loss", *(f"ce/{m}" for m in run.model.modalities)}
    assert run.method.P is not None and not torch.equal(run.method.P, torch.eye(run.method.P.shape[0]))
    # the model's own head mirrors the fixed fusion of the shared head, so it predicts like eval_fuse
    run.model.eval()
    with torch.no_grad():
        feats = run.model.encode(batch.inputs)
        fused, _ = run.method.eval_fuse(run, feats)
        torch.testing.assert_close(run.model.fuse(feats), fused, atol=1e-5, rtol=1e-5)


def test_projection_off_leaves_the_projector_alone():
    run = make_run(compose_cfg(["method=mla", "method.projection=off"]))
    run.method.training_step(run, next(iter(run.train_loader)))
    assert torch.equal(run.method.P, torch.eye(run.method.P.shape[0]))


def test_unequal_feature_sizes_are_one_clear_error():
    cfg = compose_cfg(["method=mla", "backbone.encoders.image.out_dim=16"])
    with pytest.raises(UserError, match="same out_dim"):
        make_run(cfg)
