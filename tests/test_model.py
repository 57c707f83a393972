"""The multimodal model: fusion heads, per-modality logits, the masking function, the parameter map."""

import pytest
import torch
from mmbalance.errors import UserError
from mmbalance.models.fusion import ConcatFusion, build_fusion
from mmbalance.models.multimodal import mask_modalities


from helpers import inputs, tiny_model


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_unimodal_logits_sum_to_fused_logits(mods, fusion):
    model = tiny_model(mods, fusion)
    out = model(inputs(mods))
    assert set(out.unimodal) == set(mods)
    torch.testing.assert_close(sum(out.unimodal.values()), out.logits, rtol=0, atol=1e-6)


def test_concat_unimodal_logits_are_the_weight_slice_plus_bias_share():
    fusion = ConcatFusion({"a": 2, "b": 1}, num_classes=2)
    with torch.no_grad():
        fusion.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]]))
        fusion.fc.bias.copy_(torch.tensor([0.5, -1.0]))
    feats = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[2.0]])}
    uni = fusion.unimodal_logits(feats)
    # a: [1+2, 0-1] + b/2 = [3.25, -1.5]; b: [6, 2] + b/2 = [6.25, 1.5]
    torch.testing.assert_close(uni["a"], torch.tensor([[3.25, -1.5]]))
    torch.testing.assert_close(uni["b"], torch.tensor([[6.25, 1.5]]))
    torch.testing.assert_close(fusion(feats), torch.tensor([[9.5, 0.0]]))


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_nonlinear_fusions_run_and_refuse_unimodal_logits(fusion):
    model = tiny_model(("a", "b", "c"), fusion)
    out = model(inputs(("a", "b", "c")))
    assert out.logits.shape == (6, 3) and out.unimodal is None
    with pytest.raises(UserError, match="concat or sum"):
        model.unimodal_logits(out.features)


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(UserError, match="backbone.fusion='late'"):
        build_fusion("late", {"a": 2}, 2)


def test_mask_modalities_whole_batch_and_per_sample():
    x = {"a": torch.ones(3, 2), "b": torch.full((3, 2), 2.0)}
    masked = mask_modalities(x, ["a"])
    assert masked["a"].abs().sum() == 0 and torch.equal(masked["b"], x["b"])
    per_sample = mask_modalities(x, {"b": torch.tensor([True, False, True])})
    assert torch.equal(per_sample["b"][:, 0], torch.tensor([0.0, 2.0, 0.0]))
    assert torch.equal(per_sample["a"], x["a"])
    assert mask_modalities(x, ()) is x


def test_input_masking_zeroes_the_input_and_feature_masking_the_feature():
    x = inputs()
    m_in = tiny_model(masking="input").eval()
    m_feat = tiny_model(masking="feature").eval()
    f_in = m_in.encode(x, absent=["b"])
    torch.testing.assert_close(f_in["b"], m_in.encoders["b"](torch.zeros_like(x["b"])))
    torch.testing.assert_close(f_in["a"], m_in.encoders["a"](x["a"]))
    f_feat = m_feat.encode(x, absent=["b"])
    assert f_feat["b"].abs().sum() == 0


@pytest.mark.parametrize("masking", ["input", "feature"])
def test_absent_features_equal_the_masked_encoding_for_every_sample(masking):
    x = inputs(n=5)
    model = tiny_model(masking=masking).eval()
    rows = model.absent_features(x)
    masked = model.encode(x, absent=["a", "b"])
    for m in ("a", "b"):
        torch.testing.assert_close(rows[m].expand(5, -1), masked[m])


def test_modality_parameter_map_is_explicit_and_disjoint():
    model = tiny_model(("a", "b", "c"))
    groups = model.modality_parameters()
    ids = {m: {id(p) for p in ps} for m, ps in groups.items()}
    assert ids["a"] == {id(p) for p in model.encoders["a"].parameters()}
    assert not (ids["a"] & ids["b"]) and not (ids["b"] & ids["c"])
    head = {id(p) for p in model.head_parameters()}
    every = {id(p) for p in model.parameters()}
    assert head | ids["a"] | ids["b"] | ids["c"] == every


def test_collate_carries_per_sample_absence_only_when_a_sample_has_it():
    from mmbalance.data.batch import collate_batch

    plain = [{"inputs": {"a": torch.zeros(2), "b": torch.ones(2)}, "label": i, "index": i} for i in range(3)]
    assert collate_batch(plain).absent is None
    plain[1]["absent"] = {"b": True}
    batch = collate_batch(plain)
    assert torch.equal(batch.absent["b"], torch.tensor([False, True, False]))
    assert torch.equal(batch.absent["a"], torch.tensor([False, False, False]))
